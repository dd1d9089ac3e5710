"""Diffuser deployment: the denoising loop, batched across requests.

`sample(request)` is a streaming method: it yields `{"progress": p}` after each denoising step
and finally `{"image": (3, h, w) tensor}`. Two batching modes (config `stages.diffuser.batching`,
changed in place by `imagine apply`):

- `step` (default, continuous batching): one sampling loop per replica. A request joins the running
  batch at the next step boundary and leaves as soon as its own last step is done, so a 20-step
  request never waits behind a 50-step one and a finished request's slot is refilled at once.
  Requests with different step counts, guidance scales, schedulers, seeds and sizes share each step
  (one UNet call per latent shape, classifier-free-guidance pairs in the same call); a cancelled
  request (the caller went away) leaves the batch at the next step.
- `request`: `@serve.batch` on an async generator groups whole requests; the batch runs until its
  longest request is done (the head-of-line blocking that step-level batching removes).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field

from ray import serve

from . import metrics as m
from .common import parse_config, pick_device, setup_torch, start_metrics

logger = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.25  # step-level: at most one progress event per request this often (and the last one)


@dataclass
class _Slot:
    """One request in the step-level loop: its sampler state and the queue its caller reads."""
    request: object
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    state: object = None
    cancelled: bool = False
    reported_at: float = 0.0  # when its last progress event was sent


@serve.deployment(name="Diffuser")
class Diffuser:
    def __init__(self, config: dict):
        from pipeline.sampler import Sampler
        from pipeline.spec import PipelineSpec

        t0 = time.perf_counter()
        cfg = parse_config(config)
        self.stage = cfg.stages.diffuser
        setup_torch(self.stage)
        device = pick_device(self.stage)
        self.metrics = start_metrics(device)
        spec = PipelineSpec.load(cfg.model_for("diffuser"))
        self.sampler = Sampler.from_pretrained(spec.resolve_path(spec.diffusion), device=device)
        self._waiting: collections.deque[_Slot] = collections.deque()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self.reconfigure(self.stage.user_config())
        self.metrics.loaded(time.perf_counter() - t0)

    def reconfigure(self, user_config: dict) -> None:
        self.metrics.replicas_max(user_config["max_replicas"])
        self.batching = user_config["batching"]
        self.join = user_config["join"]
        self.max_batch_size = user_config["max_batch_size"]
        self.batch_wait_timeout_s = user_config["batch_wait_timeout_s"]
        self.request_batch.set_max_batch_size(user_config["max_batch_size"])
        self.request_batch.set_batch_wait_timeout_s(user_config["batch_wait_timeout_s"])

    async def sample(self, request):
        """Stream progress events and then the image for one SampleRequest."""
        async with self.metrics.call():
            events = self._join(request) if self.batching == "step" else self.request_batch(request)
            async for event in events:
                yield event

    # ---- step-level (continuous) batching ---------------------------------------------------------
    async def _join(self, request):
        slot = _Slot(request)
        self._waiting.append(slot)
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done() or self._loop_task.get_loop() is not loop:
            self._wake = asyncio.Event()  # (a new event loop: only when the class runs outside Serve)
            self._loop_task = loop.create_task(self._step_loop())
        self._wake.set()
        try:
            while True:
                event = await slot.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if "image" in event:
                    return
        finally:  # done, or the caller went away (cancelled job, dropped stream): free the slot
            slot.cancelled = True

    def _admit(self, running: list[_Slot]) -> None:
        """Move waiting requests into the running batch, up to max_batch_size images."""
        if self.join == "when_empty" and running:
            return
        while self._waiting and len(running) < self.max_batch_size:
            slot = self._waiting.popleft()
            if slot.cancelled:
                continue
            try:
                [slot.state] = self.sampler.start([slot.request])
            except Exception as e:  # a bad request fails alone
                slot.events.put_nowait(e)
                continue
            running.append(slot)

    async def _step_loop(self) -> None:
        running: list[_Slot] = []
        try:
            await self._run_steps(running)
        except BaseException as e:  # never leave callers waiting on a loop that died (or was shut down)
            if not isinstance(e, asyncio.CancelledError):
                logger.exception("the step loop stopped")
            for s in running + list(self._waiting):
                s.events.put_nowait(RuntimeError(f"the Diffuser's step loop stopped: {e!r}"))
            self._waiting.clear()
            raise

    async def _run_steps(self, running: list[_Slot]) -> None:
        while True:
            if not running:
                if not self._waiting:
                    self._wake.clear()
                    await self._wake.wait()
                if self.batch_wait_timeout_s > 0 and len(self._waiting) < self.max_batch_size:
                    await asyncio.sleep(self.batch_wait_timeout_s)  # an idle replica gathers a first batch
            self._admit(running)
            running[:] = [s for s in running if not s.cancelled]
            if not running:
                continue
            try:
                self.metrics.batch(len(running))
                await self._step([s.state for s in running])
                done = [s for s in running if s.state.done]
                images = await asyncio.to_thread(self.sampler.finish, [s.state for s in done]) if done else []
            except Exception as e:  # the whole step failed (e.g. out of memory): fail its requests
                logger.exception("denoising step failed for %d requests", len(running))
                for s in running:
                    s.events.put_nowait(e)
                running.clear()
                continue
            now = time.monotonic()
            for s in running:  # progress events cost the caller work: not more often than PROGRESS_EVERY_S
                if s.state.done or now - s.reported_at >= PROGRESS_EVERY_S:
                    s.reported_at = now
                    s.events.put_nowait({"progress": s.state.progress})
            for s, img in zip(done, images):
                s.events.put_nowait({"image": img.cpu()})
            m.inc("imagine_images_generated_total", len(done))
            running[:] = [s for s in running if not s.state.done]

    # ---- request-level batching ----------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def request_batch(self, requests: list):
        self.metrics.batch(len(requests))
        states = self.sampler.start(requests)
        while live := [s for s in states if not s.done]:
            await self._step(live)
            yield [{"progress": s.progress} for s in states]
        images = await asyncio.to_thread(self.sampler.finish, states)
        m.inc("imagine_images_generated_total", len(images))
        yield [{"image": img.cpu()} for img in images]

    async def _step(self, live: list) -> None:
        """One denoising step for every live state, off the event loop, timed and counted."""
        start = time.perf_counter()
        await asyncio.to_thread(self.sampler.step, live)
        m.observe("imagine_denoising_step_seconds", time.perf_counter() - start)
        m.inc("imagine_denoising_steps_total", len(live))

    def ready(self) -> bool:
        return True
