"""Job records: one JSON object per job at jobs/<job_id>.json in S3, the source of truth for that job.

A job moves queued -> running -> succeeded | failed | cancelled. The three last states are terminal: once a
record is terminal, `JobStore.update`, `mark_failed` and `cancel` leave it as it is and return it, so a job
cancelled while the diffuser runs stays cancelled when the publisher later reports success.

Every update is a read-modify-write guarded by the object's ETag (a conditional PUT, If-Match); when another
writer got in between, the update is redone on the fresh record. So a cancel and a stage update that race
never lose each other's effect.

    store = JobStore(Storage.from_config(cfg.storage))
    job = store.create({"prompt": "a red circle", "n": 4, ...})
    store.update(job.id, state="running", stage="diffuser", progress=0.4)
    store.cancel(job.id)
"""
from __future__ import annotations

import builtins
import logging
import re
import secrets
import time
from enum import StrEnum
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.config import STAGES
from cluster.storage import KeyNotFound, PreconditionFailed, Storage, job_key

logger = logging.getLogger(__name__)

JOB_ID = re.compile(r"img_[0-9a-f]{24}")
JOB_STAGES = ("queued", *STAGES, "done")  # where a job is: waiting, in one of the pipeline's stages, or done
Stage = Literal[JOB_STAGES]

# The progress plan: the part of a job's overall progress (0..1) that each stage spans. The runner reports
# `progress_at(stage, fraction_of_that_stage)`, clients (the CLI's bar, the bench) read the same marks.
STAGE_PROGRESS: dict[str, tuple[float, float]] = {
    "queued": (0.0, 0.0), "text_encoder": (0.02, 0.05), "diffuser": (0.05, 0.85), "upscaler": (0.88, 0.94),
    "publisher": (0.94, 1.0), "done": (1.0, 1.0)}
assert tuple(STAGE_PROGRESS) == JOB_STAGES


def progress_at(stage: str, fraction: float = 0.0) -> float:
    """A job's overall progress when `fraction` (0..1) of `stage` is done."""
    start, end = STAGE_PROGRESS[stage]
    return start + (end - start) * min(max(fraction, 0.0), 1.0)
_SECRET_WORDS = ("secret", "password", "credential", "access_key", "api_key")
_MAX_CONFLICTS = 20  # conditional-write retries before update() gives up


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})


class JobNotFound(KeyError):
    """No job with this id (or the id is not a job id at all)."""

    def __str__(self) -> str:  # KeyError's str() would add quotes
        return str(self.args[0]) if self.args else "job not found"


def new_job_id() -> str:
    return "img_" + secrets.token_hex(12)


def check_job_id(job_id: Any) -> str:
    """job_id if it is "img_" + 24 lowercase hex characters, else JobNotFound (so no key is built from it)."""
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise JobNotFound(f"no job {str(job_id)[:80]!r}: job ids look like img_ followed by 24 hex digits")
    return job_id


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageRecord(_Record):
    key: str  # images/<job_id>/<index>.png
    url: str | None = None  # presigned GET URL, filled in when served (JobStore.with_urls), never stored
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    seed: int
    score: float | None = None  # CLIP score when best_of > 1


class JobRecord(_Record):
    id: str = Field(pattern=JOB_ID.pattern)
    state: JobState = JobState.queued
    stage: Stage | None = "queued"
    progress: float = Field(0.0, ge=0.0, le=1.0)
    created_at: float  # unix seconds
    updated_at: float  # unix seconds
    request: dict[str, Any]  # the resolved request: prompt, negative_prompt, n, width, height, steps, ...
    images: list[ImageRecord] = Field(default_factory=list)
    error: str | None = None
    error_type: str | None = None
    priority: Literal["fast", "relax"] = "fast"
    key_id: str | None = None  # a hash of the API key that submitted it (never the key)
    attempts: int = Field(0, ge=0)  # runs started (a runner that died counts one)
    started_at: float | None = None  # unix seconds, when its current run started (queueing ends)
    queue_wait_s: float | None = None  # created_at to the first start
    action: Literal["imagine", "upscale", "vary", "reroll", "img2img"] = "imagine"
    parent_id: str | None = Field(None, pattern=JOB_ID.pattern)  # the job an upscale/vary/reroll started from
    children: list[str] = Field(default_factory=list)  # jobs started from this one (newest last)
    webhook: str | None = None  # the URL that gets this record on the chosen events (webhook_events_filter)
    webhook_events_filter: list[str] | None = None

    @field_validator("request")
    @classmethod
    def _no_credentials(cls, v: dict[str, Any]) -> dict[str, Any]:
        leaked = [k for k in v if any(w in k.lower() for w in _SECRET_WORDS)]
        if leaked:
            raise ValueError(f"request holds credential-like fields {leaked}; job records must not store them")
        return v

    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class JobStore:
    """Job records in S3 through a Storage (see the module docstring for the rules)."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def __repr__(self) -> str:
        return f"JobStore({self.storage!r})"

    def create(self, request: dict[str, Any], job_id: str | None = None, **fields: Any) -> JobRecord:
        """A new queued job for the resolved request, written to jobs/<id>.json (a new id unless given)."""
        now = time.time()
        record = JobRecord(id=job_id or new_job_id(), created_at=now, updated_at=now, request=request, **fields)
        self.storage.put_json(job_key(record.id), _stored(record), if_none_match=True)
        return record

    def get(self, job_id: str) -> JobRecord:
        """The stored record. Raises JobNotFound for an unknown or malformed id."""
        return self._read(job_id)[0]

    def put(self, record: JobRecord) -> JobRecord:
        """Write a whole record as is (no terminal-state check; use update for that); sets updated_at."""
        record = record.model_copy(update={"updated_at": time.time()})
        self.storage.put_json(job_key(check_job_id(record.id)), _stored(record))
        return record

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Set fields on the stored record and return it; a terminal record is returned unchanged.

        Raises:
            JobNotFound: no such job.
            ValueError: an unknown field, id or created_at, or a value the record does not accept.
        """
        fixed = {"id", "created_at", "updated_at"} & fields.keys()
        if fixed:
            raise ValueError(f"update() cannot change {sorted(fixed)}")
        def change(record: JobRecord) -> JobRecord | None:
            if record.is_terminal():
                if fields:
                    logger.info("job %s is %s; ignoring update %s", job_id, record.state, sorted(fields))
                return None
            return JobRecord.model_validate({**record.model_dump(), **fields, "updated_at": time.time()})
        return self._modify(job_id, change, f"update({sorted(fields)})")

    def add_child(self, job_id: str, child_id: str) -> JobRecord:
        """Note a job started from this one (its state does not matter: children come after the parent ends)."""
        check_job_id(child_id)
        return self._modify(job_id, lambda r: None if child_id in r.children else
                            r.model_copy(update={"children": [*r.children, child_id]}), "add_child")

    def _modify(self, job_id: str, change: Callable[[JobRecord], JobRecord | None], what: str) -> JobRecord:
        """Read the record, `change` it (None: leave it as it is) and write it back under its ETag; again while
        another writer got there first, at most _MAX_CONFLICTS times."""
        for _ in range(_MAX_CONFLICTS):
            record, etag = self._read(job_id)
            if (new := change(record)) is None:
                return record
            try:
                self.storage.put_json(job_key(job_id), _stored(new), if_match=etag)
                return new
            except PreconditionFailed:
                logger.debug("job %s changed during %s; retrying", job_id, what)
        raise RuntimeError(f"job {job_id}: {_MAX_CONFLICTS} concurrent writers in a row beat {what}")

    def mark_failed(self, job_id: str, error: str, error_type: str) -> JobRecord:
        """Record why a job failed (unless it already ended)."""
        return self.update(job_id, state=JobState.failed, error=error, error_type=error_type)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job that has not ended; returns the record (unchanged if it already ended)."""
        return self.update(job_id, state=JobState.cancelled)

    def list(self, prefix: str = "") -> builtins.list[JobRecord]:
        """Records whose id starts with prefix (e.g. "img_3f"), newest first; reads one object per job."""
        if not re.fullmatch(r"[a-z0-9_]*", prefix):
            raise ValueError(f"prefix {prefix!r} must be a job id prefix (lowercase letters, digits, '_')")
        records = []
        for key in self.storage.list_keys(f"jobs/{prefix}"):
            job_id = key.removeprefix("jobs/").removesuffix(".json")
            if JOB_ID.fullmatch(job_id):
                try:
                    records.append(self.get(job_id))
                except JobNotFound:  # deleted since it was listed
                    pass
        return sorted(records, key=lambda r: r.created_at, reverse=True)

    def with_urls(self, record: JobRecord, expires_s: int | None = None) -> JobRecord:
        """A copy of record whose images carry presigned GET URLs (for serving; not stored)."""
        images = [im.model_copy(update={"url": self.storage.presigned_url(im.key, expires_s)})
                  for im in record.images]
        return record.model_copy(update={"images": images})

    def _read(self, job_id: str) -> tuple[JobRecord, str]:
        key = job_key(check_job_id(job_id))
        try:
            data, etag = self.storage.get_json_etag(key)
        except KeyNotFound:
            raise JobNotFound(f"no job {job_id!r}") from None
        return JobRecord.model_validate(data), etag


def _stored(record: JobRecord) -> dict[str, Any]:
    """The record as stored: JSON types, image URLs left out (they expire; with_urls makes fresh ones)."""
    return record.model_dump(mode="json", exclude={"images": {"__all__": {"url"}}})
