"""The step scheduler of continuous batching: which requests run the next denoising step.

Pure Python (no torch, no Ray), after vLLM's split: the scheduler decides, the loop runs the model, and
the scheduler retires what finished. One engine step is three calls:

    out = scheduler.schedule()          # admits waiting requests, returns what steps now (plain data)
    ... start the sampler state of each of out.admitted, step every entry of out.running ...
    scheduler.retire(finished)          # done (or failed) requests leave; their slots free at once

A request is an `Entry` that moves WAITING -> RUNNING -> FINISHED, or to CANCELLED (its caller went away)
or FAILED (its own start or step failed). The waiting queue is ordered by priority (lower first), then by
arrival. Policy, all of it here:
- `max_batch_size`: at most this many images run in one step (one entry is one image);
- `join`: `every_step` admits waiting requests at every step boundary while there is room; `when_empty`
  only once the running batch has drained;
- cancelling a waiting request removes it; a running one leaves at the next `schedule()`.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

JoinPolicy = Literal["every_step", "when_empty"]


class Status(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(eq=False)
class Entry:
    """One request (one image) in the scheduler; `state` is the loop's (the sampler state), opaque here."""
    request: Any
    priority: int = 0
    seq: int = 0
    arrived_at: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    state: Any = None

    @property
    def finished(self) -> bool:
        return self.status in (Status.FINISHED, Status.CANCELLED, Status.FAILED)


@dataclass
class SchedulerOutput:
    """What the loop does this step: start `admitted` (they are in `running` too), then step `running`."""
    admitted: list[Entry]
    running: list[Entry]


class StepScheduler:
    def __init__(self, max_batch_size: int = 16, join: JoinPolicy = "every_step"):
        self.waiting: list[Entry] = []
        self.running: list[Entry] = []
        self._seq = itertools.count()
        self.configure(max_batch_size, join)

    def configure(self, max_batch_size: int, join: JoinPolicy) -> None:
        """Change the policy in place (applies from the next `schedule()`)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) must be >= 1")
        if join not in ("every_step", "when_empty"):
            raise ValueError(f"join must be 'every_step' or 'when_empty', got {join!r}")
        self.max_batch_size, self.join = max_batch_size, join

    # ---- requests come and go -------------------------------------------------------------------
    def add(self, request: Any, priority: int = 0) -> Entry:
        """A new waiting request; it runs from the first `schedule()` that has room for it."""
        entry = Entry(request, priority=priority, seq=next(self._seq))
        self.waiting.append(entry)
        self.waiting.sort(key=lambda e: (e.priority, e.seq))
        return entry

    def cancel(self, entry: Entry) -> None:
        """The caller went away: a waiting entry leaves now, a running one at the next `schedule()`."""
        if entry.finished:
            return
        if entry.status is Status.WAITING:
            self.waiting.remove(entry)
        entry.status = Status.CANCELLED

    def fail(self, entry: Entry) -> None:
        """The entry's own start or step failed: it leaves (the others go on)."""
        if entry.status is Status.WAITING:
            self.waiting.remove(entry)
        entry.status = Status.FAILED
        self._drop_finished()

    def retire(self, entries: list[Entry]) -> None:
        """These entries are done: they leave the running batch and free their slots."""
        for e in entries:
            if not e.finished:
                e.status = Status.FINISHED
        self._drop_finished()

    # ---- the decision of each step --------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Drop cancelled entries, admit waiting ones as the policy allows; what runs this step."""
        self._drop_finished()
        admitted: list[Entry] = []
        if self.join == "every_step" or not self.running:
            room = self.max_batch_size - len(self.running)
            admitted, self.waiting = self.waiting[:max(room, 0)], self.waiting[max(room, 0):]
            for e in admitted:
                e.status = Status.RUNNING
            self.running += admitted
        return SchedulerOutput(admitted=admitted, running=list(self.running))

    def position(self, entry: Entry) -> int | None:
        """How many waiting requests are ahead of this one (0 = next); None when it is not waiting."""
        return self.waiting.index(entry) if entry.status is Status.WAITING else None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _drop_finished(self) -> None:
        self.running = [e for e in self.running if not e.finished]
