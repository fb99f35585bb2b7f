"""ddpmkit: denoising diffusion probabilistic models, correct to the formula.

The Python API a notebook user calls; the ``ddpm`` command is thin glue over it::

    import ddpmkit
    trained = ddpmkit.load_trained_model("runs/demo")
    images = ddpmkit.sample(trained.model, trained.schedule, (16, *trained.image_shape), sampler="ddim", steps=50)

The names below are loaded on first use (PEP 562), so ``import ddpmkit`` (and ``ddpm
--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "TrainedModel": "checkpoint",
    "load_trained_model": "checkpoint",
    "TrainConfig": "config",
    "ImageDataset": "data",
    "load_dataset": "data",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "DdpmError": "errors",
    "TrainingError": "errors",
    "compute_fid": "fid",
    "frechet_distance": "metrics",
    "export_diffusers": "interop",
    "import_diffusers": "interop",
    "nll": "likelihood",
    "precision_recall": "metrics",
    "ddpm_loss": "objectives",
    "sample": "samplers",
    "sample_batches": "samplers",
    "NoiseSchedule": "schedules",
    "cosine_schedule": "schedules",
    "linear_schedule": "schedules",
    "make_schedule": "schedules",
    "train": "training",
    "UNet": "unet",
    "UNetConfig": "unet",
}
__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ddpmkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

