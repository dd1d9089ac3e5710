"""The request-level batching baseline of `imagine bench`: a Diffuser that batches whole requests.

`RequestLevelDiffuser` is deployed under the Diffuser's name ("Diffuser") in place of the product's
step-level one (`deployments.app.build_app(cfg, classes={"diffuser": RequestLevelDiffuser})`), so the
graph, its handles and its `imagine_*` metrics are the same; only the batching differs. It keeps the
interface of `deployments.diffuser.Diffuser`: `sample(request)` streams `{"progress": p}` after each
denoising step of its batch and finally `{"image": (3, h, w) tensor}`.

`@serve.batch` on an async generator groups whole requests (at most `max_batch_size`, waiting up to
`batch_wait_timeout_s` to fill a batch; both from the stage's `user_config`, changed in place by
`reconfigure`). A batch runs until its longest request is done: the head-of-line blocking that step-level
(continuous) batching removes, and what the benchmark measures against it.
"""
from __future__ import annotations

import time

from ray import serve

from deployments import metrics as m
from deployments.common import TorchThread, parse_config, pick_device, start_metrics


@serve.deployment(name="Diffuser")
class RequestLevelDiffuser:
    def __init__(self, config: dict):
        from pipeline.sampler import Sampler
        from pipeline.spec import PipelineSpec

        from .sd15 import run_dtype

        t0 = time.perf_counter()
        cfg = parse_config(config)
        self.stage = cfg.stages.diffuser
        self.torch = TorchThread()  # the shipped Diffuser's threading, so that only the batching differs
        device = pick_device(self.stage)
        self.metrics = start_metrics(device)
        spec = PipelineSpec.load(cfg.model_for("diffuser"))
        self.sampler = self.torch.call(Sampler.from_pretrained, spec.resolve_path(spec.diffusion), device=device,
                                       dtype=run_dtype(device))
        if self.stage.compile != "off":  # the shipped Diffuser's compiled UNet, so that only the batching differs
            from pipeline.compiled import compile_for_spec
            self.torch.call(compile_for_spec, self.sampler, spec, self.stage.compile, 2 * self.stage.max_batch_size)
        self.reconfigure(self.stage.user_config())
        self.metrics.loaded(time.perf_counter() - t0)

    def reconfigure(self, user_config: dict) -> None:
        """The Diffuser stage's user_config; keys for step-level batching (join, ...) do not apply here."""
        self.metrics.replicas_max(user_config["max_replicas"])
        self.request_batch.set_max_batch_size(user_config["max_batch_size"])
        self.request_batch.set_batch_wait_timeout_s(user_config["batch_wait_timeout_s"])

    async def sample(self, request, priority: int = 0):
        """Stream progress events and then the image for one SampleRequest (whole requests are batched in
        arrival order: `priority` is accepted, as the Diffuser's is, and not used)."""
        async with self.metrics.call():
            async for event in self.request_batch(request):
                yield event

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def request_batch(self, requests: list):
        self.metrics.batch(len(requests))
        states = await self.torch.run(self.sampler.start, requests)
        while live := [s for s in states if not s.done]:
            await self._step(live)
            yield [{"progress": s.progress} for s in states]
        images = await self.torch.run(self.sampler.finish, states)
        m.inc("imagine_images_generated_total", len(images))
        yield [{"image": img.cpu()} for img in images]

    async def _step(self, live: list) -> None:
        """One denoising step for every live state, off the event loop, timed and counted."""
        start = time.perf_counter()
        await self.torch.run(self.sampler.step, live)
        m.observe("imagine_denoising_step_seconds", time.perf_counter() - start)
        m.inc("imagine_denoising_steps_total", len(live))

    def ready(self) -> bool:
        return True
