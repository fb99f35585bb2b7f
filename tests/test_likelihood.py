"""The likelihood bound (likelihood.py) and its terms (objectives.py), against independent oracles.

* normal_kl against numerical integration of p log(p / q);
* the discretized decoder against mpmath's normal CDF at 1000 digits (tails included), and
  its 256 bin masses summing to one;
* the bound of 8-bit data drawn from N(MU, SD^2), with the exact noise predictor of the
  continuous Gaussian: its prior has a closed form, each KL term a closed form in the
  data's second moment (the expectation over the noise taken exactly), and the decoder an
  expectation over one Gaussian that quadrature computes; the whole must lie above the
  data's exact entropy (the NLL of the discretized Gaussian) and approach it as T grows.
"""

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.stats import norm

from conftest import tiny_config
from ddpmkit import ConfigError, NoiseSchedule, cosine_schedule, nll
from ddpmkit.checkpoint import load_trained_model
from ddpmkit.cli import main
from ddpmkit.likelihood import bound_terms, model_nll
from ddpmkit.objectives import discretized_gaussian_log_likelihood, normal_kl
from ddpmkit.training import train

MU, SD = 0.4, 0.25  # P(x0 > 1) = 0.8%: the top edge bin is exercised
LEVELS = np.arange(256) / 127.5 - 1


def gaussian_data(count, seed=0):
    """8-bit images of N(MU, SD^2) pixels: clipped to [-1, 1] and rounded to the 256 levels."""
    x = MU + SD * torch.randn(count, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def exact_eps_model(schedule, output="eps"):
    """E[eps | x_t] for x0 ~ N(MU, SD^2), as eps, or turned into the x0 or v it implies."""
    def model(x_t, t):
        abar = schedule.alpha_bars[t].to(x_t.dtype).view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        eps = s * (x_t - a * MU) / (abar * SD**2 + s**2)
        return {"eps": eps, "x0": (x_t - s * eps) / a, "v": a * eps - s * (x_t - s * eps) / a}[output]

    return model


def bin_masses():
    """P(level) of the discretized, clipped N(MU, SD^2): the data's exact distribution."""
    lower = np.r_[-np.inf, LEVELS[1:] - 1 / 255]
    upper = np.r_[LEVELS[:-1] + 1 / 255, np.inf]
    return norm.cdf(upper, MU, SD) - norm.cdf(lower, MU, SD)


def exact_entropy_bits():
    p = bin_masses()
    return float(-(p[p > 0] * np.log2(p[p > 0])).sum())


# --- the terms ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("m1", "v1", "m2", "v2"), [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0), (1.0, 0.01, 0.9, 0.04)])
def test_normal_kl_is_the_integral_of_p_log_p_over_q(m1, v1, m2, v2):
    p, q = norm(m1, math.sqrt(v1)), norm(m2, math.sqrt(v2))
    expected, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), m1 - 12 * math.sqrt(v1), m1 + 12 * math.sqrt(v1))
    got = normal_kl(*(torch.tensor(value, dtype=torch.float64) for value in (m1, math.log(v1), m2, math.log(v2))))
    assert got.item() == pytest.approx(expected, rel=1e-8, abs=1e-12)


def _mpmath_log_mass(x, mean, std):
    """log(Phi(upper) - Phi(lower)) of x's bin, naively, at 1000 digits: enough for 1 - Phi
    to keep the masses of these tails (down to 1e-315)."""
    with mpmath.workdps(1000):
        cdf = lambda z: mpmath.ncdf((z - mpmath.mpf(mean)) / mpmath.mpf(std))  # noqa: E731
        lower = 0 if x < -0.999 else cdf(mpmath.mpf(x) - mpmath.mpf(1) / 255)
        upper = 1 if x > 0.999 else cdf(mpmath.mpf(x) + mpmath.mpf(1) / 255)
        return float(mpmath.log(upper - lower))


@pytest.mark.parametrize(("x", "mean", "std"), [
    (0.0, 0.0, 0.01),  # the bin around the mean
    (LEVELS[140], 0.05, 0.02),
    (-1.0, -0.98, 0.05),  # the bottom edge bin, extended to -inf
    (1.0, 0.9, 0.1),  # the top edge bin, extended to +inf
    (LEVELS[200], -0.5, 0.05),  # far in the right tail: 1 - Phi cancels to 0 in float64
    (LEVELS[10], 0.5, 0.05),  # far in the left tail
    (1.0, -0.9, 0.05),  # the top edge bin, far away
])
def test_discretized_decoder_is_the_normal_mass_of_the_bin(x, mean, std):
    got = discretized_gaussian_log_likelihood(*(torch.tensor([value], dtype=torch.float64) for value in (x, mean, 2 * math.log(std))))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_mpmath_log_mass(x, mean, std), rel=1e-9)


def test_discretized_decoder_masses_sum_to_one_and_have_finite_gradients():
    levels = torch.tensor(LEVELS)
    for mean, std in ((0.0, 0.3), (0.97, 0.004), (-1.2, 0.5)):
        log_p = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, 2 * math.log(std)))
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    mean = torch.zeros(256, dtype=torch.float64, requires_grad=True)
    log_variance = torch.full((256,), -6.0, dtype=torch.float64, requires_grad=True)
    discretized_gaussian_log_likelihood(levels, mean, log_variance).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_variance.grad).all()


# --- the bound of Gaussian data ---------------------------------------------------------------------

def closed_form_kl_terms(schedule, x0):
    """L_{t-1} per dimension, in bits, for t = 2 .. T, with sigma_t^2 = beta_t: the KL of two
    Gaussians whose means differ by c (x0 - x0_hat), c = beta_t sqrt(abar_{t-1}) / (1 - abar_t),
    x0_hat = MU + k (x_t - a MU), k = a SD^2 / (a^2 SD^2 + s^2), so that over the noise
    E (x0 - x0_hat)^2 = (1 - k a)^2 (x0 - MU)^2 + k^2 s^2, averaged over the data."""
    second_moment = ((x0 - MU) ** 2).mean().item()
    abar, abar_prev, beta = (values.numpy() for values in (schedule.alpha_bars, schedule.alpha_bars_prev, schedule.betas))
    a, s2 = np.sqrt(abar), 1 - abar
    k = a * SD**2 / (abar * SD**2 + s2)
    mean_gap = (beta * np.sqrt(abar_prev) / s2) ** 2 * ((1 - k * a) ** 2 * second_moment + k**2 * s2)
    tilde = (1 - abar_prev) / s2 * beta
    kl = 0.5 * (np.log(beta[1:] / tilde[1:]) + tilde[1:] / beta[1:] - 1 + mean_gap[1:] / beta[1:])
    return kl / math.log(2)


def quadrature_decoder(schedule, x0):
    """E over x_1 ~ q(x_1 | x0) of -log p(x0 | x_1), in bits per dimension, by Gauss-Hermite
    quadrature over the noise, for each level present in the data."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    a, s2, beta = schedule.alpha_bars[0].item() ** 0.5, 1 - schedule.alpha_bars[0].item(), schedule.betas[0].item()
    k = a * SD**2 / (a**2 * SD**2 + s2)
    values, counts = np.unique(x0.numpy().round(6), return_counts=True)
    total = 0.0
    for value, count in zip(values, counts):
        x1 = a * value + math.sqrt(s2) * nodes
        mean = MU + k * (x1 - a * MU)
        upper = np.inf if value > 0.999 else (value + 1 / 255 - mean) / math.sqrt(beta)
        lower = -np.inf if value < -0.999 else (value - 1 / 255 - mean) / math.sqrt(beta)
        # Right of the mean, the same mass from the upper tail, where 1 - Phi does not round to 0.
        mass = np.where(lower > 0, norm.sf(lower) - norm.sf(upper), norm.cdf(upper) - norm.cdf(lower))
        total += count * -(weights * np.log(mass)).sum()
    return total / counts.sum() / math.log(2)


def test_the_bound_of_gaussian_data_matches_its_closed_forms():
    # Constant betas of 0.02 over 50 steps leave abar_T = 0.36: the prior is a large term.
    schedule, x0 = NoiseSchedule(torch.full((50,), 0.02)), gaussian_data(512)
    rows = bound_terms(exact_eps_model(schedule), schedule, x0, variance="beta", prediction="eps",
                       generator=torch.Generator().manual_seed(1))
    result = nll(exact_eps_model(schedule), schedule, x0, generator=torch.Generator().manual_seed(1))  # the same draws
    standard_errors = rows.std(dim=0) / math.sqrt(len(rows))
    abar_T = schedule.alpha_bars[-1].item()
    prior = 0.5 * ((1 - abar_T) + abar_T * (x0**2).mean().item() - 1 - math.log(1 - abar_T)) / math.log(2)
    assert result.prior == pytest.approx(prior, rel=1e-9)
    kl = closed_form_kl_terms(schedule, x0)
    assert len(result.terms) == 49
    assert np.all(np.abs(np.array(result.terms) - kl) < 5 * standard_errors[1:-1].numpy() + 1e-9)
    total_kl_error = (rows[:, 1:-1].sum(dim=1).std() / math.sqrt(len(rows))).item()
    assert abs(sum(result.terms) - kl.sum()) < 5 * total_kl_error
    decoder = quadrature_decoder(schedule, x0)
    assert abs(result.decoder - decoder) < 5 * standard_errors[0].item()
    assert result.bits_per_dim == pytest.approx(result.prior + sum(result.terms) + result.decoder, rel=1e-12)
    assert abs(result.bits_per_dim - (prior + kl.sum() + decoder)) < 5 * result.standard_error
    assert prior > 8 * result.standard_error  # so that a bound without its prior would fail the line above
    assert result.num_images == 512 and result.standard_error == pytest.approx(rows.sum(dim=1).std().item() / math.sqrt(512))
    batched = nll(exact_eps_model(schedule), schedule, x0, generator=torch.Generator().manual_seed(5), batch_size=200)
    assert abs(batched.bits_per_dim - result.bits_per_dim) < 5 * result.standard_error


def test_the_bound_approaches_the_exact_nll_from_above_as_t_grows():
    # With fixed variances and this exact predictor the gap closes as the steps get finer, as
    # long as beta_1 stays of the order of the squared bin width (1/127.5)^2: the cosine
    # schedule's beta_1 is 4e-5 at T = 1000 (measured: at T = 3000, 1.3e-5, the gap grows again,
    # since q(x_1 | x0) then is far narrower than the decoder's bin).
    x0, entropy = gaussian_data(256), exact_entropy_bits()
    bounds = []
    for steps in (10, 100, 1000):
        schedule = cosine_schedule(steps)
        bounds.append(nll(exact_eps_model(schedule), schedule, x0, generator=torch.Generator().manual_seed(2)).bits_per_dim)
    assert bounds == sorted(bounds, reverse=True)
    assert bounds[-1] > entropy and bounds[-1] - entropy < 0.08 and bounds[0] - entropy > 0.2, (bounds, entropy)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_every_target_gives_the_bound_of_the_eps_predictor(prediction):
    schedule, x0 = cosine_schedule(50), gaussian_data(64)
    bounds = [nll(exact_eps_model(schedule, output), schedule, x0, prediction=output, generator=torch.Generator().manual_seed(3))
              for output in ("eps", prediction)]
    assert bounds[1].bits_per_dim == pytest.approx(bounds[0].bits_per_dim, rel=1e-5)
    assert bounds[1].terms == pytest.approx(bounds[0].terms, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize(("value", "fixed"), [(1.0, "beta"), (-1.0, "posterior")])
def test_a_learned_variance_at_its_ends_is_the_fixed_variance(value, fixed):
    schedule, x0 = cosine_schedule(50), gaussian_data(64)
    eps = exact_eps_model(schedule)
    learned = nll(lambda x, t: torch.cat([eps(x, t), torch.full_like(x, value)], dim=1), schedule, x0,
                  variance="learned", generator=torch.Generator().manual_seed(4))
    expected = nll(eps, schedule, x0, variance=fixed, generator=torch.Generator().manual_seed(4))
    assert learned.bits_per_dim == pytest.approx(expected.bits_per_dim, rel=1e-12)
    assert learned.decoder == pytest.approx(expected.decoder, rel=1e-12)
    other = nll(eps, schedule, x0, variance="posterior" if fixed == "beta" else "beta", generator=torch.Generator().manual_seed(4))
    assert abs(other.bits_per_dim - expected.bits_per_dim) > 0.01


@pytest.mark.parametrize(("images", "kwargs", "message"), [
    (gaussian_data(2) + 0.001, {}, "256 levels"),
    (gaussian_data(2) * 2, {}, "256 levels"),
    (torch.zeros(2, 4, 4), {}, r"\(N, C, H, W\)"),
    (gaussian_data(2), {"batch_size": 0}, "batch_size must be >= 1"),
    (gaussian_data(2), {"variance": "small"}, "unknown variance 'small'"),
    (gaussian_data(2), {"prediction": "score"}, "unknown prediction 'score'"),
    (gaussian_data(2), {"variance": "learned"}, "outputs 1 channel"),
])
def test_bad_arguments_get_one_clear_line(images, kwargs, message):
    schedule = cosine_schedule(5)
    with pytest.raises(ConfigError, match=message):
        nll(exact_eps_model(schedule), schedule, images, **kwargs)


# --- a trained model: ddpm nll -------------------------------------------------------------------------

def test_ddpm_nll_writes_json_and_plot_and_resumes(tiny_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "nll.json"
    arguments = ["nll", str(tiny_run), "--split", "test", "--num", "3", "--batch-size", "2", "--out", str(out), "--no-progress"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    result = __import__("json").loads(out.read_text())
    assert f"{result['bits_per_dim']:.4f}" in printed and out.with_suffix(".png").is_file()
    assert result["num_images"] == 3 and len(result["terms"]) == 49 and result["settings"]["split"] == "test"
    assert result["settings"]["prediction"] == "eps" and result["settings"]["variance"] == "beta"
    # Run again: both batches are stored, so the model is not called; the result is the same.
    trained = load_trained_model(tiny_run)
    monkeypatch.setattr("ddpmkit.likelihood.bound_terms", lambda *a, **k: pytest.fail("evaluated again"))
    again = model_nll(trained, split="test", num=3, batch_size=2, work_dir=tmp_path / "nll-work")
    assert again["bits_per_dim"] == result["bits_per_dim"]


def test_a_learned_variance_run_is_evaluated_with_its_own_variance(folder_dataset, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(folder_dataset, learn_variance=True, prediction="v", max_steps=2, preview_images=0), run, progress=False)
    trained = load_trained_model(run)
    result = model_nll(trained, split="test", num=2, batch_size=2)
    assert result["settings"]["variance"] == "learned" and result["settings"]["prediction"] == "v"
    assert math.isfinite(result["bits_per_dim"]) and result["bits_per_dim"] > 0
    with pytest.raises(ConfigError, match="learns its variance"):
        model_nll(trained, split="test", num=2, variance="beta")
