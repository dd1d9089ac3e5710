"""The request contract: what a person may ask for, its bounds, and how typed text becomes a request.

This module is the one place for the request's fields, their bounds and defaults, the scheduler names, the
Midjourney-style prompt flags and the `size` syntax. Every layer imports it: the HTTP API (its body is
`RequestOptions` plus `size` and OpenAI's own fields), `imagine generate --local`, the config's limits (the
hard caps below are their upper bounds) and the sampler (which implements `SCHEDULER_NAMES`). Torch-free.

    req = request_from_text("a fox in snow --ar 16:9 --n 4 --no trees", size=None, default_n=4)
    req.aspect_ratio, req.n, req.negative_prompt       # '16:9', 4, 'trees'

Limits that depend on the model (which sizes it can produce) are checked by `ModelInfo.resolve`
(pipeline/spec.py), which raises `InvalidRequestError` naming the field, in the same shape.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

# hard caps of one request (a server's config may set lower ones: cluster/config.py `Limits`)
MAX_PROMPT_CHARS = 1000
MAX_N = 16
MAX_STEPS = 200
MAX_BEST_OF = 8
MAX_GUIDANCE = 50.0
MAX_SIDE = 4096  # pixels, either side of a delivered image
SCHEDULER_NAMES = ("ddim", "dpmpp_2m", "euler", "euler_a")

Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
NegativePrompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
NumImages = Annotated[int, Field(ge=1, le=MAX_N, description="images to deliver")]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS, description="denoising steps")]
Guidance = Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE, description="classifier-free guidance scale")]
Seed = Annotated[int, Field(ge=0, lt=2**32, description="seed of the first image; image i uses seed+i")]
SchedulerName = Literal[SCHEDULER_NAMES]
Upscale = Literal[1, 2, 4]
BestOf = Annotated[int, Field(ge=1, le=MAX_BEST_OF, description="sample n*best_of, keep the n CLIP ranks best")]
Side = Annotated[int, Field(gt=0, le=MAX_SIDE)]
MAX_CHAOS = 100
Chaos = Annotated[int, Field(ge=0, le=MAX_CHAOS, description="0-100: how different the images of one request are "
                                                            "(Midjourney's --chaos); 0 = the model's default")]
NoiseLevel = Annotated[float, Field(ge=0.0, le=1.0)]


def _ordered(interval: tuple[float, float]) -> tuple[float, float]:
    if interval[0] > interval[1]:
        raise ValueError(f"guidance_interval must be (lo, hi) with lo <= hi, got {tuple(interval)}")
    return interval


EarlyGuidance = Annotated[float, Field(ge=0.0, le=1.0, description=(
    "the guidance above guidance_interval (the noisiest steps): 1 = the conditional prediction alone, below 1 "
    "mixes the unconditional one in (looser layouts)"))]
GuidanceInterval = Annotated[tuple[NoiseLevel, NoiseLevel], AfterValidator(_ordered), Field(
    description="(lo, hi): guidance_scale applies only at noise levels t/T in (lo, hi] (1 = pure noise); above hi "
                "early_guidance, below lo the conditional prediction alone (guidance 1). (0, 1) = every step")]


class InvalidRequestError(ValueError):
    """A request that cannot be served; `field` names the offending field as the client sent it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RequestOptions(BaseModel):
    """The options of a request besides the prompt, count and size; None = the model's default."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    negative_prompt: NegativePrompt = ""
    steps: Steps | None = None
    guidance_scale: Guidance | None = None
    scheduler: SchedulerName | None = None
    seed: Seed | None = None
    upscale: Upscale | None = Field(default=None, description="super-resolution factor")
    best_of: BestOf = 1
    guidance_interval: GuidanceInterval | None = None
    early_guidance: EarlyGuidance | None = None
    chaos: Chaos | None = None


class GenerationRequest(RequestOptions):
    """What a person asks for. Sizes are of the delivered image, after upscaling; `aspect_ratio` ("W:H", the
    `--ar` flag) asks for the producible size closest to that shape when width and height are not given."""

    prompt: Prompt
    n: NumImages = 1
    width: Side | None = None
    height: Side | None = None
    aspect_ratio: str | None = Field(default=None, max_length=32)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be blank")
        return v.strip()

    @field_validator("aspect_ratio")
    @classmethod
    def _ratio(cls, v: str | None) -> str | None:
        if v is not None:
            parse_aspect_ratio(v)
        return v


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
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # as applied, chaos included (pipeline/sampler.py)
    early_guidance: float = 1.0  # the guidance above the interval, chaos included (pipeline/sampler.py)
    chaos: int = 0
    init_key: str | None = None  # image-to-image: the stored image (S3 key) the samples start from
    strength: float = 1.0        # with init_key: the part of the schedule that runs (SDEdit)
    upscale_only: int | None = None  # an upscale job: this factor on init_key's image, no sampling

    @property
    def num_candidates(self) -> int:
        return self.n * self.best_of

    @property
    def cost(self) -> int:
        """The work of this request in image-steps (one denoising step of one image): n x best_of x the steps
        that run (an upscale job counts as one step of one image; image-to-image counts the last `strength` of the
        steps, where a model trained on a schedule other than SD's may run a step or two more:
        sampler.matched_strength)."""
        if self.upscale_only:
            return 1
        return self.num_candidates * max(1, round(self.steps * self.strength))

    def seeds(self) -> list[int]:
        return [(self.seed + i) % 2**32 for i in range(self.num_candidates)]


# ---- what a person types: prompt flags and sizes -------------------------------------------------------
FLAG = re.compile(r"\s--(\w[\w-]*)(?:\s+((?:(?!\s--\w).)*))?", re.S)
FLAG_FIELDS: dict[str, tuple[str, type]] = {
    "seed": ("seed", int), "steps": ("steps", int), "cfg": ("guidance_scale", float), "n": ("n", int),
    "no": ("negative_prompt", str), "ar": ("aspect_ratio", str), "upscale": ("upscale", int),
    "best-of": ("best_of", int), "best_of": ("best_of", int), "chaos": ("chaos", int), "c": ("chaos", int)}
_SIZE = re.compile(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*")
_RATIO = re.compile(r"\s*(\d{1,4}(?:\.\d{1,4})?)\s*:\s*(\d{1,4}(?:\.\d{1,4})?)\s*")


def parse_prompt_flags(prompt: str) -> tuple[str, dict[str, Any]]:
    """'a fox --ar 16:9 --n 4 --no snow, trees' -> ('a fox', {aspect_ratio: '16:9', n: 4, negative_prompt: ...}).

    Raises:
        InvalidRequestError: ("prompt") an unknown flag, a flag value of the wrong type, or nothing but flags.
    """
    text = " " + prompt
    first = FLAG.search(text)
    if first is None:
        return prompt.strip(), {}
    fields: dict[str, Any] = {}
    for m in FLAG.finditer(text):
        name, value = m.group(1).lower(), (m.group(2) or "").strip()
        if name not in FLAG_FIELDS:
            raise InvalidRequestError("prompt", f"unknown flag --{name[:40]}; known: "
                                                f"{', '.join('--' + k for k in FLAG_FIELDS)}")
        field, cast = FLAG_FIELDS[name]
        try:
            fields[field] = cast(value[:64] if cast is not str else value)
        except ValueError:
            raise InvalidRequestError("prompt", f"--{name} needs a {cast.__name__} value, "
                                                f"got {value[:40]!r}") from None
    clean = text[:first.start()].strip()
    if not clean:
        raise InvalidRequestError("prompt", "the prompt is empty once its --flags are removed")
    return clean, fields


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WxH' -> (W, H); None or "auto" -> (None, None) (the model's default). Raises InvalidRequestError("size")."""
    if size is None or size.strip().lower() == "auto":
        return None, None
    m = _SIZE.fullmatch(size)
    if not m:
        raise InvalidRequestError("size", f'size must look like "WxH" (e.g. "128x128"), got {size[:40]!r}')
    w, h = int(m.group(1)), int(m.group(2))
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise InvalidRequestError("size", f"each side must be within 1..{MAX_SIDE} pixels, got {w}x{h}")
    return w, h


def parse_aspect_ratio(ar: str) -> float:
    """'16:9' -> 16/9, between 1:4 and 4:1. Raises InvalidRequestError("prompt") (it comes from --ar)."""
    m = _RATIO.fullmatch(ar)
    if not m or float(m.group(1)) <= 0 or float(m.group(2)) <= 0:
        raise InvalidRequestError("prompt", f"--ar must look like W:H (e.g. 16:9), got {ar[:40]!r}")
    ratio = float(m.group(1)) / float(m.group(2))
    if not 1 / 4 <= ratio <= 4:
        raise InvalidRequestError("prompt", f"--ar {ar} is too extreme; use a ratio between 1:4 and 4:1")
    return ratio


def request_from_text(prompt: str, *, size: str | None = None, n: int | None = None, default_n: int = 1,
                      **options: Any) -> GenerationRequest:
    """A GenerationRequest from what a person sent: a prompt that may carry --flags (they win over `options`),
    an optional size "WxH", n (default `default_n`) and RequestOptions fields.

    Raises:
        InvalidRequestError: naming the field as the client sent it ("prompt" for a bad flag, "size", ...).
    """
    clean, flags = parse_prompt_flags(prompt)
    width, height = parse_size(size)
    fields = {"prompt": clean, "n": default_n if n is None else n, "width": width, "height": height,
              **{k: v for k, v in options.items() if v is not None}}
    if "aspect_ratio" in flags:  # --ar asks for a shape: it replaces an explicit size
        fields["width"] = fields["height"] = None
    fields.update(flags)
    try:
        return GenerationRequest.model_validate(fields)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "request"
        msg = err["msg"].removeprefix("Value error, ")
        flag = next((f for f, (field, _) in FLAG_FIELDS.items() if field == name and field in flags), None)
        if flag is not None:
            raise InvalidRequestError("prompt", f"--{flag}: {msg}") from None
        raise InvalidRequestError({"width": "size", "height": "size"}.get(name, name), msg) from None


def check_limits(req: GenerationRequest, *, max_n: int = MAX_N, max_steps: int = MAX_STEPS,
                 max_best_of: int = MAX_BEST_OF, max_prompt_chars: int = MAX_PROMPT_CHARS) -> None:
    """A server's own caps, below the hard ones. Raises InvalidRequestError naming the field."""
    for name, top in (("n", max_n), ("steps", max_steps), ("best_of", max_best_of)):
        value = getattr(req, name)
        if value is not None and value > top:
            raise InvalidRequestError(name, f"{value} is over this server's limit of {top}")
    if len(req.prompt) > max_prompt_chars:
        raise InvalidRequestError("prompt", f"longer than {max_prompt_chars} characters")
