"""The HTTP API's request and response models, Midjourney-style prompt flags, and errors.

OpenAI Images API compatible (`POST /v1/images/generations`), plus jobs (`/v1/jobs`).
Every error has one JSON shape, OpenAI's: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.request import MAX_PROMPT_CHARS, InvalidRequestError
from pipeline.spec import ModelInfo


class APIError(Exception):
    """A domain error with its HTTP status; the ingress maps it to the JSON error shape."""
    status_code = 500
    type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.headers = message, param, code, headers or {}


class Unauthorized(APIError):
    status_code, type = 401, "authentication_error"


class NotFound(APIError):
    status_code, type = 404, "not_found_error"


class Overloaded(APIError):
    status_code, type = 429, "rate_limit_error"


class StorageUnavailable(APIError):
    status_code, type = 503, "storage_error"


class GenerationFailed(APIError):
    status_code, type = 500, "generation_error"


class TimedOut(APIError):
    status_code, type = 504, "timeout_error"


class GenerationBody(BaseModel):
    """Body of both endpoints. `size` is the delivered size; the diffuser samples size/upscale."""
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int | None = Field(default=None, ge=1, le=16)
    size: str | None = Field(default=None, description='"WxH", e.g. "128x128"; "auto" = the default')
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    steps: int | None = Field(default=None, ge=1, le=200)
    guidance_scale: float | None = Field(default=None, ge=0, le=50)
    scheduler: Literal["ddim", "dpmpp_2m", "euler", "euler_a"] | None = None
    upscale: Literal[1, 2, 4] | None = None
    best_of: int = Field(default=1, ge=1, le=8)
    # OpenAI fields we accept and ignore
    model: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    partial_images: int | None = None
    stream: bool | None = None


class OpenAIImagesBody(GenerationBody):
    response_format: Literal["url", "b64_json"] = "url"


# ---- Midjourney-style flags ---------------------------------------------------------------
FLAG = re.compile(r"\s--(\w+)(?:\s+((?:(?!\s--\w).)*))?", re.S)
FLAG_FIELDS = {"seed": ("seed", int), "steps": ("steps", int), "cfg": ("guidance_scale", float),
               "n": ("n", int), "no": ("negative_prompt", str), "ar": ("ar", str),
               "upscale": ("upscale", int), "best-of": ("best_of", int), "best_of": ("best_of", int)}


def parse_prompt_flags(prompt: str) -> tuple[str, dict[str, Any]]:
    """'a fox --ar 16:9 --n 4 --no snow, trees' -> ('a fox', {ar: '16:9', n: 4, negative_prompt: ...})."""
    text = " " + prompt
    first = FLAG.search(text)
    if first is None:
        return prompt.strip(), {}
    fields: dict[str, Any] = {}
    for m in FLAG.finditer(text):
        name, value = m.group(1).lower(), (m.group(2) or "").strip()
        if name not in FLAG_FIELDS:
            raise InvalidRequestError("prompt", f"unknown flag --{name}; known: "
                                                f"{', '.join('--' + k for k in FLAG_FIELDS)}")
        field, cast = FLAG_FIELDS[name]
        try:
            fields[field] = cast(value)
        except ValueError:
            raise InvalidRequestError("prompt", f"--{name} needs a {cast.__name__} value, got {value!r}") from None
    clean = text[:first.start()].strip()
    if not clean:
        raise InvalidRequestError("prompt", "the prompt is empty once its --flags are removed")
    return clean, fields


def size_for_aspect(ar: str, info: ModelInfo, upscale: int) -> tuple[int, int]:
    """The producible (width, height) closest to aspect W:H, near the default area."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*", ar)
    if not m or float(m.group(1)) <= 0 or float(m.group(2)) <= 0:
        raise InvalidRequestError("prompt", f"--ar must look like W:H (e.g. 16:9), got {ar!r}")
    ratio = float(m.group(1)) / float(m.group(2))
    if not 1 / 4 <= ratio <= 4:
        raise InvalidRequestError("prompt", f"--ar {ar} is too extreme; use a ratio between 1:4 and 4:1")
    sizes = info.allowed_sizes(upscale)
    area = (info.spec.defaults.sample_size * upscale) ** 2
    return min(((w, h) for w in sizes for h in sizes),
               key=lambda wh: (abs(math.log(wh[0] / wh[1] / ratio)), abs(math.log(wh[0] * wh[1] / area))))


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    m = re.fullmatch(r"(\d+)x(\d+)", size.strip().lower())
    if not m:
        raise InvalidRequestError("size", f'size must look like "WxH" (e.g. "128x128"), got {size!r}')
    return int(m.group(1)), int(m.group(2))


def to_generation_request(body: GenerationBody, info: ModelInfo, default_n: int) -> dict:
    """Body (+ prompt flags) -> the fields of a pipeline GenerationRequest."""
    prompt, flags = parse_prompt_flags(body.prompt)
    fields = {k: v for k, v in body.model_dump(include={
        "n", "negative_prompt", "seed", "steps", "guidance_scale", "scheduler", "upscale", "best_of"}).items()
        if v is not None}
    width, height = parse_size(body.size)
    ar = flags.pop("ar", None)
    fields.update(flags)  # flags in the prompt win over body fields
    upscale = fields.get("upscale") or info.spec.defaults.upscale
    if ar is not None:
        width, height = size_for_aspect(ar, info, upscale)
    fields.setdefault("n", default_n)
    return {"prompt": prompt, "width": width, "height": height, **fields}
