"""The pieces every config section shares: the error type, the frozen strict model base, stage names, paths."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

STAGES = ("text_encoder", "diffuser", "upscaler", "publisher")  # the pipeline's stages, in order
DEPLOYMENT_NAMES = {"ingress": "Ingress", "job_runner": "JobRunner", "text_encoder": "TextEncoder",
                    "diffuser": "Diffuser", "upscaler": "Upscaler", "publisher": "Publisher"}
IMPORT_PATH = "deployments.app:build_app_from_args"  # how Serve (and `imagine up`) finds the application
QUEUE_POLICY = "deployments.queue:QueueAutoscalingPolicy"  # the JobRunner's autoscaling policy, by import path


class ConfigError(ValueError):
    """A config that cannot be used; the message names each offending field by its dotted path."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(path: str | None, base_dir: str | Path | None) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else Path(base_dir or Path.cwd()) / p)
