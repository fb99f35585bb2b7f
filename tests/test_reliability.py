"""Reliability (issue 8): kills, signals, crafted pickles, numerical blow-ups, full disks,
read-only run directories, large --num. Each fault goes through the ``ddpm`` command."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import ddpmkit.checkpoint as checkpoint_module
import ddpmkit.inception as inception
from conftest import tiny_config
from ddpmkit import CheckpointError
from ddpmkit.checkpoint import latest_checkpoint, load_checkpoint, load_trained_model, step_checkpoint_path, step_checkpoints
from ddpmkit.cli import main
from ddpmkit.training import train
from ddpmkit.unet import UNet
from test_cli import TINY

# One thread, as the in-process runs (conftest): the same float reduction order, so that a
# subprocess and the test process compute bit-identical steps.
_SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train_argv(folder: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", f"folder:{folder}", "--out", str(run), *TINY, "--log-every", "1", *extra]


def _start_training(folder: Path, run: Path, **popen: object) -> subprocess.Popen:
    """``ddpm train`` in a subprocess, long enough (100000 steps) to be stopped from outside."""
    argv = _train_argv(folder, run, "--dropout", "0.1", "--max-steps", "100000", "--epochs", "100000")
    return subprocess.Popen([sys.executable, "-m", "ddpmkit", *argv], env=_SUBPROCESS_ENV, **popen)


def _wait_for_checkpoint(process: subprocess.Popen, run: Path, min_step: int) -> None:
    deadline = time.monotonic() + 180  # a guard against a hang, not a timing assertion
    while time.monotonic() < deadline:
        if any(int(path.stem.split("-")[1]) >= min_step for path in step_checkpoints(run)):
            return
        assert process.poll() is None, f"training ended before step {min_step}: {process.communicate()}"
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no checkpoint of step >= {min_step} within 180 s")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.startswith("ddpm: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(path.relative_to(run)): path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def trained_run(folder_dataset, tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4) that tests copy before harming."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(folder_dataset, max_steps=4, checkpoint_every=2, preview_images=0), run, progress=False)
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


# --- 1. checkpoints --------------------------------------------------------------------------


def test_sigkill_then_resume_gives_the_bit_identical_run(folder_dataset, tmp_path, capsys):
    run = tmp_path / "killed"
    process = _start_training(folder_dataset, run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(process, run, 4)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_at = load_checkpoint(latest_checkpoint(run)).state["step"]
    # What a kill in the middle of writing leaves: a torn temporary checkpoint and a torn metrics line.
    torn = run / "checkpoints" / f".step-{killed_at + 1:09d}.safetensors.tmp-99999"
    torn.write_bytes(b"\x00" * 100)
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 99999, "epo')

    total = killed_at + 7  # past at least one epoch end (5 batches an epoch) and a step checkpoint
    assert main(["train", "--out", str(run), "--resume", "--max-steps", str(total), "--no-progress"]) == 0
    assert not torn.exists()  # cleaned up on resume
    whole = tmp_path / "whole"
    assert main(_train_argv(folder_dataset, whole, "--dropout", "0.1", "--max-steps", str(total), "--epochs", "100000")) == 0

    resumed_file, whole_file = step_checkpoint_path(run, total), step_checkpoint_path(whole, total)
    resumed_tensors, whole_tensors = load_file(str(resumed_file)), load_file(str(whole_file))
    assert resumed_tensors.keys() == whole_tensors.keys()
    assert {key.split(".")[0] for key in whole_tensors} == {"model", "ema", "optim", "rng"}
    for key, value in whole_tensors.items():
        assert torch.equal(value, resumed_tensors[key]), f"{key} differs after kill at step {killed_at} and resume"
    assert load_checkpoint(resumed_file).state == load_checkpoint(whole_file).state
    losses = {name: [(r["step"], r["train_loss"]) for r in _metrics(path) if "train_loss" in r] for name, path in (("r", run), ("w", whole))}
    assert losses["r"] == losses["w"] and [step for step, _ in losses["r"]] == list(range(1, total + 1))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_cleanly_with_a_checkpoint_and_says_how_to_resume(signum, folder_dataset, tmp_path):
    run = tmp_path / "run"
    process = _start_training(folder_dataset, run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(process, run, 2)
    process.send_signal(signum)
    out, err = process.communicate(timeout=180)
    # 128 + the signal, as a shell reports a process ended by it: `ddpm train && ddpm fid` stops here.
    assert process.returncode == 128 + signum, err
    stopped = load_checkpoint(latest_checkpoint(run)).state["step"]  # a checkpoint of the step it stopped at
    name = signal.Signals(signum).name
    assert f"ddpm: stopped at step {stopped} ({name}); checkpoint {step_checkpoint_path(run, stopped)}" in out
    assert err.splitlines()[-1] == f"ddpm: training stopped at step {stopped} ({name}); resume with: ddpm train --out {run} --resume"
    assert (out + err).count("resume with") == 1 and "Traceback" not in err


class _Exploit:
    """Unpickling it runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_a_crafted_pickle_is_refused_without_running(folder_dataset, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(tiny_config(folder_dataset).to_json())
    (run / "checkpoints" / "step-000000001.safetensors").write_bytes(pickle.dumps(_Exploit(marker)))
    torch.save({"weights": _Exploit(marker)}, tmp_path / "evil.pt")
    for argv in (["sample", str(run)], ["train", "--out", str(run), "--resume"], ["sample", str(tmp_path / "evil.pt")]):
        assert main(argv) == 2
        assert "not a readable ddpmkit checkpoint" in _one_error_line(capsys)
    # The one torch.load (FID Inception weights) has weights_only=True; pass its hash check to reach it.
    monkeypatch.setattr(inception, "INCEPTION_SHA256_PREFIX", "")
    with pytest.raises(CheckpointError, match="not a readable torch weights file"):
        inception.load_inception(tmp_path / "evil.pt")
    assert not marker.exists()
    pickle.loads((run / "checkpoints" / "step-000000001.safetensors").read_bytes())
    assert marker.exists()  # the files were real exploits


def test_resuming_into_a_mismatched_model_names_the_shapes(run_copy, capsys):
    stored = json.loads((run_copy / "config.json").read_text())
    assert load_checkpoint(latest_checkpoint(run_copy)).config == stored  # the checkpoint records the config
    (run_copy / "config.json").write_text(json.dumps({**stored, "base_channels": 16}))
    assert main(["train", "--out", str(run_copy), "--resume", "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "does not match the model: shape: " in line and "(8,) vs model (16,)" in line


def test_a_truncated_checkpoint_says_so_and_names_the_newest_intact_one(run_copy, capsys):
    latest, older = step_checkpoint_path(run_copy, 4), step_checkpoint_path(run_copy, 2)
    latest.write_bytes(latest.read_bytes()[:5000])  # a copy cut short
    before = _snapshot(run_copy)
    for argv in (["train", "--out", str(run_copy), "--resume", "--max-steps", "6"], ["sample", str(run_copy)]):
        assert main(argv) == 2
        line = _one_error_line(capsys)
        assert f"{latest} is truncated or damaged" in line
        assert line.endswith(f"the newest intact checkpoint of the run is {older}: delete {latest.name} to use that one")
    assert _snapshot(run_copy) == before
    older.write_bytes(b"\x00" * 10)
    assert main(["sample", str(run_copy)]) == 2
    assert _one_error_line(capsys).endswith("the run has no older intact checkpoint")


def test_resuming_with_max_steps_below_the_current_step_is_refused(run_copy, capsys):
    before = _snapshot(run_copy)
    assert main(["train", "--out", str(run_copy), "--resume", "--max-steps", "2", "--no-progress"]) == 2
    assert _one_error_line(capsys) == (f"ddpm: error: {run_copy} is at step 4, past the 2 steps that epochs 2 and max_steps 2 "
                                       "allow: nothing to train; resume with a larger --max-steps or --epochs")
    assert _snapshot(run_copy) == before  # config.json still says max_steps 4
    assert main(["train", "--out", str(run_copy), "--resume", "--no-progress"]) == 0  # at its end: nothing to do, no error


def test_checkpoints_and_classifiers_are_written_with_the_usual_file_mode(run_copy, tmp_path):
    from ddpmkit.classifier import Classifier, save_classifier

    mask = os.umask(0o022)
    try:
        train(load_trained_model(run_copy).config.replace(max_steps=5), run_copy, resume=True, progress=False)
        directory = save_classifier(Classifier(1, 8, num_classes=2, width=8), {}, tmp_path / "classifier")
    finally:
        os.umask(mask)
    files = [step_checkpoint_path(run_copy, 5), run_copy / "config.json", *directory.iterdir()]
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in files} == {path.name: "0o644" for path in files}


# --- 2. numbers ------------------------------------------------------------------------------


def test_an_absurd_learning_rate_stops_naming_the_step_and_keeps_the_work(folder_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_argv(folder_dataset, run, "--lr", "1e30", "--checkpoint-every", "1", "--max-steps", "50")) == 2
    line = _one_error_line(capsys)
    assert line.startswith("ddpm: error: non-finite gradient at step ")
    step = int(line.removeprefix("ddpm: error: non-finite gradient at step ").split()[0])
    last = load_checkpoint(latest_checkpoint(run))
    assert last.state["step"] == step - 1 >= 1
    assert all(torch.isfinite(value).all() for value in [*last.model.values(), *last.ema.values()])
    assert [r["step"] for r in _metrics(run) if "train_loss" in r] == list(range(1, step))


def test_fp16_on_cpu_is_refused_before_anything_is_written(folder_dataset, tmp_path, capsys):
    # Accelerate has no fp16 loss scaler on CPU: there would be no overflow skipping to rely on.
    assert main(_train_argv(folder_dataset, tmp_path / "run", "--precision", "fp16")) == 2
    assert "--precision fp16 needs a CUDA device" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


# --- 3. bad input: config files, full disks, read-only run directories ----------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rate = 1e-3", "unknown key(s) learning_rate; valid keys: dataset, data_dir, image_size"),
        ('epochs = "ten"', "epochs must be an integer, got 'ten'"),
        ("ema_decay = 1.5", "ema_decay must be in [0, 1)"),
    ],
)
def test_a_bad_config_file_is_one_clear_line(text, message, tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(text + "\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(folder_dataset, tmp_path, capsys, monkeypatch):
    real_save_file = checkpoint_module.save_file
    calls = []

    def disk_fills_up(tensors, filename, metadata):
        calls.append(filename)
        if len(calls) == 1:
            return real_save_file(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\x00" * 1000)  # half a file, then the disk is full
        raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) at path {filename}")

    monkeypatch.setattr(checkpoint_module, "save_file", disk_fills_up)
    run = tmp_path / "run"
    assert main(_train_argv(folder_dataset, run, "--checkpoint-every", "1", "--max-steps", "5")) == 2
    line = _one_error_line(capsys)
    assert f"could not write checkpoint {step_checkpoint_path(run, 2)}: " in line and "No space left on device" in line
    assert [path.name for path in (run / "checkpoints").iterdir()] == ["step-000000001.safetensors"]  # no torn file
    assert load_trained_model(run).step == 1


def test_a_read_only_run_directory_is_refused_on_resume_and_left_intact(run_copy, capsys, monkeypatch):
    before = _snapshot(run_copy)
    if os.geteuid() == 0:
        # root writes through permission bits: fail the renames into the run directory instead.
        real_replace = os.replace

        def read_only(source, destination):
            if Path(destination).is_relative_to(run_copy):
                raise OSError(errno.EROFS, "Read-only file system")
            return real_replace(source, destination)

        monkeypatch.setattr(os, "replace", read_only)
    else:
        for folder in (run_copy, run_copy / "checkpoints"):
            folder.chmod(0o555)
    try:
        assert main(["train", "--out", str(run_copy), "--resume", "--max-steps", "6", "--no-progress"]) == 2
    finally:
        for folder in (run_copy, run_copy / "checkpoints"):
            folder.chmod(0o755)
    line = _one_error_line(capsys)
    assert f"could not write run config {run_copy / 'config.json'}: " in line
    assert ("Read-only file system" if os.geteuid() == 0 else "Permission denied") in line
    assert _snapshot(run_copy) == before  # nothing changed, no temporary left
    assert load_trained_model(run_copy).step == 4


def test_a_full_disk_while_logging_metrics_is_one_clear_line(run_copy, capsys, monkeypatch):
    real_open = Path.open

    def disk_full_for_appends(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and mode.startswith("a"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", disk_full_for_appends)
    assert main(["train", "--out", str(run_copy), "--resume", "--max-steps", "6", "--no-progress"]) == 2
    assert _one_error_line(capsys) == f"ddpm: error: could not write {run_copy / 'metrics.jsonl'}: No space left on device"
    assert load_trained_model(run_copy).step == 4


# --- 4. load ---------------------------------------------------------------------------------


def test_sample_runs_the_model_on_batches_of_at_most_batch_size(trained_run, tmp_path, monkeypatch):
    sizes = []
    forward = UNet.forward

    def recording(self, x, *args, **kwargs):
        sizes.append(x.shape[0])
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", recording)
    out = tmp_path / "grid.png"
    argv = ["sample", str(trained_run), "--num", "7", "--batch-size", "3", "--sampler", "ddim", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    assert sizes == [3, 3, 3, 3, 1, 1]  # 3 batches, 2 model evaluations each
    assert np.load(out.with_suffix(".npz"))["images"].shape == (7, 1, 8, 8)
