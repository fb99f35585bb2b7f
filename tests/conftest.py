"""Shared fixtures: a tiny synthetic image-folder dataset and a tiny training config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)  # tests are tiny; one thread avoids oversubscribing 2 cores


def write_folder_dataset(root, *, per_class=24, size=8, classes=("bar", "dot")):
    """Two classes of 8x8 grayscale PNGs: a horizontal bar, or a bright dot; noise on top."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for index in range(per_class):
            image = rng.integers(0, 40, (size, size)).astype(np.uint8)
            if label == 0:
                row = rng.integers(1, size - 1)
                image[row, :] = 255
            else:
                row, column = rng.integers(1, size - 1, 2)
                image[row - 1 : row + 2, column - 1 : column + 2] = 255
            Image.fromarray(image, mode="L").save(folder / f"{index:03d}.png")
    return root


@pytest.fixture(scope="session")
def folder_dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("data") / "shapes")


def tiny_config(folder, **changes):
    from ddpmkit.config import config_from_dict

    values = dict(
        dataset=f"folder:{folder}",
        image_size=8,
        channels=1,
        num_steps=50,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        batch_size=8,
        epochs=2,
        lr=1e-3,
        log_every=1,
        checkpoint_every=3,
        preview_images=4,
        preview_steps=5,
        fid_batches=0,
        device="cpu",
    )
    values.update(changes)
    return config_from_dict(values)


@pytest.fixture(scope="session")
def tiny_run(folder_dataset, tmp_path_factory):
    """A tiny run trained for 2 steps, without preview grids or per-epoch FID; shared by the
    command-line tests of evaluation and figures, which only read it and add files beside."""
    from ddpmkit.training import train

    path = tmp_path_factory.mktemp("runs") / "run"
    train(tiny_config(folder_dataset, max_steps=2, preview_images=0), path, progress=False)
    return path
