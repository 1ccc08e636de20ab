"""AttributionBenchmark (issue 13): LDS of InfluenceReport's scores in a Lightning run, report section, resume."""

from __future__ import annotations

import importlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_influence import AttributionBenchmark, InfluenceReport
from lightning_influence.callbacks import MisconfigurationError
from lightning_influence.tasks import Classification
from tests.helpers.lightning_models import TinyClassifier

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _fit(tmp_path: Path, callbacks: list[Any], max_epochs: int = 15,
         caught: list[warnings.WarningMessage] | None = None) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier(n=64, n_val=16, batch_size=16, lr=0.2)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=max_epochs, accelerator="cpu", devices=1,
                         logger=pl.loggers.CSVLogger(tmp_path, name="logs", version=0), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=callbacks)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model)
    if caught is not None:
        caught.extend(record)
    return trainer


def _callbacks(**kw: Any) -> list[Any]:
    task = Classification()
    report = InfluenceReport(task, query_data=TinyClassifier(n=64, n_val=16).val_set, solver="exact", damping=1e-2,
                             self_influence=False, progress_bar=False)
    # Retrain close to convergence on each half (SGD, 50 epochs from the trained weights): the regime the influence
    # models. A few Adam epochs only move along the first gradients, which gradient-dot predicts as well.
    bench = AttributionBenchmark(task, **{"num_subsets": 10, "alpha": 0.5, "epochs": 50, "lr": 0.1,
                                          "optimizer": "sgd", "batch_size": 16, **kw})
    return [report, bench]


def test_attribution_benchmark_logs_the_lds_and_writes_the_report_section(tmp_path: Path) -> None:
    callbacks = _callbacks()
    trainer = _fit(tmp_path, callbacks)
    bench: AttributionBenchmark = callbacks[1]
    assert bench.result is not None and bench.retrained is not None
    m = trainer.callback_metrics
    for key in ("attribution/lds", "attribution/lds_ci_low", "attribution/lds_ci_high", "attribution/lds_gradient_dot",
                "attribution/num_subsets", "attribution/cached_subsets", "attribution/seconds"):
        assert key in m, key
    lds = float(m["attribution/lds"])
    assert 0.4 < lds <= 1.0 and float(m["attribution/lds_ci_low"]) <= lds <= float(m["attribution/lds_ci_high"])
    assert float(m["attribution/num_subsets"]) == 10.0 and float(m["attribution/cached_subsets"]) == 0.0
    assert bench.result.num_queries == 16 and bench.result.num_subsets == 10
    # Subsets keep half of the scored examples; the trained weights were not touched by the retraining.
    assert (bench.retrained.subsets.sum(1) == 32).all()
    directory = Path(trainer.log_dir) / "influence"
    report = json.loads((directory / "report.json").read_text())
    section = report["attribution"]
    assert section["lds"][0]["estimator"] == "exact" and section["lds"][1]["estimator"] == "gradient_dot"
    assert section["verdict"].startswith("LDS of the exact scores")
    assert len(section["scatter"]["predicted"]) == len(section["scatter"]["actual"]) > 0
    html = (directory / "report.html").read_text()
    assert "Linear datamodeling score" in html and html.index("PBRF validation") < html.index('id="attribution"')
    cache = directory / "attribution_cache"
    assert (cache / "manifest.json").is_file() and len(list(cache.glob("run_*.npz"))) == 10
    # CSV logger got the scalars (rank 0).
    metrics_csv = (Path(trainer.log_dir) / "metrics.csv").read_text()
    assert "attribution/lds" in metrics_csv

    # Same seed, same training: the rerun reuses every cached subset and gets the same LDS bit for bit.
    callbacks2 = _callbacks()
    trainer2 = _fit(tmp_path, callbacks2)
    assert float(trainer2.callback_metrics["attribution/cached_subsets"]) == 10.0
    assert float(trainer2.callback_metrics["attribution/lds"]) == lds

    # Other trained weights (more epochs): the cache no longer applies and is discarded, with a warning.
    caught: list[warnings.WarningMessage] = []
    trainer3 = _fit(tmp_path, _callbacks(), max_epochs=16, caught=caught)
    assert any("discarding the retraining cache" in str(w.message) for w in caught)
    assert float(trainer3.callback_metrics["attribution/cached_subsets"]) == 0.0


def test_attribution_benchmark_needs_the_report_first_and_checks_its_arguments(tmp_path: Path) -> None:
    task = Classification()
    with pytest.raises(MisconfigurationError, match="add InfluenceReport"):
        _fit(tmp_path, [AttributionBenchmark(task, num_subsets=3)], max_epochs=1)
    report = InfluenceReport(task, query_data="train", solver="exact", damping=1e-2)
    with pytest.raises(MisconfigurationError, match="comes before InfluenceReport"):
        _fit(tmp_path, [AttributionBenchmark(task, num_subsets=3), report], max_epochs=1)
    for kwargs, match in [({"num_subsets": 2}, "num_subsets must be >= 3"), ({"alpha": 1.0}, "alpha"),
                          ({"measurement": "logit"}, "measurement"), ({"optimizer": "rmsprop"}, "optimizer"),
                          ({"epochs": 0}, "epochs"), ({"baselines": ("trak",)}, "baselines")]:
        with pytest.raises(MisconfigurationError, match=match):
            AttributionBenchmark(task, **kwargs)


def test_margin_measurement_and_state_key() -> None:
    from lightning_influence.callbacks.attribution_benchmark import _margin

    logits = torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, -1.0]])
    assert _margin(logits, torch.tensor([0, 2])).tolist() == [1.0, -4.0]
    a = AttributionBenchmark(Classification(), measurement="loss")
    b = AttributionBenchmark(Classification(), measurement="margin")
    assert a.state_key != b.state_key
    b.load_state_dict({"metrics": {"attribution/lds": 0.5}})
    assert b.state_dict()["metrics"] == {"attribution/lds": 0.5}


def test_every_logged_metric_of_the_attribution_benchmark_is_on_the_metrics_page() -> None:
    doc = importlib.import_module("lightning_influence.callbacks.attribution_benchmark").AttributionBenchmark.__doc__
    section = (doc or "").split("Logged metrics", 1)[1]
    section = re.split(r"\n\s*(?:Example::|Media:|Args:|Raises:)", section, maxsplit=1)[0]
    metrics = set(re.findall(r"``(attribution/[a-z_<>]+)``", section))
    assert len(metrics) >= 6, metrics
    page = (DOCS / "metrics.md").read_text(encoding="utf-8")
    missing = sorted(m for m in metrics if f"`{m}`" not in page)
    assert not missing, f"AttributionBenchmark logs {missing}, not listed in docs/metrics.md"
