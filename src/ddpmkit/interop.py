"""diffusers checkpoints in and out: published DDPMs as ddpmkit runs, ddpmkit runs as diffusers pipelines.

diffusers keeps a DDPM as a ``UNet2DModel`` (``config.json`` + ``diffusion_pytorch_model.safetensors``)
and a ``DDPMScheduler`` (``scheduler_config.json``), either side by side in one folder (the
layout of ``google/ddpm-cifar10-32``) or as a pipeline folder (``model_index.json``, ``unet/``,
``scheduler/``, and ``unet_ema/`` where a training script saved both weight sets).

* import_diffusers reads such a folder (or a Hub repo id, with huggingface_hub) and writes a
  normal ddpmkit run directory: config.json, one checkpoint at step 0 holding the imported
  weights as both raw and EMA weights (``unet_ema/`` as EMA where there is one), and
  imported.json with the source's configs. diffusers is never imported: the configs are
  read as JSON and the weights with safetensors. Weights only in ``.bin`` (pickle) files are
  refused: the README says why and how to convert them.
* export_diffusers writes a run's weights (EMA by default) as a pipeline folder that
  ``diffusers.DDPMPipeline.from_pretrained`` loads as it is.

Conventions of the translation, every one checked by tests/test_interop.py against diffusers:

* UNet2DModel options map onto UNetConfig's (unet.py names the defaults of both):
  ``freq_shift`` -> timestep_frequency_shift, ``flip_sin_to_cos`` -> timestep_cos_first,
  ``add_attention`` -> middle_attention, ``downsample_padding`` 1 / 0 -> "symmetric" /
  "bottom-right", ``norm_num_groups`` -> norm_groups, ``norm_eps`` -> norm_eps,
  ``attention_head_dim`` -> attention_head_dim, ``block_out_channels`` -> base_channels times
  channel_mults, Attn blocks -> attention_levels, ``num_class_embeds`` -> num_classes. Any other
  value is refused by name.
* Class labels: a diffusers model has exactly ``num_class_embeds`` embeddings and no "no label"
  one; it imports with null_label_embedding=False. A ddpmkit model exports its "no label" row as
  class ``num_classes`` (num_class_embeds = num_classes + 1) and names it under the private
  config key ``_ddpmkit_null_class`` (diffusers ignores keys that start with "_"), which the
  import reads back.
* Weights: the same tensors under other names; ddpmkit's attention keeps Q, K and V in one
  Linear (``qkv``), diffusers in three (``to_q``, ``to_k``, ``to_v``; in older files ``query``,
  ``key``, ``value`` and ``proj_attn`` for ``to_out.0``), concatenated in that order.
* DDPMScheduler: ``beta_schedule`` "linear" (with its beta_start, beta_end) or "squaredcos_cap_v2"
  (ddpmkit's cosine), ``num_train_timesteps`` -> num_steps; ``variance_type`` "fixed_large" /
  "fixed_small" is ddpmkit's ancestral ``variance`` "beta" / "posterior" and ``clip_sample`` its
  ``clip_denoised``. Those two are options of each sampling call in ddpmkit, not of a run: the
  import records them in imported.json and returns them (``ddpm import-diffusers`` prints the
  flags to pass when they differ from ddpmkit's defaults, "beta" and clipping). Only epsilon
  prediction is read. The scheduler's ``timestep_spacing`` and ``steps_offset`` only choose the
  steps of diffusers' own shortened sampling and are not imported. The export keeps diffusers'
  "leading" spacing, which ends at step index 0: DDPMScheduler adds noise at every visited index
  above 0, so with "trailing" and fixed_large its few-step samples would end with noise of
  variance 1 - abar at the last visited index.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .checkpoint import load_checkpoint, model_description, resolve_checkpoint, save_checkpoint, step_checkpoint_path
from .choices import ScheduleName, VarianceName
from .config import TrainConfig
from .data import FOLDER_PREFIX, dataset_info
from .errors import CheckpointError, ConfigError, DdpmError
from .io import load_weights, write_atomically
from .training import check_run_dir
from .unet import UNet, UNetConfig

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
SCHEDULER_FILE = "scheduler_config.json"
MODEL_INDEX_FILE = "model_index.json"
RECORD_FILE = "imported.json"  # in an imported run: where it came from and how its source samples
NULL_CLASS_KEY = "_ddpmkit_null_class"
HUB_FILES = [
    MODEL_INDEX_FILE, CONFIG_FILE, WEIGHTS_FILE, SCHEDULER_FILE,
    *(f"{sub}/{name}" for sub in ("unet", "unet_ema") for name in (CONFIG_FILE, WEIGHTS_FILE)), f"scheduler/{SCHEDULER_FILE}",
]

# UNet2DModel's and DDPMScheduler's constructor defaults (diffusers fills a missing key with them).
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D", "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1, "downsample_padding": 1,
    "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5, "resnet_time_scale_shift": "default",
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}
DDPM_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "trained_betas": None,
    "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon", "thresholding": False,
    "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
    "steps_offset": 0, "rescale_betas_zero_snr": False,
}
# Values that must be exactly these (anything else changes the network or the process).
_UNET_FIXED = {
    "center_input_sample": False, "time_embedding_type": "positional", "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv", "resnet_time_scale_shift": "default",
    "class_embed_type": None,
}
_SCHEDULER_FIXED = {"trained_betas": None, "prediction_type": "epsilon", "thresholding": False, "rescale_betas_zero_snr": False}
_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # diffusers' beta_schedule -> ddpmkit's schedule
_VARIANCES = {"fixed_large": "beta", "fixed_small": "posterior"}  # diffusers' variance_type -> ddpmkit's variance

# ddpmkit module paths -> diffusers module paths, first match wins; then the leaf renames.
_MODULE_PATHS = [
    (r"time_mlp\.0\.", "time_embedding.linear_1."),
    (r"time_mlp\.2\.", "time_embedding.linear_2."),
    (r"label_embedding\.", "class_embedding."),
    (r"input_conv\.", "conv_in."),
    (r"output\.0\.", "conv_norm_out."),
    (r"output\.2\.", "conv_out."),
    (r"(down|up)\.(\d+)\.blocks\.(\d+)\.res\.", r"\1_blocks.\2.resnets.\3."),
    (r"(down|up)\.(\d+)\.blocks\.(\d+)\.attention\.", r"\1_blocks.\2.attentions.\3."),
    (r"down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0."),
    (r"up\.(\d+)\.upsample\.", r"up_blocks.\1.upsamplers.0."),
    (r"middle\.(\d+)\.res\.", r"mid_block.resnets.\1."),
    (r"middle\.0\.attention\.", "mid_block.attentions.0."),
]
_LEAVES = {"embedding_projection": "time_emb_proj", "skip": "conv_shortcut", "norm": "group_norm", "out": "to_out.0"}
_QKV = ("to_q", "to_k", "to_v")
_DEPRECATED_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_DEPRECATED_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# --- the UNet's config ---------------------------------------------------------------------------

def unet_config_from_diffusers(config: dict[str, Any], *, source: str = "config.json") -> tuple[UNetConfig, int]:
    """The UNetConfig and image size of a UNet2DModel config.json; ConfigError names the first
    option ddpmkit's UNet cannot express."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConfigError(f"{source}: {config['_class_name']} is not a UNet2DModel, the only model class ddpmkit imports")
    _refuse_unknown(config, UNET2D_DEFAULTS, source, "UNet2DModel")
    values = {**UNET2D_DEFAULTS, **config}

    def refuse(option: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: {option}={values[option]!r} {why}")

    for option, required in _UNET_FIXED.items():
        if values[option] != required:
            raise refuse(option, f"is not supported (ddpmkit's UNet: {required!r})")
    if values["act_fn"] not in ("silu", "swish"):
        raise refuse("act_fn", "is not supported (ddpmkit's UNet: silu)")
    widths = list(values["block_out_channels"])
    base = widths[0] if widths else 0
    if not widths or any(width % base for width in widths):
        raise refuse("block_out_channels", "is not supported: every width must be a multiple of the first (ddpmkit's channel_mults)")
    if values["time_embedding_dim"] not in (None, 4 * base):
        raise refuse("time_embedding_dim", f"is not supported (ddpmkit's UNet: 4 x block_out_channels[0] = {4 * base})")
    down = [_block_kind(name, "Down") for name in values["down_block_types"]]
    up = [_block_kind(name, "Up") for name in values["up_block_types"]]
    if None in down:
        raise refuse("down_block_types", "is not supported (ddpmkit: DownBlock2D and AttnDownBlock2D)")
    if None in up:
        raise refuse("up_block_types", "is not supported (ddpmkit: UpBlock2D and AttnUpBlock2D)")
    if not len(down) == len(up) == len(widths):
        raise refuse("down_block_types", "must have as many entries as up_block_types and block_out_channels")
    if down != up[::-1]:
        raise refuse("up_block_types", "must mirror down_block_types (ddpmkit has attention on both paths of a level or on neither)")
    if values["norm_num_groups"] is None:
        raise refuse("norm_num_groups", "is not supported (ddpmkit needs a group count)")
    if values["attn_norm_num_groups"] not in (None, values["norm_num_groups"]):
        raise refuse("attn_norm_num_groups", "is not supported (ddpmkit: the attention's GroupNorm has norm_num_groups groups)")
    if values["downsample_padding"] not in (0, 1):
        raise refuse("downsample_padding", "is not supported (ddpmkit: 1, or 0 for bottom-right padding)")
    shift = values["freq_shift"]
    if isinstance(shift, bool) or not float(shift).is_integer():
        raise refuse("freq_shift", "is not supported (ddpmkit: an integer)")
    size = values["sample_size"]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise refuse("sample_size", "is not supported (ddpmkit needs square images of a given size)")
    if values["out_channels"] != values["in_channels"]:
        raise refuse("out_channels", f"is not supported: ddpmkit's UNet predicts the noise alone, in_channels={values['in_channels']} channels")
    attention_levels = tuple(level for level, kind in enumerate(down) if kind == "Attn")
    middle_attention = bool(values["add_attention"])
    num_class_embeds = values["num_class_embeds"]
    null_class = config.get(NULL_CLASS_KEY)
    if null_class is not None and (num_class_embeds is None or null_class != num_class_embeds - 1):
        raise ConfigError(f"{source}: {NULL_CLASS_KEY}={null_class!r} must be num_class_embeds - 1, the class ddpmkit exports as 'no label'")
    try:
        unet_config = UNetConfig(
            in_channels=values["in_channels"],
            base_channels=base,
            channel_mults=tuple(width // base for width in widths),
            num_res_blocks=values["layers_per_block"],
            attention_levels=attention_levels,
            num_classes=None if num_class_embeds is None else num_class_embeds - (null_class is not None),
            dropout=values["dropout"],
            timestep_frequency_shift=int(shift),
            timestep_cos_first=values["flip_sin_to_cos"],
            middle_attention=middle_attention,
            downsample_padding="symmetric" if values["downsample_padding"] == 1 else "bottom-right",
            norm_groups=values["norm_num_groups"],
            norm_eps=values["norm_eps"],
            # Without any attention layer the head width describes nothing.
            attention_head_dim=values["attention_head_dim"] if attention_levels or middle_attention else None,
            null_label_embedding=num_class_embeds is None or null_class is not None,
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return unet_config, size


def diffusers_unet_config(config: UNetConfig, image_size: int) -> dict[str, Any]:
    """The UNet2DModel config.json of a ddpmkit UNet; ConfigError says what diffusers lacks."""
    out_channels = config.in_channels if config.out_channels is None else config.out_channels
    if out_channels != config.in_channels:
        raise ConfigError(
            f"the model predicts {out_channels} channels for {config.in_channels}-channel images (a learned variance): "
            "diffusers' DDPMPipeline reads the UNet's output as the noise alone"
        )
    if config.channel_mults[0] != 1:
        raise ConfigError(
            f"channel_mults[0]={config.channel_mults[0]}: diffusers' UNet2DModel makes its first level as wide as its input "
            "convolution (block_out_channels[0]), ddpmkit's base_channels"
        )
    with torch.device("meta"):  # the modules' shapes, without their memory
        groups = _group_counts(UNet.from_config(config))
    counts = set(groups.values())
    if len(counts) > 1:
        described = ", ".join(f"{count} at {width} channels" for width, count in sorted(groups.items()))
        raise ConfigError(
            f"the model's GroupNorms have different group counts ({described}: ddpmkit's per-width rule for narrow models); "
            "diffusers' UNet2DModel has one norm_num_groups for every GroupNorm"
        )
    (norm_groups,) = counts
    kinds = ["Attn" if level in config.attention_levels else "" for level in range(config.num_levels)]
    diffusers_config: dict[str, Any] = {
        "_class_name": "UNet2DModel",
        "_ddpmkit_version": __version__,
        **UNET2D_DEFAULTS,
        "sample_size": image_size,
        "in_channels": config.in_channels,
        "out_channels": config.in_channels,
        "freq_shift": config.timestep_frequency_shift,
        "flip_sin_to_cos": config.timestep_cos_first,
        "down_block_types": [f"{kind}DownBlock2D" for kind in kinds],
        "up_block_types": [f"{kind}UpBlock2D" for kind in reversed(kinds)],
        "block_out_channels": [config.base_channels * mult for mult in config.channel_mults],
        "layers_per_block": config.num_res_blocks,
        "downsample_padding": 1 if config.downsample_padding == "symmetric" else 0,
        "dropout": config.dropout,
        "attention_head_dim": config.attention_head_dim,
        "norm_num_groups": norm_groups,
        "norm_eps": config.norm_eps,
        "add_attention": config.has_middle_attention,
        "num_class_embeds": None if config.num_classes is None else config.num_classes + config.null_label_embedding,
    }
    if config.num_classes is not None and config.null_label_embedding:
        diffusers_config[NULL_CLASS_KEY] = config.num_classes
    return diffusers_config


def _block_kind(name: str, direction: str) -> str | None:
    """"Attn" or "" for the UNet2DModel block types ddpmkit has, else None ("UNetRes" is an old prefix)."""
    name = name.removeprefix("UNetRes")
    return {f"{direction}Block2D": "", f"Attn{direction}Block2D": "Attn"}.get(name)


def _group_counts(model: nn.Module) -> dict[int, int]:
    """{channels: groups} over every GroupNorm of a model."""
    return {module.num_channels: module.num_groups for module in model.modules() if isinstance(module, nn.GroupNorm)}


def _refuse_unknown(config: dict[str, Any], known: dict[str, Any], source: str, what: str) -> None:
    unknown = sorted(key for key in config if not key.startswith("_") and key not in known)
    if unknown:
        raise ConfigError(f"{source}: unknown {what} option(s) {', '.join(unknown)}")


# --- the scheduler -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SchedulerSettings:
    """What a DDPMScheduler config says in ddpmkit's terms: the run's schedule and the
    ancestral sampler's options that sample as the scheduler does."""

    schedule: ScheduleName
    num_steps: int
    beta_start: float | None  # the linear schedule's range; None for cosine
    beta_end: float | None
    variance: VarianceName
    clip_denoised: bool


def scheduler_settings_from_diffusers(config: dict[str, Any], *, source: str = "scheduler_config.json") -> SchedulerSettings:
    """SchedulerSettings of a DDPMScheduler scheduler_config.json; ConfigError names what ddpmkit lacks."""
    if config.get("_class_name", "DDPMScheduler") != "DDPMScheduler":
        raise ConfigError(f"{source}: {config['_class_name']} is not a DDPMScheduler, the only scheduler ddpmkit reads")
    _refuse_unknown(config, DDPM_SCHEDULER_DEFAULTS, source, "DDPMScheduler")
    values = {**DDPM_SCHEDULER_DEFAULTS, **config}
    for option, required in _SCHEDULER_FIXED.items():
        if values[option] != required:
            raise ConfigError(f"{source}: {option}={values[option]!r} is not supported (ddpmkit: {required!r})")
    if values["beta_schedule"] not in _SCHEDULES:
        raise ConfigError(f"{source}: beta_schedule={values['beta_schedule']!r} is not supported (ddpmkit: {', '.join(_SCHEDULES)})")
    if values["variance_type"] not in _VARIANCES:
        raise ConfigError(f"{source}: variance_type={values['variance_type']!r} is not supported (ddpmkit: {', '.join(_VARIANCES)})")
    if values["clip_sample"] and values["clip_sample_range"] != 1.0:
        raise ConfigError(f"{source}: clip_sample_range={values['clip_sample_range']!r} is not supported (ddpmkit clips x0 to [-1, 1])")
    linear = values["beta_schedule"] == "linear"
    return SchedulerSettings(
        schedule=_SCHEDULES[values["beta_schedule"]],
        num_steps=values["num_train_timesteps"],
        beta_start=float(values["beta_start"]) if linear else None,
        beta_end=float(values["beta_end"]) if linear else None,
        variance=_VARIANCES[values["variance_type"]],
        clip_denoised=bool(values["clip_sample"]),
    )


def diffusers_scheduler_config(config: TrainConfig, *, variance: VarianceName = "beta", clip_denoised: bool = True) -> dict[str, Any]:
    """The DDPMScheduler config of a run's schedule, sampling as ddpmkit's ancestral sampler
    with ``variance`` and ``clip_denoised``."""
    betas = config.noise_schedule().betas
    linear = config.schedule == "linear"
    return {
        "_class_name": "DDPMScheduler",
        "_ddpmkit_version": __version__,
        **DDPM_SCHEDULER_DEFAULTS,
        "num_train_timesteps": config.num_steps,
        "beta_schedule": _key_of(_SCHEDULES, config.schedule),
        "beta_start": float(betas[0]) if linear else DDPM_SCHEDULER_DEFAULTS["beta_start"],
        "beta_end": float(betas[-1]) if linear else DDPM_SCHEDULER_DEFAULTS["beta_end"],
        "variance_type": _key_of(_VARIANCES, variance),
        "clip_sample": clip_denoised,
    }


def _key_of(mapping: dict[str, str], value: str) -> str:
    return next(key for key, mapped in mapping.items() if mapped == value)


# --- the weights -------------------------------------------------------------------------------------

def diffusers_names(key: str) -> list[str]:
    """The diffusers state-dict key(s) of a ddpmkit one: three for an attention's qkv (Q, K, V)."""
    module, _, parameter = key.rpartition(".")
    path = module + "."
    for pattern, replacement in _MODULE_PATHS:
        match = re.match(pattern, path)
        if match:
            break
    else:
        raise KeyError(key)  # a bug: every module of the UNet has a rule
    head = match.expand(replacement)
    leaf = path[match.end():].rstrip(".")
    if leaf == "qkv":
        return [f"{head}{name}.{parameter}" for name in _QKV]
    leaf = _LEAVES.get(leaf, leaf)
    return [f"{head}{leaf}.{parameter}" if leaf else f"{head}{parameter}"]


def weights_to_diffusers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ddpmkit UNet state dict under UNet2DModel's names (contiguous CPU tensors)."""
    converted = {}
    for key, value in weights.items():
        names = diffusers_names(key)
        for name, part in zip(names, value.chunk(len(names))):
            converted[name] = part.detach().to("cpu").contiguous()
    return converted


def weights_from_diffusers(weights: dict[str, torch.Tensor], keys: Iterable[str], *, source: str) -> dict[str, torch.Tensor]:
    """The state dict with ddpmkit's ``keys`` from a UNet2DModel's; CheckpointError names the
    keys one side lacks. Old attention names (query, key, value, proj_attn) are read too."""
    theirs = {}
    for name, value in weights.items():
        match = _DEPRECATED_ATTENTION.match(name)
        theirs[f"{match[1]}.{_DEPRECATED_NAMES[match[2]]}.{match[3]}" if match else name] = value
    ours, missing = {}, []
    for key in keys:
        names = diffusers_names(key)
        absent = [name for name in names if name not in theirs]
        if absent:
            missing += absent
            continue
        parts = [theirs.pop(name) for name in names]
        ours[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
    if missing or theirs:
        shown = [f"{label}: {', '.join(names[:4])}" + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
                 for label, names in (("missing", missing), ("unexpected", sorted(theirs))) if names]
        raise CheckpointError(f"{source} does not match its config.json: " + "; ".join(shown))
    return ours


# --- folders -----------------------------------------------------------------------------------------

@dataclass
class DiffusersModel:
    """A diffusers DDPM as read from a folder: configs as JSON dicts, weights under diffusers' names."""

    unet_config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    ema_weights: dict[str, torch.Tensor] | None  # unet_ema/, where the folder has one
    scheduler_config: dict[str, Any] | None  # None: the folder has no scheduler
    unet_dir: Path
    scheduler_file: Path


def read_diffusers_folder(folder: str | Path) -> DiffusersModel:
    """A UNet2DModel folder (config.json + weights, scheduler_config.json beside them if any)
    or a pipeline folder (unet/, scheduler/, unet_ema/ if any)."""
    folder = Path(folder)
    pipeline = (folder / "unet" / CONFIG_FILE).is_file()
    unet_dir = folder / "unet" if pipeline else folder
    if not (unet_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder} is not a diffusers model folder: it has neither {CONFIG_FILE} nor unet/{CONFIG_FILE}")
    scheduler_file = folder / "scheduler" / SCHEDULER_FILE if pipeline else folder / SCHEDULER_FILE
    ema_dir = folder / "unet_ema"
    unet_config = _read_json(unet_dir / CONFIG_FILE)
    ema_weights = None
    if pipeline and (ema_dir / CONFIG_FILE).is_file():
        if _without_private(_read_json(ema_dir / CONFIG_FILE)) != _without_private(unet_config):
            raise CheckpointError(f"{ema_dir / CONFIG_FILE} describes another model than {unet_dir / CONFIG_FILE}")
        ema_weights = _read_weights(ema_dir)
    return DiffusersModel(
        unet_config=unet_config,
        weights=_read_weights(unet_dir),
        ema_weights=ema_weights,
        scheduler_config=_read_json(scheduler_file) if scheduler_file.is_file() else None,
        unet_dir=unet_dir,
        scheduler_file=scheduler_file,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON file ({exc})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} holds a JSON {type(values).__name__}, not an object")
    return values


def _without_private(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        pickles = sorted(p.name for p in directory.glob("*.bin"))
        if pickles:
            raise CheckpointError(
                f"{directory} has its weights only as {pickles[0]}, a pickle, which ddpmkit never loads; convert it to "
                f"{WEIGHTS_FILE} first (README, 'diffusers models in and out')"
            )
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None


def fetch_source(source: str | Path) -> Path:
    """A local folder as it is; otherwise a Hub repo id ("owner/name"), downloaded (only the
    JSON and safetensors files of the layouts above) with huggingface_hub into its cache."""
    path = Path(source)
    if path.exists():
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise ConfigError(f"{source} is neither a folder nor a Hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(
            f"{source} is not a folder here; to fetch it from the Hugging Face Hub install huggingface_hub: pip install 'ddpmkit[hub]'"
        ) from None
    try:
        return Path(snapshot_download(str(source), allow_patterns=HUB_FILES))
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DdpmError(
            f"{source} is not a folder here and could not be fetched from the Hub ({reason}); put its "
            f"{CONFIG_FILE}, {WEIGHTS_FILE} and {SCHEDULER_FILE} (or model_index.json, unet/ and scheduler/) "
            f"from https://huggingface.co/{source} into a folder and import that folder"
        ) from None


# --- import and export -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportedRun:
    """What import_diffusers wrote, and how to sample as the source's scheduler does."""

    run_dir: Path
    checkpoint: Path
    variance: VarianceName
    clip_denoised: bool
    scheduler_found: bool  # False: the folder had no scheduler; DDPMScheduler's defaults were used
    separate_ema: bool  # True: EMA weights from unet_ema/, raw ones from unet/

    def sampler_flags(self) -> list[str]:
        """The ``ddpm sample`` flags that differ from ddpmkit's defaults ("beta", clipping)."""
        return (["--variance", self.variance] if self.variance != "beta" else []) + ([] if self.clip_denoised else ["--no-clip"])


def import_diffusers(source: str | Path, out: str | Path, *, dataset: str, data_dir: str | None = None) -> ImportedRun:
    """Write the diffusers DDPM at ``source`` (folder or Hub repo id) as a ddpmkit run ``out``.

    ``dataset`` (and ``data_dir``) name the data the model was trained on, which ``ddpm fid``
    compares its samples with; its images must have the model's size and channels.
    """
    out = Path(out)
    check_run_dir(out, resume=False)
    folder = fetch_source(source)
    found = read_diffusers_folder(folder)
    model_config, image_size = unet_config_from_diffusers(found.unet_config, source=str(found.unet_dir / CONFIG_FILE))
    # Without a scheduler, DDPMScheduler's defaults: Ho et al.'s linear 1e-4 .. 0.02 over 1000 steps.
    settings = scheduler_settings_from_diffusers(found.scheduler_config or {}, source=str(found.scheduler_file))
    folder_dataset = dataset.startswith(FOLDER_PREFIX)
    geometry = {"image_size": image_size, "channels": model_config.in_channels} if folder_dataset else {}
    info = dataset_info(dataset, data_dir=data_dir, **geometry)
    if (info.image_size, info.channels) != (image_size, model_config.in_channels):
        raise ConfigError(
            f"{dataset} images are {info.image_size}x{info.image_size} with {info.channels} channel(s), the model's "
            f"{image_size}x{image_size} with {model_config.in_channels}"
        )
    config = TrainConfig(
        dataset=dataset, data_dir=data_dir, **geometry,
        schedule=settings.schedule, num_steps=settings.num_steps, beta_start=settings.beta_start, beta_end=settings.beta_end,
        base_channels=model_config.base_channels, channel_mults=model_config.channel_mults,
        num_res_blocks=model_config.num_res_blocks, attention_levels=model_config.attention_levels,
        dropout=model_config.dropout, conditional=model_config.num_classes is not None,
        preview_steps=min(TrainConfig.preview_steps, settings.num_steps),
    )
    model = UNet.from_config(model_config)
    states = []
    for weights, directory in ((found.weights, found.unet_dir), (found.ema_weights, folder / "unet_ema")):
        if weights is not None:
            source_file = str(directory / WEIGHTS_FILE)
            converted = weights_from_diffusers(weights, model.state_dict(), source=source_file)
            load_weights(model, {key: value.to(torch.float32) for key, value in converted.items()}, source=source_file)
            states.append({key: value.detach().clone() for key, value in model.state_dict().items()})
    checkpoint = step_checkpoint_path(out, 0)
    position = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val_loss": None, "skipped_steps": 0}
    write_atomically(out / "config.json", lambda temporary: temporary.write_text(config.to_json()), what="run config")
    # One set of weights is both raw and EMA (two copies: safetensors stores no shared tensors).
    ema = states[1] if len(states) > 1 else {key: value.clone() for key, value in states[0].items()}
    save_checkpoint(
        checkpoint, model=states[0], ema=ema, optimizer=None, rng_states={}, config=config.to_dict(),
        state={**position, "model_config": asdict(model_config), "image_size": image_size},
    )
    record = {
        "source": str(source), "folder": str(folder.resolve()), "ddpmkit_version": __version__,
        "unet_config": found.unet_config, "scheduler_config": found.scheduler_config,
        "ema": "unet_ema/" if found.ema_weights is not None else "the imported weights (the source has one set)",
        "sampling": {"variance": settings.variance, "clip_denoised": settings.clip_denoised},
    }
    write_atomically(out / RECORD_FILE, lambda temporary: temporary.write_text(json.dumps(record, indent=2) + "\n"), what="import record")
    return ImportedRun(
        run_dir=out, checkpoint=checkpoint, variance=settings.variance, clip_denoised=settings.clip_denoised,
        scheduler_found=found.scheduler_config is not None, separate_ema=found.ema_weights is not None,
    )


def export_diffusers(
    run: str | Path, out: str | Path, *, ema: bool = True, variance: VarianceName = "beta", clip_denoised: bool = True
) -> Path:
    """Write a run's UNet (EMA weights, or raw with ema=False) and schedule as a folder that
    ``diffusers.DDPMPipeline.from_pretrained(out)`` loads; its DDPMScheduler samples as
    ddpmkit's ancestral sampler with ``variance`` and ``clip_denoised``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty folder; choose another --out")
    checkpoint = load_checkpoint(resolve_checkpoint(run))
    config, model_config, image_size = model_description(checkpoint)
    unet_config = diffusers_unet_config(model_config, image_size)
    scheduler_config = diffusers_scheduler_config(config, variance=variance, clip_denoised=clip_denoised)
    weights = weights_to_diffusers(checkpoint.ema if ema else checkpoint.model)
    model_index = {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    for path, values in ((out / MODEL_INDEX_FILE, model_index), (out / "unet" / CONFIG_FILE, unet_config),
                         (out / "scheduler" / SCHEDULER_FILE, scheduler_config)):
        write_atomically(path, lambda temporary, values=values: temporary.write_text(json.dumps(values, indent=2) + "\n"), what="config")
    write_atomically(out / "unet" / WEIGHTS_FILE, lambda temporary: save_file(weights, str(temporary), metadata={"format": "pt"}), what="weights")
    return out
