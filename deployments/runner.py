"""The job runner: drives one job through the graph and records its outcome.

    TextEncoder -> Diffuser (streamed per-step progress) -> [CLIP rank, best_of] -> Upscaler -> Publisher

The job record in S3 is the source of truth; `ActiveJob` keeps the record of a job being run in memory for
progress and SSE, and writes it to S3 at most every PERSIST_EVERY_S (stage and state changes at once).
Overall progress follows the named plan of cluster/jobs.py (`progress_at`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from cluster.jobs import JobRecord, JobStore, progress_at
from cluster.storage import StorageError
from pipeline.request import ResolvedRequest

from . import errors
from . import metrics as m

logger = logging.getLogger(__name__)
PERSIST_EVERY_S = 5.0  # progress in S3 (read by other replicas) lags at most this; stage changes are written at once


class JobCancelled(Exception):
    pass


@dataclass
class ActiveJob:
    """A job this process runs: its record (ahead of S3 by at most PERSIST_EVERY_S) and who is waiting on it."""
    record: JobRecord
    task: asyncio.Task | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    persisted_at: float = 0.0
    accepted_at: float = field(default_factory=time.monotonic)
    waited: bool = False  # the queue wait (acceptance to first denoising step) has been observed


@dataclass(frozen=True)
class StageHandles:
    """The Serve handles of the four stages."""
    text_encoder: object
    diffuser: object
    upscaler: object
    publisher: object


class JobRunner:
    def __init__(self, stages: StageHandles, store: JobStore, model_name: str, request_timeout_s: float,
                 stall_timeout_s: float):
        self.stages, self.store, self.model_name = stages, store, model_name
        self.request_timeout_s, self.stall_timeout_s = request_timeout_s, stall_timeout_s

    async def run(self, job: ActiveJob, req: ResolvedRequest) -> None:
        """Run the job to an outcome (succeeded, failed with a reason, or cancelled), recorded in S3."""
        try:
            await asyncio.wait_for(self._pipeline(job, req), self.request_timeout_s)
        except (asyncio.CancelledError, JobCancelled):
            job.record = await self._safe(self.store.cancel, job.record.id) or job.record.model_copy(
                update={"state": "cancelled"})
        except asyncio.TimeoutError:
            await self._fail(job, f"timed out after {self.request_timeout_s:.0f}s in stage {job.record.stage}",
                             "timeout")
        except StorageError as e:
            await self._fail(job, f"storage error: {e}", "storage_error")
        except Exception as e:  # a replica died, a model raised: the job fails with the reason
            logger.exception("job %s failed", job.record.id)
            await self._fail(job, f"{type(e).__name__} in stage {job.record.stage}: {e}"[:2000], errors.error_type(e))
        finally:
            job.changed.set()
            state = job.record.state if job.record.is_terminal() else "failed"
            m.inc("imagine_jobs_finished_total", state=state)
            if state == "succeeded":
                m.observe("imagine_job_latency_seconds", time.monotonic() - job.accepted_at)

    async def _pipeline(self, job: ActiveJob, req: ResolvedRequest) -> None:
        import torch

        from pipeline.generate import make_sample_requests
        from pipeline.text_encoder import PromptEmbeds
        s = self.stages
        # 1. text encoding: prompt and negative prompt, batched with other jobs' prompts
        await self._update(job, state="running", stage="text_encoder", progress=progress_at("text_encoder"),
                           force=True)
        (pe, pp), (ne, np_) = await asyncio.gather(s.text_encoder.encode.remote(req.prompt),
                                                   s.text_encoder.encode.remote(req.negative_prompt))
        emb = PromptEmbeds(prompt_embeds=torch.stack([pe, ne]), pooled=torch.stack([pp, np_]))
        # 2. sampling: one streamed request per candidate image
        await self._update(job, stage="diffuser", progress=progress_at("diffuser"), force=True)
        pixels = await self._sample(job, make_sample_requests(req, emb))
        seeds, scores = req.seeds(), [None] * req.num_candidates
        # 3. best_of: CLIP keeps the n best candidates, best first
        if req.best_of > 1:
            order, all_scores = await s.text_encoder.rank.remote(pixels, req.prompt)
            keep = order[:req.n]
            pixels, seeds, scores = pixels[keep], [seeds[k] for k in keep], [all_scores[k] for k in keep]
        # 4. upscaling, one image per call (batched across jobs)
        await self._update(job, stage="upscaler", progress=progress_at("upscaler"), force=True)
        images = torch.stack(await asyncio.gather(*[s.upscaler.upscale.remote(p, req.upscale) for p in pixels]))
        # 5. publishing: PNGs + metadata to S3, then the job record
        await self._update(job, stage="publisher", progress=progress_at("publisher"), force=True)
        meta = [{"prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": seed, "steps": req.steps,
                 "guidance_scale": req.guidance_scale, "scheduler": req.scheduler, "model": self.model_name,
                 "width": req.width, "height": req.height, "upscale": req.upscale, "score": score}
                for seed, score in zip(seeds, scores)]
        records = await s.publisher.publish.remote(job.record.id, images, meta)
        await self._update(job, state="succeeded", stage="done", progress=1.0, images=records, force=True)

    async def _sample(self, job: ActiveJob, sample_requests: list):
        import torch
        progress = [0.0] * len(sample_requests)
        images = [None] * len(sample_requests)
        stall = self.stall_timeout_s

        async def consume(i: int, sr) -> None:
            stream = self.stages.diffuser.options(stream=True).sample.remote(sr)
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
                    raise errors.StageStalled(f"no progress from the Diffuser for {stall:.0f}s "
                                              "(its replica may have died)") from None
                if "image" in event:
                    images[i] = event["image"]
                else:
                    if not job.waited:
                        job.waited = True
                        m.observe("imagine_job_queue_wait_seconds", time.monotonic() - job.accepted_at)
                    progress[i] = event["progress"]
                    await self._update(job, progress=progress_at("diffuser", sum(progress) / len(progress)))

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
