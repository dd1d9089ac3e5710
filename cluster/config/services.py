"""The service's sections: S3 storage, the HTTP API, request limits, the Ray cluster, monitoring."""
from __future__ import annotations

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
    api_keys_file: str | None = ".imagine/api_keys"  # one key per line; `imagine up` writes one on first start
    api_keys_env: str = "IMAGINE_API_KEYS"  # comma-separated keys, added to the file's
    auth: Literal["auto", "required", "disabled"] = "auto"  # auto = required when any key is configured
    request_timeout_s: float = Field(300.0, gt=0)
    stall_timeout_s: float = Field(60.0, gt=0)  # a Diffuser stream silent this long fails its job (dead replica)
    max_queued_requests: int = 64  # Serve's max_queued_requests on the ingress (429 when full); -1 = unlimited

    @field_validator("max_queued_requests")
    @classmethod
    def _queue(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"max_queued_requests ({v}) must be -1 (unlimited) or >= 1")
        return v

    def load_api_keys(self, base_dir: str | Path | None = None) -> set[str]:
        """The keys from `api_keys_env` plus those in `api_keys_file` (blank lines and `#` comments skipped)."""
        keys = {k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip()}
        path = _resolve(self.api_keys_file, base_dir)
        if path is not None and Path(path).is_file():
            keys |= {line.strip() for line in Path(path).read_text().splitlines()
                     if line.strip() and not line.lstrip().startswith("#")}
        return keys

    def auth_enabled(self, keys: set[str]) -> bool:
        """Whether requests must carry a key, given the configured `keys`."""
        return self.auth == "required" or (self.auth == "auto" and bool(keys))


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
