"""Statistics for `imagine bench`: percentiles, latency and window throughput of client outcomes, CPU use by
program (Linux /proc) and the Diffuser's own counters from Ray's metrics export port."""
from __future__ import annotations

import math
import os
from pathlib import Path

from .load import Outcome
from .workload import APP_NAME


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
            "s_per_image_step": round(d["step_seconds"] / d["image_steps"], 4) if d["image_steps"] else None,
            # the served step rate: image-steps per second of stepping (what raw sampling is compared with)
            "image_steps_per_stepping_s": round(d["image_steps"] / d["step_seconds"], 3) if d["step_seconds"] else None}
