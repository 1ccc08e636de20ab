"""Curvature at training speed: warm-started Lanczos, the monitor's warm start across a resume (issue 12)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
from lightning_influence.operators import GNHOperator
from lightning_influence.spectrum import lanczos_lambda_max
from lightning_influence.tasks import Classification
from tests.helpers.lightning_models import TinyClassifier, synthetic_classification
from tests.helpers.models import tiny_mlp

SMALL = {"sample_size": 20, "batch_size": 8, "trace_probes": 4, "lanczos_iter": 8}


def _trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=1, num_sanity_val_steps=0, logger=False, limit_val_batches=0,
                      **kwargs)


# ------------------------------------------------------------------------------------------ Lanczos
def test_warm_start_reaches_one_percent_in_fewer_products_on_drifting_checkpoints() -> None:
    ds = synthetic_classification(48, seed=3)
    x, y = ds.tensors
    model = tiny_mlp(hidden=8, dtype=torch.float64, seed=1)
    batches = [(x[:24], y[:24]), (x[24:], y[24:])]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cold_total = warm_total = 0
    previous = None
    for _ in range(6):  # six checkpoints, a few SGD steps apart: the top eigenvector drifts slowly
        op = GNHOperator(model, Classification(), batches)
        exact = float(torch.linalg.eigvalsh(op.dense())[-1])
        cold = lanczos_lambda_max(op, 60, tol=1e-3, seed=7)
        assert abs(cold.value - exact) <= 0.01 * exact
        if previous is not None:
            warm = lanczos_lambda_max(op, 60, tol=1e-3, seed=7, start=previous)
            assert abs(warm.value - exact) <= 0.01 * exact
            assert warm.vector is not None and abs(float(warm.vector.norm()) - 1.0) < 1e-12
            cold_total += cold.num_products
            warm_total += warm.num_products
        previous = cold.vector
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert warm_total < cold_total, (warm_total, cold_total)


def test_lanczos_ritz_vector_is_the_top_eigenvector() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = a @ a.T
    from lightning_influence.spectrum import DenseOperator

    est = lanczos_lambda_max(DenseOperator(a), 30, tol=1e-10)
    evals, evecs = torch.linalg.eigh(a)
    assert abs(est.value - float(evals[-1])) < 1e-9 * float(evals[-1])
    assert est.vector is not None and abs(abs(float(est.vector @ evecs[:, -1])) - 1) < 1e-8


# ------------------------------------------------------------------------------------------ monitor
def test_resumed_run_warm_starts_from_the_checkpointed_vector(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = CurvatureMonitor(Classification(), every_n_steps=3, **SMALL)  # type: ignore[arg-type]
        ckpt = ModelCheckpoint(dirpath=tmp_path / "a", save_top_k=-1, every_n_epochs=1)  # 4 steps per epoch
        _trainer(tmp_path / "a", max_steps=4, callbacks=[first, ckpt]).fit(TinyClassifier(shuffle=False))
        assert first.last_start is not None  # the step-4 measurement warm-started from the step-3 vector
        (path,) = (tmp_path / "a").glob("*step=4*.ckpt")
        saved = torch.load(path, weights_only=False)["callbacks"][first.state_key]["ritz_vector"]
        assert isinstance(saved, torch.Tensor) and torch.equal(saved, first.ritz_vector)
        resumed = CurvatureMonitor(Classification(), every_n_steps=3, on_checkpoint=False,
                                   **SMALL)  # type: ignore[arg-type]
        assert resumed.ritz_vector is None
        _trainer(tmp_path / "b", max_steps=6, callbacks=[resumed], enable_checkpointing=False).fit(
            TinyClassifier(shuffle=False), ckpt_path=path)
    assert resumed.measured_steps == [3, 4, 6]  # one new measurement after the restore, at step 6
    assert resumed.last_start is not None and torch.equal(resumed.last_start, saved)
    row = resumed.history[-1]
    assert row["num_products"] >= row["trace_probes"] + 1 and row["seconds"] > 0
