"""``ddpm demo``: trains, samples, continues an interrupted run, refuses a foreign one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ddpmkit import demo
from ddpmkit.checkpoint import latest_checkpoint, load_checkpoint
from ddpmkit.errors import ConfigError
from ddpmkit.training import train


@pytest.fixture(autouse=True)
def cheap_sampler(monkeypatch):
    monkeypatch.setattr(demo, "DEMO_SAMPLER", {"sampler": "ddim", "steps": 2})


def test_demo_trains_samples_and_continues_when_run_again(tmp_path, capsys):
    run = tmp_path / "demo"
    grid = demo.run_demo(run, max_steps=2)
    assert grid == run / "samples.png"
    image = np.asarray(Image.open(grid))
    assert image.shape[0] == image.shape[1] > 8 * 28  # 8 x 8 digits, scaled
    assert load_checkpoint(latest_checkpoint(run)).state["step"] == 2
    assert f"sample grid {grid}" in capsys.readouterr().out

    demo.run_demo(run, max_steps=3)  # a second `make demo` continues instead of refusing
    assert load_checkpoint(latest_checkpoint(run)).state["step"] == 3
    assert json.loads((run / "config.json").read_text())["base_channels"] == demo.DEMO_CONFIG.base_channels


def test_demo_refuses_a_directory_holding_another_experiment(tmp_path, folder_dataset):
    run = tmp_path / "other"
    train(demo.DEMO_CONFIG.replace(dataset=f"folder:{folder_dataset}", image_size=8, channels=1, batch_size=8, max_steps=1), run, progress=False)
    with pytest.raises(ConfigError, match="cannot change .*dataset"):
        demo.run_demo(run, max_steps=2)
