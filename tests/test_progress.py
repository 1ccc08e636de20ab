"""Progress bars of the train-end stages and the warnings before a costly setting (issue 15, item 2)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import lightning_influence.influence.inverse as inverse_module
from lightning_influence import PBRFValidation
from lightning_influence.influence import influence_scores
from lightning_influence.progress import StageProgress, stage_progress
from lightning_influence.tasks import Classification, Regression

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
                         damping=0.1)


def test_exact_solver_past_its_size_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _data()
    monkeypatch.setattr(inverse_module, "EXACT_SOLVER_WARN_PARAMS", 3)
    with pytest.warns(UserWarning, match="solver='cg' is usually faster"):
        influence_scores(torch.nn.Linear(3, 1).double(), Regression(), (x, y), (x, y), solver="exact", damping=0.1)


def test_no_cost_warning_at_cheap_defaults(recwarn: pytest.WarningsRecorder) -> None:
    x, y = _data()
    influence_scores(torch.nn.Linear(3, 1).double(), Regression(), (x, y), (x, y), solver="exact", damping=0.1)
    assert not [w for w in recwarn if "right-hand sides" in str(w.message) or "usually faster" in str(w.message)]


def test_pbrf_over_many_pairs_warns() -> None:
    with pytest.warns(UserWarning, match="lower num_train"):
        PBRFValidation(Classification(), num_train=200)
