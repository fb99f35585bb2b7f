"""Training objectives: what the network is fitted to, and the terms of the likelihood bound.

Algorithm 1 of Ho et al. 2020 (DDPM) draws, per training image x0, a step index t uniform
over the schedule's indices (0-based, index i is step t = i + 1; schedules.py) and noise
eps ~ N(0, I), noises x0 to x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4,
``NoiseSchedule.q_sample``), and takes a gradient step on ``ddpm_loss``, the simplified
objective L_simple (eq. 14). ``draw_timesteps_and_noise`` is that draw, shared by the
diffusion model's training and validation and by the noisy classifier's training.

Beyond Algorithm 1, ``ddpm_loss`` fits any of three targets (``prediction_target``: eps,
x0 or v, Salimans & Ho 2022), weights the squared error over t (``min_snr_weight``, Hang
et al. 2023), and with a learned variance adds Improved DDPM's L_vlb term (the hybrid
loss, Nichol & Dhariwal 2021 section 3.1). The bound's terms (``prior_kl``, ``vlb_term``,
made of ``normal_kl`` and ``discretized_gaussian_log_likelihood``) are those of Ho et al.
eq. 5; the NLL evaluation (likelihood.py) sums them over every t. They are in nats per
dimension; bits are nats / ln 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from .choices import LOSS_WEIGHTINGS, PREDICTION_NAMES, LossWeighting, PredictionName
from .errors import ConfigError
from .schedules import NoiseSchedule, _gather
from .validation import check_choice

# lambda of L_hybrid = L_simple + lambda L_vlb (Improved DDPM, section 3.1).
HYBRID_VLB_WEIGHT = 0.001
# Half the width of one of the 256 levels of 8-bit data scaled to [-1, 1].
_HALF_BIN = 1.0 / 255.0


def draw_timesteps_and_noise(
    schedule: NoiseSchedule, shape: tuple[int, ...], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """t ~ Uniform{0 .. T-1} (int64, one per row of ``shape``) and eps ~ N(0, I) of ``shape``
    (float32), drawn in that order from ``generator`` (Algorithm 1, lines 3-4)."""
    timesteps = torch.randint(0, schedule.num_steps, (shape[0],), generator=generator)
    noise = torch.randn(shape, generator=generator)
    return timesteps, noise


def prediction_target(
    schedule: NoiseSchedule, prediction: PredictionName, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """What a network of target ``prediction`` is fitted to at x_t = q_sample(x0, t, noise):
    the noise eps (Ho et al.), x0 itself, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0
    (``NoiseSchedule.velocity``)."""
    check_choice("prediction", prediction, PREDICTION_NAMES)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return schedule.velocity(x0, t, noise)


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, prediction: PredictionName, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): per index t, the weight of the squared error on
    ``prediction``'s target, min(SNR, gamma) / SNR (eps), min(SNR, gamma) (x0) or
    min(SNR, gamma) / (SNR + 1) (v), SNR = abar_t / (1 - abar_t). Float32, shape of t."""
    check_choice("prediction", prediction, PREDICTION_NAMES)
    if not gamma > 0:
        raise ConfigError(f"min_snr_gamma must be > 0, got {gamma}")
    # Why these: at a fixed x_t, an error d in the predicted x0 is an error
    # -sqrt(abar/(1 - abar)) d in eps and -d / sqrt(1 - abar) in v, so the three squared
    # errors are SNR |d|^2, |d|^2 and (SNR + 1) |d|^2. Min-SNR weights the x0 error by
    # min(SNR, gamma); dividing by each target's factor gives its weight.
    snr = schedule.signal_to_noise
    capped = snr.clamp(max=gamma)
    weights = {"eps": capped / snr, "x0": capped, "v": capped / (snr + 1.0)}[prediction]
    return weights.to(t.device)[t].float()


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats:
    (log_var2 - log_var1 + e^(log_var1 - log_var2) + (mean1 - mean2)^2 e^-log_var2 - 1) / 2."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """log P(x) per element (nats, float64) of 8-bit data x in [-1, 1] under N(mean, e^log_variance)
    discretized as Ho et al. eq. 13: the normal's mass on x's bin [x - 1/255, x + 1/255], the
    bins of -1 and 1 extended to -inf and +inf.

    The mass log(Phi(b) - Phi(a)) is taken where it does not cancel: for a > 0 as
    log(Phi(-a) - Phi(-b)), then log Phi(b) + log(1 - Phi(a) / Phi(b)) with log_ndtr, so
    that a bin far in a tail keeps its (tiny) mass. (improved-diffusion approximates Phi
    with tanh and clamps the mass at 1e-12; this is the exact normal CDF.)
    """
    x, mean, log_variance = x.double(), mean.double(), log_variance.double()
    inverse_std = torch.exp(-0.5 * log_variance)
    infinity = torch.full_like(x, math.inf)
    lower = torch.where(x < -1.0 + _HALF_BIN, -infinity, (x - _HALF_BIN - mean) * inverse_std)
    upper = torch.where(x > 1.0 - _HALF_BIN, infinity, (x + _HALF_BIN - mean) * inverse_std)
    reflect = lower > 0
    lower, upper = torch.where(reflect, -upper, lower), torch.where(reflect, -lower, upper)
    log_upper = torch.special.log_ndtr(upper)
    # The clamp keeps exp from underflowing into subnormals (a slow path of exp and log1p on
    # CPUs); exp(-700) = 1e-304 changes the logarithm by 1e-304 at most.
    return log_upper + torch.log1p(-torch.exp((torch.special.log_ndtr(lower) - log_upper).clamp(min=-700.0)))


def prior_kl(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T of Ho et al. eq. 5 per element (nats): KL(q(x_T | x0) || N(0, I)), with
    q(x_T | x0) = N(sqrt(abar_T) x0, 1 - abar_T) (eq. 4)."""
    last = torch.full((x0.shape[0],), schedule.num_steps - 1, dtype=torch.int64, device=x0.device)
    mean = _gather(schedule.alpha_bars.sqrt(), last, x0) * x0
    log_variance = _gather((1.0 - schedule.alpha_bars).log(), last, x0)
    return normal_kl(mean, log_variance, torch.zeros_like(x0), torch.zeros_like(x0))


def vlb_term(
    schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, log_variance: torch.Tensor
) -> torch.Tensor:
    """L_{t-1} of Ho et al. eq. 5 per element (nats), for p_theta(x_{t-1} | x_t) = N(mu, e^log_variance)
    whose mean mu is q(x_{t-1} | x_t, x0)'s at the x0 that ``eps`` predicts (eqs. 6-7, as
    the samplers'): KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)) at t > 1 (index > 0),
    and the discretized decoder's -log p_theta(x0 | x_1) at t = 1 (index 0, eq. 13).
    The true posterior's log variance is clipped as improved-diffusion's (it enters at t > 1 only)."""
    mean, _ = schedule.q_posterior(schedule.predict_x0_from_eps(x_t, t, eps), x_t, t)
    first = (t == 0).reshape(t.shape + (1,) * (x0.dim() - 1))
    if bool(first.all()):  # each part only where it is needed: the NLL evaluates one t at a time
        return -discretized_gaussian_log_likelihood(x0, mean, log_variance)
    true_mean, _ = schedule.q_posterior(x0, x_t, t)
    kl = normal_kl(true_mean, _gather(schedule.clipped_log_posterior_variances, t, x_t), mean, log_variance).double()
    if not bool(first.any()):
        return kl
    return torch.where(first, -discretized_gaussian_log_likelihood(x0, mean, log_variance), kl)


def split_model_output(output: torch.Tensor, channels: int, learned_variance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, variance values) of a network's output for ``channels``-channel images: the
    first ``channels`` channels predict the target; a network that learns its variance has
    ``channels`` more, the values of eq. 15 (``interpolate_log_variance``); else None."""
    expected = 2 * channels if learned_variance else channels
    if output.shape[1] != expected:
        raise ConfigError(
            f"the model outputs {output.shape[1]} channel(s) for {channels}-channel images; expected {expected} "
            f"({2 * channels} for a model that learns its variance, variance 'learned'; {channels} for any other)"
        )
    if not learned_variance:
        return output, None
    prediction, values = output.split(channels, dim=1)
    return prediction, values


def ddpm_loss(
    model: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    reduction: Literal["mean", "sum"] = "mean",
    prediction: PredictionName = "eps",
    learn_variance: bool = False,
    loss_weighting: LossWeighting = "none",
    min_snr_gamma: float = 5.0,
) -> torch.Tensor:
    """L_simple (Ho et al. eq. 14): || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2,
    on the target of ``prediction`` (``prediction_target``), each row's squared error weighted
    by ``min_snr_weight`` with ``loss_weighting="min-snr"``.

    With ``learn_variance`` the model outputs twice the image's channels (``split_model_output``)
    and the loss is L_hybrid = L_simple + lambda L_vlb (Improved DDPM section 3.1, lambda =
    HYBRID_VLB_WEIGHT): L_vlb is the bound's sum over t, estimated at the drawn t as T L_{t-1}
    (``vlb_term``, in bits per dimension as improved-diffusion's), with the gradient stopped
    on the predicted mean, so that L_vlb trains the variance only.

    ``model(x_t, t)``, or ``model(x_t, t, labels)`` for a conditional model, makes the
    prediction; the error is taken in float32 (the prediction may be bf16 under autocast)
    and averaged over every element, or summed with ``reduction="sum"`` (training splits a
    batch into slices whose sums add up to the batch's).
    """
    check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
    x_t = schedule.q_sample(x0, t, noise)
    output = model(x_t, t) if labels is None else model(x_t, t, labels)
    predicted, variance_values = split_model_output(output, x0.shape[1], learn_variance)
    target = prediction_target(schedule, prediction, x0, t, noise)
    if loss_weighting == "none" and variance_values is None:
        return F.mse_loss(predicted.float(), target, reduction=reduction)
    squared_errors = (predicted.float() - target) ** 2
    if loss_weighting == "min-snr":
        squared_errors = squared_errors * min_snr_weight(schedule, t, prediction, min_snr_gamma).reshape(-1, *[1] * (x0.dim() - 1))
    if variance_values is not None:
        frozen_eps = schedule.predict_eps(prediction, x_t, t, predicted.detach().float())
        log_variance = schedule.learned_log_variance(variance_values.float(), t)
        vlb_bits = vlb_term(schedule, x0, x_t, t, frozen_eps, log_variance) / math.log(2.0)
        squared_errors = squared_errors + (HYBRID_VLB_WEIGHT * schedule.num_steps * vlb_bits).float()
    return squared_errors.mean() if reduction == "mean" else squared_errors.sum()
