"""The HTML report, built by the real pipeline (demo data, search, evaluation), opened in a real
headless Chromium: it renders, logs nothing to the console, and the plots are there.

Chromium is required, not optional: without it this test fails with the command that installs it,
because a skipped browser test would let a broken report through CI unnoticed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from ilias.cli import main
from ilias.evaluate import evaluate
from ilias.report import build_report, to_html, write_html
from ilias.report.html import OURS_COLOUR, TASK_COLOURS
from ilias.report.published import SETTING_ROWS
from PIL import Image  # comes with the test extra (scikit-image needs it)

INSTALL = "apt-get install -y chromium"
CHARTS = ["curve", "categories", "subcategories", "scale", "clutter", "published-i2i", "published-t2i"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail(f"the HTML report test needs Chromium (Debian): {INSTALL}", pytrace=False)
    return found


def browse(page: Path, work: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run with its own profile. Console messages (errors, uncaught
    exceptions, refused resources) go to stderr as lines holding ':CONSOLE'."""
    cmd = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--enable-logging=stderr", "--v=0", f"--user-data-dir={work / 'profile'}", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    args = ["--instances", "40", "--distractor-images", "1000", "--distractors", "20000"]
    assert main(["demo", "--out", str(root), *args]) == 0
    return root


@pytest.fixture(scope="module")
def page(demo, tmp_path_factory) -> Path:
    """The full-database report, compared with the mini-ILIAS numbers on purpose so that the
    published-models charts are drawn too: the demo's database is far smaller, and a results
    file of another size is never placed, so the evaluation is given mini-ILIAS's size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = evaluate(demo / "results.all.npz", demo / "ILIAS")
        ev.database_rows = SETTING_ROWS["mini"]
        report = build_report(ev, setting="mini", config={"model": "demo"})
    results = json.loads((demo / "run.json").read_text())["results"]
    tiers = [{"name": name, **results[name]} for name in ("mini", "all")]
    out = tmp_path_factory.mktemp("html")
    return write_html(report, out / "report.html", tiers=tiers, qualitative=qualitative(report, out))


def qualitative(report: dict, out: Path) -> list[dict]:
    """Two queries with generated images (one result has none, so its id is shown instead)."""
    paths = []
    for i, colour in enumerate(["#c53030", "#2f855a", "#2b6cb0", "#d69e2e"]):
        paths.append(out / f"img{i}.png")
        Image.new("RGB", (300, 200 + 40 * i), colour).save(paths[-1])
    queries = []
    for qid in report["tasks"]["i2i"]["per_query"]["ids"][:2]:
        results = [{"id": f"{qid}/result{r}", "score": 0.9 - 0.1 * r, "positive": r == 0,
                    "image": str(paths[r]) if r < 3 else None} for r in range(4)]
        queries.append({"query_id": qid, "query_image": str(paths[3]), "results": results})
    return queries


def test_report_renders_in_chromium_without_console_errors(page, tmp_path):
    text = page.read_text(encoding="utf-8")
    # self-contained: nothing fetched, nothing run
    assert not re.search(r"<script|<link|(src|href)=\"https?:|url\(", text)

    dom = browse(page, tmp_path, "--dump-dom")
    assert console_lines(dom.stderr) == []
    charts = dict(re.findall(r'<svg id="([\w-]+)"[^>]*>(.*?)</svg>', dom.stdout, re.DOTALL))
    assert sorted(charts) == sorted(CHARTS)
    for chart in CHARTS[1:]:
        assert charts[chart].count("<rect") > 2, f"chart {chart} has no bars"
    assert charts["curve"].count("<polyline") == 2 and charts["curve"].count("<circle") == 4
    assert 'id="map-table"' in dom.stdout and 'id="qualitative"' in dom.stdout
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', dom.stdout)) == 2 * (1 + 3)
    assert dom.stdout.count('class="item pos"') == 2
    assert OURS_COLOUR in dom.stdout  # this result, highlighted among the published models

    shot = tmp_path / "report.png"
    browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
    with Image.open(shot) as im:
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert len(colours) > 50, "the screenshot is (nearly) blank"
    for task, hex_colour in TASK_COLOURS.items():  # the bars were painted, not only put in the DOM
        rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        assert rgb in colours, f"no {task} bars on screen"
    shutil.copy(shot, Path(page).with_suffix(".png"))  # beside the report, to look at by hand


def test_console_check_catches_errors(tmp_path):
    """The console check above is only worth something if it sees errors when there are some."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><p>x</p><script>console.error('boom'); notDefined();</script>")
    lines = console_lines(browse(bad, tmp_path, "--dump-dom").stderr)
    assert any("boom" in line for line in lines) and any("Uncaught" in line for line in lines)


def test_escapes_text_and_skips_what_is_absent(demo):
    report = json.loads((demo / "report.all.json").read_text())
    report["config"]["model"] = "<script>alert(1)</script>"
    report["warnings"] = ["a & b <i>"]
    for t in report["tasks"].values():
        t["categories"] = {"<b>cat</b>": 50.0}
        t["subcategories"] = {}
    text = to_html(report)
    assert "<script>" not in text and "&lt;script&gt;" in text and "a &amp; b &lt;i&gt;" in text
    assert "&lt;b&gt;cat&lt;/b&gt;" in text
    # no tiers, no subcategories, no setting: those charts are left out, the rest still renders
    assert 'id="curve"' not in text and 'id="subcategories"' not in text and 'id="published-i2i"' not in text
    assert 'id="categories"' in text and "Not compared" in text
