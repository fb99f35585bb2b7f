"""Samplers: ancestral DDPM, DDIM and DPM-Solver++(2M) (ODE and SDE), behind one entry point ``sample``.

Each sampler is a short function over ``(denoiser, x, timesteps)`` in the style of
k-diffusion: ``denoiser(x_t, t)`` predicts the noise (guidance.py builds it from a model,
and turns a model's x0 or v prediction into eps there, once, for every sampler),
``x`` is the initial noise x_T and ``timesteps`` the steps to visit with their
precomputed coefficients. Conventions shared by all of them:

* Index convention of schedules.py: the model is called with original step indices
  (index i is the paper's step t = i + 1), even when fewer steps are visited.
* Fewer steps (Nichol & Dhariwal 2021, section 4): the sampler runs on the schedule
  respaced on the visited indices, i.e. abar is kept at those steps and the betas are
  recomputed from it. After the last (smallest) visited index every sampler steps to
  abar = 1, i.e. to x_0 itself, and returns the x0 prediction made there (the last step
  of Algorithm 2 of Ho et al. and of DDIM's eq. 12 with abar_0 = 1).
* Clipping (``clip_denoised``): the predicted x0 is clipped to [-1, 1] at every step and
  the noise is re-derived from the clipped x0 (eq. 4 solved for eps), so that x0 and eps
  stay one consistent pair. DDIM needs this (eq. 12 uses both); ancestral DDPM and
  DPM-Solver++ use only x0, so for them the re-derived eps is unused.
* Randomness: the initial noise, then one draw per noisy step (every step but the last),
  each float32 of the sample's shape from ``generator`` (on the generator's device), then
  cast. Drawing in float32 makes a seed give the same noise for every ``dtype``.
* Precision: ``sample``'s ``dtype`` is the model's: the model is called on x_t cast to it,
  and its prediction cast back. The sampler's own arithmetic (x_t, coefficients, updates,
  guidance) is float32, or float64 for a float64 model: in bf16, coefficients like
  1 - 1e-4 round to 1, and the first cosine step's x0 = (x_T - sqrt(1 - abar_T) eps) /
  sqrt(abar_T), with 1 / sqrt(abar_T) ~ 2e4, cancels catastrophically. Every coefficient is computed once per
  call in float64 from the schedule's buffers (read off the schedule's own formulas) and
  cast once to that arithmetic dtype; the step loop does only arithmetic in it.
* ``callback(info)`` is called once per step, before the update, with "i" (0, 1, ...),
  "t" (the original index, an int), "x_t" (the current sample) and "x0_pred" (the
  predicted x0, clipped if clipping is on; guided, except by ancestral DDPM's mean shift,
  which leaves x0 as predicted).
* Guidance (classifier-free and classifier) and its conventions: guidance.py.
* A learned variance (``variance="learned"``, Improved DDPM): the model outputs the
  variance values of eq. 15 besides its prediction, and ancestral DDPM interpolates
  between the respaced schedule's log beta and clipped log beta-tilde at the visited steps
  (their section 4). DDIM and DPM-Solver++ (ODE and SDE) have their own variances and
  ignore it: they use the prediction only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from .choices import (
    DEFAULT_GUIDANCE_FORM,
    DEFAULT_SPACING,
    SAMPLER_NAMES,
    SPACING_NAMES,
    VARIANCE_NAMES,
    GuidanceForm,
    PredictionName,
    SamplerName,
    SpacingName,
    VarianceName,
)
from .errors import ConfigError
from .guidance import Denoiser, GradientField, labels_for_model, make_classifier_guidance, make_denoiser
from .rng import seeded_generator
from .schedules import NoiseSchedule, interpolate_log_variance
from .unet import NO_LABEL
from .validation import check_choice

Callback = Callable[[dict[str, Any]], None]


# --- which steps to visit ----------------------------------------------------------------

def timestep_indices(num_steps: int, steps: int, spacing: SpacingName) -> torch.Tensor:
    """The ``steps`` original indices a sampler visits, DECREASING (the order of visit).

    Every spacing starts at index T - 1 (step T), visits distinct indices, and with
    steps = T visits all of them. With tau_i = the i-th smallest of the S visited steps:

    * "uniform": tau_i = floor(c i), c = (T - 1)/(S - 1), from 0 to T - 1 (DDIM appendix
      D.2, "linear", with the constant chosen so that tau_{S-1} = T - 1 exactly);
    * "quadratic": tau_i = floor(c i^2), c = (T - 1)/(S - 1)^2 (DDIM appendix D.2,
      denser at low noise). Deviation: where floor(c i^2) < i, near i = 0 when S is large,
      the paper's formula repeats steps; we take tau_i = max(floor(c i^2), i), which keeps
      them distinct and leaves the rest of the sequence unchanged;
    * "trailing": round(T - k T / S) - 1 for k = 0 .. S-1 (Lin et al. 2024, Table 2),
      rounding halves up.

    With a single step every spacing visits T - 1 alone.
    """
    check_choice("spacing", spacing, SPACING_NAMES)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_steps:
        raise ConfigError(f"steps must be an integer in [1, {num_steps}] (the schedule's steps), got {steps!r}")
    if steps == 1:
        return torch.tensor([num_steps - 1])
    if spacing == "trailing":
        k = torch.arange(steps)
        return num_steps - 1 - (2 * k * num_steps + steps) // (2 * steps)  # round(k T / S)
    i = torch.arange(steps - 1, -1, -1)  # tau_i, largest first
    if spacing == "uniform":
        return i * (num_steps - 1) // (steps - 1)
    return torch.maximum(i * i * (num_steps - 1) // (steps - 1) ** 2, i)


# --- what every sampler needs, precomputed once ------------------------------------------

@dataclass(frozen=True)
class Timesteps:
    """The S steps of one sampling run, with the coefficients every sampler shares.

    Visit step i (0 .. S-1) is at original index ``indices[i]`` (decreasing).
    ``schedule`` is the schedule respaced on the visited indices (float64, CPU); its
    index k is visit step S-1-k, which ``coefficients`` turns around.
    """

    indices: tuple[int, ...]
    model_t: torch.Tensor  # (S, B) int64: row i is the model's t at visit step i
    schedule: NoiseSchedule
    dtype: torch.dtype
    device: torch.device
    # x0 = x0_from_x x_t + x0_from_eps eps (eq. 4) and its inverse eps = eps_from_x x_t + eps_from_x0 x0.
    x0_from_x: torch.Tensor
    x0_from_eps: torch.Tensor
    eps_from_x: torch.Tensor
    eps_from_x0: torch.Tensor

    def coefficients(self, values: torch.Tensor) -> torch.Tensor:
        """Float64 values per step of ``schedule`` -> visit order, cast once to the run's dtype."""
        return _in_visit_order(values, self.dtype, self.device)


def make_timesteps(
    schedule: NoiseSchedule, indices: torch.Tensor, batch_size: int, dtype: torch.dtype, device: torch.device
) -> Timesteps:
    """Timesteps visiting ``indices`` (decreasing, as timestep_indices returns them)."""
    respaced = schedule.respace(indices.flip(0))
    k = torch.arange(len(indices))
    cast = partial(_in_visit_order, dtype=dtype, device=device)
    x0_from_x, x0_from_eps = map(cast, _linear_coefficients(
        lambda x_t, eps: respaced.predict_x0_from_eps(x_t, k, eps), len(k)))
    eps_from_x, eps_from_x0 = map(cast, _linear_coefficients(
        lambda x_t, x0: respaced.predict_eps_from_x0(x_t, k, x0), len(k)))
    return Timesteps(
        indices=tuple(indices.tolist()),
        model_t=indices.to(device)[:, None].expand(len(indices), batch_size).contiguous(),
        schedule=respaced, dtype=dtype, device=device,
        x0_from_x=x0_from_x, x0_from_eps=x0_from_eps, eps_from_x=eps_from_x, eps_from_x0=eps_from_x0,
    )


def _in_visit_order(values: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return values.flip(0).to(device=device, dtype=dtype)


def _linear_coefficients(
    linear_map: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of a map f(u, v) = a u + b v on (size,) tensors, read off f at unit inputs.

    The schedule's methods are the one source of truth for each formula; evaluating them
    here once, in float64, gives the per-step coefficients the step loop multiplies by.
    """
    one, zero = torch.ones(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
    return linear_map(one, zero), linear_map(zero, one)


def _predict(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: Timesteps,
    i: int,
    clip_denoised: bool,
    callback: Callback | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(eps, x0, variance values) predicted at visit step i, as p_mean_variance does; reports
    the step to callback."""
    eps, variance_values = denoiser(x, timesteps.model_t[i])
    x0 = timesteps.x0_from_x[i] * x + timesteps.x0_from_eps[i] * eps
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        eps = timesteps.eps_from_x[i] * x + timesteps.eps_from_x0[i] * x0  # consistent with the clipped x0
    if callback is not None:
        callback({"i": i, "t": timesteps.indices[i], "x_t": x, "x0_pred": x0})
    return eps, x0, variance_values


def _standard_normal(
    shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    noise_device = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=noise_device, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


# --- the samplers ------------------------------------------------------------------------

def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: Timesteps,
    *,
    variance: VarianceName,
    clip_denoised: bool,
    generator: torch.Generator | None,
    callback: Callback | None,
    mean_shift: GradientField | None = None,
) -> torch.Tensor:
    """Ancestral sampling, Algorithm 2 of Ho et al. 2020, on the respaced schedule.

    The mean is that of q(x_{t-1} | x_t, x0) at the predicted x0 (eqs. 6-7); without
    clipping this is Algorithm 2's 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps).
    sigma_t^2 is beta_t ("beta", Ho et al.'s CIFAR-10 choice) or beta-tilde_t
    ("posterior", eq. 7); section 3.2 found both to give similar results. "learned" takes
    the model's: exp of interpolate_log_variance between the respaced schedule's log beta_t
    and clipped log beta-tilde_t (Improved DDPM eq. 15 and section 4).
    With ``mean_shift`` (s g of classifier guidance, evaluated at x_t) the mean becomes
    mu + sigma_t^2 s g, Algorithm 1 of Dhariwal & Nichol 2021 (see guidance.py).
    """
    schedule = timesteps.schedule
    k = torch.arange(len(timesteps.indices))
    mean_from_x0, mean_from_x = _linear_coefficients(lambda x0, x_t: schedule.q_posterior(x0, x_t, k)[0], len(k))
    mean_from_x0, mean_from_x = timesteps.coefficients(mean_from_x0), timesteps.coefficients(mean_from_x)
    variances = schedule.betas if variance == "beta" else schedule.posterior_variances
    sigmas, sigmas_squared = timesteps.coefficients(variances.sqrt()), timesteps.coefficients(variances)
    log_betas = timesteps.coefficients(schedule.betas.log())
    log_posterior_variances = timesteps.coefficients(schedule.clipped_log_posterior_variances)
    last = len(timesteps.indices) - 1
    for i in range(last + 1):
        _, x0, variance_values = _predict(denoiser, x, timesteps, i, clip_denoised, callback)
        sigma, sigma_squared = sigmas[i], sigmas_squared[i]
        if variance == "learned":
            log_variance = interpolate_log_variance(variance_values, log_betas[i], log_posterior_variances[i])
            sigma, sigma_squared = (0.5 * log_variance).exp(), log_variance.exp()
        x_t = x
        x = mean_from_x0[i] * x0 + mean_from_x[i] * x_t
        if mean_shift is not None:  # Dhariwal & Nichol, Algorithm 1: mu + s Sigma grad log p(y | x_t)
            x = x + sigma_squared * mean_shift(x_t, timesteps.model_t[i])
        if i < last:  # Algorithm 2: z = 0 at t = 1, the step to x0
            x = x + sigma * _standard_normal(x.shape, generator, x.dtype, x.device)
    return x


def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: Timesteps,
    *,
    eta: float,
    clip_denoised: bool,
    generator: torch.Generator | None,
    callback: Callback | None,
) -> torch.Tensor:
    """DDIM, Song et al. 2021 eq. 12, with sigma(eta) of eq. 16.

    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, where
    sigma^2 = eta^2 (1 - abar_prev)/(1 - abar) (1 - abar/abar_prev) is eta^2 times the
    respaced schedule's beta-tilde. eta = 0 is deterministic; eta = 1 is ancestral DDPM
    with the "posterior" variance. sigma = 0 on the last step (abar_prev = 1).
    """
    schedule = timesteps.schedule
    variances = eta**2 * schedule.posterior_variances
    # clamp: for eta = 1 the difference is 0 up to rounding at steps where beta-tilde ~ 1 - abar_prev.
    direction = timesteps.coefficients((1.0 - schedule.alpha_bars_prev - variances).clamp(min=0.0).sqrt())
    x0_scale = timesteps.coefficients(schedule.alpha_bars_prev.sqrt())
    sigmas = timesteps.coefficients(variances.sqrt())
    last = len(timesteps.indices) - 1
    for i in range(last + 1):
        eps, x0, _ = _predict(denoiser, x, timesteps, i, clip_denoised, callback)
        x = x0_scale[i] * x0 + direction[i] * eps
        if eta > 0 and i < last:
            x = x + sigmas[i] * _standard_normal(x.shape, generator, x.dtype, x.device)
    return x


def sample_dpm_solver_pp(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: Timesteps,
    *,
    clip_denoised: bool,
    callback: Callback | None,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095), Algorithm 2; with
    ``stochastic``, its SDE form, SDE-DPM-Solver++(2M) (same paper, appendix).

    Discrete to continuous time: the solver integrates the diffusion ODE in
    lambda = log(alpha/sigma), alpha = sqrt(abar), sigma = sqrt(1 - abar), and needs the
    noise schedule only at the points it visits. Its time points are the visited indices,
    each standing for the continuous time whose (alpha, sigma) is the schedule's at that
    index, and the data prediction x_theta(x, t) there is the x0 predicted by the model
    called with that index. After the smallest visited index the solver steps to
    abar = 1 (sigma = 0, lambda = +inf): a first-order step, which returns exactly the
    x0 prediction at that index.

    Order: 2 where possible, 1 on three kinds of step. The first, for want of a previous
    prediction. The final one (to abar = 1), which cannot be second order (h = inf makes
    r = 0). And the step landing on index 0 (t = 1) when the spacing visits it: that is the
    solver's own final step in the paper's setting (its t_end is the first discrete step)
    and there lambda jumps (4.6 for the linear schedule) far beyond the previous step, so
    r << 1 and the extrapolation weight 1/(2r) is large. The authors' implementation
    lowers the order at the final step for fewer than 15 steps (their "stabilizing
    trick"); we do it at any number of steps, since on the Gaussian oracle of the tests
    "uniform" spacing with 50 steps is 20x less accurate otherwise. "trailing" spacing
    never visits index 0 (unless steps = T). With one or two steps the solver is DDIM
    (eta = 0; the SDE form: eta = 1).

    Update (Algorithm 2): x_next = (sigma_next/sigma) x - alpha_next (e^{-h} - 1) D with
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_previous, h = lambda_next - lambda, r = h_previous/h.
    SDE form: x_next = (sigma_next/sigma) e^{-h} x + alpha_next (1 - e^{-2h}) D
    + sigma_next sqrt(1 - e^{-2h}) z, with the same D. Its first-order step is exactly
    DDIM with eta = 1 (the posterior q(x_next | x, x0 = D)), so it is a second-order
    correction of ancestral sampling on the respaced schedule, with fresh noise at every
    step like Algorithm 2 of Ho et al. On our trained models that noise made up for part
    of the model's error, which the ODE form carries to the end (README, "Fast samplers").
    """
    schedule = timesteps.schedule
    alphas, sigmas = schedule.alpha_bars.sqrt(), (1.0 - schedule.alpha_bars).sqrt()
    alphas_next, sigmas_next = schedule.alpha_bars_prev.sqrt(), (1.0 - schedule.alpha_bars_prev).sqrt()
    exp_minus_h = alphas * sigmas_next / (sigmas * alphas_next)
    x_scale = sigmas_next / sigmas * (exp_minus_h if stochastic else 1.0)
    # The weight of D, alpha_next (1 - e^{-h}) or alpha_next (1 - e^{-2h}), is in both forms
    # alpha_next - alpha x_scale, which stays finite at sigma_next = 0 (alpha_next = 1).
    data_scale = alphas_next - alphas * x_scale
    if stochastic:
        noise_scales = timesteps.coefficients(sigmas_next * (1.0 - exp_minus_h**2).clamp(min=0.0).sqrt())
    lambdas = (alphas.log() - sigmas.log()).flip(0)  # visit order
    h = lambdas[1:] - lambdas[:-1]  # h[i]: from visit step i to i + 1 (the final step, h = inf, excluded)
    # 1/(2r) at visit step i is h[i] / (2 h[i-1]); 0 makes a step first order (see above).
    half_inverse_r = torch.zeros(len(timesteps.indices), dtype=torch.float64)
    half_inverse_r[1:-1] = h[1:] / (2.0 * h[:-1])
    if timesteps.indices[-1] == 0:
        half_inverse_r[-2:] = 0.0
    x_scale, data_scale = timesteps.coefficients(x_scale), timesteps.coefficients(data_scale)
    half_inverse_r = half_inverse_r.to(device=timesteps.device, dtype=timesteps.dtype)
    previous_x0 = None
    last = len(timesteps.indices) - 1
    for i in range(last + 1):
        _, x0, _ = _predict(denoiser, x, timesteps, i, clip_denoised, callback)
        data = x0 if previous_x0 is None else x0 + half_inverse_r[i] * (x0 - previous_x0)
        x = x_scale[i] * x + data_scale[i] * data
        if stochastic and i < last:  # sigma_next = 0 on the last step
            x = x + noise_scales[i] * _standard_normal(x.shape, generator, x.dtype, x.device)
        previous_x0 = x0
    return x


def _in_precision(model: Callable[..., torch.Tensor], dtype: torch.dtype, arithmetic: torch.dtype) -> Callable[..., torch.Tensor]:
    """``model`` called on x_t cast to its precision ``dtype``, its prediction cast to the
    sampler's ``arithmetic`` dtype; the model itself where the two agree. Keeps the model's
    ``null_label`` (guidance.is_conditional reads it)."""
    if dtype == arithmetic:
        return model

    def in_precision(x_t: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        return model(x_t.to(dtype), t, *labels).to(arithmetic)

    in_precision.null_label = getattr(model, "null_label", NO_LABEL)  # type: ignore[attr-defined]
    return in_precision


# --- the entry points ----------------------------------------------------------------------

@torch.inference_mode()
def sample(
    model: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    sampler: SamplerName = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    variance: VarianceName = "beta",
    prediction: PredictionName = "eps",
    labels: torch.Tensor | None = None,
    guidance_scale: float = 0.0,
    classifier: Callable[..., torch.Tensor] | None = None,
    classifier_scale: float = 0.0,
    guidance_form: GuidanceForm = DEFAULT_GUIDANCE_FORM,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    spacing: SpacingName = DEFAULT_SPACING,
    clip_denoised: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Samples x_0 of ``shape`` (B, C, H, W) from ``model``, in the model's data range.

    ``model(x_t, t)`` (or ``model(x_t, t, y)`` with ``labels``) predicts the noise, t being
    int64 original indices (B,), or x0 or v with ``prediction`` "x0" or "v" (a loaded model
    passes its own: config.model_output_options). ``steps`` model evaluations (default: all
    num_steps) at indices chosen by ``spacing``. ``eta`` is DDIM's noise scale, in [0, 1], for
    sampler="ddim" only; ``variance`` is ancestral DDPM's sigma_t^2: "beta", "posterior", or
    "learned" for a model that learns it, whose output then has twice the image's channels
    (the other samplers ignore the variance, and use that model's prediction only; another
    value than the default with them is refused, as eta is). ``labels`` are the classes to generate: a conditional model gets them, an
    unconditional one does not (then they are the classifier's targets only).
    ``guidance_scale`` is classifier-free guidance's w; ``classifier``, ``classifier_scale``
    (s) and ``guidance_form`` are classifier guidance's, which needs ``labels``. Both kinds
    can be combined; guidance.py states every convention.
    ``device`` defaults to the model's (its first parameter's; CPU for a plain function).
    ``dtype`` is the model's precision (module docstring): the samples come back in float32
    (float64 for a float64 model), the dtype of the sampler's arithmetic.
    """
    check_choice("sampler", sampler, SAMPLER_NAMES)
    check_choice("variance", variance, VARIANCE_NAMES)
    if not 0.0 <= eta <= 1.0:  # eq. 12 needs sigma^2 <= 1 - abar_prev, which eta <= 1 guarantees
        raise ConfigError(f"eta must be in [0, 1], got {eta}")
    if eta > 0 and sampler != "ddim":
        raise ConfigError(f"eta applies to sampler 'ddim' only, not {sampler!r}")
    if variance == "posterior" and sampler != "ddpm":  # "learned" says how to read the model's output: every sampler needs it
        raise ConfigError(f"variance applies to sampler 'ddpm' (ancestral) only, not {sampler!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    if not (len(shape) >= 1 and all(isinstance(n, int) and n >= 1 for n in shape)):
        raise ConfigError(f"shape must be positive integers (batch first), got {tuple(shape)}")
    indices = timestep_indices(schedule.num_steps, schedule.num_steps if steps is None else steps, spacing)
    device = torch.device(device) if device is not None else _device_of(model)
    if labels is not None:
        labels = _check_labels(labels, shape[0]).to(device)
    classifier_guidance = make_classifier_guidance(classifier, labels, classifier_scale, guidance_form)
    arithmetic = torch.promote_types(dtype, torch.float32)
    denoiser = make_denoiser(
        _in_precision(model, dtype, arithmetic), labels_for_model(model, labels, classifier is not None), guidance_scale,
        schedule=schedule, prediction=prediction, learned_variance=variance == "learned",
    )
    mean_shift = None
    if classifier_guidance is not None:
        denoiser, mean_shift = classifier_guidance.apply(denoiser, schedule, ancestral=sampler == "ddpm")
    timesteps = make_timesteps(schedule, indices, shape[0], arithmetic, device)
    x = _standard_normal(tuple(shape), generator, arithmetic, device)
    common = {"clip_denoised": clip_denoised, "callback": callback}
    if sampler == "ddpm":
        return sample_ddpm(denoiser, x, timesteps, variance=variance, generator=generator, mean_shift=mean_shift, **common)
    if sampler == "ddim":
        return sample_ddim(denoiser, x, timesteps, eta=eta, generator=generator, **common)
    stochastic = sampler == "dpm-solver++-sde"
    return sample_dpm_solver_pp(denoiser, x, timesteps, stochastic=stochastic, generator=generator, **common)


def sample_batches(
    model: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    num: int,
    batch_size: int,
    image_shape: tuple[int, ...],
    *,
    seed: int,
    start_batch: int = 0,
    labels: torch.Tensor | None = None,
    **sample_kwargs: Any,
) -> Iterator[torch.Tensor]:
    """``num`` samples in batches of ``batch_size`` (the last may be smaller), one at a time.

    Batch k is drawn with ``seeded_generator(seed, k)``, so it is the same whether the
    run starts at batch 0 or at ``start_batch = k`` (an interrupted evaluation resumes
    where it stopped). ``labels`` (int64, length num) is sliced per batch; the other
    keywords go to ``sample``. Arguments are checked when this is called, not at the
    first batch.
    """
    if num < 1 or batch_size < 1:
        raise ConfigError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    num_batches = math.ceil(num / batch_size)
    if not 0 <= start_batch <= num_batches:
        raise ConfigError(
            f"start_batch must be in [0, {num_batches}] ({num} samples in batches of {batch_size}), got {start_batch}"
        )
    if labels is not None:
        labels = _check_labels(labels, num)

    def batches() -> Iterator[torch.Tensor]:  # a generator of its own, so that the checks above run now
        for k in range(start_batch, num_batches):
            first, end = k * batch_size, min(num, (k + 1) * batch_size)
            yield sample(
                model, schedule, (end - first, *image_shape), generator=seeded_generator(seed, k),
                labels=None if labels is None else labels[first:end], **sample_kwargs,
            )

    return batches()


@contextmanager
def step_progress(
    num_batches: int, steps: int, *, description: str = "sampling", start_batch: int = 0, disable: bool = False,
    batch_labels: Sequence[str] | None = None,
) -> Iterator[Callback]:
    """A progress bar over the model evaluations of ``num_batches`` sampling runs of
    ``steps`` steps each (from batch ``start_batch`` on); yields the ``callback`` for
    sample or sample_batches that advances it, one step a call, naming the batch in
    progress ("batch 2/5", or its entry of ``batch_labels``)."""
    from tqdm.auto import tqdm

    labels = batch_labels or [f"batch {k + 1}/{num_batches}" for k in range(num_batches)]
    batch = start_batch
    with tqdm(total=num_batches * steps, initial=start_batch * steps, unit="step", desc=description,
              disable=disable, dynamic_ncols=True) as bar:
        def advance(info: dict[str, Any]) -> None:
            nonlocal batch
            if info["i"] == 0:
                bar.set_postfix_str(labels[batch])
                batch += 1
            bar.update(1)

        yield advance


# --- argument checks -------------------------------------------------------------------------

def _check_labels(labels: torch.Tensor, count: int) -> torch.Tensor:
    if not (isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.shape == (count,)):
        if isinstance(labels, torch.Tensor):
            described = f"{labels.dtype} {tuple(labels.shape)}"
        else:
            described = type(labels).__name__
        raise ConfigError(f"labels must be an int64 tensor of shape ({count},), got {described}")
    return labels


def _device_of(model: Callable[..., torch.Tensor]) -> torch.device:
    parameter = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")
