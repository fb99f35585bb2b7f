"""ddpmkit: denoising diffusion probabilistic models, correct to the formula.

The Python API a notebook user calls; the ``ddpm`` command is thin glue over it.
"""

__version__ = "0.1.0"

from .errors import CheckpointError, ConfigError, DataError, DdpmError, TrainingError
from .schedules import NoiseSchedule, cosine_schedule, linear_schedule, make_schedule

__all__ = [
    "__version__",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DdpmError",
    "TrainingError",
    "NoiseSchedule",
    "cosine_schedule",
    "linear_schedule",
    "make_schedule",
]
