"""The HTTP API (FastAPI on Serve): routes, authentication and the mapping of errors to responses.

    POST /v1/images/generations   OpenAI Images API; enqueues the job and waits for its images
    POST /v1/jobs                 enqueues, 202 + the queued record (init_image + strength: image-to-image;
                                  webhook + webhook_events_filter);  GET /v1/jobs: the key's jobs, newest first
    GET  /v1/jobs/<id>            the record (queue position and ETA while queued), /events (SSE); DELETE cancels
    POST /v1/jobs/<id>/images/<i>/upscale | /variations, /v1/jobs/<id>/reroll: child jobs (U, V, reroll)
    GET  /                        the web gallery
    GET  /healthz                 each stage's readiness (no auth)
"""

import asyncio
import base64
import json
import logging
import time
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.jobs import JobNotFound, JobRecord, JobStore, check_job_id
from cluster.storage import Storage, StorageError
from pipeline.request import InvalidRequestError
from pipeline.spec import ModelInfo

from ..calls import StageHandles
from ..common import parse_config
from . import gallery, guard
from .guard import CountRequests, Guard, error_response, key_id
from .health import HealthCache
from .jobs import RETRY, JobMaker, call_redis, call_storage
from .protocol import (
    APIError,
    GenerationBody,
    GenerationFailed,
    NotFound,
    OpenAIImagesBody,
    StorageUnavailable,
    TimedOut,
    VariationsBody,
)

logger = logging.getLogger(__name__)
# A query parameter as a plain constrained type, not `Query(...)`: Serve ships this module's classes by value
# (cloudpickle), which turns FastAPI's `Query` sentinels into new objects, and the served OpenAPI document then
# showed `"example": {}` on the parameter.
PageSize = Annotated[int, Field(ge=1, le=100, description="jobs per page")]
app = FastAPI(title="imagine", description="Text-to-image on Ray Serve (OpenAI Images API compatible).")
SIZE_FIELDS = {"width": "size", "height": "size"}  # the pipeline's fields -> what the client sent


gallery.mount(app)                  # GET / and /static/*: the web gallery (no key needed for the page itself)
app.add_middleware(Guard)           # inner: authentication and body size, before the body is read
app.add_middleware(CountRequests)   # outer: every answer counted, 401 and 413 too


@app.exception_handler(APIError)
async def _api_error(request: Request, e: APIError):
    return error_response(e.status_code, e.message, e.type, e.param, e.code, e.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    """FastAPI's own errors (a body it cannot parse, an unknown route or method) in our one error shape."""
    types = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error"}
    return error_response(e.status_code, str(e.detail), types.get(e.status_code, "invalid_request_error"),
                          headers=getattr(e, "headers", None))


@app.exception_handler(InvalidRequestError)
async def _invalid(request: Request, e: InvalidRequestError):
    param = SIZE_FIELDS.get(e.field, e.field)
    return error_response(422, f"{param}: {e.message}", "invalid_request_error", param)


@app.exception_handler(RequestValidationError)
async def _validation(request: Request, e: RequestValidationError):
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"] if x != "body"]
    param = ".".join(loc) or "body"
    msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    return error_response(422, f"{param}: {msg}", "invalid_request_error", param)


# (helpers stand above the class, or in other modules: Serve ships the @serve.ingress class by value, and
# module names defined after it were missing in the replicas)
@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """Admits jobs (auth, validation, limits, queue admission), writes their record, enqueues them, and answers
    reads, cancels and server-sent events from the queue's live state (Redis) and the records (S3)."""

    def __init__(self, config: dict, text_encoder, diffuser, upscaler, publisher, job_runner):
        from ..queue import producer
        self.cfg = parse_config(config)
        self.stages = StageHandles(text_encoder, diffuser, upscaler, publisher)
        self.job_runner = job_runner
        self.info = ModelInfo.load(self.cfg.model_for("diffuser"))
        self.store = JobStore(Storage.from_config(self.cfg.storage))
        self.queue = self.cfg.queue.job_queue()
        self.producer = producer(self.cfg)
        tiers = self.cfg.api.load_key_settings()
        self.key_tiers = {key_id(k.encode()): tier for k, tier in tiers.items()}
        self.auth = self.cfg.api.auth_enabled()
        # through the module: Serve ships this class by value, with copies of the globals its methods name
        settings = guard.SETTINGS
        settings.auth, settings.keys = self.auth, [k.encode() for k in tiers]
        settings.keys_hint = self.cfg.api.api_keys_file or f"${self.cfg.api.api_keys_env}"
        settings.public_docs, settings.max_body_bytes = self.cfg.api.public_docs, self.cfg.api.max_body_bytes
        self.jobs = JobMaker(self.cfg, self.info, self.store, self.queue, self.producer, self.key_tiers,
                             webhooks_on=self.cfg.webhooks.server_secret() is not None)
        self.health = HealthCache(serve.get_replica_context().app_name, self.queue, self.store.storage)
        self._health_task = asyncio.get_event_loop().create_task(self.health.run())

    def reconfigure(self, user_config: dict) -> None:
        """The queue's admission limits, changed in place by `imagine apply`."""
        self.queue.max_queued_cost = user_config["max_queued_image_steps"]
        self.queue.max_queued_cost_per_key = user_config["max_queued_image_steps_per_key"]

    # ---- routes -------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self):
        """Each stage's health from the cache (never waits on a stage; no key needed)."""
        h = self.health
        return JSONResponse(status_code=200 if h.healthy else 503, headers=None if h.healthy else RETRY,
                            content={"status": "ok" if h.healthy else "degraded", **h.snapshot(),
                                     "model": self.info.spec.name, "auth": self.auth})

    @app.get("/readyz")
    async def readyz(self):
        """Whether a new job can be accepted now: healthy stages, and the queue's Redis and S3 answer."""
        h = self.health
        return JSONResponse(status_code=200 if h.ready else 503, headers=None if h.ready else RETRY,
                            content={"ready": h.ready, **h.snapshot()})

    @app.post("/v1/images/generations")
    async def images_generations(self, body: OpenAIImagesBody, request: Request):
        record = await self._wait(await self.jobs.imagine(body, request.state.key_id, default_n=1))
        if record.state != "succeeded":
            raise self._job_error(record)
        data = []
        for img in record.images:
            if body.response_format == "b64_json":
                png = await call_storage(self.store.storage.get_bytes, img.key)
                data.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": record.request["prompt"]})
            else:
                url = self.store.storage.presigned_url(img.key)
                data.append({"url": url, "revised_prompt": record.request["prompt"]})
        return {"created": int(record.created_at), "data": data, "job_id": record.id}

    @app.post("/v1/jobs", status_code=202)
    async def create_job(self, body: GenerationBody, request: Request):
        record = await self.jobs.imagine(body, request.state.key_id, default_n=4)
        return await self._public(record)

    @app.get("/v1/jobs")
    async def list_jobs(self, request: Request, limit: PageSize = 20, before: float | None = None):
        """The caller's jobs, newest first; `next_before` pages on (the gallery's history)."""
        rows = await call_redis(self.queue.key_jobs, request.state.key_id, before, limit) or []
        records = []
        for job_id, _ in rows:
            try:
                records.append(await self._public(await self._get_record(job_id)))
            except NotFound:
                continue
        return {"jobs": records, "next_before": rows[-1][1] if len(rows) == limit else None}

    @app.post("/v1/jobs/{job_id}/images/{index}/upscale", status_code=202)
    async def upscale(self, job_id: str, index: int, request: Request):
        """Midjourney's U: image `index` (from 1) larger, through the Upscaler, as a child job."""
        return await self._child(job_id, "upscale", request, index)

    @app.post("/v1/jobs/{job_id}/images/{index}/variations", status_code=202)
    async def variations(self, job_id: str, index: int, request: Request, body: VariationsBody | None = None):
        """Midjourney's V: four images that start from image `index` (strength 0.3 subtle, 0.6 strong)."""
        return await self._child(job_id, "vary", request, index, (body or VariationsBody()).strength)

    @app.post("/v1/jobs/{job_id}/reroll", status_code=202)
    async def reroll(self, job_id: str, request: Request):
        """The same prompt and settings with new seeds, as a child job."""
        return await self._child(job_id, "reroll", request)

    @app.get("/v1/webhooks/default/secret")
    async def webhook_secret(self, request: Request):
        """This key's webhook signing secret (Standard Webhooks' `whsec_...`), to verify deliveries with."""
        from ..webhooks import key_secret
        secret = self.cfg.webhooks.server_secret()
        if secret is None:
            raise NotFound("this server has no webhook secret configured", param="webhook")
        return {"key": key_secret(secret, request.state.key_id)}

    async def _child(self, job_id: str, action: str, request: Request, index: int | None = None,
                     strength: float | None = None) -> dict:
        parent = await self._get_record(job_id, live=False)
        return await self._public(await self.jobs.child(parent, action, request.state.key_id, index, strength))

    @app.get("/v1/jobs/{job_id}")
    async def get_job(self, job_id: str):
        return await self._public(await self._get_record(job_id))

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(self, job_id: str):
        """A queued job is cancelled now; a running one at its runner's next lease check and the Diffuser's
        next step (the record says cancelled at once)."""
        record = await self._get_record(job_id)
        if not record.is_terminal():
            record = await call_storage(self.store.cancel, job_id)
            await call_redis(self.queue.request_cancel, job_id)
            if await call_redis(self.queue.release, job_id):  # it was still waiting: nothing runs it now
                await call_redis(self.queue.finish, job_id, "cancelled")
            await call_redis(self.queue.publish, job_id, record.model_dump(mode="json"))
        return await self._public(record)

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(self, job_id: str):
        await self._get_record(job_id)  # 404 before the stream starts
        return StreamingResponse(self._events(job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _wait(self, record: JobRecord) -> JobRecord:
        """The job's terminal record, following its events (504 after api.request_timeout_s; the job goes on)."""
        deadline = time.monotonic() + self.cfg.api.request_timeout_s
        async for current in self._records(record.id):
            if current is not None and current.is_terminal():
                return current
            if time.monotonic() > deadline:
                break
        raise TimedOut(f"job {record.id} did not finish within {self.cfg.api.request_timeout_s:.0f}s; it goes on: "
                       f"GET /v1/jobs/{record.id}", code="timeout")

    # ---- reading jobs -------------------------------------------------------------------------
    async def _get_record(self, job_id: str, live: bool = True) -> JobRecord:
        """The live record (Redis: the runner publishes every change, the outcome before S3 has it), else the
        durable one (S3: jobs older than the live copy, or Redis away); 404 if neither knows the job."""
        try:
            check_job_id(job_id)
        except JobNotFound:
            raise NotFound(f"no job {job_id[:80]!r}", param="job_id") from None
        if live:
            data = await call_redis(self.queue.live_record, job_id)
            if data is not None:
                return JobRecord.model_validate(data)
        try:
            return await call_storage(self.store.get, job_id)
        except JobNotFound:
            raise NotFound(f"no job {job_id!r}", param="job_id") from None

    async def _public(self, record: JobRecord) -> dict:
        out = record.model_dump(mode="json")
        if record.state == "succeeded":
            try:
                out = self.store.with_urls(record).model_dump(mode="json")
            except StorageError as e:
                logger.warning("could not presign URLs for %s: %s", record.id, e)
        elif record.state == "queued":
            place = await call_redis(self.queue.position, record.id)
            if place is not None:
                eta = await call_redis(self.queue.wait_estimate_s, place[1])
                out |= {"queue_position": place[0], "queue_ahead_image_steps": place[1],
                        "eta_s": round(eta, 1) if eta is not None else None}
        return out

    async def _records(self, job_id: str):
        """The job's record at each change (from its event stream; S3 every second while Redis is away)."""
        after = "0"
        while True:
            try:
                events = await asyncio.to_thread(self.queue.events, job_id, after, 2000)
            except Exception as e:
                logger.warning("job %s events: %s; reading S3", job_id, e)
                yield await self._get_record(job_id, live=False)
                await asyncio.sleep(1.0)
                continue
            if not events:
                yield None  # nothing new: a chance to send a keep-alive or the queue position
            for event_id, data in events:
                after = event_id
                yield JobRecord.model_validate(data)

    async def _events(self, job_id: str):
        """Server-sent events: the job record whenever it changes (and a queued job's place in line), until it
        is terminal."""
        last, quiet_since = None, time.monotonic()
        record = await self._get_record(job_id)
        async for current in self._records(job_id):
            record = current or record
            payload = json.dumps(await self._public(record))
            if payload != last:
                yield f"event: {record.state}\ndata: {payload}\n\n"
                last, quiet_since = payload, time.monotonic()
            elif time.monotonic() - quiet_since > 15:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
            if record.is_terminal():
                return

    @staticmethod
    def _job_error(record: JobRecord) -> APIError:
        if record.state == "cancelled":
            return GenerationFailed(f"job {record.id} was cancelled", code="cancelled")
        cls = {"timeout": TimedOut, "storage_error": StorageUnavailable}.get(record.error_type or "", GenerationFailed)
        return cls(f"job {record.id} failed: {record.error}", code=record.error_type,
                   headers=RETRY if cls is StorageUnavailable else None)

