"""The demo's report.html in a real browser (issue 8): headless Chromium, no console errors, every section rendered.

tests/test_reporting.py already opens a synthetic report (every section filled from fixtures); this test opens the
report the demo actually writes (all four callbacks on a digits MLP), dumps the DOM after rendering and checks each
section is present and drawn, then takes a screenshot. With ``LI_UPDATE_DOCS_IMAGES=1`` it runs the full demo and
copies the screenshot (and the monitor's curvature figure) to ``docs/images/report.png`` /
``docs/images/curvature.png``, the pictures the README shows.

Chromium: Debian's ``chromium`` package; ``make test`` installs it when it runs as root (``make browser``),
otherwise this test skips and says so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("curvature", "influence", "cv", "pbrf")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run_browser(browser: str, url: str, home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--enable-logging=stderr", "--v=0", *extra, url],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "HOME": str(home)},
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    pytest.importorskip("sklearn", reason="the demo trains on scikit-learn's digits")
    from lightning_influence.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    if os.environ.get("LI_UPDATE_DOCS_IMAGES") == "1":  # the README's pictures come from the full `make demo` run
        return run_demo(out)
    return run_demo(out, max_epochs=4, max_train=48, num_queries=4, pbrf_train=1, quick=True)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_demo_report_renders_in_headless_chromium(demo_run: dict[str, object], tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium not installed (Debian: `apt-get install chromium`; `make browser` as root)")
    report = Path(str(demo_run["report"]))
    assert report.is_file()
    url = report.resolve().as_uri()

    dom = _run_browser(browser, url, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    html = dom.stdout
    for section in SECTIONS:
        match = re.search(rf'<section id="{section}">(.*?)</section>', html, flags=re.S)
        assert match, f"section {section} missing from the rendered page"
        body = match.group(1)
        assert "Not run." not in body, f"section {section} says it was not run"
        assert 'class="error"' not in body, f"section {section} failed to render: {body[:500]}"
        assert "<table" in body or "<img" in body, f"section {section} has neither a table nor a figure"
    influence = re.search(r'<section id="influence">(.*?)</section>', html, flags=re.S)
    assert influence and influence.group(1).count("data:image/png;base64,") >= 6  # digits drawn as images

    shot = tmp_path / "report.png"
    proc = _run_browser(browser, url, tmp_path, "--window-size=1280,1800", f"--screenshot={shot}")
    assert [line for line in proc.stderr.splitlines() if ":CONSOLE" in line] == []
    assert shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1280, 1800)
        grey = np.asarray(img.convert("L"), dtype=np.float64)
    assert grey.std() > 10.0  # drawn, not blank

    curvature_png = Path(str(demo_run["log_dir"])) / "curvature.png"
    assert curvature_png.is_file()
    if os.environ.get("LI_UPDATE_DOCS_IMAGES") == "1":
        images = ROOT / "docs" / "images"
        images.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, images / "report.png")
        shutil.copyfile(curvature_png, images / "curvature.png")
