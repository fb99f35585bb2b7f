"""Training objectives: what the network is fitted to.

Algorithm 1 of Ho et al. 2020 (DDPM) draws, per training image x0, a step index t uniform
over the schedule's indices (0-based, index i is step t = i + 1; schedules.py) and noise
eps ~ N(0, I), noises x0 to x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4,
``NoiseSchedule.q_sample``), and takes a gradient step on ``ddpm_loss``, the simplified
objective L_simple (eq. 14). ``draw_timesteps_and_noise`` is that draw, shared by the
diffusion model's training and validation and by the noisy classifier's training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from .schedules import NoiseSchedule


def draw_timesteps_and_noise(
    schedule: NoiseSchedule, shape: tuple[int, ...], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """t ~ Uniform{0 .. T-1} (int64, one per row of ``shape``) and eps ~ N(0, I) of ``shape``
    (float32), drawn in that order from ``generator`` (Algorithm 1, lines 3-4)."""
    timesteps = torch.randint(0, schedule.num_steps, (shape[0],), generator=generator)
    noise = torch.randn(shape, generator=generator)
    return timesteps, noise


def ddpm_loss(
    model: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """L_simple (Ho et al. eq. 14): || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2.

    ``model(x_t, t)``, or ``model(x_t, t, labels)`` for a conditional model, predicts the
    noise; the squared error is taken in float32 (the prediction may be bf16 under
    autocast) and averaged, or summed with ``reduction="sum"`` (training splits a batch
    into slices whose sums add up to the batch's).
    """
    x_t = schedule.q_sample(x0, t, noise)
    prediction = model(x_t, t) if labels is None else model(x_t, t, labels)
    return F.mse_loss(prediction.float(), noise, reduction=reduction)
