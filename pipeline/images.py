"""Image helpers that need only Pillow (no torch): grids."""
from __future__ import annotations

from PIL import Image


def make_grid(images: list[Image.Image], cols: int = 2) -> Image.Image:
    """Tile images into a grid, row by row (the 2x2 of a default job)."""
    w, h = images[0].size
    cols = min(cols, len(images))
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid
