"""Guidance from the command line: ``ddpm sample --class/--guidance/--classifier-guidance``
and ``ddpm guidance-sweep``, end to end on tiny models of the two-class folder dataset.

The oracles are the Python API called without any guidance machinery (a conditional
model called with its labels; eq. 6 written out as a plain function), so a test fails if
the CLI passes a flag to the wrong place or drops it.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import TINY

from ddpmkit import figures
from ddpmkit.checkpoint import load_trained_model
from ddpmkit.classifier import find_classifier, load_classifier
from ddpmkit.cli import main
from ddpmkit.images import to_model_range
from ddpmkit.io import file_sha256
from ddpmkit.rng import seeded_generator
from ddpmkit.samplers import sample, sample_batches
from ddpmkit.schedules import make_schedule

SAMPLING = ["--sampler", "ddim", "--steps", "5", "--seed", "2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private ddpmkit cache for this module (classifiers, reference features)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("DDPMKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


def _train(folder, run, *extra):
    assert main(["train", "--dataset", f"folder:{folder}", "--out", str(run), *TINY, *extra]) == 0
    return run


@pytest.fixture(scope="module")
def conditional_run(folder_dataset, tmp_path_factory):
    return _train(folder_dataset, tmp_path_factory.mktemp("runs") / "conditional", "--max-steps", "4",
                  "--conditional", "--label-dropout", "0.3")


@pytest.fixture(scope="module")
def no_dropout_run(folder_dataset, tmp_path_factory):
    return _train(folder_dataset, tmp_path_factory.mktemp("runs") / "no-dropout", "--max-steps", "2",
                  "--conditional", "--label-dropout", "0")


@pytest.fixture(scope="module")
def unconditional_run(folder_dataset, tmp_path_factory):
    return _train(folder_dataset, tmp_path_factory.mktemp("runs") / "unconditional", "--max-steps", "2")


@pytest.fixture(scope="module")
def classifiers(folder_dataset, unconditional_run, cache):
    """The folder dataset's classifiers, made by ``ddpm train-classifier`` into the cache:
    "features" (FID and the judge), "guide" (--guide, the poster form's) and "noisy"
    (--noisy --for the tiny runs, which takes their schedule)."""
    common = ["--epochs", "2", "--device", "cpu"]
    dataset = ["--dataset", f"folder:{folder_dataset}", "--image-size", "8", "--channels", "1"]
    for role, flags in (("features", dataset), ("guide", [*dataset, "--guide"]), ("noisy", ["--noisy", "--for", str(unconditional_run)])):
        assert main(["train-classifier", *flags, *common]) == 0
    found = {role: find_classifier(f"folder:{folder_dataset}", role) for role in ("features", "guide")}
    return {**found, "noisy": find_classifier(f"folder:{folder_dataset}", "noisy", make_schedule("linear", 50))}


def _sample(run, out, *flags):
    assert main(["sample", str(run), "--out", str(out), *SAMPLING, *flags]) == 0
    return np.load(out.with_suffix(".npz"))


def _python_samples(model, labels=None, **guidance):
    """The same samples from the Python API: CLI seed, batch size and sampler settings."""
    image_shape = (1, 8, 8)
    num = 6 if labels is None else len(labels)
    batches = sample_batches(model, make_schedule("linear", 50), num, 4, image_shape, seed=2, labels=labels,
                             sampler="ddim", steps=5, **guidance)
    return torch.cat(list(batches)).numpy()


def test_classifier_free_guidance_is_eq_6_and_w_0_is_plain_conditional(conditional_run, tmp_path):
    unet = load_trained_model(conditional_run).model
    plain = _sample(conditional_run, tmp_path / "w0.png", "--class", "1", "--num", "6", "--guidance", "0")
    labels = torch.ones(6, dtype=torch.int64)
    assert np.array_equal(plain["labels"], labels.numpy()) and float(plain["guidance"]) == 0
    # w = 0: exactly the model called with the labels, bit for bit.
    assert np.array_equal(plain["samples"], _python_samples(lambda x, t: unet(x, t, labels[: len(x)])))

    guided = _sample(conditional_run, tmp_path / "w2.png", "--class", "1", "--num", "6", "--guidance", "2")

    def eq_6(x, t):  # (1 + w) eps(x, y) - w eps(x, no label), w = 2, as two separate calls
        return 3 * unet(x, t, labels[: len(x)]) - 2 * unet(x, t, None)

    assert np.allclose(guided["samples"], _python_samples(eq_6), atol=1e-5)
    assert not np.allclose(guided["samples"], plain["samples"], atol=1e-3)


def test_classifier_guidance_lambda_0_is_unguided_and_lambda_uses_the_cached_noisy_classifier(
    unconditional_run, conditional_run, classifiers, tmp_path
):
    unguided = _sample(unconditional_run, tmp_path / "plain.png", "--num", "6")
    zero = _sample(unconditional_run, tmp_path / "zero.png", "--num", "6", "--class", "1", "--classifier-guidance", "0")
    assert np.array_equal(zero["samples"], unguided["samples"])
    assert np.array_equal(zero["labels"], np.ones(6)) and str(zero["classifier"]) == str(classifiers["noisy"])

    guided = _sample(unconditional_run, tmp_path / "guided.png", "--num", "6", "--class", "1", "--classifier-guidance", "3")
    noisy, _ = load_classifier(classifiers["noisy"])
    unet = load_trained_model(unconditional_run).model
    expected = _python_samples(unet, torch.ones(6, dtype=torch.int64), classifier=noisy, classifier_scale=3.0)
    assert np.allclose(guided["samples"], expected, atol=1e-6)
    assert not np.allclose(guided["samples"], unguided["samples"], atol=1e-3)

    # A conditional model: lambda = 0 is plain conditional sampling; the poster form takes the clean classifier.
    conditional = _sample(conditional_run, tmp_path / "c.png", "--num", "6", "--class", "0")
    conditional_zero = _sample(conditional_run, tmp_path / "c0.png", "--num", "6", "--class", "0", "--classifier-guidance", "0")
    assert np.array_equal(conditional["samples"], conditional_zero["samples"])
    poster = _sample(conditional_run, tmp_path / "p.png", "--num", "6", "--class", "0", "--classifier-guidance", "50",
                     "--guidance-form", "poster")
    assert str(poster["classifier"]) == str(classifiers["guide"]) and str(poster["guidance_form"]) == "poster"
    assert not np.allclose(poster["samples"], conditional["samples"], atol=1e-3)


@pytest.mark.parametrize("classes, expected", [("all", [0, 0, 0, 1, 1, 1]), ("1,0", [1, 1, 1, 0, 0, 0])])
def test_per_class_grid_has_one_row_per_class(classes, expected, conditional_run, tmp_path):
    arrays = _sample(conditional_run, tmp_path / "grid.png", "--class", classes, "--per-class", "3")
    assert arrays["labels"].tolist() == expected and arrays["images"].shape == (6, 1, 8, 8)
    # 3 tiles of 8 pixels with 2-pixel borders across, 2 rows down, enlarged twice.
    assert Image.open(tmp_path / "grid.png").size == (2 * (3 * 10 + 2), 2 * (2 * 10 + 2))


def test_a_grid_of_many_samples_per_class_shows_every_class_and_says_how_many(conditional_run, tmp_path, capsys):
    out = tmp_path / "many.png"
    assert main(["sample", str(conditional_run), "--out", str(out), "--class", "all", "--per-class", "150", "--steps", "1",
                 "--batch-size", "300"]) == 0
    # Every class, one row each, 16 of its 150 images: 16 tiles across, 2 rows down.
    assert Image.open(out).size == (2 * (16 * 10 + 2), 2 * (2 * 10 + 2))
    assert (f"ddpm: grid {out}: one row per class, the first 16 images of each (32 of 300; all are in the .npz)"
            in capsys.readouterr().out)
    assert np.load(tmp_path / "many.npz")["labels"].tolist() == [0] * 150 + [1] * 150


def test_guided_samples_record_the_classifier_and_its_hash(unconditional_run, classifiers, tmp_path):
    arrays = _sample(unconditional_run, tmp_path / "g.png", "--num", "2", "--class", "1", "--classifier-guidance", "2")
    assert str(arrays["classifier"]) == str(classifiers["noisy"].resolve())
    assert str(arrays["classifier_sha256"]) == file_sha256(classifiers["noisy"] / "model.safetensors")
    assert arrays["classes"].tolist() == [1] and float(arrays["classifier_guidance"]) == 2.0
    assert json.loads(Image.open(tmp_path / "g.png").text["ddpmkit"])["classifier_sha256"] == str(arrays["classifier_sha256"])


def test_reverse_figure_of_a_class_ends_with_the_finished_sample(conditional_run, tmp_path, monkeypatch, capsys):
    drawn = {}
    real_save_strips = figures.save_strips

    def spy(frames, columns, rows, title, path, **kwargs):
        drawn.update(frames=frames, columns=columns, rows=rows)
        return real_save_strips(frames, columns, rows, title, path, **kwargs)

    monkeypatch.setattr(figures, "save_strips", spy)
    out = tmp_path / "reverse.png"
    assert main(["figures", "reverse", str(conditional_run), "--class", "1,0", "--num-images", "2", "--frames", "2",
                 "--sampler", "ddim", "--steps", "4", "--seed", "3", "--device", "cpu", "--out", str(out)]) == 0
    assert drawn["columns"][-1] == "x_0 (sample)" and len(drawn["columns"]) == 3
    assert drawn["rows"] == ["x_t, class 1", "predicted x0", "x_t, class 0", "predicted x0"]
    trained = load_trained_model(conditional_run)
    expected = sample(trained.model, trained.schedule, (2, 1, 8, 8), sampler="ddim", steps=4, generator=seeded_generator(3),
                      labels=torch.tensor([1, 0]))
    assert torch.equal(drawn["frames"][::2, -1], expected) and torch.equal(drawn["frames"][1::2, -1], expected)
    assert json.loads(Image.open(out).text["ddpmkit"])["labels"] == [1, 0]
    capsys.readouterr()


def test_class_without_per_class_fills_num_in_blocks(conditional_run, tmp_path):
    arrays = _sample(conditional_run, tmp_path / "blocks.png", "--class", "1,0", "--num", "5")
    assert arrays["labels"].tolist() == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("run, flags, message", [
    ("unconditional", ["--class", "1", "--guidance", "2"], "needs a conditional model"),
    ("unconditional", ["--class", "1"], "need a conditional model (trained with --conditional) or classifier guidance"),
    ("conditional", ["--class", "2"], "class(es) [2] out of range: the classes are 0 .. 1"),
    ("conditional", ["--guidance", "1"], "need --class"),
    ("conditional", ["--class", "1", "--classifier-guidance", "1"], "no noisy classifier for folder:"),
    ("conditional", ["--class", "1", "--classifier-guidance", "1", "--guidance-form", "poster"],
     "no guiding classifier (poster form) for folder:"),
    ("no-dropout", ["--class", "1", "--guidance", "1"], "needs a model trained with label dropout"),
    ("conditional", ["--class", "1", "--classifier-guidance", "1", "--classifier", "{tmp}"], "holds no classifier"),
])
def test_guidance_errors_are_one_line(run, flags, message, conditional_run, unconditional_run, no_dropout_run, tmp_path,
                                      monkeypatch, capsys):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "empty-cache"))
    run_dir = {"conditional": conditional_run, "unconditional": unconditional_run, "no-dropout": no_dropout_run}[run]
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    assert main(["sample", str(run_dir), "--out", str(tmp_path / "x.png"), *SAMPLING, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_poster_form_refuses_a_noisy_classifier(conditional_run, classifiers, tmp_path, capsys):
    flags = ["--class", "1", "--classifier-guidance", "1", "--guidance-form", "poster", "--classifier", str(classifiers["noisy"])]
    assert main(["sample", str(conditional_run), "--out", str(tmp_path / "x.png"), *SAMPLING, *flags]) == 2
    assert "time-conditioned" in capsys.readouterr().err


def test_guidance_sweep_end_to_end(conditional_run, classifiers, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["guidance-sweep", str(conditional_run), "--kind", "classifier-free", "--scales", "0,2", "--per-class", "4",
            "--sampler", "ddim", "--steps", "5", "--batch-size", "4", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"ddpm: classifier-free guidance sweep of {conditional_run} over scales 0, 2")  # before the work
    table = [line for line in printed if not line.startswith("ddpm: ")]
    assert table[0].split() == ["scale", "accuracy", "FID", "precision", "recall"] and len(table) == 3
    written = json.loads((out / "guidance-sweep.json").read_text())
    results, settings = written["results"], written["settings"]
    assert [row["scale"] for row in results] == [0.0, 2.0] and all(row["num"] == 8 for row in results)
    assert all(set(row) == {"scale", "accuracy", "fid", "precision", "recall", "num"} for row in results)
    assert settings["classes"] == [0, 1] and settings["kind"] == "classifier-free" and settings["steps"] == 5
    assert (out / "guidance-sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert settings["checkpoint_sha256"] == file_sha256(load_trained_model(conditional_run).path) and settings["spacing"] == "trailing"
    grid = Image.open(out / "guidance-samples.png")  # one row of samples per scale, with the settings in its text chunk
    assert json.loads(grid.text["ddpmkit"]) == {key: value for key, value in settings.items() if key != "warnings"}
    # The w = 0 row judges the very samples `ddpm sample` makes with the same seed and batches.
    arrays = np.load(_sample_for_sweep(conditional_run, tmp_path).with_suffix(".npz"))
    judge, _ = load_classifier(classifiers["features"])
    with torch.no_grad():
        predicted = judge(to_model_range(torch.from_numpy(arrays["images"]))).argmax(dim=1).numpy()
    assert results[0]["accuracy"] == pytest.approx(float(np.mean(predicted == arrays["labels"])))

    assert main([*argv[:3], "classifier", *argv[4:], "--out", str(tmp_path / "cg")]) == 0
    classifier_settings = json.loads((tmp_path / "cg" / "guidance-sweep.json").read_text())["settings"]
    assert classifier_settings["guide_classifier"] == str(classifiers["noisy"].resolve())
    assert classifier_settings["guide_classifier_sha256"] == file_sha256(classifiers["noisy"] / "model.safetensors")


def _sample_for_sweep(run, tmp_path):
    out = tmp_path / "same.png"
    assert main(["sample", str(run), "--out", str(out), "--class", "all", "--per-class", "4", "--sampler", "ddim",
                 "--steps", "5", "--batch-size", "4", "--seed", "0"]) == 0
    return out


def test_guidance_sweep_classifier_free_needs_a_conditional_model(unconditional_run, classifiers, tmp_path, capsys):
    argv = ["guidance-sweep", str(unconditional_run), "--kind", "classifier-free", "--scales", "0,1", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "needs a conditional model" in capsys.readouterr().err


def test_a_model_trained_without_label_dropout_samples_conditionally_but_refuses_guidance(no_dropout_run, tmp_path, capsys):
    unet = load_trained_model(no_dropout_run).model
    plain = _sample(no_dropout_run, tmp_path / "w0.png", "--class", "1", "--num", "6")  # w = 0: allowed
    labels = torch.ones(6, dtype=torch.int64)
    assert np.array_equal(plain["samples"], _python_samples(lambda x, t: unet(x, t, labels[: len(x)])))
    argv = ["guidance-sweep", str(no_dropout_run), "--kind", "classifier-free", "--scales", "0,1", "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    assert "its 'no label' embedding is untrained" in capsys.readouterr().err


def test_train_classifier_for_a_run_takes_its_schedule_and_a_mismatched_one_is_refused(unconditional_run, classifiers, tmp_path, capsys):
    meta = json.loads((classifiers["noisy"] / "config.json").read_text())
    assert meta["report"]["schedule"] == load_trained_model(unconditional_run).schedule.identity()
    assert classifiers["noisy"].name.startswith(f"{classifiers['features'].name}-noisy-linear-50-")
    cosine = tmp_path / "cosine"
    assert main(["train-classifier", "--noisy", "--for", str(unconditional_run), "--schedule", "cosine"]) == 2  # --for decides
    assert main(["train-classifier", "--dataset", json.loads((unconditional_run / "config.json").read_text())["dataset"],
                 "--image-size", "8", "--channels", "1", "--epochs", "1", "--noisy", "--schedule", "cosine", "--num-steps", "50",
                 "--out", str(cosine), "--device", "cpu"]) == 0
    capsys.readouterr()
    flags = ["--num", "4", "--class", "1", "--classifier-guidance", "1", "--classifier", str(cosine)]
    assert main(["sample", str(unconditional_run), "--out", str(tmp_path / "x.png"), *SAMPLING, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained for the cosine schedule, T = 50" in err and "samples with the linear schedule, T = 50" in err
    assert not (tmp_path / "x.png").exists()


def test_the_poster_form_sweep_is_judged_by_another_network_than_its_guide(conditional_run, classifiers, tmp_path, capsys):
    argv = ["guidance-sweep", str(conditional_run), "--kind", "classifier", "--guidance-form", "poster", "--scales", "0,50",
            "--per-class", "2", "--sampler", "ddim", "--steps", "3", "--batch-size", "4"]
    assert main([*argv, "--out", str(tmp_path / "poster")]) == 0
    printed = capsys.readouterr().out
    settings = json.loads((tmp_path / "poster" / "guidance-sweep.json").read_text())["settings"]
    assert settings["judge"] == str(classifiers["features"]) and settings["guide_classifier"] == str(classifiers["guide"])
    assert settings["judge_sha256"] != settings["guide_classifier_sha256"]
    assert f"judged by {classifiers['features']}" in printed and f"guided by {classifiers['guide']}" in printed
    # The judge (FID's classifier) as the guide: refused.
    assert main([*argv, "--classifier", str(classifiers["features"]), "--out", str(tmp_path / "self")]) == 2
    assert "must not be scored by their own guide" in capsys.readouterr().err
    assert not (tmp_path / "self").exists()
