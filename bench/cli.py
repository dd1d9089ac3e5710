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
from .sd15 import SHAPES, resolve_model
from .serving import local_cluster, replica_layout, run_served
from .workload import FULL, GPU_QUICK, MODES, QUICK, Plan, arrival_rates

DEVICES = ("cpu", "cuda")


def run_bench(plan: Plan, out_dir: Path, model: str | None = None, modes=MODES, work: Path | None = None,
              log: Callable[[str], None] | None = None, device: str = "cpu", compile_mode: str = "off") -> list[Path]:
    """Run the ceiling and the chosen served modes on `device` ("cpu" or "cuda": the ceiling in this process and
    the model stages on one GPU); write the results; return the written paths. `model`: a folder, or one of
    bench.sd15.SHAPES (written under .imagine/models when missing)."""
    import torch
    t_start = time.time()
    log = log or _progress(t_start)
    machine = describe_machine()
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, GPU {machine['gpu']}, "
        f"load {machine['load_average_at_start']}")
    if device == "cuda" and not machine["gpu"]:
        raise RuntimeError("--device cuda, but torch sees no GPU here")
    name = model if model in SHAPES else None
    if name:
        log(f"model {name}: {resolve_model(name)}")  # built on first use (about a minute for sd15-shaped)
    model = resolve_model(model)
    torch.set_flush_denormal(True)
    ceiling = run_ceiling(plan, model, log, device, compile_mode)
    if device == "cuda":
        torch.cuda.empty_cache()  # the ceiling's cached blocks, back to the GPU the served stages share
    basis = "step_level" if "step_level" in modes else "ceiling"  # whose peak the load fractions are of
    rates = None if basis == "step_level" else arrival_rates(plan, ceiling["images_per_s"])
    served, layout = {}, {}
    if modes:
        work = work or Path.cwd() / ".imagine" / f"bench-{os.getpid()}"
        try:
            # the served Diffusers (step- and request-level) batch at the ceiling sweep's best size, with its UNet
            diffuser = {"max_batch_size": ceiling["best_batch_size"], "compile": compile_mode}
            with local_cluster(work, model, device, diffuser) as cfg:
                layout = replica_layout(cfg)
                for mode in sorted(modes, key=lambda m: m != basis):  # the basis first: its peak sets the rates
                    served[mode], rates = run_served(mode, cfg, plan, rates, log)
        except BaseException:
            log(f"stopped; the replicas' logs are in {work / 'ray'}")
            raise
        shutil.rmtree(work, ignore_errors=True)  # Ray's logs too, once all went well
    results = assemble(plan, machine, model, ceiling, served, layout, basis, rates,
                       round(time.time() - t_start, 1), device)
    suffix = {"quick": "-quick", "gpu-quick": "-gpu-quick"}.get(plan.name, "")
    stem = f"{results['date']}-{results['machine_tag']}" + (f"-{name}" if name else "") + suffix
    paths = write_results(results, out_dir, stem)
    log(f"done in {results['seconds'] / 60:.1f} min: " + ", ".join(map(str, paths)))
    return paths



def _progress(t0: float) -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[bench {time.time() - t0:6.0f}s] {msg}", flush=True)
    return log


def _plan_line(plan: Plan, name: str, duration: str) -> str:
    return (f"  {name:<11} loads {', '.join(map(str, plan.fractions))}; {plan.closed_window_s:g} s / "
            f"{plan.open_window_s:g} s, N={plan.max_requests}, {plan.clients} clients; ceiling batch sizes "
            f"{plan.ceiling_batch_sizes}: {duration}")


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
{_plan_line(QUICK, "--quick", "about 9 minutes on 2 CPU cores")}
{_plan_line(FULL, "full", "about 25 minutes on 2 CPU cores")}
{_plan_line(GPU_QUICK, "--gpu-quick", "about 7.5 minutes on one H200-class GPU")}
Run it on an otherwise idle machine: it measures time.

The GPU plan (issue 15), one command:
  imagine bench --device cuda --model sd15-shaped --gpu-quick
sd15-shaped is Stable Diffusion 1.5's architecture with seeded random weights (no hub is reachable): its UNet
(860M parameters), its VAE and a ViT-L/14-shaped open_clip text tower, fp16, 512x512 out, no upscaler; written
once to .imagine/models/sd15-shaped (about a minute, 2 GB) and reused. --device cuda runs the ceiling on the GPU
and puts the model stages on shares of that one GPU (Diffuser 0.5, text encoder and upscaler 0.25 each). The
duration is an estimate, not a measurement: SD-1.5 samples about 20 steps/s for one image at batch 1 in fp16 on
an A100 and about twice that per image batched, which puts the whole run near 8.5 minutes on an A100 and 7.5 on
an H200-class GPU, inside 10. The GPU goals: step-level peak >= 2x the reference, and the Diffuser's served step
rate (image-steps per second of stepping) >= 0.9x raw sampling in the ceiling sweep at the same batch size.
sd15-tiny is the same structure scaled down (64x64 out): the plan on a CPU in minutes
(--device cpu --model sd15-tiny --gpu-quick).

Writes <out>/<date>-<machine>[-<sd15 model>][-quick|-gpu-quick].json (machine and GPU, raw per-request
numbers, a top-level "summary" with peak_images_per_s and p99_s per mode and load), .md (tables, ratios, goals,
definitions) and .png (latency vs load).

Definitions:
{DEFINITIONS.replace('**', '').replace('`', '')}"""


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `imagine bench` to the command line (run it with `run`)."""
    b = subparsers.add_parser("bench", help="benchmark the ceiling, the reference design, request- and step-level "
                              "batching", description="Benchmark of issues 8 and 15 (see below).", epilog=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    plan = b.add_mutually_exclusive_group()
    plan.add_argument("--quick", action="store_true", help="the short plan (about 9 minutes) instead of the full one")
    plan.add_argument("--gpu-quick", action="store_true",
                      help="the GPU plan: 512x512 with --model sd15-shaped, steps 20 and 50, every mode, about 7.5 "
                           "minutes on one H200-class GPU (an estimate from SD-1.5's ~20 it/s at batch 1, fp16, "
                           "on an A100)")
    b.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the ceiling and the model stages run (default: cpu); cuda: one GPU, shared by "
                        "the stages")
    b.add_argument("--compile", default="off", choices=("off", "default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the UNet (pipeline/compiled.py) for the ceiling and the served Diffusers alike "
                        "(stages.diffuser.compile); default off")
    b.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder (default: bench/results)")
    b.add_argument("--model", default=None,
                   help=f"model folder with pipeline.json, or {' or '.join(SHAPES)} (built under .imagine/models "
                        "when missing; see below) (default: the built-in model)")
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
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("error: --device cuda, but torch sees no GPU on this machine", file=sys.stderr)
            return 2
    plan = GPU_QUICK if args.gpu_quick else QUICK if args.quick else FULL
    run_bench(plan, args.out, model=args.model, modes=modes, device=args.device, compile_mode=args.compile)
    return 0

