"""Upscaler deployment: super-resolution of sampled images (batched by factor and size)."""
from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from .common import parse_config, pick_device, setup_torch, start_metrics

logger = logging.getLogger(__name__)


@serve.deployment(name="Upscaler")
class Upscaler:
    def __init__(self, config: dict):
        from pipeline.generate import load_upscaler
        from pipeline.spec import PipelineSpec

        t0 = time.perf_counter()
        cfg = parse_config(config)
        self.stage = cfg.stages.upscaler
        setup_torch(self.stage)
        device = pick_device(self.stage)
        self.metrics = start_metrics(device)
        self.upscaler = load_upscaler(PipelineSpec.load(cfg.model_for("upscaler")), device)
        self.reconfigure(self.stage.user_config())
        self.metrics.loaded(time.perf_counter() - t0)

    def reconfigure(self, user_config: dict) -> None:
        self.metrics.replicas_max(user_config["max_replicas"])
        self.upscaler.tile = user_config["tile"]
        self._upscale_batch.set_max_batch_size(user_config["max_batch_size"])
        self._upscale_batch.set_batch_wait_timeout_s(user_config["batch_wait_timeout_s"])

    async def upscale(self, image, factor: int):
        """One (3, h, w) image -> (3, h*f, w*f), batched with other calls of the same factor and size."""
        async with self.metrics.call():
            return await self._upscale_batch(image, factor)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _upscale_batch(self, images: list, factors: list[int]) -> list:
        self.metrics.batch(len(images))
        return await asyncio.to_thread(self._run, images, factors)

    def _run(self, images, factors):
        import torch
        out: list = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, (img, f) in enumerate(zip(images, factors)):
            groups.setdefault((int(f), tuple(img.shape)), []).append(i)
        for (f, _), idx in groups.items():
            batch = torch.stack([images[i] for i in idx])
            result = self.upscaler.upscale(batch, f) if f > 1 else batch
            for i, r in zip(idx, result):
                out[i] = r.cpu()
        return out

    def ready(self) -> bool:
        return True
