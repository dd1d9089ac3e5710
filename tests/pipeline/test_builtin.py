"""The shipped built-in model loads through the project's own loaders and follows prompts.

A small adherence sample judged by the independent analyzer: a broken loader, sampler or
text encoder drops it to chance (~1/168 for all three attributes right).
"""
import torch

from pipeline import Pipeline
from pipeline.builtin import analyzer, domain
from pipeline.spec import BUILTIN_DIR

FLOOR = 0.75  # all three attributes right; the evaluation report has the full figures


def test_builtin_model_follows_prompts():
    assert (BUILTIN_DIR / "pipeline.json").is_file(), \
        "the built-in model is missing: python -m pipeline.builtin.train all"
    pipe = Pipeline.load()
    seen = [(p, c) for p, c in zip(domain.PROMPT_LIST, domain.PROMPT_COMBOS) if not domain.is_held_out(c)][:4]
    held = [(p, c) for p, c in zip(domain.PROMPT_LIST, domain.PROMPT_COMBOS) if domain.is_held_out(c)][:4]
    results = pipe.generate([{"prompt": p, "n": 2, "seed": 100, "upscale": 1} for p, _ in seen + held])
    images = torch.stack([torch.from_numpy(__import__("numpy").array(img)).permute(2, 0, 1).float() / 255
                          for r in results for img in r.images])
    combos = [c for _, c in seen + held for _ in range(2)]
    analyses = analyzer.analyze_batch(images)
    rate = sum(a.combo == tuple(c) for a, c in zip(analyses, combos)) / len(combos)
    assert rate >= FLOOR, f"built-in adherence {rate:.0%} < {FLOOR:.0%}: {[a.combo for a in analyses]}"


def test_builtin_delivers_128px_by_default():
    [res] = Pipeline.load().generate([{"prompt": "a red circle on a black background", "seed": 1}])
    assert res.images[0].size == (128, 128) and res.request.sample_width == 32


def test_builtin_variations_keep_the_image_and_still_move():
    """Midjourney's V with the built-in model, the served way (delivered PNG read back, image-to-image): subtle
    variations (0.3) keep all three attributes of the chosen image, strong ones (0.6) still match the prompt, and
    both differ from the chosen image by more than the copy floor and than the VAE's own round trip. The full
    figures (40 prompts x 4 seeds) are in reports/evaluation.md."""
    from pipeline.builtin.evaluate import COPY_FLOOR, eval_variations
    r = eval_variations(Pipeline.load(), seeds=[3], prompts=12)
    subtle, strong = r["0.3"], r["0.6"]
    assert subtle["keep_all_three"] >= 0.95 and strong["match_prompt"] >= 0.90, r
    for v in (subtle, strong):
        assert v["mean_abs_diff"] > max(COPY_FLOOR, r["vae_roundtrip_abs_diff"]), r
        assert v["mean_abs_diff_between_variations"] > 2 / 255, r  # four different images, not one four times
    assert strong["mean_abs_diff"] > subtle["mean_abs_diff"]


def test_evaluation_report_marks_sections_of_other_runs():
    """One run's sections, however many minutes apart, compare with each other; an `--only` re-run's do not."""
    from pipeline.builtin.evaluate import measured_at
    one_run = {"generation": {}, "upscaler": {},
               "measured_at": {"generation": "2026-12-01 03:24", "upscaler": "2026-12-01 03:27"},
               "measured_in_run": {"generation": "2026-12-01 03:23", "upscaler": "2026-12-01 03:23"}}
    assert measured_at(one_run) == []
    rerun = {**one_run, "measured_in_run": {"generation": "2026-12-01 03:23", "upscaler": "2026-12-02 10:00"}}
    [line, _] = measured_at(rerun)
    assert "generation 2026-12-01 03:24" in line and "upscaler 2026-12-01 03:27" in line
    assert measured_at({"generation": {}, "upscaler": {}, "measured_at": {"upscaler": "2026-12-01 03:27"}})  # older
