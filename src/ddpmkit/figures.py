"""Figures, written as PNG: training curves, and the poster's strips of the forward and
reverse processes (matplotlib). Plain image grids are images.py's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, DdpmError
from .images import image_grid, png_text, to_model_range
from .rng import seeded_generator
from .samplers import sample
from .schedules import NoiseSchedule


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss (train and validation) and, when logged, FID against steps, from metrics.jsonl."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise DdpmError(f"{run_dir} has no metrics.jsonl: is it a ddpmkit run directory?")
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    series = {
        key: [(r["step"], r[key]) for r in records if r.get(key) is not None]
        for key in ("train_loss", "val_loss", "val_loss_ema", "fid", "fid_unconditional")
    }
    panels = [("loss (the training objective; MSE on the noise by default)", ["train_loss", "val_loss", "val_loss_ema"])]
    if series["fid"]:
        panels.append(("FID (validation minibatches)", ["fid", "fid_unconditional"]))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for axis, (title, keys) in zip(axes[0], panels):
        for key in keys:
            if series[key]:
                steps, values = zip(*series[key])
                # The train loss is a dense line; a single point of it needs a marker to be seen at all.
                marker = "o" if key != "train_loss" or len(steps) == 1 else None
                axis.plot(steps, values, marker=marker, label=key.replace("_", " "))
        axis.set_xlabel("optimizer step")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    if series["train_loss"]:
        axes[0][0].set_yscale("log")
    figure.suptitle(run_dir.resolve().name)
    return _save_figure(figure, Path(out) if out else run_dir / "curves.png")


# --- the forward and reverse processes (the poster's strips) --------------------------------

def evenly_spaced(count: int, num: int) -> list[int]:
    """``num`` distinct indices from 0 to count - 1, both ends included, evenly spaced
    (rounded); all of them when count <= num."""
    if count < 1 or num < 1:
        raise ConfigError(f"need at least one index to choose from and one to choose, got {count} and {num}")
    if num >= count:
        return list(range(count))
    if num == 1:
        return [count - 1]
    return [round(k * (count - 1) / (num - 1)) for k in range(num)]


def across_classes(labels: torch.Tensor, num: int) -> list[int]:
    """``num`` indices into ``labels``: the first image of each class, then the second of
    each, and so on, so that every class is shown before any is shown twice."""
    classes = torch.unique(labels).tolist()
    members = [torch.nonzero(labels == label).flatten().tolist() for label in classes]
    order = [group[rank] for rank in range(max(map(len, members))) for group in members if rank < len(group)]
    return order[:num]


def forward_process_frames(
    x0: torch.Tensor, schedule: NoiseSchedule, indices: Sequence[int], *, seed: int = 0
) -> torch.Tensor:
    """x_t ~ q(x_t | x0) (eq. 4) of images x0 (N, C, H, W) in [-1, 1] at each step index: (N, F, C, H, W).

    One noise draw per image serves all of its frames, so that a strip shows one noise
    pattern taking over the image rather than a new pattern at every t; each frame on
    its own is still an exact draw of eq. 4.
    """
    noise = torch.randn(x0.shape, generator=seeded_generator(seed), dtype=torch.float32).to(x0)
    frames = [schedule.q_sample(x0, torch.full((len(x0),), index, dtype=torch.int64), noise) for index in indices]
    return torch.stack(frames, dim=1)


def forward_process_figure(
    images: torch.Tensor, schedules: Sequence[NoiseSchedule], out_dir: str | Path, *, num_frames: int = 10, seed: int = 0
) -> list[Path]:
    """The forward process of uint8 ``images`` (N, C, H, W) under each schedule.

    Writes ``forward-<schedule>.png`` per schedule (a row per image, a column per t, evenly
    spaced from t = 1 to T; the same noise under every schedule, so that the strips differ
    by the schedule alone) and ``alpha-bars.png`` (abar_t of all schedules on one plot).
    """
    out_dir = Path(out_dir)
    x0 = to_model_range(images)
    paths = []
    for schedule in schedules:
        indices = evenly_spaced(schedule.num_steps, num_frames)
        frames = forward_process_frames(x0, schedule, indices, seed=seed)
        paths.append(save_strips(
            frames, [f"t={index + 1}" for index in indices], [""] * len(x0),
            f"forward process q(x_t | x_0), {schedule.name} schedule", out_dir / f"forward-{schedule.name}.png",
        ))
    paths.append(alpha_bar_figure(schedules, out_dir / "alpha-bars.png"))
    return paths


def alpha_bar_figure(schedules: Sequence[NoiseSchedule], path: str | Path) -> Path:
    """abar_t against t/T for each schedule on one plot (as figure 5 of Nichol & Dhariwal 2021)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for schedule in schedules:
        steps = np.arange(1, schedule.num_steps + 1)
        axis.plot(steps / schedule.num_steps, schedule.alpha_bars.numpy(), label=f"{schedule.name} (T = {schedule.num_steps})")
    axis.set_xlabel("diffusion step t / T")
    axis.set_ylabel(r"$\bar\alpha_t$")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save_figure(figure, path)


def reverse_process_frames(
    model: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    image_shape: tuple[int, ...],
    *,
    num_images: int,
    num_frames: int,
    seed: int,
    **sample_kwargs: Any,
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """x_t and the predicted x0 at ``num_frames`` of the sampler's steps, from its callback.

    The frames are evenly spaced over the steps ``sample`` visits, the first (x_T, pure
    noise) and the last (whose predicted x0 is the sample returned) included; they come
    from one ordinary ``sample`` call with ``sample_kwargs`` (``labels`` for a conditional
    model among them). Returns the frames' step indices and x_t, x0 as (N, F, C, H, W) on the CPU.
    """
    visits = sample_kwargs.get("steps") or schedule.num_steps  # sample's default: every step
    kept = set(evenly_spaced(visits, num_frames))
    indices, states, predictions = [], [], []

    def record(step: dict[str, Any]) -> None:
        if step["i"] in kept:
            indices.append(step["t"])
            states.append(step["x_t"].float().cpu())
            predictions.append(step["x0_pred"].float().cpu())

    sample(model, schedule, (num_images, *image_shape), generator=seeded_generator(seed), callback=record, **sample_kwargs)
    return indices, torch.stack(states, dim=1), torch.stack(predictions, dim=1)


def reverse_process_figure(
    model: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    image_shape: tuple[int, ...],
    path: str | Path,
    *,
    num_images: int = 4,
    num_frames: int = 10,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    **sample_kwargs: Any,
) -> Path:
    """The denoising trajectory of ``num_images`` samples: per sample a row of x_t and,
    below it, a row of the predicted x0, at the frames of reverse_process_frames, then a
    last column "x_0": the finished sample (the x0 the last step predicts, which the sampler
    returns). ``labels`` in sample_kwargs name each row's class; ``settings`` go into the
    PNG's text chunk."""
    indices, states, predictions = reverse_process_frames(
        model, schedule, image_shape, num_images=num_images, num_frames=num_frames, seed=seed, **sample_kwargs
    )
    finished = predictions[:, -1:]
    rows = torch.stack([torch.cat([states, finished], 1), torch.cat([predictions, finished], 1)], dim=1).flatten(0, 1)
    labels = sample_kwargs.get("labels")
    names = [f"x_t, class {int(label)}" for label in labels] if labels is not None else ["x_t"] * num_images
    sampler = sample_kwargs.get("sampler", "ddpm")
    title = f"reverse process\n{sampler}, {sample_kwargs.get('steps') or schedule.num_steps} steps, {schedule.name} schedule"
    columns = [f"t={index + 1}" for index in indices] + ["x_0 (sample)"]
    return save_strips(rows, columns, [row for name in names for row in (name, "predicted x0")], title, path, settings=settings)


def save_strips(
    frames: torch.Tensor, column_labels: list[str], row_labels: list[str], title: str, path: str | Path,
    *, settings: dict[str, Any] | None = None,
) -> Path:
    """Frames (R, F, C, H, W) in [-1, 1] as one labelled grid: R rows of F images;
    ``settings`` into the PNG's text chunk."""
    rows, count, channels, height, width = frames.shape
    padding = 2
    grid = image_grid(frames.flatten(0, 1), nrow=count, padding=padding)
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * count), 0.8 + 0.9 * rows))
    axis.imshow(grid[..., 0] if channels == 1 else grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axis.set_xticks([padding + k * (width + padding) + width / 2 for k in range(count)], column_labels, fontsize=8)
    axis.set_yticks([padding + r * (height + padding) + height / 2 for r in range(rows)], row_labels, fontsize=8)
    axis.tick_params(length=0)
    for spine in axis.spines.values():
        spine.set_visible(False)
    axis.set_title(title, fontsize=9)
    return _save_figure(figure, path, settings)


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure: Any, path: str | Path, settings: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120, metadata=png_text(settings) if settings is not None else None)
    _pyplot().close(figure)
    return path


# --- the likelihood bound ---------------------------------------------------------------------

def plot_bound_terms(result: Mapping[str, Any], path: str | Path) -> Path:
    """The bits per dimension each step contributes to the NLL bound (likelihood.model_nll's
    result), as Improved DDPM's Figure 2: the decoder L_0 at t = 1, L_{t-1} at t = 2 .. T, on a
    log scale; the prior L_T and the total in the title."""
    plt = _pyplot()
    steps = [1, *result["term_steps"]]
    values = [result["decoder"], *result["terms"]]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(steps, values)
    axis.set_yscale("log")
    axis.set_xlabel("diffusion step t")
    axis.set_ylabel("bits/dim of the step's term")
    axis.grid(alpha=0.3)
    axis.set_title(f"NLL bound {result['bits_per_dim']:.4f} bits/dim (prior {result['prior']:.2g}, "
                   f"decoder {result['decoder']:.3f}), {result['num_images']} images", fontsize=9)
    return _save_figure(figure, path)
