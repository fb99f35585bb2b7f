"""``ddpm report RUNS_DIR``: everything in a folder of runs as one page, in HTML and Markdown.

The HTML page is self-contained: every figure is embedded as a base64 ``data:`` URI and
the style is inline, so it opens from disk with no network and can be mailed as one file;
a click on a figure shows it at full size. The Markdown twin links the same PNG files by
relative path.

The page leads with the results: a table of the runs (training step, last losses and
per-epoch FID, the FIDs of their ablation rows and ``ddpm fid`` results, and only the
settings that differ between runs), then the ablation tables, ``ddpm fid`` results and
guidance sweeps; then each run's figures, its full configuration folded below them.

What is found under RUNS_DIR (recursively):

* ``ablation.json`` (``ddpm ablation``): the grid's table, rows Train-FID and Test-FID (and
  the NLL where measured), one column per cell (for the poster's schedule x attention grid
  its four combinations in the poster's order), then the precision, recall and times of
  every row;
* run directories (``config.json`` and ``metrics.jsonl``): the configuration, the latest
  checkpoint's provenance, the FID provenance of its ablation row, and its figures;
* ``ddpm fid`` results (a JSON file with "splits" and "settings") and guidance sweeps
  (``guidance-sweep.json``), each belonging to the run whose checkpoint it measured;
* every PNG: sample grids, curves, forward and reverse strips, the guidance sweep, FID
  against evaluations, ... Of the per-epoch grids (``samples/epoch-NNN.png``) only the
  last is shown. A figure belongs to the run directory it is in, if any.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .ablation import ABLATION_FILE, POSTER_GRID, grid_cells, read_ablation
from .checkpoint import latest_checkpoint, load_checkpoint
from .errors import DdpmError
from .io import write_text

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
SWEEP_FILE = "guidance-sweep.json"
# The poster's column order: linear then cosine, each with attention then without.
POSTER_COLUMNS = tuple(grid_cells(POSTER_GRID))
_EPOCH_GRID = re.compile(r"^epoch-(\d+)\.png$")
# What a figure shows, by file name (first match); every caption also gives the path.
# Epoch grids are numbered from 0: epoch-000.png is the grid after the first epoch.
_DESCRIPTIONS = (
    (re.compile(r"^forward-(.+)\.png$"), "forward process, {0} schedule"),
    (re.compile(r"^alpha-bars\.png$"), "abar_t of the schedules"),
    (re.compile(r"^reverse.*\.png$"), "reverse process: x_t and predicted x0, and the sample"),
    (re.compile(r"^fid_vs_nfe\.png$"), "FID against the number of model evaluations"),
    (re.compile(r"^guidance-samples\.png$"), "samples at each guidance scale"),
    (re.compile(r".*sweep.*\.png$"), "guidance trade-off"),
    (re.compile(r"^nll.*\.png$"), "NLL bound: the bits/dim of each step's term"),
    (re.compile(r"^samples.*\.png$"), "samples"),
)
_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
div.table { overflow-x: auto; margin: 0.5em 0 1.5em; }
table { border-collapse: collapse; }
table.runs td { white-space: nowrap; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
dl.config { columns: 3; font-size: 0.85em; }
dl.config div { break-inside: avoid; }
dl.config dt { font-weight: bold; } dl.config dd { margin: 0 0 0.3em 1em; word-break: break-all; }
details { margin: 0.5em 0 1.5em; } summary { cursor: pointer; color: #555; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 100%; overflow-x: auto; }
figure img { max-width: 100%; border: 1px solid #ddd; cursor: zoom-in; }
figure img.full { max-width: none; cursor: zoom-out; }
figcaption { font-size: 0.85em; }
"""
# A click on a figure toggles between the page's width and the image's own size.
_ZOOM = "this.classList.toggle('full')"


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


@dataclass
class RunSummary:
    """A run directory: its config, provenance, last logged values, results and figures."""

    path: Path
    config: dict[str, Any]
    provenance: dict[str, Any]
    last: dict[str, float] = field(default_factory=dict)  # the last train_loss, val_loss and fid of metrics.jsonl
    ablation_row: dict[str, Any] | None = None
    fid_results: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


@dataclass
class Report:
    root: Path
    ablations: list[tuple[Path, dict[str, Any]]]
    runs: list[RunSummary]
    figures: list[Figure]  # those outside every run directory
    fid_results: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    sweeps: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)


def collect_report(runs_dir: str | Path) -> Report:
    """What the report shows, read from ``runs_dir``."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise DdpmError(f"{root} is not a directory")
    ablations = [(path, read_ablation(path)) for path in sorted(root.rglob(ABLATION_FILE))]
    # ddpm ablation trains each combination into <folder of ablation.json>/<name>.
    rows = {(path.parent / row["name"]).resolve(): row for path, table in ablations for row in table["rows"]}
    runs = [_run_summary(path.parent, rows.get(path.parent.resolve())) for path in sorted(root.rglob("metrics.jsonl"))
            if (path.parent / "config.json").is_file()]
    by_dir = {run.path: run for run in runs}
    fid_results, sweeps = _results(root)
    for path, result in fid_results:
        owner = _owner(by_dir, path, result["settings"].get("checkpoint"))
        if owner is not None:
            owner.fid_results.append((path, result))
    loose = []
    for figure in _figures(root):
        owner = _owner(by_dir, figure.path, None)
        (owner.figures if owner else loose).append(figure)
    if not (ablations or runs or loose or fid_results or sweeps):
        raise DdpmError(f"{root} holds no ablation.json, run directory, result or PNG figure to report on")
    return Report(root, ablations, runs, loose, fid_results, sweeps)


def _owner(by_dir: Mapping[Path, RunSummary], path: Path, checkpoint: str | None) -> RunSummary | None:
    """The run a file belongs to: the one whose checkpoint it measured, else the one it lies in."""
    if checkpoint:
        measured = Path(checkpoint).resolve().parent.parent  # RUN/checkpoints/step-N.safetensors
        for run_dir, run in by_dir.items():
            if run_dir.resolve() == measured:
                return run
    return next((by_dir[parent] for parent in path.parents if parent in by_dir), None)


def _run_summary(run_dir: Path, ablation_row: Mapping[str, Any] | None) -> RunSummary:
    config = json.loads((run_dir / "config.json").read_text())
    provenance: dict[str, Any] = {}
    checkpoint_path = latest_checkpoint(run_dir)
    if checkpoint_path is not None:
        checkpoint = load_checkpoint(checkpoint_path)
        provenance.update({
            "checkpoint": checkpoint_path.name, "step": checkpoint.state.get("step"),
            "epochs finished": checkpoint.state.get("epoch"), "ddpmkit version": checkpoint.version,
        })
    if ablation_row is not None:
        provenance.update({f"FID {key}": value for key, value in ablation_row["provenance"].items() if key != "checkpoint"})
        provenance.update({"train seconds": ablation_row.get("train_seconds"), "FID seconds": ablation_row.get("eval_seconds")})
    return RunSummary(run_dir, config, provenance, _last_logged(run_dir / "metrics.jsonl"),
                      dict(ablation_row) if ablation_row is not None else None)


def _last_logged(metrics: Path) -> dict[str, float]:
    """The last value of each of train_loss, val_loss and fid in a metrics.jsonl (a torn last line is skipped)."""
    last: dict[str, float] = {}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        last.update({key: record[key] for key in ("train_loss", "val_loss", "fid") if record.get(key) is not None})
    return last


def _results(root: Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[tuple[Path, dict[str, Any]]]]:
    """The ``ddpm fid`` results and the guidance sweeps under root, by the keys they hold."""
    fid_results, sweeps = [], []
    for path in sorted(root.rglob("*.json")):
        if path.name in (ABLATION_FILE, "config.json"):
            continue
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(value, dict) or not isinstance(value.get("settings"), dict):
            continue
        if path.name == SWEEP_FILE and isinstance(value.get("results"), list):
            sweeps.append((path, value))
        elif isinstance(value.get("splits"), dict) and "num_generated" in value:
            fid_results.append((path, value))
    return fid_results, sweeps


def _figures(root: Path) -> list[Figure]:
    """Every PNG under root, in path order; of per-epoch grids only each folder's last."""
    pngs = sorted(root.rglob("*.png"))
    last_epoch = {}
    for path in pngs:
        if _EPOCH_GRID.match(path.name):
            last_epoch[path.parent] = max(last_epoch.get(path.parent, path), path)  # zero-padded: name order is epoch order
    kept = [path for path in pngs if not _EPOCH_GRID.match(path.name) or last_epoch[path.parent] == path]
    return [Figure(path, f"{_describe(path)} ({path.relative_to(root)})") for path in kept]


def _describe(path: Path) -> str:
    epoch = _EPOCH_GRID.match(path.name)
    if epoch:
        return f"samples after epoch {int(epoch.group(1)) + 1} (preview sampler)"
    if path.name == "curves.png":
        metrics = path.parent / "metrics.jsonl"
        return "loss and FID curves" if metrics.is_file() and "fid" in _last_logged(metrics) else "loss curves"
    for pattern, description in _DESCRIPTIONS:
        match = pattern.match(path.name)
        if match:
            return description.format(*match.groups())
    return "figure"


def _run_name(report: Report, run: RunSummary) -> str:
    """A run's path below the report's folder; the folder's own name when the report is of one run."""
    relative = run.path.relative_to(report.root)
    return str(relative) if relative != Path(".") else report.root.resolve().name


# --- tables -----------------------------------------------------------------------------------

def poster_table(table: Mapping[str, Any]) -> list[list[str]]:
    """The poster's layout: a header row, then Train-FID and Test-FID (mean +- sd over sampling
    seeds, where there are several) and the NLL where measured, over the cells: for the
    poster's grid its four combinations in its order ("-" for one not run), else every row."""
    rows = {row["name"]: row for row in table["rows"]}
    poster = all(set(row["settings"]) == set(POSTER_GRID) for row in table["rows"])
    if poster:
        names = [cell.name for cell in POSTER_COLUMNS]
        header = [""] + [f"{cell.settings[0][1]} / {'attention' if cell.settings[1][1] == 'on' else 'none'}" for cell in POSTER_COLUMNS]
    else:
        names = list(rows)
        header = [""] + [", ".join(f"{key} {value}" for key, value in rows[name]["settings"].items()) for name in names]
    measures = [("Train-FID", "train_fid"), ("Test-FID", "test_fid")]
    measures += [(f"{split.capitalize()}-NLL (bits/dim)", f"{split}_nll") for split in ("train", "test")
                 if any(f"{split}_nll" in row for row in rows.values())]
    body = [[label] + [_measure(rows.get(name), key) for name in names] for label, key in measures]
    return [header, *body]


def _measure(row: Mapping[str, Any] | None, key: str) -> str:
    """A row's value of ``key``, with "+- sd" where the row has a spread for it; "-" if none."""
    if row is None or row.get(key) is None:
        return "-"
    if key.endswith("_nll"):
        return f"{row[key]:.4f} +- {row['nll'][key[:-4]]['standard_error']:.4f}"
    spread = row.get(f"{key}_sd")
    return _number(row[key]) + ("" if spread is None else f" +- {_number(spread)}")


def details_table(table: Mapping[str, Any]) -> list[list[str]]:
    """Every row of an ablation with precision, recall (means over the sampling seeds), the seeds,
    training step and times."""
    header = ["run", "train FID", "test FID", "train precision", "train recall", "test precision", "test recall",
              "FID seeds", "step", "train s", "FID s", "NLL s"]
    body = [
        [row["name"], _number(row["train_fid"]), _number(row["test_fid"]),
         *(_number(row["scores"][split][key]) for split in ("train", "test") for key in ("precision", "recall")),
         ",".join(str(seed["seed"]) for seed in row["seeds"]) if "seeds" in row else "-",
         str(row["step"]), _number(row["train_seconds"], 0), _number(row["eval_seconds"], 0),
         _number(sum(nll["wall_seconds"] for nll in row["nll"].values()), 0) if row.get("nll") else "-"]
        for row in table["rows"]
    ]
    return [header, *body]


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _settings_line(table: Mapping[str, Any]) -> str:
    sampling = ", ".join(f"{key} {value}" for key, value in table["sampling"].items() if value is not None)
    return f"{table['dataset']}: FID of {table['num_fid']} samples ({sampling}) on the features of the dataset's classifier"


def runs_table(report: Report) -> list[list[str]]:
    """One row per run: where training stands, its last losses and FID, the FIDs measured
    of it, and the settings that differ between the runs (all of them are folded below)."""
    differing = [key for key in dict.fromkeys(k for run in report.runs for k in run.config)
                 if len({_plain(run.config.get(key)) for run in report.runs}) > 1]
    measured = {"ablation": any(run.ablation_row for run in report.runs), "fid": any(run.fid_results for run in report.runs),
                "epoch FID": any("fid" in run.last for run in report.runs)}
    header = ["run", "step", "train loss", "val loss", *(["epoch FID"] if measured["epoch FID"] else []),
              *(["ablation train FID", "ablation test FID"] if measured["ablation"] else []),
              *(["ddpm fid"] if measured["fid"] else []), *differing]
    body = []
    for run in report.runs:
        row = [_run_name(report, run), str(run.provenance.get("step", "-")),
               _number(run.last.get("train_loss"), 4), _number(run.last.get("val_loss"), 4)]
        if measured["epoch FID"]:
            row.append(_number(run.last.get("fid")))
        if measured["ablation"]:
            row += [_number(run.ablation_row["train_fid"]), _number(run.ablation_row["test_fid"])] if run.ablation_row else ["-", "-"]
        if measured["fid"]:
            row.append("; ".join(_fid_summary(result) for _, result in run.fid_results) or "-")
        body.append(row + [_plain(run.config.get(key)) for key in differing])
    return [header, *body]


def _fid_summary(result: Mapping[str, Any]) -> str:
    """'test 9.64, train 9.81 (ddim, 50 steps, 8192 samples)' of one ddpm fid result."""
    settings = result["settings"]
    scores = ", ".join(f"{name.rsplit('/', 1)[-1]} {values['fid']:.2f}" for name, values in result["splits"].items())
    return f"{scores} ({settings.get('sampler')}, {settings.get('steps')} steps, {result['num_generated']} samples)"


def fid_table(report: Report) -> list[list[str]]:
    """Every ddpm fid result: what was sampled, and FID, precision and recall per split."""
    splits = list(dict.fromkeys(name.rsplit("/", 1)[-1] for _, result in report.fid_results for name in result["splits"]))
    header = ["result", "checkpoint", "weights", "sampler", "steps", "samples",
              *(f"{split} {key}" for split in splits for key in ("FID", "precision", "recall"))]
    body = []
    for path, result in report.fid_results:
        settings = result["settings"]
        scores = {name.rsplit("/", 1)[-1]: value for name, value in result["splits"].items()}
        body.append([
            str(path.relative_to(report.root)), _short_path(report, settings.get("checkpoint")), str(settings.get("weights", "-")),
            str(settings.get("sampler", "-")), str(settings.get("steps", "-")), str(result["num_generated"]),
            *(_number(scores[split][key], 2 if key == "fid" else 3) if split in scores else "-"
              for split in splits for key in ("fid", "precision", "recall")),
        ])
    return [header, *body]


def sweep_table(table: Mapping[str, Any]) -> list[list[str]]:
    """A guidance sweep's rows: accuracy, FID, precision and recall per scale."""
    header = ["scale", "accuracy", "FID", "precision", "recall", "samples"]
    body = [[f"{row['scale']:g}", _number(row["accuracy"], 3), _number(row["fid"]), _number(row["precision"], 3),
             _number(row["recall"], 3), str(row["num"])] for row in table["results"]]
    return [header, *body]


def _sweep_line(report: Report, table: Mapping[str, Any]) -> str:
    settings = table["settings"]
    return (f"{settings.get('kind')} guidance of {_short_path(report, settings.get('checkpoint'))}: "
            f"{settings.get('per_class')} samples of each class {settings.get('classes')} per scale, "
            f"{settings.get('sampler')} sampler, {settings.get('steps')} steps; FID against {settings.get('reference')}")


def _short_path(report: Report, path: str | None) -> str:
    """A recorded path, relative to the report's folder when it lies inside it."""
    if not path:
        return "-"
    try:
        return str(Path(path).resolve().relative_to(report.root.resolve()))
    except ValueError:
        return path


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as a fixed-width text table (the first column left-aligned, the rest right)."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) if column == 0 else cell.rjust(width) for column, (cell, width) in enumerate(zip(row, widths)))
        for row in rows
    )


# --- the page, as blocks that HTML and Markdown each render ------------------------------------

def _blocks(report: Report) -> list[tuple[Any, ...]]:
    """The report's content in order: ("h1" | "h2" | "h3" | "p", text), ("table", rows, css class),
    ("figure", Figure), ("folded", summary, [(title, pairs), ...])."""
    blocks: list[tuple[Any, ...]] = [("h1", f"ddpmkit report: {report.root.resolve().name}"),
                                     ("p", f"Made by ddpmkit {__version__} from {report.root}.")]
    if report.runs:
        blocks += [("h2", "Runs"), ("table", runs_table(report), "runs")]
    for path, table in report.ablations:
        blocks += [("h2", f"Ablation ({path.relative_to(report.root)})"), ("p", _settings_line(table)),
                   ("table", poster_table(table), "ablation"), ("table", details_table(table), "details")]
    if report.fid_results:
        blocks += [("h2", "FID (ddpm fid)"), ("table", fid_table(report), "fid")]
    for path, table in report.sweeps:
        blocks += [("h2", f"Guidance sweep ({path.relative_to(report.root)})"), ("p", _sweep_line(report, table)),
                   ("table", sweep_table(table), "sweep")]
    for run in report.runs:
        blocks += [("h2", f"Run {_run_name(report, run)}"), *(("figure", figure) for figure in run.figures)]
        sections = [("Configuration", run.config)] + ([("Provenance", run.provenance)] if run.provenance else [])
        blocks.append(("folded", "configuration and provenance", sections))
    if report.figures:
        blocks += [("h2", "Figures"), *(("figure", figure) for figure in report.figures)]
    return blocks


def _plain(value: Any) -> str:
    """A config or provenance value as text: lists and dicts as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


# --- HTML ---------------------------------------------------------------------------------------

def render_html(report: Report) -> str:
    parts = []
    for kind, *content in _blocks(report):
        if kind in ("h1", "h2", "h3", "p"):
            parts.append(f"<{kind}>{_e(content[0])}</{kind}>")
        elif kind == "table":
            parts.append(_html_table(*content))
        elif kind == "figure":
            parts.append(_html_figure(content[0]))
        else:
            summary, sections = content
            inner = "".join(f"<h3>{_e(title)}</h3>{_html_pairs(pairs)}" for title, pairs in sections)
            parts.append(f"<details><summary>{_e(summary)}</summary>{inner}</details>")
    body = "\n".join(parts)
    title = _e(report.root.resolve().name)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>ddpmkit report: {title}</title>\n'
            f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _e(value: Any) -> str:
    return html.escape(str(value))


def _html_table(rows: Sequence[Sequence[str]], css_class: str) -> str:
    header, *body = rows
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header)
    lines = "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>\n" for row in body)
    return f'<div class="table"><table class="{css_class}">\n<tr>{head}</tr>\n{lines}</table></div>'


def _html_pairs(values: Mapping[str, Any]) -> str:
    items = "".join(f"<div><dt>{_e(key)}</dt><dd>{_e(_plain(value))}</dd></div>" for key, value in values.items())
    return f'<dl class="config">{items}</dl>'


def _html_figure(figure: Figure) -> str:
    data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(figure.caption)}" title="click: full size" '
            f'onclick="{_ZOOM}"><figcaption>{_e(figure.caption)}</figcaption></figure>')


# --- Markdown -------------------------------------------------------------------------------------

def render_markdown(report: Report, out_dir: Path) -> str:
    """The same content; figures linked relative to ``out_dir``, where the .md is written."""
    parts = []
    for kind, *content in _blocks(report):
        if kind in ("h1", "h2", "h3"):
            parts.append(f"{'#' * int(kind[1])} {content[0]}")
        elif kind == "p":
            parts.append(content[0])
        elif kind == "table":
            parts.append(_markdown_table(content[0]))
        elif kind == "figure":
            parts.append(_markdown_figure(content[0], out_dir))
        else:
            summary, sections = content
            inner = "\n\n".join(f"**{title}**\n\n" + _markdown_table([["key", "value"], *([key, _plain(value)] for key, value in pairs.items())])
                                for title, pairs in sections)
            parts.append(f"<details><summary>{summary}</summary>\n\n{inner}\n\n</details>")
    return "\n\n".join(parts) + "\n"


def _markdown_table(rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    header, *body = rows
    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in body)])


def _markdown_figure(figure: Figure, out_dir: Path) -> str:
    link = Path(os.path.relpath(figure.path.resolve(), out_dir.resolve())).as_posix()
    return f"[![{figure.caption}]({link})]({link})\n\n*{figure.caption}*"


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``out_dir`` (default: runs_dir)."""
    report = collect_report(runs_dir)
    out_dir = Path(out_dir) if out_dir is not None else report.root
    html_path, markdown_path = out_dir / REPORT_HTML, out_dir / REPORT_MD
    write_text(html_path, render_html(report), what="report")
    write_text(markdown_path, render_markdown(report, out_dir), what="report")
    return html_path, markdown_path
