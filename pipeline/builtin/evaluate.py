"""Evaluate the built-in models with the independent analyzer; write reports/.

    python -m pipeline.builtin.evaluate            # full report (a few minutes on 2 cores)
    python -m pipeline.builtin.evaluate --quick    # smaller samples
    python -m pipeline.builtin.evaluate --only diversity,sample_sheet   # those sections, merged into reports/

Every number comes from the rule-based analyzer (`pipeline.builtin.analyzer`), never from the model's
own CLIP, except the CLIP retrieval and best-of reranking rows, which measure CLIP itself.
Output: reports/evaluation.json, reports/evaluation.md, reports/sample_sheet.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..generate import Pipeline
from ..request import GenerationRequest
from . import analyzer, dataset, domain
from .configs import write_model
from .diversity import (
    CANDIDATES,
    CHAOS_SHEET_PROMPT,
    CHAOS_VALUES,
    DIVERSITY_SEEDS,
    diversity_lines,
    eval_diversity_section,
)
from .train import EVAL_DEGRADATION, degrade

logger = logging.getLogger(__name__)


def attribute_rates(analyses, combos) -> dict:
    """Shape, colour, background and all-three accuracy of analyses against expected combos."""
    n = max(1, len(combos))
    hits = {"shape": 0, "color": 0, "background": 0, "all": 0}
    for a, (shape, color, background) in zip(analyses, combos):
        ok = (a.shape == shape, a.color == color, a.background == background)
        for k, v in zip(("shape", "color", "background"), ok):
            hits[k] += v
        hits["all"] += all(ok)
    return {k: round(v / n, 4) for k, v in hits.items()} | {"n": len(combos)}


def split_rates(analyses, combos) -> dict:
    seen = [(a, c) for a, c in zip(analyses, combos) if not domain.is_held_out(c)]
    held = [(a, c) for a, c in zip(analyses, combos) if domain.is_held_out(c)]
    return {"seen": attribute_rates(*zip(*seen)) if seen else None,
            "held_out": attribute_rates(*zip(*held)) if held else None}


# ---- 1. the analyzer itself ------------------------------------------------------------------
def eval_analyzer(n: int, seed: int) -> dict:
    b = dataset.ProceduralDataset(seed=seed, combos=domain.ALL_COMBOS).batch(n)
    return attribute_rates(analyzer.analyze_batch(b.images), b.combos)


# ---- 2. CLIP zero-shot retrieval -------------------------------------------------------------
def eval_retrieval(pipe: Pipeline, n: int, seed: int) -> dict:
    """Pick the right canonical caption among all 168 combos for fresh images."""
    captions = [domain.format_caption(c, 0) for c in domain.ALL_COMBOS]
    text = pipe.scorer.text_features(captions)                                    # (168, E)
    out = {}
    for split, combos in (("seen", domain.SEEN), ("held_out", sorted(domain.HELD_OUT))):
        b = dataset.ProceduralDataset(seed=seed).batch(n, combos=combos)
        pred = (pipe.scorer.image_features(b.images) @ text.T).argmax(1).tolist()
        out[split] = round(sum(domain.ALL_COMBOS[p] == c for p, c in zip(pred, b.combos)) / n, 4)
    return out


# ---- 3. VAE reconstructions --------------------------------------------------------------------
@torch.no_grad()
def eval_vae(pipe: Pipeline, n: int, seed: int) -> dict:
    vae = pipe.sampler.vae
    b = dataset.ProceduralDataset(seed=seed).batch(n, combos=sorted(domain.HELD_OUT))
    recon = (vae.decode(vae.encode(b.images * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    mse = F.mse_loss(recon, b.images).item()
    return {"held_out_all_three": attribute_rates(analyzer.analyze_batch(recon), b.combos)["all"],
            "psnr_db": round(10 * math.log10(1 / mse), 2), "n": n}


# ---- 4. generation adherence -------------------------------------------------------------------
def generate_prompts(pipe: Pipeline, seeds: list[int], best_of: int = 1, **settings) -> tuple[list, list]:
    """Every prompt of PROMPT_LIST x seeds; returns (pixels (N, 3, h, w) at sample size, combos)."""
    images, combos = [], []
    for prompt, combo in zip(domain.PROMPT_LIST, domain.PROMPT_COMBOS):
        for seed in seeds:
            req = pipe.resolve(GenerationRequest(prompt=prompt, seed=seed * 1000, best_of=best_of, upscale=1,
                                                 **settings))
            pixels = torch.stack(pipe.sampler.sample(pipe.sample_requests(req)))
            if best_of > 1:
                order, _ = pipe.scorer.rank(pixels, prompt)
                pixels = pixels[order[:1]]
            images.append(pixels[0])
            combos.append(combo)
    return images, combos


def eval_generation(pipe: Pipeline, seeds: list[int], best_of: int = 1, **settings) -> dict:
    images, combos = generate_prompts(pipe, seeds, best_of=best_of, **settings)
    return split_rates(analyzer.analyze_batch(torch.stack(images)), combos)


# ---- 5. upscaler ----------------------------------------------------------------------------
def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004), 11x11 Gaussian window sigma 1.5, per channel, data range 1."""
    g = torch.exp(-(torch.arange(11) - 5.0) ** 2 / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11)
    mu_x, mu_y = F.conv2d(x, w, groups=3), F.conv2d(y, w, groups=3)
    sxx = F.conv2d(x * x, w, groups=3) - mu_x ** 2
    syy = F.conv2d(y * y, w, groups=3) - mu_y ** 2
    sxy = F.conv2d(x * y, w, groups=3) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.mean().item()


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    return 10 * math.log10(1 / F.mse_loss(x, y).item())


@torch.no_grad()
def eval_upscaler(pipe: Pipeline, n: int, seed: int) -> dict:
    b = dataset.ProceduralDataset(seed=seed).batch(n, combos=sorted(domain.HELD_OUT), hr_size=domain.HR_SIZE)
    hr = b.hr_images
    lr = degrade(hr, 4, generator=torch.Generator().manual_seed(seed), **EVAL_DEGRADATION)
    sr = pipe.upscaler.upscale(lr, 4)
    bic = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    return {"degradation": EVAL_DEGRADATION, "n": n,
            "rrdbnet": {"psnr_db": round(psnr(sr, hr), 2), "ssim": round(ssim(sr, hr), 4)},
            "bicubic": {"psnr_db": round(psnr(bic, hr), 2), "ssim": round(ssim(bic, hr), 4)}}


# ---- 6. variations (Midjourney's V: image-to-image from one delivered image) -------------------------
COPY_FLOOR = 4 / 255  # a variation closer than this (mean absolute pixel difference) to its source is a copy


@torch.no_grad()
def eval_variations(pipe: Pipeline, seeds: list[int], strengths: tuple[float, ...] = (0.3, 0.6),
                    n_variations: int = 4, prompts: int | None = None, batch: int = 16) -> dict:
    """Variations the way the service makes them: each prompt's image is generated at the defaults, delivered
    (upscaled, a PNG), read back at the sample size (`image_tensor`, as the JobRunner does) and varied with the
    same prompt and new seeds at each strength. Per strength: the share of variations that keep all three
    attributes the analyzer sees in the chosen image, the share that match the prompt, and how far they moved
    (mean absolute pixel difference to the chosen image at the sample size; `copy_floor`)."""
    import io

    from ..generate import image_tensor, make_sample_requests

    def sample_all(requests):
        return [img for k in range(0, len(requests), batch) for img in pipe.sampler.sample(requests[k:k + batch])]

    cases = [(prompt, combo, seed) for prompt, combo in list(zip(domain.PROMPT_LIST, domain.PROMPT_COMBOS))[:prompts]
             for seed in seeds]
    reqs = [pipe.resolve(GenerationRequest(prompt=p, seed=seed * 1000 + 7, n=1)) for p, _, seed in cases]
    embs = [pipe.text_encoder.encode([r.prompt, r.negative_prompt]) for r in reqs]
    chosen = sample_all([sr for r, e in zip(reqs, embs) for sr in make_sample_requests(r, e)])
    inits = []
    for r, pixels in zip(reqs, chosen):
        delivered = pipe.upscaler.upscale(pixels[None], r.upscale)[0]
        buf = io.BytesIO()
        Image.fromarray((delivered.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(buf, "PNG")
        inits.append(image_tensor(buf.getvalue(), r.sample_width, r.sample_height))
    chosen_combos = [a.combo for a in analyzer.analyze_batch(torch.stack(inits))]
    # strength 0 (no step runs): the VAE's round trip, the least any variation can differ from the chosen image
    vae = pipe.sampler.vae
    stacked = torch.stack(inits)
    roundtrip = (stacked if vae is None else (vae.decode(pipe.sampler.encode(stacked) / vae.config.scaling_factor)
                                              .sample.float() / 2 + 0.5).clamp(0, 1))
    out = {"cases": len(cases), "variations_per_case": n_variations, "copy_floor": round(COPY_FLOOR, 4),
           "vae_roundtrip_abs_diff": round((roundtrip - stacked).abs().mean().item(), 4),
           "chosen_match_prompt": round(sum(c == tuple(k) for c, (_, k, _) in zip(chosen_combos, cases)) / len(cases),
                                        4)}
    for strength in strengths:
        vreqs = [r.model_copy(update={"seed": r.seed + 500, "n": n_variations, "init_key": "eval",
                                      "strength": strength}) for r in reqs]
        images = sample_all([sr for r, e, init in zip(vreqs, embs, inits) for sr in make_sample_requests(r, e, init)])
        analyses = analyzer.analyze_batch(torch.stack(images))
        keep = prompt_ok = 0
        diffs, from_roundtrip, siblings = [], [], []
        for i, a in enumerate(analyses):
            case = i // n_variations
            keep += chosen_combos[case] is not None and a.combo == chosen_combos[case]
            prompt_ok += a.combo == tuple(cases[case][1])
            diffs.append((images[i] - inits[case]).abs().mean().item())
            from_roundtrip.append((images[i] - roundtrip[case]).abs().mean().item())
            if i % n_variations:
                siblings.append((images[i] - images[i - 1]).abs().mean().item())
        n = len(analyses)
        out[str(strength)] = {"n": n, "keep_all_three": round(keep / n, 4), "match_prompt": round(prompt_ok / n, 4),
                              "mean_abs_diff": round(sum(diffs) / n, 4), "min_abs_diff": round(min(diffs), 4),
                              "above_copy_floor": round(sum(d > COPY_FLOOR for d in diffs) / n, 4),
                              "mean_abs_diff_to_roundtrip": round(sum(from_roundtrip) / n, 4),
                              "mean_abs_diff_between_variations": round(sum(siblings) / max(1, len(siblings)), 4)}
    return out


# ---- 7. latency ----------------------------------------------------------------------------
def eval_latency(pipe: Pipeline, batch: int, steps: int, repeats: int = 2, **settings) -> float:
    """Seconds per image, guidance and VAE decode included (best of `repeats`)."""
    req = pipe.resolve(GenerationRequest(prompt=domain.PROMPT_LIST[0], n=batch, steps=steps, seed=0, upscale=1,
                                         **settings))
    sample_requests = pipe.sample_requests(req)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe.sampler.sample(sample_requests)
        best = min(best, time.perf_counter() - t0)
    return round(best / batch, 4)


# ---- 8. sample sheet ---------------------------------------------------------------------------
def sample_sheet(pipe: Pipeline, path: Path, n_prompts: int = 8, seeds: tuple[int, ...] = (0, 1, 2, 3),
                 chaos_values: tuple[int, ...] = CHAOS_VALUES, chaos_prompt: str = CHAOS_SHEET_PROMPT) -> None:
    """A grid of prompts (rows, half of them held-out) x seeds at the served defaults, then one row per --chaos
    value (`chaos_prompt`, the same seeds), upscaled x4, captioned."""
    seen = [p for p, c in zip(domain.PROMPT_LIST, domain.PROMPT_COMBOS) if not domain.is_held_out(c)]
    held = [p for p, c in zip(domain.PROMPT_LIST, domain.PROMPT_COMBOS) if domain.is_held_out(c)]
    prompts = seen[:n_prompts // 2] + held[:n_prompts - n_prompts // 2]
    rows = [({"prompt": p}, p + (" (held-out)" if p in held else "")) for p in prompts]
    rows += [({"prompt": chaos_prompt, "chaos": c}, f"--chaos {c}: {chaos_prompt}") for c in chaos_values]
    cell, label_w = 128, 330
    sheet = Image.new("RGB", (label_w + cell * len(seeds), cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (request, label) in enumerate(rows):
        [res] = pipe.generate([{**request, "n": len(seeds), "seed": seeds[0]}])
        draw.text((6, row * cell + cell // 2 - 6), label, fill="black")
        for col, img in enumerate(res.images):
            sheet.paste(img.resize((cell, cell)), (label_w + col * cell, row * cell))
    sheet.save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.builtin.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: built-in)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="report folder (default: reports/)")
    p.add_argument("--quick", action="store_true", help="smaller samples (a minute)")
    p.add_argument("--only", default=None, metavar="SECTION[,SECTION]",
                   help=f"run only these sections ({', '.join(SECTIONS)}) and merge them into the existing "
                        "evaluation.json / .md (the others are kept as they are)")
    p.add_argument("--diversity-seeds", type=int, default=DIVERSITY_SEEDS,
                   help=f"images per prompt for the diversity section (default: {DIVERSITY_SEEDS})")
    args = p.parse_args(argv)
    only = None if args.only is None else [x.strip() for x in args.only.split(",") if x.strip()]
    if only is not None and (unknown := sorted(set(only) - set(SECTIONS))):
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_flush_denormal(True)
    args.out.mkdir(parents=True, exist_ok=True)
    n, seeds = (200, [0, 1]) if args.quick else (1000, [0, 1, 2, 3])
    pipe = Pipeline.load(args.model)
    d = pipe.spec.defaults
    report_file = args.out / "evaluation.json"
    report = {"model": pipe.spec.name, "machine": machine(), "defaults": d.model_dump(mode="json"), "seeds": seeds,
              "prompts": len(domain.PROMPT_LIST)}
    if only is not None and report_file.is_file():  # merge: every other section stays as it was measured
        report = json.loads(report_file.read_text())

    run = time.strftime("%Y-%m-%d %H:%M")  # this invocation: the sections it measures compare with each other

    def stamp(name) -> None:  # section `name` was measured now, in this run: saved at once
        report.setdefault("measured_at", {})[name] = time.strftime("%Y-%m-%d %H:%M")
        report.setdefault("measured_in_run", {})[name] = run
        report_file.write_text(json.dumps(report, indent=2) + "\n")

    def save(name, value) -> None:
        report[name] = value
        stamp(name)

    steps = [("analyzer_clean", lambda: eval_analyzer(n, 11)),
             ("clip_retrieval", lambda: eval_retrieval(pipe, n // 2, 12)),
             ("vae_reconstruction", lambda: eval_vae(pipe, n // 2, 13)),
             ("generation", lambda: eval_generation(pipe, seeds)),
             ("generation_best_of_4", lambda: eval_generation(pipe, seeds, best_of=4)),
             ("generation_random_init", lambda: eval_generation(random_init(pipe), seeds)),
             ("step_sweep", lambda: step_sweep(pipe, seeds[:1])),
             ("upscaler", lambda: eval_upscaler(pipe, n // 4, 14)),
             ("variations", lambda: eval_variations(pipe, seeds)),
             ("latency_s_per_image", lambda: latency_table(pipe)),
             ("diversity", lambda: eval_diversity_section(
                 pipe, seeds=list(range(4 if args.quick else args.diversity_seeds)),
                 candidates=() if args.quick else CANDIDATES,
                 save=lambda section: save("diversity", section)))]
    assert [name for name, _ in steps] + ["sample_sheet"] == list(SECTIONS)
    for name, fn in steps:
        if only is not None and name not in only:
            continue
        t0 = time.perf_counter()
        save(name, fn())
        logger.info("%s (%.0fs): %s", name, time.perf_counter() - t0, report[name])
    if only is None or "sample_sheet" in only:
        sample_sheet(pipe, args.out / "sample_sheet.png")
        stamp("sample_sheet")
    try:
        (args.out / "evaluation.md").write_text(markdown(report))
    except KeyError as e:  # --only on a folder without a full report
        logger.warning("evaluation.md not written: the report has no %s section (run the full evaluation)", e)
    logger.info("wrote %s", args.out)


SECTIONS = ("analyzer_clean", "clip_retrieval", "vae_reconstruction", "generation", "generation_best_of_4",
            "generation_random_init", "step_sweep", "upscaler", "variations", "latency_s_per_image", "diversity",
            "sample_sheet")


def random_init(pipe: Pipeline) -> Pipeline:
    """The floor: the same architecture with random weights (same CLIP, so the prompts encode)."""
    import tempfile
    folder = write_model(Path(tempfile.mkdtemp()) / "random", "builtin", seed=123,
                         defaults=pipe.spec.defaults.model_dump())
    rnd = Pipeline.load(folder)
    rnd.text_encoder, rnd.scorer = pipe.text_encoder, pipe.scorer
    return rnd


def step_sweep(pipe: Pipeline, seeds: list[int]) -> list[dict]:
    rows = []
    for scheduler, steps in (("dpmpp_2m", 6), ("dpmpp_2m", 8), ("dpmpp_2m", 12), ("dpmpp_2m", 20), ("euler_a", 20)):
        r = eval_generation(pipe, seeds, scheduler=scheduler, steps=steps)
        rows.append({"scheduler": scheduler, "steps": steps, "seen_all": r["seen"]["all"],
                     "held_out_all": r["held_out"]["all"],
                     "s_per_image_b16": eval_latency(pipe, 16, steps, repeats=1, scheduler=scheduler)})
    return rows


def latency_table(pipe: Pipeline) -> dict:
    d = pipe.spec.defaults
    out = {f"batch{b}_steps{s}": eval_latency(pipe, b, s) for b in (1, 16) for s in (20, 50)}
    out[f"default_batch16_steps{d.steps}"] = eval_latency(pipe, 16, d.steps)
    out[f"default_batch1_steps{d.steps}"] = eval_latency(pipe, 1, d.steps)
    return out


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def measured_at(r: dict) -> list[str]:
    """A line naming when each section was measured, when they come from different runs (`--only` re-runs): the
    machine's speed varies up to 4x between days, so timings compare only within one run."""
    when, runs = r.get("measured_at") or {}, r.get("measured_in_run") or {}
    present = [s for s in SECTIONS if s in r or s in when]
    if len({runs.get(s, when.get(s)) for s in present}) <= 1:  # one run (reports before runs were kept: one time)
        return []
    return ["Measured at different times (`--only` re-runs; compare timings only within one run): "
            + "; ".join(f"{s} {when.get(s) or 'earlier'}" for s in present) + ".", ""]


def markdown(r: dict) -> str:
    def row(name, g):
        s, h = g["seen"], g["held_out"]
        return (f"| {name} | {s['shape']:.1%} / {h['shape']:.1%} | {s['color']:.1%} / {h['color']:.1%} | "
                f"{s['background']:.1%} / {h['background']:.1%} | **{s['all']:.1%}** / **{h['all']:.1%}** |")
    d = r["defaults"]
    lines = [f"# Evaluation of `{r['model']}`", "",
             f"Machine: {r['machine']}. Defaults: {d['scheduler']}, {d['steps']} steps, guidance "
             f"{d['guidance_scale']}. {r['prompts']} prompts x {len(r['seeds'])} seeds; analyzer-judged.", "",
             *measured_at(r),
             "## Generation adherence (seen / held-out)", "",
             "| model | shape | colour | background | all three |", "|---|---|---|---|---|",
             row("built-in", r["generation"]), row("built-in, best-of-4 CLIP rerank", r["generation_best_of_4"]),
             row("random init (floor)", r["generation_random_init"]), "",
             *diversity_lines(r.get("diversity"), r["defaults"]),
             "## Components", "",
             f"- Analyzer on clean procedural images: {r['analyzer_clean']['all']:.1%} all three "
             f"({r['analyzer_clean']['n']} images)",
             f"- CLIP zero-shot retrieval among all 168 captions: seen {r['clip_retrieval']['seen']:.1%}, "
             f"held-out {r['clip_retrieval']['held_out']:.1%}",
             f"- VAE reconstructions of held-out images keeping all three attributes: "
             f"{r['vae_reconstruction']['held_out_all_three']:.1%} (PSNR {r['vae_reconstruction']['psnr_db']} dB)",
             f"- Upscaler x4 on held-out images, degradation {r['upscaler']['degradation']}: RRDBNet "
             f"{r['upscaler']['rrdbnet']['psnr_db']} dB / SSIM {r['upscaler']['rrdbnet']['ssim']}, bicubic "
             f"{r['upscaler']['bicubic']['psnr_db']} dB / SSIM {r['upscaler']['bicubic']['ssim']}", "",
             *variations_lines(r.get("variations")),
             "## Sampler settings (all three, seen / held-out; 1 seed)", "",
             "| scheduler | steps | seen | held-out | s/image at batch 16 |", "|---|---|---|---|---|"]
    lines += [f"| {s['scheduler']} | {s['steps']} | {s['seen_all']:.1%} | {s['held_out_all']:.1%} | "
              f"{s['s_per_image_b16']:.3f} |" for s in r["step_sweep"]]
    lines += ["", "## Latency (seconds per image, guidance and VAE decode included)", "",
              "| setting | s/image |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["latency_s_per_image"].items()]
    return "\n".join(lines + ["", "![sample sheet](sample_sheet.png)", ""])


def variations_lines(v: dict | None) -> list[str]:
    if v is None:
        return []
    lines = ["## Variations (image-to-image from a delivered image, same prompt, new seeds)", "",
             f"{v['cases']} chosen images ({v['chosen_match_prompt']:.1%} of them match their prompt) x "
             f"{v['variations_per_case']} variations per strength. *Keep*: all three attributes of the chosen image "
             f"(as the analyzer sees it); *prompt*: all three of the prompt; *moved*: mean absolute pixel difference "
             f"to the chosen image at the sample size (0-1), and the share above the copy floor "
             f"{v['copy_floor']:.4f} (= {v['copy_floor'] * 255:.0f}/255). The VAE's round trip alone (strength 0) "
             f"moves an image by {v['vae_roundtrip_abs_diff']:.4f}; *between*: mean absolute difference of a "
             f"variation to its sibling (four different images, not one image four times).", "",
             "| strength | keep all three | match the prompt | mean moved | least moved | above the copy floor | "
             "moved from the round trip | between |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s} | {v[s]['keep_all_three']:.1%} | {v[s]['match_prompt']:.1%} | {v[s]['mean_abs_diff']:.4f} | "
              f"{v[s]['min_abs_diff']:.4f} | {v[s]['above_copy_floor']:.1%} | {v[s]['mean_abs_diff_to_roundtrip']:.4f} "
              f"| {v[s]['mean_abs_diff_between_variations']:.4f} |" for s in v if s[:1].isdigit()]
    return lines + [""]


if __name__ == "__main__":
    main()
