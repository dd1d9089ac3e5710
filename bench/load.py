"""Load generation for `imagine bench`: what a client saw of one request, the open- and closed-loop
runners, and the clients (`Send`) of the served apps."""
from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from cluster.jobs import STAGE_PROGRESS

from .workload import MIX, Arrival, body

DIFFUSER_START = STAGE_PROGRESS["diffuser"][0]  # a job's progress as its Diffuser stage begins (cluster/jobs.py)


@dataclass
class Outcome:
    """One request as the client saw it; times are unix seconds."""
    steps: int
    n: int
    sent: float
    first_step: float | None = None  # its first denoising step was done
    done: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.done is not None

    def row(self, t0: float) -> dict:
        """The raw record kept in the results: times relative to t0, the start of its run."""
        return {"steps": self.steps, "n": self.n, "sent_s": round(self.sent - t0, 4),
                "latency_s": round(self.done - self.sent, 4) if self.ok else None,
                "queue_wait_s": round(self.first_step - self.sent, 4) if self.ok and self.first_step else None,
                "error": self.error}


Send = Callable[[int, int, int, float], Outcome]  # (steps, n, seed, deadline) -> Outcome


def run_open_loop(send: Send, schedule: list[Arrival], deadline_s: float) -> tuple[list[Outcome], float]:
    """Send each arrival at its time, whether or not earlier ones are done; give up on any request still
    running deadline_s after the start. Returns the outcomes in arrival order and the start time."""
    start = time.time()
    with ThreadPoolExecutor(max_workers=max(1, len(schedule))) as pool:
        futures = []
        for a in schedule:
            time.sleep(max(0.0, start + a.at_s - time.time()))
            futures.append(pool.submit(send, a.steps, a.n, a.seed, start + deadline_s))
        return [f.result() for f in futures], start


def run_closed_loop(send: Send, clients: int, warmup_s: float, window_s: float, drain_s: float, mix=MIX,
                    seed: int = 0) -> tuple[list[Outcome], float, float]:
    """`clients` clients, each sending its next request of the mix when the last one is done, until the end
    of warm-up + window. Returns all outcomes and the measuring window (t0, t1)."""
    start = time.time()
    t0, t1 = start + warmup_s, start + warmup_s + window_s

    def client(i: int) -> list[Outcome]:
        rng, outs = random.Random(seed * 1000 + i), []
        while time.time() < t1:
            steps, n = rng.choice(mix)
            outs.append(send(steps, n, rng.randrange(2**31), t1 + drain_s))
        return outs

    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        return [o for f in futures for o in f.result()], t0, t1




# ---- clients of the served apps ----------------------------------------------------------------
def graph_sender(base_url: str) -> Send:
    """Our graph: POST /v1/jobs, then follow the job's server-sent events to its end."""
    import requests

    from cluster.client import ClientError, ImagineClient

    def send(steps: int, n: int, seed: int, deadline: float) -> Outcome:
        client = ImagineClient(base_url, timeout_s=60)
        out = Outcome(steps, n, sent=time.time())
        try:
            job_id, record = client.submit(**body(steps, n, seed))["id"], None
            for record in client.events(job_id, timeout_s=60):
                if out.first_step is None and record["progress"] > DIFFUSER_START:
                    out.first_step = time.time()
                if time.time() > deadline and record["state"] not in ("succeeded", "failed", "cancelled"):
                    client.cancel(job_id)
                    out.error = "unfinished at the deadline (cancelled)"
                    return out
            if record is None or record["state"] != "succeeded":
                out.error = f"job {job_id} ended {record and record['state']}: {record and record.get('error')}"
            else:
                out.done = time.time()
        except (ClientError, requests.RequestException) as e:
            out.error = f"{type(e).__name__}: {e}"[:300]
        return out
    return send


def reference_sender(base_url: str) -> Send:
    """The reference: POST /imagine, which answers once the images are in S3."""
    import requests

    def send(steps: int, n: int, seed: int, deadline: float) -> Outcome:
        out = Outcome(steps, n, sent=time.time())
        try:
            r = requests.post(f"{base_url}/imagine", json=body(steps, n, seed),
                              timeout=(10, max(1.0, deadline - time.time())))
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {r.text[:200]}"
            else:
                out.done, out.first_step = time.time(), r.json()["timings"]["first_step_at"]
        except requests.RequestException as e:
            out.error = f"{type(e).__name__}: {e}"[:300]
        return out
    return send
