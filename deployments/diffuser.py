"""Diffuser deployment: the denoising loop, continuously batched across requests at step boundaries.

`sample(request, priority)` is a streaming method: it yields `{"waiting": n}` at once and then about every
second while the request waits for a slot (n requests ahead of it: a heartbeat, so that a caller can tell a
busy replica from a dead one), `{"progress": p}` as its denoising steps go and finally
`{"image": (3, h, w) tensor}`. One loop per replica runs the engine step of deployments/scheduler.py:
the `StepScheduler` decides which requests step next (admission up to `max_batch_size` images, the `join`
policy, priority, cancellation), this loop starts their sampler states, runs one batched `Sampler.step`
(one UNet call per latent shape, classifier-free-guidance pairs in the same call) on the replica's one torch
thread (off the event loop: deployments/common.py TorchThread),
decodes the finished ones and hands each caller its events. A request joins at the next step boundary and
leaves after its own last step, so a 20-step request never waits behind a 50-step one; a caller that goes
away (a cancelled job, a dropped stream) frees its slot at the next step.
"""
from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from . import metrics as m
from .common import torch_dtype
from .scheduler import Entry, StepScheduler
from .stage import Stage

logger = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.25  # at most one progress event per request this often (and always the last one)
WAITING_EVERY_S = 1.0    # a waiting request's heartbeat


@serve.deployment(name="Diffuser")
class Diffuser(Stage):
    stage_name = "diffuser"

    def load(self) -> None:
        from pipeline.sampler import Sampler
        spec = self.model_spec()
        self.sampler = Sampler.from_pretrained(spec.resolve_path(spec.diffusion), device=self.device,
                                              dtype=torch_dtype(self.device))
        if self.stage.compile != "off":  # every batch-size bucket of the default size compiles now
            from pipeline.compiled import compile_for_spec
            seconds = compile_for_spec(self.sampler, spec, self.stage.compile, 2 * self.stage.max_batch_size)
            logger.info("compiled the UNet (%s) in %.1fs", self.stage.compile, seconds)
        self.scheduler = StepScheduler()
        self._events: dict[Entry, asyncio.Queue] = {}
        self._reported: dict[Entry, float] = {}  # when each request's last progress event went out
        self._beats: dict[Entry, float] = {}     # when each waiting request's last heartbeat went out
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    def configure(self, user_config: dict) -> None:
        self.scheduler.configure(user_config["max_batch_size"], user_config["join"])
        self.batch_wait_timeout_s = user_config["batch_wait_timeout_s"]

    async def sample(self, request, priority: int = 0):
        """Stream heartbeats while waiting, progress events, then the image for one SampleRequest (a lower
        `priority` waits less: the job queue's level)."""
        async with self.metrics.call():
            entry = self.scheduler.add(request, priority)
            events = self._events[entry] = asyncio.Queue()
            self._beats[entry] = time.monotonic()
            self._ensure_loop()
            try:
                yield {"waiting": self.scheduler.position(entry) or 0}
                while True:
                    event = await events.get()
                    if isinstance(event, BaseException):
                        raise event
                    yield event
                    if "image" in event:
                        return
            finally:  # done, or the caller went away (cancelled job, dropped stream): free the slot
                self.scheduler.cancel(entry)
                self._events.pop(entry, None)
                self._reported.pop(entry, None)
                self._beats.pop(entry, None)

    def _ensure_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done() or self._loop_task.get_loop() is not loop:
            self._wake = asyncio.Event()  # (a new event loop: only when the class runs outside Serve)
            self._loop_task = loop.create_task(self._step_loop())
        self._wake.set()

    async def _step_loop(self) -> None:
        try:
            while True:
                await self._wait_for_work()
                await self._engine_step()
        except BaseException as e:  # never leave callers waiting on a loop that died (or was shut down)
            if not isinstance(e, asyncio.CancelledError):
                logger.exception("the step loop stopped")
            for entry in self.scheduler.running + self.scheduler.waiting:
                self._send(entry, RuntimeError(f"the Diffuser's step loop stopped: {e!r}"))
                self.scheduler.cancel(entry)
            raise

    async def _wait_for_work(self) -> None:
        if self.scheduler.running:
            return
        while not self.scheduler.waiting:
            self._wake.clear()
            await self._wake.wait()
        if self.batch_wait_timeout_s > 0 and len(self.scheduler.waiting) < self.scheduler.max_batch_size:
            await asyncio.sleep(self.batch_wait_timeout_s)  # an idle replica gathers a first batch

    async def _engine_step(self) -> None:
        """schedule -> start the admitted -> one batched step -> decode and deliver the finished -> retire."""
        out = self.scheduler.schedule()
        for entry in out.admitted:
            try:
                [entry.state] = await self.torch.run(self.sampler.start, [entry.request])
            except Exception as e:  # a bad request fails alone
                self.scheduler.fail(entry)
                self._send(entry, e)
        running = [e for e in out.running if e.state is not None and not e.finished]
        if not running:
            return
        try:
            self.metrics.batch(len(running))
            await self._step([e.state for e in running])
            done = [e for e in running if e.state.done]
            images = await self.torch.run(self.sampler.finish, [e.state for e in done]) if done else []
        except Exception as e:  # the whole step failed (e.g. out of memory): fail its requests
            logger.exception("denoising step failed for %d requests", len(running))
            for entry in running:
                self.scheduler.fail(entry)
                self._send(entry, e)
            return
        self._report_progress(running)
        self._report_waiting()
        for entry, img in zip(done, images):
            self._send(entry, {"image": img.cpu()})
        m.inc("imagine_images_generated_total", len(done))
        self.scheduler.retire(done)

    async def _step(self, states: list) -> None:
        """One denoising step for every state on the torch thread (the event loop serves the streams meanwhile),
        timed and counted."""
        start = time.perf_counter()
        await self.torch.run(self.sampler.step, states)
        m.observe("imagine_denoising_step_seconds", time.perf_counter() - start)
        m.inc("imagine_denoising_steps_total", len(states))

    def _report_progress(self, running: list[Entry]) -> None:
        """Progress events cost the caller work: not more often than PROGRESS_EVERY_S, and always the last."""
        now = time.monotonic()
        for entry in running:
            if entry.state.done or now - self._reported.get(entry, 0.0) >= PROGRESS_EVERY_S:
                self._reported[entry] = now
                self._send(entry, {"progress": entry.state.progress})

    def _report_waiting(self) -> None:
        """A heartbeat with its place in line for each request that has waited WAITING_EVERY_S since the last."""
        now = time.monotonic()
        for n, entry in enumerate(self.scheduler.waiting):
            if now - self._beats.get(entry, 0.0) >= WAITING_EVERY_S:
                self._beats[entry] = now
                self._send(entry, {"waiting": n})

    def _send(self, entry: Entry, event) -> None:
        queue = self._events.get(entry)
        if queue is not None:
            queue.put_nowait(event)
