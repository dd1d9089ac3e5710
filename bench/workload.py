"""The workload of `imagine bench`: the plans, the request mix, Poisson arrivals and the request bodies."""
from __future__ import annotations

import random
from dataclasses import dataclass

MIX = ((20, 1), (20, 4), (50, 1), (50, 4))  # (steps, n), equally likely: half the images take 20 steps, half 50
PROMPTS = ("a red circle on a black background", "a blue square on a yellow background",
           "a white triangle on a purple background", "a green circle on a white background")
MODES = ("reference", "request_level", "step_level")
SUMMARY_KEYS = ("ceiling",) + MODES
APP_NAME = "bench"  # the Serve application every served mode is deployed as


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
            open_window_s=60, max_requests=40, drain_s=180, ceiling_batch_sizes=(1, 2, 4, 8, 16, 32))
# One GPU, the SD-1.5-shaped model at its native 512x512 (`imagine bench --device cuda --model sd15-shaped
# --gpu-quick`), the same mix of 20/50 steps: sized from SD-1.5's known speed (about 20 steps/s for one image at
# batch 1 in fp16 on an A100, about twice that per image batched), the whole run takes about 7.5 minutes on one
# H200-class GPU (an A100 about 8.5), plus about a minute the first time to write the model. Eight clients keep
# about 20 images in flight, more than the Diffuser's 16-image batch; the sweep reaches that batch size, so the
# served step rate can be set against raw sampling at the batch size the Diffuser ran.
GPU_QUICK = Plan("gpu-quick", fractions=(0.3, 0.7), clients=8, warmup_s=10, closed_window_s=30, open_window_s=15,
                 max_requests=8, drain_s=45, ceiling_batch_sizes=(1, 4, 8, 16))
PLANS = {"quick": QUICK, "full": FULL, "gpu-quick": GPU_QUICK}


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


def arrival_rates(plan: Plan, peak_images_per_s: float) -> dict[str, float]:
    """Requests/s of each load fraction: that fraction of a peak (images/s) over the mix's images per request."""
    return {f"{f:g}": f * peak_images_per_s / mean_images(plan.mix) for f in plan.fractions}
