"""A model's description (`pipeline.json`) and the checks that need no torch.

The ingress validates requests against the model without loading it: `ModelInfo` reads the
spec and the nets' JSON configs (UNet and VAE depths give the sizes the model can produce).
"""
from __future__ import annotations

import json
import math
import secrets
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .request import GenerationRequest, GuidanceInterval, InvalidRequestError, ResolvedRequest, parse_aspect_ratio

BUILTIN_DIR = Path(__file__).parent / "builtin"


class TextEncoderSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(None, description="open_clip folder (open_clip_config.json + weights)")
    open_clip_model: str | None = Field(None, description="registered open_clip name or config JSON path")
    checkpoint: str | None = Field(None, description="local checkpoint for open_clip_model")
    layer: str = "last"


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sample_size: int = 32
    upscale: int = 4
    steps: int = 20
    guidance_scale: float = 4.0
    scheduler: str = "dpmpp_2m"
    guidance_interval: GuidanceInterval = (0.0, 1.0)  # (lo, hi]: the noise levels t/T that get guidance_scale
    early_guidance: float = Field(1.0, ge=0.0, le=1.0, description=(
        "the guidance above the interval (the noisiest steps): 1 = the conditional prediction alone; below 1 "
        "the unconditional one is mixed in, loosening the layout"))
    chaos_interval_hi: float = Field(0.5, ge=0.0, le=1.0, description=(
        "--chaos 100 lowers the interval's top to this (linearly from the request's own at chaos 0)"))
    chaos_early_guidance: float = Field(0.5, ge=0.0, le=1.0, description=(
        "--chaos 100 lowers the early guidance to this (linearly from the request's own at chaos 0)"))

    def chaos_guidance(self, chaos: int, interval: tuple[float, float] | None = None,
                       early_guidance: float | None = None) -> tuple[tuple[float, float], float]:
        """What --chaos `chaos` (0-100) does to guidance: (the guidance interval, the early guidance), from
        `interval` and `early_guidance` (default: the model's) at chaos 0 towards the chaos_* settings at 100,
        linearly; a request already looser than those keeps its own (chaos never tightens guidance)."""
        lo, hi = self.guidance_interval if interval is None else interval
        early = self.early_guidance if early_guidance is None else early_guidance
        c = chaos / 100
        top = round(hi + c * (min(hi, self.chaos_interval_hi) - hi), 6)
        return (min(lo, top), top), round(early + c * (min(early, self.chaos_early_guidance) - early), 6)


class PipelineSpec(BaseModel):
    """A model: its parts and defaults. Relative paths are relative to the spec's folder."""
    model_config = ConfigDict(extra="forbid")
    name: str
    text_encoder: TextEncoderSpec
    diffusion: str = Field(description="diffusers-format folder: unet/, scheduler/, optional vae/")
    upscaler: str | None = Field(None, description="upscaler folder or Real-ESRGAN .pth; None = bicubic")
    upscaler_scale: int = 4
    defaults: Defaults = Defaults()
    max_sample_size: int = 64
    root: str = Field(".", exclude=True)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "PipelineSpec":
        """Read `pipeline.json` from a folder or file; None = the built-in model."""
        path = Path(path) if path is not None else BUILTIN_DIR
        file = path / "pipeline.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no model spec at {file}" + (
                " (train the built-in model: python -m pipeline.builtin.train all)" if path == BUILTIN_DIR else ""))
        return cls.model_validate({**json.loads(file.read_text()), "root": str(file.parent)})

    def resolve_path(self, p: str) -> Path:
        return (Path(self.root) / p).resolve()


class ModelInfo:
    """What a model can produce, read from JSON configs only (no torch import)."""

    def __init__(self, spec: PipelineSpec):
        self.spec = spec

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ModelInfo":
        return cls(PipelineSpec.load(path))

    def _config(self, sub: str) -> dict | None:
        f = self.spec.resolve_path(self.spec.diffusion) / sub / "config.json"
        return json.loads(f.read_text()) if f.is_file() else None

    @cached_property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this: VAE factor x the UNet's downsamplings."""
        unet, vae = self._config("unet"), self._config("vae")
        if unet is None:
            raise FileNotFoundError(f"model {self.spec.name}: no unet/config.json under {self.spec.diffusion}")
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae else 1
        return vae_factor * 2 ** (len(unet["down_block_types"]) - 1)

    @cached_property
    def upscaler_scale(self) -> int:
        if self.spec.upscaler is None:
            return self.spec.upscaler_scale
        path = self.spec.resolve_path(self.spec.upscaler)
        if path.is_dir() and (path / "config.json").is_file():
            return int(json.loads((path / "config.json").read_text()).get("scale", self.spec.upscaler_scale))
        return self.spec.upscaler_scale

    def allowed_sizes(self, upscale: int) -> list[int]:
        m, top = self.size_multiple, self.spec.max_sample_size
        return [s * upscale for s in range(m, top + 1, m)]

    def size_for_aspect(self, ar: str, upscale: int) -> tuple[int, int]:
        """The producible (width, height) closest to aspect W:H, near the default area."""
        ratio = parse_aspect_ratio(ar)
        sizes = self.allowed_sizes(upscale)
        area = (self.spec.defaults.sample_size * upscale) ** 2
        return min(((w, h) for w in sizes for h in sizes),
                   key=lambda wh: (abs(math.log(wh[0] / wh[1] / ratio)), abs(math.log(wh[0] * wh[1] / area))))

    def resolve(self, req: GenerationRequest) -> ResolvedRequest:
        """Fill defaults and check the request against this model; raises InvalidRequestError."""
        d = self.spec.defaults
        upscale = req.upscale or d.upscale
        if upscale > self.upscaler_scale and self.spec.upscaler is not None:
            raise InvalidRequestError("upscale", f"this model's upscaler goes up to x{self.upscaler_scale}")
        wanted = {"width": req.width, "height": req.height}
        if req.aspect_ratio is not None and req.width is None and req.height is None:
            wanted["width"], wanted["height"] = self.size_for_aspect(req.aspect_ratio, upscale)
        sizes = {}
        for name in ("width", "height"):
            size = wanted[name] or d.sample_size * upscale
            if size not in self.allowed_sizes(upscale):
                raise InvalidRequestError(name, f"{size} is not a size this model can produce at upscale "
                                                f"x{upscale}; choose one of {self.allowed_sizes(upscale)}")
            sizes[name], sizes[f"sample_{name}"] = size, size // upscale
        return ResolvedRequest(
            prompt=req.prompt, negative_prompt=req.negative_prompt, n=req.n, **sizes,
            steps=req.steps or d.steps,
            guidance_scale=d.guidance_scale if req.guidance_scale is None else req.guidance_scale,
            scheduler=req.scheduler or d.scheduler,
            seed=secrets.randbelow(2**32) if req.seed is None else req.seed,
            upscale=upscale, best_of=req.best_of,
            chaos=req.chaos or 0, **dict(zip(("guidance_interval", "early_guidance"), d.chaos_guidance(
                req.chaos or 0, req.guidance_interval, req.early_guidance))))
