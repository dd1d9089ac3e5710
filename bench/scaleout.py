"""Scale-out on paper: projected images/s and p99 for N GPUs with the Diffuser replicated, from a bench run.

    python -m bench.scaleout bench/results/<run>.json [--gpu-image-steps-per-s 30] [--head-cores 8]

Inputs, measured in the run: the control plane's CPU cost per job (Ingress, JobRunner, Publisher, Serve's
proxy, S3 and Redis: core-seconds per job in the closed loop; the model stages run on the GPUs), the mix's
steps per image and images per job. Assumed (named in the table): one Diffuser replica per GPU stepping
`gpu_image_steps_per_s` (an A100-class GPU on an SD-1.5-shaped UNet in fp16 with guidance at batch 8-16: about
30; the GPU run's own figure replaces it once one exists) `batch` images at a time; the control plane on one head
with `head_cores` cores (JobRunner replicas scaled on the queue so that every job in flight has a runner thread);
Poisson arrivals at 70 % of the projected peak.

The p99 model: a job's service time is its steps over the per-image step rate at the replica's batch (steps x
batch / image-steps/s), and it waits for a slot as in an M/M/c queue (Erlang C) whose c servers are the
replicas' batch slots; p99 = the service time of a 50-step job + the 99th percentile of that wait.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .workload import mean_images, mean_steps_per_image

# the control plane's processes (the model stages, TextEncoder and Upscaler included, run on the GPUs)
SERVING = ("Ingress replica", "JobRunner replica", "Publisher replica", "ray::ProxyActor", "weed", "redis-server")


def serving_core_seconds_per_job(results: dict) -> float:
    """Core-seconds per finished job of the control plane (HTTP, queue, job runner, PNG + S3 writes, Redis) in
    the step-level closed loop; the bench's clients poll each job's status, so the Ingress's share is high."""
    closed = results["modes"]["step_level"]["closed_loop"]
    peak = results["modes"]["step_level"]["peak"]
    cores = results["machine"]["cores"]
    share = sum(v for k, v in closed["cpu_share"].items() if k in SERVING)
    return share * cores / peak["requests_per_s"]


def erlang_c_wait_quantile(c: int, rho: float, mu: float, q: float = 0.99) -> float:
    """The q-quantile of the wait in an M/M/c queue with utilisation rho < 1 and service rate mu per server
    (Erlang C from the Erlang B recurrence, stable for thousands of servers)."""
    a, b = c * rho, 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    p_wait = b / (1 - rho * (1 - b))
    if p_wait <= 1 - q:
        return 0.0
    return math.log(p_wait / (1 - q)) / (c * mu * (1 - rho))


def project(results: dict, gpus: int, gpu_image_steps_per_s: float, head_cores: int, batch: int = 16,
            load: float = 0.7) -> dict:
    mix = [tuple(m) for m in results["plan"]["mix"]]
    images_per_job, steps_per_image = mean_images(mix), mean_steps_per_image(mix)
    per_job = serving_core_seconds_per_job(results)
    diffuser_images = gpus * gpu_image_steps_per_s / steps_per_image
    head_jobs = head_cores / per_job
    peak_images = min(diffuser_images, head_jobs * images_per_job)
    slots = max(1, round(gpus * batch))
    service_50 = 50 * batch / gpu_image_steps_per_s  # a 50-step image at a full batch
    mu = gpu_image_steps_per_s / batch / steps_per_image  # images/s per batch slot
    wait = erlang_c_wait_quantile(slots, load * peak_images / (slots * mu), mu)
    return {"gpus": gpus, "peak_images_per_s": round(peak_images, 2),
            "saturates": "Diffuser (GPU)" if diffuser_images <= head_jobs * images_per_job else "head CPU (serving)",
            "head_cores_at_peak": round(peak_images / images_per_job * per_job, 2),
            "p99_s_at_70pct": round(service_50 + wait, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    ap.add_argument("--gpu-image-steps-per-s", type=float, default=30.0)
    ap.add_argument("--head-cores", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16, help="images per Diffuser step (stages.diffuser.max_batch_size)")
    args = ap.parse_args(argv)
    results = json.loads(args.results.read_text())
    per_job = serving_core_seconds_per_job(results)
    print(f"control plane: {per_job:.3f} core-seconds per job (measured, {args.results.name})")
    print("| GPUs | peak images/s | saturates first | head cores busy at peak | p99 at 70 % load |")
    print("|---|---|---|---|---|")
    for g in (1, 4, 16, 64):
        p = project(results, g, args.gpu_image_steps_per_s, args.head_cores, args.batch)
        print(f"| {g} | {p['peak_images_per_s']} | {p['saturates']} | {p['head_cores_at_peak']} of "
              f"{args.head_cores} | {p['p99_s_at_70pct']} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
