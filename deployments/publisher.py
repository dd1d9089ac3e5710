"""Publisher deployment: PNG-encode delivered images and write them, with metadata, to S3."""
from __future__ import annotations

import asyncio
import io
import logging

from ray import serve

from .common import parse_config

logger = logging.getLogger(__name__)


@serve.deployment(name="Publisher")
class Publisher:
    def __init__(self, config: dict):
        from cluster.storage import Storage

        cfg = parse_config(config)
        self.storage = Storage.from_config(cfg.storage)
        self.storage.ensure_bucket()

    async def publish(self, job_id: str, images, metadata: list[dict]) -> list[dict]:
        """Write images/<job_id>/<i>.png for each (3, H, W) image; all or nothing.

        Returns one record per image (key, width, height, seed, score). On a storage error the
        images already written for this job are deleted and the error propagates.
        """
        return await asyncio.to_thread(self._publish, job_id, images, metadata)

    def _publish(self, job_id, images, metadata):
        from pipeline.generate import to_pil
        written, records = [], []
        try:
            for i, (img, meta) in enumerate(zip(to_pil(images), metadata)):
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                written.append(self.storage.put_png(job_id, i, buf.getvalue(), meta))
                records.append({"key": written[-1], "width": img.width, "height": img.height,
                                "seed": int(meta["seed"]), "score": meta.get("score")})
        except Exception:
            for key in written:
                try:
                    self.storage.delete(key)
                except Exception as e:  # the endpoint may be gone too; the job is failed anyway
                    logger.warning("could not delete partial image %s: %s", key, e)
            raise
        return records

    def ready(self) -> bool:
        return True
