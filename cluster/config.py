"""`ImagineConfig`: the one config model of the service, loaded from one YAML file.

Everything else is derived from it: the Serve app config (`serve_config`, for `serve deploy`),
the deployments' options, storage and API settings. Environment variables are read here and
nowhere else (S3 credentials, extra API keys). Secrets never live in the config itself: it only
holds the *names* of environment variables and the *paths* of files that contain them.

    cfg = ImagineConfig.load("imagine.yaml")     # None = all defaults
    cfg.stages.diffuser.max_batch_size           # 16
    access_key, secret_key = cfg.storage.credentials()

Importing this module pulls in neither Ray nor torch nor boto3; `validate_serve_config` imports
Ray's schema lazily.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

STAGES = ("text_encoder", "diffuser", "upscaler", "publisher")
DEPLOYMENT_NAMES = {"ingress": "Ingress", "text_encoder": "TextEncoder", "diffuser": "Diffuser",
                    "upscaler": "Upscaler", "publisher": "Publisher"}
IMPORT_PATH = "deployments.app:build_app_from_args"


class ConfigError(ValueError):
    """A config that cannot be used; the message names each offending field by its dotted path."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- stages -------------------------------------------------------------------------------------

class ActorOptions(_Model):
    """Resources of one replica, as Ray's `ray_actor_options`."""
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)  # fractions (0.25) let several stages share one GPU
    memory_bytes: int | None = Field(None, gt=0)
    resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources

    @field_validator("num_gpus")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError(f"num_gpus ({v}) above 1 must be a whole number; fractions are only for sharing one GPU")
        return v

    def to_ray(self) -> dict:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_bytes is not None:
            opts["memory"] = self.memory_bytes
        if self.resources:
            opts["resources"] = dict(self.resources)
        return opts


class Autoscaling(_Model):
    """Serve's request-based autoscaling for one stage."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must be within min_replicas "
                             f"({self.min_replicas}) and max_replicas ({self.max_replicas})")
        return self

    def to_serve(self) -> dict:
        d = self.model_dump(exclude={"initial_replicas"})
        if self.initial_replicas is not None:
            d["initial_replicas"] = self.initial_replicas
        return d


class StageConfig(_Model):
    """How one deployment runs: replicas, resources, queueing, which model and device."""
    default_num_cpus: ClassVar[float] = 1.0

    num_replicas: int | None = Field(1, ge=1)  # None when `autoscaling` is set
    autoscaling: Autoscaling | None = None
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = -1  # -1 = unlimited
    model: str | None = None  # model folder (with pipeline.json) for this stage; None = the top-level `model`
    device: Literal["auto", "cpu", "cuda"] = "auto"
    health_check_period_s: float = Field(10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        # A partial `ray_actor_options` keeps this stage's default num_cpus.
        opts = data.get("ray_actor_options", {})
        if isinstance(opts, dict) and "num_cpus" not in opts:
            data["ray_actor_options"] = {**opts, "num_cpus": cls.default_num_cpus}
        if data.get("autoscaling") is not None:
            if data.get("num_replicas") is not None:
                raise ValueError(f"set either num_replicas ({data['num_replicas']}) or autoscaling "
                                 f"({data['autoscaling']}), not both")
            data["num_replicas"] = None
        return data

    @model_validator(mode="after")
    def _check(self) -> "StageConfig":
        if self.num_replicas is None and self.autoscaling is None:
            raise ValueError("num_replicas is null and autoscaling is not set; set one of them")
        if self.max_queued_requests != -1 and self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests ({self.max_queued_requests}) must be -1 (unlimited) or >= 1")
        if self.ray_actor_options.num_gpus > 0 and self.device == "cpu":
            raise ValueError(f"ray_actor_options.num_gpus ({self.ray_actor_options.num_gpus}) > 0 but device is "
                             f"'{self.device}'; use device 'auto' or 'cuda', or num_gpus 0")
        return self

    @property
    def max_replicas(self) -> int:
        """The most replicas this stage can have: autoscaling's ceiling, or the fixed count."""
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas

    def user_config(self) -> dict | None:
        """The settings Serve hands to `reconfigure()` on live replicas, in place: the replica ceiling
        (exported as imagine_stage_replicas_max for the queue-at-max alert) and batching."""
        return {"max_replicas": self.max_replicas}


class _BatchedStage(StageConfig):
    batch_keys: ClassVar[tuple[str, ...]] = ("max_batch_size", "batch_wait_timeout_s")

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)

    @model_validator(mode="after")
    def _batches_can_fill(self) -> "_BatchedStage":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or a replica never sees a full batch")
        return self

    def user_config(self) -> dict:
        return {**super().user_config(), **{k: getattr(self, k) for k in self.batch_keys}}


class TextEncoderConfig(_BatchedStage):
    """CLIP text encoder (the CLIP scorer that ranks `best_of` samples runs beside it)."""
    max_ongoing_requests: int = Field(64, ge=1)
    max_batch_size: int = Field(32, ge=1)


class DiffuserConfig(_BatchedStage):
    """The diffusion sampler: `step` (continuous batching) lets requests join and leave the running batch
    between denoising steps; `request` batches whole requests with `@serve.batch` (the comparison).

    With `step`, `max_batch_size` bounds the images in flight per replica, `batch_wait_timeout_s` is how
    long an idle replica waits to gather its first batch, and `join` when waiting requests enter:
    `every_step` (at each step boundary) or `when_empty` (only once the running batch has drained).
    """
    batch_keys: ClassVar[tuple[str, ...]] = ("batching", "join", "max_batch_size", "batch_wait_timeout_s")

    batching: Literal["request", "step"] = "step"
    join: Literal["every_step", "when_empty"] = "every_step"
    max_ongoing_requests: int = Field(64, ge=1)
    max_batch_size: int = Field(16, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.05, ge=0)


class UpscalerConfig(_BatchedStage):
    batch_keys: ClassVar[tuple[str, ...]] = ("tile", "max_batch_size", "batch_wait_timeout_s")

    tile: int = Field(0, ge=0)  # tile size in pixels; 0 = whole image at once


class IngressConfig(StageConfig):
    """The HTTP ingress; its queue limit is `api.max_queued_requests`."""
    default_num_cpus: ClassVar[float] = 0.5

    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0.5))
    max_ongoing_requests: int = Field(100, ge=1)

    def user_config(self) -> dict | None:
        return None

    @field_validator("max_queued_requests")
    @classmethod
    def _use_api_limit(cls, v: int) -> int:
        if v != -1:
            raise ValueError(f"the ingress queue limit is api.max_queued_requests; remove "
                             f"stages.ingress.max_queued_requests ({v})")
        return v


class PublisherConfig(StageConfig):
    """Writes the images to S3."""
    default_num_cpus: ClassVar[float] = 0.5

    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0.5))


class Stages(_Model):
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    diffuser: DiffuserConfig = Field(default_factory=DiffuserConfig)
    upscaler: UpscalerConfig = Field(default_factory=UpscalerConfig)
    publisher: PublisherConfig = Field(default_factory=PublisherConfig)


# ---- storage, API, limits, cluster, monitoring --------------------------------------------------

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
    """Caps on one request, checked at the ingress (the request model's hard caps are the upper bounds)."""
    max_n: int = Field(16, ge=1, le=16)
    max_steps: int = Field(200, ge=1, le=200)
    max_best_of: int = Field(4, ge=1, le=8)
    max_prompt_chars: int = Field(1000, ge=1, le=1000)


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


# ---- the config ---------------------------------------------------------------------------------

class ImagineConfig(_Model):
    model: str | None = None  # model folder with pipeline.json; None = the built-in model
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    stages: Stages = Field(default_factory=Stages)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    limits: Limits = Field(default_factory=Limits)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)

    @model_validator(mode="after")
    def _distinct_ports(self) -> "ImagineConfig":
        ports = {"cluster.http_port": self.cluster.http_port, "cluster.dashboard_port": self.cluster.dashboard_port}
        if self.monitoring.enabled:
            ports |= {"monitoring.metrics_export_port": self.monitoring.metrics_export_port,
                      "monitoring.prometheus_port": self.monitoring.prometheus_port}
        if self.storage.local.enabled:
            ports["storage.local.port"] = self.storage.local.port
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port in seen:
                raise ValueError(f"{seen[port]} ({port}) and {name} ({port}) must differ")
            seen[port] = name
        return self

    @classmethod
    def from_dict(cls, d: dict | None, source: str | None = None) -> "ImagineConfig":
        """Validate a plain dict (as read from YAML); `source` names the file in error messages."""
        try:
            return cls.model_validate(d or {})
        except ValidationError as e:
            raise ConfigError(_format_errors(e, source)) from None

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ImagineConfig":
        """Read a YAML file; None = all defaults. Relative paths stay as written (see `resolve_paths`)."""
        if path is None:
            return cls()
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    def stage(self, name: str) -> StageConfig:
        if name not in DEPLOYMENT_NAMES:
            raise KeyError(f"unknown stage {name!r}; stages are {', '.join(DEPLOYMENT_NAMES)}")
        return getattr(self.stages, name)

    def model_for(self, stage_name: str) -> str | None:
        """The model folder a stage loads: its own `model`, else the top-level one (None = built-in)."""
        return self.stage(stage_name).model or self.model

    def resolve_paths(self, base_dir: str | Path) -> "ImagineConfig":
        """A copy whose relative file paths are made absolute against `base_dir` (e.g. the config's folder)."""
        d = self.model_dump()
        d["model"] = _resolve(d["model"], base_dir)
        for name in DEPLOYMENT_NAMES:
            d["stages"][name]["model"] = _resolve(d["stages"][name]["model"], base_dir)
        d["cluster"]["temp_dir"] = _resolve(d["cluster"]["temp_dir"], base_dir)
        d["storage"]["credentials_file"] = _resolve(d["storage"]["credentials_file"], base_dir)
        d["storage"]["local"]["data_dir"] = _resolve(d["storage"]["local"]["data_dir"], base_dir)
        d["api"]["api_keys_file"] = _resolve(d["api"]["api_keys_file"], base_dir)
        return type(self).model_validate(d)

    def serve_config(self, config_path: str | Path | None = None) -> dict:
        """Serve's config file format (`ServeDeploySchema`), for `serve deploy`.

        With `config_path`, relative paths are resolved against its folder first, since replicas do not
        run in the operator's working directory.
        """
        cfg = self.resolve_paths(Path(config_path).resolve().parent) if config_path is not None else self
        return {
            "proxy_location": "EveryNode",
            "http_options": {"host": cfg.cluster.http_host, "port": cfg.cluster.http_port},
            "applications": [{
                "name": cfg.cluster.app_name,
                "route_prefix": cfg.cluster.route_prefix,
                "import_path": IMPORT_PATH,
                "args": {"config": cfg.replica_view()},
                "deployments": [cfg._deployment(name) for name in DEPLOYMENT_NAMES],
            }],
        }

    def replica_view(self) -> dict:
        """What replicas read (the application's `args`): the config without scaling settings.

        Serve rebuilds every deployment whose init args change, so replicas, autoscaling, queue
        and batch settings stay out of the args; they reach Serve through each deployment's
        options and `user_config`, which Serve applies in place (no replica restarts).
        """
        d = self.model_dump(mode="json")
        keep = {"model", "device", "ray_actor_options"}
        d["stages"] = {name: {k: v for k, v in stage.items() if k in keep} for name, stage in d["stages"].items()}
        return d

    def _deployment(self, name: str) -> dict:
        stage = self.stage(name)
        d: dict[str, Any] = {"name": DEPLOYMENT_NAMES[name]}
        if stage.autoscaling is not None:
            d["autoscaling_config"] = stage.autoscaling.to_serve()
        else:
            d["num_replicas"] = stage.num_replicas
        d["max_ongoing_requests"] = stage.max_ongoing_requests
        queued = self.api.max_queued_requests if name == "ingress" else stage.max_queued_requests
        if queued != -1:
            d["max_queued_requests"] = queued
        d["ray_actor_options"] = stage.ray_actor_options.to_ray()
        d["health_check_period_s"] = stage.health_check_period_s
        d["graceful_shutdown_timeout_s"] = stage.graceful_shutdown_timeout_s
        if (user_config := stage.user_config()) is not None:
            d["user_config"] = user_config
        return d


def validate_serve_config(d: dict) -> None:
    """Check `d` against Ray Serve's own `ServeDeploySchema` (imports Ray).

    Raises:
        ConfigError: Serve would reject the config; the message lists each error by its path.
    """
    with warnings.catch_warnings():  # Ray's own models trip pydantic's deprecation warnings on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray.serve.schema import ServeDeploySchema  # a pydantic v2 model in Ray 2.60
    try:
        ServeDeploySchema.model_validate(d)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, "Serve config")) from None


def render_serve_config_yaml(cfg: ImagineConfig, config_path: str | Path | None = None) -> str:
    header = (f"# Generated by `imagine serve-config` from {config_path or 'imagine.yaml'}; do not edit by hand.\n"
              "# Change imagine.yaml and re-render instead. Deploy with: serve deploy <this file>\n")
    return header + yaml.safe_dump(cfg.serve_config(config_path), sort_keys=False)


# ---- helpers ------------------------------------------------------------------------------------

def _resolve(path: str | None, base_dir: str | Path | None) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else Path(base_dir or Path.cwd()) / p)


def _format_errors(e: ValidationError, source: str | None) -> str:
    lines = [f"invalid config{f' in {source}' if source else ''} ({e.error_count()} error(s)):"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _suggest(err["loc"])
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _suggest(loc: tuple) -> str:
    """' (did you mean 'x'?)' / ' (allowed: ...)' for an unknown key at `loc`, found by walking the models."""
    model: Any = ImagineConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                     None)
        if model is None:
            return ""
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
