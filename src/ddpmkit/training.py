"""Training: Algorithm 1 of Ho et al. 2020 on Accelerate, resumable and process-count independent.

Each optimizer step draws, for the *global* batch, the data indices, timesteps, noise
and label-dropout mask from generators seeded by (seed, epoch) and (seed, step); each
process takes its slice. The result therefore does not depend on how many processes
share the batch (up to float reduction order), and resuming from a checkpoint at step
k continues with exactly the draws an uninterrupted run would have made.

Only the main process writes files and shows a progress bar; the other processes wait
at barriers. The learning rate is never rescaled with the number of processes.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .batch_threads import BatchThreads, backward_in_slices, resolve_cpu_workers
from .checkpoint import (
    best_checkpoint_path,
    copy_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    prune_checkpoints,
    remove_torn_writes,
    save_checkpoint,
    step_checkpoint_path,
    write_atomically,
)
from .classifier import find_classifier
from .config import TrainConfig, config_from_dict
from .data import DatasetInfo, ImageDataset, dataset_info, load_dataset, to_model_range
from .errors import CheckpointError, ConfigError, DdpmError, TrainingError
from .evaluation import FeatureExtractor, classifier_extractor, minibatch_fid
from .figures import image_grid, save_image_grid
from .samplers import sample, seeded_generator
from .schedules import NoiseSchedule
from .unet import UNet, UNetConfig

# Changing only these keys is allowed when resuming a run; everything else would make
# the resumed run a different experiment.
RESUMABLE_KEYS = frozenset(
    {"epochs", "max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "device", "sample_every_epoch", "fid_batches",
     "tensorboard", "compile", "cpu_workers"}
)
_PRECISION_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# Distinct streams for the seeded generators (an arbitrary fixed tag per purpose).
_STREAM_EPOCH_ORDER, _STREAM_STEP, _STREAM_VALIDATION, _STREAM_PREVIEW, _STREAM_FID = 1, 2, 3, 4, 5


@dataclass
class TrainSummary:
    run_dir: Path
    step: int
    epoch: int
    interrupted: bool
    last_checkpoint: Path | None
    val_loss: float | None


def model_config_for(config: TrainConfig, channels: int, num_classes: int) -> UNetConfig:
    """The UNet's constructor arguments implied by a training config and its dataset."""
    return UNetConfig(
        in_channels=channels,
        base_channels=config.base_channels,
        channel_mults=config.channel_mults,
        num_res_blocks=config.num_res_blocks,
        attention_levels=config.attention_levels,
        num_classes=num_classes if config.conditional else None,
        dropout=config.dropout,
    )


def resolve_resume_config(run_dir: Path, changes: dict[str, Any]) -> TrainConfig:
    """The stored config of run_dir with the allowed changes applied."""
    stored = read_run_config(run_dir)
    forbidden = sorted(k for k, v in changes.items() if k not in RESUMABLE_KEYS and getattr(stored, k, v) != v)
    if forbidden:
        raise ConfigError(
            f"cannot change {', '.join(forbidden)} when resuming {run_dir}; "
            f"only {', '.join(sorted(RESUMABLE_KEYS))} may change"
        )
    return stored.replace(**changes)


def read_run_config(run_dir: Path) -> TrainConfig:
    path = Path(run_dir) / "config.json"
    try:
        return config_from_dict(json.loads(path.read_text()), source=str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir} is not a ddpmkit run directory (no config.json)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from None


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to overwrite an existing run, or to resume one that is not there."""
    exists = run_dir.exists() and any(run_dir.iterdir())
    if exists and not resume:
        raise ConfigError(f"{run_dir} already exists and is not empty; pass --resume to continue it, or choose another --out")
    if resume and latest_checkpoint(run_dir) is None:
        raise CheckpointError(f"nothing to resume: {run_dir} has no checkpoint")


def train(config: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> TrainSummary:
    """Train a noise-prediction UNet (Algorithm 1) and write a run directory.

    Everything that can be checked is checked before data is loaded or a model built.
    """
    from accelerate import Accelerator  # heavy import, only where training happens
    from accelerate.state import AcceleratorState

    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume)
    info = dataset_info(config.dataset, data_dir=config.data_dir, image_size=config.image_size, channels=config.channels)
    model_config = model_config_for(config, info.channels, info.num_classes)
    UNet.check_input_size(model_config, info.image_size, info.channels)
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'ddpmkit[tensorboard]'")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
    on_cpu = config.device == "cpu" or not torch.cuda.is_available()
    if on_cpu and config.precision == "fp16":
        # Accelerate has no fp16 loss scaler on CPU and silently trains in fp32 there: an
        # overflow would be neither skipped by a scaler nor stopped, and poison the weights.
        raise ConfigError("--precision fp16 needs a CUDA device (Accelerate has no fp16 loss scaling on CPU); use bf16 or fp32")
    # Accelerate keeps one state per process and refuses a second Accelerator with other
    # settings (a notebook training in fp32, then bf16), or after end_training() destroyed
    # the process group. Every train() call is a run of its own, so start from a clean
    # state; an existing process group is reused (Accelerate only creates one if none is).
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=_PRECISION_TO_ACCELERATE[config.precision],
        dynamo_backend="inductor" if config.compile else "no",
    )
    world = accelerator.num_processes
    if config.batch_size % (world * config.grad_accum):
        raise ConfigError(
            f"batch_size {config.batch_size} is not divisible by processes x grad_accum = {world} x {config.grad_accum}"
        )
    micro_batch = config.batch_size // (world * config.grad_accum)
    workers = resolve_cpu_workers(
        config.cpu_workers, on_cpu=accelerator.device.type == "cpu", processes=world, compile=config.compile, dropout=config.dropout
    )
    main = accelerator.is_main_process
    schedule = config.noise_schedule()
    fid_extractor = _fid_extractor(config, info, accelerator.device, main)

    data_kwargs = dict(data_dir=config.data_dir, image_size=config.image_size, channels=config.channels, seed=config.seed)
    train_set = load_dataset(config.dataset, "train", **data_kwargs)
    val_set = load_dataset(config.dataset, "val", **data_kwargs)
    batches_per_epoch = len(train_set) // config.batch_size
    if batches_per_epoch == 0:
        raise ConfigError(f"the {config.dataset} train split has {len(train_set)} images, fewer than one batch of {config.batch_size}")

    torch.manual_seed(config.seed)  # identical initial weights on every process
    model = UNet.from_config(model_config)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # never trained: always in eval mode
    # Fused: one kernel for the whole update instead of a handful of element-wise passes per
    # tensor; 40.6 -> 16.4 ms per step for the poster's 6.4M parameters on 2 CPU threads
    # (benchmarks/README.md), the same weights up to rounding. CPU (torch >= 2.4) and CUDA.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    position = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val_loss": None, "skipped_steps": 0}
    if resume:
        checkpoint = load_checkpoint(latest_checkpoint(run_dir))
        if checkpoint.optimizer is None:
            raise CheckpointError(f"{checkpoint.path} holds no optimizer state (an imported model): there is no training to resume")
        load_weights(model, checkpoint.model, source=str(checkpoint.path))
        load_weights(ema, checkpoint.ema, source=f"{checkpoint.path} (EMA)")
        optimizer.load_state_dict(checkpoint.optimizer)
        _give_moments_their_parameters_layout(optimizer)
        torch.set_rng_state(checkpoint.rng_states["cpu"])
        if "cuda" in checkpoint.rng_states and torch.cuda.is_available():
            torch.cuda.set_rng_state(checkpoint.rng_states["cuda"])
        position.update({k: checkpoint.state[k] for k in position})
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)
    # The evaluation passes (validation, preview grids, per-epoch FID) on the worker threads.
    model_for_evaluation, ema_for_evaluation = BatchThreads(model, workers), BatchThreads(ema, workers)
    train_images = train_set.images.to(accelerator.device)
    train_labels = train_set.labels.to(accelerator.device)

    if main:
        remove_torn_writes(run_dir)
        write_atomically(run_dir / "config.json", lambda temporary: temporary.write_text(config.to_json()), what="run config")
        _truncate_metrics(run_dir / "metrics.jsonl", position["step"])
        print(f"ddpmkit: training config\n{config.to_json()}")
        print(
            f"ddpmkit: {len(train_set)} train / {len(val_set)} val images, {world} process(es) x "
            f"{micro_batch} images x {config.grad_accum} accumulation = global batch {config.batch_size}; "
            f"lr {config.lr} (not rescaled); {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
            f"device {accelerator.device}"
            + (f" ({workers} worker threads, one core each)" if workers > 1 else "")
            + f", precision {config.precision}"
        )

    def write_checkpoint(path: Path) -> None:
        if main:
            save_checkpoint(
                path,
                model=accelerator.unwrap_model(model, keep_torch_compile=False).state_dict(),
                ema=ema.state_dict(),
                optimizer=optimizer.state_dict(),
                rng_states=_rng_states(),
                config=config.to_dict(),
                state={**position, "model_config": asdict(model_config), "image_size": info.image_size},
            )
        accelerator.wait_for_everyone()

    stop = _StopFlag()
    total_steps = config.epochs * batches_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    bar = tqdm(total=total_steps, initial=position["step"], disable=not (main and progress), unit="step", dynamic_ncols=True)
    window_loss, window_steps, window_images, window_start = torch.zeros((), device=accelerator.device), 0, 0, time.perf_counter()
    last_checkpoint = latest_checkpoint(run_dir) if resume else None
    val_loss = None
    with stop.installed(), _tensorboard_writer(config, run_dir, main, position["step"]) as tensorboard:
        while position["step"] < total_steps and not stop.requested:
            epoch = position["epoch"]
            order = torch.randperm(len(train_set), generator=seeded_generator(config.seed, _STREAM_EPOCH_ORDER, epoch))
            while position["batch_in_epoch"] < batches_per_epoch and position["step"] < total_steps:
                step = position["step"] + 1
                first = position["batch_in_epoch"] * config.batch_size
                batch_indices = order[first : first + config.batch_size]
                loss = _optimizer_step(
                    accelerator, model, optimizer, schedule, config, step, batch_indices.to(accelerator.device),
                    train_images, train_labels, micro_batch, workers,
                )
                if loss is None:  # fp16 loss scaling skipped this step (overflow)
                    position["skipped_steps"] += 1
                else:
                    _update_ema(ema, accelerator.unwrap_model(model, keep_torch_compile=False), config.ema_decay, step)
                    window_loss += loss
                    window_steps += 1
                position.update(step=step, batch_in_epoch=position["batch_in_epoch"] + 1)
                window_images += config.batch_size
                bar.update(1)
                if step % config.log_every == 0 or step == total_steps:
                    mean_loss = accelerator.reduce(window_loss, "mean").item() / max(1, window_steps)
                    speed = window_images / (time.perf_counter() - window_start)
                    bar.set_postfix(epoch=epoch, loss=f"{mean_loss:.4f}", img_s=f"{speed:.0f}")
                    _log(main, run_dir, {"step": step, "epoch": epoch, "train_loss": mean_loss, "lr": config.lr, "images_per_s": speed}, tensorboard)
                    window_loss.zero_()
                    window_steps, window_images, window_start = 0, 0, time.perf_counter()
                if stop.check(accelerator):
                    break
                if step % config.checkpoint_every == 0:
                    last_checkpoint = step_checkpoint_path(run_dir, step)
                    write_checkpoint(last_checkpoint)
                    if main:
                        prune_checkpoints(run_dir, config.keep_checkpoints)
            if stop.requested:
                break
            if position["batch_in_epoch"] == batches_per_epoch:  # an epoch ended
                val_loss = validation_loss(accelerator, model_for_evaluation, schedule, val_set, config)
                position.update(epoch=epoch + 1, batch_in_epoch=0)
                record: dict[str, Any] = {"step": position["step"], "epoch": epoch, "val_loss": val_loss}
                if main and config.sample_every_epoch:
                    grid = run_dir / "samples" / f"epoch-{epoch:03d}.png"
                    preview = _preview_samples(ema_for_evaluation, schedule, config, (info.channels, info.image_size, info.image_size), accelerator.device)
                    with _writing(grid):
                        save_image_grid(preview, grid)
                    record["samples"] = str(grid.relative_to(run_dir))
                    if tensorboard is not None:
                        tensorboard.add_image("samples", image_grid(preview), position["step"], dataformats="HWC")
                # Sampled on the main process only; the others wait at write_checkpoint's barrier.
                if main and fid_extractor is not None:
                    record["fid"] = _epoch_fid(ema_for_evaluation, schedule, val_set, fid_extractor, config, accelerator.device)
                _log(main, run_dir, record, tensorboard)
                is_best = position["best_val_loss"] is None or val_loss < position["best_val_loss"]
                if is_best:
                    position["best_val_loss"] = val_loss
                last_checkpoint = step_checkpoint_path(run_dir, position["step"])
                write_checkpoint(last_checkpoint)
                if main:
                    prune_checkpoints(run_dir, config.keep_checkpoints)
                    if is_best:
                        copy_checkpoint(last_checkpoint, best_checkpoint_path(run_dir))
                accelerator.wait_for_everyone()
        if position["step"] and (last_checkpoint is None or last_checkpoint != step_checkpoint_path(run_dir, position["step"])):
            last_checkpoint = step_checkpoint_path(run_dir, position["step"])
            write_checkpoint(last_checkpoint)
    bar.close()
    if main:
        if stop.requested:
            print(f"ddpmkit: stopped at step {position['step']} ({stop.signal_name}); checkpoint {last_checkpoint}\n"
                  f"ddpmkit: resume with: ddpm train --out {run_dir} --resume")
        else:
            print(f"ddpmkit: finished at step {position['step']}; run directory {run_dir}")
    accelerator.end_training()
    return TrainSummary(run_dir, position["step"], position["epoch"], stop.requested, last_checkpoint, val_loss)


def _optimizer_step(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: NoiseSchedule,
    config: TrainConfig,
    step: int,
    batch_indices: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    micro_batch: int,
    workers: int,
) -> torch.Tensor | None:
    """One optimizer step of Algorithm 1 over this process's share of the global batch.

    Returns the process's mean loss (detached), or None when fp16 loss scaling skipped
    the step. Raises TrainingError on a non-finite gradient otherwise.
    """
    generator = seeded_generator(config.seed, _STREAM_STEP, step)
    global_batch = batch_indices.numel()
    sample_shape = (global_batch,) + tuple(images.shape[1:])
    timesteps = torch.randint(0, schedule.num_steps, (global_batch,), generator=generator)
    noise = torch.randn(sample_shape, generator=generator)
    drop_label = torch.rand(global_batch, generator=generator) < config.label_dropout
    device = accelerator.device
    total = torch.zeros((), device=device)
    for micro in range(config.grad_accum):
        # Slice order (micro step, then process) makes every process see a disjoint part.
        start = (micro * accelerator.num_processes + accelerator.process_index) * micro_batch
        part = slice(start, start + micro_batch)
        x0 = to_model_range(images[batch_indices[part]])
        t = timesteps[part].to(device)
        eps = noise[part].to(device)
        x_t = schedule.q_sample(x0, t, eps)
        label_args = ()
        if config.conditional:
            y = labels[batch_indices[part]].clone()
            y[drop_label[part].to(device)] = -1  # the UNet maps -1 to its "no label" slot
            label_args = (y,)
        # Algorithm 1's MSE over the micro batch, as a sum over rows so that the worker
        # threads' slices (batch_threads.py) add up to it; / grad_accum averages the micro
        # batches.
        scale = 1.0 / (eps.numel() * config.grad_accum)

        def slice_loss(rows: slice) -> torch.Tensor:  # called within this iteration only
            with accelerator.autocast():
                prediction = model(x_t[rows], t[rows], *(y[rows] for y in label_args)).float()
            return F.mse_loss(prediction, eps[rows], reduction="sum") * scale

        if workers > 1:
            total += backward_in_slices(slice_loss, micro_batch, model.parameters(), workers)
        else:
            with nullcontext() if micro == config.grad_accum - 1 else accelerator.no_sync(model):
                loss = slice_loss(slice(None))
                accelerator.backward(loss)
            total += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
    finite = bool(torch.isfinite(grad_norm))
    if not finite and config.precision != "fp16":
        raise TrainingError(
            f"non-finite gradient at step {step} (loss {float(total):.4g}); "
            "stopped without saving this step: the last checkpoint and metrics are intact. "
            "Lower --lr or use --grad-clip"
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.optimizer_step_was_skipped or not finite:
        return None
    return total


def _give_moments_their_parameters_layout(optimizer: torch.optim.Optimizer) -> None:
    """Store each per-parameter state tensor (Adam's moments) in its parameter's memory layout.

    Checkpoints hold tensors contiguous, while the UNet's conv weights are channels_last.
    The fused Adam kernel walks parameter, gradient and moments in storage order, so with
    mismatched layouts it pairs each weight with another weight's moments and silently
    scrambles the update (measured: a resumed tiny run ended 5e-3 away from the
    uninterrupted one; with the layouts restored it is bit-identical).
    """
    for parameter, state in optimizer.state.items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.shape == parameter.shape:
                state[name] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    # Warm-up (as TensorFlow's ExponentialMovingAverage with num_updates): a plain 0.9999
    # average would stay mostly the random initialisation for ~10k steps.
    rate = 1.0 - min(decay, (1.0 + step) / (10.0 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), rate)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


@torch.no_grad()
def validation_loss(accelerator: Any, model: torch.nn.Module, schedule: NoiseSchedule, dataset: ImageDataset, config: TrainConfig) -> float:
    """Mean noise-prediction MSE on the validation split, with fixed (seeded) t and noise.

    The same draws every epoch make the curve comparable across epochs; the split is
    shared out across processes and the sums reduced.
    """
    generator = seeded_generator(config.seed, _STREAM_VALIDATION)
    count = len(dataset)
    timesteps = torch.randint(0, schedule.num_steps, (count,), generator=generator)
    noise = torch.randn((count,) + tuple(dataset.images.shape[1:]), generator=generator)
    device = accelerator.device
    model.eval()
    total = torch.zeros((), device=device)
    for start in range(accelerator.process_index * config.batch_size, count, accelerator.num_processes * config.batch_size):
        part = slice(start, start + config.batch_size)
        x0 = to_model_range(dataset.images[part].to(device))
        t, eps = timesteps[part].to(device), noise[part].to(device)
        label_args = (dataset.labels[part].to(device),) if config.conditional else ()
        with accelerator.autocast():
            prediction = model(schedule.q_sample(x0, t, eps), t, *label_args).float()
        total += F.mse_loss(prediction, eps, reduction="sum")
    model.train()
    total = accelerator.reduce(total, "sum")
    return float(total) / (count * math.prod(dataset.images.shape[1:]))


def _preview_samples(ema: torch.nn.Module, schedule: NoiseSchedule, config: TrainConfig, image_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The per-epoch sample grid, with the cheap preview sampler (logged in the config)."""
    ema.eval()
    images = sample(
        ema, schedule, (config.sample_every_epoch, *image_shape), sampler=config.preview_sampler,
        steps=config.preview_steps, generator=seeded_generator(config.seed, _STREAM_PREVIEW), device=device,
    )
    return images


def _fid_extractor(config: TrainConfig, info: DatasetInfo, device: torch.device, main: bool) -> FeatureExtractor | None:
    """The classifier features of the per-epoch FID; None (off) when fid_batches is 0, or
    when no classifier of the dataset is cached, which one notice then says."""
    if not config.fid_batches:
        return None
    try:
        path = find_classifier(config.dataset)
    except DdpmError as missing:
        if main:
            print(f"ddpmkit: per-epoch FID off: {missing}")
        return None
    extractor = classifier_extractor(path, device=device)
    # One blank image through it now, so that a classifier made for another image size
    # or channel count fails before training, not at the end of the first epoch.
    extractor(torch.zeros((1, info.channels, info.image_size, info.image_size), dtype=torch.uint8))
    return extractor


def _epoch_fid(
    ema: torch.nn.Module, schedule: NoiseSchedule, val_set: ImageDataset, extractor: FeatureExtractor, config: TrainConfig, device: torch.device
) -> float:
    """The poster's per-epoch FID: fid_batches global batches of EMA samples (the cheap
    preview sampler, as the grid) against as many validation images."""
    return minibatch_fid(
        ema, schedule, val_set, extractor, num_images=config.fid_batches * config.batch_size, batch_size=config.batch_size,
        seed=seeded_generator(config.seed, _STREAM_FID).initial_seed(), sampler=config.preview_sampler,
        steps=config.preview_steps, device=device,
    )


def _tensorboard_writer(config: TrainConfig, run_dir: Path, main: bool, step: int) -> Any:
    """A SummaryWriter into RUN_DIR/tensorboard on the main process with --tensorboard, else
    a context yielding None. On resume, events after the checkpoint's step are purged (they
    will be redone), as _truncate_metrics does for metrics.jsonl."""
    if not (main and config.tensorboard):
        return nullcontext()
    from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=step or None)


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _log(main: bool, run_dir: Path, record: dict[str, Any], tensorboard: Any) -> None:
    """Append record to metrics.jsonl, and its numbers to TensorBoard when a writer is given."""
    if main:
        with _writing(run_dir / "metrics.jsonl"), (run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    tensorboard.add_scalar(key, value, record["step"])


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint we resume from (they will be redone),
    and a last line cut short by a process killed while appending it."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise CheckpointError(f"{path} line {number} is not JSON; repair or delete that line") from None
        if record.get("step", 0) <= step:
            kept.append(line)
    write_atomically(path, lambda temporary: temporary.write_text("".join(line + "\n" for line in kept)), what="metrics")


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A full disk or read-only run directory while writing path: one CheckpointError line."""
    try:
        yield
    except OSError as exc:
        raise CheckpointError(f"could not write {path}: {exc.strerror or exc}") from None


class _StopFlag:
    """SIGINT/SIGTERM ask for a clean stop: finish the step, checkpoint, exit 0."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def check(self, accelerator: Any) -> bool:
        """True on every process when any process was signalled (kept in step across ranks)."""
        if accelerator.num_processes > 1:
            flag = torch.tensor(float(self.requested), device=accelerator.device)
            self.requested = bool(accelerator.reduce(flag, "sum") > 0)
            self.signal_name = self.signal_name or "signal on another process"
        return self.requested
