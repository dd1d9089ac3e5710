"""The results of `imagine bench`: the machine, the summary, ratios and goals, and the files: <stem>.json
(everything), <stem>.md (tables, goals, definitions) and <stem>.png (latency against load)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

from .workload import MODES, SUMMARY_KEYS, Plan, mean_images

GOALS = {"step_peak_vs_ceiling": 0.85, "step_p99_vs_request_p99_at_0.7": 0.6}
GPU_GOALS = {"step_peak_vs_reference": 2.0, "served_step_rate_vs_raw": 0.9}  # judged on --device cuda runs
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

LAYOUT_NOTE = ("One replica per deployment. The Diffuser (and the reference's pipeline replica) asks for every "
               "core, so torch runs as many threads; the other stages keep their defaults and share the same "
               "cores (Ray's logical CPUs are set to what the stages ask for, plus one).")
GPU_LAYOUT_NOTE = (" On the GPU (--device cuda) the model stages share one GPU (num_gpus): the Diffuser half of it, "
                   "the text encoder and the upscaler a quarter each; the reference's pipeline replica takes the "
                   "Diffuser's share.")


def assemble(plan: Plan, machine: dict, model: str | None, ceiling: dict, served: dict, layout: dict,
             load_basis: str, rates: dict[str, float], seconds: float, device: str = "cpu") -> dict:
    """The results file's content: the raw measurements plus summary, ratios and goals."""
    from pipeline.spec import PipelineSpec

    from .sd15 import run_dtype
    spec = PipelineSpec.load(model)
    results = {"date": time.strftime("%Y-%m-%d"), "machine_tag": machine_tag(machine), "machine": machine,
               "device": device, "dtype": str(run_dtype(device)).removeprefix("torch."),
               "model": {"name": spec.name, "defaults": spec.defaults.model_dump()}, "plan": asdict(plan),
               "load_basis": load_basis, "arrival_rates_rps": {f: round(r, 5) for f, r in rates.items()},
               "layout": layout, "layout_note": LAYOUT_NOTE + (GPU_LAYOUT_NOTE if device == "cuda" else ""),
               "ceiling": ceiling, "modes": served, "seconds": seconds}
    results["summary"] = summarize(results)
    results["ratios"] = ratios(results["summary"])
    results["step_rate_vs_raw"] = step_rate_vs_raw(results)
    results["goals"] = goals(results["summary"], machine["gpu"], device, results["step_rate_vs_raw"])
    return results


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
    gpu_memory = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None
    return {"hostname": platform.node(), "cpu": _cpu_model(), "cores": os.cpu_count(), "gpu": gpu,
            "gpu_memory_gib": gpu_memory, "cuda": torch.version.cuda if gpu else None,
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


def step_rate_vs_raw(results: dict) -> dict | None:
    """The step-level Diffuser's served step rate (image-steps per second of stepping, its own counters in the
    closed loop) against raw sampling in the ceiling sweep at the batch size nearest the Diffuser's mean batch;
    None when either is missing."""
    dif = results["modes"].get("step_level", {}).get("closed_loop", {}).get("diffuser") or {}
    sweep = [s for s in results["ceiling"]["sweep"] if s.get("sampling_image_steps_per_s")]
    served, batch = dif.get("image_steps_per_stepping_s"), dif.get("mean_batch_images")
    if not served or not batch or not sweep:
        return None
    raw = min(sweep, key=lambda s: (abs(s["batch_size"] - batch), -s["batch_size"]))
    return {"served_image_steps_per_s": served, "mean_batch_images": batch, "raw_batch_size": raw["batch_size"],
            "raw_image_steps_per_s": raw["sampling_image_steps_per_s"],
            "ratio": _ratio(served, raw["sampling_image_steps_per_s"])}


def goals(summary: dict, gpu: str | None, device: str = "cpu", step_rate: dict | None = None) -> list[dict]:
    peak, p99 = summary["peak_images_per_s"], summary["p99_s"]
    step_vs_ceiling = _ratio(peak["step_level"], peak["ceiling"])
    at7 = p99["step_level"].get("0.7"), p99["request_level"].get("0.7")
    step_vs_request = _ratio(*at7)
    goal = GOALS["step_peak_vs_ceiling"]
    out = [{"goal": f"step-level peak >= {goal:.0%} of the ceiling", "value": step_vs_ceiling,
            "met": None if step_vs_ceiling is None else step_vs_ceiling >= goal},
           {"goal": f"p99 at 70 % load: step-level <= {GOALS['step_p99_vs_request_p99_at_0.7']}x request-level",
            "value": step_vs_request,
            "met": None if step_vs_request is None else step_vs_request <= GOALS["step_p99_vs_request_p99_at_0.7"]}]
    vs_reference, served_vs_raw = _ratio(peak["step_level"], peak["reference"]), (step_rate or {}).get("ratio")
    g_ref, g_raw = GPU_GOALS["step_peak_vs_reference"], GPU_GOALS["served_step_rate_vs_raw"]
    raw_goal = (f"served step rate >= {g_raw}x raw sampling (the Diffuser's image-steps per second of stepping vs "
                "the ceiling sweep's at its batch size)")
    if device == "cuda":  # the GPU goals, judged
        out += [{"goal": f"GPU: step-level peak >= {g_ref:g}x the reference", "value": vs_reference,
                 "met": None if vs_reference is None else vs_reference >= g_ref},
                {"goal": f"GPU: {raw_goal}", "value": served_vs_raw,
                 "met": None if served_vs_raw is None else served_vs_raw >= g_raw}]
        return out
    out += [{"goal": "step-level peak vs the reference (reported, not targeted, on a CPU)", "value": vs_reference,
             "met": None},
            {"goal": f"{raw_goal} (reported on a CPU; a goal on the GPU)", "value": served_vs_raw, "met": None},
            {"goal": f"GPU goals (step-level peak >= {g_ref:g}x the reference; served step rate >= {g_raw}x raw "
                     "sampling), SD-1.5-shaped model",
             "value": None, "met": None, "note": "not run (no GPU lent)" if gpu is None else "not run (--device cpu)"}]
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
             f"{d['scheduler']}, guidance {d['guidance_scale']}; the mix sets the steps), on "
             f"{r.get('device', 'cpu')} in {r.get('dtype', 'float32')}. "
             f"Workload mix (steps x n, equally likely): {', '.join(f'{s}x{n}' for s, n in plan['mix'])}. "
             f"UNet compile: {r['ceiling'].get('compile', 'off')} (ceiling and served Diffusers alike"
             + (f", compiled in {r['ceiling']['compile_seconds']:g}s" if r['ceiling'].get('compile_seconds') else "")
             + "); "
             f"the served Diffusers batch up to the ceiling sweep's best size ({r['ceiling']['best_batch_size']}).",
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
                         f"{dif['image_steps_per_s']} image-steps/s (from its own counters)"
                         + (f"; {dif['image_steps_per_stepping_s']} image-steps per second of stepping"
                            if dif.get("image_steps_per_stepping_s") else ""))
    lines += ["", f"## Ceiling sweep (best batch size {r['ceiling']['best_batch_size']})", "",
              "Raw sampling: image-steps per second of the denoising steps alone (no text encoding, VAE decode or "
              "PNG), from the second step to the last of each full batch.", "",
              "| batch size | images/s | steps/s | raw sampling image-steps/s | s per image, by step count |",
              "|---|---|---|---|---|"]
    for s in r["ceiling"]["sweep"]:
        lines.append(f"| {s['batch_size']} | {s['images_per_s']:.3f} | {s['steps_per_s']:.1f} | "
                     f"{_s(s.get('sampling_image_steps_per_s'), '{:.1f}')} | "
                     f"{', '.join(f'{k}: {v}' for k, v in s['seconds_per_image'].items())} |")
    lines += ["", "## Replica layout", "", r["layout_note"], "", "| deployment | replicas | num_cpus | num_gpus |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {v['replicas']} | {v['num_cpus']} | {v.get('num_gpus', 0):g} |" for k, v in r["layout"].items()]
    lines += ["", "## Definitions", "", DEFINITIONS, "## GPU", "", gpu_note(r), ""]
    return "\n".join(lines)


def gpu_note(r: dict) -> str:
    """The GPU section: what this run was, and the served step rate against raw sampling."""
    gpu, rate = r["machine"]["gpu"], r.get("step_rate_vs_raw")
    compared = "" if not rate else (
        f" Served step rate: the step-level Diffuser stepped {rate['mean_batch_images']} images per step on average "
        f"at {rate['served_image_steps_per_s']} image-steps/s of stepping; raw sampling at batch "
        f"{rate['raw_batch_size']}: {rate['raw_image_steps_per_s']} image-steps/s "
        f"(ratio {_s(rate['ratio'], '{:.3f}')}).")
    if r.get("device") == "cuda":
        return (f"This run is on {gpu} ({r['machine'].get('gpu_memory_gib')} GiB, CUDA {r['machine'].get('cuda')}), "
                f"the ceiling in this process, the served stages on shares of the one GPU (num_gpus above). "
                f"{r['dtype']}: the ceiling, the reference's pipeline and request-level's Diffuser; the shipped "
                f"stages (TextEncoder, Diffuser, Upscaler) load in the dtype deployments/ gives them.{compared}")
    plan = " The GPU plan: `imagine bench --device cuda --model sd15-shaped --gpu-quick`."
    return ("not run (no GPU lent)." if not gpu else f"GPU present ({gpu}), not used (--device cpu).") + plan + compared


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
