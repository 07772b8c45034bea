"""Report tables, figures and the self-contained HTML, opened in headless Chromium."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from causalimg.data.phantom import phantom_schema
from causalimg.metrics.base import EvalInfo, error_summary
from causalimg.metrics.effectiveness import Effectiveness
from causalimg.report.figures import error_bars, figure1
from causalimg.report.html import write_report
from causalimg.report.paper import paper_comparison, paper_table
from causalimg.report.tables import intervention_table, ordering_count, summary_table

REGIONS = ("proximal", "mid", "distal")
SCHEMA = phantom_schema(REGIONS, with_age=False)
NAMES = SCHEMA.area_names
INFO = EvalInfo(SCHEMA)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def summaries() -> dict[str, dict]:
    """Three strategies whose errors are scaled copies: pos < reg < none everywhere."""
    base = torch.rand(20, 9, 9, generator=torch.Generator().manual_seed(0)) + 1
    return {
        label: error_summary(base * scale, INFO)
        for label, scale in (("none", 3.0), ("regressor", 2.0), ("positional-segmentor", 1.0))
    }


def test_table1_layout_marks_intervened_cells_and_bolds_the_best():
    table = intervention_table(summaries(), SCHEMA, "Table 1")
    assert len(table.rows) == 27 and table.columns == REGIONS
    md = table.markdown()
    lines = md.splitlines()
    assert lines[0] == "| intervention | strategy | proximal | mid | distal |"
    block = lines[2:5]  # do(CPA-proximal): none, regressor, positional-segmentor
    assert [line.split("|")[2].strip() for line in block] == ["none", "regressor", "positional-segmentor"]
    assert block[2].count("**") == 6 and "**" not in block[0]  # best in every column of the block
    assert [line.split("|")[3].strip().strip("*").endswith("†") for line in block] == [True] * 3
    assert not any(line.split("|")[4].strip().endswith("†") for line in block)
    rows = list(csv.DictReader(io.StringIO(table.csv())))
    assert rows[0]["intervention"] == "do(CPA-proximal)" and rows[0]["intervened"] == "proximal"
    assert float(rows[0]["proximal"]) == pytest.approx(
        summaries()["none"]["cells"]["cpa_proximal"]["cpa_proximal"]["mean"], rel=1e-5
    )
    assert rows[3 * 4]["intervened"] == "mid"  # do(CPA-mid), first strategy (block 4 of 9, 3 rows each)


def test_ordering_count_and_summary_table():
    s = summaries()
    order = ("positional-segmentor", "regressor", "none")
    assert ordering_count(s, NAMES, order) == 9
    assert ordering_count(s, NAMES, ("none", "regressor")) == 0
    assert ordering_count({"none": s["none"]}, NAMES, order) is None
    entries = {label: [Effectiveness().report(summary, INFO)] for label, summary in s.items()}
    table = summary_table(entries)
    assert table.columns == ("intervened (eval seg)", "off-target (eval seg)")
    assert "evaluation segmentor" in table.note and "9 interventions" in table.note
    best = [cells[0].best for _, cells in table.rows]
    assert best == [False, False, True]


def test_figure1_and_bars_are_pngs_of_the_expected_size(tmp_path):
    h, w = 32, 192
    x = torch.linspace(-1, 1, w).repeat(h, 1)[None]
    regions = torch.zeros(3, h, w)
    for k in range(3):
        regions[k, :, k * 64 : (k + 1) * 64] = 1
    cfs = {s: [x + 0.2 * regions[k : k + 1] for k in range(3)] for s in ("none", "positional-segmentor")}
    png = figure1(x, cfs, regions, REGIONS, [f"do(CPA-{r} + 20)" for r in REGIONS], tmp_path / "figure1.png")
    image = Image.open(png)
    assert image.format == "PNG" and image.width > 800 and image.height > 300
    bars = error_bars(
        {"a": dict.fromkeys(NAMES, 1.0), "b": dict.fromkeys(NAMES, 2.0)}, SCHEMA, tmp_path / "bars.png", "errors"
    )
    assert Image.open(bars).format == "PNG"


def write_sample_report(tmp_path: Path) -> Path:
    table = intervention_table(summaries(), SCHEMA, "Table 1: effectiveness")
    png = error_bars({"a": dict.fromkeys(NAMES, 1.0)}, SCHEMA, tmp_path / "bars.png", "errors")
    return write_report(
        tmp_path / "report.html",
        title="causalimg report",
        intro="test run <with markup>",
        tables=[table],
        figures=[(png, "Intervened-region error")],
        timings={"data": {"status": "ran", "seconds": 1.5}},
        configs={"config.yaml": "run:\n  seed: 0\n"},
        findings=["positional-segmentor has the lowest error"],
    )


def test_report_is_self_contained(tmp_path):
    text = write_sample_report(tmp_path).read_text()
    assert "data:image/png;base64," in text and "&lt;with markup&gt;" in text
    assert not re.search(r"""(src|href)=["'](?!data:)""", text)  # nothing fetched from anywhere
    assert "<script" not in text


# The probe is added to a COPY of the report: the report itself carries no script.
PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().height > 0);
  const tables = [...document.querySelectorAll('table')].map(t => t.rows.length);
  document.body.setAttribute('data-probe', JSON.stringify({images, tables, bold: document.querySelectorAll('td.best b').length}));
});
</script></body>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (.ci/run installs it: apt-get install -y chromium)")
def test_report_renders_tables_and_images_in_headless_chromium(tmp_path):
    report = write_sample_report(tmp_path)
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("</body>", PROBE))
    done = chromium("--dump-dom", probed.as_uri(), profile=tmp_path / "profile")
    match = re.search(r'data-probe="([^"]*)"', done.stdout)
    assert match, done.stderr[-2000:]
    probe = json.loads(match.group(1).replace("&quot;", '"'))
    assert probe["images"] == [True]
    assert probe["tables"][0] == 28  # header + 27 rows of Table 1
    assert probe["bold"] == 27  # one best per column per intervention block
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,900", report.as_uri(), profile=tmp_path / "profile2")
    pixels = Image.open(shot).convert("L")
    assert pixels.getextrema()[0] < 100  # text and table lines were drawn, not a blank page


def test_paper_comparison_puts_ratios_side_by_side():
    paper = {(row["intervention"], row["cft_type"]): row for row in paper_table()}
    assert len(paper) == 27 and paper[("do(LA-distal)", "Pos-Seg-CFT")]["distal"] == "19.38"  # the shipped table
    table = paper_comparison(summaries(), SCHEMA, ("positional-segmentor", "regressor", "none"))
    assert len(table.rows) == 9
    (label,), cells = table.rows[0]
    assert label == "do(CPA-proximal)"
    assert [round(c.value, 4) for c in cells] == [round(7.89 / 9.25, 4), 0.6667, round(7.77 / 9.25, 4), 0.3333]
    halves = phantom_schema(("near", "far"), with_age=False)
    errors = torch.rand(5, 6, 6, generator=torch.Generator().manual_seed(0)) + 1
    ours = {label: error_summary(errors, EvalInfo(halves)) for label in ("positional-segmentor", "regressor", "none")}
    other = paper_comparison(ours, halves, ("positional-segmentor", "regressor", "none"))
    assert all(math.isnan(c.value) for _, cells in other.rows for c in cells[::2])  # the paper has no such regions
    assert all(c.value == pytest.approx(1.0) for _, cells in other.rows for c in cells[1::2])
