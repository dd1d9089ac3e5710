"""The base of the model stages (TextEncoder, Diffuser, Upscaler) and the Publisher: one way to start a replica.

A replica reads its config section, gives its torch work one thread set up for its share of the machine
(`self.torch`, deployments/common.py TorchThread), picks its device, starts its metrics, loads its model once
(`load`, the subclass's, on that thread), applies the live settings Serve hands to `reconfigure` (replica
ceiling, batch sizes: changed in place by `imagine apply`) and reports its load time.

    @serve.deployment(name="Upscaler")
    class Upscaler(Stage):
        stage_name = "upscaler"
        batch_method = "_upscale_batch"             # its @serve.batch method: batch settings apply to it
        def load(self): self.upscaler = load_upscaler(self.model_spec(), self.device)
        def configure(self, user_config): ...   # the stage's own live settings (tile size)
"""
from __future__ import annotations

import time
from typing import ClassVar

from .common import TorchThread, parse_config, pick_device, start_metrics


class Stage:
    stage_name: ClassVar[str]          # the config key of the stage: "text_encoder", "diffuser", ...
    uses_torch: ClassVar[bool] = True  # the Publisher needs no torch set-up and runs on the CPU
    batch_method: ClassVar[str | None] = None  # the @serve.batch method that max_batch_size etc. apply to

    def __init__(self, config: dict):
        t0 = time.perf_counter()
        self.cfg = parse_config(config)
        self.stage = self.cfg.stage(self.stage_name)
        self.torch = TorchThread() if self.uses_torch else None  # all torch work runs on this one thread
        self.device = pick_device(self.stage) if self.uses_torch else "cpu"
        self.metrics = start_metrics(self.device)
        if self.torch is not None:
            self.torch.call(self.load)
        else:
            self.load()
        self.reconfigure(self.stage.user_config())
        self.metrics.loaded(time.perf_counter() - t0)

    def load(self) -> None:
        """Load the stage's model(s) from `self.cfg` onto `self.device`."""
        raise NotImplementedError

    def reconfigure(self, user_config: dict) -> None:
        """Serve's in-place update of the stage's live settings (see StageConfig.user_config)."""
        self.metrics.replicas_max(user_config["max_replicas"])
        if self.batch_method is not None:
            batched = getattr(self, self.batch_method)
            batched.set_max_batch_size(user_config["max_batch_size"])
            batched.set_batch_wait_timeout_s(user_config["batch_wait_timeout_s"])
        self.configure(user_config)

    def configure(self, user_config: dict) -> None:
        """The subclass's part of `reconfigure` (batch sizes, tiles, ...)."""

    def model_spec(self):
        from pipeline.spec import PipelineSpec
        return PipelineSpec.load(self.cfg.model_for(self.stage_name))

    def ready(self) -> bool:
        return True
