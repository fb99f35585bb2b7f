"""The objectives grid of the README ("Objectives"): eps / v x none / min-SNR, and eps with the
learned variance and hybrid loss, each trained with several training seeds, summarised over them.

For every training seed this runs the two ``ddpm ablation`` calls of
configs/mnist-5k-objectives-cpu.toml (into OUT/objectives-seedS and OUT/objectives-hybrid-seedS;
finished cells are not retrained and finished FIDs and NLLs are read back, so a second run only
prints), then one table: for each objective the test FID (each training seed's value is the
mean over the sampling seeds), its mean and standard deviation over the training seeds, the
train FID, the test NLL in bits/dim and the training time. The FID classifier must exist
(``ddpm train-classifier --dataset mnist-5k``).

    .venv/bin/python benchmarks/objectives_grid.py --seeds 0,1,2 --out runs
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ddpmkit.ablation import ABLATION_FILE, read_ablation, run_ablation
from ddpmkit.choices import DEFAULT_SPACING
from ddpmkit.config import resolve_config

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mnist-5k-objectives-cpu.toml"
GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "objectives": {"prediction": ("eps", "v"), "loss_weighting": ("none", "min-snr")},
    "objectives-hybrid": {"learn_variance": (True,)},
}
# What the README's commands pass (ddpm ablation --sampler ddpm --steps 100), so that the FID
# work folders, keyed by these settings, are the same ones.
SAMPLING = {"sampler": "ddpm", "steps": 100, "spacing": DEFAULT_SPACING, "clip_denoised": True}
NUM_FID = 1000
FID_SEEDS = (0, 1)
NLL_IMAGES = 100


def objective_name(settings: Mapping[str, Any]) -> str:
    """A row's objective, its training seed left out: "eps, none", "v, min-snr", "learned variance (hybrid)"."""
    if settings.get("learn_variance"):
        return "learned variance (hybrid)"
    return f"{settings['prediction']}, {settings['loss_weighting']}"


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """The rows of several ablation tables grouped by objective: per objective, each measure's
    values over its training seeds, in the rows' order."""
    summary: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        values = summary.setdefault(objective_name(row["settings"]), {"seed": [], "test_fid": [], "train_fid": [], "test_nll": [],
                                                                       "train_seconds": [], "step": []})
        values["seed"].append(row["config"]["seed"])
        for key in ("test_fid", "train_fid", "test_nll", "train_seconds", "step"):
            values[key].append(row[key])
    return summary


def mean_sd(values: Sequence[float], digits: int) -> str:
    """"mean +- sd" (sample standard deviation), or the one value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(summary: Mapping[str, Mapping[str, Sequence[float]]]) -> str:
    lines = [
        "| objective | test FID, mean ± sd over training seeds | test FID per seed | train FID | test NLL (bits/dim) | training (s), median (range) | steps |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, values in summary.items():
        seconds = values["train_seconds"]
        lines.append(
            f"| {name} | {mean_sd(values['test_fid'], 1)} | {' / '.join(f'{fid:.1f}' for fid in values['test_fid'])} "
            f"| {mean_sd(values['train_fid'], 1)} | {mean_sd(values['test_nll'], 2)} "
            f"| {statistics.median(seconds):.0f} ({min(seconds):.0f}-{max(seconds):.0f}) | {', '.join(sorted({str(s) for s in values['step']}))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (TrainConfig.seed)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="folder of the ablation folders")
    args = parser.parse_args()
    base = resolve_config(CONFIG, {})
    rows = []
    for seed in (int(text) for text in args.seeds.split(",")):
        for name, grid in GRIDS.items():
            out = args.out / f"{name}-seed{seed}"
            run_ablation(base, out, grid={**grid, "seed": (seed,)}, num_fid=NUM_FID, sampling=SAMPLING, seeds=FID_SEEDS,
                         nll_images=NLL_IMAGES, progress=False)
            rows.extend(read_ablation(out / ABLATION_FILE)["rows"])
    print(markdown_table(summarise(rows)))
    print(f"FID: {NUM_FID} samples, {SAMPLING['steps']} {SAMPLING['sampler']} steps, sampling seeds {FID_SEEDS}; "
          f"NLL: the first {NLL_IMAGES} test images, all T terms")


if __name__ == "__main__":
    main()
