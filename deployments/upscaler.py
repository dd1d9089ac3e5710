"""Upscaler deployment: super-resolution of sampled images (batched by factor and size)."""
from __future__ import annotations

import asyncio

from ray import serve

from .common import torch_dtype
from .stage import Stage


@serve.deployment(name="Upscaler")
class Upscaler(Stage):
    stage_name = "upscaler"
    batch_method = "_upscale_batch"

    def load(self) -> None:
        from pipeline.generate import load_upscaler
        self.upscaler = load_upscaler(self.model_spec(), self.device, torch_dtype(self.device))

    def configure(self, user_config: dict) -> None:
        self.upscaler.tile = user_config["tile"]

    async def upscale_many(self, images, factor: int):
        """(N, 3, h, w) -> (N, 3, h*f, w*f): each image joins the replica's batches (with other jobs' images)."""
        import torch
        return torch.stack(await asyncio.gather(*[self.upscale(img, factor) for img in images]))

    async def upscale(self, image, factor: int):
        """One (3, h, w) image -> (3, h*f, w*f), batched with other calls of the same factor and size."""
        async with self.metrics.call():
            return await self._upscale_batch(image, factor)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _upscale_batch(self, images: list, factors: list[int]) -> list:
        self.metrics.batch(len(images))
        return await self.torch.run(self._run, images, factors)

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
