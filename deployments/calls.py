"""The calls one job makes to the stages, each retried when the replica that served it died.

The stages are stateless, so a call that failed because its replica (or node) went away is simply made again
(Serve routes it to a live replica) up to `jobs.stage_retries` times before the job's attempt fails. Waiting is
never a failure: the Diffuser's stream sends a heartbeat while a request waits for a slot (`{"waiting": n}`,
its place in line) and progress after its steps; only a stream silent for `jobs.stall_timeout_s` after it
reached a replica counts as a dead replica (before that, the request waits in Serve's own queue).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

from . import errors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageHandles:
    """The Serve handles of the four stages."""
    text_encoder: object
    diffuser: object
    upscaler: object
    publisher: object


class StageCalls:
    def __init__(self, stages: StageHandles, retries: int, stall_timeout_s: float, backoff_s: float = 1.0):
        self.stages, self.retries, self.stall_timeout_s, self.backoff_s = stages, retries, stall_timeout_s, backoff_s

    async def retrying(self, what: str, call: Callable[[], Awaitable]):
        """`await call()`, again (after a short backoff) while it fails because a replica died."""
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except Exception as e:
                if not errors.is_replica_failure(e) or attempt == self.retries:
                    raise
                logger.warning("%s: %s (%s); retrying (%d of %d)", what, type(e).__name__, e, attempt + 1,
                               self.retries)
                await asyncio.sleep(self.backoff_s * 2**attempt)

    async def encode(self, prompt: str, negative_prompt: str):
        """(prompt_embeds, pooled) of the prompt and of the negative prompt, stacked."""
        import torch

        from pipeline.text_encoder import PromptEmbeds
        te = self.stages.text_encoder
        (pe, pp), (ne, np_) = await self.retrying("text encoder", lambda: asyncio.gather(
            te.encode.remote(prompt), te.encode.remote(negative_prompt)))
        return PromptEmbeds(prompt_embeds=torch.stack([pe, ne]), pooled=torch.stack([pp, np_]))

    async def sample(self, requests: list, priority: int, on_progress: Callable[[float], Awaitable[None]]):
        """Every sample request's image, (N, 3, h, w); progress is the mean fraction of steps done.

        A request whose Diffuser replica died is sampled again (its seed gives the same image); the others keep
        theirs.
        """
        import torch
        images: list = [None] * len(requests)
        progress = [0.0] * len(requests)

        async def run_missing() -> None:
            try:
                async with asyncio.TaskGroup() as tg:  # one failure cancels the others (retried if missing)
                    for i, r in enumerate(requests):
                        if images[i] is None:
                            tg.create_task(self._stream(i, r, priority, images, progress, on_progress))
            except BaseExceptionGroup as group:  # the first failure is the reason
                raise group.exceptions[0] from None

        await self.retrying("diffuser", run_missing)
        return torch.stack(images)

    async def _stream(self, i: int, request, priority: int, images: list, progress: list, on_progress) -> None:
        stream = self.stages.diffuser.options(stream=True).sample.remote(request, priority)
        reached = False  # before its first event the request waits in Serve's queue: no stall timer then
        try:
            while True:
                try:
                    if reached:
                        event = await asyncio.wait_for(stream.__anext__(), self.stall_timeout_s)
                    else:
                        event = await stream.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise errors.StageStalled(f"the Diffuser sent nothing for {self.stall_timeout_s:.0f}s, not "
                                              "even a heartbeat: its replica is presumed dead") from None
                reached = True
                if "image" in event:
                    images[i] = event["image"]
                elif "progress" in event:
                    progress[i] = event["progress"]
                    await on_progress(sum(progress) / len(progress))
        except BaseException:
            stream.cancel()  # a cancelled job or a failed sibling: free the Diffuser's slot at its next step
            raise

    async def rank(self, pixels, prompt: str):
        return await self.retrying("scorer", lambda: self.stages.text_encoder.rank.remote(pixels, prompt))

    async def upscale_and_publish(self, job_id: str, pixels, factor: int, metadata: list[dict],
                                  on_publishing: Callable[[], Awaitable[None]]) -> list[dict]:
        """Upscale the images (batched across jobs) and write the PNGs (all or nothing; the same keys again on a
        retry). The calls are chained: the Upscaler's result goes to the Publisher as an argument, so the
        largest tensors of a job travel through the object store and never through this replica."""
        async def chain() -> list[dict]:
            images = self.stages.upscaler.upscale_many.remote(pixels, factor) if factor > 1 else pixels
            stream = self.stages.publisher.options(stream=True).publish.remote(job_id, images, metadata)
            async for event in stream:
                if "images" in event:
                    return event["images"]
                await on_publishing()  # the upscaled images reached the Publisher
            raise RuntimeError("the Publisher's stream ended without its records")
        return await self.retrying("upscaler/publisher", chain)
