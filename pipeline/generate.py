"""The in-process reference: prompts -> upscaled images, no Ray, no HTTP.

    from pipeline import GenerationRequest, Pipeline
    pipe = Pipeline.load()                                   # the built-in model
    [result] = pipe.generate([GenerationRequest(prompt="a red circle on a black background", n=4)])
    result.images[0].save("fox.png")

The served cluster must reproduce these images (same seeds -> same pixels within 1/255).
A model is described by a `pipeline.json` (PipelineSpec): where its text encoder, diffusion
folder and upscaler are, and its defaults. The built-in model is one such folder.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from PIL import Image
from pydantic import ValidationError

from .request import GenerationRequest, InvalidRequestError, ResolvedRequest
from .sampler import Sampler, SampleRequest
from .scorer import Scorer
from .spec import ModelInfo, PipelineSpec
from .text_encoder import PromptEmbeds, TextEncoder
from .upscaler import Upscaler

logger = logging.getLogger(__name__)

@dataclass
class GenerationResult:
    request: ResolvedRequest
    images: list[Image.Image]   # n images, best-first when best_of > 1
    seeds: list[int]            # seed of each delivered image
    scores: list[float] | None  # CLIP score of each delivered image (when a scorer ran)


class Pipeline:
    """Text encoder + sampler + upscaler (+ scorer), loaded from one PipelineSpec."""

    def __init__(self, spec: PipelineSpec, text_encoder: TextEncoder, sampler: Sampler,
                 upscaler: Upscaler, scorer: Scorer | None, max_batch_size: int = 16):
        self.spec, self.text_encoder, self.sampler = spec, text_encoder, sampler
        self.upscaler, self.scorer, self.max_batch_size = upscaler, scorer, max_batch_size
        self.info = ModelInfo(spec)

    @classmethod
    def load(cls, path: str | Path | None = None, device="cpu", max_batch_size: int = 16,
             dtype: torch.dtype = torch.float32) -> "Pipeline":
        spec = PipelineSpec.load(path)
        text_encoder = load_text_encoder(spec, device, dtype)
        sampler = Sampler.from_pretrained(spec.resolve_path(spec.diffusion), device=device, dtype=dtype)
        upscaler = load_upscaler(spec, device, dtype)
        scorer = Scorer.from_text_encoder(text_encoder) if hasattr(text_encoder.model, "visual") else None
        return cls(spec, text_encoder, sampler, upscaler, scorer, max_batch_size)

    # ---- 1. check inputs ------------------------------------------------------------------
    def resolve(self, req: GenerationRequest) -> ResolvedRequest:
        """Fill defaults and check the request against this model; raises InvalidRequestError."""
        return self.info.resolve(req)

    # ---- 2.-5. encode, sample, upscale, rank -----------------------------------------------
    def sample_requests(self, req: ResolvedRequest) -> list[SampleRequest]:
        """One SampleRequest per candidate image of `req` (n * best_of of them)."""
        return make_sample_requests(req, self.text_encoder.encode([req.prompt, req.negative_prompt]))

    def generate(self, requests: Iterable[GenerationRequest | dict],
                 callback: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
        """Generate every request; candidates of all requests share sampler batches."""
        resolved = [self.resolve(parse_request(r)) for r in requests]
        jobs = [(i, sr) for i, r in enumerate(resolved) for sr in self.sample_requests(r)]
        pixels = []
        for k in range(0, len(jobs), self.max_batch_size):
            pixels += self.sampler.sample([sr for _, sr in jobs[k:k + self.max_batch_size]], callback)
        results = []
        for i, r in enumerate(resolved):
            mine = torch.stack([p for (j, _), p in zip(jobs, pixels) if j == i])  # (n*best_of, 3, h, w)
            results.append(self.finish(r, mine))
        return results

    def finish(self, req: ResolvedRequest, pixels: torch.Tensor) -> GenerationResult:
        """Upscale, rank best-first when best_of > 1, keep n; pixels (N, 3, h, w) in [0, 1]."""
        seeds = req.seeds()
        scores = None
        if self.scorer is not None and req.best_of > 1:
            order, all_scores = self.scorer.rank(pixels, req.prompt)
            keep = order[:req.n]
            pixels, seeds, scores = pixels[keep], [seeds[k] for k in keep], [all_scores[k] for k in keep]
        images = self.upscaler.upscale(pixels, req.upscale) if req.upscale > 1 else pixels
        return GenerationResult(request=req, images=to_pil(images), seeds=seeds, scores=scores)


def generate(requests: Iterable[GenerationRequest | dict], pipeline: Pipeline | None = None
             ) -> list[GenerationResult]:
    """Module-level convenience: `pipeline.generate(requests)` on the built-in model."""
    return (pipeline or Pipeline.load()).generate(requests)


# ---- helpers ------------------------------------------------------------------------------
def make_sample_requests(req: ResolvedRequest, emb: PromptEmbeds, init_image: torch.Tensor | None = None
                         ) -> list[SampleRequest]:
    """The sampler's requests for `req`, given the embeddings of [prompt, negative_prompt] (and, for image-to-
    image, the (3, sample_height, sample_width) image its samples start from, at `req.strength`)."""
    return [SampleRequest(
        prompt_embeds=emb.prompt_embeds[0], negative_prompt_embeds=emb.prompt_embeds[1],
        pooled=emb.pooled[0], negative_pooled=emb.pooled[1],
        height=req.sample_height, width=req.sample_width, num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale, scheduler=req.scheduler, seed=seed, init_image=init_image,
        strength=req.strength if init_image is not None else 1.0,
        guidance_interval=tuple(req.guidance_interval), early_guidance=req.early_guidance) for seed in req.seeds()]


def image_tensor(png: bytes, width: int, height: int) -> torch.Tensor:
    """A stored image as (3, height, width) in [0, 1], resized with area averaging (for image-to-image)."""
    import io

    import torch.nn.functional as F
    img = Image.open(io.BytesIO(png)).convert("RGB")
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.height, img.width, 3)
    x = x.permute(2, 0, 1).float()[None] / 255
    if (img.width, img.height) != (width, height):
        x = F.interpolate(x, size=(height, width), mode="area" if img.width >= width else "bicubic")
    return x[0].clamp(0, 1)


def parse_request(r: GenerationRequest | dict) -> GenerationRequest:
    if isinstance(r, GenerationRequest):
        return r
    try:
        return GenerationRequest.model_validate(r)
    except ValidationError as e:
        err = e.errors()[0]
        raise InvalidRequestError(".".join(map(str, err["loc"])) or "request", err["msg"]) from e


def load_text_encoder(spec: PipelineSpec, device, dtype: torch.dtype = torch.float32) -> TextEncoder:
    te = spec.text_encoder
    if te.path is not None:
        return TextEncoder.from_pretrained(spec.resolve_path(te.path), layer=te.layer, device=device, dtype=dtype)
    if te.open_clip_model is None:
        raise ValueError(f"model {spec.name}: text_encoder needs a path or an open_clip_model")
    ckpt = spec.resolve_path(te.checkpoint) if te.checkpoint else None
    model = te.open_clip_model
    if model.endswith(".json"):
        model = str(spec.resolve_path(model))
    return TextEncoder.from_open_clip(model, ckpt, layer=te.layer, device=device, dtype=dtype)


def load_upscaler(spec: PipelineSpec, device, dtype: torch.dtype = torch.float32) -> Upscaler:
    if spec.upscaler is None:
        return Upscaler.bicubic(spec.upscaler_scale)
    path = spec.resolve_path(spec.upscaler)
    load = Upscaler.from_folder if path.is_dir() else Upscaler.from_file
    return load(path, device=device, dtype=dtype)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL RGB images (rounded, as PNG stores them)."""
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
