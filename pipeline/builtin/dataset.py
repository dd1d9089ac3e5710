"""Training batches of the procedural domain (pipeline/builtin/domain.py): seeded scenes, rendered, captioned."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Iterator

import numpy as np
import torch

from .domain import CAPTION_TEMPLATES, IMAGE_SIZE, SEEN, Combo, Scene, format_caption, render_batch, sample_scenes


@dataclass
class DomainBatch:
    """A batch of procedural training data.

    ``hr_images`` is the high-res render of the same scenes when requested.
    """

    images: torch.Tensor
    captions: list[str]
    combos: list[Combo]
    scenes: list[Scene]
    hr_images: torch.Tensor | None = None

    def __iter__(self) -> Iterator[object]:
        """Unpack as ``images, captions, combos[, hr_images]``."""
        yield self.images
        yield self.captions
        yield self.combos
        if self.hr_images is not None:
            yield self.hr_images


class ProceduralDataset:
    """Infinite, seeded generator of (image, caption) batches of the domain.

    ``batch`` draws from an explicit ``rng`` (or the dataset's own); iterating
    the dataset yields batches of ``batch_size`` forever.  Captions use a random
    template per sample unless ``canonical_captions`` is set.
    """

    def __init__(self, seed: int = 0, batch_size: int = 64, combos: Collection[Combo] = SEEN,
                 size: int = IMAGE_SIZE, hr_size: int | None = None,
                 canonical_captions: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.batch_size = batch_size
        self.combos = tuple(combos) if isinstance(combos, (list, tuple)) else tuple(sorted(combos))
        self.size = size
        self.hr_size = hr_size
        self.canonical_captions = canonical_captions

    def batch(self, batch_size: int, rng: np.random.Generator | None = None,
              combos: Collection[Combo] | None = None, size: int | None = None,
              hr_size: int | None = None) -> DomainBatch:
        """Sample and render ``batch_size`` scenes (plus an optional high-res render)."""
        rng = self.rng if rng is None else rng
        scenes = sample_scenes(rng, batch_size, self.combos if combos is None else combos)
        if self.canonical_captions:
            captions = [format_caption(sc.combo, 0) for sc in scenes]
        else:
            templates = rng.integers(len(CAPTION_TEMPLATES), size=batch_size)
            captions = [format_caption(sc.combo, int(t)) for sc, t in zip(scenes, templates)]
        images = render_batch(scenes, self.size if size is None else size)
        hr = render_batch(scenes, hr_size) if hr_size else None
        return DomainBatch(images, captions, [sc.combo for sc in scenes], scenes, hr)

    def __iter__(self) -> Iterator[DomainBatch]:
        while True:
            yield self.batch(self.batch_size, hr_size=self.hr_size)
