"""The grid runner: its cells, and training that skips finished runs and resumes unfinished ones."""

import json

import pytest

from conftest import tiny_config
from ddpmkit import ConfigError, DdpmError
from ddpmkit import ablation, fid
from ddpmkit.ablation import POSTER_GRID, Cell, grid_cells, is_finished, run_ablation
from ddpmkit.checkpoint import latest_checkpoint, load_checkpoint
from ddpmkit.classifier import Classifier, classifier_cache_dir, save_classifier
from ddpmkit.io import safe_name
from ddpmkit.cli import main
from ddpmkit.training import train

SAMPLING = {"sampler": "ddim", "steps": 3}


def poster_cell(schedule, attention):
    return Cell((("schedule", schedule), ("attention", attention)))


def test_the_posters_cells_and_their_configs(folder_dataset):
    base = tiny_config(folder_dataset, channel_mults=(1, 2, 2))
    cells = grid_cells({"schedule": ["linear", "cosine"], "attention": ["off", "on", "off"]})
    assert [cell.name for cell in cells] == ["linear-noattn", "linear-attn", "cosine-noattn", "cosine-attn"]
    assert [cell.name for cell in grid_cells(POSTER_GRID)] == ["linear-attn", "linear-noattn", "cosine-attn", "cosine-noattn"]
    on = poster_cell("cosine", "on").config(base)
    assert on.schedule == "cosine" and on.attention_levels == (1,)  # the middle of 3 levels, as the poster
    assert poster_cell("linear", "on").config(base.replace(attention_levels=(0, 2))).attention_levels == (0, 2)
    assert poster_cell("linear", "off").config(base.replace(attention_levels=(0, 2))).attention_levels == ()
    with pytest.raises(ConfigError, match="unknown schedule 'quadratic'"):
        grid_cells({"schedule": ["quadratic"], "attention": ["on"]})
    with pytest.raises(ConfigError, match="attention must be one of"):
        poster_cell("linear", "yes")


def test_a_grid_of_any_keys(folder_dataset):
    base = tiny_config(folder_dataset)
    cells = grid_cells({"prediction": ["eps", "v"], "learn_variance": [False, True], "channel_mults": [(1, 2), (1,)]})
    assert len(cells) == 8 and cells[0].name == "prediction=eps-learn_variance=false-channel_mults=1/2"
    assert cells[-1].name == "prediction=v-learn_variance=true-channel_mults=1"
    config = cells[-1].config(base)
    assert (config.prediction, config.learn_variance, config.channel_mults) == ("v", True, (1,))
    assert config.replace(prediction="eps", learn_variance=False, channel_mults=(1, 2)) == base
    with pytest.raises(ConfigError, match="unknown grid key 'learning_rate'"):
        grid_cells({"learning_rate": [1e-3]})
    with pytest.raises(ConfigError, match="prediction must be one of 'eps', 'x0', 'v', got 'score'"):
        grid_cells({"prediction": ["score"]})[0].config(base)
    with pytest.raises(ConfigError, match="at least one value"):
        grid_cells({"prediction": []})


def test_the_command_line_reads_a_grid_by_the_keys_types(monkeypatch, tmp_path):
    seen = {}
    def fake_run_ablation(base, out_dir, **kwargs):  # records its arguments; the command then prints the (empty) table
        seen.update(kwargs)
        ablation.write_ablation(out_dir / "ablation.json", [], dataset=base.dataset, num_fid=6, sampling=kwargs["sampling"])
        return []

    monkeypatch.setattr(ablation, "run_ablation", fake_run_ablation)
    out = str(tmp_path / "out")
    assert main(["ablation", "--out", out, "--grid", "prediction=eps,v", "learn-variance=false,true", "min_snr_gamma=1,5",
                 "channel_mults=1/2/2,1/2", "attention=on", "--fid-seeds", "0,1", "--nll-images", "10"]) == 0
    assert seen["grid"] == {"prediction": ("eps", "v"), "learn_variance": (False, True), "min_snr_gamma": (1.0, 5.0),
                            "channel_mults": ((1, 2, 2), (1, 2)), "attention": ("on",)}
    assert seen["seeds"] == (0, 1) and seen["nll_images"] == 10 and seen["nll_splits"] == ("test",)
    assert main(["ablation", "--out", out]) == 0 and seen["grid"] == {"schedule": ("linear", "cosine"), "attention": ("on", "off")}
    assert main(["ablation", "--out", out, "--schedules", "cosine"]) == 0 and seen["grid"]["schedule"] == ("cosine",)
    assert main(["ablation", "--out", out, "--grid", "prediction=v", "--schedules", "cosine"]) == 2
    assert main(["ablation", "--out", out, "--grid", "prediction=v", "prediction=x0"]) == 2
    with pytest.raises(SystemExit):
        main(["ablation", "--out", out, "--grid", "learn_variance=maybe"])
    with pytest.raises(SystemExit):
        main(["ablation", "--out", out, "--grid", "lrate=1"])


def test_is_finished_by_epochs_or_max_steps(folder_dataset):
    config = tiny_config(folder_dataset, epochs=2)
    assert not is_finished({"epoch": 1, "step": 9}, config)
    assert is_finished({"epoch": 2, "step": 10}, config)
    assert is_finished({"epoch": 0, "step": 3}, config.replace(max_steps=3))
    assert not is_finished({"epoch": 0, "step": 3}, config.replace(max_steps=4))


def test_a_missing_classifier_stops_the_ablation_before_training(folder_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DdpmError, match=f"ddpm train-classifier --dataset folder:{folder_dataset}"):
        run_ablation(tiny_config(folder_dataset), tmp_path / "out", grid={"schedule": ["linear"], "attention": ["off"]},
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
    train(poster_cell("linear", "off").config(base).replace(max_steps=3), out / "linear-noattn", progress=False)
    calls = []

    def spy(config, run_dir, *, resume, progress):
        calls.append((run_dir.name, resume))
        return train(config, run_dir, resume=resume, progress=progress)

    monkeypatch.setattr(ablation, "train", spy)
    kwargs = dict(grid={"schedule": ["linear"], "attention": ["off", "on"]}, num_fid=6, sampling=SAMPLING, batch_size=4, progress=False)
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
                                  "precision", "test", "recall", "FID", "seeds", "step", "train", "s", "FID", "s", "NLL", "s"]
    assert printed[1].split() == ["linear-noattn", "12.50", "14.25", "0.50", "0.25", "0.50", "0.25", "-", "10", "3", "2", "-"]
    assert printed[-1] == f"ddpm: next: ddpm report {out}"
    # What sampled the FID images, the spacing included, and of eta and the variance only ddim's eta.
    assert json.loads((out / "ablation.json").read_text())["sampling"] == {
        "sampler": "ddim", "steps": 3, "spacing": "trailing", "clip_denoised": True, "eta": 0.0}


def test_a_grid_with_two_sampling_seeds_and_the_nll(folder_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    dataset = f"folder:{folder_dataset}"
    save_classifier(Classifier(1, 8, num_classes=2, width=8), {"dataset": dataset}, classifier_cache_dir() / safe_name(dataset))
    base = tiny_config(folder_dataset, epochs=1, preview_images=0)
    kwargs = dict(grid={"prediction": ["v"], "learn_variance": [True]}, num_fid=6, sampling=SAMPLING, seeds=(0, 1),
                  batch_size=4, nll_images=3, progress=False)
    [row] = run_ablation(base, tmp_path / "grid", **kwargs)
    assert row["name"] == "prediction=v-learn_variance=true" and row["settings"] == {"prediction": "v", "learn_variance": True}
    assert [seed["seed"] for seed in row["seeds"]] == [0, 1]
    fids = [seed["scores"]["test"]["fid"] for seed in row["seeds"]]
    assert fids[0] != fids[1]
    assert row["test_fid"] == pytest.approx(sum(fids) / 2) and row["test_fid_sd"] == pytest.approx(abs(fids[0] - fids[1]) / 2**0.5)
    assert row["provenance"]["settings"]["variance"] == "learned" and row["provenance"]["settings"]["prediction"] == "v"
    nll = row["nll"]["test"]
    assert nll["num_images"] == 3 and row["test_nll"] == nll["bits_per_dim"] > 0 and "train_nll" not in row
    assert row["provenance"]["nll_settings"]["variance"] == "learned"
    written = json.loads((tmp_path / "grid" / row["name"] / "nll-test.json").read_text())
    assert written["bits_per_dim"] == row["test_nll"] and (tmp_path / "grid" / row["name"] / "nll-test.png").is_file()
    # Run again: the NLL's batches are stored, so the model is not evaluated again.
    monkeypatch.setattr("ddpmkit.likelihood.bound_terms", lambda *a, **k: pytest.fail("evaluated again"))
    [again] = run_ablation(base, tmp_path / "grid", **kwargs)
    assert again["test_nll"] == row["test_nll"] and again["test_fid"] == row["test_fid"]


def test_the_objectives_benchmark_groups_rows_by_objective_over_training_seeds():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "objectives_grid.py"
    spec = importlib.util.spec_from_file_location("objectives_grid", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def row(seed, fid, **settings):
        return {"settings": {**settings, "seed": seed}, "config": {"seed": seed}, "test_fid": fid, "train_fid": fid + 1,
                "test_nll": 2.0 + seed, "train_seconds": 100.0 + seed, "step": 800}

    rows = [row(0, 30.0, prediction="eps", loss_weighting="none"), row(0, 20.0, prediction="v", loss_weighting="min-snr"),
            row(0, 25.0, learn_variance=True), row(1, 34.0, prediction="eps", loss_weighting="none"),
            row(1, 26.0, learn_variance=True)]
    summary = module.summarise(rows)
    assert list(summary) == ["eps, none", "v, min-snr", "learned variance (hybrid)"]
    assert summary["eps, none"]["test_fid"] == [30.0, 34.0] and summary["eps, none"]["seed"] == [0, 1]
    assert summary["learned variance (hybrid)"]["test_nll"] == [2.0, 3.0]
    table = module.markdown_table(summary).splitlines()
    # The mean and sample standard deviation over seeds: 32 and 2.83 for 30 and 34.
    assert table[2].startswith("| eps, none | 32.0 ± 2.8 | 30.0 / 34.0 | 33.0 ± 2.8 | 2.50 ± 0.71 | 100 (100-101) | 800 |")
    assert table[3].startswith("| v, min-snr | 20.0 | 20.0 |")
