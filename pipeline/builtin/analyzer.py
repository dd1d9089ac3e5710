"""Rule-based analyzer for the procedural domain (no learning, no CLIP).

Given an image of the domain in :mod:`pipeline.builtin.domain` (one shape on a plain
background), recover ``(shape, color, background)``:

1. **Background**: the median of the outer ring of pixels (2 px at 32x32),
   snapped to the nearest palette colour.
2. **Shape colour**: a coarse mask (pixels farther than
   :data:`COARSE_THRESHOLD` from the measured background), its largest
   4-connected component, eroded so anti-aliased / blurred edges are ignored;
   the median of those pixels is snapped to the nearest palette colour.
3. **Shape mask**: each pixel's position ``t`` on the segment from the measured
   background to the measured shape colour; ``t > 0.5`` (i.e. more than half
   covered), largest connected component (drops speckles).
4. **Shape**: from the mask's geometry: the fill ratio of its bounding box
   (square ~1.0, circle ~pi/4, up-pointing triangle ~0.5), the taper (mean
   width of the top third over the bottom third: triangle ~0.2, others ~1) and
   the diagonal extent relative to the axis extents (square 1.0, circle ~0.71,
   triangle 0.75; robust to the rounded corners of blurred squares).  The
   nearest prototype (:data:`SHAPE_PROTOTYPES`) in this feature space wins.

Designed for generated images too (blurred edges, colour shifts, speckles).
Connected components use vectorised label propagation with pointer jumping
(numpy only; scipy is not a dependency).  Fields are ``None`` when no shape
is found.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
import torch

from .domain import COLOR_NAMES, COLORS

logger = logging.getLogger(__name__)

_PALETTE = np.array([COLORS[name] for name in COLOR_NAMES], dtype=np.float32)

COARSE_THRESHOLD = 40.0  # RGB distance (0..255) from the background
MIN_AREA_FRACTION = 0.02  # smaller components are "no shape"
# (fill ratio, taper, diagonal extent) prototypes of the clean shapes, and the
# per-feature scales of the (Euclidean) distance to them.
SHAPE_PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "square": (1.0, 1.0, 1.0),
    "circle": (0.785, 1.0, 0.71),
    "triangle": (0.5, 0.2, 0.75),
}
_FEATURE_SCALE = np.array([0.1, 0.4, 0.07])


@dataclass(frozen=True)
class Analysis:
    """Result of :func:`analyze`; ``None`` fields mean "unknown / no shape".

    ``color_distance`` / ``background_distance``: RGB distance (0..255) from
    the measured colour to the chosen palette colour (small = confident).
    ``shape_confidence``: in [0, 1], 0 on a decision boundary between two
    shape prototypes, 1 on a prototype.  ``area_fraction``: mask area over
    image area.  ``cx``, ``cy``, ``size``: the mask's bounding-box centre and
    half-extent (mean of half width and half height) in normalized image
    coordinates, the analyzer's reading of :class:`~pipeline.builtin.domain.Scene`'s
    geometry (``None`` when no shape is found).
    """

    shape: str | None
    color: str | None
    background: str | None
    fill_ratio: float = 0.0
    taper: float = 0.0
    diagonal: float = 0.0
    area_fraction: float = 0.0
    shape_confidence: float = 0.0
    color_distance: float = float("inf")
    background_distance: float = float("inf")
    cx: float | None = None
    cy: float | None = None
    size: float | None = None

    @property
    def combo(self) -> tuple[str, str, str] | None:
        """``(shape, color, background)`` when all three are known."""
        if self.shape is None or self.color is None or self.background is None:
            return None
        return (self.shape, self.color, self.background)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def to_hwc_float(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Convert an image to float32 (H, W, 3) in 0..255.

    Accepts ``np.uint8`` (H, W, 3), float arrays (H, W, 3) in [0, 1], or a
    tensor (3, H, W): float in [0, 1] or uint8.
    """
    if isinstance(image, torch.Tensor):
        is_uint8 = image.dtype == torch.uint8
        arr = image.detach().to("cpu", torch.float32).numpy()
        if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
            arr = arr.transpose(1, 2, 0)
        return arr if is_uint8 else np.clip(arr, 0.0, 1.0) * 255.0
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    return np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0


def nearest_color(rgb: np.ndarray, max_distance: float | None = None
                  ) -> tuple[str | None, float]:
    """Nearest palette colour name (``None`` beyond ``max_distance``) and its distance."""
    dist = np.linalg.norm(_PALETTE - rgb[None, :], axis=1)
    i = int(np.argmin(dist))
    if max_distance is not None and dist[i] > max_distance:
        return None, float(dist[i])
    return COLOR_NAMES[i], float(dist[i])


def border_pixels(img: np.ndarray, width: int) -> np.ndarray:
    """The pixels of the outer ring of ``width`` pixels, as (N, 3)."""
    ring = np.ones(img.shape[:2], dtype=bool)
    ring[width:-width, width:-width] = False
    return img[ring]


def erode(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary erosion with a 4-neighbour cross (outside the image counts as set)."""
    out = mask.copy()
    for _ in range(iterations):
        src = out.copy()
        out[1:, :] &= src[:-1, :]
        out[:-1, :] &= src[1:, :]
        out[:, 1:] &= src[:, :-1]
        out[:, :-1] &= src[:, 1:]
    return out


@lru_cache(maxsize=8)
def _neighbour_table(h: int, w: int) -> np.ndarray:
    """(4, h*w) flat index of each pixel's 4-neighbours (itself at the image edge)."""
    r, c = np.divmod(np.arange(h * w), w)
    table = np.empty((4, h * w), dtype=np.int64)
    for k, (dr, dc) in enumerate(((-1, 0), (1, 0), (0, -1), (0, 1))):
        rr, cc = r + dr, c + dc
        valid = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        table[k] = np.where(valid, rr * w + cc, r * w + c)
    return table


def _neighbour_indices(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of mask pixels and (4, n) positions of their 4-neighbours.

    Positions index the compact list of mask pixels; a neighbour outside the
    mask (or the image) points back to the pixel itself.
    """
    h, w = mask.shape
    idx = np.flatnonzero(mask)
    pos = np.full(h * w, -1, dtype=np.int64)
    pos[idx] = np.arange(idx.size)
    nb = pos[_neighbour_table(h, w)[:, idx]]
    return idx, np.where(nb >= 0, nb, pos[idx][None, :])


def connected_components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels: -1 outside the mask, else a component id.

    Vectorised label propagation (min over neighbours) with pointer jumping.
    """
    idx, neighbours = _neighbour_indices(mask)
    labels = np.arange(idx.size)
    while True:
        new = np.minimum(labels, labels[neighbours].min(axis=0))
        new = new[new]  # pointer jumping: adopt the label's own label
        if np.array_equal(new, labels):
            break
        labels = new
    out = np.full(mask.shape, -1, dtype=np.int64)
    out.ravel()[idx] = labels
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 4-connected component (empty if none)."""
    if not mask.any():
        return mask
    labels = connected_components(mask)
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    return labels == ids[int(np.argmax(counts))]


# --------------------------------------------------------------------------
# Shape geometry
# --------------------------------------------------------------------------

def shape_features(mask: np.ndarray) -> tuple[float, float, float]:
    """``(fill_ratio, taper, diagonal)`` of a non-empty mask.

    fill ratio = area / bounding-box area; taper = mean row width of the top
    third of the box over that of the bottom third; diagonal: see
    :func:`diagonal_extent`.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fill = float(box.sum()) / float(box.size)
    widths = box.sum(axis=1).astype(np.float32)
    third = max(1, len(widths) // 3)
    top, bottom = float(widths[:third].mean()), float(widths[-third:].mean())
    taper = top / bottom if bottom > 0 else 1.0
    return fill, taper, diagonal_extent(mask)


def shape_geometry(mask: np.ndarray) -> tuple[float, float, float]:
    """``(cx, cy, size)`` of a non-empty mask in normalized coordinates: the bounding box's centre and its
    half-extent (the mean of half its width and half its height), as :class:`~pipeline.builtin.domain.Scene`
    defines them for all three shapes (the triangle's box is centred on its ``(cx, cy)`` too)."""
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x0, x1, y0, y1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    return (float(x0 + x1) / (2 * w), float(y0 + y1) / (2 * h), float((x1 - x0) / w + (y1 - y0) / h) / 4)


def diagonal_extent(mask: np.ndarray) -> float:
    """Extent along the two diagonals relative to the axis-aligned extents.

    1.0 for an axis-aligned square, ~0.71 for a circle, ~0.75 for the triangle.
    """
    r, c = np.nonzero(mask)
    axis = (r.max() - r.min() + 1) + (c.max() - c.min() + 1)
    s, d = r + c, r - c
    diag = (s.max() - s.min() + 2) + (d.max() - d.min() + 2)
    return float(diag) / float(2 * axis)


def classify_shape(features: Sequence[float]) -> tuple[str, float]:
    """Nearest shape prototype to ``(fill, taper, diagonal)`` and a [0, 1] confidence.

    The confidence is the relative margin between the nearest and the second
    nearest prototype: 0 on a decision boundary, 1 on a prototype.
    """
    x = np.asarray(features, dtype=np.float64)
    dists = {name: float(np.linalg.norm((x - np.array(p)) / _FEATURE_SCALE))
             for name, p in SHAPE_PROTOTYPES.items()}
    ranked = sorted(dists, key=dists.__getitem__)
    best, second = dists[ranked[0]], dists[ranked[1]]
    confidence = (second - best) / (second + best) if second + best > 0 else 0.0
    return ranked[0], confidence


# --------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------

def _erosion_steps(size: int) -> int:
    """Pixels to erode before sampling the shape colour (2 at 32x32)."""
    return max(1, round(size / 16))


def _interior_median(img: np.ndarray, component: np.ndarray) -> np.ndarray:
    """Median colour of the component's interior (eroded; falls back gracefully)."""
    for steps in range(_erosion_steps(min(img.shape[:2])), -1, -1):
        inner = erode(component, steps) if steps else component
        if inner.any():
            return np.median(img[inner], axis=0)
    raise ValueError("empty component")


def _coverage_mask(img: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Pixels more than half-way from the background to the shape colour.

    The per-pixel position on the background->shape colour segment is lightly
    smoothed first, which suppresses noise without moving straight edges.
    """
    axis = fg - bg
    denom = float(axis @ axis)
    if denom <= 0:
        return np.zeros(img.shape[:2], dtype=bool)
    t = (img - bg) @ axis / denom
    return smooth(t) > 0.5


def smooth(t: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 smoothing with edge replication."""
    p = np.pad(t, 1, mode="edge")
    t = 0.25 * p[:-2, :] + 0.5 * p[1:-1, :] + 0.25 * p[2:, :]
    return 0.25 * t[:, :-2] + 0.5 * t[:, 1:-1] + 0.25 * t[:, 2:]


def analyze(image: np.ndarray | torch.Tensor,
            max_color_distance: float | None = None) -> Analysis:
    """Recover ``(shape, color, background)`` from one image of the domain.

    With ``max_color_distance`` (RGB units), a colour farther than that from
    every palette colour is reported as ``None`` (strict mode); by default the
    nearest palette colour is always taken.
    """
    img = to_hwc_float(image)
    h, w = img.shape[:2]
    ring = max(1, round(min(h, w) / 16))
    bg_rgb = np.median(border_pixels(img, ring), axis=0)
    background, bg_dist = nearest_color(bg_rgb, max_color_distance)
    min_area = MIN_AREA_FRACTION * h * w

    coarse = largest_component(np.linalg.norm(img - bg_rgb, axis=-1) > COARSE_THRESHOLD)
    if coarse.sum() < min_area:
        return Analysis(None, None, background, background_distance=bg_dist)
    fg_rgb = _interior_median(img, coarse)
    color, color_dist = nearest_color(fg_rgb, max_color_distance)

    mask = largest_component(_coverage_mask(img, bg_rgb, fg_rgb))
    area = float(mask.sum())
    if area < min_area:
        return Analysis(None, color, background, color_distance=color_dist,
                        background_distance=bg_dist)
    fill, taper, diag = shape_features(mask)
    shape, shape_conf = classify_shape((fill, taper, diag))
    cx, cy, size = shape_geometry(mask)
    return Analysis(shape, color, background, fill_ratio=fill, taper=taper, diagonal=diag,
                    area_fraction=area / (h * w), shape_confidence=shape_conf,
                    color_distance=color_dist, background_distance=bg_dist, cx=cx, cy=cy, size=size)


def analyze_batch(images: torch.Tensor | np.ndarray | Iterable[np.ndarray | torch.Tensor],
                  max_color_distance: float | None = None) -> list[Analysis]:
    """Analyze a batch: tensor (B, 3, H, W) in [0, 1], uint8 (B, H, W, 3), or a list."""
    return [analyze(img, max_color_distance) for img in images]


def accuracy(analyses: Sequence[Analysis], combos: Sequence[Sequence[str]]) -> float:
    """Fraction of analyses whose ``(shape, color, background)`` all match."""
    if not combos:
        return 0.0
    hits = sum(a.combo == tuple(c) for a, c in zip(analyses, combos))
    return hits / len(combos)
