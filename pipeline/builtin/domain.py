"""Procedural text-to-image domain with exactly measurable prompt adherence.

Every image shows ONE shape (``circle``, ``square`` or ``triangle``) in one
palette colour on a plain background of a different palette colour.  Because
the scene is fully described by ``(shape, color, background)`` plus a little
geometry, a rule-based analyzer (:mod:`pipeline.builtin.analyzer`) can check whether a
generated image matches its prompt.

Geometry (normalized coordinates, ``x`` to the right, ``y`` downwards, the
image is the unit square):

* ``Scene.size`` is the half-extent ``s`` of the shape's bounding box: circle
  radius, half side of the (axis-aligned) square, and half base / half height
  of the isosceles triangle (apex at ``(cx, cy - s)``, base from
  ``(cx - s, cy + s)`` to ``(cx + s, cy + s)``, pointing up, no rotation).
* ``s`` is drawn from :data:`SIZE_RANGE` = (0.26, 0.40): the smallest triangle
  covers ``2 s^2 = 0.135 >= 1/8`` of the image; circles (``pi s^2``) and squares
  (``4 s^2``) are larger.  Centres are drawn so the bounding box keeps
  :data:`MARGIN` (2 px at 32x32) from every image edge, so the analyzer can read
  the background from the outer ring of pixels.
* Rendering is anti-aliased: rows are supersampled :data:`SUPERSAMPLE` times
  and box-downsampled, and within a row the shape's span is intersected with
  each pixel exactly (infinite supersampling in x).  The same scene renders
  consistently at any size: the 32x32 training image and the 128x128 upscaler
  target agree after 4x4 area averaging.

Palette (:data:`COLORS`, RGB 0..255): the suggested values with purple moved
away from blue and orange from yellow; the closest pairs are orange/yellow
(~92), red/orange (~96) and blue/purple (~116) in Euclidean RGB distance, all
others are > 160 apart.

Combos: :data:`ALL_COMBOS` holds the 3 * 8 * 7 = 168 ``(shape, color,
background)`` triples with ``color != background``.  :data:`HELD_OUT` is a
fixed, seeded set of 25 combos never used in training; every one of its
``(shape, color)``, ``(shape, background)`` and ``(color, background)`` pairs
appears in some training combo (:data:`SEEN`), so held-out prompts test
composition.  :data:`PROMPT_LIST` is a fixed list of 40 evaluation prompts
(28 seen + 12 held-out canonical captions).

Captions: :data:`CAPTION_TEMPLATES` (the first is canonical).  The article
``a`` is written ``an`` before a vowel ("an orange square"); :func:`parse_caption`
accepts either.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from itertools import product
from typing import Collection, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

Combo = tuple[str, str, str]  # (shape, color, background)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

IMAGE_SIZE = 32
HR_SIZE = 128
MARGIN = 2.0 / IMAGE_SIZE
SIZE_RANGE: tuple[float, float] = (0.26, 0.40)
SUPERSAMPLE = 4

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {color} {shape} on a {background} background",
    "{color} {shape}, {background} background",
    "a {shape} coloured {color} against {background}",
    "a {color} {shape} on {background}",
    "{background} background with a {color} {shape}",
)

HELD_OUT_SEED = 1234
N_HELD_OUT = 25
PROMPT_SEED = 4321
N_PROMPTS_SEEN = 28
N_PROMPTS_HELD_OUT = 12


# --------------------------------------------------------------------------
# Combos and the held-out split
# --------------------------------------------------------------------------

ALL_COMBOS: tuple[Combo, ...] = tuple(
    (s, c, b) for s, c, b in product(SHAPES, COLOR_NAMES, COLOR_NAMES) if c != b
)


def _pairs(combo: Combo) -> tuple[tuple[str, str, str], ...]:
    """The three attribute pairs of a combo, tagged by kind."""
    s, c, b = combo
    return (("sc", s, c), ("sb", s, b), ("cb", c, b))


def _split_ok(held: set[Combo]) -> bool:
    """True when every attribute and every held-out pair survives in training."""
    train = [c for c in ALL_COMBOS if c not in held]
    if {c[0] for c in train} != set(SHAPES):
        return False
    if {c[1] for c in train} != set(COLOR_NAMES) or {c[2] for c in train} != set(COLOR_NAMES):
        return False
    train_pairs = {p for c in train for p in _pairs(c)}
    return all(p in train_pairs for c in held for p in _pairs(c))


def _select_held_out(seed: int = HELD_OUT_SEED, n: int = N_HELD_OUT) -> frozenset[Combo]:
    """Greedy seeded choice of ``n`` held-out combos keeping the split compositional."""
    candidates = sorted(ALL_COMBOS)
    random.Random(seed).shuffle(candidates)
    held: set[Combo] = set()
    for combo in candidates:
        if len(held) == n:
            break
        if _split_ok(held | {combo}):
            held.add(combo)
    if len(held) != n:
        raise RuntimeError(f"could only hold out {len(held)} of {n} combos")
    return frozenset(held)


HELD_OUT: frozenset[Combo] = _select_held_out()
SEEN: tuple[Combo, ...] = tuple(sorted(c for c in ALL_COMBOS if c not in HELD_OUT))


def is_held_out(combo: Sequence[str]) -> bool:
    """Whether ``(shape, color, background)`` belongs to the held-out split."""
    return tuple(combo) in HELD_OUT


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------

def _fix_articles(text: str) -> str:
    """Write ``an`` before words starting with a vowel."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def format_caption(combo: Sequence[str], template_index: int = 0) -> str:
    """Caption of ``(shape, color, background)`` with the given template."""
    shape, color, background = combo
    template = CAPTION_TEMPLATES[template_index % len(CAPTION_TEMPLATES)]
    return _fix_articles(template.format(shape=shape, color=color, background=background))


def canonical_caption(shape: str, color: str, background: str) -> str:
    """The canonical (first-template) caption, e.g. ``a red circle on a blue background``."""
    return format_caption((shape, color, background), 0)


def caption(scene: "Scene | Sequence[str]",
            rng_or_template_index: "int | np.random.Generator | random.Random" = 0) -> str:
    """Caption a scene (or combo) with a fixed template index or a random template."""
    combo = scene.combo if isinstance(scene, Scene) else tuple(scene)
    choice = rng_or_template_index
    if isinstance(choice, np.random.Generator):
        index = int(choice.integers(len(CAPTION_TEMPLATES)))
    elif isinstance(choice, random.Random):
        index = choice.randrange(len(CAPTION_TEMPLATES))
    else:
        index = int(choice)
    return format_caption(combo, index)


def _template_regex(template: str) -> re.Pattern[str]:
    """Compile one caption template into a regex with named groups."""
    groups = {
        "shape": "(?P<shape>" + "|".join(SHAPES) + ")",
        "color": "(?P<color>" + "|".join(COLOR_NAMES) + ")",
        "background": "(?P<background>" + "|".join(COLOR_NAMES) + ")",
    }
    pattern = re.escape(template)
    pattern = pattern.replace(r"\{", "{").replace(r"\}", "}")
    pattern = re.sub(r"\\ ", " ", pattern)
    pattern = pattern.replace("coloured", "colou?red")
    pattern = re.sub(r"\ba ", "an? ", pattern).replace(" ", r"\s+")
    return re.compile("^" + pattern.format(**groups) + "$")


_CAPTION_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    _template_regex(t) for t in CAPTION_TEMPLATES
)


def parse_caption(text: str) -> Combo | None:
    """Parse any template's caption back into ``(shape, color, background)``.

    Case, surrounding whitespace and a trailing full stop are ignored;
    returns ``None`` when the text matches no template.
    """
    cleaned = text.strip().lower().rstrip(".").strip()
    for pattern in _CAPTION_PATTERNS:
        match = pattern.match(cleaned)
        if match:
            return (match["shape"], match["color"], match["background"])
    return None


# --------------------------------------------------------------------------
# Evaluation prompts
# --------------------------------------------------------------------------

def _least_used_pick(options: list[Combo], counts: dict[str, int], key: int) -> Combo:
    """The option whose attribute ``key`` has been used least so far (stable order)."""
    return min(options, key=lambda c: counts.get(c[key], 0))


def _select_seen_prompts(rng: random.Random, n: int) -> list[Combo]:
    """Seen prompts cycling through every (shape, colour) with balanced backgrounds."""
    chosen: list[Combo] = []
    bg_counts: dict[str, int] = {}
    seen = set(SEEN)
    for i in range(n):
        shape, color = SHAPES[i % len(SHAPES)], COLOR_NAMES[i % len(COLOR_NAMES)]
        options = [(shape, color, b) for b in COLOR_NAMES
                   if (shape, color, b) in seen and (shape, color, b) not in chosen]
        rng.shuffle(options)
        pick = _least_used_pick(options, bg_counts, 2)
        bg_counts[pick[2]] = bg_counts.get(pick[2], 0) + 1
        chosen.append(pick)
    return chosen


def _select_held_out_prompts(rng: random.Random, n: int) -> list[Combo]:
    """Held-out prompts chosen greedily to cover as many attribute values as possible."""
    pool = sorted(HELD_OUT)
    rng.shuffle(pool)
    chosen: list[Combo] = []
    counts: dict[tuple[int, str], int] = {}
    for _ in range(min(n, len(pool))):
        def cost(c: Combo) -> int:
            return sum(counts.get((k, v), 0) for k, v in enumerate(c))
        pick = min((c for c in pool if c not in chosen), key=cost)
        for k, v in enumerate(pick):
            counts[(k, v)] = counts.get((k, v), 0) + 1
        chosen.append(pick)
    return chosen


def _select_prompts() -> tuple[tuple[Combo, ...], tuple[str, ...]]:
    rng = random.Random(PROMPT_SEED)
    combos = _select_seen_prompts(rng, N_PROMPTS_SEEN)
    combos += _select_held_out_prompts(rng, N_PROMPTS_HELD_OUT)
    return tuple(combos), tuple(canonical_caption(*c) for c in combos)


PROMPT_COMBOS: tuple[Combo, ...]
PROMPT_LIST: tuple[str, ...]
PROMPT_COMBOS, PROMPT_LIST = _select_prompts()


# --------------------------------------------------------------------------
# Scenes and rendering
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Scene:
    """One image: shape, colours and geometry in normalized [0, 1] coordinates."""

    shape: str
    color: str
    background: str
    cx: float
    cy: float
    size: float

    @property
    def combo(self) -> Combo:
        return (self.shape, self.color, self.background)


def sample_scene(rng: np.random.Generator, combos: Collection[Combo] = SEEN) -> Scene:
    """Draw a random scene from ``combos`` (uniform combo, size and position)."""
    return sample_scenes(rng, 1, combos)[0]


def sample_scenes(rng: np.random.Generator, n: int,
                  combos: Collection[Combo] = SEEN) -> list[Scene]:
    """Draw ``n`` random scenes at once (vectorised :func:`sample_scene`).

    ``combos`` may be any collection (a set such as :data:`HELD_OUT` is sorted
    first so the draw is deterministic).
    """
    if not isinstance(combos, (list, tuple)):
        combos = sorted(combos)
    idx = rng.integers(len(combos), size=n)
    sizes = rng.uniform(SIZE_RANGE[0], SIZE_RANGE[1], size=n)
    lo, hi = sizes + MARGIN, 1.0 - sizes - MARGIN
    cx = lo + (hi - lo) * rng.random(n)
    cy = lo + (hi - lo) * rng.random(n)
    return [Scene(*combos[i], float(x), float(y), float(s))
            for i, x, y, s in zip(idx, cx, cy, sizes)]


def _row_half_widths(shape: str, dy: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Half-width of the shape along each supersampled row (negative: row empty).

    ``dy`` is (B, N) row offsets from the centre, ``s`` is (B, 1) half-extents.
    """
    inside = np.abs(dy) <= s
    if shape == "circle":
        w = np.sqrt(np.maximum(s * s - dy * dy, 0.0))
    elif shape == "square":
        w = np.broadcast_to(s, dy.shape)
    elif shape == "triangle":  # apex at dy = -s, base (width 2s) at dy = +s
        w = 0.5 * (dy + s)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.where(inside, w, -1.0).astype(np.float32)


def _coverage(shape: str, cx: np.ndarray, cy: np.ndarray, s: np.ndarray,
              size: int) -> np.ndarray:
    """Anti-aliased coverage (B, size, size) in [0, 1] of one shape kind.

    Rows are supersampled :data:`SUPERSAMPLE` times and box-averaged; along a
    row the shape is an interval whose overlap with each pixel is computed
    exactly (equivalent to infinite supersampling in x).
    """
    n_rows = size * SUPERSAMPLE
    ys = (np.arange(n_rows, dtype=np.float32) + 0.5) / n_rows
    w = _row_half_widths(shape, ys[None, :] - cy[:, None], s[:, None])  # (B, N)
    edges = np.arange(size + 1, dtype=np.float32) / size
    lo = np.maximum((cx[:, None] - w)[:, :, None], edges[None, None, :-1])
    hi = np.minimum((cx[:, None] + w)[:, :, None], edges[None, None, 1:])
    cover = np.clip((hi - lo) * size, 0.0, 1.0)  # (B, N, size)
    return cover.reshape(len(s), size, SUPERSAMPLE, size).mean(axis=2, dtype=np.float32)


def _render_float(scenes: Sequence[Scene], size: int) -> np.ndarray:
    """Render scenes to float32 (B, 3, size, size) in [0, 255]."""
    n = len(scenes)
    cov = np.zeros((n, size, size), dtype=np.float32)
    for shape in SHAPES:
        idx = np.array([i for i, sc in enumerate(scenes) if sc.shape == shape], dtype=np.int64)
        if idx.size == 0:
            continue
        geo = np.array([(scenes[i].cx, scenes[i].cy, scenes[i].size) for i in idx],
                       dtype=np.float32)
        cov[idx] = _coverage(shape, geo[:, 0], geo[:, 1], geo[:, 2], size)
    fg = np.array([COLORS[sc.color] for sc in scenes], dtype=np.float32).reshape(n, 3, 1, 1)
    bg = np.array([COLORS[sc.background] for sc in scenes], dtype=np.float32).reshape(n, 3, 1, 1)
    return bg + cov[:, None] * (fg - bg)


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render one scene as an ``np.uint8`` array of shape (size, size, 3)."""
    img = _render_float([scene], size)[0]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def render_batch(scenes: Sequence[Scene], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render scenes as a float32 tensor (B, 3, size, size) with values in [0, 1]."""
    if len(scenes) == 0:
        return torch.zeros((0, 3, size, size), dtype=torch.float32)
    return torch.from_numpy(_render_float(scenes, size) / np.float32(255.0))
