"""Algorithm 1's draw and loss (objectives.py), against closed forms, and as training uses them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_config
from ddpmkit import cosine_schedule, ddpm_loss, linear_schedule
from ddpmkit.data import load_dataset
from ddpmkit.images import to_model_range
from ddpmkit.objectives import draw_timesteps_and_noise
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
