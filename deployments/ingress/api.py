"""The HTTP API (FastAPI on Serve): routes, authentication and the mapping of errors to responses.

    POST /v1/images/generations   OpenAI Images API; enqueues the job and waits for its images
    POST /v1/jobs                 enqueues, 202 + the queued record;  GET /v1/jobs/<id> (with the queue
                                  position and ETA while queued), /events (SSE);  DELETE cancels
    GET  /healthz                 each stage's readiness (no auth)
"""

import asyncio
import base64
import hashlib
import json
import logging
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from cluster.config import STAGES
from cluster.jobs import JobNotFound, JobRecord, JobStore, check_job_id, new_job_id
from cluster.storage import Storage, StorageError
from pipeline.request import InvalidRequestError, check_limits
from pipeline.spec import ModelInfo

from .. import errors
from .. import metrics as m
from ..calls import StageHandles
from ..common import parse_config
from ..queue import enqueue
from .protocol import (
    APIError,
    GenerationBody,
    GenerationFailed,
    NotFound,
    OpenAIImagesBody,
    Overloaded,
    QueueUnavailable,
    StorageUnavailable,
    TimedOut,
    Unauthorized,
)

logger = logging.getLogger(__name__)
app = FastAPI(title="imagine", description="Text-to-image on Ray Serve (OpenAI Images API compatible).")
SIZE_FIELDS = {"width": "size", "height": "size"}  # the pipeline's fields -> what the client sent


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def _handler(scope) -> str:
    """The route template the router matched (bounded label values: never the job id itself)."""
    return getattr(scope.get("route"), "path", None) or "unmatched"


class _CountRequests:
    """ASGI middleware: imagine_http_requests_total by route template, method and status (SSE-safe)."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            m.inc("imagine_http_requests_total", handler=_handler(scope), method=scope["method"], code=str(status[0]))


app.add_middleware(_CountRequests)


@app.exception_handler(APIError)
async def _api_error(request: Request, e: APIError):
    return error_response(e.status_code, e.message, e.type, e.param, e.code, e.headers)


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


def key_id(token: str) -> str:
    """A stable, non-reversible id of an API key (for fairness and a key's history; the key is never stored)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


# (helpers stand above the class: Serve ships the @serve.ingress class by value, and names defined after it
# were missing in the replicas)
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
        self.key_tiers = self.cfg.api.load_key_settings()
        self.keys = set(self.key_tiers)
        self.auth = self.cfg.api.auth_enabled(self.keys)

    def reconfigure(self, user_config: dict) -> None:
        """The queue's admission limits, changed in place by `imagine apply`."""
        self.queue.max_queued_cost = user_config["max_queued_image_steps"]
        self.queue.max_queued_cost_per_key = user_config["max_queued_image_steps_per_key"]

    # ---- routes -------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self):
        status = {}
        for name in STAGES:
            try:
                ready = await asyncio.wait_for(getattr(self.stages, name).ready.remote(), 5)
                status[name] = "ready" if ready else "not ready"
            except Exception as e:
                status[name] = f"unavailable: {type(e).__name__}"
        ok = all(v == "ready" for v in status.values())
        return JSONResponse(status_code=200 if ok else 503,
                            content={"status": "ok" if ok else "degraded", "stages": status,
                                     "model": self.info.spec.name, "auth": self.auth})

    @app.post("/v1/images/generations")
    async def images_generations(self, body: OpenAIImagesBody, request: Request):
        record = await self._wait(await self._submit(body, self._check_auth(request), default_n=1))
        if record.state != "succeeded":
            raise self._job_error(record)
        data = []
        for img in record.images:
            if body.response_format == "b64_json":
                png = await self._storage_call(self.store.storage.get_bytes, img.key)
                data.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": record.request["prompt"]})
            else:
                url = self.store.storage.presigned_url(img.key)
                data.append({"url": url, "revised_prompt": record.request["prompt"]})
        return {"created": int(record.created_at), "data": data, "job_id": record.id}

    @app.post("/v1/jobs", status_code=202)
    async def create_job(self, body: GenerationBody, request: Request):
        record = await self._submit(body, self._check_auth(request), default_n=4)
        return await self._public(record)

    @app.get("/v1/jobs/{job_id}")
    async def get_job(self, job_id: str, request: Request):
        self._check_auth(request)
        return await self._public(await self._get_record(job_id))

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(self, job_id: str, request: Request):
        """A queued job is cancelled now; a running one at its runner's next lease check and the Diffuser's
        next step (the record says cancelled at once)."""
        self._check_auth(request)
        record = await self._get_record(job_id)
        if not record.is_terminal():
            record = await self._storage_call(self.store.cancel, job_id)
            await self._redis(self.queue.request_cancel, job_id)
            if await self._redis(self.queue.release, job_id):  # it was still waiting: nothing runs it now
                await self._redis(self.queue.finish, job_id, "cancelled")
            await self._redis(self.queue.publish, job_id, record.model_dump(mode="json"))
        return await self._public(record)

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(self, job_id: str, request: Request):
        self._check_auth(request)
        await self._get_record(job_id)  # 404 before the stream starts
        return StreamingResponse(self._events(job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    # ---- admission ----------------------------------------------------------------------------
    async def _submit(self, body: GenerationBody, key_id: str, default_n: int) -> JobRecord:
        """Validate, admit into the queue (429 beyond its limits), write the record, enqueue; the queued record."""
        req = body.to_request(default_n)
        check_limits(req, **self.cfg.limits.model_dump())
        resolved = self.info.resolve(req)
        tier = body.priority or self.key_tiers.get(key_id) or self.cfg.queue.default_priority
        job_id = new_job_id()
        admission = await self._redis(self.queue.admit, job_id, key_id, tier, resolved.cost, required=True)
        if not admission.ok:
            limit = self.queue.max_queued_cost if admission.refused_by == "total" else \
                self.queue.max_queued_cost_per_key
            wait = await self._redis(self.queue.retry_after_s, admission.queued_cost + resolved.cost - limit) or 10
            whose = "the queue" if admission.refused_by == "total" else "this API key's queued jobs"
            raise Overloaded(f"{whose} already hold {admission.queued_cost} image-steps (limit {limit}); this job "
                             f"needs {resolved.cost} (n x best_of x steps); retry later", code="queue_full",
                             headers={"Retry-After": str(wait)})
        try:
            request = {**resolved.model_dump(), "model": self.info.spec.name}
            record = await self._storage_call(self.store.create, request, job_id, priority=tier, key_id=key_id)
            await self._redis(self.queue.publish, job_id, record.model_dump(mode="json"), required=True)
            await self._redis(enqueue, self.producer, job_id, admission.level, required=True)
        except BaseException:
            await self._redis(self.queue.release, job_id)
            raise
        m.inc("imagine_jobs_submitted_total")
        return record

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
            data = await self._redis(self.queue.live_record, job_id)
            if data is not None:
                return JobRecord.model_validate(data)
        try:
            return await self._storage_call(self.store.get, job_id)
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
            place = await self._redis(self.queue.position, record.id)
            if place is not None:
                eta = await self._redis(self.queue.wait_estimate_s, place[1])
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

    async def _storage_call(self, fn, *args, **kwargs):
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except JobNotFound:
            raise
        except StorageError as e:
            raise StorageUnavailable(f"storage unavailable: {e}", code="storage_error",
                                     headers={"Retry-After": "5"}) from e

    async def _redis(self, fn, *args, required: bool = False):
        """A queue call; when Redis cannot be reached: 503 with Retry-After if `required`, else None."""
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as e:
            if not errors.is_broker_error(e):
                raise
            logger.warning("queue broker unavailable: %s", e)
            if required:
                raise QueueUnavailable("the job queue is unavailable; retry later", code="queue_unavailable",
                                       headers={"Retry-After": "5"}) from e
            return None

    def _check_auth(self, request: Request) -> str:
        """The caller's key id (a hash, never the key); 401 without a valid key when auth is on."""
        if not self.auth:
            return "anonymous"
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token or not any(secrets.compare_digest(token, k) for k in self.keys):
            raise Unauthorized("missing or invalid API key (send 'Authorization: Bearer <key>')",
                               code="invalid_api_key")
        return key_id(token)

    @staticmethod
    def _job_error(record: JobRecord) -> APIError:
        if record.state == "cancelled":
            return GenerationFailed(f"job {record.id} was cancelled", code="cancelled")
        cls = {"timeout": TimedOut, "storage_error": StorageUnavailable}.get(record.error_type or "", GenerationFailed)
        return cls(f"job {record.id} failed: {record.error}", code=record.error_type)

