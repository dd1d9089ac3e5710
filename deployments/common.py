"""Helpers shared by the stage deployments: config parsing, device choice, model loading."""
from __future__ import annotations

import os

from cluster.config import ImagineConfig


def parse_config(config: dict | ImagineConfig) -> ImagineConfig:
    return config if isinstance(config, ImagineConfig) else ImagineConfig.from_dict(config)


def pick_device(stage_cfg) -> str:
    """"auto" -> cuda when the replica was given a GPU and torch sees one, else cpu."""
    import torch
    if stage_cfg.device == "cpu":
        return "cpu"
    if stage_cfg.device == "cuda" or (stage_cfg.ray_actor_options.num_gpus > 0 and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def start_metrics(device: str = "cpu"):
    """This replica's StageMetrics (see deployments/metrics.py)."""
    from .metrics import StageMetrics
    return StageMetrics(device)


def setup_torch(stage_cfg) -> None:
    """One replica, its share of cores: follow the CPUs Ray gave it (OMP_NUM_THREADS)."""
    import torch
    torch.set_flush_denormal(True)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
