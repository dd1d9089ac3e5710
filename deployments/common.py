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


def torch_dtype(device: str):
    """The dtype a stage runs its nets in: float16 on a GPU (as Stable Diffusion is served), float32 on a CPU."""
    import torch
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def start_metrics(device: str = "cpu"):
    """This replica's StageMetrics (see deployments/metrics.py)."""
    from .metrics import StageMetrics
    return StageMetrics(device)


def torch_threads() -> int:
    """The cores Ray gave this replica (it sets OMP_NUM_THREADS from num_cpus); 0 when unknown."""
    return int(os.environ.get("OMP_NUM_THREADS", "0") or 0)


def setup_torch() -> None:
    """The calling thread's torch settings for a replica's share of cores: denormals flushed (a per-thread
    setting: erratic steps otherwise) and as many intra-op threads as the cores Ray gave it."""
    import torch
    torch.set_flush_denormal(True)
    if (threads := torch_threads()) > 0:
        torch.set_num_threads(threads)


class TorchThread:
    """The one thread on which a replica runs all of its torch work (load, encode, step, decode, upscale).

    Each OS thread that enters a parallel torch op gets its own OpenMP team, and an idle team's threads spin
    waiting for work: with torch work spread over `asyncio.to_thread`'s pool (and the event loop), a replica had
    several teams whose spinning threads took the cores its working team needed (a 2-thread step on 2 cores ran
    1.3-1.5x slower in a worker thread than on the main thread, and up to 5x slower once a second team existed
    in the process while the machine was shared). One
    thread keeps one team, and keeps the event loop free for the streams while it steps.
    """

    def __init__(self, name: str = "torch"):
        from concurrent.futures import ThreadPoolExecutor
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=setup_torch)

    def call(self, fn, *args, **kwargs):
        """Run `fn` on the torch thread and wait for it (for start-up code, off any event loop)."""
        return self._pool.submit(fn, *args, **kwargs).result()

    async def run(self, fn, *args, **kwargs):
        """Run `fn` on the torch thread; the event loop goes on meanwhile."""
        import asyncio
        return await asyncio.wrap_future(self._pool.submit(fn, *args, **kwargs))
