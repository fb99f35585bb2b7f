"""The ddpm command end to end on a tiny folder dataset, and its error messages."""

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ddpmkit.cli import main

TINY = ["--image-size", "8", "--channels", "1", "--num-steps", "50", "--base-channels", "8", "--channel-mults", "1,2",
        "--num-res-blocks", "1", "--batch-size", "8", "--checkpoint-every", "2", "--preview-images", "0",
        "--fid-batches", "0", "--device", "cpu", "--no-progress", "--lr", "1e-3"]


def _train(folder, run, *extra):
    return main(["train", "--dataset", f"folder:{folder}", "--out", str(run), *TINY, *extra])


def test_train_resume_sample_end_to_end(folder_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(folder_dataset, run, "--max-steps", "3", "--attention", "1") == 0
    out = capsys.readouterr().out
    # The settings that differ from the defaults, one line; the whole config is in config.json.
    [settings] = [line for line in out.splitlines() if line.startswith("ddpm: settings other than the defaults: ")]
    assert "attention_levels=[1]" in settings and "max_steps=3" in settings and "lr=0.001" in settings
    assert "ema_decay" not in settings and str(run / "config.json") in settings
    assert "finished at step 3 in " in out and "train loss " in out and f"next: ddpm sample {run}" in out
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"ddpm: resuming {run} from step 3 (epoch 1) to step 5" in out
    assert re.search(r"ddpm: finished at step 5 in \d+ s: train loss \d\.\d{4}", out)
    grid = tmp_path / "grid.png"
    assert main(["sample", str(run), "--num", "6", "--batch-size", "4", "--steps", "10", "--out", str(grid), "--seed", "3"]) == 0
    picture = Image.open(grid)
    assert picture.size[0] > 8 * 2 and picture.mode == "L"
    arrays = np.load(grid.with_suffix(".npz"))
    assert arrays["images"].shape == (6, 1, 8, 8) and arrays["images"].dtype == np.uint8
    assert arrays["samples"].min() >= -1 and arrays["samples"].max() <= 1
    assert int(arrays["step"]) == 5
    again = tmp_path / "again.png"
    main(["sample", str(run), "--num", "6", "--batch-size", "4", "--steps", "10", "--out", str(again), "--seed", "3"])
    assert np.array_equal(np.load(again.with_suffix(".npz"))["samples"], arrays["samples"])  # seeded


def test_config_file_with_flag_override(folder_dataset, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'dataset = "folder:{folder_dataset}"\nmax_steps = 2\nlr = 5e-4\n')
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), *TINY[:-2]]) == 0
    text = (tmp_path / "run" / "config.json").read_text()
    assert '"lr": 0.0005' in text and '"max_steps": 2' in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "imagenet", "--out", "{tmp}/r"], "unknown dataset"),
        (["train", "--dataset", "folder:{data}", "--lr", "0", "--out", "{tmp}/r"], "lr must be > 0"),
        (["train", "--dataset", "folder:{data}", "--batch-size", "0", "--out", "{tmp}/r"], "batch_size must be >= 1"),
        (["train", "--dataset", "folder:{data}", "--num-steps", "0", "--out", "{tmp}/r"], "num_steps must be >= 1"),
        (["train", "--dataset", "folder:{data}", "--attention", "7", "--out", "{tmp}/r"], "attention level(s) [7] out of range"),
        (["train", "--dataset", "folder:{data}", "--image-size", "30", "--out", "{tmp}/r"], "not divisible"),
        (["train", "--config", "{tmp}/missing.toml", "--out", "{tmp}/r"], "does not exist"),
        (["sample", "{tmp}/no-run"], "neither a checkpoint file nor a run directory"),
        (["sample", "{tmp}/bad.safetensors"], "not a readable ddpmkit checkpoint"),
        (["train", "--out", "{tmp}/no-run", "--resume"], "not a ddpmkit run directory"),
    ],
)
def test_errors_are_one_line_with_exit_status_2(argv, message, folder_dataset, tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    argv = [a.format(tmp=tmp_path, data=folder_dataset) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_existing_run_refused_and_untouched(folder_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(folder_dataset, run, "--max-steps", "2") == 0
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*"))
    assert _train(folder_dataset, run, "--max-steps", "2") == 2
    assert "already exists" in capsys.readouterr().err
    assert before == sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*"))
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.5"]) == 2
    assert "cannot change lr when resuming" in capsys.readouterr().err


def test_console_script_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ddpmkit", "sample", str(tmp_path / "missing")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("ddpm: error:") and "Traceback" not in result.stderr


def test_sample_compile_runs_the_model_through_torch_compile(tiny_run, tmp_path, monkeypatch):
    import torch

    compiled = []
    real_compile = torch.compile

    def recording_compile(model, **kwargs):
        compiled.append(type(model).__name__)
        # Dynamo's tracing without inductor's C++ build (minutes on this CPU); same graph capture.
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    argv = ["sample", str(tiny_run), "--num", "3", "--batch-size", "2", "--sampler", "dpm-solver++-sde", "--steps", "6", "--seed", "1"]
    assert main([*argv, "--out", str(tmp_path / "plain.png")]) == 0
    assert compiled == []
    assert main([*argv, "--compile", "--out", str(tmp_path / "compiled.png")]) == 0
    assert compiled == ["UNet"]
    plain, through_compile = (np.load(tmp_path / f"{name}.npz")["samples"] for name in ("plain", "compiled"))
    np.testing.assert_allclose(through_compile, plain, rtol=1e-5, atol=1e-6)
