"""Figures: image grids (Pillow) and training curves (matplotlib), written as PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import to_uint8
from .errors import DdpmError


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


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss (train and validation) and, when logged, FID against steps, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise DdpmError(f"{run_dir} has no metrics.jsonl: is it a ddpmkit run directory?")
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    series = {
        key: [(r["step"], r[key]) for r in records if r.get(key) is not None]
        for key in ("train_loss", "val_loss", "fid")
    }
    panels = [("loss (MSE on the noise)", ["train_loss", "val_loss"])]
    if series["fid"]:
        panels.append(("FID (validation minibatches)", ["fid"]))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for axis, (title, keys) in zip(axes[0], panels):
        for key in keys:
            if series[key]:
                steps, values = zip(*series[key])
                axis.plot(steps, values, marker="o" if key != "train_loss" else None, label=key.replace("_", " "))
        axis.set_xlabel("optimizer step")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    if series["train_loss"]:
        axes[0][0].set_yscale("log")
    figure.suptitle(run_dir.name)
    figure.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
