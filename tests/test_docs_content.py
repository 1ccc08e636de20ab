"""The docs pages of issue 8 stay in step with the code: every logged metric and every public callback is documented."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
CALLBACKS = [
    ("lightning_influence.callbacks.curvature_monitor", "CurvatureMonitor"),
    ("lightning_influence.callbacks.influence_report", "InfluenceReport"),
    ("lightning_influence.callbacks.approximate_cv", "ApproximateCV"),
    ("lightning_influence.callbacks.pbrf_validation", "PBRFValidation"),
]


def _logged_metrics(doc: str) -> set[str]:
    section = doc.split("Logged metrics", 1)[1]
    section = re.split(r"\n\s*(?:Example::|Media:|Args:|Raises:|Cost:)", section, maxsplit=1)[0]
    return set(re.findall(r"``((?:curvature|lissa|influence|cv|pbrf)/[a-z_<>]+)``", section))


@pytest.mark.parametrize(("module", "name"), CALLBACKS, ids=[c[1] for c in CALLBACKS])
def test_every_logged_metric_is_on_the_metrics_page(module: str, name: str) -> None:
    doc = getattr(importlib.import_module(module), name).__doc__ or ""
    metrics = _logged_metrics(doc)
    assert len(metrics) >= 3, (name, metrics)
    page = (DOCS / "metrics.md").read_text(encoding="utf-8")
    missing = sorted(m for m in metrics if f"`{m}`" not in page)
    assert not missing, f"{name} logs {missing}, not listed in docs/metrics.md"


def test_faq_covers_every_exception_type() -> None:
    from lightning_influence import exceptions

    faq = (DOCS / "faq.md").read_text(encoding="utf-8")
    names = [n for n in dir(exceptions) if n.endswith("Error") and isinstance(getattr(exceptions, n), type)]
    assert names
    for n in [*names, "MisconfigurationError"]:
        assert n in faq, n
