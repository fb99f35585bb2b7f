"""The ablation: its combinations, and training that skips finished runs and resumes unfinished ones."""

import json

import pytest

from conftest import tiny_config
from ddpmkit import ConfigError, DdpmError
from ddpmkit import ablation, fid
from ddpmkit.ablation import Combination, combinations, is_finished, run_ablation
from ddpmkit.checkpoint import latest_checkpoint, load_checkpoint
from ddpmkit.classifier import Classifier, classifier_cache_dir, save_classifier
from ddpmkit.io import safe_name
from ddpmkit.cli import main
from ddpmkit.training import train

SAMPLING = {"sampler": "ddim", "steps": 3}


def test_combinations_and_their_configs(folder_dataset):
    base = tiny_config(folder_dataset, channel_mults=(1, 2, 2))
    cells = combinations(["linear", "cosine"], ["off", "on", "off"])
    assert [cell.name for cell in cells] == ["linear-noattn", "linear-attn", "cosine-noattn", "cosine-attn"]
    on = Combination("cosine", "on").config(base)
    assert on.schedule == "cosine" and on.attention_levels == (1,)  # the middle of 3 levels, as the poster
    assert Combination("linear", "on").config(base.replace(attention_levels=(0, 2))).attention_levels == (0, 2)
    assert Combination("linear", "off").config(base.replace(attention_levels=(0, 2))).attention_levels == ()
    with pytest.raises(ConfigError, match="unknown schedule 'quadratic'"):
        combinations(["quadratic"], ["on"])
    with pytest.raises(ConfigError, match="attention must be one of"):
        Combination("linear", "yes")


def test_is_finished_by_epochs_or_max_steps(folder_dataset):
    config = tiny_config(folder_dataset, epochs=2)
    assert not is_finished({"epoch": 1, "step": 9}, config)
    assert is_finished({"epoch": 2, "step": 10}, config)
    assert is_finished({"epoch": 0, "step": 3}, config.replace(max_steps=3))
    assert not is_finished({"epoch": 0, "step": 3}, config.replace(max_steps=4))


def test_a_missing_classifier_stops_the_ablation_before_training(folder_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DdpmError, match=f"ddpm train-classifier --dataset folder:{folder_dataset}"):
        run_ablation(tiny_config(folder_dataset), tmp_path / "out", schedules=["linear"], attentions=["off"],
                     num_fid=4, sampling=SAMPLING)
    assert not (tmp_path / "out").exists()
    assert main(["ablation", "--dataset", f"folder:{folder_dataset}", "--out", str(tmp_path / "out")]) == 2
    assert "ddpm train-classifier" in capsys.readouterr().err


def test_ablation_resumes_skips_and_reuses_its_samples(folder_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    dataset = f"folder:{folder_dataset}"
    # An untrained classifier is a fixed feature network; that is all FID needs here.
    save_classifier(Classifier(1, 8, num_classes=2, width=8), {"dataset": dataset}, classifier_cache_dir() / safe_name(dataset))
    base = tiny_config(folder_dataset, epochs=2, preview_images=0)  # 43 train images, batch 8: 5 steps per epoch
    out = tmp_path / "ablation"
    # linear-noattn was stopped at step 3 of 10; linear-attn was never started.
    train(Combination("linear", "off").config(base).replace(max_steps=3), out / "linear-noattn", progress=False)
    calls = []

    def spy(config, run_dir, *, resume, progress):
        calls.append((run_dir.name, resume))
        return train(config, run_dir, resume=resume, progress=progress)

    monkeypatch.setattr(ablation, "train", spy)
    kwargs = dict(schedules=["linear"], attentions=["off", "on"], num_fid=6, sampling=SAMPLING, batch_size=4, progress=False)
    rows = run_ablation(base, out, **kwargs)
    assert calls == [("linear-noattn", True), ("linear-attn", False)]
    for name, levels in (("linear-noattn", []), ("linear-attn", [1])):
        checkpoint = load_checkpoint(latest_checkpoint(out / name))
        assert (checkpoint.state["step"], checkpoint.state["epoch"]) == (10, 2)
        assert checkpoint.config["attention_levels"] == levels and checkpoint.config["max_steps"] is None

    table = json.loads((out / "ablation.json").read_text())
    assert table["rows"] == json.loads(json.dumps(rows))
    assert [row["name"] for row in rows] == ["linear-noattn", "linear-attn"]
    for row in rows:
        assert row["train_fid"] == row["scores"]["train"]["fid"] and row["test_fid"] == row["scores"]["test"]["fid"]
        assert row["train_fid"] > 0 and row["test_fid"] > 0
        assert set(row["scores"]["test"]) == {"fid", "precision", "recall"}
        assert row["step"] == 10 and row["train_seconds"] > 0 and row["config"]["schedule"] == "linear"
        provenance = row["provenance"]
        assert provenance["num_generated"] == 6 and provenance["settings"]["sampler"] == "ddim"
        assert provenance["settings"]["step"] == 10
        assert provenance["reference_images"] == {f"{dataset}/train": 43, f"{dataset}/test": 5}

    # Run again: both runs are finished and their FID samples stored, so nothing is trained or sampled.
    calls.clear()
    sample_batches = fid.sample_batches
    monkeypatch.setattr(fid, "sample_batches", lambda *args, **kwargs: pytest.fail("sampled again"))
    again = run_ablation(base, out, **kwargs)
    assert calls == []
    assert [(row["train_fid"], row["test_fid"], row["train_seconds"]) for row in again] == [
        (row["train_fid"], row["test_fid"], row["train_seconds"]) for row in rows]
    # More epochs make the finished runs unfinished: both are resumed.
    monkeypatch.setattr(fid, "sample_batches", sample_batches)
    run_ablation(base.replace(epochs=3), out, **kwargs)
    assert calls == [("linear-noattn", True), ("linear-attn", True)]


def test_a_run_folder_without_checkpoint_is_not_overwritten(folder_dataset, tmp_path):
    run_dir = tmp_path / "linear-noattn"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("")
    with pytest.raises(DdpmError, match="holds no checkpoint"):
        ablation.train_combination(tiny_config(folder_dataset), run_dir, progress=False)


def test_the_ablation_command_prints_its_table(folder_dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    score = {"precision": 0.5, "recall": 0.25}
    # A made-up row (test fixture numbers): the command's job here is to print what ablation.json holds.
    row = {"name": "linear-noattn", "train_fid": 12.5, "test_fid": 14.25, "scores": {"train": {"fid": 12.5, **score},
           "test": {"fid": 14.25, **score}}, "step": 10, "train_seconds": 3.0, "eval_seconds": 2.0}

    def fake_run_ablation(base, out_dir, **kwargs):
        ablation.write_ablation(out_dir / "ablation.json", [row], dataset=base.dataset, num_fid=6, sampling=kwargs["sampling"])
        return [row]

    monkeypatch.setattr(ablation, "run_ablation", fake_run_ablation)
    assert main(["ablation", "--dataset", f"folder:{folder_dataset}", "--out", str(out), "--sampler", "ddim", "--steps", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["run", "train", "FID", "test", "FID", "train", "precision", "train", "recall", "test",
                                  "precision", "test", "recall", "step", "train", "s", "FID", "s"]
    assert printed[1].split() == ["linear-noattn", "12.50", "14.25", "0.50", "0.25", "0.50", "0.25", "10", "3", "2"]
    assert printed[-1] == f"ddpm: next: ddpm report {out}"
    # What sampled the FID images, the spacing included, and of eta and the variance only ddim's eta.
    assert json.loads((out / "ablation.json").read_text())["sampling"] == {
        "sampler": "ddim", "steps": 3, "spacing": "trailing", "clip_denoised": True, "eta": 0.0}
