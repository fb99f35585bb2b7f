"""Oracles for the samplers.

* Algorithm 2 of Ho et al. 2020 and Algorithm 2 of Lu et al. 2022 (DPM-Solver++(2M)),
  written out here directly from the papers, on a fixed nonlinear toy noise model.
* DDIM's identities (Song et al. 2021): eta = 1 with the same noise is ancestral DDPM
  with beta-tilde; one or two DPM-Solver++ steps are DDIM steps (eta = 0; eta = 1 for
  its SDE form).
* A Gaussian data set x0 ~ N(MU, STD^2), whose exact noise predictor is known in closed
  form, so every sampler must reproduce the data's mean and std, the better the more
  steps. Deterministic samplers solve the probability-flow ODE, whose exact solution
  for Gaussian data is the affine map x_T -> MU + STD (x_T - m_T) / s_T: they are
  checked sample by sample.
"""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpmkit import ConfigError, cosine_schedule, linear_schedule
from ddpmkit.samplers import (
    DEFAULT_SPACING,
    SAMPLER_NAMES,
    SPACING_NAMES,
    sample,
    sample_batches,
    timestep_indices,
)
from ddpmkit.rng import seeded_generator

MU, STD = 0.3, 0.5
SCHEDULES = {"linear": linear_schedule(), "cosine": cosine_schedule()}


def gaussian_eps_model(schedule):
    """eps*(x_t, t) = E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) MU) / (abar STD^2 + 1 - abar)."""

    def model(x_t, t):
        abar = schedule.alpha_bars.to(x_t.device)[t].to(x_t.dtype).view(-1, *[1] * (x_t.dim() - 1))
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * MU) / (abar * STD**2 + 1 - abar)

    return model


def toy_eps_model(num_steps):
    """A fixed nonlinear, t-dependent noise predictor (its values reach beyond [-1, 1] as x0)."""

    def model(x_t, t):
        scale = (t.to(x_t.dtype) + 1).view(-1, 1, 1, 1) / num_steps
        return torch.sin(3 * x_t) * scale + 0.2 * x_t

    return model


def noise_draws(seed, shape, count, dtype=torch.float64):
    """The draws the samplers make: x_T first, then one per noisy step, float32 then cast."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(count)]


# --- timestep_indices -------------------------------------------------------------------------

def test_timestep_indices_known_values():
    # Lin et al. 2024, Table 2, trailing: round(arange(T, 0, -T/S)) - 1 (no halves occur here).
    for steps in (3, 7, 10):
        expected = np.round(np.arange(1000, 0, -1000 / steps)).astype(int) - 1
        assert timestep_indices(1000, steps, "trailing").tolist() == expected.tolist()
    assert timestep_indices(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    # DDIM appendix D.2: floor(c i) and floor(c i^2) with tau_{S-1} = T - 1, largest first.
    assert timestep_indices(1000, 10, "uniform").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert timestep_indices(1000, 10, "quadratic").tolist() == [999, 789, 604, 444, 308, 197, 111, 49, 12, 0]
    # Where floor(c i^2) < i the quadratic sequence would repeat steps; it takes i instead.
    assert timestep_indices(10, 6, "quadratic").tolist() == [9, 5, 3, 2, 1, 0]
    for spacing in SPACING_NAMES:
        assert timestep_indices(1000, 1, spacing).tolist() == [999]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), num_steps=st.integers(1, 400), spacing=st.sampled_from(SPACING_NAMES))
def test_timestep_indices_are_distinct_decreasing_and_start_at_the_last_step(data, num_steps, spacing):
    steps = data.draw(st.integers(1, num_steps))
    indices = timestep_indices(num_steps, steps, spacing)
    assert indices.dtype == torch.int64 and indices.shape == (steps,)
    assert indices[0].item() == num_steps - 1
    assert bool((indices[1:] < indices[:-1]).all())  # strictly decreasing, hence distinct
    assert indices[-1].item() >= 0
    if spacing != "trailing" and steps >= 2:
        assert indices[-1].item() == 0
    if steps == num_steps:
        assert indices.tolist() == list(range(num_steps - 1, -1, -1))


# --- exact identities ---------------------------------------------------------------------------

@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_full_chain_is_algorithm_2(variance):
    schedule = linear_schedule()
    model, shape, seed = toy_eps_model(1000), (2, 1, 2, 2), 3
    x_T, *zs = noise_draws(seed, shape, 1000)
    sigmas_sq = schedule.betas if variance == "beta" else schedule.posterior_variances
    x = x_T
    for index in range(999, -1, -1):  # Algorithm 2, t = T .. 1
        beta, alpha, abar = schedule.betas[index], schedule.alphas[index], schedule.alpha_bars[index]
        z = zs[999 - index] if index > 0 else torch.zeros(shape, dtype=torch.float64)
        eps = model(x, torch.full((2,), index))
        x = (x - beta / (1 - abar).sqrt() * eps) / alpha.sqrt() + sigmas_sq[index].sqrt() * z
    got = sample(model, schedule, shape, variance=variance, clip_denoised=False, dtype=torch.float64,
                 generator=torch.Generator().manual_seed(seed))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_is_eq_12_with_sigma_of_eq_16(eta):
    schedule, model, shape = SCHEDULES["cosine"], toy_eps_model(1000), (3, 1, 2, 2)
    visited = timestep_indices(1000, 12, "quadratic").tolist()
    x_T, *zs = noise_draws(2, shape, 12 if eta > 0 else 1)
    abar = schedule.alpha_bars.tolist() + [1.0]  # abar[-1]: abar_0 = 1, after the last visited step
    x = x_T
    for n, (i, j) in enumerate(zip(visited, visited[1:] + [-1])):
        eps = model(x, torch.full((3,), i))
        x0 = (x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])
        sigma = eta * math.sqrt((1 - abar[j]) / (1 - abar[i])) * math.sqrt(1 - abar[i] / abar[j])  # eq. 16
        x = math.sqrt(abar[j]) * x0 + math.sqrt(1 - abar[j] - sigma**2) * eps  # eq. 12
        if sigma > 0:
            x = x + sigma * zs[n]
    got = sample(model, schedule, shape, sampler="ddim", eta=eta, steps=12, spacing="quadratic",
                 clip_denoised=False, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("steps", [1000, 20])
@pytest.mark.parametrize("clip_denoised", [False, True])
def test_ddim_with_eta_1_is_ancestral_sampling_with_posterior_variance(steps, clip_denoised):
    schedule = SCHEDULES["cosine"]
    model, shape = toy_eps_model(1000), (3, 1, 2, 2)
    runs = [
        sample(model, schedule, shape, steps=steps, clip_denoised=clip_denoised, dtype=torch.float64,
               generator=torch.Generator().manual_seed(7), **kwargs)
        for kwargs in ({"sampler": "ddim", "eta": 1.0}, {"sampler": "ddpm", "variance": "posterior"})
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize(("solver", "eta"), [("dpm-solver++", 0.0), ("dpm-solver++-sde", 1.0)])
def test_dpm_solver_with_one_or_two_steps_is_ddim(steps, solver, eta):
    model, shape = toy_eps_model(1000), (3, 1, 2, 2)
    runs = [
        sample(model, SCHEDULES["linear"], shape, steps=steps, dtype=torch.float64,
               generator=torch.Generator().manual_seed(1), **kwargs)
        for kwargs in ({"sampler": solver}, {"sampler": "ddim", "eta": eta})
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-12)


def dpm_solver_pp_2m(model, schedule, x, visited, noise=None):
    """Lu et al. 2022, Algorithm 2, in its own variables; after the last visited index the
    solver steps to sigma = 0 (first order: returns x_theta). First order also on the first
    step and on a step landing on index 0 (see sample_dpm_solver_pp). With ``noise`` (one
    draw per step but the last), SDE-DPM-Solver++(2M) of the same paper's appendix."""
    abar = schedule.alpha_bars.tolist()
    alpha = lambda i: math.sqrt(abar[i])  # noqa: E731
    sigma = lambda i: math.sqrt(1 - abar[i])  # noqa: E731
    lam = lambda i: math.log(alpha(i) / sigma(i))  # noqa: E731
    previous = None
    for n, i in enumerate(visited):
        eps = model(x, torch.full((x.shape[0],), i))
        x0 = (x - sigma(i) * eps) / alpha(i)  # x_theta, the data prediction
        if n == len(visited) - 1:
            return x0
        j = visited[n + 1]
        h = lam(j) - lam(i)
        if n == 0 or j == 0:
            data = x0
        else:
            r = (lam(i) - lam(visited[n - 1])) / h
            data = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous
        if noise is None:
            x = sigma(j) / sigma(i) * x - alpha(j) * (math.exp(-h) - 1) * data
        else:
            x = (sigma(j) / sigma(i) * math.exp(-h) * x + alpha(j) * (1 - math.exp(-2 * h)) * data
                 + sigma(j) * math.sqrt(1 - math.exp(-2 * h)) * noise[n])
        previous = x0


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["trailing", "uniform"])
def test_dpm_solver_is_algorithm_2_of_the_paper(schedule_name, spacing, device):
    schedule, model, shape = SCHEDULES[schedule_name], toy_eps_model(1000), (3, 1, 2, 2)
    visited = timestep_indices(1000, 8, spacing).tolist()
    (x_T,) = noise_draws(5, shape, 1)
    expected = dpm_solver_pp_2m(model, schedule, x_T, visited)
    got = sample(model, schedule, shape, sampler="dpm-solver++", steps=8, spacing=spacing, clip_denoised=False,
                 dtype=torch.float64, generator=torch.Generator().manual_seed(5), device=device)
    assert got.device.type == device.type
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_sde_dpm_solver_is_the_papers_sde_form(schedule_name):
    schedule, model, shape = SCHEDULES[schedule_name], toy_eps_model(1000), (3, 1, 2, 2)
    visited = timestep_indices(1000, 8, "trailing").tolist()
    x_T, *noise = noise_draws(6, shape, 8)
    expected = dpm_solver_pp_2m(model, schedule, x_T, visited, noise)
    got = sample(model, schedule, shape, sampler="dpm-solver++-sde", steps=8, clip_denoised=False,
                 dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    # The toy model drives some samples to |x| ~ 1e3 on the cosine schedule: relative tolerance.
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-9)
    assert (got - dpm_solver_pp_2m(model, schedule, x_T, visited)).abs().max() > 0.01  # the noise matters


# --- the Gaussian oracle ------------------------------------------------------------------------

# max |x0 - exact ODE solution| over 2000 samples; measured values are about half of these.
ODE_TOLERANCES = {
    "ddim": {10: 0.8, 50: 0.2, 1000: 0.012},  # first order: error ~ 1/steps
    "dpm-solver++": {10: 0.6, 50: 0.006, 1000: 4e-4},  # second order
}


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
def test_deterministic_samplers_solve_the_probability_flow_ode_of_a_gaussian(schedule_name, sampler, device):
    schedule, num = SCHEDULES[schedule_name], 2000
    abar_T = schedule.alpha_bars[-1].item()
    (x_T,) = noise_draws(0, (num, 1, 1, 1), 1)
    exact = MU + STD * (x_T - math.sqrt(abar_T) * MU) / math.sqrt(abar_T * STD**2 + 1 - abar_T)
    errors = []
    for steps, tolerance in ODE_TOLERANCES[sampler].items():
        x0 = sample(gaussian_eps_model(schedule), schedule, (num, 1, 1, 1), sampler=sampler, steps=steps,
                    clip_denoised=False, dtype=torch.float64, generator=torch.Generator().manual_seed(0), device=device).cpu()
        errors.append((x0 - exact).abs().max().item())
        assert errors[-1] < tolerance, (steps, errors)
        assert abs(x0.mean().item() - exact.mean().item()) < tolerance
        assert abs(x0.std().item() - exact.std().item()) < tolerance
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_dpm_solver_is_accurate_with_spacings_that_visit_index_0(schedule_name, spacing):
    # Regression: a second-order step onto index 0 (lambda jumps there) cost 20x accuracy.
    schedule, num = SCHEDULES[schedule_name], 2000
    abar_T = schedule.alpha_bars[-1].item()
    (x_T,) = noise_draws(0, (num, 1, 1, 1), 1)
    exact = MU + STD * (x_T - math.sqrt(abar_T) * MU) / math.sqrt(abar_T * STD**2 + 1 - abar_T)
    x0 = sample(gaussian_eps_model(schedule), schedule, (num, 1, 1, 1), sampler="dpm-solver++", steps=50,
                spacing=spacing, clip_denoised=False, dtype=torch.float64,
                generator=torch.Generator().manual_seed(0))
    assert (x0 - exact).abs().max().item() < 0.02


# |mean - MU| and |std - STD| over 20000 samples (Monte Carlo error about 0.0035 and 0.0025).
MEAN_TOLERANCE = 0.015
STD_TOLERANCES = {10: 0.25, 50: 0.08, 1000: 0.015}  # few ancestral steps lose variance


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("kwargs", [
    {"sampler": "ddpm", "variance": "beta"},
    {"sampler": "ddpm", "variance": "posterior"},
    {"sampler": "ddim", "eta": 1.0},
    {"sampler": "dpm-solver++-sde"},
], ids=["ddpm-beta", "ddpm-posterior", "ddim-eta1", "dpm-solver++-sde"])
def test_stochastic_samplers_reproduce_a_gaussian(schedule_name, kwargs, device):
    schedule, num = SCHEDULES[schedule_name], 20000
    std_errors = []
    for steps, std_tolerance in STD_TOLERANCES.items():
        x0 = sample(gaussian_eps_model(schedule), schedule, (num, 1, 1, 1), steps=steps, clip_denoised=False,
                    generator=torch.Generator().manual_seed(0), device=device, **kwargs)
        assert abs(x0.mean().item() - MU) < MEAN_TOLERANCE
        std_errors.append(abs(x0.std().item() - STD))
        assert std_errors[-1] < std_tolerance, (steps, std_errors)
    # With sigma^2 = beta the extra variance offsets the loss of few steps, so its error at
    # 10 steps is small by luck; only the full chain is required to beat the others.
    assert std_errors[-1] < min(std_errors[:-1])


# --- behaviour of sample ---------------------------------------------------------------------------

SAMPLER_KWARGS = [{"sampler": "ddpm"}, {"sampler": "ddim", "eta": 0.5}, {"sampler": "dpm-solver++"},
                  {"sampler": "dpm-solver++-sde"}]


@pytest.mark.parametrize("kwargs", SAMPLER_KWARGS, ids=lambda k: k["sampler"])
def test_a_seeded_generator_gives_identical_samples(kwargs):
    model, schedule, shape = toy_eps_model(1000), SCHEDULES["linear"], (2, 1, 3, 3)
    runs = [sample(model, schedule, shape, steps=10, generator=torch.Generator().manual_seed(seed), **kwargs)
            for seed in (4, 4, 5)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


@pytest.mark.parametrize("kwargs", SAMPLER_KWARGS, ids=lambda k: k["sampler"])
@pytest.mark.parametrize("spacing", SPACING_NAMES)
def test_callback_reports_every_step(kwargs, spacing):
    model, schedule, shape = toy_eps_model(1000), SCHEDULES["cosine"], (2, 1, 3, 3)
    infos = []
    result = sample(model, schedule, shape, steps=6, spacing=spacing, callback=infos.append,
                    generator=torch.Generator().manual_seed(0), **kwargs)
    assert [info["i"] for info in infos] == list(range(6))
    assert [info["t"] for info in infos] == timestep_indices(1000, 6, spacing).tolist()
    assert all(set(info) == {"i", "t", "x_t", "x0_pred"} and isinstance(info["t"], int) for info in infos)
    (x_T,) = noise_draws(0, shape, 1, torch.float32)
    assert torch.equal(infos[0]["x_t"], x_T)  # the initial noise is the generator's first draw
    assert all(info["x0_pred"].abs().max() <= 1 for info in infos)  # clipped
    # Every sampler's last step goes to abar = 1 and returns the x0 predicted there.
    torch.testing.assert_close(result, infos[-1]["x0_pred"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip_denoised", [True, False])
@pytest.mark.parametrize("kwargs", SAMPLER_KWARGS + [{"sampler": "ddim"}], ids=lambda k: str(k))
def test_finite_at_the_last_step_of_the_cosine_schedule(dtype, clip_denoised, kwargs):
    schedule = SCHEDULES["cosine"]  # abar_T ~ 2e-9: x0 = (x_T - sqrt(1 - abar) eps) / 4.5e-5
    for steps in (1, 3):
        infos = []
        x0 = sample(gaussian_eps_model(schedule), schedule, (64, 1, 2, 2), steps=steps, dtype=dtype,
                    clip_denoised=clip_denoised, callback=infos.append,
                    generator=torch.Generator().manual_seed(0), **kwargs)
        assert x0.dtype == torch.float32  # a bf16 model's samples too: the sampler computes in float32
        assert infos[0]["t"] == 999
        assert all(torch.isfinite(info["x0_pred"]).all() for info in infos)
        assert torch.isfinite(x0).all()


# Full chains of a bf16 model against the same model in float32. Measured: mean |difference|
# 0.0019-0.0025 (Gaussian oracle) and 0.0007 (UNet), max 0.008-0.014; with the sampler's own
# arithmetic in bf16 as well (1 - beta_1 = 0.9999 rounds to 1), the mean was 0.03-0.12.
BF16_MEAN_TOLERANCE, BF16_MAX_TOLERANCE = 0.005, 0.03


def bf16_unet():
    """A tiny UNet with random weights everywhere (a fresh one predicts 0), and its bf16 copy."""
    from ddpmkit.unet import UNet

    torch.manual_seed(0)
    unet = UNet(base_channels=8, channel_mults=(1,), num_res_blocks=1).eval().requires_grad_(False)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return unet, copy.deepcopy(unet).to(torch.bfloat16)


@pytest.mark.parametrize("model_name, sampler, schedule_name", [
    *[("gaussian", sampler, name) for sampler in ("ddpm", "ddim") for name in ("linear", "cosine")],
    ("unet", "ddpm", "linear"),  # bf16 convolutions are slow on a CPU: one case
])
def test_a_bf16_model_samples_what_its_float32_self_does(schedule_name, model_name, sampler):
    schedule = SCHEDULES[schedule_name]
    if model_name == "gaussian":  # the same formula, evaluated in the input's dtype
        models, shape = (gaussian_eps_model(schedule),) * 2, (2000, 1, 1, 1)
    else:
        models, shape = bf16_unet(), (8, 1, 8, 8)
    fp32, bf16 = (sample(model, schedule, shape, sampler=sampler, dtype=dtype, generator=torch.Generator().manual_seed(0))
                  for model, dtype in zip(models, (torch.float32, torch.bfloat16)))
    assert bf16.dtype == torch.float32
    difference = (fp32 - bf16).abs()
    assert difference.mean() < BF16_MEAN_TOLERANCE and difference.max() < BF16_MAX_TOLERANCE, (difference.mean(), difference.max())


def test_default_spacing_and_full_chain():
    assert DEFAULT_SPACING in SPACING_NAMES
    calls = []
    sample(lambda x, t: calls.append(t.clone()) or torch.zeros_like(x), linear_schedule(50), (3, 1, 2, 2))
    assert [t.tolist() for t in calls] == [[i] * 3 for i in range(49, -1, -1)]  # steps=None: every step


class ScaledIdentity(torch.nn.Module):
    def __init__(self, device=None):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.1, device=device))

    def forward(self, x, t):
        return self.scale * x


def test_samples_on_the_model_device_unless_told():
    # The "meta" device runs no arithmetic but keeps track of where tensors live.
    assert sample(ScaledIdentity("meta"), linear_schedule(30), (2, 1, 2, 2), steps=3).device.type == "meta"
    on_meta = sample(ScaledIdentity(), linear_schedule(30), (2, 1, 2, 2), steps=3, device="meta")
    assert on_meta.device.type == "meta"
    assert sample(ScaledIdentity(), linear_schedule(30), (2, 1, 2, 2), steps=3).device.type == "cpu"


@pytest.mark.parametrize("kwargs, message", [
    ({"sampler": "euler"}, "sampler"),
    ({"variance": "small"}, "unknown variance 'small'"),
    ({"variance": "learned"}, r"outputs 1 channel\(s\) for 1-channel images; expected 2"),
    ({"prediction": "score"}, "unknown prediction 'score'"),
    ({"spacing": "leading"}, "spacing"),
    ({"steps": 0}, "steps"),
    ({"steps": 31}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"steps": True}, "steps"),
    ({"sampler": "ddim", "eta": -0.1}, "eta"),
    ({"sampler": "ddim", "eta": 1.5}, "eta"),
    ({"sampler": "ddim", "eta": float("nan")}, "eta"),
    ({"sampler": "ddpm", "eta": 0.5}, "eta"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"guidance_scale": 1.0}, "labels"),
    ({"classifier_scale": 1.0}, "classifier"),
    ({"classifier": lambda x, t: x.flatten(1), "classifier_scale": 1.0}, "labels"),
    ({"labels": torch.zeros(2, dtype=torch.int32)}, "labels"),
    ({"labels": torch.zeros(3, dtype=torch.int64)}, "labels"),
    ({"dtype": torch.int64}, "dtype"),
])
def test_invalid_arguments_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sample(toy_eps_model(30), linear_schedule(30), (2, 1, 2, 2), **kwargs)


def test_invalid_shape_raises_config_error():
    for shape in [(0, 1, 2, 2), (2, -1, 2, 2), ()]:
        with pytest.raises(ConfigError, match="shape"):
            sample(toy_eps_model(30), linear_schedule(30), shape)


def test_every_sampler_name_is_accepted():
    for sampler in SAMPLER_NAMES:
        x0 = sample(toy_eps_model(30), linear_schedule(30), (2, 1, 2, 2), sampler=sampler, steps=4)
        assert x0.shape == (2, 1, 2, 2)


# --- prediction targets and the learned variance -------------------------------------------------

def as_target(eps_model, schedule, prediction):
    """The x0 or v predictor that the noise predictor ``eps_model`` implies (eq. 4; v of Salimans & Ho)."""
    def model(x_t, t):
        eps = eps_model(x_t, t)
        abar = schedule.alpha_bars[t].to(x_t.dtype).view(-1, 1, 1, 1)
        x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        return x0 if prediction == "x0" else abar.sqrt() * eps - (1 - abar).sqrt() * x0

    return model


@pytest.mark.parametrize("prediction", ["x0", "v"])
@pytest.mark.parametrize("kwargs", SAMPLER_KWARGS + [{"sampler": "ddpm", "variance": "posterior"}], ids=str)
@pytest.mark.parametrize("clip_denoised", [False, True])
def test_every_sampler_gives_the_same_samples_from_the_exact_x0_or_v_predictor(prediction, kwargs, clip_denoised):
    schedule = SCHEDULES["cosine"]
    eps_model = gaussian_eps_model(schedule)
    callbacks = {}
    runs = [
        sample(model, schedule, (200, 1, 1, 1), steps=20, dtype=torch.float64, clip_denoised=clip_denoised,
               prediction=name, callback=callbacks.setdefault(name, []).append,
               generator=torch.Generator().manual_seed(8), **kwargs)
        for name, model in (("eps", eps_model), (prediction, as_target(eps_model, schedule, prediction)))
    ]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(callbacks[prediction][-2]["x0_pred"], callbacks["eps"][-2]["x0_pred"], rtol=1e-7, atol=1e-7)
    assert abs(runs[0].mean().item() - MU) < 0.15  # and they are samples of the Gaussian


def with_variance_values(model, value):
    """A learned-variance model: ``model``'s prediction, then constant variance values."""
    return lambda x_t, t: torch.cat([model(x_t, t), torch.full_like(x_t, value)], dim=1)


@pytest.mark.parametrize("steps", [1000, 25])
@pytest.mark.parametrize(("value", "fixed"), [(1.0, "beta"), (-1.0, "posterior")])
def test_a_learned_variance_at_its_ends_reproduces_the_fixed_variances(steps, value, fixed):
    # Eq. 15 interpolates between the respaced schedule's log beta (values 1) and log beta-tilde
    # (values -1), so the two ends are ancestral sampling with those variances, step by step.
    schedule, model, shape = SCHEDULES["linear"], toy_eps_model(1000), (3, 1, 2, 2)
    runs = [
        sample(m, schedule, shape, steps=steps, variance=variance, dtype=torch.float64,
               generator=torch.Generator().manual_seed(3))
        for m, variance in ((with_variance_values(model, value), "learned"), (model, fixed))
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-12)
    between = sample(with_variance_values(model, 0.0), schedule, shape, steps=steps, variance="learned",
                     dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert (between - runs[1]).abs().max() > 1e-4


@pytest.mark.parametrize("kwargs", SAMPLER_KWARGS[1:], ids=lambda k: k["sampler"])
def test_ddim_and_dpm_solver_ignore_the_learned_variance(kwargs):
    schedule, model, shape = SCHEDULES["cosine"], toy_eps_model(1000), (3, 1, 2, 2)
    runs = [
        sample(m, schedule, shape, steps=10, generator=torch.Generator().manual_seed(2), **kwargs, **extra)
        for m, extra in ((with_variance_values(model, 0.7), {"variance": "learned"}), (model, {}))
    ]
    assert torch.equal(runs[0], runs[1])


def test_a_model_with_a_learned_variance_must_be_sampled_with_it():
    model = with_variance_values(toy_eps_model(20), 0.0)
    with pytest.raises(ConfigError, match=r"outputs 2 channel\(s\) for 1-channel images; expected 1"):
        sample(model, linear_schedule(20, 1e-4, 0.02), (2, 1, 2, 2), steps=3)


# --- sample_batches -----------------------------------------------------------------------------

def test_batch_k_does_not_depend_on_where_the_run_starts():
    model, schedule = toy_eps_model(30), linear_schedule(30)
    kwargs = {"seed": 11, "sampler": "ddim", "eta": 1.0, "steps": 5}
    full = list(sample_batches(model, schedule, 10, 4, (1, 2, 2), **kwargs))
    resumed = list(sample_batches(model, schedule, 10, 4, (1, 2, 2), start_batch=2, **kwargs))
    assert [len(batch) for batch in full] == [4, 4, 2]
    assert len(resumed) == 1 and torch.equal(resumed[0], full[2])
    alone = sample(model, schedule, (4, 1, 2, 2), generator=seeded_generator(11, 1),
                   **{k: v for k, v in kwargs.items() if k != "seed"})
    assert torch.equal(alone, full[1])
    assert not torch.allclose(full[0], full[1])


def test_sample_batches_slices_the_labels():
    seen = []

    def model(x, t, y):
        seen.append(y.tolist())
        return torch.zeros_like(x)

    labels = torch.arange(5, dtype=torch.int64)
    batches = sample_batches(model, linear_schedule(30), 5, 2, (1, 1, 1), seed=0, start_batch=1, labels=labels,
                             steps=1)
    assert [len(batch) for batch in batches] == [2, 1]
    assert seen == [[2, 3], [4]]


@pytest.mark.parametrize("kwargs", [
    {"num": 0}, {"batch_size": 0}, {"start_batch": -1}, {"start_batch": 4},
    {"labels": torch.zeros(9, dtype=torch.int64)},
])
def test_sample_batches_checks_its_arguments_when_called(kwargs):
    arguments = {"num": 10, "batch_size": 4, "start_batch": 0, **kwargs}
    with pytest.raises(ConfigError):
        sample_batches(toy_eps_model(30), linear_schedule(30), image_shape=(1, 2, 2), seed=0, **arguments)
