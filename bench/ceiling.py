"""The ceiling of `imagine bench`: `Pipeline.generate` in this process (text encode, sample, upscale, PNG
encode; no S3 write, no serving) at its best batch size, and each request kind alone (the latency floor)."""
from __future__ import annotations

import time
from typing import Callable

from .stats import pcts
from .workload import Plan, body, mean_steps_per_image


def generate_pngs(pipe, requests: list[dict], callback=None) -> int:
    """Generate in-process and PNG-encode every image (the output work, less the S3 write); returns images."""
    import io
    images = [img for r in pipe.generate(requests, callback) for img in r.images]
    for img in images:
        img.save(io.BytesIO(), format="PNG")
    return len(images)


def full_batch(b: int, steps: int, mix) -> list[dict]:
    """Requests of the mix's largest n adding up to exactly b images with this step count."""
    top, out = max(n for _, n in mix), []
    while (left := b - sum(r["n"] for r in out)) > 0:
        out.append(body(steps, min(top, left), seed=len(out)))
    return out


class StepClock:
    """A `Pipeline.generate` callback timing the denoising steps of one full batch (the GPU's queue drained at
    each step): `steps_and_seconds()` gives the batch steps from the first step's end to the last's and their
    time, raw sampling without text encoding, the first step or the VAE decode."""

    def __init__(self, device: str):
        import torch
        self.sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
        self.times: list[float] = []

    def __call__(self, done: int, total: int) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def steps_and_seconds(self) -> tuple[int, float]:
        return len(self.times) - 1, self.times[-1] - self.times[0]


def run_ceiling(plan: Plan, model: str | None, log: Callable[[str], None], device: str = "cpu",
                compile_mode: str = "off") -> dict:
    """Sweep batch sizes with full batches of each step count; then each request kind alone (the floor).
    Each sweep point also reports raw sampling (`sampling_image_steps_per_s`, the denoising steps alone)."""
    from pipeline import Pipeline

    from .sd15 import run_dtype

    pipe = Pipeline.load(model, device=device, dtype=run_dtype(device))
    compile_s = 0.0
    if compile_mode != "off":  # the served Diffuser's compiled UNet (its buckets: 2 rows per image at most)
        from pipeline.compiled import compile_for_spec
        compile_s = compile_for_spec(pipe.sampler, pipe.spec, compile_mode, 2 * max(plan.ceiling_batch_sizes))
        log(f"ceiling: compiled the UNet ({compile_mode}) in {compile_s:.0f}s")
    generate_pngs(pipe, [body(2, 1, seed=0)])  # the first call is slow (lazy initialisation)
    images_at = {s: sum(n for s2, n in plan.mix if s2 == s) for s, _ in plan.mix}  # images per step count
    share = {s: k / sum(images_at.values()) for s, k in images_at.items()}
    sweep = []
    for b in plan.ceiling_batch_sizes:
        pipe.max_batch_size = b
        generate_pngs(pipe, full_batch(b, 2, plan.mix))  # warm-up at this batch shape
        per_image, batch_steps, step_seconds = {}, 0, 0.0
        for steps in share:
            clock = StepClock(device)
            t = time.perf_counter()
            generate_pngs(pipe, full_batch(b, steps, plan.mix), clock)
            per_image[steps] = (time.perf_counter() - t) / b
            k, dt = clock.steps_and_seconds()
            batch_steps, step_seconds = batch_steps + k, step_seconds + dt
        images_per_s = 1 / sum(share[s] * per_image[s] for s in share)
        sampling = b * batch_steps / step_seconds if step_seconds > 0 else None
        sweep.append({"batch_size": b, "seconds_per_image": {str(s): round(v, 4) for s, v in per_image.items()},
                      "images_per_s": round(images_per_s, 4),
                      "steps_per_s": round(images_per_s * mean_steps_per_image(plan.mix), 3),
                      "sampling_image_steps_per_s": None if sampling is None else round(sampling, 3)})
        log(f"ceiling: batch {b}: {images_per_s:.3f} images/s, {sweep[-1]['steps_per_s']:.1f} steps/s "
            f"(raw sampling {sweep[-1]['sampling_image_steps_per_s']} image-steps/s)")
    best = max(sweep, key=lambda r: r["images_per_s"])
    pipe.max_batch_size = max(n for _, n in plan.mix)
    alone = {}
    for steps, n in plan.mix:
        t = time.perf_counter()
        generate_pngs(pipe, [body(steps, n, seed=1)])
        alone[f"{steps}x{n}"] = round(time.perf_counter() - t, 4)
    log(f"ceiling: each kind alone (s): {alone}")
    return {"compile": compile_mode, "compile_seconds": round(compile_s, 1),
            "sweep": sweep, "best_batch_size": best["batch_size"], "images_per_s": best["images_per_s"],
            "steps_per_s": best["steps_per_s"], "alone_s": alone, "latency_s": pcts(list(alone.values()))}
