"""Checks a config where its replicas will run, before `imagine apply` deploys it: a config change must never
take a healthy service down.

    python -m cluster.preflight '<the config as JSON>'     # prints a JSON list of problems; exit 1 if any

`imagine apply` runs this on the cluster's head node as a Ray job (the dashboard's job API), so paths,
environment variables and the network are those the replicas will see. It checks that the S3 credentials
resolve and S3 answers, that the queue's Redis password resolves and Redis answers, that every stage's model
folder loads as a model description with its parts present, and that a server that requires API keys has some.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from cluster.config import STAGES, ConfigError, ImagineConfig

MARK = "IMAGINE-PREFLIGHT "  # the line of the job's output that carries the result


def problems(cfg: ImagineConfig) -> list[str]:
    """What would stop the replicas of `cfg` from serving, each as one sentence naming the setting."""
    found: list[str] = []
    found += _storage(cfg)
    found += _queue(cfg)
    found += _models(cfg)
    if cfg.api.auth_enabled() and not cfg.api.load_api_keys():
        found.append(f"api.auth is {cfg.api.auth} but no API key is configured (api.api_keys_file "
                     f"{cfg.api.api_keys_file}, ${cfg.api.api_keys_env}): every request would be refused")
    return found


def _storage(cfg: ImagineConfig) -> list[str]:
    from cluster.storage import Storage, StorageError
    try:
        cfg.storage.credentials()
    except ConfigError as e:
        return [f"storage: {e}"]
    try:
        Storage.from_config(cfg.storage).ensure_bucket()
    except StorageError as e:
        return [f"storage: S3 at {cfg.storage.endpoint_url} bucket {cfg.storage.bucket}: {e}"]
    return []


def _queue(cfg: ImagineConfig) -> list[str]:
    q = cfg.queue
    if q.password() is None:
        return [f"queue: no Redis password: set ${q.password_env} or write {q.password_file}"]
    try:
        q.client(socket_timeout=5, socket_connect_timeout=5).ping()
    except Exception as e:
        return [f"queue: Redis at {q.redis_url} does not answer: {type(e).__name__}: {e}"]
    return []


def _models(cfg: ImagineConfig) -> list[str]:
    from pipeline.spec import PipelineSpec
    found = []
    for stage in STAGES:
        if stage == "publisher":
            continue
        path = cfg.model_for(stage)
        try:
            spec = PipelineSpec.load(path)
        except (OSError, ValueError) as e:
            found.append(f"stages.{stage}: model {path or '(built-in)'}: {e}")
            continue
        parts = [spec.diffusion] + ([spec.upscaler] if spec.upscaler else []) + \
            ([spec.text_encoder.path] if spec.text_encoder.path else [])
        missing = [p for p in parts if not spec.resolve_path(p).exists()]
        if missing:
            found.append(f"stages.{stage}: model {path or '(built-in)'}: missing {', '.join(missing)} "
                         f"(under {Path(spec.root)})")
    return sorted(set(found))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        found = problems(ImagineConfig.from_dict(json.loads(argv[0])))
    except ConfigError as e:
        found = [str(e)]
    print(MARK + json.dumps(found), flush=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
