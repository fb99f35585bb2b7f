"""Numeric oracles for the forward process (Ho et al. 2020; Nichol & Dhariwal 2021)."""

import math

import pytest
import torch

from ddpmkit import ConfigError, NoiseSchedule, cosine_schedule, linear_schedule, make_schedule
from ddpmkit.schedules import schedule_before_scaling


def test_linear_schedule_values_at_known_indices():
    schedule = linear_schedule()
    assert schedule.betas.dtype == torch.float64 and schedule.betas.shape == (1000,)
    assert schedule.betas[0].item() == pytest.approx(1e-4, abs=1e-15)  # beta_1
    assert schedule.betas[-1].item() == pytest.approx(0.02, abs=1e-15)  # beta_T
    assert schedule.betas[499].item() == pytest.approx(1e-4 + 499 * (0.02 - 1e-4) / 999, rel=1e-12)
    # abar_t = prod_{s<=t} (1 - beta_s), computed independently in log space.
    for index in (0, 9, 499, 999):
        expected = math.exp(sum(math.log1p(-1e-4 - k * (0.02 - 1e-4) / 999) for k in range(index + 1)))
        assert schedule.alpha_bars[index].item() == pytest.approx(expected, rel=1e-10)
    assert schedule.alpha_bars[-1].item() == pytest.approx(4.0358e-05, rel=1e-3)  # DDPM's abar_T


def test_linear_schedule_for_other_t_is_scaled_by_1000_over_t():
    # Improved DDPM's get_named_beta_schedule("linear", T): betas linear from 1e-4 * 1000/T to
    # 0.02 * 1000/T, so that abar_T stays near DDPM's 4.04e-5 (unscaled it is 0.08 at T = 250).
    assert torch.equal(linear_schedule(1000).betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))  # bit for bit
    for num_steps, abar_T in ((4000, 4.25e-5), (1000, 4.036e-5), (250, 3.26e-5), (100, 2.04e-5), (50, 7.74e-6)):
        schedule = linear_schedule(num_steps)
        scale = 1000 / num_steps
        assert schedule.betas[0].item() == pytest.approx(1e-4 * scale, rel=1e-12)
        assert schedule.betas[-1].item() == pytest.approx(0.02 * scale, rel=1e-12)
        expected = math.exp(sum(math.log1p(-scale * (1e-4 + k * (0.02 - 1e-4) / (num_steps - 1))) for k in range(num_steps)))
        assert schedule.alpha_bars[-1].item() == pytest.approx(expected, rel=1e-9)
        assert schedule.alpha_bars[-1].item() == pytest.approx(abar_T, rel=2e-3)
        assert make_schedule("linear", num_steps).identity() == schedule.identity()
    # Given endpoints are not scaled (diffusers' linear schedule, which never scales).
    unscaled = linear_schedule(250, 1e-4, 0.02)
    assert unscaled.alpha_bars[-1].item() == pytest.approx(0.0797, rel=1e-3)  # the 0.08: 28% of the signal left
    assert torch.equal(schedule_before_scaling("linear", 250).betas, unscaled.betas)
    assert torch.equal(schedule_before_scaling("cosine", 250).betas, cosine_schedule(250).betas)
    # T <= 20 would give beta_T >= 1: refused, unless the endpoints are given.
    assert linear_schedule(21).betas[-1].item() == pytest.approx(0.02 * 1000 / 21)
    with pytest.raises(ConfigError, match=r"needs T >= 21 \(T = 20 gives beta_T = 1\)"):
        linear_schedule(20)
    assert linear_schedule(20, 1e-4, 0.02).num_steps == 20


def test_identity_names_the_schedule_and_hashes_its_betas():
    import hashlib

    identity = linear_schedule().identity()
    assert identity == {"name": "linear", "num_steps": 1000,
                        "betas_sha256": hashlib.sha256(linear_schedule().betas.numpy().tobytes()).hexdigest()}
    assert identity["betas_sha256"] != linear_schedule(1000, 1e-4, 0.021).identity()["betas_sha256"]
    assert cosine_schedule(50).identity()["name"] == "cosine"


def test_cosine_schedule_follows_nichol_dhariwal_eq_17():
    schedule = cosine_schedule()
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for index in (0, 100, 500, 900):
        assert schedule.alpha_bars[index].item() == pytest.approx(f(index + 1) / f(0), rel=1e-9)
    assert schedule.betas.max().item() == pytest.approx(0.999)  # the clip at t = T
    assert schedule.betas[-1].item() == pytest.approx(0.999)
    assert 0 < schedule.alpha_bars[-1].item() < 1e-8  # abar_T of order 1e-9, not 0


def test_alphas_and_alpha_bars_prev():
    schedule = linear_schedule(30)
    assert torch.allclose(schedule.alphas, 1 - schedule.betas)
    assert schedule.alpha_bars_prev[0].item() == 1.0
    assert torch.equal(schedule.alpha_bars_prev[1:], schedule.alpha_bars[:-1])


def test_q_sample_marginal_matches_eq_4():
    schedule = cosine_schedule()
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    index = 300
    t = torch.full((x0.numel(),), index, dtype=torch.int64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_t = schedule.q_sample(x0, t, noise)
    abar = schedule.alpha_bars[index].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=5e-3)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=1e-2)


def test_q_sample_casts_to_input_dtype_and_broadcasts_per_example():
    schedule = linear_schedule()
    x0 = torch.ones(3, 1, 2, 2)
    t = torch.tensor([0, 500, 999])
    x_t = schedule.q_sample(x0, t, torch.zeros_like(x0))
    assert x_t.dtype == torch.float32
    for row, index in enumerate(t):
        assert torch.allclose(x_t[row], torch.full((1, 2, 2), schedule.alpha_bars[index].sqrt().item()))


def test_round_trip_x0_to_x_t_to_x0_with_true_noise_is_exact():
    schedule = linear_schedule()
    generator = torch.Generator().manual_seed(1)
    x0 = torch.rand(16, 1, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.randint(0, 1000, (16,), generator=generator)
    x_t = schedule.q_sample(x0, t, noise)
    assert torch.allclose(schedule.predict_x0_from_eps(x_t, t, noise), x0, atol=1e-9)
    assert torch.allclose(schedule.predict_eps_from_x0(x_t, t, x0), noise, atol=1e-9)


@pytest.mark.parametrize("make", [linear_schedule, cosine_schedule])
def test_eps_x0_and_v_round_trips_are_exact(make):
    # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho, section 4) from the true x0 and
    # eps; each prediction read back as eps gives the true noise, at every step.
    schedule = make()
    generator = torch.Generator().manual_seed(2)
    x0 = torch.rand(1000, 1, 2, 2, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.arange(1000)
    x_t = schedule.q_sample(x0, t, noise)
    abar = schedule.alpha_bars.view(-1, 1, 1, 1)
    v = schedule.velocity(x0, t, noise)
    torch.testing.assert_close(v, abar.sqrt() * noise - (1 - abar).sqrt() * x0, rtol=0, atol=1e-15)
    for prediction, output in (("eps", noise), ("x0", x0), ("v", v)):
        torch.testing.assert_close(schedule.predict_eps(prediction, x_t, t, output), noise, rtol=0, atol=1e-12 if prediction == "x0" else 1e-14)
    assert schedule.predict_eps("eps", x_t, t, noise) is noise  # eps is read as it is
    # Into x0 and back: the v target through eps to x0 recovers x0.
    torch.testing.assert_close(schedule.predict_x0_from_eps(x_t, t, schedule.predict_eps_from_v(x_t, t, v)), x0, rtol=0, atol=1e-9)
    with pytest.raises(ConfigError, match="unknown prediction 'score'; choose one of eps, x0, v"):
        schedule.predict_eps("score", x_t, t, noise)


def test_learned_log_variance_interpolates_between_beta_and_clipped_beta_tilde():
    schedule = cosine_schedule(20)
    t = torch.arange(20)
    ones = torch.ones(20, dtype=torch.float64)
    assert torch.equal(schedule.learned_log_variance(ones, t), schedule.betas.log())
    clipped = schedule.posterior_variances.clone()
    clipped[0] = schedule.posterior_variances[1]  # beta-tilde_1 = 0: improved-diffusion's clip
    assert torch.equal(schedule.learned_log_variance(-ones, t), clipped.log())
    middle = schedule.learned_log_variance(0 * ones, t)
    torch.testing.assert_close(middle.exp(), (schedule.betas * clipped).sqrt(), rtol=1e-12, atol=0)  # w = 1/2: geometric mean
    assert NoiseSchedule(torch.tensor([0.3])).clipped_log_posterior_variances.item() == pytest.approx(math.log(0.3))


@pytest.mark.parametrize("make", [linear_schedule, cosine_schedule])
def test_posterior_equals_bayes_rule_on_two_gaussians(make):
    # q(x_{t-1} | x_t, x0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1 - abar_{t-1}):
    # precision and mean by completing the square, independent of eqs. 6-7.
    schedule = make()
    x0, x_t = torch.tensor([0.3], dtype=torch.float64), torch.tensor([-0.8], dtype=torch.float64)
    for index in (1, 10, 500, 998):
        t = torch.tensor([index])
        alpha, beta = schedule.alphas[index].item(), schedule.betas[index].item()
        abar_prev = schedule.alpha_bars[index - 1].item()
        precision = alpha / beta + 1 / (1 - abar_prev)
        expected_mean = (math.sqrt(alpha) * -0.8 / beta + math.sqrt(abar_prev) * 0.3 / (1 - abar_prev)) / precision
        mean, variance = schedule.q_posterior(x0, x_t, t)
        assert variance.item() == pytest.approx(1 / precision, rel=1e-9)
        assert mean.item() == pytest.approx(expected_mean, rel=1e-9)
    _, variance_first = schedule.q_posterior(x0, x_t, torch.tensor([0]))
    assert variance_first.item() == 0.0  # beta-tilde_1 = 0: x0 is known exactly from x_1's posterior


def test_respace_keeps_alpha_bars_at_kept_steps():
    schedule = linear_schedule()
    indices = torch.tensor([0, 99, 399, 749, 999])
    respaced = schedule.respace(indices)
    assert respaced.num_steps == 5
    assert torch.allclose(respaced.alpha_bars, schedule.alpha_bars[indices], rtol=1e-12)
    assert torch.allclose(schedule.respace(torch.arange(1000)).betas, schedule.betas, rtol=1e-10)


@pytest.mark.parametrize(
    "build",
    [
        lambda: linear_schedule(0),
        lambda: linear_schedule(10, beta_start=0.03, beta_end=0.02),
        lambda: linear_schedule(10, beta_start=0.03, beta_end=1.0),
        lambda: linear_schedule(10),
        lambda: cosine_schedule(10, s=-1),
        lambda: make_schedule("quadratic"),
        lambda: NoiseSchedule(torch.tensor([0.5, 1.0])),
    ],
)
def test_invalid_schedules_raise_config_error(build):
    with pytest.raises(ConfigError):
        build()
