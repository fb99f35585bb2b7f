"""Checkpoint files: round trip, atomic writes, no pickle, clear errors on mismatch."""

import os
import pickle

import pytest
import torch

import ddpmkit.checkpoint as checkpoint_module
from ddpmkit import CheckpointError
from ddpmkit.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    step_checkpoint_path,
)
from ddpmkit.io import load_weights


def _module(width=4):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Linear(width, 2))


def _save(path, module, step=1):
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    module(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    return save_checkpoint(
        path,
        model=module.state_dict(),
        ema={k: v * 0.5 for k, v in module.state_dict().items()},
        optimizer=optimizer.state_dict(),
        rng_states={"cpu": torch.get_rng_state()},
        config={"lr": 1e-3},
        state={"step": step, "epoch": 0},
    ), optimizer


def test_round_trip_restores_every_part(tmp_path):
    module = _module()
    path, optimizer = _save(tmp_path / "c.safetensors", module, step=7)
    loaded = load_checkpoint(path)
    assert loaded.state == {"step": 7, "epoch": 0} and loaded.config == {"lr": 1e-3}
    assert all(torch.equal(loaded.model[k], v) for k, v in module.state_dict().items())
    assert all(torch.equal(loaded.ema[k], v * 0.5) for k, v in module.state_dict().items())
    assert torch.equal(loaded.rng_states["cpu"], torch.get_rng_state())
    fresh = torch.optim.Adam(_module().parameters(), lr=1e-3)
    fresh.load_state_dict(loaded.optimizer)
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][key], value)
    assert fresh.state_dict()["param_groups"][0]["lr"] == 1e-3
    assert loaded.version == checkpoint_module.__version__


def test_a_crash_during_the_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path, _ = _save(tmp_path / "c.safetensors", _module(), step=1)
    before = path.read_bytes()

    def crash(tensors, filename, metadata):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(CheckpointError, match="No space left on device"):
        _save(path, _module(), step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary left


def test_read_only_directory_gives_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: make the target a file where a folder is needed.
        blocker = tmp_path / "blocked"
        blocker.write_text("")
        target = blocker / "c.safetensors"
    else:
        tmp_path.chmod(0o500)
        target = tmp_path / "c.safetensors"
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        _save(target, _module())


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_crafted_pickle_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    crafted = tmp_path / "evil.safetensors"
    crafted.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match="not a readable ddpmkit checkpoint"):
        load_checkpoint(crafted)
    assert not (tmp_path / "PWNED").exists()
    torch.save({"x": _Exploit()}, tmp_path / "evil.pt")
    (tmp_path / "evil.pt").rename(crafted)
    with pytest.raises(CheckpointError):
        load_checkpoint(crafted)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_and_foreign_files(tmp_path):
    path, _ = _save(tmp_path / "c.safetensors", _module())
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable ddpmkit checkpoint"):
        load_checkpoint(truncated)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a ddpmkit checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_mismatched_model_names_keys_and_shapes(tmp_path):
    path, _ = _save(tmp_path / "c.safetensors", _module(width=4))
    weights = load_checkpoint(path).model
    with pytest.raises(CheckpointError) as info:
        load_weights(_module(width=6), weights, source="c.safetensors")
    assert "shape: 0.bias (4,) vs model (6,)" in str(info.value)
    wider = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=r"missing: 2\.bias, 2\.weight"):
        load_weights(wider, weights, source="c.safetensors")


def test_latest_prune_and_resolve(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        run.mkdir() or resolve_checkpoint(run)
    for step in (5, 10, 15, 20):
        _save(step_checkpoint_path(run, step), _module(), step=step)
    assert latest_checkpoint(run).name == "step-000000020.safetensors"
    prune_checkpoints(run, keep=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000015.safetensors", "step-000000020.safetensors"]
    assert resolve_checkpoint(run) == step_checkpoint_path(run, 20)
    with pytest.raises(CheckpointError, match="neither a checkpoint file nor a run directory"):
        resolve_checkpoint(tmp_path / "nope")
