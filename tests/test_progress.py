"""Progress bars of the train-end stages and the warnings before a costly setting (issue 15, item 2)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch

import lightning_influence.callbacks.approximate_cv as approximate_cv_module
import lightning_influence.influence.inverse as inverse_module
from lightning_influence import ApproximateCV, PBRFValidation
from lightning_influence.config import CVConfig
from lightning_influence.influence import influence_scores
from lightning_influence.progress import StageProgress, cost_budget, stage_progress
from lightning_influence.tasks import Classification, Regression
from tests.helpers.lightning_models import TinyClassifier

F64 = torch.float64


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(10, 3, generator=g, dtype=F64), torch.randn(10, 1, generator=g, dtype=F64)


def test_stage_progress_only_on_rank_zero_with_a_trainer_bar() -> None:
    shown = SimpleNamespace(is_global_zero=True, progress_bar_callback=object())
    bar = stage_progress(shown, 4, "test: folds")
    assert bar.enabled
    bar.update()
    bar.set(3)
    assert bar._bar.n == 3
    bar.close()
    assert not stage_progress(SimpleNamespace(is_global_zero=False, progress_bar_callback=object()), 4, "x").enabled
    assert not stage_progress(SimpleNamespace(is_global_zero=True, progress_bar_callback=None), 4, "x").enabled
    assert not stage_progress(shown, 4, "x", enabled=False).enabled
    StageProgress(2, "noop", enabled=False).update()


def test_self_influence_with_an_iterative_solver_warns_with_its_cost() -> None:
    x, y = _data()
    model = torch.nn.Linear(3, 1).double()
    with pytest.warns(UserWarning, match=r"10 right-hand sides, about 5x .* Set self_influence=False"):
        influence_scores(model, Regression(), (x, y), (x, y), query_indices=[0, 1], self_influence=True,
                         damping=0.1, solver="cg")


def test_exact_solver_past_its_size_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _data()
    monkeypatch.setattr(inverse_module, "EXACT_SOLVER_WARN_PARAMS", 3)
    with pytest.warns(UserWarning, match="solver='auto' picks exact or pcg by their projected cost"):
        influence_scores(torch.nn.Linear(3, 1).double(), Regression(), (x, y), (x, y), solver="exact", damping=0.1)


def test_no_cost_warning_at_cheap_defaults(recwarn: pytest.WarningsRecorder) -> None:
    x, y = _data()
    influence_scores(torch.nn.Linear(3, 1).double(), Regression(), (x, y), (x, y), solver="exact", damping=0.1)
    assert not [w for w in recwarn if "right-hand sides" in str(w.message) or "projected cost" in str(w.message)]


def test_pbrf_over_many_pairs_warns() -> None:
    with pytest.warns(UserWarning, match="lower num_train"):
        PBRFValidation(Classification(), num_train=200)


class _StopBeforeCV(Exception):
    pass


def _fit_cv_until_its_work(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, cv: ApproximateCV) -> list[str]:
    """Fit one epoch with ``cv``; the CV's work itself is replaced by a sentinel, so only the warnings before it run."""
    def stop(*args: Any, **kwargs: Any) -> None:
        raise _StopBeforeCV

    monkeypatch.setattr(approximate_cv_module, "approximate_cv", stop)
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=[cv])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(_StopBeforeCV):
            trainer.fit(TinyClassifier())
    return [str(w.message) for w in caught if "gradient passes over the training data" in str(w.message)]


def test_approximate_cv_on_the_cg_path_warns_before_it_starts(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # 43 parameters > dense_max_params=10: CG, 2 folds x (min(43, 1000) + 50 trial + 20 Lanczos) products over half
    # the data each, a Fisher product weighing 4/3: 2 * 113 * 1/2 * 4/3 = 150.7 passes > 10 x 1 epoch.
    cv = ApproximateCV(Classification(), folds=2, config=CVConfig(dense_max_params=10, solver="cg"))
    (msg,) = _fit_cv_until_its_work(tmp_path, monkeypatch, cv)
    assert "projected about 151 gradient passes" in msg and "budget without a warning is 10:" in msg
    assert "up to 113 products per fold" in msg and "cg_max_iter" in msg


def test_approximate_cv_on_the_dense_path_does_not_warn(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _fit_cv_until_its_work(tmp_path, monkeypatch, ApproximateCV(Classification(), folds=2)) == []


def test_approximate_cv_cg_within_budget_does_not_warn(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # fixed damping, cg_max_iter=5: 2 * 5 * 1/2 * 4/3 = 6.7 passes <= 10
    cv = ApproximateCV(Classification(), folds=2, damping=1e-2, config=CVConfig(solver="cg", cg_max_iter=5))
    assert _fit_cv_until_its_work(tmp_path, monkeypatch, cv) == []


def test_pbrf_projected_cost_against_the_epochs_trained() -> None:
    from lightning_influence.callbacks.pbrf_validation import PBRF_PASSES_PER_SOLVE

    cb = PBRFValidation(Classification(), num_train=2)  # 2 pairs x 2 solves x 30 passes = 120 passes
    passes = 4 * PBRF_PASSES_PER_SOLVE
    assert passes == 120
    with pytest.warns(UserWarning, match=rf"projected about {passes} gradient passes .* lower num_train"):
        cb._warn_cost(cost_budget(SimpleNamespace(max_epochs=3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb._warn_cost(cost_budget(SimpleNamespace(max_epochs=12)))  # budget 120: no warning
