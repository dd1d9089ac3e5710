"""The `imagine bench` command: `cluster.cli` finds this module by name (`cluster.cli.EXTENSIONS`) and calls
`add_command(subparsers)` to add it, `run(args)` to run it. `run_bench` is the whole run."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from .ceiling import run_ceiling
from .report import DEFINITIONS, assemble, describe_machine, write_results
from .serving import local_cluster, replica_layout, run_served
from .workload import FULL, MODES, QUICK, Plan, arrival_rates


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
                    pipeline per request, no batching; bench/reference.py);
  3. request_level  our graph with a Diffuser batching whole requests (@serve.batch; bench/request_level.py);
  4. step_level     our graph as shipped (continuous batching at denoising-step boundaries).
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


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `imagine bench` to the command line (run it with `run`)."""
    b = subparsers.add_parser("bench", help="benchmark the ceiling, the reference design, request- and step-level "
                              "batching", description="Benchmark of issue 8 (see below).", epilog=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--quick", action="store_true", help="the short plan (about 9 minutes) instead of the full one")
    b.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder (default: bench/results)")
    b.add_argument("--model", default=None, help="model folder with pipeline.json (default: the built-in model)")
    b.add_argument("--modes", default=",".join(MODES),
                   help=f"served modes to run, comma-separated (default: {','.join(MODES)}); the ceiling always "
                        "runs (it sets the arrival rates when step_level is not run)")


def run(args: argparse.Namespace) -> int:
    """Run `imagine bench` with the parsed arguments; 2 for unknown --modes."""
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = set(modes) - set(MODES)
    if unknown:
        print(f"error: unknown --modes {sorted(unknown)}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    run_bench(QUICK if args.quick else FULL, args.out, model=args.model, modes=modes)
    return 0

