"""The job runner: one delivery of a job from the queue, run to an outcome and recorded.

    TextEncoder -> Diffuser (streamed progress) -> [CLIP rank, best_of] -> Upscaler -> Publisher

`JobRunner.handle(job_id, owner)` is what the JobRunner deployment (deployments/job_runner.py) calls per
delivered message; its docstring has the protocol. While a job runs, its record lives in Redis (the live copy
every Ingress reads for GET and SSE, published at each change) and is written to S3 at each stage and state
change (the durable summary). Overall progress follows the named plan of cluster/jobs.py (`progress_at`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from cluster.jobs import JobRecord, JobStore, progress_at
from cluster.storage import StorageError

from . import errors
from . import metrics as m
from .calls import StageCalls, StageHandles

logger = logging.getLogger(__name__)
__all__ = ["JobRunner", "StageHandles"]


class JobCancelled(Exception):
    pass


@dataclass
class RunningJob:
    """A job this runner is running: its record (ahead of S3), its run's attempt and why it may stop early."""
    record: JobRecord
    owner: str
    level: int = 0
    lost: bool = False              # its lease went to another runner: stop without an outcome
    cancel_requested: bool = False  # a client cancelled it
    started: float = field(default_factory=time.monotonic)
    published: asyncio.Lock = field(default_factory=asyncio.Lock)  # publishes in order: progress never goes back
    last_published: JobRecord | None = None


class JobRunner:
    def __init__(self, stages: StageHandles, store: JobStore, queue, cfg, webhooks=None):
        self.store, self.queue, self.cfg, self.jobs = store, queue, cfg, cfg.jobs
        self.calls = StageCalls(stages, cfg.jobs.stage_retries, cfg.jobs.stall_timeout_s)
        self.webhooks = webhooks  # a deployments.webhooks.WebhookSender, or None when none can be signed

    # ---- one delivery -------------------------------------------------------------------------------
    async def handle(self, job_id: str, owner: str) -> str:
        """Run one delivered job; returns what happened. Raises only when S3 or Redis cannot be reached,
        so that Celery delivers the message again later (the job's outcome, if any, waits in Redis).

        1. an outcome S3 missed last time: write it; 2. the S3 record is terminal: a duplicate delivery;
        3. cancelled while queued; 4. claim (a live lease elsewhere: a duplicate); 5. out of attempts: dead
        letter; 6. run, renewing the lease, and record the outcome.
        """
        q = self.queue
        info = await asyncio.to_thread(q.info, job_id)
        if "outcome" in info:
            return await self._record(JobRecord.model_validate_json(info["outcome"]), owner="")
        record = await asyncio.to_thread(self.store.get, job_id)
        if record.is_terminal():  # (a run that ended while Redis was away left its live copy behind: mend it)
            await self._publish(record)
            await asyncio.to_thread(q.release, job_id)
            await asyncio.to_thread(q.finish, job_id, record.state)
            return f"duplicate delivery: already {record.state}"
        if "cancel" in info:
            await asyncio.to_thread(q.release, job_id)
            return await self._record(self._ended(record, "cancelled"), owner="")
        attempt = await asyncio.to_thread(q.claim, job_id, owner, self.jobs.lease_s)
        if attempt == 0:
            return "duplicate delivery: another runner holds its lease"
        await asyncio.to_thread(q.release, job_id)  # it leaves the line (a no-op on later attempts)
        now = time.time()
        record = self._with(record, attempts=attempt, state="running", started_at=now,
                            queue_wait_s=record.queue_wait_s or round(now - record.created_at, 3))
        if attempt > self.jobs.max_attempts:
            error = (f"the job was started {attempt - 1} times without an outcome "
                     f"(max_attempts {self.jobs.max_attempts})")
            await asyncio.to_thread(q.bury, job_id, error, attempt - 1)
            m.inc("imagine_jobs_dead_total")
            return await self._record(self._ended(record, "failed", error, "retries_exhausted"), owner)
        self._notify(record, "start")
        job = RunningJob(record, owner, level=int(info.get("level", 0)))
        run = asyncio.ensure_future(self._run(job))
        lease = asyncio.ensure_future(self._keep_lease(job, run))
        try:
            final = await run
        except asyncio.CancelledError:
            if job.lost:  # the run was stopped because another runner has the job now
                return "lease lost: the job runs elsewhere"
            raise
        finally:
            lease.cancel()
        return await self._record(final, owner)

    async def _keep_lease(self, job: RunningJob, run: asyncio.Future) -> None:
        """Renew the lease every lease_s / 3; stop the run when the lease is lost or a cancel was asked for."""
        q, job_id = self.queue, job.record.id
        while not run.done():
            await asyncio.sleep(self.jobs.lease_s / 3)
            try:
                if not await asyncio.to_thread(q.renew, job_id, job.owner, self.jobs.lease_s):
                    logger.warning("job %s: lease lost (redelivered elsewhere); stopping this run", job_id)
                    job.lost = True
                    run.cancel()
                elif await asyncio.to_thread(q.cancel_requested, job_id):
                    job.cancel_requested = True
                    run.cancel()
            except Exception as e:  # Redis away for a moment: the lease may expire; the job runs on
                logger.warning("job %s: lease renewal failed: %s", job_id, e)

    # ---- the run ------------------------------------------------------------------------------------
    async def _run(self, job: RunningJob) -> JobRecord:
        """The job through the stages within its deadline; the terminal record (never raises for the job)."""
        stage = lambda: job.record.stage  # noqa: E731  (read at the time of the failure)
        try:
            await asyncio.wait_for(self._pipeline(job), self.jobs.deadline_s)
            return job.record
        except (asyncio.CancelledError, JobCancelled):
            if job.lost:
                raise
            return self._ended(job.record, "cancelled")
        except asyncio.TimeoutError:
            return self._ended(job.record, "failed", f"ran past its deadline of {self.jobs.deadline_s:.0f}s "
                                                      f"(in stage {stage()})", "timeout")
        except StorageError as e:
            return self._ended(job.record, "failed", f"storage error in stage {stage()}: {e}", "storage_error")
        except Exception as e:  # a stage failed for good (its retries spent), a model raised
            logger.exception("job %s failed", job.record.id)
            return self._ended(job.record, "failed", f"{type(e).__name__} in stage {stage()}: {e}"[:2000],
                               errors.error_type(e))

    async def _pipeline(self, job: RunningJob) -> None:
        from pipeline.generate import make_sample_requests
        from pipeline.request import ResolvedRequest
        c, record = self.calls, job.record
        req = ResolvedRequest.model_validate({k: v for k, v in record.request.items() if k != "model"})
        if req.upscale_only:
            return await self._upscale_stored(job, req)
        init = await self._stored_image(req.init_key, req.sample_width, req.sample_height) if req.init_key else None
        # 1. text encoding: prompt and negative prompt, batched with other jobs' prompts
        await self._update(job, force=True, stage="text_encoder", progress=progress_at("text_encoder"))
        emb = await c.encode(req.prompt, req.negative_prompt)
        # 2. sampling: one streamed request per candidate image, at the job's priority
        await self._update(job, force=True, stage="diffuser", progress=progress_at("diffuser"))
        first = [True]

        async def on_progress(fraction: float) -> None:
            if first[0]:
                first[0] = False
                m.observe("imagine_job_queue_wait_seconds", time.time() - record.created_at)
            await self._update(job, progress=progress_at("diffuser", fraction))
        pixels = await c.sample(make_sample_requests(req, emb, init), job.level, on_progress)
        seeds, scores = req.seeds(), [None] * req.num_candidates
        # 3. best_of: CLIP keeps the n best candidates, best first
        if req.best_of > 1:
            order, all_scores = await c.rank(pixels, req.prompt)
            keep = order[:req.n]
            pixels, seeds, scores = pixels[keep], [seeds[k] for k in keep], [all_scores[k] for k in keep]
        # 4.-5. upscaling (batched across jobs) chained to publishing: the PNGs to S3 (the same keys on a rerun)
        await self._update(job, force=True, stage="upscaler", progress=progress_at("upscaler"))
        meta = [{"seed": seed, "steps": req.steps, "guidance_scale": req.guidance_scale, "scheduler": req.scheduler,
                 "model": record.request.get("model"), "width": req.width, "height": req.height,
                 "upscale": req.upscale, "score": score} for seed, score in zip(seeds, scores)]
        images = await c.upscale_and_publish(record.id, pixels, req.upscale, meta, self._publishing(job))
        job.record = self._with(job.record, state="succeeded", stage="done", progress=1.0, images=images)

    async def _upscale_stored(self, job: RunningJob, req) -> None:
        """An upscale job (Midjourney's U): a stored image through the Upscaler, no sampling."""
        await self._update(job, force=True, stage="upscaler", progress=progress_at("upscaler"))
        png = await asyncio.to_thread(self.store.storage.get_bytes, req.init_key)
        import io

        from PIL import Image
        w, h = Image.open(io.BytesIO(png)).size
        image = await self._stored_image(req.init_key, w, h, png)
        meta = [{"seed": req.seed, "model": job.record.request.get("model"), "width": w * req.upscale_only,
                 "height": h * req.upscale_only, "upscale": req.upscale_only, "source": req.init_key}]
        images = await self.calls.upscale_and_publish(job.record.id, image[None], req.upscale_only, meta,
                                                      self._publishing(job))
        job.record = self._with(job.record, state="succeeded", stage="done", progress=1.0, images=images)

    def _publishing(self, job: RunningJob):
        """The job's stage becomes `publisher` when its images reach the Publisher (once per run)."""
        async def on_publishing() -> None:
            if job.record.stage != "publisher":
                await self._update(job, force=True, stage="publisher", progress=progress_at("publisher"))
        return on_publishing

    async def _stored_image(self, key: str, width: int, height: int, png: bytes | None = None):
        """A stored PNG as a (3, height, width) tensor (the start of an image-to-image job)."""
        from pipeline.generate import image_tensor
        png = png if png is not None else await asyncio.to_thread(self.store.storage.get_bytes, key)
        return image_tensor(png, width, height)

    async def _update(self, job: RunningJob, force: bool = False, **fields) -> None:
        """The record changes: every Ingress sees it at once (Redis); S3 on stage and state changes."""
        job.record = self._with(job.record, **fields)
        async with job.published:  # the latest record when our turn comes, so the stream never goes back
            if job.record is not job.last_published:
                job.last_published = job.record
                await self._publish(job.record)
                self._notify(job.record, "progress")
        if force:
            stored = await asyncio.to_thread(self.store.update, job.record.id, **self._durable(job.record))
            if stored.state == "cancelled":
                raise JobCancelled(job.record.id)

    # ---- outcomes -----------------------------------------------------------------------------------
    async def _record(self, final: JobRecord, owner: str) -> str:
        """The outcome: kept in Redis and shown to clients at once, the lease ended, then written to S3. If S3 is
        away the StorageError goes up to Celery, whose retry of the message writes it later (nothing runs again)."""
        q = self.queue
        await self._safely(q.keep_outcome, final.id, final.model_dump_json())
        await self._publish(final)
        await self._safely(q.finish, final.id, final.state, owner)
        stored = await asyncio.to_thread(self._store_outcome, final)
        await self._safely(q.drop_outcome, final.id)
        if stored.state != final.state:  # S3 had it ended already (a cancel that won the race)
            await self._publish(stored)
        self._notify(self._with_urls(stored), "completed")
        m.inc("imagine_jobs_finished_total", state=stored.state)
        if stored.state == "succeeded":
            m.observe("imagine_job_latency_seconds", time.time() - stored.created_at)
        return stored.state

    def _store_outcome(self, final: JobRecord) -> JobRecord:
        """The terminal record into S3 (a record already terminal there, e.g. cancelled, stays as it is)."""
        return self.store.update(final.id, **self._durable(final), images=final.images, error=final.error,
                                 error_type=final.error_type)

    @staticmethod
    def _durable(record: JobRecord) -> dict:
        return {k: getattr(record, k) for k in ("state", "stage", "progress", "attempts", "started_at",
                                                 "queue_wait_s")}

    @staticmethod
    def _with(record: JobRecord, **fields) -> JobRecord:
        return JobRecord.model_validate({**record.model_dump(), **fields, "updated_at": time.time()})

    def _ended(self, record: JobRecord, state: str, error: str | None = None, error_type: str | None = None
               ) -> JobRecord:
        if state == "failed":
            logger.warning("job %s failed (%s): %s", record.id, error_type, error)
        return self._with(record, state=state, error=error, error_type=error_type)

    def _notify(self, record: JobRecord, event: str) -> None:
        """The job's webhook, if it has one (never blocks, never raises: deployments/webhooks.py)."""
        if self.webhooks is not None and record.webhook:
            self.webhooks.notify(record.id, record.webhook, record.key_id, event, record.model_dump(mode="json"),
                                 events=record.webhook_events_filter)

    def _with_urls(self, record: JobRecord) -> JobRecord:
        try:
            return self.store.with_urls(record)
        except StorageError:
            return record

    async def _publish(self, record: JobRecord) -> None:
        await self._safely(self.queue.publish, record.id, record.model_dump(mode="json"))

    @staticmethod
    async def _safely(fn, *args) -> None:
        """A Redis call that must not stop the job (progress, cleanup): logged and skipped when Redis is away."""
        try:
            await asyncio.to_thread(fn, *args)
        except Exception as e:
            logger.warning("redis: %s failed: %s", getattr(fn, "__name__", fn), e)

    # ---- the queue's numbers as metrics ---------------------------------------------------------------
    async def export_queue_metrics(self, every_s: float = 2.0) -> None:
        """imagine_queue_depth{priority}, imagine_queue_oldest_seconds, imagine_jobs{state} from the queue's
        bookkeeping (every runner replica exports the same queue-wide values)."""
        while True:
            try:
                stats = await asyncio.to_thread(self.queue.stats)
                for tier, n in stats["queued"].items():
                    m.set_gauge("imagine_queue_depth", n, priority=tier)
                m.set_gauge("imagine_queue_oldest_seconds", stats["oldest_queued_s"])
                m.set_gauge("imagine_jobs", sum(stats["queued"].values()), state="queued")
                m.set_gauge("imagine_jobs", stats["running"], state="running")
            except Exception as e:
                logger.debug("queue metrics: %s", e)
            await asyncio.sleep(every_s)
