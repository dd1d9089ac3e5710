"""`make soak`: a bounded soak of the served graph, loopback only, stopping by itself.

    python -m bench.soak [--minutes 10] [--fraction 0.8] [--out bench/results]

1. A local cluster as `imagine bench` brings one up (S3, Redis, Ray, the built-in model unless --model).
2. Its peak: a closed loop of 12 clients for a minute (images/s).
3. An open loop of Poisson arrivals at `fraction` of that peak (the bench's mix of 20/50 steps x n 1/4) for
   `minutes`, every job followed to its end; meanwhile the resident memory of every process of the cluster
   (Ray's, the Serve replicas', SeaweedFS, Redis) is read from /proc every 10 s.
4. Verdicts: every job succeeded; the p99 latency of the last minute within 1.5x the first minute's; each
   process's memory slope (least squares over the run after its first two minutes, MB/min) below 1 MB/min.
Results go to `<out>/<date>-<machine>-soak.{json,md}`.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from .load import graph_sender, run_closed_loop, run_open_loop
from .report import describe_machine, machine_tag
from .serving import deploy, local_cluster
from .stats import latency_stats, percentile, window_throughput
from .workload import MIX, mean_images, poisson_schedule

SAMPLE_EVERY_S = 10.0
GOAL_SLOPE_MB_PER_MIN = 1.0
GOAL_P99_RATIO = 1.5


def rss_by_process(root_pids: set[int]) -> dict[str, float]:
    """Resident MB of each live descendant of `root_pids` (and the roots), keyed "name (pid)". A Ray worker's
    title changes with the method it runs ("ray::ServeReplica:app:Upscaler.handle_request"); the method is left
    off, so that one process keeps one key."""
    parents = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parents[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found = set(root_pids)
    while more := {pid for pid, ppid in parents.items() if ppid in found and pid not in found}:
        found |= more
    out = {}
    for pid in found:
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, IndexError, ValueError):
            continue
        base = Path(name).name
        if base.startswith("ray::"):
            base = base.split(".", 1)[0]
        out[f"{base} ({pid})"] = rss
    return out


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mx, my = sum(t for t, _ in samples) / n, sum(v for _, v in samples) / n
    den = sum((t - mx) ** 2 for t, _ in samples)
    return round(60 * sum((t - mx) * (v - my) for t, v in samples) / den, 3) if den else None


def soak(minutes: float, fraction: float, out_dir: Path, model: str | None, log=print) -> dict:
    work = Path.cwd() / ".imagine" / f"soak-{os.getpid()}"
    with local_cluster(work, model) as cfg:
        url = deploy(cfg, "step_level")
        send = graph_sender(url)
        log("peak: closed loop, 12 clients, 60 s")
        outs, t0, t1 = run_closed_loop(send, clients=12, warmup_s=10, window_s=60, drain_s=120)
        peak = window_throughput(outs, t0, t1)["images_per_s"]
        rate = fraction * peak / mean_images(MIX)
        log(f"peak {peak:.2f} images/s; open loop at {fraction:.0%}: {rate:.3f} requests/s for {minutes:g} min")
        roots = {os.getpid()}
        memory: dict[str, list[tuple[float, float]]] = {}
        stop, start = threading.Event(), time.time()

        def sample() -> None:
            while not stop.wait(SAMPLE_EVERY_S):
                for name, mb in rss_by_process(roots).items():
                    memory.setdefault(name, []).append((time.time() - start, mb))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        schedule = poisson_schedule(rate, minutes * 60, 10**6, MIX, seed=11)
        outs, t_start = run_open_loop(send, schedule, minutes * 60 + 300)
        stop.set()
        sampler.join()
    return summarize(outs, t_start, minutes, fraction, peak, memory, out_dir, log)


def summarize(outs, t_start, minutes, fraction, peak, memory, out_dir: Path, log) -> dict:
    done = [o for o in outs if o.ok]
    first = [o.done - o.sent for o in done if o.sent - t_start < 60]
    last = [o.done - o.sent for o in done if o.sent - t_start >= minutes * 60 - 60]
    p99_first, p99_last = percentile(first, 99), percentile(last, 99)
    slopes = {name: slope_mb_per_min([s for s in samples if s[0] >= 120]) for name, samples in memory.items()}
    slopes = {k: v for k, v in slopes.items() if v is not None}
    half = minutes * 30  # the second half alone: growth that levels off (caches warming) against growth that goes on
    late = {name: slope_mb_per_min([s for s in samples if s[0] >= half]) for name, samples in memory.items()}
    machine = describe_machine()
    r = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "minutes": minutes, "fraction_of_peak": fraction,
         "peak_images_per_s": round(peak, 3), "submitted": len(outs), "succeeded": len(done),
         "failed": sum(o.error is not None for o in outs), "lost": len(outs) - len(done) - sum(
             o.error is not None for o in outs), "latency": latency_stats(outs),
         "p99_first_minute_s": p99_first, "p99_last_minute_s": p99_last,
         "p99_ratio": round(p99_last / p99_first, 2) if p99_first and p99_last else None,
         "memory_slope_mb_per_min": dict(sorted(slopes.items(), key=lambda kv: -abs(kv[1]))),
         "max_slope_mb_per_min": max(slopes.values(), default=None),
         "memory_slope_second_half_mb_per_min": {k: late[k] for k in sorted(slopes, key=lambda k: -abs(slopes[k]))},
         "memory_mb": {name: {"first": samples[0][1], "last": samples[-1][1]} for name, samples in memory.items()}}
    r["goals"] = {"every job succeeded": r["succeeded"] == r["submitted"],
                  f"p99 last minute <= {GOAL_P99_RATIO}x first": r["p99_ratio"] is not None
                  and r["p99_ratio"] <= GOAL_P99_RATIO,
                  f"every process < {GOAL_SLOPE_MB_PER_MIN} MB/min": r["max_slope_mb_per_min"] is not None
                  and r["max_slope_mb_per_min"] < GOAL_SLOPE_MB_PER_MIN}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{r['date']}-{machine_tag(machine)}-soak"
    stem.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(r))
    log(render(r))
    return r


def render(r: dict) -> str:
    lines = [f"# Soak: {r['minutes']:g} min at {r['fraction_of_peak']:.0%} of the peak ({r['date']})", "",
             f"Peak {r['peak_images_per_s']} images/s. Jobs submitted {r['submitted']}, succeeded {r['succeeded']}, "
             f"failed {r['failed']}, lost {r['lost']}. p99 latency first minute {r['p99_first_minute_s']:.1f} s, "
             f"last minute {r['p99_last_minute_s']:.1f} s (ratio {r['p99_ratio']}).", "",
             "| goal | met |", "|---|---|", *[f"| {g} | {'yes' if ok else '**no**'} |" for g, ok in r["goals"].items()],
             "", "Memory slope of each process after its first two minutes, and over the second half alone (MB/min, "
             "largest first), with its resident MB at the first and last sample:", "",
             "| process | MB/min | MB/min, second half | MB first -> last |", "|---|---|---|---|",
             *[f"| {name} | {slope} | {r['memory_slope_second_half_mb_per_min'].get(name)} | "
               f"{r['memory_mb'][name]['first']:.0f} -> {r['memory_mb'][name]['last']:.0f} |"
               for name, slope in list(r["memory_slope_mb_per_min"].items())[:20]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--fraction", type=float, default=0.8, help="of the measured peak (default 0.8)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    args = p.parse_args(argv)
    r = soak(args.minutes, args.fraction, args.out, args.model)
    return 0 if all(r["goals"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
