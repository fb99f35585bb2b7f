"""The training configuration: one flat dataclass, TOML files, command-line overrides.

Precedence, lowest to highest: the dataclass defaults, a ``--config FILE`` (TOML), then
flags given on the command line. The resolved config is stored as ``config.json`` in the
run directory and inside every checkpoint; training prints how it differs from the
defaults (``differences_from_defaults``).

Every field is validated when the dataclass is built, so a bad value is reported
before any data is read or any model is built.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .choices import Device, LossWeighting, Precision, PredictionName, SamplerName, ScheduleName, VarianceName
from .errors import ConfigError
from .validation import check_dataclass_fields, require

if TYPE_CHECKING:
    from .schedules import NoiseSchedule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. Defaults are the poster's MNIST setting."""

    # data
    dataset: str = "mnist"
    data_dir: str | None = None  # default: $DDPMKIT_DATA or ~/.cache/ddpmkit/data
    image_size: int | None = None  # folder: datasets only (standard ones fix it)
    channels: int | None = None  # folder: datasets only; 1 = grayscale, 3 = RGB
    # diffusion (Ho et al. 2020: T = 1000, linear betas 1e-4..0.02)
    schedule: ScheduleName = "linear"
    num_steps: int = 1000
    beta_start: float | None = None  # linear only: beta_1 and beta_T; None: the schedule's own defaults
    beta_end: float | None = None
    # model (the poster's UNet: 3 levels 64/128/128, 2 ResBlocks per level)
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = ()
    dropout: float = 0.0
    conditional: bool = False  # label embedding, for classifier-free guidance
    label_dropout: float = 0.1  # p of replacing the label by "no label" (Ho & Salimans)
    # objective (Algorithm 1: the MSE on the noise, fixed variances; objectives.py)
    prediction: PredictionName = "eps"  # the network's target: eps, x0 or v (Salimans & Ho 2022)
    learn_variance: bool = False  # output the variance too, trained by the hybrid loss (Improved DDPM)
    loss_weighting: LossWeighting = "none"  # "min-snr": Hang et al. 2023's min(SNR, gamma) weighting
    min_snr_gamma: float = 5.0  # gamma of min-snr
    # optimisation (Algorithm 1: Adam, lr 1e-4, MSE on the noise)
    epochs: int = 30
    max_steps: int | None = None  # stop early after this many optimizer steps
    batch_size: int = 128  # global batch: per process x processes x grad_accum
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0  # linear learning-rate warm-up over this many steps (Ho et al.'s CIFAR-10: 5000); 0 = off
    random_flip: bool = False  # flip training images horizontally with p = 1/2 (Ho et al.'s CIFAR-10; not for digits)
    grad_clip: float = 1.0  # gradient-norm clip, 0 = off; Ho et al.'s released code uses 1
    ema_decay: float = 0.9999
    precision: Precision = "fp32"
    compile: bool = False  # torch.compile the model: opt-in, compiling takes minutes (benchmarks/README.md)
    cpu_workers: int = 0  # CPU: split each batch over this many threads, one core each (0: one per core; 1: off)
    # run
    seed: int = 0
    device: Device = "auto"
    log_every: int = 50  # steps between metrics.jsonl lines
    checkpoint_every: int = 500  # steps; a checkpoint is also written at each epoch end
    keep_checkpoints: int = 3  # the last K, plus the best by validation loss
    preview_images: int = 64  # images in the grid sampled after each epoch; 0 = none (was sample_every_epoch)
    preview_sampler: SamplerName = "ddim"  # cheap settings for per-epoch grids and FID
    preview_steps: int = 50
    fid_batches: int = 5  # the poster: FID on 5 validation minibatches per epoch; 0 = off
    tensorboard: bool = False  # also log metrics and sample grids to RUN_DIR/tensorboard

    def __post_init__(self) -> None:
        check_dataclass_fields(self)
        require(self.num_steps >= 1, "num_steps must be >= 1")
        require((self.beta_start is None) == (self.beta_end is None), "beta_start and beta_end are set together or not at all")
        require(self.beta_start is None or self.schedule == "linear", f"beta_start and beta_end set the linear schedule's range, not the {self.schedule} one's")
        require(
            self.beta_start is None or 0 < self.beta_start <= self.beta_end < 1,
            f"need 0 < beta_start <= beta_end < 1, got {self.beta_start} and {self.beta_end}",
        )
        require(self.base_channels >= 1, "base_channels must be >= 1")
        require(len(self.channel_mults) >= 1 and min(self.channel_mults) >= 1, "channel_mults must be a non-empty list of integers >= 1")
        require(self.num_res_blocks >= 1, "num_res_blocks must be >= 1")
        levels = len(self.channel_mults)
        bad = [a for a in self.attention_levels if not 0 <= a < levels]
        require(not bad, f"attention level(s) {bad} out of range: the model has levels 0..{levels - 1}")
        require(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        require(0.0 <= self.label_dropout < 1.0, "label_dropout must be in [0, 1)")
        require(self.epochs >= 1, "epochs must be >= 1")
        require(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1")
        require(self.batch_size >= 1, "batch_size must be >= 1")
        require(self.grad_accum >= 1, "grad_accum must be >= 1")
        require(self.cpu_workers >= 0, "cpu_workers must be >= 0 (0: one per core, 1: off)")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.min_snr_gamma > 0, f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0 (0 turns the warm-up off), got {self.warmup_steps}")
        require(self.grad_clip >= 0, "grad_clip must be >= 0 (0 turns clipping off)")
        require(0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)")
        require(self.log_every >= 1 and self.checkpoint_every >= 1, "log_every and checkpoint_every must be >= 1")
        require(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        require(self.preview_images >= 0 and self.fid_batches >= 0, "preview_images and fid_batches must be >= 0")
        require(1 <= self.preview_steps <= self.num_steps, f"preview_steps must be in [1, num_steps={self.num_steps}]")
        require(self.image_size is None or self.image_size >= 1, "image_size must be >= 1")
        require(self.channels in (None, 1, 3), "channels must be 1 (grayscale) or 3 (RGB)")

    def noise_schedule(self) -> NoiseSchedule:
        """The schedule of this run: ``schedule`` over ``num_steps``, with beta_start..beta_end if set."""
        # Deferred: importing the config (as the command line's parser does) loads no torch.
        from .schedules import linear_schedule, make_schedule

        if self.beta_start is None:
            return make_schedule(self.schedule, self.num_steps)
        return linear_schedule(self.num_steps, self.beta_start, self.beta_end)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def differences_from_defaults(config: TrainConfig) -> dict[str, Any]:
    """The fields of ``config`` whose values are not the defaults, in field order."""
    defaults = TrainConfig().to_dict()
    return {key: value for key, value in config.to_dict().items() if value != defaults[key]}


# Old key -> its new name: configs, runs and checkpoints written before a rename still load.
RENAMED_KEYS = {"sample_every_epoch": "preview_images"}


def model_output_options(config: TrainConfig, variance: VarianceName | None = None) -> dict[str, str]:
    """How samplers.sample and likelihood.nll read the output of a model trained with ``config``:
    {"prediction": its target, "variance": ``variance``}. ``variance`` None is the model's own
    default: "learned" for a model that learns it, else "beta". A model's output either holds
    a variance or not, so "learned" is refused for the one kind and beta / posterior for the other."""
    if variance is None:
        variance = "learned" if config.learn_variance else "beta"
    if config.learn_variance and variance != "learned":
        raise ConfigError(f"this model learns its variance (learn_variance); sample it with variance 'learned', not {variance!r}")
    if not config.learn_variance and variance == "learned":
        raise ConfigError("variance 'learned' needs a model trained with learn_variance; this one has fixed variances (beta, posterior)")
    return {"prediction": config.prediction, "variance": variance}


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(TrainConfig))


def config_from_dict(values: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Build a TrainConfig, naming the valid keys when an unknown one is given; old key
    names (RENAMED_KEYS) are read as their new ones."""
    values = dict(values)
    for old, new in RENAMED_KEYS.items():
        if old in values:
            if new in values:
                raise ConfigError(f"{source}: {old} is the old name of {new}; give only {new}")
            values[new] = values.pop(old)
    valid = field_names()
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    return TrainConfig(**values)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a flat dict (checked later by config_from_dict)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def resolve_config(config_file: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < TOML file < command-line overrides (entries whose value is None are unset)."""
    values: dict[str, Any] = load_toml(config_file) if config_file else {}
    source = str(config_file) if config_file else "options"
    values.update({key: value for key, value in overrides.items() if value is not None})
    return config_from_dict(values, source=source)
