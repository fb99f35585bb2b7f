"""The evaluation commands end to end on a tiny folder dataset: train-classifier, fid (with
its resume), the per-epoch FID of training, TensorBoard logging and the FID curve of plot."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from ddpmkit import samplers
from ddpmkit.checkpoint import load_trained_model
from ddpmkit.classifier import find_classifier, train_and_cache_classifier
from ddpmkit.cli import main
from ddpmkit.data import load_dataset
from ddpmkit.fid import classifier_extractor, minibatch_fid
from ddpmkit.metrics import frechet_distance
from ddpmkit.rng import TrainingStream, seeded_generator
from ddpmkit.schedules import make_schedule
from ddpmkit.training import train

TINY_TRAIN = ["--image-size", "8", "--channels", "1", "--num-steps", "50", "--base-channels", "8", "--channel-mults", "1,2",
              "--num-res-blocks", "1", "--batch-size", "8", "--checkpoint-every", "100", "--preview-images", "4",
              "--preview-steps", "5", "--device", "cpu", "--no-progress", "--lr", "1e-3"]
FID_ARGS = ["--num", "10", "--batch-size", "4", "--sampler", "ddim", "--steps", "3", "--seed", "5", "--no-progress", "--device", "cpu"]


def _dataset(folder):
    return f"folder:{folder}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory, folder_dataset):
    """A cache holding a (1-epoch) feature classifier of the folder dataset."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DDPMKIT_CACHE", str(root))
        train_and_cache_classifier(_dataset(folder_dataset), image_size=8, channels=1, epochs=1)
    return root


# --- train-classifier ---------------------------------------------------------------------------

def test_train_classifier_saves_into_the_cache_and_reports_accuracy(folder_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path))
    dataset = _dataset(folder_dataset)
    argv = ["train-classifier", "--dataset", dataset, "--image-size", "8", "--channels", "1", "--epochs", "2", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    directory = find_classifier(dataset)  # found by dataset name
    assert out.startswith(f"ddpm: training the classifier of {dataset} for 2 epoch(s) into {directory}\n")  # before the work
    assert directory.parent == tmp_path / "classifiers" and (directory / "model.safetensors").is_file()
    report = json.loads((directory / "config.json").read_text())["report"]
    printed = float(re.search(r"test accuracy (\d\.\d+) on 5 ", out).group(1))
    assert printed == pytest.approx(report["test_accuracy"], abs=5e-5)
    # A folder's test split is its val split, so its classifier trains on train alone (48 - 5 val images).
    assert report["train_images"] == 43 and report["epochs"] == 2
    assert f"saved {directory}" in out and re.search(r"trained in \d+\.\d s", out)
    first = json.loads((directory / "config.json").read_text())["weights_sha256"]
    assert main([*argv[:-4], "--epochs", "1", "--device", "cpu"]) == 0  # the cached one is replaced, and that is said
    assert f"it replaces the one there, SHA-256 {first[:12]}..., test accuracy" in capsys.readouterr().out


def test_train_classifier_noisy_into_out_reports_accuracy_per_step_index(folder_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    out_dir = tmp_path / "noisy"
    argv = ["train-classifier", "--dataset", _dataset(folder_dataset), "--image-size", "8", "--channels", "1", "--epochs", "1",
            "--noisy", "--schedule", "cosine", "--num-steps", "50", "--out", str(out_dir), "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.findall(r"t=(\d+): ", out) == ["0", "12", "25", "37", "49"]  # ends and quarters of T = 50
    meta = json.loads((out_dir / "config.json").read_text())
    assert meta["config"]["time_conditioned"] and meta["report"]["schedule"] == make_schedule("cosine", 50).identity()
    assert "for the cosine schedule, T = 50 (betas " in out
    assert not (tmp_path / "cache").exists()  # --out, not the cache
    assert main(argv) == 2  # an existing --out is not overwritten
    assert "already exists" in capsys.readouterr().err


def test_train_classifier_refuses_a_schedule_without_noisy(folder_dataset, capsys):
    assert main(["train-classifier", "--dataset", _dataset(folder_dataset), "--schedule", "cosine"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm: error: --schedule, --num-steps and --for") and err.count("\n") == 1


# --- fid ------------------------------------------------------------------------------------------

def test_fid_end_to_end_with_provenance_and_floor(tiny_run, cache, folder_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDPMKIT_CACHE", str(cache))
    out = tmp_path / "fid.json"
    assert main(["fid", str(tiny_run), *FID_ARGS, "--out", str(out), "--real-vs-real"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    dataset = _dataset(folder_dataset)
    train_name, test_name = f"{dataset}/train", f"{dataset}/test"
    assert result["num_generated"] == 10
    assert result["reference_images"] == {train_name: 43, test_name: 5}
    classifier_dir = find_classifier(dataset)
    assert result["extractor_sha256"] == json.loads((classifier_dir / "config.json").read_text())["weights_sha256"]
    settings = result["settings"]
    assert settings["checkpoint"] == str(load_trained_model(tiny_run).path.resolve()) and settings["step"] == 2
    assert (settings["weights"], settings["sampler"], settings["steps"], settings["seed"], settings["batch_size"]) == ("EMA", "ddim", 3, 5, 4)
    assert settings["spacing"] == "trailing" and result["wall_seconds"] >= 0 and result["precision_recall_k"] == 3
    # Oracle: the Frechet distance of the stored generated features to the train split's.
    stored = sorted((tmp_path / "fid-work" / "generated-features").glob("*/batch-*.npy"))
    assert len(stored) == 3  # ceil(10 / 4) batches
    generated = np.concatenate([np.load(path) for path in stored])
    extractor = classifier_extractor(classifier_dir)
    real, real_test = (extractor(load_dataset(dataset, split, image_size=8, channels=1).images) for split in ("train", "test"))
    for name in (train_name, test_name):
        metrics = result["splits"][name]
        assert math.isfinite(metrics["fid"]) and metrics["fid"] >= 0
        assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
        assert f"{name}: FID {metrics['fid']:.3f}" in printed
    assert result["splits"][train_name]["fid"] == pytest.approx(frechet_distance(real, generated), rel=1e-6)
    floor = result["real_vs_real"]  # --real-vs-real: the test split's features against the train split's
    assert floor["compared"] == test_name
    assert floor["splits"][train_name]["fid"] == pytest.approx(frechet_distance(real, real_test), rel=1e-6)
    assert f"floor, {test_name} vs {train_name}: FID {floor['splits'][train_name]['fid']:.3f}" in printed
    # 10 generated, 43 train and 5 test images in 128 dimensions: too few for a FID, which is said.
    assert "ddpm: warning: generated: 10 images in a 128-dimensional feature space, whose covariance has rank at most 9" in printed
    assert f"ddpm: warning: {train_name}: 43 images" in printed and f"ddpm: warning: {test_name}: 5 images" in printed
    assert len(result["warnings"]) == 3


def test_a_second_fid_with_other_settings_and_the_default_out_runs_and_the_first_still_resumes(
    tiny_run, cache, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("DDPMKIT_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # the default --out: fid.json here
    assert main(["fid", str(tiny_run), *FID_ARGS]) == 0
    first = json.loads((tmp_path / "fid.json").read_text())
    other = [*FID_ARGS]
    other[other.index("ddim")] = "dpm-solver++"
    assert main(["fid", str(tiny_run), *other, "--num", "12"]) == 0  # another sampler and --num: a folder of its own
    second = json.loads((tmp_path / "fid.json").read_text())
    assert (second["settings"]["sampler"], second["num_generated"]) == ("dpm-solver++", 12)
    assert len(list((tmp_path / "fid-work" / "generated-features").iterdir())) == 2
    calls = []
    monkeypatch.setattr(samplers, "sample", lambda *args, **kwargs: calls.append(1))
    assert main(["fid", str(tiny_run), *FID_ARGS]) == 0  # the first settings again: every batch is reused
    assert calls == [] and json.loads((tmp_path / "fid.json").read_text())["splits"] == first["splits"]
    capsys.readouterr()


def test_interrupted_fid_resumes_without_resampling_finished_batches(tiny_run, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDPMKIT_CACHE", str(cache))
    original = samplers.sample
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(samplers, "sample", counted)  # what sample_batches calls, once per batch
    out = tmp_path / "fid.json"
    interrupt_at = 2  # batch 0 finishes, batch 1 is interrupted
    assert main(["fid", str(tiny_run), *FID_ARGS, "--out", str(out)]) == 130
    assert not out.exists()
    calls.clear()
    interrupt_at = None
    assert main(["fid", str(tiny_run), *FID_ARGS, "--out", str(out)]) == 0
    assert len(calls) == 2  # batches 1 and 2 only
    calls.clear()
    fresh = tmp_path / "fresh.json"
    assert main(["fid", str(tiny_run), *FID_ARGS, "--out", str(fresh)]) == 0
    assert len(calls) == 3
    resumed, uninterrupted = json.loads(out.read_text()), json.loads(fresh.read_text())
    assert resumed["splits"] == uninterrupted["splits"]  # the resumed run is the same evaluation
    capsys.readouterr()


def test_fid_without_a_cached_classifier_names_the_command_to_run(tiny_run, folder_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "empty"))
    assert main(["fid", str(tiny_run), *FID_ARGS, "--out", str(tmp_path / "fid.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm: error: no classifier for") and err.count("\n") == 1
    assert f"ddpm train-classifier --dataset {_dataset(folder_dataset)}" in err
    assert not (tmp_path / "fid.json").exists()


def test_fid_refuses_mismatched_feature_flags(tiny_run, tmp_path, capsys):
    argv = ["fid", str(tiny_run), "--features", "inception", "--classifier", str(tmp_path), "--out", str(tmp_path / "f.json")]
    assert main(argv) == 2
    assert "--classifier goes with --features classifier" in capsys.readouterr().err


# --- training: per-epoch FID, TensorBoard, plot ---------------------------------------------------------

def test_per_epoch_fid_tensorboard_and_fid_curve(cache, folder_dataset, tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("DDPMKIT_CACHE", str(cache))
    run_dir = tmp_path / "run"
    argv = ["train", "--dataset", _dataset(folder_dataset), "--out", str(run_dir), *TINY_TRAIN, "--epochs", "2",
            "--fid-batches", "1", "--tensorboard"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "per-epoch FID off" not in out
    assert out.count("ddpm: warning: per-epoch FID: 8 images in a 128-dimensional feature space") == 1  # 1 batch of 8
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "val_loss" in r]
    for number, record in enumerate(epochs, 1):  # one line per epoch, with what metrics.jsonl holds
        assert (f"ddpm: epoch {number}: step {record['step']}, validation loss {record['val_loss']:.4f}, FID {record['fid']:.2f}, "
                f"preview {run_dir / record['samples']}") in out
    assert "ddpm: finished at step 10 in " in out and f"validation loss {epochs[-1]['val_loss']:.4f}, FID {epochs[-1]['fid']:.2f}" in out
    assert [r["step"] for r in epochs] == [5, 10]  # 43 images // 8 = 5 steps per epoch
    assert all(math.isfinite(r["fid"]) and r["fid"] >= 0 for r in epochs)
    # Oracle: the last epoch's FID recomputed from the final checkpoint's EMA weights.
    trained = load_trained_model(run_dir)
    validation = load_dataset(_dataset(folder_dataset), "val", image_size=8, channels=1)
    expected = minibatch_fid(
        trained.model, trained.schedule, validation, classifier_extractor(find_classifier(_dataset(folder_dataset))),
        num_images=8, batch_size=8, seed=seeded_generator(0, TrainingStream.FID).initial_seed(), sampler="ddim", steps=5,
    )
    assert epochs[-1]["fid"] == pytest.approx(expected, rel=1e-5)

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train_loss", "val_loss", "fid"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("fid")] == [(r["step"], pytest.approx(r["fid"], rel=1e-6)) for r in epochs]
    grids = events.Images("samples")
    assert [g.step for g in grids] == [5, 10] and (grids[0].width, grids[0].height) == (22, 22)  # 2 x 2 tiles of 8 + padding

    assert main(["plot", str(run_dir)]) == 0
    assert Image.open(run_dir / "curves.png").size[0] == 2 * 660  # two panels: loss and FID


def test_a_v_model_with_a_learned_variance_through_every_evaluation(cache, folder_dataset, tmp_path, monkeypatch, capsys):
    # Training's validation loss, preview grid and per-epoch FID, then ddpm fid, figures reverse and
    # sample: each reads the model's output as v with its learned variance, without being told.
    monkeypatch.setenv("DDPMKIT_CACHE", str(cache))
    run_dir = tmp_path / "run"
    argv = ["train", "--dataset", _dataset(folder_dataset), "--out", str(run_dir), *TINY_TRAIN, "--epochs", "1",
            "--fid-batches", "1", "--prediction", "v", "--learn-variance", "--preview-sampler", "ddpm"]
    assert main(argv) == 0
    [epoch] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    trained = load_trained_model(run_dir)
    validation = load_dataset(_dataset(folder_dataset), "val", image_size=8, channels=1)
    expected = minibatch_fid(
        trained.model, trained.schedule, validation, classifier_extractor(find_classifier(_dataset(folder_dataset))),
        num_images=8, batch_size=8, seed=seeded_generator(0, TrainingStream.FID).initial_seed(), sampler="ddpm", steps=5,
        prediction="v", variance="learned",
    )
    assert math.isfinite(epoch["val_loss"]) and epoch["fid"] == pytest.approx(expected, rel=1e-5)
    out = tmp_path / "fid.json"
    assert main(["fid", str(run_dir), *FID_ARGS, "--sampler", "ddpm", "--out", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert (settings["prediction"], settings["variance"]) == ("v", "learned")
    assert main(["figures", "reverse", str(run_dir), "--sampler", "ddpm", "--steps", "4", "--frames", "2"]) == 0
    assert (run_dir / "reverse-ddpm-4.png").is_file()
    assert main(["fid", str(run_dir), *FID_ARGS, "--sampler", "ddpm", "--variance", "posterior", "--out", str(tmp_path / "p.json")]) == 2
    assert "learns its variance" in capsys.readouterr().err


def test_per_epoch_fid_is_off_with_one_notice_without_a_classifier(folder_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "empty"))
    train(tiny_config(folder_dataset, fid_batches=5, preview_images=0), tmp_path / "run", progress=False)
    out = capsys.readouterr().out
    assert out.count("per-epoch FID off: no classifier for") == 1
    assert f"ddpm train-classifier --dataset {_dataset(folder_dataset)}" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_loss" in r for r in records) == 2 and not any("fid" in r for r in records)


def test_tensorboard_flag_without_the_package_is_a_config_error(folder_dataset, tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    run_dir = tmp_path / "run"
    assert main(["train", "--dataset", _dataset(folder_dataset), "--out", str(run_dir), *TINY_TRAIN, "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err == "ddpm: error: --tensorboard needs the tensorboard package: pip install 'ddpmkit[tensorboard]'\n"
    assert not run_dir.exists()
