"""The likelihood of images under a model: the variational bound of Ho et al. eq. 5, in bits per dimension.

For 8-bit images x0 scaled to [-1, 1], with D values each, the negative log-likelihood is
bounded by

    L = L_T + sum_{t=2..T} L_{t-1} + L_0,

with L_T = KL(q(x_T | x0) || N(0, I)) (the prior, ``objectives.prior_kl``),
L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)) at x_t ~ q(x_t | x0) and
L_0 = -log p_theta(x0 | x_1), the discretized decoder of eq. 13 (both ``objectives.vlb_term``).
Bits per dimension are nats / (D ln 2). Every one of the T steps is evaluated, not a
Monte-Carlo subset of them; the expectation over x_t is one draw per image and step (as
Ho et al.'s and improved-diffusion's ``calc_bpd_loop``). Everything but the model's own
forward pass (float32) is float64.

The reverse variance (``variance``): "beta" (sigma_t^2 = beta_t at every t, as the
ancestral sampler's), "posterior" (beta-tilde_t; at t = 1, where beta-tilde_1 = 0, the
clipped beta-tilde_2, as improved-diffusion) or "learned" (the model's, Improved DDPM
eq. 15). The mean is q(x_{t-1} | x_t, x0)'s at the predicted x0, unclipped: the bound of the
model as it was trained (improved-diffusion clips x0 there by default).

``nll`` is the Python function; ``model_nll`` is what ``ddpm nll`` and the ablation compute
for a trained model over a split, batched, with a progress bar, and resumable: finished
batches are kept in a work folder, as fid.model_fid does.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import TrainedModel
from .choices import PREDICTION_NAMES, VARIANCE_NAMES, PredictionName, Split, VarianceName
from .config import model_output_options
from .data import load_dataset
from .errors import ConfigError
from .fid import open_batch_store, write_batch
from .guidance import make_denoiser
from .images import to_model_range
from .objectives import prior_kl, vlb_term
from .rng import LikelihoodStream, seeded_generator
from .schedules import NoiseSchedule, _gather
from .validation import check_choice


@dataclass(frozen=True)
class Likelihood:
    """The bound over a set of images, in bits per dimension: ``bits_per_dim = prior +
    sum(terms) + decoder``; ``terms[k]`` is L_{t-1} at step t = k + 2 (t = 2 .. T), the
    decoder L_0 is step 1's. ``standard_error`` is that of bits_per_dim's mean over images."""

    bits_per_dim: float
    standard_error: float
    prior: float
    decoder: float
    terms: tuple[float, ...]
    num_images: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "terms": list(self.terms), "term_steps": list(range(2, len(self.terms) + 2))}


@torch.inference_mode()
def bound_terms(
    model: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    images: torch.Tensor,
    *,
    variance: VarianceName,
    prediction: PredictionName,
    generator: torch.Generator | None,
    on_step: Callable[[], Any] | None = None,
) -> torch.Tensor:
    """(B, T + 1) float64 on the CPU: column i is L_i of eq. 5 for each image, in bits per
    dimension: L_0 the decoder, L_1 .. L_{T-1} the KL terms (column i at step t = i + 1),
    L_T the prior. The noise of x_t, float32 of the images' shape, is drawn from
    ``generator`` at steps t = 1, 2, ..., T in that order; ``on_step()`` after each step."""
    check_choice("variance", variance, VARIANCE_NAMES)
    check_choice("prediction", prediction, PREDICTION_NAMES)
    denoiser = make_denoiser(model, schedule=schedule, prediction=prediction, learned_variance=variance == "learned")
    x0 = images.double()
    count, steps = x0.shape[0], schedule.num_steps
    to_bits = 1.0 / (x0[0].numel() * math.log(2.0))
    terms = torch.empty(count, steps + 1, dtype=torch.float64)
    for index in range(steps):
        t = torch.full((count,), index, dtype=torch.int64, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, torch.float64)
        x_t = schedule.q_sample(x0, t, noise)
        eps, variance_values = denoiser(x_t.float(), t)
        log_variance = _reverse_log_variance(schedule, variance, t, x_t, variance_values)
        term = vlb_term(schedule, x0, x_t, t, eps.double(), log_variance)
        terms[:, index] = (term.flatten(1).sum(1) * to_bits).cpu()
        if on_step is not None:
            on_step()
    terms[:, steps] = (prior_kl(schedule, x0).flatten(1).sum(1) * to_bits).cpu()
    return terms


def _reverse_log_variance(
    schedule: NoiseSchedule, variance: VarianceName, t: torch.Tensor, like: torch.Tensor, variance_values: torch.Tensor | None
) -> torch.Tensor:
    """log sigma_t^2 of p_theta(x_{t-1} | x_t) for ``variance`` (module docstring), float64."""
    if variance == "learned":
        return schedule.learned_log_variance(variance_values.double(), t)
    log_variances = schedule.betas.log() if variance == "beta" else schedule.clipped_log_posterior_variances
    return _gather(log_variances, t, like)


def summarize(per_image: torch.Tensor) -> Likelihood:
    """The Likelihood of bound_terms' rows (N, T + 1): the mean of each term over images."""
    means = per_image.mean(dim=0).tolist()
    totals = per_image.sum(dim=1)
    standard_error = float(totals.std() / math.sqrt(len(totals))) if len(totals) > 1 else math.nan
    decoder, terms, prior = means[0], tuple(means[1:-1]), means[-1]
    return Likelihood(
        bits_per_dim=prior + math.fsum(terms) + decoder, standard_error=standard_error, prior=prior, decoder=decoder,
        terms=terms, num_images=len(totals),
    )


def check_8bit_images(images: torch.Tensor) -> None:
    """Refuse anything but a float (N, C, H, W) batch of 8-bit images scaled to [-1, 1]:
    the decoder's bins are the 256 levels (images.to_model_range)."""
    if not (isinstance(images, torch.Tensor) and images.is_floating_point() and images.dim() == 4 and len(images)):
        described = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"nll takes a float (N, C, H, W) batch of 8-bit images scaled to [-1, 1], got {described}")
    levels = (images.double() + 1.0) * 127.5
    if not bool(((levels - levels.round()).abs() < 1e-3).all() and levels.min() >= -1e-3 and levels.max() <= 255 + 1e-3):
        raise ConfigError("nll takes 8-bit images scaled to [-1, 1] (uint8 / 127.5 - 1, images.to_model_range); "
                          "these are not on the 256 levels")


def nll(
    model: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    images: torch.Tensor,
    *,
    variance: VarianceName = "beta",
    prediction: PredictionName = "eps",
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Likelihood:
    """The negative log-likelihood bound of ``images`` (8-bit, scaled to [-1, 1], on the
    model's device) under ``model`` in bits per dimension, Ho et al. eq. 5 with all T terms.

    ``model(x_t, t)`` predicts ``prediction`` (eps, x0 or v); ``variance`` is the reverse
    variance: "beta" or "posterior" for a model with fixed variances, "learned" for one that
    learns it (its output then has twice the image's channels). ``batch_size`` images per
    model call (default: all at once); the noise comes from ``generator``, batch after batch.
    """
    check_8bit_images(images)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    rows = [
        bound_terms(model, schedule, batch, variance=variance, prediction=prediction, generator=generator)
        for batch in images.split(batch_size or len(images))
    ]
    return summarize(torch.cat(rows))


def evaluation_subset(size: int, num: int | None) -> torch.Tensor:
    """Indices of the images of a split that are evaluated: all of them (num None or >= size),
    else ``num`` of them, the same for every model and seed (a fixed seeded draw), in order."""
    if num is None or num >= size:
        return torch.arange(size)
    if num < 1:
        raise ConfigError(f"the number of NLL images must be >= 1, got {num}")
    return torch.randperm(size, generator=seeded_generator(0, LikelihoodStream.SUBSET))[:num].sort().values


def model_nll(
    trained: TrainedModel,
    *,
    split: Split = "test",
    num: int | None = None,
    batch_size: int = 100,
    seed: int = 0,
    variance: VarianceName | None = None,
    device: str | torch.device = "cpu",
    work_dir: str | Path | None = None,
    progress: bool = False,
    description: str = "NLL",
) -> dict[str, Any]:
    """What ``ddpm nll`` computes: the bound of a trained model over its dataset's ``split``
    (``num`` images of it, evaluation_subset; default all), in batches of ``batch_size``.

    Batch k's noise comes from seeded_generator(seed, LikelihoodStream.NOISE, k), so a run
    with a ``work_dir`` resumes at its first unfinished batch with the same result.
    ``variance`` None is the model's own (config.model_output_options). Returns the
    Likelihood's fields, the settings, and "wall_seconds", the time this call took.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    config = trained.config
    output = model_output_options(config, variance)
    dataset = load_dataset(config.dataset, split, data_dir=config.data_dir, image_size=config.image_size, channels=config.channels, seed=config.seed)
    chosen = evaluation_subset(len(dataset), num)
    images = to_model_range(dataset.images[chosen])
    settings = {
        "checkpoint": str(trained.path.resolve()), "step": trained.step, "weights": "EMA" if trained.ema else "raw",
        "dataset": dataset.info.name, "split": split, "images": len(chosen), "split_images": len(dataset),
        "seed": seed, "batch_size": batch_size, "num_steps": trained.schedule.num_steps, **output,
    }
    fingerprint = json.loads(json.dumps(settings))
    store = Path(work_dir) / "bound-terms" if work_dir is not None else None
    finished = open_batch_store(store, fingerprint, what="NLL terms") if store is not None else []
    batches = images.split(batch_size)
    steps = trained.schedule.num_steps
    with tqdm(total=len(batches) * steps, initial=len(finished) * steps, unit="step", desc=description, disable=not progress) as bar:
        for k in range(len(finished), len(batches)):
            terms = bound_terms(
                trained.model, trained.schedule, batches[k].to(device), **output,
                generator=seeded_generator(seed, LikelihoodStream.NOISE, k), on_step=lambda: bar.update(1),
            ).numpy()
            if store is not None:
                write_batch(store, k, terms)
            finished.append(terms)
    result = summarize(torch.from_numpy(np.concatenate(finished)))
    return {**result.to_dict(), "settings": settings, "device": str(device), "wall_seconds": round(time.perf_counter() - started, 1)}
