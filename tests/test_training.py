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


def test_resume_gives_the_same_weights_as_one_uninterrupted_run(folder_dataset, tmp_path, device):
    # On CUDA too (conftest's deterministic algorithms): dropout draws from the CUDA generator,
    # whose state the checkpoint carries.
    _train_whole_and_split(tiny_config(folder_dataset, dropout=0.1, epochs=3, device=device.type), tmp_path)
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


def _labels_the_model_saw(folder_dataset, tmp_path, monkeypatch, label_dropout):
    """Train a conditional tiny model for 8 steps of 40 images; every training call of the
    loss records (true label of each image, label the model got), matched by image."""
    from ddpmkit import training
    from ddpmkit.data import load_dataset
    from ddpmkit.images import to_uint8

    train_set = load_dataset(f"folder:{folder_dataset}", "train", image_size=8, channels=1)
    label_of_image = {image.numpy().tobytes(): int(label) for image, label in zip(train_set.images, train_set.labels)}
    seen = []
    ddpm_loss = training.ddpm_loss

    def spy(model, schedule, x0, t, noise, labels=None, **kwargs):
        if torch.is_grad_enabled():  # training, not validation
            seen.extend((label_of_image[image.numpy().tobytes()], int(given)) for image, given in zip(to_uint8(x0), labels))
        return ddpm_loss(model, schedule, x0, t, noise, labels, **kwargs)

    monkeypatch.setattr(training, "ddpm_loss", spy)
    config = tiny_config(folder_dataset, conditional=True, label_dropout=label_dropout, batch_size=40, epochs=8,
                         preview_images=0)
    train(config, tmp_path / f"run-{label_dropout}", progress=False)
    assert len(seen) == 8 * 40
    return seen


def test_labels_reach_the_model_and_are_dropped_at_the_rate_asked_for(folder_dataset, tmp_path, monkeypatch):
    from ddpmkit.unet import NO_LABEL

    kept = _labels_the_model_saw(folder_dataset, tmp_path, monkeypatch, 0.0)
    assert all(given == true for true, given in kept)  # every image with its own label
    seen = _labels_the_model_saw(folder_dataset, tmp_path, monkeypatch, 0.3)
    dropped = sum(given == NO_LABEL for _, given in seen)
    assert all(given in (true, NO_LABEL) for true, given in seen)
    # Binomial(320, 0.3): mean 96, sd 8.2; within 4 sd.
    assert abs(dropped - 0.3 * 320) < 4 * (320 * 0.3 * 0.7) ** 0.5, dropped


def test_the_ema_weights_follow_the_warmed_up_average_step_by_step(folder_dataset, tmp_path):
    # ema_k = d_k ema_{k-1} + (1 - d_k) model_k with d_k = min(decay, (1 + k) / (10 + k)), from
    # ema_0 = the initial weights; decay 0.3 is reached at step 3 (d_1 = 2/11, d_2 = 1/4).
    from ddpmkit.checkpoint import step_checkpoint_path
    from ddpmkit.training import model_config_for
    from ddpmkit.unet import UNet

    config = tiny_config(folder_dataset, ema_decay=0.3, max_steps=4, checkpoint_every=1, keep_checkpoints=10)
    run = tmp_path / "run"
    train(config, run, progress=False)
    torch.manual_seed(config.seed)
    ema = {name: value.double() for name, value in UNet.from_config(model_config_for(config, 1, 2)).state_dict().items()}
    for step in range(1, 5):
        decay = min(0.3, (1 + step) / (10 + step))
        checkpoint = load_checkpoint(step_checkpoint_path(run, step))
        ema = {name: decay * value + (1 - decay) * checkpoint.model[name].double() for name, value in ema.items()}
        for name, value in ema.items():
            torch.testing.assert_close(checkpoint.ema[name].double(), value, rtol=0, atol=1e-6, msg=f"{name} at step {step}")


def test_best_checkpoint_is_chosen_by_the_validation_loss_of_the_ema_weights(folder_dataset, tmp_path, monkeypatch):
    from ddpmkit import training
    from ddpmkit.checkpoint import best_checkpoint_path

    losses = {"raw": iter([3.0, 2.0, 1.0]), "EMA": iter([1.0, 3.0, 2.0])}  # per epoch: raw best last, EMA best first

    def scripted(accelerator, model, *args):
        return next(losses["raw" if next(model.parameters()).requires_grad else "EMA"])

    monkeypatch.setattr(training, "validation_loss", scripted)
    run = tmp_path / "run"
    train(tiny_config(folder_dataset, epochs=3, preview_images=0), run, progress=False)
    epochs = [r for r in _metrics(run) if "val_loss" in r]
    assert [(r["val_loss"], r["val_loss_ema"]) for r in epochs] == [(3.0, 1.0), (2.0, 3.0), (1.0, 2.0)]
    assert load_checkpoint(best_checkpoint_path(run)).state["step"] == epochs[0]["step"] == 5


def test_the_fp16_loss_scale_goes_into_the_checkpoint_and_back():
    # No GPU here, so no fp16 run: the helpers that write_checkpoint and a resume call, on
    # torch's CPU GradScaler, through the JSON a checkpoint stores.
    from types import SimpleNamespace

    from ddpmkit.training import _grad_scaler_state, _restore_grad_scaler

    trained = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    trained.scale(torch.ones(()))  # creates the scale
    for found_inf in (1.0, 0.0, 0.0):  # one overflow halves the scale; then two good steps of growth_interval 3
        # What scaler.step(optimizer) leaves for update() to read.
        trained._per_optimizer_states[0] = {"stage": 2, "found_inf_per_device": {torch.device("cpu"): torch.tensor(found_inf)}}
        trained.update()
    state = json.loads(json.dumps(_grad_scaler_state(SimpleNamespace(scaler=trained))))
    resumed = SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))
    _restore_grad_scaler(resumed, state)
    assert trained.get_scale() == resumed.scaler.get_scale() == 2.0**15
    assert resumed.scaler._get_growth_tracker() == trained._get_growth_tracker() == 2
    assert _grad_scaler_state(SimpleNamespace(scaler=None)) == {}  # fp32 and bf16 runs have no scaler


def test_a_conditional_model_s_previews_and_fid_are_sampled_with_labels_spread_over_the_classes(folder_dataset, tmp_path, monkeypatch):
    from ddpmkit import training

    calls = []
    sample = training.sample

    def spy(model, schedule, shape, **kwargs):
        calls.append(None if kwargs.get("labels") is None else kwargs["labels"].tolist())
        assert not any(module.training for module in model.modules())  # the EMA weights, in eval mode (no dropout)
        return sample(model, schedule, shape, **kwargs)

    monkeypatch.setattr(training, "sample", spy)
    for dropout in (0.0, 0.2):
        calls.clear()
        run = tmp_path / f"run-{dropout}"
        train(tiny_config(folder_dataset, conditional=True, label_dropout=dropout, dropout=0.1, epochs=1), run, progress=False)
        expected = [[0, 0, 1, 1]] + ([None] if dropout else [])  # 4 preview images of 2 classes; "no label" with dropout only
        assert calls == expected
        [epoch] = [r for r in _metrics(run) if "val_loss" in r]
        assert (epoch["samples"], epoch.get("samples_unconditional")) == (
            "samples/epoch-000.png", "samples/epoch-000-unconditional.png" if dropout else None)
        assert epoch["preview_labels"].startswith("spread over the 2 classes")


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


def test_a_checkpoint_records_its_schedule_and_one_from_before_loads_unscaled(folder_dataset, tmp_path):
    from ddpmkit.checkpoint import save_checkpoint
    from ddpmkit.schedules import linear_schedule, make_schedule

    run = tmp_path / "run"
    config = tiny_config(folder_dataset, max_steps=2, preview_images=0)  # linear, T = 50
    train(config, run, progress=False)
    path = latest_checkpoint(run)
    checkpoint = load_checkpoint(path)
    assert checkpoint.state["schedule"] == make_schedule("linear", 50).identity()
    assert torch.equal(load_trained_model(run).schedule.betas, linear_schedule(50).betas)

    def rewrite(state):
        save_checkpoint(path, model=checkpoint.model, ema=checkpoint.ema, optimizer=checkpoint.optimizer,
                        rng_states=checkpoint.rng_states, config=checkpoint.config, state=state)

    # A checkpoint from before the 1000 / T scaling: its model was trained on betas 1e-4 .. 0.02.
    rewrite({key: value for key, value in checkpoint.state.items() if key != "schedule"})
    unscaled = linear_schedule(50, 1e-4, 0.02)
    assert torch.equal(load_trained_model(run).schedule.betas, unscaled.betas)
    train(config.replace(max_steps=4), run, resume=True, progress=False)  # resumed, it keeps that schedule
    resumed = load_checkpoint(latest_checkpoint(run))
    assert resumed.state["step"] == 4 and resumed.state["schedule"] == unscaled.identity()
    assert torch.equal(load_trained_model(run).schedule.betas, unscaled.betas)

    rewrite({**checkpoint.state, "schedule": {**checkpoint.state["schedule"], "betas_sha256": "0" * 64}})
    with pytest.raises(CheckpointError, match="whose betas .* this ddpmkit does not build"):
        load_trained_model(path)


# --- the objective and recipe keys: warm-up, flips, targets, learned variance -------------------

NEW_KEYS = ("prediction", "learn_variance", "loss_weighting", "min_snr_gamma", "warmup_steps", "random_flip")


def test_resume_is_exact_with_warmup_flips_and_the_hybrid_loss(folder_dataset, tmp_path):
    config = tiny_config(folder_dataset, epochs=3, warmup_steps=12, random_flip=True, learn_variance=True,
                         prediction="v", loss_weighting="min-snr", min_snr_gamma=1.0, preview_images=0)
    whole = _train_whole_and_split(config, tmp_path)  # resumed at step 7, in the middle of the warm-up
    # The learning rate rises linearly to lr over the 12 warm-up steps, in the resumed part too.
    lrs = [r["lr"] for r in _metrics(tmp_path / "split") if "train_loss" in r]
    assert lrs == pytest.approx([config.lr * min(1.0, step / 12) for step in range(1, 16)], rel=1e-12)
    assert whole.model["output.2.weight"].shape[0] == 2  # 1 channel of v, 1 of variance values


def test_flips_are_drawn_from_their_own_stream_and_leave_runs_without_them_unchanged(folder_dataset, tmp_path, monkeypatch):
    # The images the first step's loss sees, rebuilt from the seeded streams: flips from
    # TrainingStream.FLIP flip that step's images; without flips the step sees (and draws)
    # what it always did, and the loss of its draws is test_objectives' pinned first loss.
    config = tiny_config(folder_dataset, max_steps=1, preview_images=0, cpu_workers=1)
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
    train(tiny_config(folder_dataset, random_flip=True, max_steps=1, preview_images=0), tmp_path / "run", progress=False)
    [line] = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert "random_flip on" in line and "flipped" in line
    train(tiny_config(folder_dataset, max_steps=1, preview_images=0), tmp_path / "plain", progress=False)
    assert "warning" not in capsys.readouterr().err


def test_a_run_written_before_the_objective_keys_loads_samples_and_resumes(folder_dataset, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(folder_dataset, epochs=2, preview_images=0)
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
