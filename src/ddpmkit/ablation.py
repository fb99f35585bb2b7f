"""The grid runner: the poster's ablation (noise schedule x self-attention), or any grid of TrainConfig keys.

``run_ablation`` trains each cell of a grid over a base config (every combination of the
values given per key, the poster's schedule x attention by default) into ``OUT/<cell name>/``
and measures its FID, precision and recall against the train and the test split, with the
features of the dataset's cached classifier (fid.py), as on the poster; with ``nll_images``,
also its NLL bound in bits/dim (likelihood.py). It can be stopped and run again at any moment:
a finished run is not retrained, an unfinished one is resumed from its latest checkpoint
(training.py continues it exactly), and the FID sampling and the NLL resume at their first
unfinished batch (their work directories, ``RUN/fid/<hash of the settings>/`` and
``RUN/nll/<hash>/``). ``OUT/ablation.json`` holds one row per cell.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import latest_checkpoint, load_checkpoint, load_trained_model
from .choices import ATTENTION_SWITCHES, SCHEDULE_NAMES, Split
from .config import TrainConfig, field_names
from .data import load_dataset
from .errors import ConfigError, DdpmError, Interrupted
from .figures import plot_bound_terms
from .fid import FeatureExtractor, fid_settings, load_extractor, model_fid, reference_features, settings_digest
from .io import say, write_json
from .likelihood import model_nll
from .training import resolve_resume_config, train
from .validation import check_choice

ABLATION_FILE = "ablation.json"
TRAIN_TIME_FILE = "train-time.json"
EVALUATION_SPLITS = ("train", "test")
# The poster's ablation. "attention" is the one axis that is not a TrainConfig key: "on" or
# "off" (Cell.config says what it sets).
POSTER_GRID: dict[str, tuple[str, ...]] = {"schedule": SCHEDULE_NAMES, "attention": ("on", "off")}


@dataclass(frozen=True)
class Cell:
    """One cell of a grid: a value for each of its keys, in the grid's order."""

    settings: tuple[tuple[str, Any], ...]

    def __post_init__(self) -> None:
        for key, value in self.settings:
            if key == "schedule":
                check_choice("schedule", value, SCHEDULE_NAMES)
            elif key == "attention":
                if value not in ATTENTION_SWITCHES:
                    raise ConfigError(f"attention must be one of {', '.join(ATTENTION_SWITCHES)}, got {value!r}")
            elif key not in field_names():
                raise ConfigError(f"unknown grid key {key!r}; a grid varies TrainConfig keys ({', '.join(field_names())}) or attention")

    @property
    def name(self) -> str:
        """The run folder's name: the poster's "linear-attn" for its axes, "key=value" for the others, joined by "-"."""
        return "-".join(_name_part(key, value) for key, value in self.settings)

    def config(self, base: TrainConfig) -> TrainConfig:
        """``base`` with this cell's values. Attention "on" keeps base's attention levels, or, when
        base has none, puts it at the middle level (the poster's: level 1 of 3, 14x14 on MNIST);
        "off" has none."""
        changes = {key: value for key, value in self.settings if key != "attention"}
        attention = dict(self.settings).get("attention")
        if attention is not None:
            changes["attention_levels"] = (base.attention_levels or (len(base.channel_mults) // 2,)) if attention == "on" else ()
        return base.replace(**changes)


def _name_part(key: str, value: Any) -> str:
    if key == "schedule":
        return str(value)
    if key == "attention":
        return "attn" if value == "on" else "noattn"
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, (tuple, list)):
        text = "/".join(map(str, value)) or "none"
    else:
        text = str(value)
    return f"{key}={text}"


def grid_cells(grid: Mapping[str, Sequence[Any]]) -> list[Cell]:
    """Every combination of the grid's values, the first key varying slowest, each once."""
    if not grid or any(len(values) == 0 for values in grid.values()):
        raise ConfigError("a grid needs at least one key, and at least one value for each")
    keys = list(grid)
    cells = [Cell(tuple(zip(keys, values))) for values in itertools.product(*(list(dict.fromkeys(v)) for v in grid.values()))]
    return cells


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


def evaluate_nll(run_dir: Path, *, split: Split, num: int, seed: int, batch_size: int, device: str, progress: bool = True) -> dict[str, Any]:
    """likelihood.model_nll of ``num`` images of ``split`` under the run's latest checkpoint (EMA
    weights, its own variance), resumable in ``RUN/nll/<digest of the settings>/``; written, with
    the plot of its per-step terms, to ``RUN/nll-<split>.json`` and ``.png``, as ``ddpm nll`` does."""
    trained = load_trained_model(run_dir, ema=True, device=device)
    settings = {"checkpoint": str(trained.path.resolve()), "step": trained.step, "split": split, "num": num, "seed": seed, "batch_size": batch_size}
    result = model_nll(
        trained, split=split, num=num, batch_size=batch_size, seed=seed, device=device,
        work_dir=run_dir / "nll" / settings_digest(settings), progress=progress, description=f"NLL {split} {run_dir.name}",
    )
    path = write_json(run_dir / f"nll-{split}.json", result, what="NLL result")
    plot_bound_terms(result, path.with_suffix(".png"))
    return result


def run_ablation(
    base: TrainConfig,
    out_dir: str | Path,
    *,
    grid: Mapping[str, Sequence[Any]] = POSTER_GRID,
    num_fid: int,
    sampling: Mapping[str, Any],
    seeds: Sequence[int] = (0,),
    batch_size: int = 256,
    nll_images: int = 0,
    nll_splits: Sequence[Split] = ("test",),
    device: str = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and evaluate every cell of ``grid`` (grid_cells); write and return the rows of OUT/ablation.json.

    ``sampling`` (sampler, steps, ...) goes to ``sample`` for the FID samples, ``num_fid``
    of them for each sampling seed of ``seeds`` (batches of ``batch_size``): a row holds the
    mean over the seeds and their standard deviation. With ``nll_images`` > 0, also the NLL
    bound of that many images of each split of ``nll_splits`` (likelihood.evaluation_subset;
    the noise of seeds[0]). Every cell's config is built, and the classifier and the
    reference features are loaded, before any training, so that a bad grid value or a
    missing classifier fails at once, not after hours. ablation.json is rewritten after each cell.
    """
    if not seeds:
        raise ConfigError("the FID needs at least one sampling seed")
    out_dir = Path(out_dir)
    cells = grid_cells(grid)
    configs = [cell.config(base) for cell in cells]
    extractor = load_extractor("classifier", base.dataset, device=device)
    data = dict(data_dir=base.data_dir, image_size=base.image_size, channels=base.channels, seed=base.seed)
    # Computed (and cached) now, so that a classifier that does not fit the data fails before any training.
    references = {split: reference_features(load_dataset(base.dataset, split, **data), extractor) for split in EVALUATION_SPLITS}
    split_names = {split: reference.name for split, reference in references.items()}
    rows = []
    for cell, config in zip(cells, configs):
        run_dir = out_dir / cell.name
        train_combination(config, run_dir, progress=progress)
        started = time.perf_counter()
        results = [
            evaluate_run(run_dir, extractor, num=num_fid, sampling=sampling, seed=seed, batch_size=batch_size, device=device, progress=progress)
            for seed in dict.fromkeys(seeds)
        ]
        eval_seconds = time.perf_counter() - started
        nll = {
            split: evaluate_nll(run_dir, split=split, num=nll_images, seed=seeds[0], batch_size=batch_size, device=device, progress=progress)
            for split in (nll_splits if nll_images else ())
        }
        rows.append(_row(cell, run_dir, results, split_names, nll, eval_seconds))
        write_ablation(out_dir / ABLATION_FILE, rows, dataset=base.dataset, num_fid=num_fid, sampling=sampling)
        say(f"{cell.name}: " + ", ".join(
            [f"{split} FID {_mean_sd(rows[-1], f'{split}_fid')}" for split in EVALUATION_SPLITS]
            + [f"{split} NLL {rows[-1][f'{split}_nll']:.4f} bits/dim" for split in nll]))
    return rows


def _mean_sd(row: Mapping[str, Any], key: str) -> str:
    sd = row.get(f"{key}_sd")
    return f"{row[key]:.3f}" + ("" if sd is None else f" +- {sd:.3f}")


def _row(
    cell: Cell, run_dir: Path, results: Sequence[Mapping[str, Any]], split_names: Mapping[str, str],
    nll: Mapping[str, Mapping[str, Any]], eval_seconds: float,
) -> dict[str, Any]:
    """One row of ablation.json: the scores per split (means over the sampling seeds, and each
    seed's), the NLL per split, and what produced them."""
    per_seed = [{split: result["splits"][name] for split, name in split_names.items()} for result in results]
    scores = {split: {key: statistics.fmean(seed[split][key] for seed in per_seed) for key in per_seed[0][split]} for split in split_names}
    checkpoint = load_checkpoint(latest_checkpoint(run_dir))
    return {
        "name": cell.name,
        "settings": dict(cell.settings),
        "run_dir": str(run_dir),
        **{f"{split}_fid": score["fid"] for split, score in scores.items()},
        **{f"{split}_fid_sd": statistics.stdev(seed[split]["fid"] for seed in per_seed) if len(per_seed) > 1 else None for split in split_names},
        "scores": scores,
        "seeds": [{"seed": result["settings"]["seed"], "scores": seed} for result, seed in zip(results, per_seed)],
        **{f"{split}_nll": result["bits_per_dim"] for split, result in nll.items()},
        "nll": {split: {key: result[key] for key in ("bits_per_dim", "standard_error", "prior", "decoder", "num_images", "wall_seconds")}
                for split, result in nll.items()},
        "step": checkpoint.state["step"],
        "train_seconds": train_seconds(run_dir),
        "eval_seconds": round(eval_seconds, 1),
        "config": checkpoint.config,
        "provenance": {
            "checkpoint": str(checkpoint.path),
            "trained_with_ddpmkit": checkpoint.version,
            "evaluated_with_ddpmkit": __version__,
            **{key: value for key, value in results[0].items() if key != "splits"},
            **({"nll_settings": next(iter(nll.values()))["settings"]} if nll else {}),
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
        raise DdpmError(f"{path} lists a cell twice")
    for row in table["rows"]:  # tables written before grids of any key: the poster's two axes
        row.setdefault("settings", {key: row.get(key) for key in POSTER_GRID})
    return table
