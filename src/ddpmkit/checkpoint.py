"""Checkpoints: one safetensors file per checkpoint, written atomically, loaded without pickle.

A checkpoint file holds every tensor of a training run (``model.*``, ``ema.*``,
``optim.<param>.<name>``, ``rng.<device>``) and, as safetensors string metadata, the resolved
config, the training position (step, epoch, batch within the epoch, best validation loss)
and the package version. safetensors never unpickles, so a crafted file cannot run code.

Layout of a run directory::

    RUN/config.json              resolved TrainConfig
    RUN/metrics.jsonl            one JSON object per line
    RUN/checkpoints/step-000001000.safetensors   the last ``keep_checkpoints``
    RUN/checkpoints/best.safetensors             lowest validation loss so far
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .batch_threads import BatchThreads, resolve_cpu_workers
from .config import TrainConfig, config_from_dict
from .errors import CheckpointError
from .io import load_weights, write_atomically
from .schedules import NoiseSchedule, schedule_before_scaling
from .unet import UNet, UNetConfig

FORMAT = "ddpmkit-checkpoint-1"
_STEP_FILE = re.compile(r"^step-(\d{9})\.safetensors$")
# Temporaries of write_atomically (".NAME.tmp-PID") and of safetensors' own save (".tmpXXXXXX").
_TEMPORARY_FILE = re.compile(r"^\..+\.tmp-\d+$|^\.tmp\w+$")


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    rng_states: dict[str, torch.Tensor]  # torch's global generator states: "cpu", "cuda"
    config: dict[str, Any]
    state: dict[str, Any]  # step, epoch, batch_in_epoch, best_ema_val_loss, schedule, ...
    version: str
    path: Path


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:09d}.safetensors"


def best_checkpoint_path(run_dir: str | Path) -> Path:
    return checkpoint_dir(run_dir) / "best.safetensors"


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The step checkpoints of a run, oldest first."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _STEP_FILE.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = step_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path, *, which: str = "latest") -> Path:
    """A checkpoint file given itself or its run directory ("latest" or "best" in it)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} is neither a checkpoint file nor a run directory")
    found = best_checkpoint_path(path) if which == "best" else latest_checkpoint(path)
    if found is None or not found.is_file():
        raise CheckpointError(f"run directory {path} holds no checkpoint yet (looked in {checkpoint_dir(path)})")
    return found


def save_checkpoint(
    path: str | Path,
    *,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict[str, Any] | None,
    rng_states: dict[str, torch.Tensor],
    config: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write a checkpoint atomically: temporary file, fsync, rename, fsync of the folder.

    A crash at any moment leaves either the old file or the complete new one.
    """
    tensors = {f"model.{k}": v for k, v in model.items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    metadata = {
        "format": FORMAT,
        "ddpmkit_version": __version__,
        "config": json.dumps(config),
        "state": json.dumps(state),
    }
    if optimizer is not None:
        optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer)
        tensors.update(optimizer_tensors)
        metadata["optimizer"] = json.dumps(optimizer_meta)
    tensors.update({f"rng.{k}": v for k, v in rng_states.items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata), what="checkpoint")


def copy_checkpoint(source: str | Path, destination: str | Path) -> Path:
    """Copy a checkpoint file with the same atomicity as save_checkpoint."""
    return write_atomically(destination, lambda temporary: shutil.copyfile(source, temporary), what="checkpoint")


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as handle:
            metadata = _read_metadata(handle)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or damaged, not a readable ddpmkit checkpoint ({exc}){_intact_hint(path)}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a ddpmkit checkpoint (format {metadata.get('format')!r})")
    try:
        config = json.loads(metadata["config"])
        state = json.loads(metadata["state"])
        optimizer_meta = json.loads(metadata["optimizer"]) if "optimizer" in metadata else None
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has damaged metadata ({exc})") from None
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}, "rng": {}}
    for key, value in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix in groups:
            groups[prefix][rest] = value
    optimizer = _unflatten_optimizer(groups["optim"], optimizer_meta) if optimizer_meta else None
    return Checkpoint(
        model=groups["model"],
        ema=groups["ema"],
        optimizer=optimizer,
        rng_states=groups["rng"],
        config=config,
        state=state,
        version=metadata.get("ddpmkit_version", "unknown"),
        path=path,
    )


def _intact_hint(damaged: Path) -> str:
    """For a damaged step checkpoint of a run: which older one of the run is intact, to fall back on."""
    if not _STEP_FILE.match(damaged.name):
        return ""
    for older in reversed([p for p in step_checkpoints(damaged.parent.parent) if p.name < damaged.name]):
        try:
            load_file(str(older))
        except (SafetensorError, OSError, ValueError):
            continue
        return f"; the newest intact checkpoint of the run is {older}: delete {damaged.name} to use that one"
    return "; the run has no older intact checkpoint"


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    for old in step_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)


def remove_torn_writes(run_dir: str | Path) -> None:
    """Delete the temporary files that a process killed while writing left in a run directory.

    Only for a run about to be continued: its one training process is the only writer.
    """
    for directory in (Path(run_dir), checkpoint_dir(run_dir)):
        if directory.is_dir():
            for path in directory.iterdir():
                if _TEMPORARY_FILE.match(path.name):
                    with contextlib.suppress(OSError):  # best effort: a read-only folder is reported by the next write
                        path.unlink()


# --- helpers ---------------------------------------------------------------------------

def _read_metadata(handle: Any) -> dict[str, str]:
    # safetensors' header: 8-byte little-endian length, then a JSON object whose
    # "__metadata__" entry holds the string metadata (load_file does not return it).
    length = int.from_bytes(handle.read(8), "little")
    header = json.loads(handle.read(length))
    return header.get("__metadata__", {})


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a torch optimizer state_dict into tensors and JSON (no pickle needed)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{param_id}.{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        param_id, _, name = key.partition(".")
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoint_schedule(checkpoint: Checkpoint, config: TrainConfig) -> NoiseSchedule:
    """The noise schedule the checkpoint's model was trained with: the schedule its config
    names whose betas hash its state records (``NoiseSchedule.identity``), as ddpmkit builds
    it now or built it before the linear schedule was scaled by 1000 / T (a run resumed
    from then keeps its schedule); for a checkpoint from before that record, the latter."""
    schedule = config.noise_schedule()
    if config.beta_start is not None:  # explicit endpoints (an imported model): never scaled
        return schedule
    record = checkpoint.state.get("schedule")
    before_scaling = schedule_before_scaling(config.schedule, config.num_steps)
    if record is None or before_scaling.identity()["betas_sha256"] == record.get("betas_sha256"):
        return before_scaling
    if schedule.identity()["betas_sha256"] == record.get("betas_sha256"):
        return schedule
    raise CheckpointError(
        f"{checkpoint.path} was trained with a {config.schedule} schedule of T = {config.num_steps} whose betas "
        f"(SHA-256 {str(record.get('betas_sha256'))[:12]}) this ddpmkit does not build"
    )


def load_run_schedule(path: str | Path) -> tuple[TrainConfig, NoiseSchedule]:
    """The config and noise schedule of a run's latest checkpoint (or of a checkpoint file),
    without building its model: what ``ddpm train-classifier --noisy --for RUN`` trains for."""
    checkpoint = load_checkpoint(resolve_checkpoint(path))
    config = config_from_dict(checkpoint.config, source=str(checkpoint.path))
    return config, checkpoint_schedule(checkpoint, config)


@dataclass
class TrainedModel:
    """A model loaded for sampling or evaluation, with what is needed to describe it."""

    model: torch.nn.Module
    schedule: NoiseSchedule
    config: TrainConfig
    image_shape: tuple[int, int, int]
    path: Path
    step: int
    ema: bool


def model_description(checkpoint: Checkpoint) -> tuple[TrainConfig, UNetConfig, int]:
    """The run config, the UNet's config and the image size stored in a checkpoint."""
    try:
        config = config_from_dict(checkpoint.config, source=str(checkpoint.path))
        model_config = UNetConfig(**checkpoint.state["model_config"])
        image_size = int(checkpoint.state["image_size"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{checkpoint.path} lacks its model description ({exc})") from None
    return config, model_config, image_size


def load_trained_model(
    path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu", compile: bool = False, cpu_workers: int = 0
) -> TrainedModel:
    """The UNet of a checkpoint (file, or a run directory's latest), in eval mode.

    ``ema`` picks the EMA weights (what one samples from) or the raw trained weights.
    ``cpu_workers`` splits each batch over that many CPU threads, one core each
    (batch_threads.py; 0: one per core on a CPU without compile, else off).
    ``compile`` wraps the model in ``torch.compile`` (inductor) instead: the first call
    with each batch size compiles for minutes. Whether either pays on a machine is
    measured in benchmarks/README.md.
    """
    checkpoint = load_checkpoint(resolve_checkpoint(path))
    config, model_config, image_size = model_description(checkpoint)
    schedule = checkpoint_schedule(checkpoint, config)
    model = UNet.from_config(model_config)
    load_weights(model, checkpoint.ema if ema else checkpoint.model, source=f"{checkpoint.path} ({'EMA' if ema else 'raw'} weights)")
    model.to(device).eval().requires_grad_(False)
    workers = resolve_cpu_workers(cpu_workers, on_cpu=torch.device(device).type == "cpu", compile=compile)
    return TrainedModel(
        model=torch.compile(model) if compile else BatchThreads(model, workers) if workers > 1 else model,
        schedule=schedule,
        config=config,
        image_shape=(model_config.in_channels, image_size, image_size),
        path=checkpoint.path,
        step=int(checkpoint.state["step"]),
        ema=ema,
    )
