"""The Sphinx documentation builds with warnings as errors (what `make docs` runs)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path: Path) -> None:
    for module in ("sphinx", "myst_parser"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed; install the docs extra: pip install -e '.[docs]'")
    out = tmp_path / "html"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stderr}\n{proc.stdout}"
    for page in ("index.html", "api.html", "math.html", "quickstart.html", "guide.html", "metrics.html", "faq.html"):
        assert (out / page).is_file(), page
    api = (out / "api.html").read_text(encoding="utf-8")
    assert "lightning_influence.cli" in api
