"""Pixels: the model's [-1, 1] range and uint8, and image grids as PNG files.

The model sees ``to_model_range(images)``: pixels scaled to [-1, 1] as in Ho et al. 2020,
Sec. 3.3. ``to_uint8`` is its inverse, and every image ddpmkit saves or measures (grids,
FID features) is quantised by it, as a saved PNG would be.
"""

from __future__ import annotations

import math
from pathlib import Path

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


def save_image_grid(images: torch.Tensor, path: str | Path, *, nrow: int | None = None, scale: int = 2) -> Path:
    """Write image_grid(images) as a PNG, each pixel enlarged ``scale`` times (nearest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, nrow=nrow)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(path)
    return path
