"""The seed-diversity metric of the evaluation (pipeline/builtin/diversity.py) on cases whose answer is known:
training scenes against the training distribution score ~1, a grid of copies 0, scenes squeezed to half their
spread ~0.5. The analyzer's geometry reading first: it is what the metric measures."""
from dataclasses import replace

import numpy as np
import pytest

from pipeline.builtin import analyzer, domain
from pipeline.builtin.diversity import GEOMETRY, diversity, geometry, training_spread

COMBOS = list(domain.PROMPT_COMBOS[:6]) + list(domain.PROMPT_COMBOS[-4:])  # seen and held-out


def analyzed(scenes):
    return analyzer.analyze_batch(domain.render_batch(scenes))


def test_analyzer_reads_the_scene_geometry():
    scenes = domain.sample_scenes(np.random.default_rng(5), 300, domain.ALL_COMBOS)
    got = geometry(analyzed(scenes))
    truth = np.array([[sc.cx, sc.cy, sc.size] for sc in scenes])
    error = np.abs(got - truth) * domain.IMAGE_SIZE  # pixels
    assert error.mean(axis=0).max() < 0.5 and error.max() < 1.5, error.mean(axis=0)
    for i in range(len(GEOMETRY)):
        assert np.corrcoef(got[:, i], truth[:, i])[0, 1] > 0.95
    blank = analyzer.analyze(np.full((32, 32, 3), 128, np.uint8))
    assert np.isnan(geometry([blank])).all()


def test_training_scenes_score_one_copies_zero_and_half_spread_half():
    rng = np.random.default_rng(7)
    k = 8
    groups = [domain.sample_scenes(rng, k, [c]) for c in COMBOS]
    same = diversity([analyzed(g) for g in groups], COMBOS)
    assert set(same) >= {*GEOMETRY, "mean", "seen", "held_out"} and same["prompts"] == len(COMBOS)
    assert 0.85 <= same["mean"] <= 1.15, same
    copies = diversity([analyzed([g[0]] * k) for g in groups], COMBOS)
    assert copies["mean"] == 0.0, copies

    def squeeze(sc):  # half the distance to the middle of the range: half the spread of every statistic
        mid, s_mid = 0.5, sum(domain.SIZE_RANGE) / 2
        return replace(sc, cx=mid + (sc.cx - mid) / 2, cy=mid + (sc.cy - mid) / 2, size=s_mid + (sc.size - s_mid) / 2)
    half = diversity([analyzed([squeeze(sc) for sc in g]) for g in groups], COMBOS)
    assert 0.35 <= half["mean"] <= 0.65, half


def test_images_without_a_shape_are_left_out():
    rng = np.random.default_rng(8)
    combo = COMBOS[0]
    scenes = analyzed(domain.sample_scenes(rng, 4, [combo]))
    blank = analyzer.analyze(np.full((32, 32, 3), 128, np.uint8))
    with_blank = diversity([scenes + [blank, blank]], [combo])
    assert with_blank == {**diversity([scenes], [combo]), "seeds": 6}
    assert diversity([[scenes[0], blank]] + [scenes], [combo, combo])["prompts"] == 1  # one shape: no spread


@pytest.mark.parametrize("k", [2, 4, 8])
def test_training_spread_is_the_expected_spread_of_k_scenes(k):
    """The reference grows with k as a sample standard deviation does (E[s] < sigma for small k), and sits near
    the spread of the domain's uniform draws."""
    ref = np.array(training_spread(COMBOS[0], k))
    lo, hi = domain.SIZE_RANGE
    assert 0.5 * (hi - lo) / np.sqrt(12) < ref[2] < 1.3 * (hi - lo) / np.sqrt(12)
    if k == 8:
        assert ref.mean() > 1.1 * np.mean(training_spread(COMBOS[0], 2))
