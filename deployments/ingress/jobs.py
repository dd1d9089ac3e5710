"""How a request becomes a queued job: checks against the model and the limits, queue admission (429 beyond it),
the record in S3, its live copy and the message; and the Midjourney workflow's child jobs.

    imagine   a prompt (optionally from an image: `init_image` + `strength`, action img2img)
    upscale   U: one image of a job through the Upscaler again, larger, no sampling
    vary      V: four images that start from one image of a job (SDEdit at `strength`: 0.3 subtle, 0.6 strong)
    reroll    the same prompt and settings, new seeds

Every child is an ordinary job on the same queue (metrics, cancel, SSE), with `parent_id` and `action`; the
parent lists it in `children`. Only the key that made a job may start children from it or use its images.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import secrets

from cluster.jobs import JobNotFound, JobRecord, new_job_id
from cluster.storage import StorageError
from pipeline.request import InvalidRequestError, ResolvedRequest, check_limits

from .. import errors
from .. import metrics as m
from ..queue import enqueue
from .protocol import GenerationBody, NotFound, Overloaded, QueueUnavailable, StorageUnavailable

logger = logging.getLogger(__name__)
RETRY = {"Retry-After": "5"}
UPSCALE_FACTOR = 2          # U: twice the delivered size
MAX_UPLOAD_SIDE = 2048      # an uploaded init image


async def call_storage(fn, *args, **kwargs):
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except JobNotFound:
        raise
    except StorageError as e:
        raise StorageUnavailable(f"storage unavailable: {e}", code="storage_error", headers=RETRY) from e


async def call_redis(fn, *args, required: bool = False):
    """A queue call; when Redis cannot be reached: 503 with Retry-After if `required`, else None."""
    try:
        return await asyncio.to_thread(fn, *args)
    except Exception as e:
        if not errors.is_broker_error(e):
            raise
        logger.warning("queue broker unavailable: %s", e)
        if required:
            raise QueueUnavailable("the job queue is unavailable; retry later", code="queue_unavailable",
                                   headers=RETRY) from e
        return None


class JobMaker:
    def __init__(self, cfg, info, store, queue, producer, key_tiers: dict, webhooks_on: bool):
        self.cfg, self.info, self.store, self.queue, self.producer = cfg, info, store, queue, producer
        self.key_tiers, self.webhooks_on = key_tiers, webhooks_on

    # ---- a new job from a request body --------------------------------------------------------------
    async def imagine(self, body: GenerationBody, key_id: str, default_n: int) -> JobRecord:
        req = body.to_request(default_n)
        check_limits(req, **self.cfg.limits.model_dump())
        resolved = self.info.resolve(req)
        job_id, fields = new_job_id(), await self._webhook_fields(body)
        if body.init_image is not None:
            key = await self._init_key(body.init_image, key_id, job_id)
            resolved = resolved.model_copy(update={"init_key": key, "strength": body.strength or 0.6})
            fields["action"] = "img2img"
        return await self.admit(job_id, resolved, key_id, body.priority, **fields)

    # ---- the workflow's children ------------------------------------------------------------------
    async def child(self, parent: JobRecord, action: str, key_id: str, index: int | None = None,
                    strength: float | None = None) -> JobRecord:
        """U (upscale), V (vary) or reroll of `parent`; `index` counts images from 1, as U1..U4 do."""
        if parent.key_id not in (key_id, None) and key_id != "anonymous":
            raise NotFound(f"no job {parent.id!r}", param="job_id")
        base = ResolvedRequest.model_validate({k: v for k, v in parent.request.items() if k != "model"})
        new_seed = secrets.randbelow(2**32)
        if not parent.is_terminal():  # (its record is the runner's to write until then)
            raise InvalidRequestError("job_id", f"job {parent.id} is still {parent.state}; wait for it to end")
        if action == "reroll":
            resolved = base.model_copy(update={"seed": new_seed})
        else:
            if parent.state != "succeeded" or not 1 <= (index or 0) <= len(parent.images):
                raise InvalidRequestError("index", f"job {parent.id} has {len(parent.images)} images "
                                                   f"({parent.state}); choose 1..{len(parent.images)}")
            image = parent.images[index - 1]
            if action == "upscale":
                resolved = base.model_copy(update={"init_key": image.key, "upscale_only": UPSCALE_FACTOR, "n": 1,
                                                   "best_of": 1, "seed": image.seed})
            else:  # vary
                resolved = base.model_copy(update={"init_key": image.key, "strength": strength or 0.3, "n": 4,
                                                   "best_of": 1, "seed": new_seed, "upscale_only": None})
        record = await self.admit(new_job_id(), resolved, key_id, parent.priority, action=action,
                                  parent_id=parent.id, webhook=parent.webhook,
                                  webhook_events_filter=parent.webhook_events_filter)
        parent = await call_storage(self.store.add_child, parent.id, record.id)
        await call_redis(self.queue.publish, parent.id, parent.model_dump(mode="json"))  # GET shows the child
        return record

    # ---- admission ------------------------------------------------------------------------------
    async def admit(self, job_id: str, resolved: ResolvedRequest, key_id: str, priority: str | None,
                    **fields) -> JobRecord:
        """Admit into the queue (429 beyond its limits), write the record, enqueue; the queued record."""
        tier = priority or self.key_tiers.get(key_id) or self.cfg.queue.default_priority
        admission = await call_redis(self.queue.admit, job_id, key_id, tier, resolved.cost, required=True)
        if not admission.ok:
            total = admission.refused_by == "total"
            limit = self.queue.max_queued_cost if total else self.queue.max_queued_cost_per_key
            wait = await call_redis(self.queue.retry_after_s, admission.queued_cost + resolved.cost - limit) or 10
            whose = "the queue" if total else "the queued jobs of this API key"
            raise Overloaded(f"{whose} already hold {admission.queued_cost} image-steps (limit {limit}); this job "
                             f"needs {resolved.cost} (n x best_of x steps); retry later", code="queue_full",
                             headers={"Retry-After": str(wait)})
        try:
            request = {**resolved.model_dump(), "model": self.info.spec.name}
            record = await call_storage(self.store.create, request, job_id, priority=tier, key_id=key_id, **fields)
            await call_redis(self.queue.publish, job_id, record.model_dump(mode="json"), required=True)
            await call_redis(self.queue.index_job, key_id, job_id, record.created_at)
            await call_redis(enqueue, self.producer, job_id, admission.level, required=True)
        except BaseException:
            await call_redis(self.queue.release, job_id)
            raise
        m.inc("imagine_jobs_submitted_total")
        return record

    # ---- inputs ---------------------------------------------------------------------------------
    async def _webhook_fields(self, body: GenerationBody) -> dict:
        if body.webhook is None:
            return {}
        from ..webhooks import validate_events_filter, validate_webhook_url
        if not self.webhooks_on:
            raise InvalidRequestError("webhook", "this server has no webhook secret configured (webhooks.secret_env "
                                                 "or webhooks.secret_file), so it cannot sign webhooks")
        url = await asyncio.to_thread(validate_webhook_url, body.webhook, self.cfg.webhooks.allowed_hosts)
        events = validate_events_filter(body.webhook_events_filter)
        return {"webhook": url, "webhook_events_filter": list(events)}

    async def _init_key(self, init, key_id: str, job_id: str) -> str:
        """The S3 key of an init image: one of this key's images, or an uploaded PNG (stored as uploads/<job>)."""
        if init.job_id is not None:
            try:
                source = await call_storage(self.store.get, init.job_id)
            except JobNotFound:
                raise InvalidRequestError("init_image", f"no job {init.job_id!r}") from None
            if (source.key_id not in (key_id, None) and key_id != "anonymous") or \
                    not 1 <= (init.index or 0) <= len(source.images):
                raise InvalidRequestError("init_image", f"job {init.job_id} has no image {init.index} of yours")
            return source.images[init.index - 1].key
        png = _checked_png(init.png_base64)
        key = f"uploads/{job_id}.png"
        await call_storage(self.store.storage.put_bytes, key, png, "image/png")
        return key


def _checked_png(data: str) -> bytes:
    """A base64 PNG, decoded and checked: a real PNG, RGB(A) or grey, each side within 8..MAX_UPLOAD_SIDE."""
    from PIL import Image, UnidentifiedImageError
    try:
        png = base64.b64decode(data.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("init_image", "png_base64 is not base64") from None
    try:
        with Image.open(io.BytesIO(png)) as img:
            fmt, (w, h) = img.format, img.size
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise InvalidRequestError("init_image", "png_base64 is not a readable image") from None
    if fmt != "PNG":
        raise InvalidRequestError("init_image", f"the image must be a PNG, got {fmt}")
    if not (8 <= w <= MAX_UPLOAD_SIDE and 8 <= h <= MAX_UPLOAD_SIDE):
        raise InvalidRequestError("init_image", f"each side must be within 8..{MAX_UPLOAD_SIDE} pixels, got {w}x{h}")
    return png
