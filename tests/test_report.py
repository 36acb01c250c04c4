"""`snakemake --report`: an HTML report with every stage's figures, rendered by a real browser.

On the completed run of tests/test_pipeline.py's small config (the session's `completed_run`),
`snakemake --report report.html` embeds every figure flagged with report() in the rules, each under
its stage's category and dataset, with its caption. Headless Chromium loads the report (its pages are
drawn by JavaScript): the page it builds must show the workflow description and every category, and
its screenshot must be a picture of that page, not a blank one.
"""

import base64
import json
import re
import shutil

import numpy as np
import pytest

from conftest import run_job
from pipeline_run import DATASETS, snakemake, succeeded
from tiny_config import N_SHOTS, SHOTS_PER_SHARD

#: Slow tier (make test-fast leaves it out): the completed run's report, rendered in Chromium.
pytestmark = pytest.mark.slow

#: Every figure the report must hold: (category, path under results/ with {dataset}, rule).
FIGURES = [
    ("1. Simulated shots", "report/{dataset}_shot.png", "plot_shot"),
    ("1. Simulated shots", "hitfind/{dataset}/shots.png", "hitfind"),
    ("1. Simulated shots", "hitfind/{dataset}/powder.png", "powder"),
    ("1. Simulated shots", "score/hitfind_{dataset}.png", "score_hitfind"),
    ("2. DIALS stages", "report/{dataset}_detector_refinement.png", "plot_detector_refinement"),
    ("2. DIALS stages", "score/dials_{dataset}.png", "score_dials"),
    ("2. DIALS stages", "metrology/{dataset}/residuals_before.png", "metrology"),
    ("2. DIALS stages", "metrology/{dataset}/residuals_after.png", "metrology"),
    ("3. Unit cells", "cells/{dataset}_clusters.png", "covariance"),
    ("4. Merging", "merge/{dataset}/statistics.png", "merge"),
    ("4. Merging", "score/merge_{dataset}.png", "score_merge"),
    ("5. Pixel refinement", "score/stage1_{dataset}.png", "score_stage1"),
    ("5. Pixel refinement", "score/exa_{dataset}.png", "score_exa"),
    ("6. SPREAD", "score/spread_{dataset}.png", "score_spread"),
]
WINDOW = (1400, 1000)


#: The first sentence of report/workflow.rst, with the config's numbers filled in.
DESCRIPTION = f"SPREAD analysis of ferredoxin LY99: {N_SHOTS} simulated shots in shards of {SHOTS_PER_SHARD}"


@pytest.fixture(scope="module")
def report(completed_run, tmp_path_factory):
    """(workdir, report path): the completed run's HTML report."""
    workdir, configfile = completed_run
    path = tmp_path_factory.mktemp("report") / "report.html"
    succeeded(snakemake(workdir, configfile, "--report", str(path)))
    return workdir, path


def embedded(html: str, name: str):
    """The JSON a report's ``<script id="NAME">var NAME = ...;</script>`` block holds."""
    match = re.search(rf'<script id="{name}">\s*var \w+ = (.*?);\s*</script>', html, re.DOTALL)
    assert match, f"no {name} block in the report"
    return json.loads(match.group(1))


def test_report_embeds_every_stage_figure_with_its_caption(report):
    workdir, path = report
    html = path.read_text()
    results, categories = embedded(html, "results"), embedded(html, "categories")
    results_dir = workdir / "results"

    expected = {str(results_dir / figure.format(dataset=dataset)): (category, dataset, rule)
                for category, figure, rule in FIGURES for dataset in DATASETS}
    assert set(results) == set(expected)
    for result_path, (category, dataset, rule) in expected.items():
        result = results[result_path]
        assert result_path in categories[category][dataset]
        assert result["job_properties"]["rule"] == rule
        assert result["labels"]["dataset"] == dataset
        assert result["mime_type"] == "image/png"
        # The figure itself, embedded: the same bytes as the file.
        header, data = result["data_uri"].split(";base64,")
        assert header.startswith("data:image/png;")
        assert base64.b64decode(data) == open(result_path, "rb").read()
        # Its caption (report/*.rst), rendered with the dataset filled in.
        assert f'literal">{dataset}</tt>' in result["caption"] and "{{" not in result["caption"], result["caption"]
    description = re.sub(r"\s+", " ", embedded(html, "workflow-desc"))
    assert DESCRIPTION in description


def chromium() -> str:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it)")
    return executable


def headless(executable, profile_dir, *arguments):
    """Run headless Chromium (no sandbox: tests run as root) with its own profile directory."""
    command = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile_dir}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
               "--virtual-time-budget=10000", *arguments]
    return run_job(command, timeout=180)


def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    executable = chromium()
    _, path = report
    url = path.as_uri()

    dom = headless(executable, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-3000:]
    # The page as the browser built it: the report's app element is empty in the file and filled in by
    # its scripts, with the workflow description and a menu entry per category.
    start = dom.stdout.index('<div id="app">')
    app = dom.stdout[start:dom.stdout.index("<script", start)]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", app))
    assert DESCRIPTION in text, text[:3000]
    for category in {category for category, _, _ in FIGURES}:
        assert category in text, category

    screenshot = tmp_path / "report.png"
    shot = headless(executable, tmp_path / "profile", f"--screenshot={screenshot}", url)
    assert shot.returncode == 0, shot.stderr[-3000:]
    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.size == WINDOW
        pixels = np.asarray(image.convert("RGB"))
    # A drawn page: many colours (text, menu, logo), and no single colour covering nearly all of it.
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    assert len(colours) > 50, len(colours)
    assert counts.max() < 0.95 * pixels.shape[0] * pixels.shape[1]
