"""Pixels: the model's [-1, 1] range and uint8, and image grids as PNG files.

The model sees ``to_model_range(images)``: pixels scaled to [-1, 1] as in Ho et al. 2020,
Sec. 3.3. ``to_uint8`` is its inverse, and every image ddpmkit saves or measures (grids,
FID features) is quantised by it, as a saved PNG would be.

A grid shows at most GRID_COLUMNS images a row (per class, one row per class; or
GRID_COLUMNS rows of them without classes), each pixel enlarged GRID_SCALE times: what
stays readable on one screen. ``grid_selection`` picks them, and the caller says what was
left out. Every PNG ddpmkit writes of its results carries the settings that made it, as
JSON in its ``PNG_TEXT_KEY`` text chunk (``PIL.Image.open(path).text["ddpmkit"]``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels {0..255} -> float32 in [-1, 1] (Ho et al. 2020, Sec. 3.3: x / 127.5 - 1)."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8 images, got {images_uint8.dtype}")
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Inverse of to_model_range: clamp to [-1, 1], map to [0, 255], round to the nearest level."""
    # float32 first: in bf16, x + 1 keeps 8 significant bits, too few to land on the right one of 256 levels.
    return ((images.to(torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def image_grid(images: torch.Tensor, *, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one uint8 (H', W', C) array.

    ``nrow`` images per row (default: a near-square grid); a ``padding``-pixel white
    border separates the tiles.
    """
    count, channels, height, width = images.shape
    nrow = nrow or math.ceil(math.sqrt(count))
    rows = math.ceil(count / nrow)
    pixels = to_uint8(images.detach().cpu()).permute(0, 2, 3, 1).numpy()
    grid = np.full(
        (rows * (height + padding) + padding, nrow * (width + padding) + padding, channels), 255, dtype=np.uint8
    )
    for index, tile in enumerate(pixels):
        top = padding + (index // nrow) * (height + padding)
        left = padding + (index % nrow) * (width + padding)
        grid[top : top + height, left : left + width] = tile
    return grid


GRID_COLUMNS = 16
GRID_SCALE = 2
PNG_TEXT_KEY = "ddpmkit"


def grid_selection(labels: torch.Tensor | None, count: int) -> tuple[list[int], int]:
    """Which of ``count`` images a grid shows, and how many a row.

    Without labels: the first GRID_COLUMNS ** 2, in a near-square grid. With ``labels``
    (one per image, each class in one block as guidance.class_labels makes them): one row
    per class, every class, each row the first k images of its class, k = the smallest
    class's count, at most GRID_COLUMNS.
    """
    if labels is None:
        shown = min(count, GRID_COLUMNS**2)
        return list(range(shown)), math.ceil(math.sqrt(shown))
    classes = list(dict.fromkeys(labels.tolist()))
    members = {c: torch.nonzero(labels == c).flatten().tolist() for c in classes}
    per_row = min(GRID_COLUMNS, *(len(m) for m in members.values()))
    return [index for c in classes for index in members[c][:per_row]], per_row


def png_text(settings: Mapping[str, Any]) -> dict[str, str]:
    """The PNG text chunk of a result image: ``settings`` as JSON under PNG_TEXT_KEY."""
    return {PNG_TEXT_KEY: json.dumps(dict(settings), default=str)}


def save_image_grid(
    images: torch.Tensor, path: str | Path, *, nrow: int | None = None, settings: Mapping[str, Any] | None = None
) -> Path:
    """Write image_grid(images) as a PNG, each pixel enlarged GRID_SCALE times (nearest);
    ``settings``, when given, go into its text chunk (png_text)."""
    from PIL import PngImagePlugin

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, nrow=nrow)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    picture = picture.resize((picture.width * GRID_SCALE, picture.height * GRID_SCALE), Image.NEAREST)
    text = PngImagePlugin.PngInfo()
    for key, value in (png_text(settings) if settings is not None else {}).items():
        text.add_text(key, value)
    picture.save(path, pnginfo=text)
    return path
