"""Every bad input is a clear error before time is spent (issue 15, item 6).

Each case asserts the exception type and a phrase of the fix. The cases that need a Trainer also assert that no
training step ran (the check belongs in ``setup`` / ``on_train_start``) and that the error came within seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import ApproximateCV, AttributionBenchmark, CurvatureMonitor, InfluenceReport, PBRFValidation
from lightning_influence.callbacks._common import MisconfigurationError
from lightning_influence.config import CGConfig, CVConfig, InfluenceConfig, PBRFConfig
from lightning_influence.cv import approximate_cv, kfold_indices, make_fold_batches
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.influence import influence_scores
from lightning_influence.operators import DenseOperator
from lightning_influence.solvers import conjugate_gradient
from lightning_influence.tasks import Classification, Regression
from tests.helpers.lightning_models import TinyClassifier, synthetic_classification

TASK = Classification()
F64 = torch.float64

# ------------------------------------------------------------------------------------ argument checks
#: (id, call, exception type, phrase of the message naming the argument and the fix)
ARGUMENT_CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # CurvatureMonitor
    ("monitor-task", lambda: CurvatureMonitor("nonsense"), MisconfigurationError, "task"),
    ("monitor-sample_size", lambda: CurvatureMonitor(TASK, sample_size=0), MisconfigurationError, "sample_size"),
    ("monitor-batch_size", lambda: CurvatureMonitor(TASK, batch_size=0), MisconfigurationError,
     "batch_size must be"),
    ("monitor-trace_probes", lambda: CurvatureMonitor(TASK, trace_probes=1), MisconfigurationError,
     "a standard error needs two probes"),
    ("monitor-damping", lambda: CurvatureMonitor(TASK, damping=0.0), MisconfigurationError,
     "grows like 1/damping"),
    ("monitor-every_n_epochs", lambda: CurvatureMonitor(TASK, every_n_epochs=0), MisconfigurationError,
     "every_n_epochs must be"),
    ("monitor-dataset", lambda: CurvatureMonitor(TASK, dataset="test"), MisconfigurationError, "dataset"),
    # InfluenceReport
    ("report-damping-zero", lambda: InfluenceReport(TASK, damping=0.0), MisconfigurationError, "Try 1e-3"),
    ("report-damping-str", lambda: InfluenceReport(TASK, damping="big"), MisconfigurationError, "'auto'"),
    ("report-solver", lambda: InfluenceReport(TASK, solver="newton"), MisconfigurationError, "solver"),
    ("report-top_k", lambda: InfluenceReport(TASK, top_k=-1), MisconfigurationError, "top_k must be"),
    ("report-query_indices", lambda: InfluenceReport(TASK, query_indices=[]), MisconfigurationError,
     "pass at least one query index"),
    ("report-query_data", lambda: InfluenceReport(TASK, query_data="test"), MisconfigurationError, "query_data"),
    # ApproximateCV
    ("cv-folds", lambda: ApproximateCV(Regression(), folds=1), MisconfigurationError, "needs two folds"),
    ("cv-damping-negative", lambda: ApproximateCV(Regression(), damping=-1.0), MisconfigurationError,
     "damping must be"),
    ("cv-damping-str", lambda: ApproximateCV(Regression(), damping="big"), MisconfigurationError, "'auto'"),
    ("cv-solver", lambda: ApproximateCV(Regression(), solver="lu"), MisconfigurationError, "solver"),
    ("cv-fold_objective", lambda: ApproximateCV(Regression(), fold_objective="sum"), MisconfigurationError,
     "fold_objective"),
    ("cv-batch_size", lambda: ApproximateCV(Regression(), batch_size=0), MisconfigurationError, "batch_size"),
    ("cv-regularizer", lambda: ApproximateCV(Regression(), regularizer="l1"), MisconfigurationError,
     "L1, ElasticNet"),
    # PBRFValidation
    ("pbrf-num_train", lambda: PBRFValidation(TASK, num_train=0), MisconfigurationError, "num_train must be"),
    ("pbrf-num_queries", lambda: PBRFValidation(TASK, num_queries=0), MisconfigurationError, "num_queries"),
    ("pbrf-damping", lambda: PBRFValidation(TASK, damping=0.0), MisconfigurationError, "None uses the report's"),
    ("pbrf-optimizer", lambda: PBRFValidation(TASK, optimizer="adam"), MisconfigurationError, "newton_cg"),
    ("pbrf-exact_max_params", lambda: PBRFValidation(TASK, exact_max_params=-1), MisconfigurationError,
     "0 disables it"),
    # AttributionBenchmark
    ("lds-num_subsets", lambda: AttributionBenchmark(TASK, num_subsets=2), MisconfigurationError,
     "rank correlation"),
    ("lds-alpha", lambda: AttributionBenchmark(TASK, alpha=1.5), MisconfigurationError, r"lie in \(0, 1\)"),
    ("lds-measurement", lambda: AttributionBenchmark(TASK, measurement="accuracy"), MisconfigurationError,
     "'loss' or 'margin'"),
    ("lds-optimizer", lambda: AttributionBenchmark(TASK, optimizer="rmsprop"), MisconfigurationError, "'adam'"),
    ("lds-lr", lambda: AttributionBenchmark(TASK, lr=0.0), MisconfigurationError, "lr must be > 0"),
    ("lds-on_mismatch", lambda: AttributionBenchmark(TASK, on_mismatch="ignore"), MisconfigurationError,
     "'raise' or 'overwrite'"),
    # configs and main functions
    ("config-influence-damping", lambda: InfluenceConfig(damping=-1.0).validate(), ConfigurationError, "'auto'"),
    ("config-influence-fraction", lambda: InfluenceConfig(damping_fraction=0.0).validate(), ConfigurationError,
     "damping_fraction must be"),
    ("config-cv-damping", lambda: CVConfig(damping="big").validate(), ConfigurationError,  # type: ignore[arg-type]
     "least damping"),
    ("config-cg-rtol", lambda: CGConfig(rtol=-1.0).validate(), ConfigurationError, "rtol must be > 0"),
    ("config-cv-sketch-rank", lambda: CVConfig(sketch_rank=0).validate(), ConfigurationError,
     "sketch_rank must be an integer >= 1"),
    ("config-pbrf-damping", lambda: PBRFConfig(damping=0.0).validate(), ConfigurationError,
     "use the damping of the influence scores"),
]


def _regression_data(n: int = 12) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, generator=g, dtype=F64), torch.randn(n, 1, generator=g, dtype=F64)


def _function_cases() -> list[tuple[str, Callable[[], Any], type[Exception], str]]:
    x, y = _regression_data()
    lin = torch.nn.Linear(2, 1).double()
    folds = make_fold_batches(list(zip(x, y, strict=True)), kfold_indices(12, 3))
    eye = DenseOperator(torch.eye(2, dtype=F64))
    return [
        ("fn-influence-solver", lambda: influence_scores(lin, Regression(), (x, y), (x, y), solver="newton"),
         ConfigurationError, "solver must be one of"),
        ("fn-influence-empty-query", lambda: influence_scores(lin, Regression(), (x, y), (x, y), query_indices=[]),
         ConfigurationError, "pass at least one query example"),
        ("fn-influence-singular", lambda: influence_scores(torch.nn.Linear(2, 1, bias=False).double(), Regression(),
                                                           (torch.zeros(4, 2, dtype=F64), torch.zeros(4, 1, dtype=F64)),
                                                           (x[:1], y[:1]), solver="exact", damping=0.0),
         ConfigurationError, "Use damping >"),
        ("fn-cv-damping", lambda: approximate_cv(lin, Regression(), folds, damping="big"), ConfigurationError,
         "'auto'"),
        ("fn-cv-fold_objective", lambda: approximate_cv(lin, Regression(), folds, fold_objective="sum"),
         ConfigurationError, "fold_objective must be"),
        ("fn-cg-damping", lambda: conjugate_gradient(eye, torch.ones(2, dtype=F64), damping=-1.0),
         ConfigurationError, "damping must be >= 0"),
        ("fn-cg-shape", lambda: conjugate_gradient(eye, torch.ones(3, dtype=F64)), ConfigurationError,
         "right-hand side has 3 rows"),
    ]


@pytest.mark.parametrize(("make", "exc", "phrase"), [c[1:] for c in ARGUMENT_CASES],
                         ids=[c[0] for c in ARGUMENT_CASES])
def test_argument_errors(make: Callable[[], Any], exc: type[Exception], phrase: str) -> None:
    with pytest.raises(exc, match=phrase):
        make()


@pytest.mark.parametrize("index", range(7), ids=[c[0] for c in _function_cases()])
def test_function_errors(index: int) -> None:
    _, make, exc, phrase = _function_cases()[index]
    start = time.perf_counter()
    with pytest.raises(exc, match=phrase):
        make()
    assert time.perf_counter() - start < 10.0


# ----------------------------------------------------------------------------------------- fit checks
class CastingClassifier(TinyClassifier):
    """Trains in ``net_dtype`` on ``data_dtype`` data by casting in ``training_step`` (the callbacks do not)."""

    def __init__(self, net_dtype: torch.dtype, data_dtype: torch.dtype) -> None:
        super().__init__()
        self.net = self.net.to(net_dtype)
        x, y = self.train_set.tensors
        self.train_set = TensorDataset(x.to(data_dtype), y)
        self.val_set = TensorDataset(self.val_set.tensors[0].to(data_dtype), self.val_set.tensors[1])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x.to(next(self.parameters()).dtype)), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None


class BadLabels(TinyClassifier):
    """Labels up to 4 for a model with 3 outputs."""

    def __init__(self) -> None:
        super().__init__()
        x, y = self.train_set.tensors
        y = y.clone()
        y[-1] = 4
        self.train_set = TensorDataset(x, y)


class NoVal(TinyClassifier):
    val_dataloader = None  # type: ignore[assignment]
    validation_step = None  # type: ignore[assignment]


class Unfreezes(TinyClassifier):
    """Freezes its first layer in epoch 2: the trainable parameters change between measurements."""

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            next(self.net.parameters()).requires_grad_(False)


def _monitor(**kw: Any) -> CurvatureMonitor:
    kw.setdefault("every_n_epochs", 1)
    return CurvatureMonitor(TASK, sample_size=None, on_checkpoint=False, write_report=False, log_figure=False,
                            lanczos_iter=3, trace_probes=2, **kw)


def _report(**kw: Any) -> InfluenceReport:
    return InfluenceReport(TASK, solver="exact", max_train=8, max_queries=2, progress_bar=False, **kw)


def _twice() -> list[Any]:
    cb = _report()
    return [cb, cb]


FIT_CASES: list[tuple[str, Callable[[], Any], Callable[[], list[Any]], str]] = [
    ("dtype-float32-model-float64-data", lambda: CastingClassifier(torch.float32, F64), lambda: [_report()],
     "cast the data to the model's dtype"),
    ("dtype-float64-model-float32-data", lambda: CastingClassifier(F64, torch.float32), lambda: [_report()],
     "cast the data to the model's dtype"),
    ("dtype-cv", lambda: CastingClassifier(torch.float32, F64), lambda: [ApproximateCV(TASK, folds=2)],
     "Trainer\\(precision='64-true'\\)"),
    ("labels-out-of-range", BadLabels, lambda: [_report()], r"labels must lie in \[0, 3\)"),
    ("labels-out-of-range-cv", BadLabels, lambda: [ApproximateCV(TASK, folds=2)],
     "fix the labels or the model's output layer"),
    ("callback-listed-twice", TinyClassifier, _twice, "list it once"),
    ("two-reports-one-subdir", TinyClassifier, lambda: [_report(), _report(top_k=2)],
     "pass another subdir= to one of them"),
    ("query-val-without-val-loader", NoVal, lambda: [_report(query_data="val")], "pass dataset=..."),
    ("monitor-val-without-val-loader", NoVal, lambda: [_monitor(dataset="val")], "add a val dataloader"),
    ("cv-val-without-val-loader", NoVal, lambda: [ApproximateCV(TASK, folds=2, dataset="val")],
     "add a val dataloader"),
    ("pbrf-without-report", TinyClassifier, lambda: [PBRFValidation(TASK)], "InfluenceReport"),
]


@pytest.mark.parametrize(("module", "callbacks", "phrase"), [c[1:] for c in FIT_CASES], ids=[c[0] for c in FIT_CASES])
def test_fit_errors_come_before_training(tmp_path: Path, module: Callable[[], Any],
                                         callbacks: Callable[[], list[Any]], phrase: str) -> None:
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=4, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=callbacks())
    model = module()
    start = time.perf_counter()
    with pytest.raises(MisconfigurationError, match=phrase):
        trainer.fit(model)
    assert time.perf_counter() - start < 5.0
    assert trainer.global_step == 0  # raised in setup / on_train_start: no training step, no curvature work


def test_two_callbacks_with_one_state_key_fail_at_trainer_construction(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="state_key` must be unique"):  # Lightning's own check, the earliest
        L.Trainer(default_root_dir=tmp_path, logger=False, callbacks=[_monitor(), _monitor()])


def test_trainable_parameters_changing_between_measurements(tmp_path: Path) -> None:
    monitor = _monitor()
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=3, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=[monitor])
    with pytest.raises(MisconfigurationError, match=r"Freeze or unfreeze parameters before trainer\.fit"):
        trainer.fit(Unfreezes())
    assert len(monitor.history) == 1  # the first measurement ran, the second refused


def test_the_same_callbacks_with_good_inputs_pass_the_checks(tmp_path: Path) -> None:
    """The checks do not fire on correct inputs (float64 model and data, labels in range, val loader)."""
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[_monitor(), _report(query_data="val")], limit_val_batches=1)
    trainer.fit(TinyClassifier())
    assert trainer.global_step == 2
    loader = DataLoader(synthetic_classification(8), batch_size=4)
    assert len(loader.dataset) == 8


def _local_dataset() -> Any:
    class LocalDataset(torch.utils.data.Dataset):  # defined inside a function: pickle cannot find it by name
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
            return torch.zeros(4, dtype=torch.float64), torch.tensor(0)

    return LocalDataset()


@pytest.mark.parametrize("make", [lambda ds: ApproximateCV(Classification(), dataset=ds),
                                  lambda ds: InfluenceReport(Classification(), query_data=ds),
                                  lambda ds: InfluenceReport(Classification(), train_data=ds)])
def test_unpicklable_dataset_is_a_clear_error_when_ddp_spawn_pickles_the_callback(make: Callable[[Any], Any]) -> None:
    import pickle

    ds = _local_dataset()
    with pytest.raises((AttributeError, pickle.PicklingError)):  # the ground truth: pickle itself cannot
        pickle.dumps(ds)
    cb = make(ds)  # fine without spawning (nothing is pickled)
    start = time.perf_counter()
    with pytest.raises(MisconfigurationError, match=r"LocalDataset.*Define the dataset class at module level, or use "
                                                    r"strategy='ddp'"):
        pickle.dumps(cb)
    assert time.perf_counter() - start < 1.0
    ok = make(synthetic_classification(8))  # a module-level dataset class travels
    assert len(pickle.loads(pickle.dumps(ok)).__dict__) == len(ok.__dict__)
