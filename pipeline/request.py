"""The generation request: one pydantic model, validated at the edge, shared by every layer.

Static limits (prompt length, n, steps, ...) are pydantic constraints; limits that depend on
the model (which sizes it can produce) are checked by `Pipeline.resolve`, which raises
`InvalidRequestError` naming the field, in the same shape.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 1000
MAX_N = 16
MAX_STEPS = 200
SchedulerName = Literal["ddim", "dpmpp_2m", "euler", "euler_a"]


class InvalidRequestError(ValueError):
    """A request the model cannot serve; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class GenerationRequest(BaseModel):
    """What a person asks for. Sizes are of the delivered image, after upscaling.

    Fields left as None take the model's defaults (see `PipelineSpec.defaults`).
    """
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    n: int = Field(default=1, ge=1, le=MAX_N, description="images to deliver")
    width: int | None = Field(default=None, gt=0, le=4096)
    height: int | None = Field(default=None, gt=0, le=4096)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="denoising steps")
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0)
    scheduler: SchedulerName | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**32, description="seed of the first image; image i uses seed+i")
    upscale: Literal[1, 2, 4] | None = Field(default=None, description="super-resolution factor")
    best_of: int = Field(default=1, ge=1, le=8, description="sample n*best_of, keep the n CLIP ranks best")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be blank")
        return v.strip()


class ResolvedRequest(BaseModel):
    """A request with every default filled in and checked against the model."""
    model_config = ConfigDict(frozen=True)

    prompt: str
    negative_prompt: str
    n: int
    width: int
    height: int
    sample_width: int
    sample_height: int
    steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    upscale: int
    best_of: int

    @property
    def num_candidates(self) -> int:
        return self.n * self.best_of

    def seeds(self) -> list[int]:
        return [(self.seed + i) % 2**32 for i in range(self.num_candidates)]
