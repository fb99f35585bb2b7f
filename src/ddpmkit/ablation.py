"""The poster's ablation: noise schedule (linear, cosine) x self-attention (on, off).

``run_ablation`` trains each combination of a base config into ``OUT/<schedule>-<attn|noattn>/``
and measures its FID, precision and recall against the train and the test split, with the
features of the dataset's cached classifier (fid.py), as on the poster. It can be
stopped and run again at any moment: a finished run is not retrained, an unfinished one
is resumed from its latest checkpoint (training.py continues it exactly), and the FID
sampling resumes at its first unfinished batch (compute_fid's work directory,
``RUN/fid/<hash of the settings>/``). ``OUT/ablation.json`` holds one row per combination.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import latest_checkpoint, load_checkpoint, load_trained_model
from .choices import ATTENTION_SWITCHES, SCHEDULE_NAMES, AttentionSwitch, ScheduleName
from .config import TrainConfig
from .data import load_dataset
from .errors import ConfigError, DdpmError, Interrupted
from .fid import FeatureExtractor, fid_settings, load_extractor, model_fid, reference_features, settings_digest
from .io import say, write_json
from .training import resolve_resume_config, train
from .validation import check_choice

ABLATION_FILE = "ablation.json"
TRAIN_TIME_FILE = "train-time.json"
EVALUATION_SPLITS = ("train", "test")


@dataclass(frozen=True)
class Combination:
    """One cell of the ablation: a schedule, with or without self-attention."""

    schedule: ScheduleName
    attention: AttentionSwitch

    def __post_init__(self) -> None:
        check_choice("schedule", self.schedule, SCHEDULE_NAMES)
        if self.attention not in ATTENTION_SWITCHES:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION_SWITCHES)}, got {self.attention!r}")

    @property
    def name(self) -> str:
        return f"{self.schedule}-{'attn' if self.attention == 'on' else 'noattn'}"

    def config(self, base: TrainConfig) -> TrainConfig:
        """``base`` with this schedule; attention "on" keeps base's attention levels, or, when
        base has none, puts it at the middle level (the poster's: level 1 of 3, 14x14 on MNIST)."""
        levels = (base.attention_levels or (len(base.channel_mults) // 2,)) if self.attention == "on" else ()
        return base.replace(schedule=self.schedule, attention_levels=levels)


def combinations(schedules: Sequence[str], attentions: Sequence[str]) -> list[Combination]:
    """Every (schedule, attention) pair, in the order given, each once."""
    pairs = [Combination(schedule, attention) for schedule in schedules for attention in attentions]
    if not pairs:
        raise ConfigError("an ablation needs at least one schedule and one attention setting")
    return list(dict.fromkeys(pairs))


def is_finished(state: Mapping[str, Any], config: TrainConfig) -> bool:
    """Whether a checkpoint's training position is where train() stops: after ``epochs``
    epochs, or at ``max_steps`` steps."""
    return state["epoch"] >= config.epochs or (config.max_steps is not None and state["step"] >= config.max_steps)


def train_combination(config: TrainConfig, run_dir: Path, *, progress: bool = True) -> None:
    """Train ``config`` into ``run_dir``: from scratch, resumed, or not at all when finished.

    A run is resumed with the requested config, of which only training.RESUMABLE_KEYS
    (e.g. more epochs) may differ from the stored one. The wall time of each session is
    added up in ``RUN/train-time.json``.
    """
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None and run_dir.exists() and any(run_dir.iterdir()):
        raise DdpmError(f"{run_dir} exists but holds no checkpoint (a start that was interrupted?); delete it to train this combination again")
    if checkpoint is not None:
        config = resolve_resume_config(run_dir, config.to_dict())
        if is_finished(load_checkpoint(checkpoint).state, config):
            say(f"{run_dir} is finished; not training it again")
            return
    started = time.perf_counter()
    summary = train(config, run_dir, resume=checkpoint is not None, progress=progress)
    seconds = train_seconds(run_dir) + time.perf_counter() - started
    write_json(run_dir / TRAIN_TIME_FILE, {"train_seconds": round(seconds, 1)}, what="training time")
    if summary.interrupted:
        raise Interrupted(f"training of {run_dir} was interrupted at step {summary.step}", summary.stop_signal)


def train_seconds(run_dir: Path) -> float:
    """The wall time spent training ``run_dir`` by run_ablation so far (0 if none recorded)."""
    path = run_dir / TRAIN_TIME_FILE
    return float(json.loads(path.read_text())["train_seconds"]) if path.is_file() else 0.0


def evaluate_run(
    run_dir: Path,
    extractor: FeatureExtractor,
    *,
    num: int,
    sampling: Mapping[str, Any],
    seed: int,
    batch_size: int,
    device: str,
    progress: bool = True,
) -> dict[str, Any]:
    """fid.model_fid of ``num`` samples of the run's latest checkpoint (EMA weights) against
    its train and test splits, resumable in ``RUN/fid/<digest of the settings>/``."""
    trained = load_trained_model(run_dir, ema=True, device=device)
    work_dir = run_dir / "fid" / settings_digest(fid_settings(trained, seed=seed, batch_size=batch_size, **sampling))
    return model_fid(
        trained, extractor, num=num, against=EVALUATION_SPLITS, batch_size=batch_size, seed=seed, device=device,
        work_dir=work_dir, progress=progress, description=f"FID samples {run_dir.name}", **sampling,
    )


def run_ablation(
    base: TrainConfig,
    out_dir: str | Path,
    *,
    schedules: Sequence[str],
    attentions: Sequence[str],
    num_fid: int,
    sampling: Mapping[str, Any],
    seed: int = 0,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and evaluate every combination; write and return the rows of OUT/ablation.json.

    ``sampling`` (sampler, steps, ...) goes to ``sample`` for the FID samples; ``seed``
    and ``batch_size`` are theirs too. The classifier and the reference features are
    loaded before any training, so that a missing classifier fails at once, not after
    hours. ablation.json is rewritten after each combination.
    """
    out_dir = Path(out_dir)
    cells = combinations(schedules, attentions)
    extractor = load_extractor("classifier", base.dataset, device=device)
    data = dict(data_dir=base.data_dir, image_size=base.image_size, channels=base.channels, seed=base.seed)
    # Computed (and cached) now, so that a classifier that does not fit the data fails before any training.
    references = {split: reference_features(load_dataset(base.dataset, split, **data), extractor) for split in EVALUATION_SPLITS}
    rows = []
    for cell in cells:
        run_dir = out_dir / cell.name
        train_combination(cell.config(base), run_dir, progress=progress)
        started = time.perf_counter()
        result = evaluate_run(
            run_dir, extractor, num=num_fid, sampling=sampling, seed=seed, batch_size=batch_size, device=device, progress=progress,
        )
        rows.append(_row(cell, run_dir, result, {split: reference.name for split, reference in references.items()}, time.perf_counter() - started))
        write_ablation(out_dir / ABLATION_FILE, rows, dataset=base.dataset, num_fid=num_fid, sampling=sampling)
        say(f"{cell.name}: train FID {rows[-1]['train_fid']:.3f}, test FID {rows[-1]['test_fid']:.3f}")
    return rows


def _row(cell: Combination, run_dir: Path, result: Mapping[str, Any], split_names: Mapping[str, str], eval_seconds: float) -> dict[str, Any]:
    """One row of ablation.json: the scores per split, and what produced them."""
    scores = {split: result["splits"][name] for split, name in split_names.items()}
    checkpoint = load_checkpoint(latest_checkpoint(run_dir))
    return {
        "name": cell.name,
        "schedule": cell.schedule,
        "attention": cell.attention,
        "run_dir": str(run_dir),
        **{f"{split}_fid": score["fid"] for split, score in scores.items()},
        "scores": scores,
        "step": checkpoint.state["step"],
        "train_seconds": train_seconds(run_dir),
        "eval_seconds": round(eval_seconds, 1),
        "config": checkpoint.config,
        "provenance": {
            "checkpoint": str(checkpoint.path),
            "trained_with_ddpmkit": checkpoint.version,
            "evaluated_with_ddpmkit": __version__,
            **{key: value for key, value in result.items() if key != "splits"},
        },
    }


def write_ablation(path: Path, rows: list[dict[str, Any]], *, dataset: str, num_fid: int, sampling: Mapping[str, Any]) -> Path:
    table = {"dataset": dataset, "num_fid": num_fid, "sampling": dict(sampling), "rows": rows}
    return write_json(path, table, what="ablation table")


def read_ablation(path: str | Path) -> dict[str, Any]:
    """An ablation.json, checked for the keys the report reads."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
        names = [row["name"] for row in table["rows"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DdpmError(f"{path} is not an ablation table written by ddpm ablation ({exc})") from None
    if len(set(names)) != len(names):
        raise DdpmError(f"{path} lists a combination twice")
    return table
