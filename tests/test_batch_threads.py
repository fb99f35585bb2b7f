"""Batch parallelism over CPU threads: the split computes what the whole batch would, in the
caller's torch modes, on single-threaded workers; training through it equals training without."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from ddpmkit.batch_threads import BatchThreads, _pool, backward_in_slices, map_slices, resolve_cpu_workers
from ddpmkit.errors import ConfigError
from ddpmkit.unet import UNet, UNetConfig


def _conditional_unet() -> UNet:
    torch.manual_seed(0)
    model = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), num_classes=3)
    torch.nn.init.normal_(model.output[-1].weight, std=0.1)  # a zero output layer would make every comparison trivial
    return model


@pytest.mark.parametrize("workers", [2, 3, 7])
def test_split_forward_equals_the_whole_batch(workers):
    model = _conditional_unet().eval()
    x = torch.randn(130, 1, 8, 8)  # more than 2 x ROWS_PER_CALL: more slices than workers
    t = torch.arange(130) % 50
    y = torch.arange(130) % 4 - 1
    split = BatchThreads(model, workers)
    with torch.inference_mode():
        for args in ((x, t, y), (x, t), (x, 17), (x, torch.tensor(17), None), (x[:5], t[:5], y[:5])):
            torch.testing.assert_close(split(*args), model(*args), atol=1e-5, rtol=0)  # kernels round per batch size
        torch.testing.assert_close(split(x, t=t, y=y), model(x, t, y), atol=1e-5, rtol=0)
    assert split.null_label == model.null_label == 3 and split.config is model.config


@pytest.fixture
def two_intra_op_threads():
    """The caller on 2 threads (conftest sets 1, which would hide a worker left at the
    caller's count), and fresh pools, whose creation is what changes thread counts."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    _pool.cache_clear()
    yield
    torch.set_num_threads(previous)


def test_workers_are_other_threads_with_one_intra_op_thread_each(two_intra_op_threads):
    seen = map_slices(lambda rows: (rows, threading.get_ident(), torch.get_num_threads()), 10, 3)
    assert [rows for rows, _, _ in seen] == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert {count for _, _, count in seen} == {1}
    assert threading.get_ident() not in {ident for _, ident, _ in seen}
    assert torch.get_num_threads() == 2  # the caller keeps its own...
    later = []  # ...and so does a thread started afterwards, which takes the process-wide default
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [2]
    assert map_slices(lambda rows: (rows, threading.get_ident()), 1, 4) == [(slice(0, 1), threading.get_ident())]
    capped = map_slices(lambda rows: (rows, threading.get_ident()), 10, 2, max_rows=3)
    assert [rows for rows, _ in capped] == [slice(0, 2), slice(2, 5), slice(5, 7), slice(7, 10)]
    assert len({ident for _, ident in capped}) <= 2 and threading.get_ident() not in {ident for _, ident in capped}
    one_call = []
    BatchThreads(lambda x: one_call.append(len(x)) or x, 1)(torch.zeros(300))  # one worker: the model's own call
    assert one_call == [300]
    in_caller = map_slices(lambda rows: (rows, threading.get_ident()), 5, 1, max_rows=2)
    assert in_caller == [(slice(0, 1), threading.get_ident()), (slice(1, 3), threading.get_ident()), (slice(3, 5), threading.get_ident())]


def test_workers_run_in_the_callers_grad_inference_and_autocast_modes():
    model = _conditional_unet()
    split = BatchThreads(model, 2)
    x, t = torch.randn(4, 1, 8, 8), torch.arange(4)
    assert split(x, t).requires_grad
    with torch.no_grad():
        assert not split(x, t).requires_grad
    with torch.inference_mode():
        assert torch.is_inference(split(x, t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert split(x, t).dtype == model(x, t).dtype == torch.bfloat16
    # back in the worker threads with no caller state: grad mode on, no autocast
    assert map_slices(lambda rows: (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")), 2, 2) == [(True, False)] * 2


def _loss_on(model, x, t, noise):
    def slice_loss(rows):
        return F.mse_loss(model(x[rows], t[rows]), noise[rows], reduction="sum") / noise.numel()

    return slice_loss


def test_backward_in_slices_gives_the_whole_batch_gradients_reproducibly_and_accumulates():
    model = _conditional_unet()
    x, t, noise = torch.randn(6, 1, 8, 8), torch.arange(0, 60, 10), torch.randn(6, 1, 8, 8)
    reference = _loss_on(model, x, t, noise)(slice(None))
    reference.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    runs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        loss = backward_in_slices(_loss_on(model, x, t, noise), 6, model.parameters(), 3)
        torch.testing.assert_close(loss, reference.detach(), atol=1e-7, rtol=1e-6)
        assert not loss.requires_grad
        runs.append([p.grad.clone() for p in model.parameters()])
    for got, want, again in zip(runs[0], expected, runs[1]):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)
        assert torch.equal(got, again)  # slice order, not thread timing
    backward_in_slices(_loss_on(model, x, t, noise), 6, model.parameters(), 2)  # onto the grads already there
    for parameter, once in zip(model.parameters(), runs[1]):
        torch.testing.assert_close(parameter.grad, 2 * once, atol=1e-7, rtol=1e-5)


def test_auto_workers_split_only_where_it_applies_and_explicit_counts_are_checked(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert resolve_cpu_workers(0, on_cpu=True) == 6
    assert resolve_cpu_workers(3, on_cpu=True) == 3
    assert resolve_cpu_workers(1, on_cpu=False) == 1
    for reason, kwargs in (
        ("for CPU runs", dict(on_cpu=False)),
        ("several processes", dict(on_cpu=True, processes=2)),
        ("torch.compile", dict(on_cpu=True, compile=True)),
        ("dropout", dict(on_cpu=True, dropout=0.1)),
    ):
        assert resolve_cpu_workers(0, **kwargs) == 1
        with pytest.raises(ConfigError, match=f"cpu_workers=3 cannot be used here: .*{reason}"):
            resolve_cpu_workers(3, **kwargs)
    with pytest.raises(ConfigError, match="cpu_workers must be >= 0"):
        resolve_cpu_workers(-1, on_cpu=True)


def test_training_on_worker_threads_matches_training_without(folder_dataset, tmp_path, capsys):
    import json

    from ddpmkit.checkpoint import load_checkpoint
    from ddpmkit.training import train

    runs, losses = {}, {}
    for workers, grad_accum in ((1, 1), (1, 2), (3, 2)):
        config = tiny_config(folder_dataset, max_steps=4, grad_accum=grad_accum, cpu_workers=workers)
        summary = train(config, tmp_path / f"{workers}-{grad_accum}", progress=False)
        runs[workers, grad_accum] = load_checkpoint(summary.last_checkpoint)
        records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[workers, grad_accum] = torch.tensor([r["train_loss"] for r in records if "train_loss" in r])
    assert "(3 worker threads, one core each)" in capsys.readouterr().out
    reference = runs[1, 1]
    for key, run in runs.items():
        # the tolerance of the process-count test (test_distributed.py), for the same reason
        for name, tensor in reference.model.items():
            torch.testing.assert_close(run.model[name], tensor, atol=1e-4, rtol=0, msg=f"{key}: {name}")
        # the mean loss over the same images, however the batch was cut
        torch.testing.assert_close(losses[key], losses[1, 1], atol=0, rtol=1e-5)
    torch.manual_seed(0)  # the initial weights, as train() draws them
    initial = UNet.from_config(UNetConfig(**reference.state["model_config"])).state_dict()
    assert max((reference.model[name] - tensor).abs().max().item() for name, tensor in initial.items()) > 10 * 1e-4


def test_sample_command_splits_over_workers_and_refuses_them_with_compile(tiny_run, tmp_path, capsys):
    import numpy as np

    from ddpmkit.cli import main

    argv = ["sample", str(tiny_run), "--num", "5", "--batch-size", "5", "--sampler", "dpm-solver++-sde", "--steps", "6", "--seed", "1"]
    for workers in ("1", "3"):
        assert main([*argv, "--cpu-workers", workers, "--out", str(tmp_path / f"w{workers}.png")]) == 0
    one, three = (np.load(tmp_path / f"w{workers}.npz")["samples"] for workers in ("1", "3"))
    assert one.std() > 0.1  # images, not a constant
    np.testing.assert_allclose(three, one, rtol=0, atol=1e-5)
    capsys.readouterr()
    assert main([*argv, "--cpu-workers", "2", "--compile", "--out", str(tmp_path / "c.png")]) == 2
    error = capsys.readouterr().err
    assert error == "ddpm: error: cpu_workers=2 cannot be used here: torch.compile does not take concurrent callers (use 0 or 1)\n"
