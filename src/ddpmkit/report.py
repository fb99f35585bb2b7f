"""``ddpm report RUNS_DIR``: everything in a folder of runs as one page, in HTML and Markdown.

The HTML page is self-contained: every figure is embedded as a base64 ``data:`` URI and
the style is inline, so it opens from disk with no network and can be mailed as one file.
The Markdown twin links the same PNG files by relative path.

What is found under RUNS_DIR (recursively):

* ``ablation.json`` (``ddpm ablation``): the grid's table, rows Train-FID and Test-FID (and
  the NLL where measured), one column per cell (for the poster's schedule x attention grid
  its four combinations in the poster's order), then the precision, recall and times of
  every row;
* run directories (``config.json`` and ``metrics.jsonl``): the configuration, the latest
  checkpoint's provenance, the FID provenance of its ablation row, and its figures;
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

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
# The poster's column order: linear then cosine, each with attention then without.
POSTER_COLUMNS = tuple(grid_cells(POSTER_GRID))
_EPOCH_GRID = re.compile(r"^epoch-(\d+)\.png$")
# What a figure shows, by file name (first match); every caption also gives the path.
_DESCRIPTIONS = (
    (_EPOCH_GRID, "samples after epoch {0} (preview sampler)"),
    (re.compile(r"^curves\.png$"), "loss and FID curves"),
    (re.compile(r"^forward-(.+)\.png$"), "forward process, {0} schedule"),
    (re.compile(r"^alpha-bars\.png$"), "abar_t of the schedules"),
    (re.compile(r"^reverse.*\.png$"), "reverse process: x_t and predicted x0"),
    (re.compile(r"^fid_vs_nfe\.png$"), "FID against the number of model evaluations"),
    (re.compile(r".*sweep.*\.png$"), "guidance trade-off"),
    (re.compile(r"^nll.*\.png$"), "NLL bound: the bits/dim of each step's term"),
    (re.compile(r"^samples.*\.png$"), "samples"),
)
_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
dl.config { columns: 3; font-size: 0.85em; }
dl.config div { break-inside: avoid; }
dl.config dt { font-weight: bold; } dl.config dd { margin: 0 0 0.3em 1em; word-break: break-all; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { min-width: 200px; max-width: 520px; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; max-width: 520px; }
"""


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


@dataclass
class RunSummary:
    """A run directory: its config, provenance and figures."""

    path: Path
    config: dict[str, Any]
    provenance: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)


@dataclass
class Report:
    root: Path
    ablations: list[tuple[Path, dict[str, Any]]]
    runs: list[RunSummary]
    figures: list[Figure]  # those outside every run directory


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
    loose = []
    for figure in _figures(root):
        owner = next((by_dir[parent] for parent in figure.path.parents if parent in by_dir), None)
        (owner.figures if owner else loose).append(figure)
    if not (ablations or runs or loose):
        raise DdpmError(f"{root} holds no ablation.json, run directory or PNG figure to report on")
    return Report(root, ablations, runs, loose)


def _run_summary(run_dir: Path, ablation_row: Mapping[str, Any] | None) -> RunSummary:
    config = json.loads((run_dir / "config.json").read_text())
    provenance: dict[str, Any] = {}
    checkpoint_path = latest_checkpoint(run_dir)
    if checkpoint_path is not None:
        checkpoint = load_checkpoint(checkpoint_path)
        provenance.update({
            "checkpoint": checkpoint_path.name, "step": checkpoint.state.get("step"),
            "epoch": checkpoint.state.get("epoch"), "ddpmkit version": checkpoint.version,
        })
    if ablation_row is not None:
        provenance.update({f"FID {key}": value for key, value in ablation_row["provenance"].items() if key != "checkpoint"})
        provenance.update({"train seconds": ablation_row.get("train_seconds"), "FID seconds": ablation_row.get("eval_seconds")})
    return RunSummary(run_dir, config, provenance)


def _figures(root: Path) -> list[Figure]:
    """Every PNG under root, in path order; of per-epoch grids only each folder's last."""
    pngs = sorted(root.rglob("*.png"))
    last_epoch = {}
    for path in pngs:
        if _EPOCH_GRID.match(path.name):
            last_epoch[path.parent] = max(last_epoch.get(path.parent, path), path)  # zero-padded: name order is epoch order
    kept = [path for path in pngs if not _EPOCH_GRID.match(path.name) or last_epoch[path.parent] == path]
    return [Figure(path, f"{_describe(path.name)} ({path.relative_to(root)})") for path in kept]


def _describe(name: str) -> str:
    for pattern, description in _DESCRIPTIONS:
        match = pattern.match(name)
        if match:
            return description.format(*(int(g) if g.isdigit() else g for g in match.groups()))
    return "figure"


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


# --- HTML ---------------------------------------------------------------------------------------

def render_html(report: Report) -> str:
    parts = [f"<h1>ddpmkit report: {_e(report.root.name)}</h1>", f"<p>Made by ddpmkit {_e(__version__)} from {_e(report.root)}.</p>"]
    for path, table in report.ablations:
        parts += [f"<h2>Ablation ({_e(path.relative_to(report.root))})</h2>", f"<p>{_e(_settings_line(table))}</p>",
                  _html_table(poster_table(table), "ablation"), _html_table(details_table(table), "details")]
    for run in report.runs:
        parts += [f"<h2>Run {_e(run.path.relative_to(report.root))}</h2>", "<h3>Configuration</h3>", _html_pairs(run.config)]
        if run.provenance:
            parts += ["<h3>Provenance</h3>", _html_pairs(run.provenance)]
        parts += [_html_figure(figure) for figure in run.figures]
    if report.figures:
        parts += ["<h2>Figures</h2>", *(_html_figure(figure) for figure in report.figures)]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>ddpmkit report: {_e(report.root.name)}</title>\n'
            f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _e(value: Any) -> str:
    return html.escape(str(value))


def _html_table(rows: Sequence[Sequence[str]], css_class: str) -> str:
    header, *body = rows
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header)
    lines = "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>\n" for row in body)
    return f'<table class="{css_class}">\n<tr>{head}</tr>\n{lines}</table>'


def _html_pairs(values: Mapping[str, Any]) -> str:
    items = "".join(f"<div><dt>{_e(key)}</dt><dd>{_e(_plain(value))}</dd></div>" for key, value in values.items())
    return f'<dl class="config">{items}</dl>'


def _html_figure(figure: Figure) -> str:
    data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(figure.caption)}">'
            f"<figcaption>{_e(figure.caption)}</figcaption></figure>")


def _plain(value: Any) -> str:
    """A config or provenance value as text: lists and dicts as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


# --- Markdown -------------------------------------------------------------------------------------

def render_markdown(report: Report, out_dir: Path) -> str:
    """The same content; figures linked relative to ``out_dir``, where the .md is written."""
    parts = [f"# ddpmkit report: {report.root.name}", f"Made by ddpmkit {__version__} from `{report.root}`."]
    for path, table in report.ablations:
        parts += [f"## Ablation ({path.relative_to(report.root)})", _settings_line(table),
                  _markdown_table(poster_table(table)), _markdown_table(details_table(table))]
    for run in report.runs:
        parts += [f"## Run {run.path.relative_to(report.root)}", "### Configuration",
                  _markdown_table([["key", "value"], *([key, _plain(value)] for key, value in run.config.items())])]
        if run.provenance:
            parts += ["### Provenance", _markdown_table([["key", "value"], *([key, _plain(value)] for key, value in run.provenance.items())])]
        parts += [_markdown_figure(figure, out_dir) for figure in run.figures]
    if report.figures:
        parts += ["## Figures", *(_markdown_figure(figure, out_dir) for figure in report.figures)]
    return "\n\n".join(parts) + "\n"


def _markdown_table(rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    header, *body = rows
    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in body)])


def _markdown_figure(figure: Figure, out_dir: Path) -> str:
    link = Path(os.path.relpath(figure.path.resolve(), out_dir.resolve())).as_posix()
    return f"![{figure.caption}]({link})\n\n*{figure.caption}*"


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``out_dir`` (default: runs_dir)."""
    report = collect_report(runs_dir)
    out_dir = Path(out_dir) if out_dir is not None else report.root
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, markdown_path = out_dir / REPORT_HTML, out_dir / REPORT_MD
    html_path.write_text(render_html(report), encoding="utf-8")
    markdown_path.write_text(render_markdown(report, out_dir), encoding="utf-8")
    return html_path, markdown_path
