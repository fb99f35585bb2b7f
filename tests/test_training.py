"""Training (Algorithm 1): learning, exact resume, refusals, numerical failures."""

import json

import pytest
import torch

from conftest import tiny_config
from ddpmkit import CheckpointError, ConfigError, TrainingError
from ddpmkit.config import config_from_dict
from ddpmkit.checkpoint import latest_checkpoint, load_checkpoint, load_trained_model
from ddpmkit.training import train


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_model_learns(folder_dataset, tmp_path, device):
    # 48 images, batch 8: each of the 8 epochs revisits the same images, so the loss must fall.
    summary = train(tiny_config(folder_dataset, epochs=8, log_every=5, device=device.type), tmp_path / "run", progress=False)
    losses = [r["train_loss"] for r in _metrics(tmp_path / "run") if "train_loss" in r]
    assert summary.step == 8 * 5 and not summary.interrupted
    assert losses[-1] < 0.85 * losses[0]
    val = [r["val_loss"] for r in _metrics(tmp_path / "run") if "val_loss" in r]
    assert len(val) == 8 and val[-1] < val[0]


def test_run_directory_contents(folder_dataset, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(folder_dataset)
    train(config, run, progress=False)
    assert config_from_dict(json.loads((run / "config.json").read_text())) == config
    assert (run / "samples" / "epoch-000.png").is_file() and (run / "samples" / "epoch-001.png").is_file()
    checkpoint = load_checkpoint(latest_checkpoint(run))
    assert checkpoint.state["step"] == 10 and checkpoint.state["epoch"] == 2
    assert config_from_dict(checkpoint.config) == config
    assert set(checkpoint.model) == set(checkpoint.ema) and checkpoint.optimizer["state"]
    assert (run / "checkpoints" / "best.safetensors").is_file()
    assert len(list((run / "checkpoints").glob("step-*.safetensors"))) <= config.keep_checkpoints
    first = _metrics(run)[0]
    assert {"step", "epoch", "train_loss", "lr", "images_per_s"} <= set(first)
    trained = load_trained_model(run, ema=True)
    assert trained.image_shape == (1, 8, 8) and trained.step == 10
    raw = load_trained_model(run, ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(trained.model.state_dict().values(), raw.model.state_dict().values()))


def test_resume_gives_the_same_weights_as_one_uninterrupted_run(folder_dataset, tmp_path, device):
    # On CUDA too (conftest's deterministic algorithms): dropout draws from the CUDA generator,
    # whose state the checkpoint carries.
    config = tiny_config(folder_dataset, dropout=0.1, epochs=3, device=device.type)
    train(config, tmp_path / "whole", progress=False)
    train(config.replace(max_steps=7), tmp_path / "split", progress=False)  # stops mid-epoch 1
    assert load_checkpoint(latest_checkpoint(tmp_path / "split")).state["step"] == 7
    train(config, tmp_path / "split", resume=True, progress=False)
    whole = load_checkpoint(latest_checkpoint(tmp_path / "whole"))
    split = load_checkpoint(latest_checkpoint(tmp_path / "split"))
    assert whole.state["step"] == split.state["step"] == 15
    for part in ("model", "ema"):
        for key, value in getattr(whole, part).items():
            assert torch.equal(value, getattr(split, part)[key]), f"{part}.{key} differs"
    # metrics of the resumed run continue the first part's without repeating steps
    steps = [r["step"] for r in _metrics(tmp_path / "split") if "train_loss" in r]
    assert steps == list(range(1, 16))


def test_existing_run_is_not_overwritten_without_resume(folder_dataset, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(folder_dataset, max_steps=2), run, progress=False)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        train(tiny_config(folder_dataset), run, progress=False)
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny_config(folder_dataset), tmp_path / "fresh", resume=True, progress=False)


def test_non_finite_gradient_stops_with_the_step_and_keeps_the_last_checkpoint(folder_dataset, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite gradient at step \d+"):
        train(tiny_config(folder_dataset, lr=1e12, grad_clip=0.0, checkpoint_every=1, epochs=50), run, progress=False)
    last = load_checkpoint(latest_checkpoint(run))
    assert all(torch.isfinite(v).all() for v in last.model.values())
    assert _metrics(run)  # the metrics so far are kept


def test_invalid_setups_are_refused_before_any_data_loads(folder_dataset, tmp_path):
    with pytest.raises(ConfigError, match="not divisible"):
        train(tiny_config(folder_dataset, image_size=9), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        train(tiny_config(folder_dataset, batch_size=4096), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="unknown dataset"):
        train(tiny_config(folder_dataset, dataset="imagenet"), tmp_path / "c", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_conditional_training_uses_labels(folder_dataset, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(folder_dataset, conditional=True, max_steps=3), run, progress=False)
    trained = load_trained_model(run)
    assert trained.model.null_label == 2  # two classes + the "no label" slot



def test_the_ema_update_records_no_autograd_history():
    # The EMA copy is never trained: under autograd every update would chain another graph
    # node onto each EMA weight, a leak that grows with the run.
    import copy

    from ddpmkit.training import _update_ema
    from ddpmkit.unet import UNet

    model = UNet(base_channels=8, channel_mults=(1,), num_res_blocks=1)
    ema = copy.deepcopy(model).requires_grad_(False)
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    for step in range(3):
        _update_ema(ema, model, 0.999, step)
    assert all(not p.requires_grad and p.grad_fn is None for p in ema.parameters())
    assert all(not torch.equal(p, old) for p, old in zip(ema.parameters(), before))  # it did update
