"""Shared fixtures: a tiny synthetic image-folder dataset, a tiny training config, and the
device of the device tests.

``pytest --device cuda`` runs every test that takes the ``device`` fixture on the GPU (they
carry the ``device`` marker, so ``-m device`` selects exactly them); the default, cpu, runs
them as before. On CUDA, float arithmetic is made reproducible and full precision, as the
tests' oracles assume: deterministic algorithms (cuBLAS needs its workspace setting before
its first use) and no TF32 in convolutions or matmuls.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)  # tests are tiny; one thread avoids oversubscribing 2 cores


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu", help="where the device tests (-m device) run; default cpu")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "device: takes the device fixture, so runs on pytest --device (cpu by default)")
    if config.getoption("--device") == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda: torch sees no CUDA device")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.config.getoption("--device"))


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
