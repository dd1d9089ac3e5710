"""The ceiling of `imagine bench`: `Pipeline.generate` in this process (text encode, sample, upscale, PNG
encode; no S3 write, no serving) at its best batch size, and each request kind alone (the latency floor)."""
from __future__ import annotations

import time
from typing import Callable

from .stats import pcts
from .workload import Plan, body, mean_steps_per_image


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
