"""Training (Algorithm 1): learning, exact resume, refusals, numerical failures; warm-up, flips, the
other objectives, and runs from before they existed."""

import dataclasses
import json

import pytest
import torch

from conftest import tiny_config
from ddpmkit import CheckpointError, ConfigError, TrainingError, ddpm_loss, linear_schedule
from ddpmkit.config import config_from_dict, model_output_options
from ddpmkit.checkpoint import latest_checkpoint, load_checkpoint, load_trained_model, save_checkpoint
from ddpmkit.data import dataset_info, load_dataset
from ddpmkit.images import to_model_range
from ddpmkit.objectives import draw_timesteps_and_noise
from ddpmkit.rng import TrainingStream, seeded_generator
from ddpmkit.samplers import sample
from ddpmkit.training import train


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_model_learns(folder_dataset, tmp_path):
    # 48 images, batch 8: each of the 8 epochs revisits the same images, so the loss must fall.
    summary = train(tiny_config(folder_dataset, epochs=8, log_every=5), tmp_path / "run", progress=False)
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


def _train_whole_and_split(config, tmp_path):
    """Train config in one go into tmp_path/whole, and stopped at step 7 (mid-epoch 1), then
    resumed, into tmp_path/split; check both end with the same weights; return the last
    checkpoint of the whole run."""
    train(config, tmp_path / "whole", progress=False)
    train(config.replace(max_steps=7), tmp_path / "split", progress=False)
    assert load_checkpoint(latest_checkpoint(tmp_path / "split")).state["step"] == 7
    train(config, tmp_path / "split", resume=True, progress=False)
    whole = load_checkpoint(latest_checkpoint(tmp_path / "whole"))
    split = load_checkpoint(latest_checkpoint(tmp_path / "split"))
    assert whole.state["step"] == split.state["step"] == 15
    for part in ("model", "ema"):
        for key, value in getattr(whole, part).items():
            assert torch.equal(value, getattr(split, part)[key]), f"{part}.{key} differs"
    return whole


def test_resume_gives_the_same_weights_as_one_uninterrupted_run(folder_dataset, tmp_path):
    _train_whole_and_split(tiny_config(folder_dataset, dropout=0.1, epochs=3), tmp_path)
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


# --- the objective and recipe keys: warm-up, flips, targets, learned variance -------------------

NEW_KEYS = ("prediction", "learn_variance", "loss_weighting", "min_snr_gamma", "warmup_steps", "random_flip")


def test_resume_is_exact_with_warmup_flips_and_the_hybrid_loss(folder_dataset, tmp_path):
    config = tiny_config(folder_dataset, epochs=3, warmup_steps=12, random_flip=True, learn_variance=True,
                         prediction="v", loss_weighting="min-snr", min_snr_gamma=1.0, sample_every_epoch=0)
    whole = _train_whole_and_split(config, tmp_path)  # resumed at step 7, in the middle of the warm-up
    # The learning rate rises linearly to lr over the 12 warm-up steps, in the resumed part too.
    lrs = [r["lr"] for r in _metrics(tmp_path / "split") if "train_loss" in r]
    assert lrs == pytest.approx([config.lr * min(1.0, step / 12) for step in range(1, 16)], rel=1e-12)
    assert whole.model["output.2.weight"].shape[0] == 2  # 1 channel of v, 1 of variance values


def test_flips_are_drawn_from_their_own_stream_and_leave_runs_without_them_unchanged(folder_dataset, tmp_path, monkeypatch):
    # The images the first step's loss sees, rebuilt from the seeded streams: flips from
    # TrainingStream.FLIP flip that step's images; without flips the step sees (and draws)
    # what it always did, and the loss of its draws is test_objectives' pinned first loss.
    config = tiny_config(folder_dataset, max_steps=1, sample_every_epoch=0, cpu_workers=1)
    train_set = load_dataset(config.dataset, "train", image_size=8, channels=1, seed=config.seed)
    order = torch.randperm(len(train_set), generator=seeded_generator(config.seed, TrainingStream.EPOCH_ORDER, 0))
    x0 = to_model_range(train_set.images[order[: config.batch_size]])
    flip = torch.rand(config.batch_size, generator=seeded_generator(config.seed, TrainingStream.FLIP, 1)) < 0.5
    assert 0 < int(flip.sum()) < config.batch_size
    schedule = linear_schedule(config.num_steps)
    t, noise = draw_timesteps_and_noise(schedule, tuple(x0.shape), seeded_generator(config.seed, TrainingStream.STEP, 1))
    seen = []

    def spy(model, schedule, x0, t, noise, *args, **kwargs):
        seen.append((x0, t, noise))
        return ddpm_loss(model, schedule, x0, t, noise, *args, **kwargs)

    monkeypatch.setattr("ddpmkit.training.ddpm_loss", spy)
    for flips, expected in ((False, x0), (True, torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0))):
        seen.clear()
        train(config.replace(random_flip=flips), tmp_path / f"flips-{flips}", progress=False)
        images, drawn_t, drawn_noise = seen[0]  # the first step's loss (validation comes after)
        assert torch.equal(images, expected) and torch.equal(drawn_t, t) and torch.equal(drawn_noise, noise)
    assert not torch.equal(x0.flip(-1), x0)


def test_flips_on_digits_are_trained_with_a_warning(folder_dataset, tmp_path, monkeypatch, capsys):
    def as_digits(*args, **kwargs):
        return dataclasses.replace(dataset_info(*args, **kwargs), flip_invariant=False)

    monkeypatch.setattr("ddpmkit.training.dataset_info", as_digits)
    train(tiny_config(folder_dataset, random_flip=True, max_steps=1, sample_every_epoch=0), tmp_path / "run", progress=False)
    [line] = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert "random_flip on" in line and "flipped" in line
    train(tiny_config(folder_dataset, max_steps=1, sample_every_epoch=0), tmp_path / "plain", progress=False)
    assert "warning" not in capsys.readouterr().err


def test_a_run_written_before_the_objective_keys_loads_samples_and_resumes(folder_dataset, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(folder_dataset, epochs=2, sample_every_epoch=0)
    train(config.replace(max_steps=3), run, progress=False)
    # Rewrite the run as one from before the keys existed: config.json and the checkpoint's config.
    path = latest_checkpoint(run)
    old = load_checkpoint(path)
    old_config = {key: value for key, value in old.config.items() if key not in NEW_KEYS}
    save_checkpoint(path, model=old.model, ema=old.ema, optimizer=old.optimizer, rng_states=old.rng_states,
                    config=old_config, state=old.state)
    (run / "config.json").write_text(json.dumps(old_config))
    trained = load_trained_model(run)
    assert (trained.config.prediction, trained.config.learn_variance, trained.config.warmup_steps) == ("eps", False, 0)
    assert trained.model.config.out_channels is None
    images = sample(trained.model, trained.schedule, (2, *trained.image_shape), steps=3, **model_output_options(trained.config))
    assert images.shape == (2, 1, 8, 8)
    summary = train(config, run, resume=True, progress=False)  # the defaults are the stored run's settings
    assert summary.step == 10


def test_a_learned_variance_run_rebuilds_its_two_part_output_and_samples_with_it(folder_dataset, tmp_path, capsys):
    from ddpmkit.cli import main

    run = tmp_path / "run"
    train(tiny_config(folder_dataset, learn_variance=True, max_steps=2), run, progress=False)  # previews sample it too
    trained = load_trained_model(run)
    assert trained.model.config.out_channels == 2 and trained.config.learn_variance
    assert main(["sample", str(run), "--num", "2", "--steps", "3", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["sample", str(run), "--num", "2", "--steps", "3", "--variance", "beta", "--out", str(tmp_path / "b.png")]) == 2
    assert "learns its variance" in capsys.readouterr().err
