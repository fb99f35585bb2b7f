"""Data-parallel training on 2 CPU (gloo) processes, and precision / accumulation / clipping.

The 2-process test runs this file as a script under ``accelerate launch`` (the command
``ddpm train --num-processes 2`` builds). Each rank records, in its own file, the
checkpoints it wrote and the weights it ended with, so the test can compare the ranks
with each other and with a single-process run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config

# 2 processes x 2 images x 2 accumulation steps = the global batch of 8 of the
# single-process reference run (1 x 8 x 1).
DISTRIBUTED_FLAGS = ["--batch-size", "8", "--grad-accum", "2"]
FIRST_STOP, LAST_STEP = 3, 7  # the tiny folder has 5 batches per epoch: step 5 ends epoch 0
# Float tolerance: the runs differ only in the order of the gradient sums (all-reduce
# of halves, accumulation of quarters, or one sum): ~1e-7 relative. Adam divides by
# the root of the second moment, so for a weight whose gradient is nearly zero that
# rounding can change its step by up to a whole lr: measured 1e-5 after 3 steps. The
# tolerance is a tenth of one Adam step (lr 1e-3 in tiny_config).
ATOL = 1e-4


def _cli_argv(data: Path, run: Path) -> list[str]:
    config = tiny_config(data)
    return [
        "train", "--out", str(run), "--no-progress", "--dataset", config.dataset, "--image-size", "8", "--channels", "1",
        "--num-steps", str(config.num_steps), "--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1",
        "--lr", str(config.lr), "--log-every", "1", "--checkpoint-every", "3", "--preview-images", "4",
        "--preview-steps", "5", "--fid-batches", "0", "--device", "cpu", *DISTRIBUTED_FLAGS,
    ]


def _worker(data: Path, run: Path, extra_flags: list[str]) -> None:
    """One rank: ``ddpm train`` with extra_flags, through the CLI; then write this rank's
    evidence to run.parent / rank-R-STEPS.pt."""
    from ddpmkit import cli, training

    written: list[str] = []
    final: dict[str, dict[str, torch.Tensor]] = {}
    save_checkpoint, update_ema = training.save_checkpoint, training._update_ema

    def recording_save(path, **kwargs):
        written.append(Path(path).name)
        return save_checkpoint(path, **kwargs)

    def recording_update(ema, model, decay, step):
        update_ema(ema, model, decay, step)
        final.update(model={k: v.clone() for k, v in model.state_dict().items()}, ema={k: v.clone() for k, v in ema.state_dict().items()})

    training.save_checkpoint, training._update_ema = recording_save, recording_update
    assert cli.main([*_cli_argv(data, run), *extra_flags]) == 0
    torch.save({"written": written, **final}, run.parent / f"rank-{os.environ['RANK']}-{extra_flags[-1]}.pt")


def test_two_processes_match_each_other_and_one_process_and_resume(folder_dataset, tmp_path):
    from ddpmkit.checkpoint import load_checkpoint, step_checkpoint_path
    from ddpmkit.cli import accelerate_launch_command
    from ddpmkit.training import train

    run = tmp_path / "two" / "run"
    run.parent.mkdir()
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Two launches: a run stopped at FIRST_STOP, then new processes resuming it.
    for flags in (["--max-steps", str(FIRST_STOP)], ["--resume", "--max-steps", str(LAST_STEP)]):
        command = accelerate_launch_command(2, [__file__, str(folder_dataset), str(run), *flags])
        launched = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=240)
        assert launched.returncode == 0, launched.stderr[-3000:]
        assert "2 process(es) x 2 images x 2 accumulation = global batch 8" in launched.stdout

    first, ranks = ([torch.load(run.parent / f"rank-{rank}-{steps}.pt") for rank in (0, 1)] for steps in (FIRST_STOP, LAST_STEP))
    # Only rank 0 writes: step 3 (checkpoint_every) in the first run; after resuming,
    # step 5 (epoch end), 6 (checkpoint_every) and 7 (the last step).
    assert [first[0]["written"], ranks[0]["written"]] == [[step_checkpoint_path(run, s).name for s in steps] for steps in ((3,), (5, 6, 7))]
    assert first[1]["written"] == ranks[1]["written"] == []
    for part in ("model", "ema"):
        for name, tensor in ranks[0][part].items():
            assert torch.equal(tensor, ranks[1][part][name]), f"ranks differ in {part} {name}"
    saved = load_checkpoint(step_checkpoint_path(run, LAST_STEP))
    for name, tensor in saved.model.items():
        assert torch.equal(tensor, ranks[0]["model"][name])
    assert (run / "samples" / "epoch-000.png").exists()

    single = train(tiny_config(folder_dataset, max_steps=LAST_STEP), tmp_path / "one", progress=False)
    reference = load_checkpoint(single.last_checkpoint)
    for part, weights in (("model", reference.model), ("ema", reference.ema)):
        for name, tensor in weights.items():
            torch.testing.assert_close(ranks[0][part][name], tensor, atol=ATOL, rtol=0)
    at_first_stop = load_checkpoint(step_checkpoint_path(run, FIRST_STOP)).model
    moved = max((tensor - at_first_stop[name]).abs().max().item() for name, tensor in reference.model.items())
    assert moved > 10 * ATOL  # the resumed steps moved the weights far beyond the tolerance

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, LAST_STEP + 1))


def test_num_processes_relaunches_the_same_command_through_accelerate(monkeypatch, tmp_path):
    from ddpmkit import cli

    launched = []
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(cli.subprocess, "call", lambda command: launched.append(command) or 0)
    argv = ["train", "--num-processes", "2", "--out", str(tmp_path / "run"), "--max-steps", "3"]
    monkeypatch.setattr(sys, "argv", ["ddpm", *argv])
    assert cli.main(argv) == 0
    (command,) = launched
    assert command[1:5] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"]
    assert command[5] == "2"
    assert command[command.index("-m", 2):] == ["-m", "ddpmkit", "train", "--out", str(tmp_path / "run"), "--max-steps", "3"]


# --- precision, accumulation and clipping on one CPU process ------------------------------

def _trained_weights(folder, tmp_path, name, **changes):
    """The model weights at the end of a tiny single-process run (1 step unless changed)."""
    from ddpmkit.checkpoint import load_checkpoint
    from ddpmkit.training import train

    summary = train(tiny_config(folder, **{"max_steps": 1, **changes}), tmp_path / name, progress=False)
    return load_checkpoint(summary.last_checkpoint).model


def test_bf16_autocast_trains_close_to_but_not_equal_to_fp32(folder_dataset, tmp_path):
    fp32 = _trained_weights(folder_dataset, tmp_path, "fp32", max_steps=2)
    bf16 = _trained_weights(folder_dataset, tmp_path, "bf16", max_steps=2, precision="bf16")
    gaps = [(fp32[name] - bf16[name]).abs().max().item() for name in fp32]
    # bf16 keeps 8 mantissa bits: the gradients differ, and Adam (lr 1e-3) turns a
    # different gradient sign into weights up to 2 x lr apart after 2 steps.
    assert max(gaps) > 0
    assert max(gaps) <= 2 * 2 * 1e-3 + 1e-6
    assert all(tensor.dtype == torch.float32 for tensor in bf16.values())  # master weights stay fp32


def test_gradient_accumulation_equals_the_full_batch(folder_dataset, tmp_path):
    whole = _trained_weights(folder_dataset, tmp_path, "whole", max_steps=3)
    accumulated = _trained_weights(folder_dataset, tmp_path, "accumulated", max_steps=3, grad_accum=4)
    for name, tensor in whole.items():
        torch.testing.assert_close(accumulated[name], tensor, atol=ATOL, rtol=0)


def test_gradient_clipping_limits_the_update(folder_dataset, tmp_path):
    from ddpmkit.training import UNet, model_config_for

    config = tiny_config(folder_dataset)
    torch.manual_seed(config.seed)
    initial = UNet.from_config(model_config_for(config, 1, 2)).state_dict()
    free = _trained_weights(folder_dataset, tmp_path, "free", grad_clip=0.0)
    clipped = _trained_weights(folder_dataset, tmp_path, "clipped", grad_clip=1e-12)
    # Adam's first step is lr * g / (|g| + eps): ~lr for an unclipped gradient, but
    # < lr * 1e-3 once the gradient norm is clipped to 1e-12, far below eps = 1e-8.
    lr = config.lr
    assert max((free[n] - initial[n]).abs().max().item() for n in initial) > 0.9 * lr
    assert max((clipped[n] - initial[n]).abs().max().item() for n in initial) < 1e-3 * lr


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
