"""The served modes of `imagine bench`: one local S3 server and Ray for the whole run, each mode deployed in
turn (replacing the last) as the Serve application `bench`, and measured over loopback HTTP."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from .load import Send, graph_sender, reference_sender, run_closed_loop, run_open_loop
from .stats import cpu_seconds_by_process, cpu_share, diffuser_counters, diffuser_use, latency_stats, window_throughput
from .workload import APP_NAME, Plan, arrival_rates, poisson_schedule

# --device cuda: the model stages (and the reference's pipeline replica, which takes the Diffuser's resources)
# share ONE GPU: the Diffuser half of it, the text encoder and the upscaler a quarter each
GPU_SHARES = {"diffuser": 0.5, "text_encoder": 0.25, "upscaler": 0.25}


def bench_config(model: str | None, s3, redis, work: Path, http_port: int, metrics_port: int, device: str = "cpu",
                 diffuser: dict | None = None):
    """The graph's config: one Diffuser replica with every core, the other stages at their defaults, auth off,
    a queue with no admission limit that a benchmark would hit (the bench measures the serving, not the 429s).
    On `device` "cuda" the model stages run there, on shares of one GPU (GPU_SHARES)."""
    from cluster.config import ImagineConfig
    creds = work / "s3-credentials.json"
    creds.touch(mode=0o600)
    creds.write_text(json.dumps({"access_key": s3.access_key, "secret_key": s3.secret_key}))
    password = work / "redis-password"
    password.touch(mode=0o600)
    password.write_text(redis.password)
    # the closed loop's 12 clients' jobs all run at once, as they did before the queue (the Diffuser's own
    # scheduler decides what steps together)
    stages = {"diffuser": {"ray_actor_options": {"num_cpus": os.cpu_count() or 1}, **(diffuser or {})},
              "job_runner": {"max_ongoing_requests": 64}}
    if device == "cuda":
        for name, share in GPU_SHARES.items():
            stage = stages.setdefault(name, {})
            stage["device"] = "cuda"
            stage.setdefault("ray_actor_options", {})["num_gpus"] = share
    return ImagineConfig.from_dict({
        "model": model,
        "cluster": {"app_name": APP_NAME, "http_port": http_port},
        "storage": {"endpoint_url": s3.endpoint_url, "bucket": "imagine-bench", "credentials_file": str(creds),
                    "access_key_env": "IMAGINE_BENCH_S3_ACCESS_KEY", "secret_key_env": "IMAGINE_BENCH_S3_SECRET_KEY",
                    "local": {"enabled": False}},
        "api": {"auth": "disabled", "api_keys_file": None, "max_queued_requests": -1},
        "queue": {"redis_url": redis.url, "password_file": str(password), "password_env": "IMAGINE_BENCH_REDIS",
                  "local": {"enabled": False}, "max_queued_image_steps": 10**9,
                  "max_queued_image_steps_per_key": 10**9},
        "stages": stages,
        "monitoring": {"enabled": False, "metrics_export_port": metrics_port},  # no Prometheus; Ray's port
    })


def replica_layout(cfg) -> dict:
    from cluster.config import DEPLOYMENT_NAMES
    return {name: {"replicas": cfg.stage(name).num_replicas, "num_cpus": cfg.stage(name).ray_actor_options.num_cpus,
                   "num_gpus": cfg.stage(name).ray_actor_options.num_gpus} for name in DEPLOYMENT_NAMES}


@contextlib.contextmanager
def local_cluster(work: Path, model: str | None, device: str = "cpu", diffuser: dict | None = None):
    """A local S3 server, Ray (temp dir in the work area) and Serve's HTTP proxy on a free port; yields the
    graph's config. Ray gets one GPU for `device` "cuda" (the first one), none for "cpu". Everything is
    stopped, and the S3 data removed, on exit."""
    import ray
    from ray import serve

    from cluster.config import DEPLOYMENT_NAMES
    from cluster.raynode import ray_temp_dir
    from cluster.redis_server import LocalRedis
    from cluster.seaweed import LocalS3Server, find_free_port, pick_s3_port

    work.mkdir(parents=True, exist_ok=True)
    s3 = LocalS3Server(work / "s3", pick_s3_port(), access_key="bench-" + secrets.token_hex(4),
                       secret_key=secrets.token_urlsafe(24))
    redis = LocalRedis(work / "redis", find_free_port(), password=secrets.token_urlsafe(16))
    s3.start()
    redis.start()
    try:
        cfg = bench_config(model, s3, redis, work, find_free_port(), find_free_port(), device, diffuser)
        # Ray runs its workers at nice 15 by default: they would yield the cores to this process's load
        # generator and to Ray's own daemons, which the in-process ceiling never has to. Same priority here.
        os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0",
                          RAY_metrics_report_interval_ms="1000")  # the Diffuser's counters, fresh within ~1 s
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO line per deploy in the progress
        cpus = math.ceil(sum(cfg.stage(n).ray_actor_options.num_cpus for n in DEPLOYMENT_NAMES)) + 1
        ray.init(num_cpus=cpus, num_gpus=1 if device == "cuda" else 0, include_dashboard=False,
                 dashboard_port=find_free_port(),  # not a running `up`'s
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
        redis.stop()
        shutil.rmtree(work / "s3", ignore_errors=True)
        shutil.rmtree(work / "redis", ignore_errors=True)


def deploy(cfg, mode: str) -> str:
    """Deploy one served mode (replacing the last) and return its base URL."""
    from ray import serve

    from deployments.app import build_app

    from .reference import build_reference_app
    from .request_level import RequestLevelDiffuser

    serve.delete(APP_NAME)
    if mode == "reference":
        app = build_reference_app(cfg)
    elif mode == "request_level":  # the same graph, its Diffuser batching whole requests
        app = build_app(cfg, classes={"diffuser": RequestLevelDiffuser})
    else:
        app = build_app(cfg)
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
