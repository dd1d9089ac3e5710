"""Diffuser deployment: the denoising loop, batched across requests.

`sample(request)` is a streaming method: it yields `{"progress": p}` after each denoising step
and finally `{"image": (3, h, w) tensor}`. Request-level batching uses `@serve.batch` on an
async generator, so every request in a batch receives per-step progress; the batch runs until
its longest request is done (the head-of-line blocking that step-level batching removes).
"""
from __future__ import annotations

import asyncio
import logging

from ray import serve

from .common import parse_config, pick_device, setup_torch

logger = logging.getLogger(__name__)


@serve.deployment(name="Diffuser")
class Diffuser:
    def __init__(self, config: dict):
        from pipeline.sampler import Sampler
        from pipeline.spec import PipelineSpec

        cfg = parse_config(config)
        self.stage = cfg.stages.diffuser
        setup_torch(self.stage)
        spec = PipelineSpec.load(cfg.model_for("diffuser"))
        self.sampler = Sampler.from_pretrained(spec.resolve_path(spec.diffusion), device=pick_device(self.stage))
        self.reconfigure(self.stage.user_config())

    def reconfigure(self, user_config: dict) -> None:
        self.batching = user_config["batching"]
        self.request_batch.set_max_batch_size(user_config["max_batch_size"])
        self.request_batch.set_batch_wait_timeout_s(user_config["batch_wait_timeout_s"])

    async def sample(self, request):
        """Stream progress events and then the image for one SampleRequest."""
        async for event in self.request_batch(request):
            yield event

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def request_batch(self, requests: list):
        states = self.sampler.start(requests)
        while live := [s for s in states if not s.done]:
            await asyncio.to_thread(self.sampler.step, live)
            yield [{"progress": s.progress} for s in states]
        images = await asyncio.to_thread(self.sampler.finish, states)
        yield [{"image": img.cpu()} for img in images]

    def ready(self) -> bool:
        return True
