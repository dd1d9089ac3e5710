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
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from .base import DEPLOYMENT_NAMES, IMPORT_PATH, QUEUE_POLICY, STAGES, ConfigError, _Model, _resolve
from .services import (
    ApiConfig,
    ClusterConfig,
    JobsConfig,
    Limits,
    LocalBroker,
    LocalS3,
    MonitoringConfig,
    QueueConfig,
    StorageConfig,
    WebhooksConfig,
)
from .stages import (
    ActorOptions,
    Autoscaling,
    DiffuserConfig,
    IngressConfig,
    JobRunnerConfig,
    PublisherConfig,
    StageConfig,
    Stages,
    TextEncoderConfig,
    UpscalerConfig,
)

__all__ = [
    "DEPLOYMENT_NAMES", "IMPORT_PATH", "STAGES", "ActorOptions", "ApiConfig", "Autoscaling", "ClusterConfig",
    "ConfigError", "DiffuserConfig", "ImagineConfig", "IngressConfig", "JobRunnerConfig", "JobsConfig", "Limits",
    "LocalBroker", "LocalS3", "MonitoringConfig", "PublisherConfig", "QUEUE_POLICY", "QueueConfig", "StageConfig",
    "Stages", "StorageConfig", "TextEncoderConfig", "UpscalerConfig", "WebhooksConfig",
    "render_serve_config_yaml", "validate_serve_config",
]


ADMISSION_KEYS = ("max_queued_image_steps", "max_queued_image_steps_per_key")  # queue limits the Ingress applies

# ---- the config ---------------------------------------------------------------------------------

class ImagineConfig(_Model):
    model: str | None = None  # model folder with pipeline.json; None = the built-in model
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    stages: Stages = Field(default_factory=Stages)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    limits: Limits = Field(default_factory=Limits)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)

    @model_validator(mode="after")
    def _distinct_ports(self) -> "ImagineConfig":
        ports = {"cluster.http_port": self.cluster.http_port, "cluster.dashboard_port": self.cluster.dashboard_port}
        if self.monitoring.enabled:
            ports |= {"monitoring.metrics_export_port": self.monitoring.metrics_export_port,
                      "monitoring.prometheus_port": self.monitoring.prometheus_port}
        if self.storage.local.enabled:
            ports["storage.local.port"] = self.storage.local.port
        if self.queue.local.enabled:
            ports["queue.local.port"] = self.queue.local.port
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
        d["queue"]["password_file"] = _resolve(d["queue"]["password_file"], base_dir)
        d["queue"]["local"]["data_dir"] = _resolve(d["queue"]["local"]["data_dir"], base_dir)
        d["webhooks"]["secret_file"] = _resolve(d["webhooks"]["secret_file"], base_dir)
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
        for k in ADMISSION_KEYS:  # the Ingress's user_config
            d["queue"].pop(k)
        return d

    def _deployment(self, name: str) -> dict:
        stage = self.stage(name)
        d: dict[str, Any] = {"name": DEPLOYMENT_NAMES[name]}
        if stage.autoscaling is not None:
            d["autoscaling_config"] = stage.autoscaling.to_serve()
            if name == "job_runner":  # the queue consumer scales on the queue's length (deployments/queue.py)
                d["autoscaling_config"]["policy"] = self._queue_policy()
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
        if name == "ingress":  # admission limits change in place, like batch sizes
            d["user_config"] = {k: getattr(self.queue, k) for k in ADMISSION_KEYS}
        return d


    def _queue_policy(self) -> dict:
        q = self.queue
        return {"policy_function": QUEUE_POLICY,
                "policy_kwargs": {"redis_url": q.redis_url, "queue_name": q.queue_name, "password_env": q.password_env,
                                  "password_file": q.password_file, "prefix": q.prefix,
                                  "poll_interval_s": self.stages.job_runner.queue_poll_interval_s}}


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


# ---- helpers ----------------------------------------------------------------------------------------

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
