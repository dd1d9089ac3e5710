"""The service's sections: S3 storage, the HTTP API, request limits, the Ray cluster, monitoring, the job queue,
jobs and their webhooks."""
from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from pipeline.request import MAX_BEST_OF, MAX_N, MAX_PROMPT_CHARS, MAX_STEPS

from .base import ConfigError, _Model, _resolve

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class LocalS3(_Model):
    """A SeaweedFS S3 server that `imagine up` starts on this machine."""
    enabled: bool = True
    data_dir: str = ".imagine/s3"
    port: int = Field(8333, ge=1, le=65535)  # the S3 port; the launcher derives SeaweedFS's other ports


class StorageConfig(_Model):
    endpoint_url: str | None = "http://127.0.0.1:8333"  # None = AWS's default endpoint
    bucket: str = "imagine"
    region: str = "us-east-1"
    path_style: bool = True
    access_key_env: str = "IMAGINE_S3_ACCESS_KEY"
    secret_key_env: str = "IMAGINE_S3_SECRET_KEY"
    credentials_file: str | None = ".imagine/s3-credentials.json"  # {"access_key": ..., "secret_key": ...}
    presign_expiry_s: int = Field(3600, ge=1, le=604800)
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    local: LocalS3 = Field(default_factory=LocalS3)

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        if not _BUCKET.match(v) or ".." in v or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", v):
            raise ValueError(f"bucket {v!r} is not a valid S3 bucket name: 3-63 characters of lowercase letters, "
                             "digits, dots and hyphens, starting and ending with a letter or digit")
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url {v!r} must start with http:// or https://")
        return v

    def credentials(self, base_dir: str | Path | None = None) -> tuple[str, SecretStr]:
        """(access_key, secret_key): from the env vars `access_key_env`/`secret_key_env` when both are set,
        else from `credentials_file` (relative to `base_dir`, default the working directory).

        Raises:
            ConfigError: only one env var is set, the file is unreadable or malformed, or neither source exists.
        """
        access, secret = os.environ.get(self.access_key_env), os.environ.get(self.secret_key_env)
        if access and secret:
            return access, SecretStr(secret)
        if access or secret:
            have, missing = ((self.access_key_env, self.secret_key_env) if access
                             else (self.secret_key_env, self.access_key_env))
            raise ConfigError(f"S3 credentials: {have} is set but {missing} is not; set both or neither")
        path = _resolve(self.credentials_file, base_dir)
        if path is None or not Path(path).is_file():
            raise ConfigError(
                f"no S3 credentials: set the environment variables {self.access_key_env} and {self.secret_key_env}, "
                f"or write {path or 'a file named by storage.credentials_file'} as "
                '{"access_key": ..., "secret_key": ...} (`imagine up` creates it for the local S3)')
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"S3 credentials file {path}: cannot read it as JSON ({type(e).__name__})") from None
        if not (isinstance(data, dict) and all(isinstance(data.get(k), str) and data[k]
                                               for k in ("access_key", "secret_key"))):
            raise ConfigError(f"S3 credentials file {path}: expected a JSON object with non-empty "
                              '"access_key" and "secret_key" strings')
        return data["access_key"], SecretStr(data["secret_key"])


class ApiConfig(_Model):
    # one key per line, optionally followed by its priority tier ("imk_... relax"); `imagine up` writes one
    api_keys_file: str | None = ".imagine/api_keys"
    api_keys_env: str = "IMAGINE_API_KEYS"  # comma-separated keys, added to the file's
    # auto and required: every request but /healthz and /readyz needs a key, and with no key configured every
    # such request is refused (fail closed); disabled: no keys at all (only for a server nobody else can reach)
    auth: Literal["auto", "required", "disabled"] = "auto"
    public_docs: bool = False  # /docs and /openapi.json without a key
    max_body_bytes: int = Field(1 << 20, ge=1024)  # larger request bodies get 413
    request_timeout_s: float = Field(900.0, gt=0)  # how long POST /v1/images/generations waits for its job
    max_queued_requests: int = 64  # Serve's max_queued_requests on the ingress (429 when full); -1 = unlimited

    @field_validator("max_queued_requests")
    @classmethod
    def _queue(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"max_queued_requests ({v}) must be -1 (unlimited) or >= 1")
        return v

    def load_api_keys(self, base_dir: str | Path | None = None) -> set[str]:
        """The keys from `api_keys_env` plus those in `api_keys_file` (blank lines and `#` comments skipped)."""
        return set(self.load_key_settings(base_dir))

    def load_key_settings(self, base_dir: str | Path | None = None) -> dict[str, str | None]:
        """Each key with its priority tier ("fast", "relax"; None = the queue's default).

        Raises:
            ConfigError: a line of the keys file has a tier other than fast or relax.
        """
        keys: dict[str, str | None] = {k.strip(): None for k in os.environ.get(self.api_keys_env, "").split(",")
                                       if k.strip()}
        path = _resolve(self.api_keys_file, base_dir)
        if path is not None and Path(path).is_file():
            for n, line in enumerate(Path(path).read_text().splitlines(), 1):
                words = line.split()
                if not words or words[0].startswith("#"):
                    continue
                tier = words[1] if len(words) > 1 else None
                if tier not in (None, "fast", "relax"):
                    raise ConfigError(f"{path}:{n}: the priority after a key must be fast or relax, got {tier!r}")
                keys[words[0]] = tier
        return keys

    def auth_enabled(self) -> bool:
        """Whether requests must carry a key (always, unless auth is disabled: no keys means no access)."""
        return self.auth != "disabled"


class Limits(_Model):
    """Caps on one request, checked at the ingress; the request contract's hard caps are the upper bounds."""
    max_n: int = Field(MAX_N, ge=1, le=MAX_N)
    max_steps: int = Field(MAX_STEPS, ge=1, le=MAX_STEPS)
    max_best_of: int = Field(4, ge=1, le=MAX_BEST_OF)
    max_prompt_chars: int = Field(MAX_PROMPT_CHARS, ge=1, le=MAX_PROMPT_CHARS)


class ClusterConfig(_Model):
    app_name: str = Field("imagine", min_length=1)
    ray_address: str | None = None  # None = start or join a local head
    temp_dir: str = ".imagine/ray"
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    dashboard_port: int = Field(8265, ge=1, le=65535)
    route_prefix: str = "/"

    @field_validator("route_prefix")
    @classmethod
    def _slash(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"route_prefix {v!r} must start with '/'")
        return v


class MonitoringConfig(_Model):
    enabled: bool = True
    metrics_export_port: int = Field(8080, ge=1, le=65535)  # Ray's per-node metrics export port
    prometheus_port: int = Field(9090, ge=1, le=65535)


class LocalBroker(_Model):
    """A Redis that `imagine up` starts on this machine (loopback only, password from `queue.password_*`)."""
    enabled: bool = True
    data_dir: str = ".imagine/redis"
    port: int = Field(6390, ge=1, le=65535)


class QueueConfig(_Model):
    """The job queue: Celery messages on Redis (deployments/queue.py) and their bookkeeping (cluster/jobqueue.py).

    Admission counts work in image-steps (a job's cost is n x best_of x steps): beyond `max_queued_image_steps`
    in total, or `max_queued_image_steps_per_key` for one API key, a new job gets 429 with Retry-After.
    """
    redis_url: str = "redis://127.0.0.1:6390/0"  # no password in it: see password_env / password_file
    password_env: str = "IMAGINE_REDIS_PASSWORD"
    password_file: str | None = ".imagine/redis-password"  # `imagine up` writes one for the local Redis
    queue_name: str = Field("imagine-jobs", pattern=r"^[A-Za-z0-9_.-]+$")
    prefix: str = Field("imagine:", pattern=r"^[A-Za-z0-9_.:-]+$")  # of the bookkeeping keys
    max_queued_image_steps: int = Field(20000, ge=1)  # these two reach the Ingress in place (user_config)
    max_queued_image_steps_per_key: int = Field(8000, ge=1)
    default_priority: Literal["fast", "relax"] = "fast"  # for keys without their own (api.api_keys_file)
    infrastructure_retries: int = Field(5, ge=0)  # Celery retries of a delivery that could not reach S3 or Redis
    local: LocalBroker = Field(default_factory=LocalBroker)

    @field_validator("redis_url")
    @classmethod
    def _no_secret(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://")):
            raise ValueError(f"redis_url {v!r} must start with redis:// or rediss://")
        if "@" in v.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("redis_url must not hold a password; set it in the environment variable named by "
                             "password_env, or in the file named by password_file")
        return v

    @staticmethod
    def read_password(env: str | None, file: str | None) -> str | None:
        """The broker password: from the environment variable `env`, else the file `file`; None if neither."""
        if env and os.environ.get(env):
            return os.environ[env]
        if file and Path(file).is_file():
            return Path(file).read_text().strip()
        return None

    def password(self) -> str | None:
        return self.read_password(self.password_env, self.password_file)

    def client(self, **kwargs):
        """A redis-py client for the queue's Redis (password included)."""
        import redis
        return redis.Redis.from_url(self.redis_url, password=self.password(), **kwargs)

    def job_queue(self, **client_kwargs):
        """The queue's bookkeeping (cluster/jobqueue.py) on this Redis."""
        from cluster.jobqueue import JobQueue
        client_kwargs.setdefault("socket_timeout", 5)
        client_kwargs.setdefault("socket_connect_timeout", 2)
        return JobQueue(self.client(**client_kwargs), self.max_queued_image_steps,
                        self.max_queued_image_steps_per_key, prefix=self.prefix)


class JobsConfig(_Model):
    """How a job runs: its deadline, its attempts, the lease that detects a dead runner, stage retries."""
    deadline_s: float = Field(600.0, gt=0)  # from the job's start (queueing not counted); reported as timeout
    max_attempts: int = Field(3, ge=1)  # runs of one job (a runner that died counts one) before retries_exhausted
    lease_s: float = Field(10.0, gt=0)  # a runner renews its jobs' leases every lease_s / 3; expired = redelivered
    stage_retries: int = Field(2, ge=0)  # calls of a stage whose replica died, retried inside the job
    stall_timeout_s: float = Field(30.0, gt=0)  # a stage stream silent this long (not even a heartbeat) = dead


# an allowed_hosts entry that is not an address or network: a host name, "*.suffix" (any name ending so) or "*"
HOST_PATTERN = re.compile(r"^(\*|(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*)$")
LOOPBACK_HOSTS = ("127.0.0.0/8", "::1", "localhost")


class WebhooksConfig(_Model):
    """Job webhooks (deployments/webhooks.py): the job record POSTed to a job's `webhook` URL on its events,
    signed the Standard Webhooks way with a per-key secret derived from the server's webhook secret.

    `allowed_hosts` decides which URLs a job may name, so that the server cannot be made to call into the
    network it runs in. Every address the URL's host resolves to must be allowed: an address inside one of
    the listed networks (CIDR or single address) is; a public (globally routable) address is when the host
    name matches a listed name ("hooks.example.com", "*.example.com", or "*" for any). Private, link-local
    (169.254.169.254), shared and reserved addresses are allowed only through a listed network.
    """
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    secret_env: str = "IMAGINE_WEBHOOK_SECRET"  # the server's webhook secret, else ...
    secret_file: str | None = ".imagine/webhook-secret"  # ... this file (its content, stripped)
    timeout_s: float = Field(5.0, gt=0)  # per delivery attempt: connect, send, the response's status
    max_attempts: int = Field(5, ge=1)  # per event, retries included (on connection errors, timeouts, 5xx, 429)
    backoff_s: float = Field(0.5, ge=0)  # before the first retry; doubles for each next one
    progress_every_s: float = Field(2.0, ge=0)  # at most one progress event per job this often

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for entry in v:
            e = entry.strip().lower()
            try:
                ipaddress.ip_network(e, strict=False)
                out.append(e)
                continue
            except ValueError:
                pass
            if not HOST_PATTERN.match(e.removesuffix(".")):
                raise ValueError(f"allowed_hosts entry {entry!r} is neither an address or network (CIDR) nor a host "
                                 "name pattern (a name, '*.suffix' or '*')")
            out.append(e.removesuffix("."))
        return tuple(out)

    def server_secret(self) -> bytes | None:
        """The server's webhook secret: the environment variable `secret_env`, else the content of `secret_file`
        (relative to the working directory unless the config was resolved), stripped; None if neither is set."""
        value = QueueConfig.read_password(self.secret_env, self.secret_file)
        return value.encode() if value else None
