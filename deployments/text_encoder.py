"""TextEncoder deployment: prompts -> CLIP embeddings (batched), and the CLIP scorer beside it."""
from __future__ import annotations

from ray import serve

from .common import torch_dtype
from .stage import Stage


@serve.deployment(name="TextEncoder")
class TextEncoder(Stage):
    stage_name = "text_encoder"
    batch_method = "_encode_batch"

    def load(self) -> None:
        from pipeline.generate import load_text_encoder
        from pipeline.scorer import Scorer
        self.encoder = load_text_encoder(self.model_spec(), self.device, torch_dtype(self.device))
        self.scorer = Scorer.from_text_encoder(self.encoder) if hasattr(self.encoder.model, "visual") else None

    async def encode(self, prompt: str) -> tuple:
        """One prompt -> (prompt_embeds (T, D), pooled (E,)), batched with other calls' prompts."""
        async with self.metrics.call():
            return await self._encode_batch(prompt)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, prompts: list[str]) -> list[tuple]:
        self.metrics.batch(len(prompts))
        emb = await self.torch.run(self.encoder.encode, prompts)
        return [(emb.prompt_embeds[i].cpu(), emb.pooled[i].cpu()) for i in range(len(prompts))]

    async def rank(self, images, prompt: str) -> tuple[list[int], list[float]]:
        """CLIP ranking of candidates (N, 3, h, w) for a prompt, best first."""
        if self.scorer is None:
            return list(range(len(images))), [0.0] * len(images)
        return await self.torch.run(self.scorer.rank, images, prompt)
