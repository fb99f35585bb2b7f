"""Training: Algorithm 1 of Ho et al. 2020 on Accelerate, resumable and process-count independent.

Each optimizer step draws, for the *global* batch, the data indices, timesteps, noise
and label-dropout mask from generators seeded by (seed, epoch) and (seed, step); each
process takes its slice. The result therefore does not depend on how many processes
share the batch (up to float reduction order), and resuming from a checkpoint at step
k continues with exactly the draws an uninterrupted run would have made.

Only the main process writes files and shows a progress bar; the other processes wait
at barriers. The learning rate is never rescaled with the number of processes.

``train`` reads as its outline: ``_set_up`` (checks, data, model, resume), then per epoch
``_train_epoch`` (the optimizer steps, ``_optimizer_step``, with logging and step
checkpoints) and ``_end_epoch`` (validation, previews, FID, the epoch's checkpoint), then
the final checkpoint and ``_finish``. ``TrainingPosition`` is where the run stands, and
what a checkpoint stores of it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .batch_threads import BatchThreads, backward_in_slices, resolve_cpu_workers
from .checkpoint import (
    best_checkpoint_path,
    checkpoint_schedule,
    copy_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_torn_writes,
    save_checkpoint,
    step_checkpoint_path,
)
from .classifier import find_classifier
from .config import TrainConfig, config_from_dict, differences_from_defaults, model_output_options
from .data import DatasetInfo, ImageDataset, dataset_info, load_dataset
from .errors import CheckpointError, ConfigError, DdpmError, TrainingError
from .fid import FeatureExtractor, classifier_extractor, minibatch_fid, small_sample_warnings
from .images import image_grid, save_image_grid, to_model_range
from .io import load_weights, say, write_text
from .objectives import ddpm_loss, draw_timesteps_and_noise
from .rng import TrainingStream, seeded_generator
from .samplers import sample
from .schedules import NoiseSchedule
from .unet import NO_LABEL, UNet, UNetConfig
from .validation import resolve_device

# Changing only these keys is allowed when resuming a run; everything else would make
# the resumed run a different experiment.
RESUMABLE_KEYS = frozenset(
    {"epochs", "max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "device", "preview_images", "fid_batches",
     "tensorboard", "compile", "cpu_workers"}
)
_PRECISION_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class TrainingPosition:
    """Where a run stands; a checkpoint's ``state`` stores these fields (and the model description)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # batches of the current epoch done
    best_ema_val_loss: float | None = None  # best.safetensors: the lowest validation loss of the EMA weights
    skipped_steps: int = 0  # steps fp16 loss scaling skipped (overflow)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TrainingPosition:
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


@dataclass
class TrainSummary:
    run_dir: Path
    step: int
    epoch: int
    interrupted: bool
    last_checkpoint: Path | None
    val_loss: float | None
    train_loss: float | None = None  # of the last metrics line
    fid: float | None = None  # the last per-epoch FID
    seconds: float = 0.0  # wall time of this session
    stop_signal: int | None = None  # the signal that stopped an interrupted run
    main_process: bool = True  # False on the other processes of a multi-process run


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
        out_channels=2 * channels if config.learn_variance else None,  # the prediction, then the variance values
    )


def objective_options(config: TrainConfig) -> dict[str, Any]:
    """The keywords of objectives.ddpm_loss that ``config`` chooses: its training objective."""
    return {
        "prediction": config.prediction, "learn_variance": config.learn_variance,
        "loss_weighting": config.loss_weighting, "min_snr_gamma": config.min_snr_gamma,
    }


def warmup_learning_rate(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate of optimizer step ``step`` (1, 2, ...): lr step / warmup_steps during a
    linear warm-up (Ho et al.'s CIFAR-10 run: 5000 steps), lr from step warmup_steps on, and
    throughout with warmup_steps = 0. A function of the step alone, so a resumed run gets
    the same learning rates."""
    return lr * min(1.0, step / warmup_steps) if warmup_steps else lr


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
    run = _set_up(config, Path(run_dir), resume, progress)
    with run.stop.installed(), _tensorboard_writer(config, run.run_dir, run.main, run.position.step) as tensorboard:
        while run.position.step < run.total_steps and not run.stop.requested:
            _train_epoch(run, tensorboard)
            if not run.stop.requested and run.position.batch_in_epoch == run.batches_per_epoch:
                _end_epoch(run, tensorboard)
        if run.position.step and run.last_checkpoint != step_checkpoint_path(run.run_dir, run.position.step):
            run.write_checkpoint(step_checkpoint_path(run.run_dir, run.position.step))
    return _finish(run)


@dataclass(eq=False)
class _Run:
    """One training session: what _set_up builds and the loop advances."""

    config: TrainConfig
    run_dir: Path
    accelerator: Any
    info: DatasetInfo
    model_config: UNetConfig
    schedule: NoiseSchedule
    model: torch.nn.Module  # prepared by Accelerate
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_set: ImageDataset
    val_set: ImageDataset
    micro_batch: int
    workers: int
    batches_per_epoch: int
    total_steps: int
    fid_extractor: FeatureExtractor | None
    position: TrainingPosition
    last_checkpoint: Path | None
    bar: Any
    stop: _StopFlag = field(default_factory=lambda: _StopFlag())
    val_loss: float | None = None
    val_step: int = 0  # the step val_loss was measured at
    train_loss: float | None = None
    fid: float | None = None
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        device = self.accelerator.device
        self.train_images = self.train_set.images.to(device)
        self.train_labels = self.train_set.labels.to(device)
        # The evaluation passes (validation, preview grids, per-epoch FID) on the worker threads.
        self.model_for_evaluation = BatchThreads(self.model, self.workers)
        self.ema_for_evaluation = BatchThreads(self.ema, self.workers).eval()
        self.window = _LossWindow(device)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def write_checkpoint(self, path: Path) -> None:
        """A checkpoint of everything a resume needs, written by the main process; all wait."""
        if self.main:
            save_checkpoint(
                path,
                model=self.accelerator.unwrap_model(self.model, keep_torch_compile=False).state_dict(),
                ema=self.ema.state_dict(),
                optimizer=self.optimizer.state_dict(),
                rng_states=_rng_states(),
                config=self.config.to_dict(),
                state={
                    **asdict(self.position), "model_config": asdict(self.model_config), "image_size": self.info.image_size,
                    "schedule": self.schedule.identity(), **_grad_scaler_state(self.accelerator),
                },
            )
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = path


def _set_up(config: TrainConfig, run_dir: Path, resume: bool, progress: bool) -> _Run:
    """Check everything that can be checked, then build the Accelerator, data, model, EMA
    and optimizer, restore them on resume, and write the run's config."""
    from accelerate import Accelerator  # heavy import, only where training happens
    from accelerate.state import AcceleratorState

    check_run_dir(run_dir, resume)
    info = dataset_info(config.dataset, data_dir=config.data_dir, image_size=config.image_size, channels=config.channels)
    model_config = model_config_for(config, info.channels, info.num_classes)
    UNet.check_input_size(model_config, info.image_size, info.channels)
    if config.random_flip and not info.flip_invariant:
        print(f"ddpmkit: warning: random_flip on {info.name}: a flipped image of it is not one of its images "
              "(a mirrored digit is no digit); Ho et al. flip CIFAR-10", file=sys.stderr)
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'ddpmkit[tensorboard]'")
    on_cpu = resolve_device(config.device) == "cpu"
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
    checkpoint = load_checkpoint(latest_checkpoint(run_dir)) if resume else None
    # A resumed run keeps its own schedule, also one from before a schedule change (checkpoint_schedule).
    schedule = checkpoint_schedule(checkpoint, config) if resume else config.noise_schedule()
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
    # tensor (benchmarks/README.md), the same weights up to rounding. CPU (torch >= 2.4) and CUDA.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    position = TrainingPosition()
    if checkpoint is not None:
        if checkpoint.optimizer is None:
            raise CheckpointError(f"{checkpoint.path} holds no optimizer state (an imported model): there is no training to resume")
        load_weights(model, checkpoint.model, source=str(checkpoint.path))
        load_weights(ema, checkpoint.ema, source=f"{checkpoint.path} (EMA)")
        optimizer.load_state_dict(checkpoint.optimizer)
        _give_moments_their_parameters_layout(optimizer)
        torch.set_rng_state(checkpoint.rng_states["cpu"])
        if "cuda" in checkpoint.rng_states and torch.cuda.is_available():
            torch.cuda.set_rng_state(checkpoint.rng_states["cuda"])
        position = TrainingPosition.from_state(checkpoint.state)
        _restore_grad_scaler(accelerator, checkpoint.state)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)

    total_steps = config.epochs * batches_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    if total_steps < position.step:
        raise ConfigError(
            f"{run_dir} is at step {position.step}, past the {total_steps} steps that epochs {config.epochs}"
            + (f" and max_steps {config.max_steps}" if config.max_steps is not None else "")
            + " allow: nothing to train; resume with a larger --max-steps or --epochs"
        )
    if main:
        remove_torn_writes(run_dir)
        write_text(run_dir / "config.json", config.to_json(), what="run config")
        _truncate_metrics(run_dir / "metrics.jsonl", position.step)
        if resume:
            say(f"resuming {run_dir} from step {position.step} (epoch {position.epoch + 1}) to step {total_steps}")
        else:
            say(f"training {run_dir} for {total_steps} steps ({batches_per_epoch} per epoch)")
        changed = ", ".join(f"{key}={value if isinstance(value, str) else json.dumps(value)}"
                            for key, value in differences_from_defaults(config).items())
        say(f"settings other than the defaults: {changed or 'none'} (all of them: {run_dir / 'config.json'})")
        say(
            f"{len(train_set)} train / {len(val_set)} val images, {world} process(es) x "
            f"{micro_batch} images x {config.grad_accum} accumulation = global batch {config.batch_size}; "
            f"lr {config.lr} (not rescaled); {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
            f"device {accelerator.device}"
            + (f" ({workers} worker threads, one core each)" if workers > 1 else "")
            + f", precision {config.precision}"
        )
    bar = tqdm(total=total_steps, initial=position.step, disable=not (main and progress), unit="step", dynamic_ncols=True)
    return _Run(
        config=config, run_dir=run_dir, accelerator=accelerator, info=info, model_config=model_config, schedule=schedule,
        model=model, ema=ema, optimizer=optimizer, train_set=train_set, val_set=val_set, micro_batch=micro_batch,
        workers=workers, batches_per_epoch=batches_per_epoch, total_steps=total_steps, fid_extractor=fid_extractor,
        position=position, last_checkpoint=latest_checkpoint(run_dir) if resume else None, bar=bar,
    )


def _train_epoch(run: _Run, tensorboard: Any) -> None:
    """The optimizer steps of the current epoch, from where the run stands, until the epoch
    ends, the run reaches its last step, or a stop is asked for; logs and step checkpoints."""
    config, position = run.config, run.position
    order = torch.randperm(len(run.train_set), generator=seeded_generator(config.seed, TrainingStream.EPOCH_ORDER, position.epoch))
    while position.batch_in_epoch < run.batches_per_epoch and position.step < run.total_steps:
        step = position.step + 1
        first = position.batch_in_epoch * config.batch_size
        batch_indices = order[first : first + config.batch_size].to(run.accelerator.device)
        loss = _optimizer_step(
            run.accelerator, run.model, run.optimizer, run.schedule, config, step, batch_indices,
            run.train_images, run.train_labels, run.micro_batch, run.workers,
        )
        if loss is None:  # fp16 loss scaling skipped this step (overflow)
            position.skipped_steps += 1
        else:
            _update_ema(run.ema, run.accelerator.unwrap_model(run.model, keep_torch_compile=False), config.ema_decay, step)
            run.window.add(loss)
        position.step, position.batch_in_epoch = step, position.batch_in_epoch + 1
        run.window.images += config.batch_size
        run.bar.update(1)
        if step % config.log_every == 0 or step == run.total_steps:
            mean_loss, speed = run.window.flush(run.accelerator)
            run.train_loss = mean_loss
            run.bar.set_postfix(epoch=position.epoch + 1, loss=f"{mean_loss:.4f}", img_s=f"{speed:.0f}")
            lr = run.optimizer.param_groups[0]["lr"]  # the step's, as the optimizer used it (warm-up)
            record = {"step": step, "epoch": position.epoch, "train_loss": mean_loss, "lr": lr, "images_per_s": speed}
            _log(run.main, run.run_dir, record, tensorboard)
        if run.stop.check(run.accelerator):
            return
        if step % config.checkpoint_every == 0:
            run.write_checkpoint(step_checkpoint_path(run.run_dir, step))
            if run.main:
                prune_checkpoints(run.run_dir, config.keep_checkpoints)


def _end_epoch(run: _Run, tensorboard: Any) -> None:
    """Validation loss, the preview grid and the per-epoch FID (main process), one metrics
    line, and the epoch's checkpoint (copied to best.safetensors when the loss is the lowest)."""
    config, position, device = run.config, run.position, run.accelerator.device
    epoch = position.epoch
    run.bar.set_description_str(f"epoch {epoch + 1}: validation loss")
    run.val_loss, run.val_step = validation_loss(run.accelerator, run.model_for_evaluation, run.schedule, run.val_set, config), position.step
    # The EMA weights are what sampling uses by default, so they choose best.safetensors.
    ema_val_loss = validation_loss(run.accelerator, run.ema_for_evaluation, run.schedule, run.val_set, config)
    position.epoch, position.batch_in_epoch = epoch + 1, 0
    record: dict[str, Any] = {"step": position.step, "epoch": epoch, "val_loss": run.val_loss, "val_loss_ema": ema_val_loss}
    if run.main and (config.preview_images or run.fid_extractor is not None):
        record["preview_labels"] = _preview_labels_note(config, run.info)
    for labelled in _preview_kinds(config):
        suffix = "" if labelled or not config.conditional else "_unconditional"
        if run.main and config.preview_images:
            run.bar.set_description_str(f"epoch {epoch + 1}: {config.preview_images} preview samples")
            grid = run.run_dir / "samples" / f"epoch-{epoch:03d}{suffix.replace('_', '-')}.png"
            preview = _preview_samples(run.ema_for_evaluation, run.schedule, config, run.info, device, labelled=labelled)
            with _writing(grid):
                save_image_grid(preview, grid)
            record["samples" + suffix] = str(grid.relative_to(run.run_dir))
            if tensorboard is not None:
                tensorboard.add_image("samples" + suffix, image_grid(preview), position.step, dataformats="HWC")
        # Sampled on the main process only; the others wait at write_checkpoint's barrier.
        if run.main and run.fid_extractor is not None:
            run.bar.set_description_str(f"epoch {epoch + 1}: FID")
            record["fid" + suffix] = _epoch_fid(
                run.ema_for_evaluation, run.schedule, run.val_set, run.fid_extractor, config, device, labelled=labelled
            )
    run.fid = record.get("fid")
    _log(run.main, run.run_dir, record, tensorboard)
    run.bar.set_description_str(f"epoch {epoch + 1}: checkpoint")
    is_best = position.best_ema_val_loss is None or ema_val_loss < position.best_ema_val_loss
    if is_best:
        position.best_ema_val_loss = ema_val_loss
    run.write_checkpoint(step_checkpoint_path(run.run_dir, position.step))
    if run.main:
        prune_checkpoints(run.run_dir, config.keep_checkpoints)
        if is_best:
            copy_checkpoint(run.last_checkpoint, best_checkpoint_path(run.run_dir))
        say(f"epoch {epoch + 1}: step {position.step}, validation loss {run.val_loss:.4f}"
            + (f", FID {record['fid']:.2f}" if "fid" in record else "")
            + (f", preview {run.run_dir / record['samples']}" if "samples" in record else ""))
    run.bar.set_description_str("")
    run.accelerator.wait_for_everyone()


def _finish(run: _Run) -> TrainSummary:
    run.bar.close()
    seconds = time.perf_counter() - run.started
    if run.main:
        if run.stop.requested:
            say(f"stopped at step {run.position.step} ({run.stop.signal_name}); checkpoint {run.last_checkpoint}")
        else:
            at = f" (step {run.val_step})" if run.val_step != run.position.step else ""
            scores = ([f"train loss {run.train_loss:.4f}"] if run.train_loss is not None else []) + (
                [f"validation loss {run.val_loss:.4f}" + (f", FID {run.fid:.2f}" if run.fid is not None else "") + at]
                if run.val_loss is not None else [])
            say(f"finished at step {run.position.step} in {_duration(seconds)}" + (f": {', '.join(scores)}" if scores else "")
                + f"; checkpoint {run.last_checkpoint}")
    run.accelerator.end_training()
    return TrainSummary(
        run.run_dir, run.position.step, run.position.epoch, run.stop.requested, run.last_checkpoint, run.val_loss,
        train_loss=run.train_loss, fid=run.fid, seconds=seconds, stop_signal=run.stop.signal_number, main_process=run.main,
    )


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class _LossWindow:
    """The training loss and image count since the last metrics line."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.steps = self.images = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def flush(self, accelerator: Any) -> tuple[float, float]:
        """(mean loss over processes and steps, images per second) of the window; starts a new one."""
        mean_loss = accelerator.reduce(self.loss, "mean").item() / max(1, self.steps)
        speed = self.images / (time.perf_counter() - self.started)
        self.loss.zero_()
        self.steps = self.images = 0
        self.started = time.perf_counter()
        return mean_loss, speed


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
    generator = seeded_generator(config.seed, TrainingStream.STEP, step)
    global_batch = batch_indices.numel()
    timesteps, noise = draw_timesteps_and_noise(schedule, (global_batch, *images.shape[1:]), generator)
    drop_label = torch.rand(global_batch, generator=generator) < config.label_dropout
    # From a stream of its own, so that a run without flips draws exactly what it did before they existed.
    flip = torch.rand(global_batch, generator=seeded_generator(config.seed, TrainingStream.FLIP, step)) < 0.5 if config.random_flip else None
    device = accelerator.device
    total = torch.zeros((), device=device)
    for micro in range(config.grad_accum):
        # Slice order (micro step, then process) makes every process see a disjoint part.
        start = (micro * accelerator.num_processes + accelerator.process_index) * micro_batch
        part = slice(start, start + micro_batch)
        x0 = to_model_range(images[batch_indices[part]])
        if flip is not None:
            x0 = torch.where(flip[part].to(device).reshape(-1, 1, 1, 1), x0.flip(-1), x0)
        t = timesteps[part].to(device)
        eps = noise[part].to(device)
        y = None
        if config.conditional:
            y = labels[batch_indices[part]].clone()
            y[drop_label[part].to(device)] = NO_LABEL
        # The objective over the micro batch, as a sum over rows so that the worker
        # threads' slices (batch_threads.py) add up to it; / grad_accum averages the micro
        # batches.
        scale = 1.0 / (eps.numel() * config.grad_accum)

        def slice_loss(rows: slice) -> torch.Tensor:  # called within this iteration only
            labels_of_rows = None if y is None else y[rows]
            return ddpm_loss(
                _autocast(accelerator, model), schedule, x0[rows], t[rows], eps[rows], labels_of_rows, reduction="sum",
                **objective_options(config),
            ) * scale

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
    if config.warmup_steps:
        for group in optimizer.param_groups:
            group["lr"] = warmup_learning_rate(config.lr, config.warmup_steps, step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.optimizer_step_was_skipped or not finite:
        return None
    return total


def _autocast(accelerator: Any, model: torch.nn.Module) -> Any:
    """``model`` called under the run's mixed precision (autocast covers the network only)."""
    def predict(*args: torch.Tensor) -> torch.Tensor:
        with accelerator.autocast():
            return model(*args)

    return predict


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
    """The training objective (ddpm_loss with the config's objective_options; the noise-prediction
    MSE by default) on the validation split, averaged per element, with fixed (seeded) t and noise.

    The same draws every epoch make the curve comparable across epochs; the split is
    shared out across processes and the sums reduced.
    """
    generator = seeded_generator(config.seed, TrainingStream.VALIDATION)
    count = len(dataset)
    timesteps, noise = draw_timesteps_and_noise(schedule, (count, *dataset.images.shape[1:]), generator)
    device = accelerator.device
    was_training = model.training  # the EMA copy stays in eval mode
    model.eval()
    total = torch.zeros((), device=device)
    for start in range(accelerator.process_index * config.batch_size, count, accelerator.num_processes * config.batch_size):
        part = slice(start, start + config.batch_size)
        x0 = to_model_range(dataset.images[part].to(device))
        t, eps = timesteps[part].to(device), noise[part].to(device)
        y = dataset.labels[part].to(device) if config.conditional else None
        total += ddpm_loss(_autocast(accelerator, model), schedule, x0, t, eps, y, reduction="sum", **objective_options(config))
    model.train(was_training)
    total = accelerator.reduce(total, "sum")
    return float(total) / (count * math.prod(dataset.images.shape[1:]))


def _preview_kinds(config: TrainConfig) -> tuple[bool, ...]:
    """Whether each per-epoch grid and FID is sampled with labels: an unconditional model's
    without; a conditional model's with labels spread over the classes, and also without
    (its "no label" embedding) where label dropout trained that embedding."""
    if not config.conditional:
        return (False,)
    return (True, False) if config.label_dropout > 0 else (True,)


def _preview_labels_note(config: TrainConfig, info: DatasetInfo) -> str:
    """What metrics.jsonl says of the labels of "samples" and "fid" (and their "_unconditional" twins)."""
    if not config.conditional:
        return "none (unconditional model)"
    note = f"spread over the {info.num_classes} classes"
    return note + ("; *_unconditional: the 'no label' embedding" if config.label_dropout > 0 else "")


def _preview_samples(
    ema: torch.nn.Module, schedule: NoiseSchedule, config: TrainConfig, info: DatasetInfo, device: torch.device, *, labelled: bool
) -> torch.Tensor:
    """The per-epoch sample grid, with the cheap preview sampler (logged in the config); with
    ``labelled``, the grid's images in blocks of one class each, class 0 first."""
    count = config.preview_images
    labels = torch.arange(count) * info.num_classes // count if labelled else None
    return sample(
        ema, schedule, (count, info.channels, info.image_size, info.image_size), sampler=config.preview_sampler,
        steps=config.preview_steps, labels=labels, generator=seeded_generator(config.seed, TrainingStream.PREVIEW), device=device,
        **model_output_options(config),
    )


def _fid_extractor(config: TrainConfig, info: DatasetInfo, device: torch.device, main: bool) -> FeatureExtractor | None:
    """The classifier features of the per-epoch FID; None (off) when fid_batches is 0, or
    when no classifier of the dataset is cached, which one notice then says."""
    if not config.fid_batches:
        return None
    try:
        path = find_classifier(config.dataset)
    except DdpmError as missing:
        if main:
            say(f"per-epoch FID off: {missing}")
        return None
    extractor = classifier_extractor(path, device=device)
    # One blank image through it now, so that a classifier made for another image size
    # or channel count fails before training, not at the end of the first epoch.
    feature_dim = extractor(torch.zeros((1, info.channels, info.image_size, info.image_size), dtype=torch.uint8)).shape[1]
    if main:
        for warning in small_sample_warnings({"per-epoch FID": config.fid_batches * config.batch_size}, feature_dim):
            say(f"warning: {warning} (it is still comparable from epoch to epoch)")
    return extractor


def _epoch_fid(
    ema: torch.nn.Module, schedule: NoiseSchedule, val_set: ImageDataset, extractor: FeatureExtractor, config: TrainConfig,
    device: torch.device, *, labelled: bool,
) -> float:
    """The poster's per-epoch FID: fid_batches global batches of EMA samples (the cheap
    preview sampler, as the grid) against as many validation images (minibatch_fid); with
    ``labelled``, each sample has the label of its reference image."""
    return minibatch_fid(
        ema, schedule, val_set, extractor, num_images=config.fid_batches * config.batch_size, batch_size=config.batch_size,
        seed=seeded_generator(config.seed, TrainingStream.FID).initial_seed(), labelled=labelled,
        sampler=config.preview_sampler, steps=config.preview_steps, device=device, **model_output_options(config),
    )


def _tensorboard_writer(config: TrainConfig, run_dir: Path, main: bool, step: int) -> Any:
    """A SummaryWriter into RUN_DIR/tensorboard on the main process with --tensorboard, else
    a context yielding None. On resume, events after the checkpoint's step are purged (they
    will be redone), as _truncate_metrics does for metrics.jsonl."""
    if not (main and config.tensorboard):
        return nullcontext()
    from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=step or None)


def _grad_scaler_state(accelerator: Any) -> dict[str, Any]:
    """{"grad_scaler": the fp16 loss scaler's state (scale, growth tracker, factors)}, or {}
    where there is none (fp32, bf16), so that a resumed fp16 run continues at the scale it
    had reached instead of at the initial 65536, as an uninterrupted run would."""
    return {"grad_scaler": accelerator.scaler.state_dict()} if accelerator.scaler is not None else {}


def _restore_grad_scaler(accelerator: Any, state: dict[str, Any]) -> None:
    """Load _grad_scaler_state's record into the run's scaler (none in a checkpoint from
    before it was recorded: the scaler starts afresh, as it did then)."""
    if accelerator.scaler is not None and "grad_scaler" in state:
        accelerator.scaler.load_state_dict(state["grad_scaler"])


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
    write_text(path, "".join(line + "\n" for line in kept), what="metrics")


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A full disk or read-only run directory while writing path: one CheckpointError line."""
    try:
        yield
    except OSError as exc:
        raise CheckpointError(f"could not write {path}: {exc.strerror or exc}") from None


class _StopFlag:
    """SIGINT/SIGTERM ask for a clean stop: finish the step, checkpoint, return a summary
    that names the signal (the CLI then exits 128 + its number)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self.signal_number: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        self.signal_number = signum

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
            if self.requested and self.signal_number is None:  # a termination request, as far as this process knows
                self.signal_name, self.signal_number = "signal on another process", int(signal.SIGTERM)
        return self.requested
