"""The report as a reader sees it: a real run's page rendered by headless Chromium, and the screenshot checked.

A small merge run (real Ray workers, real Parquet, MLflow off) writes its report; Chromium loads the page
from disk and takes a screenshot. Each figure embedded in the page must be on the screenshot at its own
size, pixel for pixel (a figure the page scaled down would have its text shrunk), and the screenshot must
show the figures' colours, not a blank page. The screenshot is kept under the test's temporary folder.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pytest

from sweep.plotting import PAGE_WIDTH_PX
from sweep.report import write_report
from tests.conftest import repo_config
from workers.driver import run

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: The browser window: wider than the page, tall enough for the whole report.
WINDOW = (1280, 5200)
#: Chromium starts and draws a page of a few MB well within this.
BROWSER_SECONDS = 120


def screenshot(page: Path, out: Path, size: Tuple[int, int]) -> Path:
    """`page` rendered by headless Chromium into `out`/page.png (its own profile, no network, no GPU)."""
    png = out / "page.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={out / 'profile'}", f"--screenshot={png}",
               f"--window-size={size[0]},{size[1]}", page.resolve().as_uri()]
    home = out / "home"  # Chromium keeps crash reports and settings under HOME: here, not in the user's
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_SECONDS, env=env)
    assert png.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    return png


def rgb(image: np.ndarray) -> np.ndarray:
    """An image read by matplotlib as 0–255 RGB, transparent parts over white (as the page shows them)."""
    image = np.asarray(image, dtype=np.float64)
    if image.max() <= 1.0:
        image = image * 255.0
    if image.shape[2] == 4:
        alpha = image[..., 3:] / 255.0
        image = image[..., :3] * alpha + 255.0 * (1.0 - alpha)
    return image[..., :3]


def find_row(shot: np.ndarray, row: np.ndarray, tolerance: float = 4.0) -> Optional[Tuple[int, int]]:
    """(y, x) where the pixels of `row` sit side by side on a row of `shot`, None when nowhere."""
    width = len(row)
    for y in range(shot.shape[0]):
        line = shot[y]
        starts = np.flatnonzero(np.abs(line[: line.shape[0] - width + 1] - row[0]).max(axis=1) <= tolerance)
        for x in starts:
            if np.abs(line[x : x + width] - row).max() <= tolerance:
                return y, int(x)
    return None


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_the_report_page_shows_every_figure_at_its_own_size(repo, tmp_path, ray_cluster):
    from matplotlib.image import imread

    config = repo_config(repo, "merge.yaml", **{"sinks.mlflow.enabled": False,
                                                 "study.lambdas": {"start": 0.2, "stop": 2.0, "num": 5},
                                                 "study.densities": [0.3, 0.7, 1.0]})
    result = run(config, tmp_path / "out", progress=False)
    report = write_report(result.run_dir, mlflow=False)
    assert [p.name for p in report.figures] == ["merge.png", "merge-summary.png", "objective.png"]
    page = report.html.read_text(encoding="utf-8")
    embedded: List[bytes] = [base64.b64decode(m) for m in
                             re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]
    assert embedded == [p.read_bytes() for p in report.figures]  # every <img> is a whole PNG of the report

    shot_path = screenshot(report.html, tmp_path, WINDOW)
    shot = rgb(imread(shot_path))
    assert shot.shape[:2] == (WINDOW[1], WINDOW[0])
    assert shot.std() > 20, "the screenshot is blank"
    # The figures' colours are on it: viridis purple and yellow (the heat maps), matplotlib's blue (C0).
    for colour in ((68, 1, 84), (253, 231, 37), (31, 119, 180)):
        close = (np.abs(shot - np.array(colour)).max(axis=2) <= 12).sum()
        assert close > 50, f"colour {colour} is not on the page"

    # Every figure is drawn at its own size: a row of its pixels, taken from its middle, is on the
    # screenshot pixel for pixel (the page would have scaled a figure wider than itself).
    found = []
    for path in report.figures:
        image = rgb(imread(path))
        assert image.shape[1] <= PAGE_WIDTH_PX, path.name
        rows = np.argsort(image.std(axis=(1, 2)))[::-1]  # the busiest rows first: they match one place only
        where = next((hit for r in rows[:5] if (hit := find_row(shot, image[r])) is not None), None)
        assert where is not None, f"{path.name} is not on the page at its own size"
        found.append(where[0])
    assert found == sorted(found), "the figures are not in the page's order"
