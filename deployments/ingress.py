"""Ingress deployment: the HTTP API (FastAPI on Serve) and the job runner that drives the graph.

    POST /v1/images/generations   OpenAI Images API; waits for the images
    POST /v1/jobs                 202 + job id;  GET /v1/jobs/<id>, /events (SSE);  DELETE cancels
    GET  /healthz                 each stage's readiness (no auth)

A job goes TextEncoder -> Diffuser (streamed per-step progress) -> [CLIP rank] -> Upscaler ->
Publisher. The job record in S3 is the source of truth; this replica keeps the jobs it runs in
memory for progress and SSE, and writes progress to S3 at most every 5 s (stage changes at once).
"""

import asyncio
import base64
import json
import logging
import secrets
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from cluster.jobs import JobNotFound, JobRecord, JobStore
from cluster.storage import Storage, StorageError
from pipeline.request import GenerationRequest, InvalidRequestError
from pipeline.spec import ModelInfo

from . import metrics as m
from .common import parse_config
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
    to_generation_request,
)

logger = logging.getLogger(__name__)
app = FastAPI(title="imagine", description="Text-to-image on Ray Serve (OpenAI Images API compatible).")
PERSIST_EVERY_S = 5.0  # progress in S3 (read by other replicas) lags at most this; stage changes are written at once
KEEP_FINISHED_S = 120.0


class JobCancelled(Exception):
    pass


class DiffuserStalled(RuntimeError):
    pass


@dataclass
class ActiveJob:
    record: JobRecord
    task: asyncio.Task | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    persisted_at: float = 0.0
    accepted_at: float = field(default_factory=time.monotonic)
    waited: bool = False  # the queue wait (acceptance to first denoising step) has been observed


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
    return error_response(422, e.message, "invalid_request_error", e.field)


@app.exception_handler(RequestValidationError)
async def _validation(request: Request, e: RequestValidationError):
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"] if x != "body"]
    param = ".".join(loc) or "body"
    msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    return error_response(422, f"{param}: {msg}", "invalid_request_error", param)


def _error_type(e: Exception) -> str:
    """'replica_failure' for a dead or unreachable replica (Ray's actor errors), else 'generation_error'."""
    name = type(e).__name__
    if isinstance(e, DiffuserStalled) or any(w in name for w in ("ActorDied", "ActorError", "Unavailable")):
        return "replica_failure"
    return "generation_error"


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, text_encoder, diffuser, upscaler, publisher):
        self.cfg = parse_config(config)
        self.text_encoder, self.diffuser, self.upscaler, self.publisher = text_encoder, diffuser, upscaler, publisher
        self.info = ModelInfo.load(self.cfg.model_for("diffuser"))
        self.store = JobStore(Storage.from_config(self.cfg.storage))
        self.keys = self.cfg.api.load_api_keys()
        self.auth = self.cfg.api.auth_enabled(self.keys)
        self.active: dict[str, ActiveJob] = {}
        self.reaper = asyncio.get_event_loop().create_task(self._reap_stale_jobs())

    # ---- routes -------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self):
        stages = {"text_encoder": self.text_encoder, "diffuser": self.diffuser, "upscaler": self.upscaler,
                  "publisher": self.publisher}
        status = {}
        for name, handle in stages.items():
            try:
                status[name] = "ready" if await asyncio.wait_for(handle.ready.remote(), 5) else "not ready"
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

    # ---- job submission and lifecycle ----------------------------------------------------------------
    async def _submit(self, body: GenerationBody, default_n: int) -> ActiveJob:
        fields = to_generation_request(body, self.info, default_n)
        self._check_limits(fields)
        try:
            req = self.info.resolve(GenerationRequest.model_validate(fields))
        except ValueError as e:  # pydantic errors on values that came from prompt flags
            if isinstance(e, InvalidRequestError):
                raise
            err = e.errors()[0]
            raise InvalidRequestError(".".join(map(str, err["loc"])), err["msg"]) from None
        limit = self.cfg.api.max_queued_requests
        running = sum(1 for j in self.active.values() if not j.record.is_terminal())
        if limit > 0 and running >= limit:
            raise Overloaded(f"{running} jobs are in flight on this replica (limit {limit}); retry later",
                             code="queue_full", headers={"Retry-After": "5"})
        record = await self._storage_call(self.store.create, {**req.model_dump(), "model": self.info.spec.name})
        job = ActiveJob(record)
        self.active[record.id] = job
        m.inc("imagine_jobs_submitted_total")
        self._report_jobs()
        job.task = asyncio.get_event_loop().create_task(self._run(job, req))
        return job

    def _report_jobs(self) -> None:
        """imagine_jobs{state}: the jobs this replica holds that are not finished, by state."""
        counts = {"queued": 0, "running": 0}
        for j in self.active.values():
            if j.record.state in counts:
                counts[j.record.state] += 1
        for state, n in counts.items():
            m.set_gauge("imagine_jobs", n, state=state)

    def _check_limits(self, fields: dict) -> None:
        lim = self.cfg.limits
        for name, top in (("n", lim.max_n), ("steps", lim.max_steps), ("best_of", lim.max_best_of)):
            if fields.get(name) is not None and fields[name] > top:
                raise InvalidRequestError(name, f"{fields[name]} is over this server's limit of {top}")
        if len(fields["prompt"]) > lim.max_prompt_chars:
            raise InvalidRequestError("prompt", f"longer than {lim.max_prompt_chars} characters")

    async def _run(self, job: ActiveJob, req) -> None:
        timeout = self.cfg.api.request_timeout_s
        try:
            await asyncio.wait_for(self._pipeline(job, req), timeout)
        except (asyncio.CancelledError, JobCancelled):
            job.record = await self._safe(self.store.cancel, job.record.id) or job.record.model_copy(
                update={"state": "cancelled"})
        except asyncio.TimeoutError:
            await self._fail(job, f"timed out after {timeout:.0f}s in stage {job.record.stage}", "timeout")
        except StorageError as e:
            await self._fail(job, f"storage error: {e}", "storage_error")
        except Exception as e:  # a replica died, a model raised: the job fails with the reason
            logger.exception("job %s failed", job.record.id)
            await self._fail(job, f"{type(e).__name__} in stage {job.record.stage}: {e}"[:2000], _error_type(e))
        finally:
            job.changed.set()
            state = job.record.state if job.record.is_terminal() else "failed"
            m.inc("imagine_jobs_finished_total", state=state)
            if state == "succeeded":
                m.observe("imagine_job_latency_seconds", time.monotonic() - job.accepted_at)
            self._report_jobs()
            asyncio.get_event_loop().call_later(KEEP_FINISHED_S, self.active.pop, job.record.id, None)

    async def _pipeline(self, job: ActiveJob, req) -> None:
        import torch

        from pipeline.generate import make_sample_requests
        from pipeline.text_encoder import PromptEmbeds

        # 1. text encoding: prompt and negative prompt, batched with other jobs' prompts
        await self._update(job, state="running", stage="text_encoder", progress=0.02, force=True)
        self._report_jobs()
        (pe, pp), (ne, np_) = await asyncio.gather(self.text_encoder.encode.remote(req.prompt),
                                                   self.text_encoder.encode.remote(req.negative_prompt))
        emb = PromptEmbeds(prompt_embeds=torch.stack([pe, ne]), pooled=torch.stack([pp, np_]))
        # 2. sampling: one streamed request per candidate image
        await self._update(job, stage="diffuser", progress=0.05, force=True)
        pixels = await self._sample(job, make_sample_requests(req, emb))
        seeds, scores = req.seeds(), [None] * req.num_candidates
        # 3. best_of: CLIP keeps the n best candidates, best first
        if req.best_of > 1:
            order, all_scores = await self.text_encoder.rank.remote(pixels, req.prompt)
            keep = order[:req.n]
            pixels, seeds, scores = pixels[keep], [seeds[k] for k in keep], [all_scores[k] for k in keep]
        # 4. upscaling, one image per call (batched across jobs)
        await self._update(job, stage="upscaler", progress=0.88, force=True)
        images = torch.stack(await asyncio.gather(*[self.upscaler.upscale.remote(p, req.upscale) for p in pixels]))
        # 5. publishing: PNGs + metadata to S3, then the job record
        await self._update(job, stage="publisher", progress=0.94, force=True)
        meta = [{"prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": s, "steps": req.steps,
                 "guidance_scale": req.guidance_scale, "scheduler": req.scheduler, "model": self.info.spec.name,
                 "width": req.width, "height": req.height, "upscale": req.upscale, "score": sc}
                for s, sc in zip(seeds, scores)]
        records = await self.publisher.publish.remote(job.record.id, images, meta)
        await self._update(job, state="succeeded", stage="done", progress=1.0, images=records, force=True)

    async def _sample(self, job: ActiveJob, sample_requests: list):
        import torch
        progress = [0.0] * len(sample_requests)
        images = [None] * len(sample_requests)

        stall = self.cfg.api.stall_timeout_s

        async def consume(i: int, sr) -> None:
            stream = self.diffuser.options(stream=True).sample.remote(sr)
            while True:  # a replica that dies mid-stream may never end it: bound the wait per event
                try:
                    event = await asyncio.wait_for(stream.__anext__(), stall)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:  # the job was cancelled: free the Diffuser's slot too
                    stream.cancel()
                    raise
                except asyncio.TimeoutError:
                    stream.cancel()
                    raise DiffuserStalled(f"no progress from the Diffuser for {stall:.0f}s "
                                          "(its replica may have died)") from None
                if "image" in event:
                    images[i] = event["image"]
                else:
                    if not job.waited:
                        job.waited = True
                        m.observe("imagine_job_queue_wait_seconds", time.monotonic() - job.accepted_at)
                    progress[i] = event["progress"]
                    await self._update(job, progress=0.05 + 0.8 * sum(progress) / len(progress))

        await asyncio.gather(*(consume(i, sr) for i, sr in enumerate(sample_requests)))
        return torch.stack(images)

    async def _update(self, job: ActiveJob, force: bool = False, **fields) -> None:
        """Update the in-memory record (and SSE listeners); persist to S3 when due."""
        job.record = JobRecord.model_validate({**job.record.model_dump(), **fields, "updated_at": time.time()})
        job.changed.set()
        if force or time.monotonic() - job.persisted_at >= PERSIST_EVERY_S:
            job.persisted_at = time.monotonic()
            stored = await asyncio.to_thread(self.store.update, job.record.id, **fields)
            if stored.state == "cancelled":
                job.record = stored
                raise JobCancelled(job.record.id)

    async def _fail(self, job: ActiveJob, error: str, error_type: str) -> None:
        job.record = JobRecord.model_validate({**job.record.model_dump(), "state": "failed", "error": error,
                                               "error_type": error_type, "updated_at": time.time()})
        logger.warning("job %s failed (%s): %s", job.record.id, error_type, error)
        stored = await self._safe(self.store.mark_failed, job.record.id, error, error_type)
        if stored is not None and stored.is_terminal():
            job.record = stored

    async def _safe(self, fn, *args):
        """A storage call whose failure must not hide the job's own outcome."""
        try:
            return await asyncio.to_thread(fn, *args)
        except StorageError as e:
            logger.warning("could not record job outcome in storage: %s", e)
            return None

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
