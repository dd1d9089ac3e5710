"""The deployment graph: Ingress -> (the job queue on Redis) -> JobRunner -> TextEncoder -> Diffuser ->
Upscaler -> Publisher. The Ingress holds the stages' handles for /healthz only; jobs reach the JobRunner as
Celery messages.

    from deployments.app import build_app
    serve.run(build_app(ImagineConfig.load("imagine.yaml")))

`build_app_from_args` is the application builder that Serve's config file names
(`import_path: deployments.app:build_app_from_args`), so `serve deploy` works too. The options
set here in code are the same ones `ImagineConfig.serve_config()` writes for the config file.
"""
from __future__ import annotations

from cluster.config import DEPLOYMENT_NAMES, STAGES, ImagineConfig

from .diffuser import Diffuser
from .ingress import Ingress
from .job_runner import job_runner_deployment
from .publisher import Publisher
from .text_encoder import TextEncoder
from .upscaler import Upscaler

CLASSES = {"text_encoder": TextEncoder, "diffuser": Diffuser, "upscaler": Upscaler, "publisher": Publisher}


def deployment_options(cfg: ImagineConfig, stage: str) -> dict:
    """Serve options of one stage: exactly the config file's entry minus its name."""
    [entry] = [d for d in cfg.serve_config()["applications"][0]["deployments"]
               if d["name"] == DEPLOYMENT_NAMES[stage]]
    return {k: v for k, v in entry.items() if k != "name"}


def build_app(cfg: ImagineConfig, classes: dict | None = None):
    """Bind every stage with its options from the config; the ingress gets their handles.

    `classes` (stage name -> deployment class) replaces the default classes of those stages (CLASSES), e.g.
    a benchmark's variant of a stage, deployed with that stage's options from the config (and under its own
    deployment name, which should be the stage's: "Diffuser" for the diffuser)."""
    unknown = set(classes or {}) - set(CLASSES)
    if unknown:
        raise KeyError(f"unknown stages {sorted(unknown)}; stages are {', '.join(CLASSES)}")
    config = cfg.model_dump(mode="json")
    handles = {name: cls.options(**deployment_options(cfg, name)).bind(config)
               for name, cls in {**CLASSES, **(classes or {})}.items()}
    stages = [handles[name] for name in STAGES]
    runner = job_runner_deployment(cfg).options(**deployment_options(cfg, "job_runner")).bind(config, *stages)
    # the Ingress gets the runner's handle too: Serve deploys what the ingress's arguments reach
    return Ingress.options(**deployment_options(cfg, "ingress")).bind(config, *stages, runner)


def build_app_from_args(args: dict):
    return build_app(ImagineConfig.from_dict(args["config"]))
