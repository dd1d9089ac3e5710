"""The one error classifier: an exception -> a bounded reason (the metrics' `reason` label) and the
`error_type` a failed job records. Both come from `reason()`, so a stage's error counter and the job it
failed always agree.

    reason(ActorDiedError(...)) == "replica_failure";  error_type(StorageError(...)) == "storage_error"
"""
from __future__ import annotations

import asyncio

REASONS = ("cancelled", "timeout", "invalid_request", "storage", "out_of_memory", "replica_failure", "internal")
# reason -> the job record's error_type (what clients see)
JOB_ERROR_TYPES = {"cancelled": "cancelled", "timeout": "timeout", "invalid_request": "invalid_request",
                   "storage": "storage_error", "out_of_memory": "out_of_memory",
                   "replica_failure": "replica_failure", "internal": "generation_error"}
_REPLICA_DEATH = ("ActorDied", "ActorError", "ActorUnavailable", "Unavailable", "Stalled", "WorkerCrashed",
                  "NodeDied", "ObjectLost", "OwnerDied")


class StageStalled(RuntimeError):
    """A stage's stream sent nothing, not even a heartbeat, for too long: its replica is presumed dead."""


def reason(e: BaseException) -> str:
    """A bounded reason for an exception (see REASONS)."""
    name = type(e).__name__
    if isinstance(e, asyncio.CancelledError) or "Cancel" in name:
        return "cancelled"
    if any(w in name for w in _REPLICA_DEATH):
        return "replica_failure"
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)) or "Timeout" in name:
        return "timeout"
    if "InvalidRequest" in name or isinstance(e, ValueError):
        return "invalid_request"
    if "Storage" in name or "ClientError" in name or "EndpointConnection" in name:
        return "storage"
    if "OutOfMemory" in name or isinstance(e, MemoryError):
        return "out_of_memory"
    return "internal"


def error_type(e: BaseException) -> str:
    """The error_type a job records when `e` ends it."""
    return JOB_ERROR_TYPES[reason(e)]


def is_replica_failure(e: BaseException) -> bool:
    """True for errors that mean the replica (or its node) went away, not that the request was bad."""
    return reason(e) == "replica_failure"


def is_broker_error(e: BaseException) -> bool:
    """True when the job queue's Redis could not be reached (connection refused or lost, timeouts)."""
    import redis
    from kombu.exceptions import OperationalError
    return isinstance(e, (redis.ConnectionError, redis.TimeoutError, OperationalError, ConnectionError, TimeoutError))
