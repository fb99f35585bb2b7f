"""The forward (noising) process of DDPM and the closed forms derived from it.

Index convention, used everywhere in ddpmkit (model input, samplers, CLI, files):
    a schedule of ``num_steps = T`` steps holds tensors of length T, and index ``i``
    (0-based) holds the paper's step ``t = i + 1``. So ``betas[0]`` is beta_1 and
    ``alpha_bars[T - 1]`` is abar_T. The model is called with the int64 *index* ``i``.
    abar_0 = 1 (no noise) has no index of its own; ``alpha_bars_prev[0]`` holds it.

Equation numbers refer to Ho et al. 2020 ("Denoising Diffusion Probabilistic Models")
unless another paper is named. Buffers are float64 and are cast to the input's dtype
at use, so that float32/bf16 samplers do not accumulate rounding in the coefficients.
"""

from __future__ import annotations

import hashlib
import math
from functools import cached_property
from dataclasses import dataclass

import torch

from .choices import PREDICTION_NAMES, SCHEDULE_NAMES, PredictionName, ScheduleName
from .errors import ConfigError
from .validation import check_choice


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] cast to like's dtype/device, shaped to broadcast over like's (B, C, H, W)."""
    out = values.to(device=t.device)[t].to(dtype=like.dtype, device=like.device)
    return out.reshape(t.shape + (1,) * (like.dim() - t.dim()))


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A variance schedule beta_1..beta_T and its derived quantities.

    Attributes are 1-D float64 tensors of length ``num_steps``; index ``i`` is step
    ``t = i + 1`` (see the module docstring). ``name`` records which family built it
    ("linear", "cosine" or "respaced") for provenance.
    """

    betas: torch.Tensor
    name: str = "custom"

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() < 1:
            raise ConfigError("a noise schedule needs at least one step (num_steps >= 1)")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ConfigError("every beta must lie in (0, 1)")
        object.__setattr__(self, "betas", betas)

    # Derived buffers, computed once from betas on first use (betas stay the single
    # source of truth; cached_property writes around the frozen dataclass).
    @property
    def num_steps(self) -> int:
        return self.betas.numel()

    @cached_property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @cached_property
    def alpha_bars(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    @cached_property
    def alpha_bars_prev(self) -> torch.Tensor:
        """abar_{t-1} at index t-1, with abar_0 = 1 at index 0."""
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])

    def identity(self) -> dict[str, str | int]:
        """What a file records of the schedule it was made for: name, T, and the SHA-256 of
        the float64 betas (little-endian bytes), which tells schedules of one name apart."""
        betas = self.betas.numpy().astype("<f8").tobytes()
        return {"name": self.name, "num_steps": self.num_steps, "betas_sha256": hashlib.sha256(betas).hexdigest()}

    @cached_property
    def posterior_variances(self) -> torch.Tensor:
        """beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t (eq. 7); 0 at t = 1."""
        return (1.0 - self.alpha_bars_prev) / (1.0 - self.alpha_bars) * self.betas

    @cached_property
    def signal_to_noise(self) -> torch.Tensor:
        """SNR_t = abar_t / (1 - abar_t), the signal-to-noise ratio of x_t (Kingma et al. 2021)."""
        return self.alpha_bars / (1.0 - self.alpha_bars)

    # --- forward process -------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (eq. 4, reparameterised)."""
        alpha_bars = self.alpha_bars
        return (
            _gather(alpha_bars.sqrt(), t, x0) * x0
            + _gather((1.0 - alpha_bars).sqrt(), t, x0) * noise
        )

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x0) (eqs. 6-7)."""
        alpha_bars, alpha_bars_prev = self.alpha_bars, self.alpha_bars_prev
        coef_x0 = self.betas * alpha_bars_prev.sqrt() / (1.0 - alpha_bars)
        coef_xt = (1.0 - alpha_bars_prev) * self.alphas.sqrt() / (1.0 - alpha_bars)
        mean = _gather(coef_x0, t, x_t) * x0 + _gather(coef_xt, t, x_t) * x_t
        return mean, _gather(self.posterior_variances, t, x_t)

    def predict_x0_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), eq. 4 solved for x0."""
        alpha_bars = self.alpha_bars
        return (
            _gather((1.0 / alpha_bars).sqrt(), t, x_t) * x_t
            - _gather((1.0 / alpha_bars - 1.0).sqrt(), t, x_t) * eps
        )

    def predict_eps_from_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
    ) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), the inverse of the above."""
        alpha_bars = self.alpha_bars
        return (
            _gather((1.0 / alpha_bars).sqrt(), t, x_t) * x_t - x0
        ) / _gather((1.0 / alpha_bars - 1.0).sqrt(), t, x_t)

    # --- what the network predicts: eps, x0 or v (Salimans & Ho 2022) ------------------
    def velocity(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, section 4), for
        x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; v is the target of prediction "v"."""
        alpha_bars = self.alpha_bars
        return (
            _gather(alpha_bars.sqrt(), t, x0) * noise
            - _gather((1.0 - alpha_bars).sqrt(), t, x0) * x0
        )

    def predict_eps_from_v(
        self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t: the definition of v and eq. 4, solved
        for eps with abar_t + (1 - abar_t) = 1."""
        alpha_bars = self.alpha_bars
        return (
            _gather(alpha_bars.sqrt(), t, x_t) * v
            + _gather((1.0 - alpha_bars).sqrt(), t, x_t) * x_t
        )

    def predict_eps(
        self, prediction: PredictionName, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor:
        """The noise a network's ``output`` stands for, read as ``prediction``: eps itself,
        x0 (``predict_eps_from_x0``) or v (``predict_eps_from_v``)."""
        check_choice("prediction", prediction, PREDICTION_NAMES)
        if prediction == "eps":
            return output
        if prediction == "x0":
            return self.predict_eps_from_x0(x_t, t, output)
        return self.predict_eps_from_v(x_t, t, output)

    # --- the reverse process's variance ----------------------------------------------------
    @cached_property
    def clipped_log_posterior_variances(self) -> torch.Tensor:
        """log beta-tilde_t, with beta-tilde_1 = 0 replaced by beta-tilde_2 (improved-diffusion's
        "posterior_log_variance_clipped"); by beta_1 for a one-step schedule, which has no
        beta-tilde_2."""
        variances = self.posterior_variances.clone()
        variances[0] = variances[1] if self.num_steps > 1 else self.betas[0]
        return variances.log()

    def learned_log_variance(self, values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log Sigma_theta(x_t, t) of a network's variance output ``values`` at indices t
        (interpolate_log_variance between this schedule's log beta_t and clipped log beta-tilde_t)."""
        return interpolate_log_variance(
            values, _gather(self.betas.log(), t, values), _gather(self.clipped_log_posterior_variances, t, values)
        )

    def respace(self, indices: torch.Tensor | list[int]) -> NoiseSchedule:
        """The schedule on an increasing subsequence of step indices.

        Nichol & Dhariwal 2021, section 4: keep abar at the chosen steps and recompute
        beta_i = 1 - abar_{s_i} / abar_{s_{i-1}}, so that q(x_t | x0) is unchanged at the
        kept steps. The model must still be called with the *original* indices.
        """
        indices = torch.as_tensor(indices, dtype=torch.int64)
        kept = self.alpha_bars[indices]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
        return NoiseSchedule(1.0 - kept / prev, name=f"{self.name}-respaced")


def interpolate_log_variance(values: torch.Tensor, log_beta: torch.Tensor, log_beta_tilde: torch.Tensor) -> torch.Tensor:
    """log Sigma = w log beta_t + (1 - w) log beta-tilde_t, w = (values + 1) / 2 (Improved DDPM
    eq. 15, with the network's output mapped from [-1, 1] to [0, 1] as in their code):
    values = 1 gives sigma^2 = beta_t, values = -1 gives beta-tilde_t (clipped at t = 1)."""
    weight = (values + 1.0) / 2.0
    return weight * log_beta + (1.0 - weight) * log_beta_tilde


def linear_schedule(num_steps: int = 1000, beta_start: float | None = None, beta_end: float | None = None) -> NoiseSchedule:
    """Ho et al. 2020, section 4: betas linear from 1e-4 to 0.02 over T = 1000 steps;
    for other T the endpoints scaled by 1000 / T (Improved DDPM's code, Nichol & Dhariwal
    2021, ``get_named_beta_schedule("linear", T)``), so that abar_T stays about 4e-5 for
    every T instead of growing to 0.08 at T = 250 and 0.36 at T = 100.

    T = 1000 is exactly the unscaled schedule. Given ``beta_start`` and ``beta_end`` are
    used as they are, unscaled. diffusers' ``DDPMScheduler(beta_schedule="linear")`` does
    not scale: its schedule equals ours at T = 1000 only (ours with explicit 1e-4 and 0.02
    elsewhere). The scaling needs T >= 21: at T <= 20 the scaled beta_T would be >= 1.
    """
    _check_num_steps(num_steps)
    scale = 1000 / num_steps
    if beta_end is None and not scale * 0.02 < 1:
        raise ConfigError(
            f"the linear schedule scaled by 1000 / T needs T >= 21 (T = {num_steps} gives beta_T = {scale * 0.02:g}); "
            "give beta_start and beta_end for a shorter chain"
        )
    beta_start = scale * 1e-4 if beta_start is None else beta_start
    beta_end = scale * 0.02 if beta_end is None else beta_end
    if not 0 < beta_start <= beta_end < 1:
        raise ConfigError(f"need 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}")
    return NoiseSchedule(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64), name="linear")


def cosine_schedule(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2).

    beta_t = min(1 - abar(t) / abar(t - 1), max_beta); the clip at 0.999 keeps the last
    steps from a singularity at t = T, where f(T) = 0 would give beta_T = 1.
    """
    _check_num_steps(num_steps)
    if not s > 0 or not 0 < max_beta < 1:
        raise ConfigError(f"need s > 0 and 0 < max_beta < 1, got s={s}, max_beta={max_beta}")
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = torch.clamp(1.0 - f[1:] / f[:-1], max=max_beta)
    return NoiseSchedule(betas, name="cosine")


def make_schedule(name: ScheduleName, num_steps: int = 1000) -> NoiseSchedule:
    """The schedule family ``name`` ("linear" or "cosine") with its paper defaults."""
    check_choice("schedule", name, SCHEDULE_NAMES)
    return linear_schedule(num_steps) if name == "linear" else cosine_schedule(num_steps)


def schedule_before_scaling(name: ScheduleName, num_steps: int) -> NoiseSchedule:
    """What ``make_schedule(name, num_steps)`` built before the linear schedule was scaled by
    1000 / T: linear betas 1e-4 .. 0.02 for every T (the same at T = 1000). Files of that
    time (checkpoints, noisy classifiers) record no betas hash; this is what they were made with."""
    return linear_schedule(num_steps, 1e-4, 0.02) if name == "linear" else make_schedule(name, num_steps)


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ConfigError(f"num_steps must be an integer >= 1, got {num_steps!r}")
