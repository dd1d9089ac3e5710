"""Tests for the procedural domain (pipeline.builtin.domain) and its analyzer (pipeline.builtin.analyzer)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.builtin import analyzer, domain
from pipeline.builtin.dataset import ProceduralDataset
from pipeline.builtin.domain import (
    ALL_COMBOS,
    CAPTION_TEMPLATES,
    COLOR_NAMES,
    COLORS,
    HELD_OUT,
    MARGIN,
    PROMPT_COMBOS,
    PROMPT_LIST,
    SEEN,
    SHAPES,
    SIZE_RANGE,
    Scene,
    canonical_caption,
    caption,
    format_caption,
    is_held_out,
    parse_caption,
    render,
    render_batch,
    sample_scene,
    sample_scenes,
)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of a (B, 3, H, W) batch, edges replicated."""
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.pad(x, (radius,) * 4, mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


def coverage(img: np.ndarray, scene: Scene) -> np.ndarray:
    """Per-pixel shape coverage in [0, 1] recovered from a rendered uint8 image."""
    fg = np.array(COLORS[scene.color], dtype=np.float64)
    bg = np.array(COLORS[scene.background], dtype=np.float64)
    axis = fg - bg
    return np.clip((img.astype(np.float64) - bg) @ axis / (axis @ axis), 0.0, 1.0)


@pytest.fixture(scope="module")
def scenes_1000() -> list[Scene]:
    return sample_scenes(np.random.default_rng(2024), 1000, ALL_COMBOS)


# --------------------------------------------------------------------------
# Palette, combos, split
# --------------------------------------------------------------------------

def test_palette_well_separated() -> None:
    assert len(COLORS) == 8 and set(COLOR_NAMES) == set(COLORS)
    dists = [np.linalg.norm(np.subtract(COLORS[a], COLORS[b]))
             for a, b in itertools.combinations(COLORS, 2)]
    assert min(dists) > 80


def test_all_combos() -> None:
    assert len(ALL_COMBOS) == 3 * 8 * 7 == len(set(ALL_COMBOS))
    assert all(c != b for _, c, b in ALL_COMBOS)
    assert set(SHAPES) == {"circle", "square", "triangle"}


def test_held_out_split() -> None:
    assert len(HELD_OUT) == 25
    assert HELD_OUT == domain._select_held_out()  # deterministic
    assert list(SEEN) == sorted(SEEN)
    assert set(SEEN).isdisjoint(HELD_OUT)
    assert set(SEEN) | HELD_OUT == set(ALL_COMBOS)
    assert {s for s, _, _ in SEEN} == set(SHAPES)
    assert {c for _, c, _ in SEEN} == set(COLOR_NAMES)
    assert {b for _, _, b in SEEN} == set(COLOR_NAMES)
    sc = {(s, c) for s, c, _ in SEEN}
    sb = {(s, b) for s, _, b in SEEN}
    cb = {(c, b) for _, c, b in SEEN}
    for s, c, b in HELD_OUT:
        assert (s, c) in sc and (s, b) in sb and (c, b) in cb
        assert is_held_out((s, c, b)) and is_held_out([s, c, b])
    assert not any(is_held_out(c) for c in SEEN)


def test_prompt_list() -> None:
    assert len(PROMPT_LIST) == 40 == len(set(PROMPT_LIST))
    assert [canonical_caption(*c) for c in PROMPT_COMBOS] == list(PROMPT_LIST)
    combos = [parse_caption(p) for p in PROMPT_LIST]
    assert combos == list(PROMPT_COMBOS)
    assert sum(c in HELD_OUT for c in combos) == 12
    assert sum(c in set(SEEN) for c in combos) == 28
    assert {c[0] for c in combos} == set(SHAPES)
    assert {c[1] for c in combos} == set(COLOR_NAMES)
    held = [c for c in combos if c in HELD_OUT]
    assert {c[0] for c in held} == set(SHAPES)


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------

def test_captions_round_trip_every_template_and_combo() -> None:
    for combo in ALL_COMBOS:
        texts = {format_caption(combo, i) for i in range(len(CAPTION_TEMPLATES))}
        assert len(texts) == len(CAPTION_TEMPLATES)
        for text in texts:
            assert parse_caption(text) == combo, text
            assert parse_caption(" " + text.upper() + ". ") == combo


def test_caption_api() -> None:
    assert canonical_caption("circle", "red", "blue") == "a red circle on a blue background"
    assert canonical_caption("square", "orange", "white").startswith("an orange square")
    scene = Scene("triangle", "green", "orange", 0.5, 0.5, 0.3)
    assert caption(scene, 0) == "a green triangle on an orange background"
    assert caption(scene, 4) == "orange background with a green triangle"
    rng = np.random.default_rng(0)
    assert {parse_caption(caption(scene, rng)) for _ in range(20)} == {scene.combo}
    assert parse_caption("a square colored red against blue") == ("square", "red", "blue")
    assert parse_caption("a red hexagon on a blue background") is None
    assert parse_caption("a photo of a cat") is None


# --------------------------------------------------------------------------
# Geometry and rendering
# --------------------------------------------------------------------------

def test_render_types() -> None:
    scene = sample_scene(np.random.default_rng(1))
    img = render(scene)
    assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
    assert render(scene, 128).shape == (128, 128, 3)
    batch = render_batch([scene, scene], 32)
    assert batch.dtype == torch.float32 and batch.shape == (2, 3, 32, 32)
    assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0
    assert np.abs(batch[0].permute(1, 2, 0).numpy() * 255 - img).max() <= 0.5 + 1e-3


def test_scenes_inside_with_margin() -> None:
    scenes = sample_scenes(np.random.default_rng(5), 2000, ALL_COMBOS)
    for sc in scenes:
        assert SIZE_RANGE[0] <= sc.size <= SIZE_RANGE[1]
        assert sc.color != sc.background and sc.combo in SEEN + tuple(HELD_OUT)
        for c in (sc.cx, sc.cy):
            assert c - sc.size >= MARGIN - 1e-6 and c + sc.size <= 1 - MARGIN + 1e-6
    assert {sc.combo for sc in sample_scenes(np.random.default_rng(0), 3000)} <= set(SEEN)


@pytest.mark.parametrize("shape", SHAPES)
def test_extreme_scenes_keep_the_border(shape: str) -> None:
    s = SIZE_RANGE[1]
    for cx, cy in itertools.product((s + MARGIN, 1 - s - MARGIN), repeat=2):
        scene = Scene(shape, "white", "black", cx, cy, s)
        for size, ring in ((32, 2), (128, 8)):
            img = render(scene, size)
            border = analyzer.border_pixels(img, ring)
            assert (border == COLORS["black"]).all()
            assert (img == COLORS["white"]).all(axis=-1).any()


@pytest.mark.parametrize("shape", SHAPES)
def test_min_area_is_an_eighth(shape: str) -> None:
    scene = Scene(shape, "yellow", "blue", 0.5, 0.5, SIZE_RANGE[0])
    for size in (32, 128):
        cov = coverage(render(scene, size), scene)
        assert cov.mean() >= 1 / 8
        assert (cov > 0.5).mean() >= 1 / 8


def test_hr_render_matches_lr() -> None:
    scenes = sample_scenes(np.random.default_rng(11), 64, ALL_COMBOS)
    lr = render_batch(scenes, 32)
    hr = render_batch(scenes, 128)
    assert hr.shape == (64, 3, 128, 128)
    diff = (F.avg_pool2d(hr, 4) - lr).abs().mean()
    assert float(diff) < 0.03


def test_shape_areas_match_geometry() -> None:
    expected = {"circle": np.pi, "square": 4.0, "triangle": 2.0}
    for shape, k in expected.items():
        scene = Scene(shape, "red", "white", 0.47, 0.52, 0.33)
        cov = coverage(render(scene, 128), scene)
        assert cov.mean() == pytest.approx(k * 0.33 ** 2, rel=0.02)


# --------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------

def test_dataset_batch() -> None:
    ds = ProceduralDataset(seed=3)
    b = ds.batch(16, np.random.default_rng(0))
    assert b.images.shape == (16, 3, 32, 32) and b.images.dtype == torch.float32
    assert len(b.captions) == len(b.combos) == 16 and b.hr_images is None
    assert [parse_caption(c) for c in b.captions] == b.combos
    assert all(c in SEEN for c in b.combos)
    again = ds.batch(16, np.random.default_rng(0))
    assert torch.equal(again.images, b.images) and again.captions == b.captions

    hr = ds.batch(8, np.random.default_rng(1), combos=HELD_OUT, hr_size=128)
    assert hr.hr_images is not None and hr.hr_images.shape == (8, 3, 128, 128)
    assert all(c in HELD_OUT for c in hr.combos)
    images, captions, combos, hr_images = hr
    assert hr_images is hr.hr_images

    it = iter(ProceduralDataset(seed=3, batch_size=4, hr_size=64))
    first = next(it)
    assert first.images.shape == (4, 3, 32, 32) and first.hr_images.shape == (4, 3, 64, 64)
    assert next(it).captions is not None


# --------------------------------------------------------------------------
# Analyzer
# --------------------------------------------------------------------------

def test_analyzer_clean_accuracy(scenes_1000: list[Scene]) -> None:
    results = analyzer.analyze_batch(render_batch(scenes_1000, 32))
    acc = analyzer.accuracy(results, [sc.combo for sc in scenes_1000])
    assert acc >= 0.99


def test_analyzer_blur_noise_accuracy(scenes_1000: list[Scene]) -> None:
    gen = torch.Generator().manual_seed(0)
    images = render_batch(scenes_1000, 32)
    noisy = gaussian_blur(images, 0.7) + 0.03 * torch.randn(images.shape, generator=gen)
    results = analyzer.analyze_batch(noisy.clamp(0, 1))
    acc = analyzer.accuracy(results, [sc.combo for sc in scenes_1000])
    assert acc >= 0.97


def test_analyzer_inputs_and_high_res() -> None:
    scenes = sample_scenes(np.random.default_rng(9), 30, ALL_COMBOS)
    for sc in scenes[:10]:
        img = render(sc)
        assert analyzer.analyze(img).combo == sc.combo
        assert analyzer.analyze(torch.from_numpy(img).permute(2, 0, 1)).combo == sc.combo
        assert analyzer.analyze(img.astype(np.float32) / 255).combo == sc.combo
    results = analyzer.analyze_batch(render_batch(scenes, 128))
    assert analyzer.accuracy(results, [sc.combo for sc in scenes]) == 1.0


def test_analyzer_no_shape() -> None:
    plain = np.tile(np.array(COLORS["green"], dtype=np.uint8), (32, 32, 1))
    result = analyzer.analyze(plain)
    assert result.shape is None and result.color is None and result.combo is None
    assert result.background == "green"
    grey = np.full((32, 32, 3), 128, dtype=np.uint8)
    assert analyzer.analyze(grey, max_color_distance=60).background is None


def test_analyzer_ignores_speckles() -> None:
    scene = Scene("circle", "blue", "yellow", 0.5, 0.5, 0.3)
    img = render(scene).copy()
    img[3, 25] = img[27, 4] = COLORS["black"]
    img[5:7, 5:7] = COLORS["blue"]
    result = analyzer.analyze(img)
    assert result.combo == scene.combo
    assert 0.0 < result.shape_confidence <= 1.0


def test_connected_components() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:3, 1:3] = True
    mask[5:8, 2:8] = True
    mask[0, 7] = True
    labels = analyzer.connected_components(mask)
    assert len(np.unique(labels[mask])) == 3 and (labels[~mask] == -1).all()
    largest = analyzer.largest_component(mask)
    assert largest.sum() == 18 and largest[5:8, 2:8].all()
    comb = np.zeros((16, 16), dtype=bool)
    comb[::3, :] = True
    comb[:, 0] = True
    assert len(np.unique(analyzer.connected_components(comb)[comb])) == 1
