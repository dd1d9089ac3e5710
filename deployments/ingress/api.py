"""The HTTP API (FastAPI on Serve): routes, authentication and the mapping of errors to responses.

    POST /v1/images/generations   OpenAI Images API; waits for the images
    POST /v1/jobs                 202 + job id;  GET /v1/jobs/<id>, /events (SSE);  DELETE cancels
    GET  /healthz                 each stage's readiness (no auth)
"""

import asyncio
import base64
import json
import logging
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from cluster.config import STAGES
from cluster.jobs import JobNotFound, JobRecord, JobStore
from cluster.storage import Storage, StorageError
from pipeline.request import InvalidRequestError, check_limits
from pipeline.spec import ModelInfo

from .. import metrics as m
from ..common import parse_config
from ..runner import ActiveJob, JobRunner, StageHandles
from .protocol import (
    APIError,
    GenerationBody,
    GenerationFailed,
    NotFound,
    OpenAIImagesBody,
    Overloaded,
    StorageUnavailable,
    TimedOut,
    Unauthorized,
)

logger = logging.getLogger(__name__)
app = FastAPI(title="imagine", description="Text-to-image on Ray Serve (OpenAI Images API compatible).")
KEEP_FINISHED_S = 120.0  # a finished job stays in memory this long (SSE listeners catch its last event)
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


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, text_encoder, diffuser, upscaler, publisher):
        self.cfg = parse_config(config)
        self.stages = StageHandles(text_encoder, diffuser, upscaler, publisher)
        self.info = ModelInfo.load(self.cfg.model_for("diffuser"))
        self.store = JobStore(Storage.from_config(self.cfg.storage))
        self.runner = JobRunner(self.stages, self.store, self.info.spec.name, self.cfg.api.request_timeout_s,
                                self.cfg.api.stall_timeout_s)
        self.keys = self.cfg.api.load_api_keys()
        self.auth = self.cfg.api.auth_enabled(self.keys)
        self.active: dict[str, ActiveJob] = {}
        loop = asyncio.get_event_loop()
        self._background = [loop.create_task(self._reap_stale_jobs()), loop.create_task(self._report_jobs())]

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
        self._check_auth(request)
        job = await self._submit(body, default_n=1)
        await asyncio.shield(job.task)
        record = job.record
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
        self._check_auth(request)
        job = await self._submit(body, default_n=4)
        return self._public(job.record)

    @app.get("/v1/jobs/{job_id}")
    async def get_job(self, job_id: str, request: Request):
        self._check_auth(request)
        return self._public(await self._get_record(job_id))

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(self, job_id: str, request: Request):
        self._check_auth(request)
        record = await self._get_record(job_id)
        if not record.is_terminal():
            record = await self._storage_call(self.store.cancel, job_id)
            job = self.active.get(job_id)
            if job is not None and job.task is not None and record.state == "cancelled":
                job.record = record
                job.task.cancel()
        return self._public(record)

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(self, job_id: str, request: Request):
        self._check_auth(request)
        await self._get_record(job_id)  # 404 before the stream starts
        return StreamingResponse(self._events(job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    # ---- admission ----------------------------------------------------------------------------
    async def _submit(self, body: GenerationBody, default_n: int) -> ActiveJob:
        req = body.to_request(default_n)
        check_limits(req, **self.cfg.limits.model_dump())
        resolved = self.info.resolve(req)
        limit = self.cfg.api.max_queued_requests
        running = sum(1 for j in self.active.values() if not j.record.is_terminal())
        if limit > 0 and running >= limit:
            raise Overloaded(f"{running} jobs are in flight on this replica (limit {limit}); retry later",
                             code="queue_full", headers={"Retry-After": "5"})
        record = await self._storage_call(self.store.create, {**resolved.model_dump(), "model": self.info.spec.name})
        job = ActiveJob(record)
        self.active[record.id] = job
        m.inc("imagine_jobs_submitted_total")
        job.task = asyncio.get_event_loop().create_task(self._run(job, resolved))
        return job

    async def _run(self, job: ActiveJob, req) -> None:
        try:
            await self.runner.run(job, req)
        finally:
            asyncio.get_event_loop().call_later(KEEP_FINISHED_S, self.active.pop, job.record.id, None)

    async def _report_jobs(self) -> None:
        """imagine_jobs{state}: the jobs this replica holds that are not finished, by state (every second)."""
        while True:
            counts = {"queued": 0, "running": 0}
            for j in self.active.values():
                if j.record.state in counts:
                    counts[j.record.state] += 1
            for state, n in counts.items():
                m.set_gauge("imagine_jobs", n, state=state)
            await asyncio.sleep(1.0)

    # ---- reading jobs -------------------------------------------------------------------------
    async def _get_record(self, job_id: str) -> JobRecord:
        job = self.active.get(job_id)
        if job is not None:
            if job.task is not None and job.task.done() and not job.record.is_terminal():
                # the runner ended without recording an outcome: never report such a job as running
                logger.error("job %s runner ended in state %s", job_id, job.record.state)
                job.record = JobRecord.model_validate({**job.record.model_dump(), "state": "failed",
                                                       "error": "the job runner stopped without an outcome",
                                                       "error_type": "internal_error"})
            return job.record
        try:
            return await self._storage_call(self.store.get, job_id)
        except JobNotFound:
            raise NotFound(f"no job {job_id!r}", param="job_id") from None

    def _public(self, record: JobRecord) -> dict:
        if record.state == "succeeded":
            try:
                record = self.store.with_urls(record)
            except StorageError as e:
                logger.warning("could not presign URLs for %s: %s", record.id, e)
        return record.model_dump(mode="json")

    async def _events(self, job_id: str):
        """Server-sent events: the job record whenever it changes, until it is terminal."""
        last = None
        while True:
            job = self.active.get(job_id)
            if job is not None:
                job.changed.clear()
                record = job.record
            else:
                record = await self._get_record(job_id)
            payload = json.dumps(self._public(record) if record.is_terminal() else record.model_dump(mode="json"))
            if payload != last:
                yield f"event: {record.state}\ndata: {payload}\n\n"
                last = payload
            if record.is_terminal():
                return
            if job is not None:
                try:
                    await asyncio.wait_for(job.changed.wait(), 15)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
            else:
                await asyncio.sleep(0.5)

    async def _storage_call(self, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except JobNotFound:
            raise
        except StorageError as e:
            raise StorageUnavailable(f"storage unavailable: {e}", code="storage_error") from e

    def _check_auth(self, request: Request) -> None:
        if not self.auth:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token or not any(secrets.compare_digest(token, k) for k in self.keys):
            raise Unauthorized("missing or invalid API key (send 'Authorization: Bearer <key>')",
                               code="invalid_api_key")

    @staticmethod
    def _job_error(record: JobRecord) -> APIError:
        if record.state == "cancelled":
            return GenerationFailed(f"job {record.id} was cancelled", code="cancelled")
        cls = {"timeout": TimedOut, "storage_error": StorageUnavailable}.get(record.error_type or "", GenerationFailed)
        return cls(f"job {record.id} failed: {record.error}", code=record.error_type)

    async def _reap_stale_jobs(self) -> None:
        """Fail jobs left queued/running by a replica that stopped (no update for too long)."""
        stale_after = self.cfg.api.request_timeout_s + 60
        while True:
            try:
                records = await asyncio.to_thread(self.store.list)
                now = time.time()
                for r in records:
                    if not r.is_terminal() and r.id not in self.active and now - r.updated_at > stale_after:
                        await asyncio.to_thread(self.store.mark_failed, r.id,
                                                f"interrupted: no progress for {now - r.updated_at:.0f}s "
                                                "(the replica running it stopped)", "interrupted")
            except Exception as e:
                logger.warning("stale-job check failed: %s", e)
            await asyncio.sleep(60)
