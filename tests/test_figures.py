"""The forward- and reverse-process figures: what the frames hold, and the PNGs and CLI around them."""

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit import ConfigError
from ddpmkit.cli import main
from ddpmkit.figures import (
    across_classes,
    evenly_spaced,
    forward_process_figure,
    forward_process_frames,
    plot_metrics,
    reverse_process_frames,
)
from ddpmkit.rng import seeded_generator
from ddpmkit.samplers import sample, timestep_indices
from ddpmkit.schedules import make_schedule


def _assert_drawn_png(path, min_size=(200, 100)):
    """A real picture: a PNG of at least min_size pixels with more than flat content."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture = Image.open(path)
    assert picture.size[0] >= min_size[0] and picture.size[1] >= min_size[1]
    pixels = np.asarray(picture.convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 20


def test_evenly_spaced_includes_both_ends():
    assert evenly_spaced(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert evenly_spaced(50, 2) == [0, 49]
    assert evenly_spaced(4, 10) == [0, 1, 2, 3]
    assert evenly_spaced(7, 1) == [6]
    with pytest.raises(ConfigError):
        evenly_spaced(0, 3)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_forward_frames_go_from_the_image_to_pure_noise(name):
    schedule = make_schedule(name, 1000)
    generator = torch.Generator().manual_seed(5)
    x0 = (torch.rand(16, 1, 16, 16, generator=generator) > 0.7).float() * 2 - 1  # binary "digits" in {-1, 1}
    indices = evenly_spaced(1000, 5)
    frames = forward_process_frames(x0, schedule, indices, seed=3)
    assert frames.shape == (16, 5, 1, 16, 16)
    # t = 1: abar_1 >= 0.9999, so the frame is the image up to noise of std <= 0.01.
    assert (frames[:, 0] - x0).abs().max() < 0.06
    # t = T: abar_T < 1e-4: unit-variance noise, uncorrelated with the image.
    last = frames[:, -1].flatten()
    assert abs(float(last.std()) - 1.0) < 0.05 and abs(float(last.mean())) < 0.05
    assert abs(float(np.corrcoef(last.numpy(), x0.flatten().numpy())[0, 1])) < 0.05
    # Every frame is eq. 4 exactly, with one seeded noise draw shared by all frames.
    noise = torch.randn(x0.shape, generator=seeded_generator(3))
    middle = indices[2]
    abar = schedule.alpha_bars[middle].float()
    assert torch.allclose(frames[:, 2], abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)


def test_forward_figure_writes_a_strip_per_schedule_and_the_alpha_bars(tmp_path):
    images = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    images[:, :, 2:6, 3:5] = 255
    schedules = [make_schedule("linear", 100), make_schedule("cosine", 100)]
    paths = forward_process_figure(images, schedules, tmp_path / "figs", num_frames=6)
    assert [p.name for p in paths] == ["forward-linear.png", "forward-cosine.png", "alpha-bars.png"]
    for path in paths:
        _assert_drawn_png(path)


class CountingModel:
    """eps = x / 2: a fixed noise predictor that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return 0.5 * x


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++", "dpm-solver++-sde"])
def test_reverse_frames_come_from_the_sampler_callback(sampler):
    schedule = make_schedule("linear", 40)
    model = CountingModel()
    indices, states, predictions = reverse_process_frames(
        model, schedule, (1, 4, 4), num_images=3, num_frames=4, seed=7, sampler=sampler, steps=10
    )
    assert model.calls == 10  # one ordinary sampling run of 10 evaluations, no loop of its own
    visited = timestep_indices(40, 10, "trailing").tolist()
    assert indices == [visited[i] for i in (0, 3, 6, 9)]
    assert states.shape == predictions.shape == (3, 4, 1, 4, 4)
    # The first x_t is the initial noise x_T of the seed; the last x0 is the sample returned.
    assert torch.equal(states[:, 0], torch.randn((3, 1, 4, 4), generator=seeded_generator(7)))
    returned = sample(CountingModel(), schedule, (3, 1, 4, 4), sampler=sampler, steps=10, generator=seeded_generator(7))
    assert torch.equal(predictions[:, -1], returned)


def test_figures_commands_end_to_end(folder_dataset, tiny_run, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["figures", "forward", "--dataset", f"folder:{folder_dataset}", "--schedule", "linear,cosine",
                 "--num-steps", "50", "--num-images", "2", "--frames", "5", "--out", str(out)]) == 0
    for name in ("forward-linear.png", "forward-cosine.png", "alpha-bars.png"):
        _assert_drawn_png(out / name)
    assert main(["figures", "reverse", str(tiny_run), "--sampler", "ddim", "--steps", "5", "--frames", "3",
                 "--num-images", "2", "--device", "cpu"]) == 0
    _assert_drawn_png(tiny_run / "reverse-ddim-5.png")
    assert "reverse-ddim-5.png" in capsys.readouterr().out
    assert main(["figures", "forward", "--dataset", f"folder:{folder_dataset}", "--schedule", "linear,quadratic",
                 "--num-steps", "50", "--out", str(out)]) == 2
    assert "unknown schedule 'quadratic'" in capsys.readouterr().err


def test_across_classes_shows_every_class_before_any_twice():
    labels = torch.tensor([1, 1, 0, 2, 0, 1])
    assert across_classes(labels, 4) == [2, 0, 3, 4]  # the first 0, 1 and 2, then the second 0
    assert across_classes(labels, 12) == [2, 0, 3, 4, 1, 5]  # all there are


def test_a_run_with_one_logged_point_draws_that_point(tmp_path, monkeypatch):
    import matplotlib.axes

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "epoch": 0, "train_loss": 0.5}\n')
    markers = []
    real_plot = matplotlib.axes.Axes.plot

    def recording_plot(self, *args, **kwargs):
        markers.append(kwargs.get("marker"))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    plot_metrics(run)
    assert markers == ["o"]  # a line of one point is invisible without a marker
