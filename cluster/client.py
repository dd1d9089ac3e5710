"""A small Python client for the imagine HTTP API (what `imagine generate` uses).

    from cluster.client import ImagineClient
    client = ImagineClient("http://127.0.0.1:8000", api_key="imk_...")
    result = client.generate("a red circle on a black background --n 4", out_dir="out/")
    print(result.paths, result.grid)
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import requests

logger = logging.getLogger(__name__)


class ClientError(RuntimeError):
    """An error answer of the API: `status`, and the server's `type`, `param` and `message`."""

    def __init__(self, status: int, error: dict):
        self.status, self.type, self.param = status, error.get("type"), error.get("param")
        self.message = error.get("message", "")
        super().__init__(f"HTTP {status} {self.type}: {self.message}")


@dataclass
class GenerationOutput:
    job: dict                 # the final job record
    paths: list[Path]         # downloaded PNGs, in delivery order
    grid: Path | None         # the 2x2 (or n-image) grid


class ImagineClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 30):
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, **kw) -> dict:
        r = self.session.request(method, self.base_url + path, timeout=kw.pop("timeout", self.timeout_s), **kw)
        if r.status_code >= 400:
            try:
                error = r.json().get("error", {})
            except ValueError:
                error = {"message": r.text[:500]}
            raise ClientError(r.status_code, error)
        return r.json()

    def health(self) -> dict:
        return self._call("GET", "/healthz")

    def submit(self, prompt: str, **fields) -> dict:
        """POST /v1/jobs: returns the queued job record (202)."""
        return self._call("POST", "/v1/jobs", json={"prompt": prompt, **fields})

    def upscale(self, job_id: str, index: int) -> dict:
        """U<index>: a child job with image `index` (from 1) larger."""
        return self._call("POST", f"/v1/jobs/{job_id}/images/{index}/upscale")

    def vary(self, job_id: str, index: int, strength: float = 0.3) -> dict:
        """V<index>: four variations of image `index` (strength 0.3 subtle, 0.6 strong)."""
        return self._call("POST", f"/v1/jobs/{job_id}/images/{index}/variations", json={"strength": strength})

    def reroll(self, job_id: str) -> dict:
        """The same prompt and settings, new seeds."""
        return self._call("POST", f"/v1/jobs/{job_id}/reroll")

    def follow(self, job: dict, out_dir: str | Path = "out", on_event: Callable[[dict], None] | None = None
               ) -> GenerationOutput:
        """Follow a submitted job's progress, download its PNGs and write a grid."""
        job = self.wait(job["id"], on_event=on_event)
        if job["state"] != "succeeded":
            raise ClientError(500, {"type": job.get("error_type") or job["state"],
                                    "message": job.get("error") or f"job {job['id']} {job['state']}"})
        paths = self.download(job, out_dir)
        return GenerationOutput(job=job, paths=paths, grid=write_grid(paths, Path(out_dir) / f"{job['id']}_grid.png"))

    def get(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._call("DELETE", f"/v1/jobs/{job_id}")

    def events(self, job_id: str, timeout_s: float = 600) -> Iterator[dict]:
        """Server-sent events of a job: each record update until the job is terminal."""
        with self.session.get(f"{self.base_url}/v1/jobs/{job_id}/events", stream=True, timeout=timeout_s) as r:
            if r.status_code >= 400:
                raise ClientError(r.status_code, r.json().get("error", {}))
            for line in r.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    yield json.loads(line[5:])

    def wait(self, job_id: str, on_event: Callable[[dict], None] | None = None, timeout_s: float = 600) -> dict:
        record = None
        for record in self.events(job_id, timeout_s=timeout_s):
            if on_event is not None:
                on_event(record)
        return self.get(job_id) if record is None else record

    def download(self, job: dict, out_dir: str | Path) -> list[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, img in enumerate(job["images"]):
            r = requests.get(img["url"], timeout=self.timeout_s)
            r.raise_for_status()
            paths.append(out / f"{job['id']}_{i}.png")
            paths[-1].write_bytes(r.content)
        return paths

    def generate(self, prompt: str, out_dir: str | Path = "out", on_event: Callable[[dict], None] | None = None,
                 **fields) -> GenerationOutput:
        """Submit, follow progress, download the PNGs and write a grid."""
        return self.follow(self.submit(prompt, **fields), out_dir, on_event)


def write_grid(paths: list[Path], dest: Path) -> Path | None:
    if not paths:
        return None
    from PIL import Image

    from pipeline.images import make_grid
    make_grid([Image.open(p).convert("RGB") for p in paths]).save(dest)
    return dest
