"""TextEncoder deployment: prompts -> CLIP embeddings (batched), and the CLIP scorer beside it."""
from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from .common import parse_config, pick_device, setup_torch, start_metrics

logger = logging.getLogger(__name__)


@serve.deployment(name="TextEncoder")
class TextEncoder:
    def __init__(self, config: dict):
        from pipeline.generate import load_text_encoder
        from pipeline.scorer import Scorer
        from pipeline.spec import PipelineSpec

        t0 = time.perf_counter()
        cfg = parse_config(config)
        self.stage = cfg.stages.text_encoder
        setup_torch(self.stage)
        device = pick_device(self.stage)
        self.metrics = start_metrics(device)
        spec = PipelineSpec.load(cfg.model_for("text_encoder"))
        self.encoder = load_text_encoder(spec, device)
        self.scorer = Scorer.from_text_encoder(self.encoder) if hasattr(self.encoder.model, "visual") else None
        self.reconfigure(self.stage.user_config())
        self.metrics.loaded(time.perf_counter() - t0)

    def reconfigure(self, user_config: dict) -> None:
        self.metrics.replicas_max(user_config["max_replicas"])
        self._encode_batch.set_max_batch_size(user_config["max_batch_size"])
        self._encode_batch.set_batch_wait_timeout_s(user_config["batch_wait_timeout_s"])

    async def encode(self, prompt: str) -> tuple:
        """One prompt -> (prompt_embeds (T, D), pooled (E,)), batched with other calls' prompts."""
        async with self.metrics.call():
            return await self._encode_batch(prompt)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, prompts: list[str]) -> list[tuple]:
        self.metrics.batch(len(prompts))
        emb = await asyncio.to_thread(self.encoder.encode, prompts)
        return [(emb.prompt_embeds[i].cpu(), emb.pooled[i].cpu()) for i in range(len(prompts))]

    async def rank(self, images, prompt: str) -> tuple[list[int], list[float]]:
        """CLIP ranking of candidates (N, 3, h, w) for a prompt, best first."""
        if self.scorer is None:
            return list(range(len(images))), [0.0] * len(images)
        return await asyncio.to_thread(self.scorer.rank, images, prompt)

    def ready(self) -> bool:
        return True
