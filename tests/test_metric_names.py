"""Metric names are data: a real fit with all five callbacks logs exactly the names docs/metrics.md documents.

The names live in ``lightning_influence/metrics.py``; every name there is documented, every fixed scalar constant
is used where its value is computed, and no code outside metrics.py builds a metric name with an f-string.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import Logger

from lightning_influence import metrics
from lightning_influence.callbacks.approximate_cv import ApproximateCV
from lightning_influence.callbacks.attribution_benchmark import AttributionBenchmark
from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
from lightning_influence.callbacks.influence_report import InfluenceReport
from lightning_influence.callbacks.pbrf_validation import PBRFValidation
from lightning_influence.tasks import Classification
from tests.helpers.lightning_models import TinyClassifier

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "metrics.md"
PACKAGE = ROOT / "lightning_influence"
GROUPS = ("curvature/", "lissa/", "influence/", "cv/", "pbrf/", "attribution/")
FOLDS = 3


class _Recorder(Logger):
    """Keeps every ``log_metrics`` call (a logger that writes nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))


def _documented_rows() -> dict[str, list[tuple[list[str], str]]]:
    """Per ``## <Callback>`` section of docs/metrics.md: (names in the first column, the row's text) per table row."""
    sections: dict[str, list[tuple[list[str], str]]] = {}
    current = None
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), [])
        elif current is not None and line.startswith("| `"):
            first = line.split("|")[1]
            current.append((re.findall(r"`([^`]+)`", first), line))
    return sections


def _expand(name: str, estimators: set[str]) -> set[str]:
    if "<k>" in name:
        return {name.replace("<k>", str(k)) for k in range(FOLDS)}
    if "<estimator>" in name:
        return {name.replace("<estimator>", e) for e in estimators}
    if "<baseline>" in name:
        return {name.replace("<baseline>", "gradient_dot")}
    return {name}


def _expected(estimators: set[str]) -> set[str]:
    """Every documented name for this run's configuration (all conditional rows apply: exact_check, self-influence)."""
    out: set[str] = set()
    for rows in _documented_rows().values():
        for names, _ in rows:
            for name in names:
                out |= _expand(name, estimators)
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_fit_with_all_five_callbacks_logs_exactly_the_documented_names(tmp_path: Path) -> None:
    task = Classification()
    callbacks = [
        CurvatureMonitor(task, every_n_steps=4, on_checkpoint=False, sample_size=16, batch_size=16, trace_probes=4,
                         lanczos_iter=4),
        InfluenceReport(task, query_data="val", solver="cg", damping=1e-2, self_influence=True, max_train=12,
                        max_queries=3, progress_bar=False, images=False),
        ApproximateCV(task, folds=FOLDS, damping=1e-2, exact_check=True, exact_tol=1e-4, exact_max_iter=30),
        PBRFValidation(task, num_train=2, num_queries=3, max_iter=10),
        AttributionBenchmark(task, num_subsets=3, epochs=1),
    ]
    recorder = _Recorder()
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=recorder, callbacks=callbacks,
                         accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_val_batches=1, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unpenalised CV, unconverged refits/solves, no media for this logger
        trainer.fit(TinyClassifier(n=32, n_val=8, batch_size=8))

    emitted = {k for call, _ in recorder.calls for k in call if k.startswith(GROUPS)}
    estimators = {"cg", "exact", "gradient_dot"}  # the report's solver, the exact influence and the baseline
    expected = _expected(estimators)
    assert emitted == expected, (sorted(emitted - expected), sorted(expected - emitted))
    # the scalars are also mirrored into callback_metrics, under the same names
    assert expected <= set(trainer.callback_metrics)
    # every fixed constant of metrics.py was logged (the estimator-dependent ones: those of this configuration)
    fixed = {n for n in metrics.SCALAR_NAMES if not n.startswith(("pbrf/pearson_", "pbrf/spearman_"))}
    assert fixed <= emitted
    assert {metrics.pbrf_pearson(e) for e in estimators} | {metrics.pbrf_spearman(e) for e in estimators} <= emitted


def _constants() -> dict[str, str]:
    return {k: v for k, v in vars(metrics).items() if k.isupper() and isinstance(v, str) and "/" in v}


def test_every_name_in_metrics_py_is_documented() -> None:
    page = PAGE.read_text(encoding="utf-8")
    names = _constants()
    assert len(names) >= 45
    missing = sorted(f"{k} = {v!r}" for k, v in names.items() if f"`{v}`" not in page)
    assert not missing, f"metrics.py names missing from docs/metrics.md: {missing}"
    assert set(metrics.SCALAR_NAMES) <= set(names.values())
    # the table's "constant" column names real constants or functions of metrics.py
    for rows in _documented_rows().values():
        for _, line in rows:
            for ref in re.findall(r"`([A-Za-z_]+)(?:\([a-z]*\))?`", line.split("|")[2]):
                assert hasattr(metrics, ref), (ref, line)


def test_each_constant_is_used_where_its_value_is_computed_and_no_name_is_built_elsewhere() -> None:
    sources = {p: p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py") if p.name != "metrics.py"}
    estimator_dependent = set(metrics._PEARSON.values()) | set(metrics._SPEARMAN.values())
    estimator_dependent.add(metrics.ATTRIBUTION_LDS_GRADIENT_DOT)  # filled in through attribution_lds()
    for const, value in _constants().items():
        if value in estimator_dependent or const.endswith("_PATTERN"):
            continue  # filled in through pbrf_pearson()/pbrf_spearman()/cv_*_fold()/media_pbrf_scatter()
        users = [p.name for p, text in sources.items() if re.search(rf"\b{const}\b", text)]
        assert users, f"{const} ({value}) is not used outside metrics.py"
    for func in ("pbrf_pearson", "pbrf_spearman", "cv_approx_fold", "cv_exact_fold", "media_pbrf_scatter",
                 "attribution_lds"):
        assert any(re.search(rf"\b{func}\(", t) for t in sources.values()), func
    built = re.compile(r"""f["'][^"'\n]*\b(?:curvature|lissa|influence|cv|pbrf|attribution)/[a-z_]*\{""")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p, text in sources.items()
                 for i, line in enumerate(text.splitlines(), 1) if built.search(line)]
    assert not offenders, f"metric names built with f-strings outside metrics.py: {offenders}"
