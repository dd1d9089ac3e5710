"""`imagine bench`: throughput and latency of four ways to run the same model on this machine (issue 8).

    imagine bench --quick          # about 9 minutes on 2 CPU cores: every part, short windows
    imagine bench                  # the full run (about 25 minutes on 2 CPU cores)

What runs and how (HELP below, `imagine bench --help`): the in-process ceiling, then the reference design
(deployments/reference.py) and our graph with request- and step-level batching, deployed in turn on one
local Ray and S3, each driven over loopback HTTP in a closed loop (peak) and at open-loop Poisson loads.
What each number means: DEFINITIONS (also written into every report).

Imports neither torch nor Ray at import time (they load inside the functions that need them).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import random
import secrets
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

MIX = ((20, 1), (20, 4), (50, 1), (50, 4))  # (steps, n), equally likely: half the images take 20 steps, half 50
PROMPTS = ("a red circle on a black background", "a blue square on a yellow background",
           "a white triangle on a purple background", "a green circle on a white background")
MODES = ("reference", "request_level", "step_level")
SUMMARY_KEYS = ("ceiling",) + MODES
APP_NAME = "bench"
DIFFUSER_START = 0.05  # deployments/ingress.py sets a job's progress to 0.05 as its Diffuser stage begins
GOALS = {"step_peak_vs_ceiling": 0.85, "step_p99_vs_request_p99_at_0.7": 0.6}
DEFINITIONS = """\
- **Peak** (served modes): closed loop, `clients` concurrent clients each sending the next request of the mix as
  soon as its last one is done; images (and denoising steps) of the requests that complete inside the
  measuring window (after a warm-up), divided by the window. **Ceiling peak**: `Pipeline.generate` in one
  process (text encode, sample, upscale, PNG encode; no S3 write, no serving) on full batches of B images of
  each step count, weighted as the mix weights them, at the best B of the sweep.
- **Denoising steps/s**: image-steps per second (one step of one image; its guidance pair counts once).
- **Load**: open-loop Poisson arrivals at a fraction of the *step-level* peak (measured first; the ceiling's
  when step-level is not run), in requests/s: that peak in images/s over the mix's mean images per request.
  The same absolute rates, arrival times, request kinds and seeds for every served mode, bounded by a time
  window and a request count; one random sequence for every load, time-scaled by its rate. (Fractions of the
  ceiling would overload every served mode on a small CPU.)
- **Latency**: end to end at the client, from sending the request to having the finished job (graph:
  `POST /v1/jobs` until the job's server-sent events stream ends with `succeeded`; reference: `POST /imagine`
  until its answer, which comes after the PNGs are in S3).
- **Queue wait**: from sending the request until its first denoising step is done (this host's clock), so it
  includes text encoding and one step. Graph: the client's receipt of the first job-record event whose
  progress is past the Diffuser's start mark (0.05), over `/v1/jobs/{id}/events`; reference: the
  `first_step_at` timestamp its deployment returns.
- **Ceiling latency** (the same at every load): each request kind of the mix run alone in-process (its n
  images in one batch, no queue); p50/p95/p99 over the equally weighted kinds. A floor, not a served latency.
"""


@dataclass(frozen=True)
class Plan:
    """How long and how hard each part runs."""
    name: str
    fractions: tuple[float, ...]        # open-loop loads, as fractions of the step-level (or ceiling) peak
    clients: int                        # closed-loop concurrency
    warmup_s: float                     # closed loop: not measured
    closed_window_s: float              # closed loop: measured
    open_window_s: float                # open loop: arrivals stop after this
    max_requests: int                   # open loop: at most this many arrivals per rate
    drain_s: float                      # after a window, wait this long for requests still running
    ceiling_batch_sizes: tuple[int, ...]
    mix: tuple[tuple[int, int], ...] = MIX
    seed: int = 8


QUICK = Plan("quick", fractions=(0.3, 0.7), clients=12, warmup_s=5, closed_window_s=15, open_window_s=15,
             max_requests=10, drain_s=90, ceiling_batch_sizes=(8, 16))
FULL = Plan("full", fractions=(0.3, 0.5, 0.7, 0.9), clients=12, warmup_s=10, closed_window_s=45,
            open_window_s=60, max_requests=40, drain_s=180, ceiling_batch_sizes=(1, 2, 4, 8, 16))


# ---- workload ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arrival:
    at_s: float  # seconds after the start of the run
    steps: int
    n: int
    seed: int


def mean_images(mix) -> float:
    return sum(n for _, n in mix) / len(mix)


def mean_steps_per_image(mix) -> float:
    return sum(s * n for s, n in mix) / sum(n for _, n in mix)


def body(steps: int, n: int, seed: int) -> dict:
    """One request of the mix (default size, scheduler, guidance and upscale of the model)."""
    return {"prompt": PROMPTS[seed % len(PROMPTS)], "n": n, "steps": steps, "seed": seed}


def poisson_schedule(rate_rps: float, duration_s: float, max_requests: int, mix=MIX, seed: int = 0) -> list[Arrival]:
    """Poisson arrivals (exponential gaps, mean 1/rate) in [0, duration_s), at most max_requests, each a
    random kind of the mix with its own image seed; the same arguments give the same schedule, and the same
    seed at another rate gives the same requests with their times scaled by the ratio of the rates (so
    loads differ only in rate, not in luck)."""
    assert rate_rps > 0, f"rate_rps ({rate_rps}) must be > 0"
    rng, out = random.Random(seed), []
    t = rng.expovariate(rate_rps)
    while t < duration_s and len(out) < max_requests:
        steps, n = rng.choice(mix)
        out.append(Arrival(t, steps, n, rng.randrange(2**31)))
        t += rng.expovariate(rate_rps)
    return out


# ---- load generation ---------------------------------------------------------------------------
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


# ---- statistics --------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def pcts(xs: list[float]) -> dict:
    return {f"p{q}": None if (v := percentile(xs, q)) is None else round(v, 4) for q in (50, 95, 99)}


def latency_stats(outcomes: list[Outcome]) -> dict:
    ok = [o for o in outcomes if o.ok]
    return {"completed": len(ok), "failed": len(outcomes) - len(ok),
            "latency_s": pcts([o.done - o.sent for o in ok]),
            "queue_wait_s": pcts([o.first_step - o.sent for o in ok if o.first_step is not None])}


def window_throughput(outcomes: list[Outcome], t0: float, t1: float) -> dict:
    """Images and image-steps per second of the requests that completed inside [t0, t1]."""
    inside = [o for o in outcomes if o.ok and t0 <= o.done <= t1]
    span = t1 - t0
    return {"images_per_s": round(sum(o.n for o in inside) / span, 4),
            "steps_per_s": round(sum(o.n * o.steps for o in inside) / span, 3),
            "requests_per_s": round(len(inside) / span, 4), "completed_in_window": len(inside),
            "failed": sum(not o.ok for o in outcomes), "window_s": round(span, 2)}


def cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (program name, CPU seconds so far, user + system) of every process on this machine; this one is
    "bench driver", kernel threads are "kernel". From Linux's /proc ({} elsewhere)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat, argv = (d / "stat").read_text(), (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        name = "bench driver" if d.name == str(os.getpid()) else _program(argv)
        out[int(d.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
    return out


def _program(argv: list[str]) -> str:
    """'ray::ServeReplica:bench:Diffuser.sample' -> 'Diffuser replica', 'python .../monitor.py' -> 'monitor.py'."""
    if not argv[0]:
        return "kernel"
    first = argv[0].split(" ")[0]
    if first.startswith("ray::"):
        first = first.split(".")[0]  # Ray's process title names the running method too
        return f"{first.rsplit(':', 1)[1]} replica" if first.startswith("ray::ServeReplica:") else first
    script = next((a for a in argv[1:] if a.endswith(".py")), None)
    return Path(script or first).name


def cpu_share(before: dict, after: dict, wall_s: float) -> dict[str, float]:
    """Each program's share of all cores between two snapshots wall_s apart (1.0 = every core busy), the
    top ones first. Processes that ended in between are not counted."""
    cores, used = os.cpu_count() or 1, {}
    for pid, (name, t) in after.items():
        used[name] = used.get(name, 0.0) + t - before.get(pid, (name, 0.0))[1]
    return {k: round(v / (wall_s * cores), 3) for k, v in sorted(used.items(), key=lambda kv: -kv[1])
            if v / (wall_s * cores) >= 0.005}


def diffuser_counters(metrics_port: int) -> dict[str, float]:
    """The Diffuser's denoising counters (summed over replicas) from Ray's metrics export port."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families
    names = {"ray_imagine_denoising_steps_total": "image_steps", "ray_imagine_denoising_step_seconds_sum":
             "step_seconds", "ray_imagine_denoising_step_seconds_count": "steps"}
    out = dict.fromkeys(names.values(), 0.0)
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names and sample.labels.get("application", APP_NAME) == APP_NAME:
                out[names[sample.name]] += sample.value
    return out


def diffuser_use(before: dict, after: dict, wall_s: float) -> dict:
    """How full and how busy the Diffuser's loop was between two counter readings wall_s apart."""
    d = {k: after[k] - before[k] for k in after}
    return {"mean_batch_images": round(d["image_steps"] / d["steps"], 2) if d["steps"] else None,
            "stepping_fraction": round(d["step_seconds"] / wall_s, 3),
            "image_steps_per_s": round(d["image_steps"] / wall_s, 2),
            "s_per_image_step": round(d["step_seconds"] / d["image_steps"], 4) if d["image_steps"] else None}


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


# ---- the ceiling -------------------------------------------------------------------------------
def generate_pngs(pipe, requests: list[dict]) -> int:
    """Generate in-process and PNG-encode every image (the output work, less the S3 write); returns images."""
    import io
    images = [img for r in pipe.generate(requests) for img in r.images]
    for img in images:
        img.save(io.BytesIO(), format="PNG")
    return len(images)


def full_batch(b: int, steps: int, mix) -> list[dict]:
    """Requests of the mix's largest n adding up to exactly b images with this step count."""
    top, out = max(n for _, n in mix), []
    while (left := b - sum(r["n"] for r in out)) > 0:
        out.append(body(steps, min(top, left), seed=len(out)))
    return out


def run_ceiling(plan: Plan, model: str | None, log: Callable[[str], None]) -> dict:
    """Sweep batch sizes with full batches of each step count; then each request kind alone (the floor)."""
    from pipeline import Pipeline

    pipe = Pipeline.load(model)
    generate_pngs(pipe, [body(2, 1, seed=0)])  # the first call is slow (lazy initialisation)
    images_at = {s: sum(n for s2, n in plan.mix if s2 == s) for s, _ in plan.mix}  # images per step count
    share = {s: k / sum(images_at.values()) for s, k in images_at.items()}
    sweep = []
    for b in plan.ceiling_batch_sizes:
        pipe.max_batch_size = b
        generate_pngs(pipe, full_batch(b, 2, plan.mix))  # warm-up at this batch shape
        per_image = {}
        for steps in share:
            t = time.perf_counter()
            generate_pngs(pipe, full_batch(b, steps, plan.mix))
            per_image[steps] = (time.perf_counter() - t) / b
        images_per_s = 1 / sum(share[s] * per_image[s] for s in share)
        sweep.append({"batch_size": b, "seconds_per_image": {str(s): round(v, 4) for s, v in per_image.items()},
                      "images_per_s": round(images_per_s, 4),
                      "steps_per_s": round(images_per_s * mean_steps_per_image(plan.mix), 3)})
        log(f"ceiling: batch {b}: {images_per_s:.3f} images/s, {sweep[-1]['steps_per_s']:.1f} steps/s")
    best = max(sweep, key=lambda r: r["images_per_s"])
    pipe.max_batch_size = max(n for _, n in plan.mix)
    alone = {}
    for steps, n in plan.mix:
        t = time.perf_counter()
        generate_pngs(pipe, [body(steps, n, seed=1)])
        alone[f"{steps}x{n}"] = round(time.perf_counter() - t, 4)
    log(f"ceiling: each kind alone (s): {alone}")
    return {"sweep": sweep, "best_batch_size": best["batch_size"], "images_per_s": best["images_per_s"],
            "steps_per_s": best["steps_per_s"], "alone_s": alone, "latency_s": pcts(list(alone.values()))}


# ---- the served modes --------------------------------------------------------------------------
def bench_config(model: str | None, s3, work: Path, http_port: int, metrics_port: int, batching: str = "step"):
    """The graph's config: one Diffuser replica with every core, the other stages at their defaults, auth off."""
    from cluster.config import ImagineConfig
    creds = work / "s3-credentials.json"
    creds.touch(mode=0o600)
    creds.write_text(json.dumps({"access_key": s3.access_key, "secret_key": s3.secret_key}))
    return ImagineConfig.from_dict({
        "model": model,
        "cluster": {"app_name": APP_NAME, "http_port": http_port},
        "storage": {"endpoint_url": s3.endpoint_url, "bucket": "imagine-bench", "credentials_file": str(creds),
                    "access_key_env": "IMAGINE_BENCH_S3_ACCESS_KEY", "secret_key_env": "IMAGINE_BENCH_S3_SECRET_KEY",
                    "local": {"enabled": False}},
        # a request queued behind whole request-level batches sees no progress for minutes under overload:
        # no stall verdict before the request timeout (the default 60 s would fail queued jobs as stalled)
        "api": {"auth": "disabled", "api_keys_file": None, "max_queued_requests": -1, "stall_timeout_s": 300},
        "monitoring": {"enabled": False, "metrics_export_port": metrics_port},  # no Prometheus; Ray's port
        "stages": {"diffuser": {"batching": batching, "ray_actor_options": {"num_cpus": os.cpu_count() or 1}}},
    })


def replica_layout(cfg) -> dict:
    from cluster.config import DEPLOYMENT_NAMES
    return {name: {"replicas": cfg.stage(name).num_replicas, "num_cpus": cfg.stage(name).ray_actor_options.num_cpus}
            for name in DEPLOYMENT_NAMES}


@contextlib.contextmanager
def local_cluster(work: Path, model: str | None):
    """A local S3 server, Ray (temp dir in the work area) and Serve's HTTP proxy on a free port; yields the
    graph's config. Everything is stopped, and the S3 data removed, on exit."""
    import ray
    from ray import serve

    from cluster.config import DEPLOYMENT_NAMES
    from cluster.launcher import ray_temp_dir
    from cluster.seaweed import LocalS3Server, find_free_port, pick_s3_port

    work.mkdir(parents=True, exist_ok=True)
    s3 = LocalS3Server(work / "s3", pick_s3_port(), access_key="bench-" + secrets.token_hex(4),
                       secret_key=secrets.token_urlsafe(24))
    s3.start()
    try:
        cfg = bench_config(model, s3, work, find_free_port(), find_free_port())
        # Ray runs its workers at nice 15 by default: they would yield the cores to this process's load
        # generator and to Ray's own daemons, which the in-process ceiling never has to. Same priority here.
        os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0",
                          RAY_metrics_report_interval_ms="1000")  # the Diffuser's counters, fresh within ~1 s
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO line per deploy in the progress
        cpus = math.ceil(sum(cfg.stage(n).ray_actor_options.num_cpus for n in DEPLOYMENT_NAMES)) + 1
        ray.init(num_cpus=cpus, include_dashboard=False, dashboard_port=find_free_port(),  # not a running `up`'s
                 _temp_dir=str(ray_temp_dir(work / "ray")), _metrics_export_port=cfg.monitoring.metrics_export_port,
                 logging_level="WARNING", log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": cfg.cluster.http_port})
            yield cfg
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        s3.stop()
        shutil.rmtree(work / "s3", ignore_errors=True)


def deploy(cfg, mode: str) -> str:
    """Deploy one served mode (replacing the last) and return its base URL."""
    from ray import serve

    from deployments.app import build_app
    from deployments.reference import build_reference_app

    serve.delete(APP_NAME)
    if mode == "reference":
        app = build_reference_app(cfg)
    else:
        stages = cfg.stages.model_copy(update={"diffuser": cfg.stages.diffuser.model_copy(
            update={"batching": mode.removesuffix("_level")})})
        app = build_app(cfg.model_copy(update={"stages": stages}))
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{cfg.cluster.http_port}"


def run_served(mode: str, cfg, plan: Plan, rates: dict[str, float] | None, log: Callable[[str], None]
               ) -> tuple[dict, dict[str, float]]:
    """Deploy a mode and measure it over HTTP (see `measure`)."""
    t = time.time()
    url = deploy(cfg, mode)
    log(f"{mode}: deployed in {time.time() - t:.0f}s")
    if mode == "reference":
        return measure(mode, reference_sender(url), plan, rates, log)
    port = cfg.monitoring.metrics_export_port
    return measure(mode, graph_sender(url), plan, rates, log, probe=lambda: diffuser_counters(port))


def measure(mode: str, send: Send, plan: Plan, rates: dict[str, float] | None, log: Callable[[str], None],
            probe: Callable[[], dict] | None = None) -> tuple[dict, dict[str, float]]:
    """One request alone (cold start), the closed loop (peak), then the open loop at each rate (None: the
    plan's fractions of this mode's own peak). Returns the results and the rates. The CPU use by program,
    and `probe()` (the Diffuser's counters), are read at both ends of the closed loop's measuring window."""
    cold = send(*plan.mix[0], 0, time.time() + 300)  # the first request through each replica is slow
    log(f"{mode}: first request {cold.done - cold.sent:.1f}s" if cold.ok else f"{mode}: first request: {cold.error}")
    log(f"{mode}: closed loop with {plan.clients} clients")
    snaps = []  # (time, CPU seconds by process, probe) at the start and the end of the measuring window

    def snapshot() -> None:
        counters = None
        try:
            counters = probe() if probe is not None else None
        except (OSError, ValueError) as e:  # a diagnostic: the run goes on without it
            log(f"{mode}: could not read the Diffuser's counters: {e}")
        snaps.append((time.time(), cpu_seconds_by_process(), counters))

    timers = [threading.Timer(at, snapshot) for at in (plan.warmup_s, plan.warmup_s + plan.closed_window_s)]
    for timer in timers:
        timer.start()
    outs, t0, t1 = run_closed_loop(send, plan.clients, plan.warmup_s, plan.closed_window_s, plan.drain_s,
                                   plan.mix, plan.seed)
    for timer in timers:
        timer.join()
    (ta, cpu_a, probe_a), (tb, cpu_b, probe_b) = snaps
    cpu = cpu_share(cpu_a, cpu_b, tb - ta)
    peak = window_throughput(outs, t0, t1)
    log(f"{mode}: peak {peak['images_per_s']:.3f} images/s, {peak['steps_per_s']:.1f} steps/s"
        f" ({peak['failed']} failed)")
    closed = {**latency_stats(outs), "cpu_share": cpu, "requests": [o.row(t0 - plan.warmup_s) for o in outs]}
    if probe_a and probe_b:
        closed["diffuser"] = diffuser_use(probe_a, probe_b, tb - ta)
        log(f"{mode}: Diffuser in the window: {closed['diffuser']}")
    result = {"first_request": cold.row(cold.sent), "peak": peak, "closed_loop": closed, "open_loop": {}}
    rates = rates or arrival_rates(plan, peak["images_per_s"])
    for fraction, rate in rates.items():  # one seed: every rate's arrivals are the same ones, time-scaled
        schedule = poisson_schedule(rate, plan.open_window_s, plan.max_requests, plan.mix, seed=plan.seed + 1)
        outs, start = run_open_loop(send, schedule, plan.open_window_s + plan.drain_s)
        stats = latency_stats(outs)
        result["open_loop"][fraction] = {"rate_rps": round(rate, 5), "submitted": len(schedule), **stats,
                                         "requests": [o.row(start) for o in outs]}
        log(f"{mode}: load {fraction}: {stats['completed']}/{len(schedule)} done, latency {stats['latency_s']}, "
            f"queue wait p99 {stats['queue_wait_s']['p99']}")
    return result, rates


# ---- results -----------------------------------------------------------------------------------
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine() -> dict:
    import ray
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"hostname": platform.node(), "cpu": _cpu_model(), "cores": os.cpu_count(), "gpu": gpu,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "ray": ray.__version__,
            "python": platform.python_version(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def machine_tag(machine: dict) -> str:
    if machine["gpu"]:  # "NVIDIA H100 80GB HBM3" -> "h100"
        return next((w for w in machine["gpu"].lower().split() if any(c.isdigit() for c in w)), "gpu")
    return f"cpu{machine['cores']}"


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarize(results: dict) -> dict:
    """The top-level summary: peak images/s, and p99 latency per load fraction, of the four modes."""
    ceiling, modes = results["ceiling"], results["modes"]
    fractions = [f"{f:g}" for f in results["plan"]["fractions"]]
    peak = {"ceiling": ceiling["images_per_s"]}
    p99 = {"ceiling": {f: ceiling["latency_s"]["p99"] for f in fractions}}
    for mode in MODES:
        r = modes.get(mode)
        peak[mode] = r["peak"]["images_per_s"] if r else None
        p99[mode] = {f: r["open_loop"][f]["latency_s"]["p99"] if r else None for f in fractions}
    return {"peak_images_per_s": peak, "p99_s": p99}


def ratios(summary: dict) -> dict:
    peak, p99 = summary["peak_images_per_s"], summary["p99_s"]
    return {"peak_vs_ceiling": {m: _ratio(peak[m], peak["ceiling"]) for m in SUMMARY_KEYS},
            "peak_vs_reference": {m: _ratio(peak[m], peak["reference"]) for m in SUMMARY_KEYS},
            "p99_vs_ceiling": {m: {f: _ratio(v, p99["ceiling"][f]) for f, v in p99[m].items()} for m in SUMMARY_KEYS},
            "p99_vs_reference": {m: {f: _ratio(v, p99["reference"][f]) for f, v in p99[m].items()}
                                 for m in SUMMARY_KEYS}}


def goals(summary: dict, gpu: str | None) -> list[dict]:
    peak, p99 = summary["peak_images_per_s"], summary["p99_s"]
    step_vs_ceiling = _ratio(peak["step_level"], peak["ceiling"])
    at7 = p99["step_level"].get("0.7"), p99["request_level"].get("0.7")
    step_vs_request = _ratio(*at7)
    goal = GOALS["step_peak_vs_ceiling"]
    out = [{"goal": f"step-level peak >= {goal:.0%} of the ceiling", "value": step_vs_ceiling,
            "met": None if step_vs_ceiling is None else step_vs_ceiling >= goal},
           {"goal": f"p99 at 70 % load: step-level <= {GOALS['step_p99_vs_request_p99_at_0.7']}x request-level",
            "value": step_vs_request,
            "met": None if step_vs_request is None else step_vs_request <= GOALS["step_p99_vs_request_p99_at_0.7"]},
           {"goal": "step-level peak vs the reference (reported, not targeted, on a CPU)",
            "value": _ratio(peak["step_level"], peak["reference"]), "met": None}]
    if gpu is None:
        out.append({"goal": "GPU: step-level >= 2x the reference, SD-1.5-shaped UNet", "value": None, "met": None,
                    "note": "not run (no GPU lent)"})
    return out


def write_results(results: dict, out_dir: Path, stem: str) -> list[Path]:
    """<stem>.json (everything), <stem>.md (tables, goals, definitions) and <stem>.png (latency vs load)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(render_markdown(results))
    plot_latency(results, paths[2])
    return paths


def _s(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def render_markdown(r: dict) -> str:
    m, plan, rat, d = r["machine"], r["plan"], r["ratios"], r["model"]["defaults"]
    basis = r["ceiling"] if r["load_basis"] == "ceiling" else r["modes"][r["load_basis"]]["peak"]
    peak_rps = basis["images_per_s"] / mean_images(plan["mix"])
    lines = [f"# imagine bench: {r['date']}, {r['machine_tag']} ({plan['name']} run)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; "
             f"torch {m['torch']} ({m['torch_threads']} threads), Ray {m['ray']}, Python {m['python']}; "
             f"load average at start {m['load_average_at_start']}.",
             f"Model: {r['model']['name']} ({d['sample_size']} px sampled, x{d['upscale']} upscale, "
             f"{d['scheduler']}, guidance {d['guidance_scale']}; the mix sets the steps). "
             f"Workload mix (steps x n, equally likely): {', '.join(f'{s}x{n}' for s, n in plan['mix'])}.",
             f"Load fractions are of the **{r['load_basis']}** peak: {basis['images_per_s']:.3f} images/s = "
             f"{peak_rps:.3f} requests/s, the same arrival rates for every mode. "
             f"Total time {r['seconds'] / 60:.1f} min.", "",
             f"## Peak throughput (closed loop, {plan['clients']} clients, {plan['closed_window_s']:g} s window)", "",
             "| mode | images/s | denoising steps/s | vs ceiling | vs reference |", "|---|---|---|---|---|"]
    for mode in SUMMARY_KEYS:
        src = r["ceiling"] if mode == "ceiling" else r["modes"].get(mode, {}).get("peak")
        if src:
            lines.append(f"| {mode} | {src['images_per_s']:.3f} | {src['steps_per_s']:.1f} | "
                         f"{_s(rat['peak_vs_ceiling'][mode])} | {_s(rat['peak_vs_reference'][mode])} |")
    lines += ["", f"## Latency under open-loop Poisson load ({plan['open_window_s']:g} s windows, at most "
                  f"{plan['max_requests']} requests each; seconds)", "",
              "`of peak`: the offered images/s over this mode's own peak (above 1: overloaded, the queue grows "
              "for the whole window).", "",
              "| mode | load | req/s | of peak | done/sent | p50 | p95 | p99 | wait p50 | wait p95 | wait p99 "
              "| p99 vs ceiling | p99 vs reference |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    c = r["ceiling"]["latency_s"]
    lines.append(f"| ceiling (alone, any load) | – | – | – | – | {_s(c['p50'])} | {_s(c['p95'])} | {_s(c['p99'])} "
                 "| 0 | 0 | 0 | 1.00 | – |")
    for mode in MODES:
        for f, o in r["modes"].get(mode, {}).get("open_loop", {}).items():
            lat, wait = o["latency_s"], o["queue_wait_s"]
            of_peak = _ratio(o["rate_rps"] * mean_images(plan["mix"]), r["modes"][mode]["peak"]["images_per_s"])
            lines.append(f"| {mode} | {f} | {o['rate_rps']:.3f} | {_s(of_peak)} | {o['completed']}/{o['submitted']} | "
                         f"{_s(lat['p50'])} | {_s(lat['p95'])} | {_s(lat['p99'])} | {_s(wait['p50'])} | "
                         f"{_s(wait['p95'])} | {_s(wait['p99'])} | {_s(rat['p99_vs_ceiling'][mode][f])} | "
                         f"{_s(rat['p99_vs_reference'][mode][f])} |")
    lines += ["", "## Goals", ""]
    for g in r["goals"]:
        mark = {True: "met", False: "NOT met", None: "reported"}[g["met"]]
        value = f" ({g['value']:.3f})" if g["value"] is not None else ""
        lines.append(f"- {g['goal']}: **{g.get('note') or mark}**{value}")
    lines += ["", "## Where the cores went in the closed loop", "",
              "Share of all cores in the closed loop's measuring window (1.00 = every core busy throughout), "
              "by program, those at 1 % or more (other work on the machine included):", ""]
    for mode, res in r["modes"].items():
        top = [f"{k} {v:.2f}" for k, v in res["closed_loop"].get("cpu_share", {}).items() if v >= 0.01]
        lines.append(f"- {mode}: total {sum(res['closed_loop'].get('cpu_share', {}).values()):.2f}; {', '.join(top)}")
        if dif := res["closed_loop"].get("diffuser"):
            lines.append(f"  - Diffuser loop: {dif['mean_batch_images']} images per step on average, stepping "
                         f"{dif['stepping_fraction']:.0%} of the window, {dif['s_per_image_step']} s per image-step, "
                         f"{dif['image_steps_per_s']} image-steps/s (from its own counters)")
    lines += ["", f"## Ceiling sweep (best batch size {r['ceiling']['best_batch_size']})", "",
              "| batch size | images/s | steps/s | s per image, by step count |", "|---|---|---|---|"]
    for s in r["ceiling"]["sweep"]:
        lines.append(f"| {s['batch_size']} | {s['images_per_s']:.3f} | {s['steps_per_s']:.1f} | "
                     f"{', '.join(f'{k}: {v}' for k, v in s['seconds_per_image'].items())} |")
    lines += ["", "## Replica layout", "", r["layout_note"], "", "| deployment | replicas | num_cpus |",
              "|---|---|---|"]
    lines += [f"| {k} | {v['replicas']} | {v['num_cpus']} |" for k, v in r["layout"].items()]
    lines += ["", "## Definitions", "", DEFINITIONS, "## GPU", "",
              "not run (no GPU lent)" if not m["gpu"] else f"GPU present ({m['gpu']}); the SD-1.5-shaped run is "
              "separate.", ""]
    return "\n".join(lines)


def _nice(x: float) -> float:
    """The smallest round number (1, 1.5, 2, 3, 4, 5, 6 or 8 times a power of ten) >= x: an axis top."""
    e = 10 ** math.floor(math.log10(x))
    return next(m * e for m in (1, 1.5, 2, 3, 4, 5, 6, 8, 10) if m * e >= x)


COLORS = {"ceiling": (90, 90, 90), "reference": (214, 39, 40), "request_level": (31, 119, 180),
          "step_level": (44, 160, 44)}


def plot_latency(r: dict, path: Path) -> None:
    """Two panels, p50 and p99 end-to-end latency against load, one line per mode (drawn with Pillow)."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=13)
    img = Image.new("RGB", (1000, 460), "white")
    d = ImageDraw.Draw(img)
    series = {"ceiling": {f: r["ceiling"]["latency_s"] for f in r["summary"]["p99_s"]["ceiling"]}}
    series |= {m: {f: o["latency_s"] for f, o in r["modes"][m]["open_loop"].items()} for m in MODES if m in r["modes"]}
    top = _nice(max([v[q] for s in series.values() for v in s.values() for q in ("p50", "p99") if v[q]] + [0.1]))
    for panel, q in enumerate(("p50", "p99")):
        x0, y0, w, h = 70 + panel * 470, 40, 390, 340
        d.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
        d.text((x0 + w / 2 - 80, 12), f"{q} end-to-end latency (s)", fill="black", font=font)
        for k in range(6):
            y = y0 + h - k * h / 5
            d.line([x0 - 4, y, x0, y], fill="black")
            d.text((x0 - 45, y - 7), f"{top * k / 5:g}", fill="black", font=font)
        for f in (0.2, 0.4, 0.6, 0.8, 1.0):
            x = x0 + f * w
            d.line([x, y0 + h, x, y0 + h + 4], fill="black")
            d.text((x - 10, y0 + h + 8), f"{f:.1f}", fill="black", font=font)
        d.text((x0 + w / 2 - 90, y0 + h + 26), f"load (fraction of the {r['load_basis']} peak)", fill="black",
               font=font)
        for mode, s in series.items():
            pts = [(x0 + float(f) * w, y0 + h - v[q] / top * h) for f, v in sorted(s.items()) if v[q] is not None]
            if len(pts) > 1:
                d.line(pts, fill=COLORS[mode], width=3)
            for x, y in pts:
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=COLORS[mode])
    for i, mode in enumerate(series):
        x = 80 + i * 200
        d.rectangle([x, 440, x + 14, 452], fill=COLORS[mode])
        d.text((x + 20, 438), mode + (" (alone)" if mode == "ceiling" else ""), fill="black", font=font)
    img.save(path)


# ---- the whole run and the command line --------------------------------------------------------
LAYOUT_NOTE = ("One replica per deployment. The Diffuser (and the reference's pipeline replica) asks for every "
               "core, so torch runs as many threads; the other stages keep their defaults and share the same "
               "cores (Ray's logical CPUs are set to what the stages ask for, plus one).")


def run_bench(plan: Plan, out_dir: Path, model: str | None = None, modes=MODES, work: Path | None = None,
              log: Callable[[str], None] | None = None) -> list[Path]:
    """Run the ceiling and the chosen served modes; write the results; return the written paths."""
    import torch
    t_start = time.time()
    log = log or _progress(t_start)
    machine = describe_machine()
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, GPU {machine['gpu']}, "
        f"load {machine['load_average_at_start']}")
    torch.set_flush_denormal(True)
    ceiling = run_ceiling(plan, model, log)
    basis = "step_level" if "step_level" in modes else "ceiling"  # whose peak the load fractions are of
    rates = None if basis == "step_level" else arrival_rates(plan, ceiling["images_per_s"])
    served, layout = {}, {}
    if modes:
        work = work or Path.cwd() / ".imagine" / f"bench-{os.getpid()}"
        try:
            with local_cluster(work, model) as cfg:
                layout = replica_layout(cfg)
                for mode in sorted(modes, key=lambda m: m != basis):  # the basis first: its peak sets the rates
                    served[mode], rates = run_served(mode, cfg, plan, rates, log)
        except BaseException:
            log(f"stopped; the replicas' logs are in {work / 'ray'}")
            raise
        shutil.rmtree(work, ignore_errors=True)  # Ray's logs too, once all went well
    results = assemble(plan, machine, model, ceiling, served, layout, basis, rates,
                       round(time.time() - t_start, 1))
    stem = f"{results['date']}-{results['machine_tag']}" + ("-quick" if plan.name == "quick" else "")
    paths = write_results(results, out_dir, stem)
    log(f"done in {results['seconds'] / 60:.1f} min: " + ", ".join(map(str, paths)))
    return paths


def assemble(plan: Plan, machine: dict, model: str | None, ceiling: dict, served: dict, layout: dict,
             load_basis: str, rates: dict[str, float], seconds: float) -> dict:
    """The results file's content: the raw measurements plus summary, ratios and goals."""
    from pipeline.spec import PipelineSpec
    spec = PipelineSpec.load(model)
    results = {"date": time.strftime("%Y-%m-%d"), "machine_tag": machine_tag(machine), "machine": machine,
               "model": {"name": spec.name, "defaults": spec.defaults.model_dump()}, "plan": asdict(plan),
               "load_basis": load_basis, "arrival_rates_rps": {f: round(r, 5) for f, r in rates.items()},
               "layout": layout, "layout_note": LAYOUT_NOTE, "ceiling": ceiling, "modes": served, "seconds": seconds}
    results["summary"] = summarize(results)
    results["ratios"] = ratios(results["summary"])
    results["goals"] = goals(results["summary"], machine["gpu"])
    return results


def arrival_rates(plan: Plan, peak_images_per_s: float) -> dict[str, float]:
    """Requests/s of each load fraction: that fraction of a peak (images/s) over the mix's images per request."""
    return {f"{f:g}": f * peak_images_per_s / mean_images(plan.mix) for f in plan.fractions}


def _progress(t0: float) -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[bench {time.time() - t0:6.0f}s] {msg}", flush=True)
    return log


def _plan_line(plan: Plan, name: str, duration: str) -> str:
    return (f"  {name:<8} loads {', '.join(map(str, plan.fractions))}; {plan.closed_window_s:g} s / "
            f"{plan.open_window_s:g} s, N={plan.max_requests}; ceiling batch sizes {plan.ceiling_batch_sizes}: "
            f"{duration} on 2 CPU cores")


HELP = f"""\
Runs, in one go on this machine and the same model (the built-in one unless --model):
  1. ceiling        Pipeline.generate in this process at its best batch size (a sweep), no serving;
  2. reference      Ray Serve's Stable Diffusion example design (ingress + one deployment running the whole
                    pipeline per request, no batching; deployments/reference.py);
  3. request_level  our graph, stages.diffuser.batching: request (@serve.batch of whole requests);
  4. step_level     our graph, batching: step (continuous batching at denoising-step boundaries).
A local S3 server and Ray are started once (temp dir and data under ./.imagine/bench-<pid>, removed after);
the served modes are deployed in turn and driven over loopback HTTP: a closed loop for peak throughput,
then open-loop Poisson arrivals at fractions of the step-level peak (step-level runs first) with the mix
of steps 20/50 and n 1/4.

Plans (closed-loop window / open-loop window per load, at most N requests per load):
{_plan_line(QUICK, "--quick", "about 9 minutes")}
{_plan_line(FULL, "full", "about 25 minutes")}
Both use {FULL.clients} closed-loop clients. Run it on an otherwise idle machine: it measures time.

Writes <out>/<date>-<machine>[-quick].json (machine, raw per-request numbers, a top-level "summary" with
peak_images_per_s and p99_s per mode and load), .md (tables, ratios, goals, definitions) and .png
(latency vs load).

Definitions:
{DEFINITIONS.replace('**', '').replace('`', '')}"""


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `imagine bench` to the command line (run it with `cmd_bench`)."""
    b = subparsers.add_parser("bench", help="benchmark the ceiling, the reference design, request- and step-level "
                              "batching", description="Benchmark of issue 8 (see below).", epilog=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--quick", action="store_true", help="the short plan (about 9 minutes) instead of the full one")
    b.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder (default: bench/results)")
    b.add_argument("--model", default=None, help="model folder with pipeline.json (default: the built-in model)")
    b.add_argument("--modes", default=",".join(MODES),
                   help=f"served modes to run, comma-separated (default: {','.join(MODES)}); the ceiling always "
                        "runs (it sets the arrival rates when step_level is not run)")


def cmd_bench(args: argparse.Namespace) -> int:
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = set(modes) - set(MODES)
    if unknown:
        print(f"error: unknown --modes {sorted(unknown)}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    run_bench(QUICK if args.quick else FULL, args.out, model=args.model, modes=modes)
    return 0

