"""Seed diversity: do a prompt's images differ the way its training scenes do? (issue 16)

For each eval prompt, k seeds; the analyzer reads each image's shape centre (x, y) and size; the spread (sample
standard deviation) of each across the seeds, over the same spread of k rendered training scenes of that
combination (read by the same analyzer), averaged over prompts and the three statistics: 1.0 = the images vary
as much as the data, a grid of copies scores 0. Measured beside all-three adherence for the served defaults, each
--chaos value and the candidate sampler settings; `python -m pipeline.builtin.evaluate --only diversity` writes
its section into reports/evaluation.json / .md.
"""
from __future__ import annotations

import logging
import time
from functools import lru_cache

import numpy as np
import torch

from ..generate import Pipeline
from ..request import GenerationRequest
from . import analyzer, domain

logger = logging.getLogger(__name__)

GEOMETRY = ("cx", "cy", "size")  # the analyzer's reading of a scene's layout: shape centre x, y and half-extent


def geometry(analyses) -> np.ndarray:
    """(N, 3) shape centre x, y and size of each analysis (normalized); NaN where no shape was found."""
    return np.array([[np.nan if getattr(a, k) is None else getattr(a, k) for k in GEOMETRY] for a in analyses],
                    dtype=np.float64).reshape(-1, len(GEOMETRY))


def spread(values: np.ndarray) -> np.ndarray:
    """Per column, the sample standard deviation (ddof 1) of the rows without NaN; NaN below two rows."""
    values = values[~np.isnan(values).any(axis=1)]
    return values.std(axis=0, ddof=1) if len(values) >= 2 else np.full(values.shape[1], np.nan)


@lru_cache(maxsize=512)
def training_spread(combo: tuple[str, str, str], k: int, groups: int | None = None, seed: int = 0
                    ) -> tuple[float, ...]:
    """What `spread` gives, on average, for k training scenes of `combo`: `groups` (default max(64, 512 / k))
    draws of k scenes from the domain's sampler, rendered, read by the same analyzer, their spread averaged.
    Comparing like with like (the same k, the same analyzer), the training distribution against itself scores 1.0
    in expectation."""
    groups = groups or max(64, 512 // k)
    rng = np.random.default_rng([seed, k, *(domain.ALL_COMBOS.index(tuple(combo)),)])
    images = domain.render_batch(domain.sample_scenes(rng, groups * k, [tuple(combo)]))
    g = geometry(analyzer.analyze_batch(images)).reshape(groups, k, len(GEOMETRY))
    return tuple(float(v) for v in np.nanmean([spread(x) for x in g], axis=0))


def diversity(analyses_per_prompt: list[list], combos: list) -> dict:
    """Seed diversity: per prompt, the spread of each GEOMETRY statistic across its images over the same
    statistic of k training scenes of its combo (`training_spread`), averaged over prompts; `mean` averages the
    three (1.0: the images vary as much as the data does; a grid of copies scores 0). Images without a shape
    are left out (a prompt needs two with one)."""
    ratios, split = [], []
    for analyses, combo in zip(analyses_per_prompt, combos):
        g = geometry(analyses)
        k = int((~np.isnan(g).any(axis=1)).sum())
        if k < 2:
            continue
        ratios.append(spread(g) / np.array(training_spread(tuple(combo), k)))
        split.append(domain.is_held_out(combo))
    r, held = np.array(ratios), np.array(split, dtype=bool)
    per = {k: round(float(np.mean(r[:, i])), 3) for i, k in enumerate(GEOMETRY)}
    return {**per, "mean": round(float(np.mean(r)), 3), "seen": round(float(np.mean(r[~held])), 3) if (~held).any()
            else None, "held_out": round(float(np.mean(r[held])), 3) if held.any() else None,
            "prompts": len(r), "seeds": max(len(a) for a in analyses_per_prompt)}


def sample_prompts(pipe: Pipeline, seeds: list[int], batch: int = 16, **settings) -> list[list[torch.Tensor]]:
    """Every prompt of PROMPT_LIST at each of `seeds` (seed x 1000, as `generate_prompts`), batched `batch`
    images per sampler call (batch-invariant: the same pixels within 1/255); per prompt, its images at the
    sample size."""
    from ..generate import make_sample_requests
    requests = []
    for prompt in domain.PROMPT_LIST:
        emb = pipe.text_encoder.encode([prompt, ""])
        for seed in seeds:
            req = pipe.resolve(GenerationRequest(prompt=prompt, seed=seed * 1000, upscale=1, **settings))
            requests += make_sample_requests(req, emb)
    images = [img for k in range(0, len(requests), batch) for img in pipe.sampler.sample(requests[k:k + batch])]
    return [images[i:i + len(seeds)] for i in range(0, len(images), len(seeds))]


def eval_diversity(pipe: Pipeline, seeds: list[int], adherence_seeds: int = 4, **settings) -> dict:
    """One sampler setting (GenerationRequest fields; the model's defaults for the rest): all-three adherence on
    the first `adherence_seeds` seeds of each prompt (the `generation` evaluation's images), seed diversity on
    all of `seeds`."""
    t0 = time.perf_counter()
    per_prompt = sample_prompts(pipe, seeds, **settings)
    analyses = [analyzer.analyze_batch(torch.stack(images)) for images in per_prompt]
    first = [a for per in analyses for a in per[:adherence_seeds]]
    combos = [c for c in domain.PROMPT_COMBOS for _ in range(min(adherence_seeds, len(seeds)))]
    from .evaluate import split_rates  # (evaluate imports this module)
    rates = split_rates(first, combos)
    every = split_rates([a for per in analyses for a in per], [c for c in domain.PROMPT_COMBOS for _ in seeds])
    shapes = [a for per in analyses for a in per if a.color is not None]
    return {"settings": settings, "seen_all": rates["seen"]["all"], "held_out_all": rates["held_out"]["all"],
            "adherence_seeds": min(adherence_seeds, len(seeds)),
            "seen_all_every_seed": every["seen"]["all"], "held_out_all_every_seed": every["held_out"]["all"],
            # how far the shape's and the background's colours are from their palette colours (RGB 0-255): fidelity
            "color_error": round(float(np.mean([a.color_distance for a in shapes])), 1) if shapes else None,
            "background_error": round(float(np.mean([a.background_distance for per in analyses for a in per])), 1),
            "diversity": diversity(analyses, list(domain.PROMPT_COMBOS)), "s": round(time.perf_counter() - t0, 1)}


DIVERSITY_SEEDS = 8      # images per prompt for the diversity metric (the first 4 also give the adherence)
DIVERSITY_TARGET = {"diversity": 0.8, "seen_all": 0.97, "held_out_all": 0.90}  # issue 16, at the served defaults
CHAOS_VALUES = (0, 25, 50, 100)
PLAIN = {"guidance_interval": (0.0, 1.0), "early_guidance": 1.0}  # guidance at every step (the previous default)
# the sampler settings measured beside the served defaults (DPM-Solver++, 8 steps, guidance 4 unless stated);
# each names every guidance field, so it does not move when the defaults do
CANDIDATES: tuple[tuple[str, dict], ...] = (
    ("guidance 4 at every step (the previous default)", {"guidance_scale": 4.0, **PLAIN}),
    ("guidance 2.5 at every step", {"guidance_scale": 2.5, **PLAIN}),
    ("guidance 1.5 at every step", {"guidance_scale": 1.5, **PLAIN}),
    ("no guidance (guidance 1)", {"guidance_scale": 1.0, **PLAIN}),
    *((f"guidance 4 in (0, {hi}]", {"guidance_scale": 4.0, "guidance_interval": (0.0, hi), "early_guidance": 1.0})
      for hi in (0.95, 0.8, 0.7, 0.55, 0.4, 0.3, 0.2)),
    ("guidance 6 in (0, 0.8]", {"guidance_scale": 6.0, "guidance_interval": (0.0, 0.8), "early_guidance": 1.0}),
    ("guidance 6 in (0, 0.7]", {"guidance_scale": 6.0, "guidance_interval": (0.0, 0.7), "early_guidance": 1.0}),
    *((f"guidance 4 in (0, 0.3], early {e}", {"guidance_scale": 4.0, "guidance_interval": (0.0, 0.3),
                                              "early_guidance": e}) for e in (0.9, 0.8, 0.7)),
    ("guidance 4 in (0, 0.4], early 0.8", {"guidance_scale": 4.0, "guidance_interval": (0.0, 0.4),
                                           "early_guidance": 0.8}),
)


def eval_diversity_section(pipe: Pipeline, seeds: list[int] | None = None, candidates=CANDIDATES,
                           chaos_values=CHAOS_VALUES, save=None) -> dict:
    """Seed diversity beside all-three adherence for the served defaults, each --chaos value and each candidate
    setting (`eval_diversity`); `save(section)` after each row (a long run keeps what it measured)."""
    seeds = list(range(DIVERSITY_SEEDS)) if seeds is None else seeds
    d = pipe.spec.defaults
    section = {"seeds": len(seeds), "adherence_seeds": min(4, len(seeds)), "prompts": len(domain.PROMPT_LIST),
               "served_defaults": d.model_dump(mode="json"), "target": DIVERSITY_TARGET, "chaos": [], "settings": []}
    for chaos in chaos_values:
        row = eval_diversity(pipe, seeds, chaos=chaos)
        interval, early = d.chaos_guidance(chaos)
        section["chaos"].append({"chaos": chaos, "guidance_interval": list(interval), "early_guidance": early, **row})
        logger.info("diversity, chaos %s: %s", chaos, row)
        if save:
            save(section)
    default = next((r for r in section["chaos"] if r["chaos"] == 0), None)
    if default is not None:
        g = DIVERSITY_TARGET
        met = all(default[k] >= g[k] for k in ("seen_all", "held_out_all")) and \
            default["diversity"]["mean"] >= g["diversity"]
        section["defaults"] = {**default, "label": "served defaults (chaos 0)", "met": met}
    for label, settings in candidates:
        row = eval_diversity(pipe, seeds, **settings)
        section["settings"].append({"label": label, **row})
        logger.info("diversity, %s: %s", label, row)
        if save:
            save(section)
    return section


# a seen prompt whose seed diversity is near the eval prompts' mean (with the weights shipped 2026-12-01, at the served
# defaults: 1.00, mean 0.87; per prompt 0.57 "a blue circle on a red background" to 1.09; the issue's "a red circle on
# a black background": 0.93)
CHAOS_SHEET_PROMPT = "a blue triangle on an orange background"


def diversity_lines(v: dict | None, measured_defaults: dict) -> list[str]:
    if v is None:
        return []
    d, g = v["served_defaults"], v["target"]

    def guidance(x: dict) -> str:
        scale = x.get("settings", {}).get("guidance_scale", d["guidance_scale"])
        lo, hi = x.get("guidance_interval") or x.get("settings", {}).get("guidance_interval", d["guidance_interval"])
        early = x.get("early_guidance", x.get("settings", {}).get("early_guidance", d["early_guidance"]))
        return f"{scale:g} | ({lo:g}, {hi:g}] | {early:g}"

    def row(label: str, x: dict) -> str:
        dv = x["diversity"]
        return (f"| {label} | {guidance(x)} | {x['seen_all']:.1%} / {x['held_out_all']:.1%} | "
                f"{x['seen_all_every_seed']:.1%} / {x['held_out_all_every_seed']:.1%} | {dv['cx']:.2f} | "
                f"{dv['cy']:.2f} | {dv['size']:.2f} | **{dv['mean']:.2f}** | {x['color_error']:.1f} |")
    head = ["| setting | guidance | interval | early | all three, 4 seeds (seen / held-out) | all three, "
            f"{v['seeds']} seeds | centre x | centre y | size | diversity | colour error |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines = ["## Seed diversity and --chaos", "",
             f"Per prompt, {v['seeds']} seeds; the analyzer reads each image's shape centre (x, y) and size (its "
             "bounding box); the spread (standard deviation) of each across the seeds, over the spread of "
             f"{v['seeds']} training scenes of the same combination (rendered by the domain's sampler, read by the "
             f"same analyzer), averaged over the {v['prompts']} prompts; *diversity* averages the three. 1.0: the "
             "images vary as much as the training data; a grid of copies scores 0. All three attributes on the "
             f"first {v['adherence_seeds']} seeds (the adherence evaluation's images) and on all "
             f"{v['seeds']}. *Colour error*: the shape's measured colour's distance to its palette colour (RGB "
             f"0-255). Guidance: the scale inside the interval of noise levels t/T, *early* above it (below 1 "
             "mixes the unconditional prediction in), 1 below it. "
             f"Served defaults: {d['scheduler']}, {d['steps']} steps, guidance {d['guidance_scale']:g} in "
             f"({d['guidance_interval'][0]:g}, {d['guidance_interval'][1]:g}], early {d['early_guidance']:g}"
             + ("" if (measured_defaults.get("guidance_interval"), measured_defaults.get("early_guidance"))
                == (d["guidance_interval"], d["early_guidance"]) else
                " (the other sections of this report were measured at the previous defaults, guidance at every "
                "step)") + ".", ""]
    if "defaults" in v:
        x = v["defaults"]
        lines += [f"Target (issue 16) at the served defaults: diversity >= {g['diversity']} with all three >= "
                  f"{g['seen_all']:.0%} seen / >= {g['held_out_all']:.0%} held-out (4 seeds): "
                  f"diversity {x['diversity']['mean']:.2f}, {x['seen_all']:.1%} / {x['held_out_all']:.1%}: "
                  f"**{'met' if x['met'] else 'not met'}**.", ""]
    lines += ["### --chaos (at the served defaults)", "",
              f"The sample sheet's last rows: \"{CHAOS_SHEET_PROMPT}\" at each value, the same 4 seeds. Prompts "
              "differ: the sheet's prompt varies about as much as the prompts' mean, some combinations less (the "
              "model draws them in a narrower range of sizes and places).", "", *head]
    lines += [row(f"--chaos {x['chaos']}", x) for x in v["chaos"]]
    if v["settings"]:
        lines += ["", "### Sampler settings (DPM-Solver++, 8 steps)", "", *head]
        lines += [row(x["label"], x) for x in v["settings"]]
    return lines + [""]
