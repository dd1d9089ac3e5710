"""Stage health and readiness from a cache that a background task refreshes, so `/healthz` answers at once even
while every stage is saturated: it never calls a replica (a busy replica's queue would make a health call wait,
and a load balancer would pull a healthy node exactly when it is needed).

- health: each stage's deployment status from Serve's controller (HEALTHY, UPSCALING and DOWNSCALING count as
  ready; UPDATING, UNHEALTHY, DEPLOY_FAILED do not);
- readiness: healthy, and the job queue's Redis and S3 both answer, so that a new job can be accepted.
"""
from __future__ import annotations

import asyncio
import logging
import time

from cluster.config import DEPLOYMENT_NAMES, STAGES

logger = logging.getLogger(__name__)
READY_STATES = ("HEALTHY", "UPSCALING", "DOWNSCALING")


class HealthCache:
    def __init__(self, app_name: str, queue, storage, every_s: float = 2.0):
        self.app_name, self.queue, self.storage, self.every_s = app_name, queue, storage, every_s
        self.stages: dict[str, str] = {s: "starting" for s in STAGES}
        self.dependencies: dict[str, str] = {"queue": "starting", "storage": "starting"}
        self.checked_at = 0.0

    @property
    def healthy(self) -> bool:
        return all(v == "ready" for v in self.stages.values())

    @property
    def ready(self) -> bool:
        return self.healthy and all(v == "ok" for v in self.dependencies.values())

    def snapshot(self) -> dict:
        return {"stages": dict(self.stages), "dependencies": dict(self.dependencies),
                "checked_s_ago": round(time.monotonic() - self.checked_at, 1) if self.checked_at else None}

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.every_s)

    async def refresh(self) -> None:
        self.stages = await self._stage_states()
        self.dependencies = {"queue": await self._probe(self.queue.ping),
                             "storage": await self._probe(self.storage.ensure_bucket)}
        self.checked_at = time.monotonic()

    async def _stage_states(self) -> dict[str, str]:
        from ray import serve
        try:
            status = await asyncio.to_thread(serve.status)
            deployments = status.applications[self.app_name].deployments
        except Exception as e:  # the controller is away for a moment: say so, do not guess
            logger.warning("cannot read Serve's status: %s", e)
            return {s: f"unknown: {type(e).__name__}" for s in STAGES}
        out = {}
        for stage in STAGES:
            d = deployments.get(DEPLOYMENT_NAMES[stage])
            state = str(getattr(d, "status", "missing")).rsplit(".", 1)[-1]
            out[stage] = "ready" if state in READY_STATES else state.lower()
        return out

    @staticmethod
    async def _probe(fn) -> str:
        try:
            await asyncio.wait_for(asyncio.to_thread(fn), 5)
            return "ok"
        except Exception as e:
            return f"unavailable: {type(e).__name__}"
