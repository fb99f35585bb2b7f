"""Algorithm 1's draw and loss (objectives.py), against closed forms, and as training uses them; the
other targets, min-SNR weighting and the hybrid loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_config
from ddpmkit import ConfigError, cosine_schedule, ddpm_loss, linear_schedule
from ddpmkit.data import load_dataset
from ddpmkit.images import to_model_range
from ddpmkit.objectives import (
    discretized_gaussian_log_likelihood,
    draw_timesteps_and_noise,
    min_snr_weight,
    prediction_target,
)
from ddpmkit.rng import TrainingStream, seeded_generator
from ddpmkit.training import model_config_for, train
from ddpmkit.unet import UNet


class Recorder:
    """A noise predictor that returns a fixed tensor and records what it was called with."""

    def __init__(self, output: torch.Tensor) -> None:
        self.output, self.calls = output, []

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        self.calls.append(args)
        return self.output


def test_ddpm_loss_is_the_squared_error_on_the_noise_at_x_t_of_eq_4():
    schedule = linear_schedule(100)
    generator = torch.Generator().manual_seed(0)
    x0, noise, output = (torch.randn((3, 1, 2, 2), generator=generator) for _ in range(3))
    t = torch.tensor([0, 50, 99])
    model = Recorder(output)
    loss = ddpm_loss(model, schedule, x0, t, noise)
    ((x_t, t_seen),) = model.calls
    abar = schedule.alpha_bars[t].float()[:, None, None, None]
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)  # eq. 4
    assert torch.equal(t_seen, t)
    assert loss.item() == pytest.approx(((output - noise) ** 2).mean().item(), rel=1e-6)  # eq. 14
    summed = ddpm_loss(model, schedule, x0, t, noise, reduction="sum")
    assert summed.item() == pytest.approx(((output - noise) ** 2).sum().item(), rel=1e-6)


def test_ddpm_loss_passes_labels_to_a_conditional_model_only_when_given():
    schedule = linear_schedule(30)
    model = Recorder(torch.zeros(2, 1, 2, 2))
    x0, noise, t = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2), torch.tensor([1, 2])
    ddpm_loss(model, schedule, x0, t, noise)
    ddpm_loss(model, schedule, x0, t, noise, torch.tensor([4, -1]))
    assert [len(call) for call in model.calls] == [2, 3] and model.calls[1][2].tolist() == [4, -1]


def test_the_draw_is_uniform_indices_then_gaussian_noise_from_one_generator():
    schedule = cosine_schedule(7)  # any schedule of 7 steps
    t, noise = draw_timesteps_and_noise(schedule, (4000, 1, 2, 2), torch.Generator().manual_seed(3))
    reference = torch.Generator().manual_seed(3)
    assert torch.equal(t, torch.randint(0, 7, (4000,), generator=reference))
    assert torch.equal(noise, torch.randn((4000, 1, 2, 2), generator=reference))
    assert t.dtype == torch.int64 and set(t.tolist()) == set(range(7))


def test_training_logs_ddpm_loss_of_its_first_step(folder_dataset, tmp_path):
    """The first logged loss is ddpm_loss of the initial model on the first batch, rebuilt
    from the seeded streams: this pins what training draws and what it minimises."""
    config = tiny_config(folder_dataset, max_steps=1, preview_images=0, cpu_workers=1)
    train(config, tmp_path / "run", progress=False)
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]

    train_set = load_dataset(config.dataset, "train", image_size=8, channels=1, seed=config.seed)
    order = torch.randperm(len(train_set), generator=seeded_generator(config.seed, TrainingStream.EPOCH_ORDER, 0))
    batch = order[: config.batch_size]
    schedule = linear_schedule(config.num_steps)
    t, noise = draw_timesteps_and_noise(schedule, (config.batch_size, 1, 8, 8), seeded_generator(config.seed, TrainingStream.STEP, 1))
    torch.manual_seed(config.seed)
    model = UNet.from_config(model_config_for(config, 1, 2))
    with torch.no_grad():
        expected = ddpm_loss(model, schedule, to_model_range(train_set.images[batch]), t, noise).item()
    assert math.isfinite(expected) and logged == pytest.approx(expected, rel=1e-5)


# --- targets, min-SNR weighting and the hybrid loss --------------------------------------------

def _draw(schedule, shape=(6, 1, 2, 2), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=generator) * 2 - 1
    noise = torch.randn(shape, generator=generator)
    return x0, noise, torch.linspace(0, schedule.num_steps - 1, shape[0]).long()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_each_target_is_fitted_by_its_squared_error(prediction):
    schedule = cosine_schedule(100)
    x0, noise, t = _draw(schedule)
    output = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    abar = schedule.alpha_bars[t].float().view(-1, 1, 1, 1)
    target = {"eps": noise, "x0": x0, "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[prediction]
    assert torch.allclose(prediction_target(schedule, prediction, x0, t, noise), target, atol=1e-6)
    loss = ddpm_loss(Recorder(output), schedule, x0, t, noise, prediction=prediction)
    assert loss.item() == pytest.approx(((output - target) ** 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_weights_every_target_as_min_snr_gamma_times_the_x0_error(prediction, gamma):
    # Hang et al.: the loss is min(SNR, gamma) |x0 - x0_hat|^2 whatever the target. An
    # independent check: perturb x0_hat at fixed x_t, read the perturbation in each target's
    # units through the schedule's conversions, and compare weight x error with that.
    schedule = linear_schedule()
    t = torch.tensor([0, 10, 100, 400, 999])
    x0 = torch.full((5, 1, 1, 1), 0.3, dtype=torch.float64)
    noise = torch.full_like(x0, -0.7)
    x_t = schedule.q_sample(x0, t, noise)
    x0_hat = x0 + 0.01
    eps_hat = schedule.predict_eps_from_x0(x_t, t, x0_hat)
    predicted = {"eps": eps_hat, "x0": x0_hat, "v": schedule.velocity(x0_hat, t, eps_hat)}[prediction]
    target = prediction_target(schedule, prediction, x0, t, noise)
    weighted = min_snr_weight(schedule, t, prediction, gamma).double() * ((predicted - target) ** 2).flatten()
    snr = schedule.alpha_bars[t] / (1 - schedule.alpha_bars[t])
    torch.testing.assert_close(weighted, torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) * 1e-4, rtol=1e-5, atol=0)


def test_min_snr_loss_weights_each_row_and_none_is_the_plain_mse():
    schedule = linear_schedule(100)
    x0, noise, t = _draw(schedule)
    output = torch.zeros_like(x0)
    plain = ddpm_loss(Recorder(output), schedule, x0, t, noise, loss_weighting="none")
    assert torch.equal(plain, ddpm_loss(Recorder(output), schedule, x0, t, noise))
    weighted = ddpm_loss(Recorder(output), schedule, x0, t, noise, loss_weighting="min-snr", min_snr_gamma=2.0, reduction="sum")
    rows = ((output - noise) ** 2).flatten(1).sum(1)
    assert weighted.item() == pytest.approx((min_snr_weight(schedule, t, "eps", 2.0) * rows).sum().item(), rel=1e-6)
    assert weighted.item() < rows.sum().item()  # at low t, SNR > gamma: weights below 1


class SplitOutput(torch.nn.Module):
    """A model whose output is its two parameters, prediction and variance values, broadcast."""

    def __init__(self, prediction, values):
        super().__init__()
        self.prediction, self.values = torch.nn.Parameter(prediction), torch.nn.Parameter(values)

    def forward(self, x_t, t):
        return torch.cat([self.prediction, self.values], dim=1)


def test_the_hybrid_loss_is_l_simple_plus_lambda_t_times_the_step_term_with_the_mean_gradient_stopped():
    schedule = cosine_schedule(50)
    x0 = (torch.randint(0, 256, (4, 1, 2, 2), generator=torch.Generator().manual_seed(1)) / 127.5 - 1).float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 1, 25, 49])
    model = SplitOutput(0.1 * torch.randn(x0.shape), torch.full(x0.shape, 0.3))
    loss = ddpm_loss(model, schedule, x0, t, noise, learn_variance=True, reduction="sum")
    # L_{t-1} written out with the closed form of the KL of two normals, and the decoder at t = 1.
    x_t = schedule.q_sample(x0.double(), t, noise.double())
    eps = model.prediction.detach().double()
    log_variance = schedule.learned_log_variance(torch.full(x0.shape, 0.3, dtype=torch.float64), t)
    mean = schedule.q_posterior(schedule.predict_x0_from_eps(x_t, t, eps), x_t, t)[0]
    true_mean, true_variance = schedule.q_posterior(x0.double(), x_t, t)
    variance = log_variance.exp()
    kl = (0.5 * (torch.log(variance / true_variance) + true_variance / variance - 1 + (true_mean - mean) ** 2 / variance))[1:]
    decoder = -discretized_gaussian_log_likelihood(x0[:1], mean[:1], log_variance[:1])
    vlb_bits = (torch.cat([decoder, kl]) / math.log(2)).sum()
    simple = ((model.prediction.detach() - noise) ** 2).sum()
    assert loss.item() == pytest.approx(simple.item() + 0.001 * 50 * vlb_bits.item(), rel=1e-5)
    loss.backward()
    # The gradient on the prediction is L_simple's alone; the variance values get L_vlb's.
    torch.testing.assert_close(model.prediction.grad, 2 * (model.prediction.detach() - noise))
    assert model.values.grad.abs().min() > 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prediction": "score"}, "unknown prediction 'score'; choose one of eps, x0, v"),
    ({"loss_weighting": "snr"}, "unknown loss_weighting 'snr'"),
    ({"loss_weighting": "min-snr", "min_snr_gamma": 0.0}, "min_snr_gamma must be > 0"),
    ({"learn_variance": True}, "outputs 1 channel"),
])
def test_bad_objectives_get_one_clear_line(kwargs, message):
    schedule = linear_schedule(30)
    x0, noise, t = _draw(schedule)
    with pytest.raises(ConfigError, match=message):
        ddpm_loss(Recorder(torch.zeros_like(x0)), schedule, x0, t, noise, **kwargs)
