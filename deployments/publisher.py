"""Publisher deployment: PNG-encode delivered images and write them, with metadata, to S3."""
from __future__ import annotations

import asyncio
import io
import logging
import time

from ray import serve

from . import metrics as m
from .stage import Stage

logger = logging.getLogger(__name__)


@serve.deployment(name="Publisher")
class Publisher(Stage):
    stage_name = "publisher"
    uses_torch = False

    def load(self) -> None:
        from cluster.storage import Storage
        self.storage = Storage.from_config(self.cfg.storage)
        self.storage.ensure_bucket()

    async def publish(self, job_id: str, images, metadata: list[dict]):
        """Write images/<job_id>/<i>.png for each (3, H, W) image; all or nothing. A stream of two events:
        `{"publishing": n}` once the images are here (when they come straight from the Upscaler as a chained
        call's result, that is when the upscaling is done), then `{"images": records}`, one record per image
        (key, width, height, seed, score). On a storage error the images already written for this job are
        deleted and the error propagates.
        """
        yield {"publishing": len(images)}
        async with self.metrics.call(len(images)):
            self.metrics.batch(len(images))
            records = await asyncio.to_thread(self._publish, job_id, images, metadata)
        m.inc("imagine_images_published_total", len(records))
        yield {"images": records}

    def _put(self, job_id: str, i: int, png: bytes, meta: dict) -> str:
        """One S3 write, timed and counted by outcome."""
        start = time.perf_counter()
        try:
            key = self.storage.put_png(job_id, i, png, meta)
        except Exception:
            m.inc("imagine_storage_writes_total", outcome="error")
            raise
        finally:
            m.observe("imagine_storage_write_seconds", time.perf_counter() - start)
        m.inc("imagine_storage_writes_total", outcome="ok")
        m.inc("imagine_storage_write_bytes_total", len(png))
        return key

    def _publish(self, job_id, images, metadata):
        from pipeline.generate import to_pil
        written, records = [], []
        try:
            for i, (img, meta) in enumerate(zip(to_pil(images), metadata)):
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                written.append(self._put(job_id, i, buf.getvalue(), meta))
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
