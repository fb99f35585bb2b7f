"""``ddpm report``: the poster's table, the run sections, and the page checked in a real browser.

The runs folder is built from a tiny real training run (its per-epoch grid, curves, a reverse
strip), a forward-process figure, and an ablation.json, a ddpm fid result and a guidance sweep
whose numbers are MADE UP (test fixture values, see FIXTURE_FIDS): only their placement in the
tables is under test.
"""

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from ddpmkit.ablation import POSTER_GRID, grid_cells
from ddpmkit.checkpoint import load_trained_model
from ddpmkit.cli import main
from ddpmkit.figures import forward_process_figure, plot_metrics, reverse_process_figure
from ddpmkit.report import RunSummary, collect_report, poster_table, render_html, runs_table, write_report
from ddpmkit.schedules import make_schedule
from ddpmkit.training import train

# Made-up test fixture numbers (name: train FID, test FID); cosine-noattn is left out on purpose.
FIXTURE_FIDS = {"linear-attn": (12.5, 14.25), "linear-noattn": (13.0, 15.5), "cosine-attn": (9.75, 11.0)}
EXPECTED_TABLE = [
    ["", "linear / attention", "linear / none", "cosine / attention", "cosine / none"],
    ["Train-FID", "12.50", "13.00", "9.75", "-"],
    ["Test-FID", "14.25", "15.50", "11.00", "-"],
]
INSTALL_HINT = "headless Chromium is needed for this test: apt-get install -y chromium (Debian/Ubuntu), then rerun"


def _fixture_row(name, train_fid, test_fid, config):
    # A row as ddpm ablation wrote them before grids of any key: no "settings", no seeds, no NLL.
    cell = next(c for c in grid_cells(POSTER_GRID) if c.name == name)
    schedule, attention = (value for _, value in cell.settings)
    score = {"precision": 0.5, "recall": 0.25}
    return {
        "name": name, "schedule": schedule, "attention": attention, "run_dir": f"elsewhere/{name}",
        "train_fid": train_fid, "test_fid": test_fid,
        "scores": {"train": {"fid": train_fid, **score}, "test": {"fid": test_fid, **score}},
        "step": 5, "train_seconds": 1.0, "eval_seconds": 2.0, "config": config,
        "provenance": {"checkpoint": "made-up", "num_generated": 6, "extractor": "classifier:test-fixture"},
    }


@pytest.fixture(scope="module")
def runs_dir(folder_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "runs"
    run = root / "ablation" / "linear-attn"
    config = tiny_config(folder_dataset, epochs=1, attention_levels=(1,))
    train(config, run, progress=False)  # samples/epoch-000.png, a checkpoint
    plot_metrics(run)
    trained = load_trained_model(run)
    reverse_process_figure(trained.model, trained.schedule, trained.image_shape, run / "reverse-ddim-5.png",
                           num_images=2, num_frames=3, sampler="ddim", steps=5)
    digits = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    digits[:, :, 2:6, 3:5] = 255
    forward_process_figure(digits, [make_schedule("linear", 50), make_schedule("cosine", 50)], root / "figures", num_frames=4)
    rows = [_fixture_row(name, *fids, config.to_dict()) for name, fids in FIXTURE_FIDS.items()]
    table = {"note": "test fixture: made-up numbers", "dataset": config.dataset, "num_fid": 6,
             "sampling": {"sampler": "ddim", "steps": 5}, "rows": rows}
    (root / "ablation" / "ablation.json").write_text(json.dumps(table))
    # A ddpm fid result of the run, kept outside it: the report finds its run by the checkpoint it names.
    score = {"precision": 0.5, "recall": 0.25}
    fid_result = {"note": "test fixture: made-up numbers", "num_generated": 6,
                  "splits": {f"{config.dataset}/train": {"fid": 2.5, **score}, f"{config.dataset}/test": {"fid": 3.25, **score}},
                  "settings": {"checkpoint": str(trained.path.resolve()), "weights": "EMA", "sampler": "ddim", "steps": 5}}
    (root / "fid-ddim.json").write_text(json.dumps(fid_result))
    sweep = {"settings": {"kind": "classifier-free", "checkpoint": str(trained.path.resolve()), "per_class": 4, "classes": [0, 1],
                          "sampler": "ddim", "steps": 5, "reference": "shapes/test"},
             "results": [{"scale": 0.0, "accuracy": 0.5, "fid": 7.0, "precision": 0.5, "recall": 0.75, "num": 8}]}
    (run / "guidance-classifier-free").mkdir()
    (run / "guidance-classifier-free" / "guidance-sweep.json").write_text(json.dumps(sweep))
    return root


def test_poster_table_layout(runs_dir):
    report = collect_report(runs_dir)
    [(path, table)] = report.ablations
    assert path == runs_dir / "ablation" / "ablation.json"
    assert poster_table(table) == EXPECTED_TABLE
    [run] = report.runs
    assert run.path == runs_dir / "ablation" / "linear-attn"
    assert run.config["attention_levels"] == [1] and run.provenance["step"] == 5
    assert run.provenance["FID extractor"] == "classifier:test-fixture"  # its ablation row, matched by name
    assert sorted(f.path.name for f in run.figures) == ["curves.png", "epoch-000.png", "reverse-ddim-5.png"]
    assert sorted(f.path.name for f in report.figures) == ["alpha-bars.png", "forward-cosine.png", "forward-linear.png"]
    assert [path.name for path, _ in run.fid_results] == ["fid-ddim.json"] and len(report.sweeps) == 1
    captions = {figure.path.name: figure.caption.rsplit(" (", 1)[0] for figure in run.figures}
    # One epoch ran, and its grid is epoch-000.png; no FID was logged, so the curves are of the loss.
    assert captions["epoch-000.png"] == "samples after epoch 1 (preview sampler)" and captions["curves.png"] == "loss curves"
    assert run.provenance["epochs finished"] == 1


def test_the_page_leads_with_a_table_of_the_runs_and_their_results(runs_dir):
    report = collect_report(runs_dir)
    header, row = runs_table(report)
    assert header == ["run", "step", "train loss", "val loss", "ablation train FID", "ablation test FID", "ddpm fid"]
    [run] = report.runs
    assert row[:2] == ["ablation/linear-attn", "5"] and row[3] == f"{run.last['val_loss']:.4f}"
    assert row[4:] == ["12.50", "14.25", "train 2.50, test 3.25 (ddim, 5 steps, 6 samples)"]
    page = render_html(report)
    assert page.index('<table class="runs">') < page.index('<table class="ablation">') < page.index('<table class="fid">')
    assert page.index('<table class="sweep">') < page.index("<h2>Run ablation/linear-attn</h2>") < page.index("<details>")
    assert page.count('onclick="this.classList.toggle(') == 6  # every figure opens at full size
    # Two runs: the settings they differ in become columns, the shared ones stay folded.
    other = RunSummary(runs_dir / "other", {**run.config, "lr": 0.5}, {"step": 7})
    report.runs.append(other)
    assert runs_table(report)[0][-1] == "lr" and runs_table(report)[2][-1] == "0.5"


def test_a_report_of_one_run_folder_is_headed_by_its_name(runs_dir, tmp_path):
    html_path, _ = write_report(runs_dir / "ablation" / "linear-attn", tmp_path)
    assert "<h2>Run linear-attn</h2>" in html_path.read_text()


def test_a_grid_of_other_keys_gets_a_column_per_cell_with_spreads_and_the_nll():
    # Made-up test fixture numbers, as the rows ddpm ablation writes now: settings, seeds, NLL.
    def row(name, prediction, test_fid, spread, nll):
        return {"name": name, "settings": {"prediction": prediction}, "train_fid": test_fid - 1, "test_fid": test_fid,
                "train_fid_sd": spread, "test_fid_sd": spread, "test_nll": nll,
                "nll": {"test": {"bits_per_dim": nll, "standard_error": 0.01}}}

    table = {"rows": [row("prediction=eps", "eps", 20.5, 1.25, 1.5), row("prediction=v", "v", 18.0, 0.5, 1.25)]}
    assert poster_table(table) == [
        ["", "prediction eps", "prediction v"],
        ["Train-FID", "19.50 +- 1.25", "17.00 +- 0.50"],
        ["Test-FID", "20.50 +- 1.25", "18.00 +- 0.50"],
        ["Test-NLL (bits/dim)", "1.5000 +- 0.0100", "1.2500 +- 0.0100"],
    ]


def test_report_command_writes_html_and_markdown(runs_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(runs_dir), "--out", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    markdown = (out / "report.md").read_text()
    assert "| Train-FID | 12.50 | 13.00 | 9.75 | - |" in markdown
    assert "| Test-FID | 14.25 | 15.50 | 11.00 | - |" in markdown
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(links) == 6 and all((out / link).is_file() for link in links)
    page = (out / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing to fetch: self-contained
    assert main(["report", str(tmp_path / "missing")]) == 2


# Appended to a copy of the page: once everything has loaded, write what the browser sees
# (each image's naturalWidth, the ablation table's cells) into the DOM, for --dump-dom.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images).map(image => ({complete: image.complete, width: image.naturalWidth}));
  const tables = Array.from(document.querySelectorAll("table.ablation"))
    .map(table => Array.from(table.rows).map(row => Array.from(row.cells).map(cell => cell.textContent)));
  const first = document.images[0];
  first.click();
  const zoomed = first.classList.contains("full") && getComputedStyle(first).maxWidth === "none";
  const out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify({images, tables, zoomed});
  document.body.appendChild(out);
});
</script>
"""


def _chromium(*arguments, profile):
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail(INSTALL_HINT)
    # --no-sandbox: Chromium's sandbox refuses to start as root (as in CI containers).
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)


def test_the_page_in_a_real_browser(runs_dir, tmp_path):
    out = tmp_path / "out"
    main(["report", str(runs_dir), "--out", str(out)])
    page = (out / "report.html").read_text()
    probed = out / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri(), profile=tmp_path / "profile").stdout
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom, re.S)
    assert found, f"the probe did not run; the browser's DOM starts: {dom[:300]}"
    seen = json.loads(html.unescape(found.group(1)))
    assert len(seen["images"]) == page.count("<img ") == 6
    assert all(image["complete"] and image["width"] > 0 for image in seen["images"]), seen["images"]
    assert seen["tables"] == [EXPECTED_TABLE] and seen["zoomed"]

    screenshot = tmp_path / "report.png"
    _chromium("--hide-scrollbars", f"--screenshot={screenshot}", "--window-size=1200,2000", (out / "report.html").as_uri(),
              profile=tmp_path / "profile")
    picture = Image.open(screenshot)
    assert picture.size == (1200, 2000)
    pixels = np.asarray(picture.convert("L"), dtype=np.float64)
    assert pixels.std() > 20 and len(np.unique(pixels)) > 50  # text, table and images, not a blank page
