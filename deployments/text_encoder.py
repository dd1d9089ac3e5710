"""TextEncoder deployment: prompts -> CLIP embeddings (batched), and the CLIP scorer beside it."""
from __future__ import annotations

import asyncio
import logging

from ray import serve

from .common import parse_config, pick_device, setup_torch

logger = logging.getLogger(__name__)


@serve.deployment(name="TextEncoder")
class TextEncoder:
    def __init__(self, config: dict):
        from pipeline.generate import load_text_encoder
        from pipeline.scorer import Scorer
        from pipeline.spec import PipelineSpec

        cfg = parse_config(config)
        self.stage = cfg.stages.text_encoder
        setup_torch(self.stage)
        spec = PipelineSpec.load(cfg.model_for("text_encoder"))
        self.encoder = load_text_encoder(spec, pick_device(self.stage))
        self.scorer = Scorer.from_text_encoder(self.encoder) if hasattr(self.encoder.model, "visual") else None
        self.reconfigure(self.stage.user_config())

    def reconfigure(self, user_config: dict) -> None:
        self.encode.set_max_batch_size(user_config["max_batch_size"])
        self.encode.set_batch_wait_timeout_s(user_config["batch_wait_timeout_s"])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def encode(self, prompts: list[str]) -> list[tuple]:
        """One prompt per call, batched: -> (prompt_embeds (T, D), pooled (E,))."""
        emb = await asyncio.to_thread(self.encoder.encode, prompts)
        return [(emb.prompt_embeds[i].cpu(), emb.pooled[i].cpu()) for i in range(len(prompts))]

    async def rank(self, images, prompt: str) -> tuple[list[int], list[float]]:
        """CLIP ranking of candidates (N, 3, h, w) for a prompt, best first."""
        if self.scorer is None:
            return list(range(len(images))), [0.0] * len(images)
        return await asyncio.to_thread(self.scorer.rank, images, prompt)

    def ready(self) -> bool:
        return True
