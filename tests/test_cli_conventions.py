"""What every ``ddpm`` command shares, as a newcomer meets it: one-line errors that name the
flag, help that lists choices and defaults, output paths checked before any work, exit
status 128 + signal after an interrupt with one way to continue, progress in sampler
steps, and results that record every setting that made them, typed."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from PIL import Image

from ddpmkit import ablation, classifier, figures, samplers
from ddpmkit.checkpoint import load_trained_model
from ddpmkit.cli import main
from ddpmkit.config import config_from_dict
from ddpmkit.errors import ConfigError
from ddpmkit.io import file_sha256
from ddpmkit.training import TrainSummary
from test_cli import TINY

FAST = ["--steps", "3", "--batch-size", "4", "--device", "cpu"]


def _one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("ddpm: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# --- arguments and help ------------------------------------------------------------------------------

def test_a_bad_argument_is_one_line_with_a_pointer_to_help(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["sample", "runs/x", "--num", "many"])
    assert stopped.value.code == 2
    assert _one_error_line(capsys) == "ddpm: error: argument --num: invalid int value: 'many' (see: ddpm sample --help)"


def test_version(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0 and capsys.readouterr().out == "ddpm (ddpmkit) 0.1.0\n"


def test_help_lists_choices_and_defaults(capsys):
    for argv in (["train", "--help"], ["sample", "--help"], ["ablation", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--schedule {linear,cosine}" in text and "--precision {fp32,bf16,fp16}" in text
    assert "--preview-images PREVIEW_IMAGES" in text and "--sample-every-epoch" not in text
    assert "images per sampling batch (default 256)" in text and "(seed, k) (default 0)" in text
    assert "(default 0: deterministic)" in text
    assert "on, off, or both as on,off" in text


def test_the_old_name_of_preview_images_still_works(folder_dataset, tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{folder_dataset}", "--out", str(run), *TINY, "--max-steps", "1"]
    argv[argv.index("--preview-images")] = "--sample-every-epoch"  # the flag of older scripts
    assert main(argv) == 0
    assert json.loads((run / "config.json").read_text())["preview_images"] == 0
    assert config_from_dict({"sample_every_epoch": 3}).preview_images == 3  # old configs and checkpoints
    with pytest.raises(ConfigError, match="sample_every_epoch is the old name of preview_images"):
        config_from_dict({"sample_every_epoch": 3, "preview_images": 3})


@pytest.mark.parametrize("flags, message", [
    (["--sampler", "dpm-solver++", "--variance", "posterior"], "--variance is the noise of --sampler ddpm (ancestral)"),
    (["--eta", "0.5"], "--eta is the noise of --sampler ddim; --sampler ddpm has none to set"),
    (["--sampler", "ddim", "--eta", "2"], "--eta must be in [0, 1], got 2.0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "51"], "--steps must be at most the model's 50 steps, got 51"),
    (["--class", "0", "--guidance", "-1"], "--guidance must be >= 0"),
    (["--class", "0", "--classifier-guidance", "-1"], "--classifier-guidance must be finite and >= 0"),
])
def test_sampler_errors_name_the_flag(flags, message, tiny_run, tmp_path, capsys):
    assert main(["sample", str(tiny_run), "--out", str(tmp_path / "x.png"), "--device", "cpu", *flags]) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "x.png").exists()


def test_the_library_refuses_the_variance_with_another_sampler_as_it_refuses_eta(tiny_run):
    trained = load_trained_model(tiny_run)
    with pytest.raises(ConfigError, match="variance applies to sampler 'ddpm'"):
        samplers.sample(trained.model, trained.schedule, (1, 1, 8, 8), sampler="dpm-solver++", steps=2, variance="posterior")


def test_fid_errors_name_the_flag(tiny_run, tmp_path, capsys):
    assert main(["fid", str(tiny_run), "--num", "1", "--out", str(tmp_path / "f.json")]) == 2
    assert "--num must be >= 2 and --batch-size >= 1, got 1 and 256" in _one_error_line(capsys)


# --- output paths checked first ------------------------------------------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    """Sampling or training a classifier fails the test: an output check must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")

    for module, name in ((samplers, "sample"), (figures, "sample"), (classifier, "train_classifier"), (ablation, "train")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("command", [
    ["sample", "{run}", "--out", "{blocked}/grid.png"],
    ["plot", "{run}", "--out", "{blocked}/curves.png"],
    ["figures", "forward", "--dataset", "folder:{data}", "--out", "{blocked}"],
    ["figures", "reverse", "{run}", "--out", "{blocked}/reverse.png", "--device", "cpu"],
    ["report", "{run}", "--out", "{blocked}"],
    ["guidance-sweep", "{run}", "--kind", "classifier-free", "--scales", "0,1", "--out", "{blocked}"],
    ["train-classifier", "--dataset", "folder:{data}", "--out", "{blocked}/classifier"],
    ["fid", "{run}", "--out", "{blocked}/fid.json"],
    ["ablation", "--dataset", "folder:{data}", "--out", "{blocked}"],
], ids=lambda command: " ".join(command[:2]))
def test_an_unwritable_output_is_one_line_before_any_work(command, tiny_run, folder_dataset, tmp_path, no_work, capsys):
    blocked = tmp_path / "a-file"  # a regular file where a folder is needed: unwritable, even for root
    blocked.write_text("not a folder")
    argv = [part.format(run=tiny_run, data=folder_dataset, blocked=blocked) for part in command]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith("ddpm: error: cannot write ") and line.endswith(f"{blocked} is not a directory"), line


# --- interrupts --------------------------------------------------------------------------------------------

def _interrupt_sampling(monkeypatch, signum):
    def stop(*args, **kwargs):
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)  # what `kill PID` does to a running ddpm

    monkeypatch.setattr(samplers, "sample", stop)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_command_exits_128_plus_the_signal_and_says_how_to_continue(signum, tiny_run, tmp_path, monkeypatch, capsys):
    name = signal.Signals(signum).name
    _interrupt_sampling(monkeypatch, signum)
    assert main(["sample", str(tiny_run), "--out", str(tmp_path / "s.png"), *FAST]) == 128 + signum
    assert capsys.readouterr().err.splitlines()[-1] == f"ddpm: {'interrupted' if signum == signal.SIGINT else 'terminated'} ({name})"
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    classifier.save_classifier(classifier.Classifier(1, 8, num_classes=2, width=8), {},
                               classifier.classifier_cache_dir() / classifier.classifier_dir_name(load_trained_model(tiny_run).config.dataset))
    argv = ["fid", str(tiny_run), "--num", "6", "--out", str(tmp_path / "f.json"), "--no-progress", *FAST]
    assert main(argv) == 128 + signum
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"({name}); resume with: ddpm " + " ".join(argv))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main put the handler back


def test_an_interrupted_ablation_exits_130_with_one_way_to_resume(folder_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    dataset = f"folder:{folder_dataset}"
    classifier.save_classifier(classifier.Classifier(1, 8, num_classes=2, width=8), {"dataset": dataset},
                               classifier.classifier_cache_dir() / classifier.classifier_dir_name(dataset))
    monkeypatch.setattr(ablation, "train", lambda config, run_dir, **kwargs: TrainSummary(
        run_dir, 3, 0, True, None, None, stop_signal=signal.SIGINT))
    config = tmp_path / "tiny.toml"
    config.write_text(f'dataset = "{dataset}"\nimage_size = 8\nchannels = 1\n')
    argv = ["ablation", "--config", str(config), "--schedules", "linear", "--attention", "off", "--out", str(tmp_path / "out")]
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == (f"ddpm: training of {tmp_path / 'out' / 'linear-noattn'} was interrupted at step 3 "
                                             f"(SIGINT); resume with: ddpm {' '.join(argv)}")
    assert (captured.out + captured.err).count("resume") == 1


# --- what ddpm sample shows and records -------------------------------------------------------------------

@pytest.mark.parametrize("sampler, used, unused", [("ddpm", "variance", "eta"), ("ddim", "eta", "variance")])
def test_sample_records_every_setting_typed_in_the_npz_and_the_png(sampler, used, unused, tiny_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", str(tiny_run), "--num", "6", "--sampler", sampler, "--out", str(out), "--seed", "4", *FAST]) == 0
    printed = capsys.readouterr()
    trained = load_trained_model(tiny_run)
    assert printed.out.startswith(f"ddpm: sampling 6 images from {trained.path} (step 2, EMA weights), {sampler} sampler, 3 steps")
    assert "6/6 [" in printed.err and "batch 2/2" in printed.err  # the bar counts sampler steps: 2 batches x 3
    arrays = np.load(tmp_path / "grid.npz")  # no pickle needed: every value is a plain typed array
    expected = {"checkpoint": str(trained.path.resolve()), "checkpoint_sha256": file_sha256(trained.path), "step": 2,
                "weights": "EMA", "seed": 4, "batch_size": 4, "sampler": sampler, "steps": 3, "spacing": "trailing",
                "clip_denoised": True, "num": 6, "device": "cpu"}
    assert {key: arrays[key].item() for key in expected} == expected
    assert arrays["steps"].dtype == np.int64 and arrays["clip_denoised"].dtype == bool
    assert used in arrays and unused not in arrays
    recorded = json.loads(Image.open(out).text["ddpmkit"])  # the PNG's text chunk: the same record
    assert {key: recorded[key] for key in expected} == expected and used in recorded and unused not in recorded


def test_a_grid_of_many_samples_shows_256_and_says_so(tiny_run, tmp_path, capsys):
    out = tmp_path / "many.png"
    assert main(["sample", str(tiny_run), "--num", "300", "--out", str(out), "--steps", "1", "--device", "cpu"]) == 0
    assert Image.open(out).size == (2 * (16 * 10 + 2), 2 * (16 * 10 + 2))  # 16 x 16 tiles of 8 px and borders, enlarged twice
    assert f"ddpm: grid {out}: the first 256 of 300 images (all are in the .npz)" in capsys.readouterr().out
    assert np.load(tmp_path / "many.npz")["images"].shape == (300, 1, 8, 8)
