"""``ddpm report``: the poster's table, the run sections, and the page checked in a real browser.

The runs folder is built from a tiny real training run (its per-epoch grid, curves, a reverse
strip), a forward-process figure, and an ablation.json whose FID numbers are MADE UP (test
fixture values, see FIXTURE_FIDS): only their placement in the table is under test.
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
from ddpmkit.report import collect_report, poster_table
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
  const out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify({images, tables});
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
    assert seen["tables"] == [EXPECTED_TABLE]

    screenshot = tmp_path / "report.png"
    _chromium("--hide-scrollbars", f"--screenshot={screenshot}", "--window-size=1200,2000", (out / "report.html").as_uri(),
              profile=tmp_path / "profile")
    picture = Image.open(screenshot)
    assert picture.size == (1200, 2000)
    pixels = np.asarray(picture.convert("L"), dtype=np.float64)
    assert pixels.std() > 20 and len(np.unique(pixels)) > 50  # text, table and images, not a blank page
