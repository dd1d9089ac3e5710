"""CLIP scorer: image-text cosine similarity with open_clip's two towers (Radford et al. 2021).

Used to rank candidates best-first, the CLIP-guided selection of the classic text-to-image
loop (DALL-E's reranking), and by the evaluation.
"""
from __future__ import annotations

import logging

import open_clip
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class Scorer:
    """Scores images against prompts with a CLIP model's image and text towers.

    Args:
        model: an open_clip CLIP model (both towers).
        tokenizer: its tokenizer.
        device: torch device.
    """

    def __init__(self, model, tokenizer, device="cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", model.visual.image_size)
        self.image_size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        self.mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), device=device).view(1, 3, 1, 1)

    @classmethod
    def from_text_encoder(cls, text_encoder) -> "Scorer":
        """Share the text encoder's model (one copy of the weights)."""
        return cls(text_encoder.model, text_encoder.tokenizer, device=text_encoder.device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) normalized for the image tower."""
        x = images.to(self.device, torch.float32)  # (resized in float32, then the tower's own dtype)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
        dtype = next(self.model.parameters()).dtype
        return ((x.clamp(0, 1) - self.mean) / self.std).to(dtype)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.preprocess(images), normalize=True)  # (B, E)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True)  # (P, E)

    def score(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """Cosine similarity of each image with one prompt: (B,)."""
        return (self.image_features(images) @ self.text_features([prompt]).T)[:, 0].float().cpu()

    def rank(self, images: torch.Tensor, prompt: str) -> tuple[list[int], list[float]]:
        """Indices of `images` best-first for `prompt`, and every image's score (input order)."""
        scores = self.score(images, prompt)
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        return order, scores.tolist()
