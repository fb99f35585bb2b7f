"""ddpmkit: denoising diffusion probabilistic models, correct to the formula.

The Python API a notebook user calls; the ``ddpm`` command is thin glue over it::

    import ddpmkit
    trained = ddpmkit.load_trained_model("runs/demo")
    images = ddpmkit.sample(trained.model, trained.schedule, (16, *trained.image_shape), sampler="ddim", steps=50)
"""

__version__ = "0.1.0"

from .checkpoint import TrainedModel, load_trained_model
from .config import TrainConfig
from .data import ImageDataset, load_dataset
from .errors import CheckpointError, ConfigError, DataError, DdpmError, TrainingError
from .evaluation import compute_fid, frechet_distance, precision_recall
from .interop import export_diffusers, import_diffusers
from .samplers import sample, sample_batches
from .schedules import NoiseSchedule, cosine_schedule, linear_schedule, make_schedule
from .training import train
from .unet import UNet, UNetConfig

__all__ = [
    "__version__",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DdpmError",
    "ImageDataset",
    "NoiseSchedule",
    "TrainConfig",
    "TrainedModel",
    "TrainingError",
    "UNet",
    "UNetConfig",
    "compute_fid",
    "cosine_schedule",
    "export_diffusers",
    "frechet_distance",
    "import_diffusers",
    "linear_schedule",
    "load_dataset",
    "load_trained_model",
    "make_schedule",
    "precision_recall",
    "sample",
    "sample_batches",
    "train",
]
