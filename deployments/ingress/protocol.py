"""The HTTP API's request bodies and errors (OpenAI Images API compatible, plus jobs).

The bodies are the request contract's `RequestOptions` (pipeline/request.py: every bound is declared there)
plus what only HTTP has: `size` ("WxH"), an optional `n` (each endpoint has its own default) and the OpenAI
fields we accept and ignore. Every error has one JSON shape, OpenAI's:
{"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.request import GenerationRequest, NumImages, Prompt, RequestOptions, request_from_text

OPENAI_TEXT = Field(default=None, max_length=256)  # OpenAI fields we accept and ignore (bounded like ours)


class APIError(Exception):
    """A domain error with its HTTP status; the ingress maps it to the JSON error shape."""
    status_code = 500
    type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.headers = message, param, code, headers or {}


def _api_error(name: str, status_code: int, type_: str, doc: str) -> type[APIError]:
    return type(name, (APIError,), {"status_code": status_code, "type": type_, "__doc__": doc})


Unauthorized = _api_error("Unauthorized", 401, "authentication_error", "No valid API key.")
NotFound = _api_error("NotFound", 404, "not_found_error", "No such job.")
Overloaded = _api_error("Overloaded", 429, "rate_limit_error", "The queue is full; retry after Retry-After.")
StorageUnavailable = _api_error("StorageUnavailable", 503, "storage_error", "S3 cannot be reached.")
QueueUnavailable = _api_error("QueueUnavailable", 503, "queue_unavailable", "The job queue (Redis) cannot be reached.")
GenerationFailed = _api_error("GenerationFailed", 500, "generation_error", "The job failed or was cancelled.")
TimedOut = _api_error("TimedOut", 504, "timeout_error", "The job ran past its deadline.")


class InitImage(BaseModel):
    """An image-to-image start: one of your images (`job_id` + `index`, from 1), or a PNG (`png_base64`)."""
    model_config = ConfigDict(extra="forbid")
    job_id: str | None = Field(default=None, max_length=64)
    index: int | None = Field(default=None, ge=1, le=64)
    png_base64: str | None = Field(default=None, max_length=1_400_000)

    @model_validator(mode="after")
    def _one(self) -> "InitImage":
        if (self.png_base64 is None) == (self.job_id is None):
            raise ValueError("give either job_id and index, or png_base64")
        if self.job_id is not None and self.index is None:
            raise ValueError("index is needed with job_id")
        return self


class GenerationBody(RequestOptions):
    """Body of both endpoints. `size` is the delivered size; the diffuser samples size/upscale."""

    prompt: Prompt
    n: NumImages | None = None
    size: str | None = Field(default=None, max_length=32, description='"WxH", e.g. "128x128"; "auto" = the default')
    priority: Literal["fast", "relax"] | None = Field(default=None, description="queue tier; default: the key's")
    init_image: InitImage | None = None
    strength: float | None = Field(default=None, gt=0, le=1, description="image-to-image: how much changes")
    webhook: str | None = Field(default=None, max_length=2048)
    webhook_events_filter: list[Literal["start", "progress", "completed"]] | None = Field(default=None, max_length=3)
    model: str | None = OPENAI_TEXT
    quality: str | None = OPENAI_TEXT
    style: str | None = OPENAI_TEXT
    user: str | None = OPENAI_TEXT
    background: str | None = OPENAI_TEXT
    moderation: str | None = OPENAI_TEXT
    output_format: str | None = OPENAI_TEXT
    output_compression: int | None = None
    partial_images: int | None = None
    stream: bool | None = None

    def to_request(self, default_n: int) -> GenerationRequest:
        """The pipeline request (prompt flags parsed, size checked; `priority` is the queue's, not the
        pipeline's). Raises InvalidRequestError."""
        options = self.model_dump(include=set(RequestOptions.model_fields))
        return request_from_text(self.prompt, size=self.size, n=self.n, default_n=default_n, **options)


class VariationsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strength: float = Field(default=0.3, gt=0, le=1, description="0.3 subtle, 0.6 strong (Midjourney's two)")


class OpenAIImagesBody(GenerationBody):
    response_format: Literal["url", "b64_json"] = "url"
