"""benchmarks/gpu_check.py --quick: every step of the GPU check runs on the CPU and reports a result."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
STEPS = ["environment", "tests", "training", "sampling", "resume", "fid"]


def test_the_quick_check_runs_every_step_on_the_cpu_and_resume_is_exact(tmp_path):
    out = tmp_path / "check.json"
    ran = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert out.is_file(), ran.stdout[-3000:] + ran.stderr[-3000:]
    record = json.loads(out.read_text())
    steps = record["steps"]
    assert list(steps) == STEPS and record["device"] == "cpu" and record["quick"]
    for name, step in steps.items():
        assert step["status"] == "ok" and step["result"].strip(), (name, step["result"], step.get("traceback"))
        assert f"[{name}] ok: {step['result']} (" in ran.stdout  # its one printed line
    assert ran.returncode == 0 and "6 steps: 6 ok, 0 failed, 0 skipped" in ran.stdout

    assert steps["environment"]["required"] and all(steps["environment"]["required"].values())
    assert steps["tests"]["passed"] > 0 and steps["tests"]["failed_tests"] == []
    diffusers = importlib.util.find_spec("diffusers") is not None
    for mode in ("training", "sampling"):
        rows = steps[mode]["rows"]
        assert {"ddpmkit", "ddpmkit+bf16"} <= set(rows) and all(row["median"] > 0 for row in rows.values())
        assert ("diffusers" in rows) == diffusers and ("diffusers" in steps[mode]["not_run"]) != diffusers
        assert steps[mode]["not_run"]["fp16"].startswith("not supported on cpu")
    resume = steps["resume"]["precisions"]
    for precision in ("fp32", "bf16"):  # a run stopped and resumed on the CPU equals the uninterrupted one exactly
        assert resume[precision]["verdict"] == "bitwise equal"
        assert resume[precision]["max_abs_difference"] == {"ema": 0.0, "model": 0.0, "optim": 0.0, "rng": 0.0}
    assert resume["fp16"]["summary"].startswith("not supported on cpu")
    fid = steps["fid"]
    assert fid["steps"] > 0 and fid["epochs_reached"] > 0 and math.isfinite(fid["projected_minutes_for_all_epochs"])
    assert fid["fid"]["num_generated"] == 64 and all(split["fid"] > 0 for split in fid["fid"]["splits"].values())
