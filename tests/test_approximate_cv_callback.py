"""ApproximateCV callback: logs, report, regulariser declaration, errors, no effect on training, DDP parity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.callbacks._common import MisconfigurationError
from lightning_influence.callbacks.approximate_cv import ApproximateCV, find_module_regularizer
from lightning_influence.cv import approximate_cv, exact_cv, kfold_indices, make_fold_batches, regularization_penalty
from lightning_influence.losses import GaussianNLL
from lightning_influence.params import flatten, trainable_parameters
from lightning_influence.regularizers import L1, ElasticNet, mask_from_module
from lightning_influence.tasks import Regression, Task
from tests.helpers.lightning_models import JoiningDDPSpawn

N, D = 90, 4


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.5], [0.0], [-1.0], [0.0]], dtype=torch.float64) + 0.5 * torch.randn(
        N, 1, generator=g, dtype=torch.float64
    )
    return TensorDataset(x, y)


class LassoModule(L.LightningModule):
    def __init__(self, strength: float = 0.05, declare: bool = True) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Linear(D, 1).double()
        reg = L1(strength, mask=mask_from_module(self))
        if declare:
            self.regularizer = reg
        self._hidden = [reg]  # an undeclared penalty (not an attribute the callback can find)
        self.task = Regression()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        out, y = self.task(self, batch)
        return self.task.loss.mean(out, y) + regularization_penalty(self, self._hidden[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(), batch_size=30, shuffle=False)


def _trainer(tmp_path: Path, callbacks: list[Any], **kw: Any) -> L.Trainer:
    defaults: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": 3,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "accelerator": "cpu",
        "devices": 1,
        "logger": CSVLogger(tmp_path),
    }
    defaults.update(kw)
    return L.Trainer(callbacks=callbacks, **defaults)


def _direct(model: nn.Module, reg: L1, folds: int = 5, seed: int = 0, **kw: Any) -> Any:
    ds = _data()
    fb = make_fold_batches(ds, kfold_indices(N, folds, seed=seed), batch_size=256)
    return approximate_cv(model, Regression(), fb, reg, **kw)


def test_callback_logs_reports_and_matches_direct_call(tmp_path: Path) -> None:
    cb = ApproximateCV(Regression(), folds=5, every_n_epochs=1, exact_check=True, exact_tol=1e-10)
    module = LassoModule()
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(module)

    # one run per epoch; on_train_end does not repeat the last one
    assert [r["epoch"] for r in cb.history] == [0, 1, 2]
    direct = _direct(module.net, module.regularizer)
    got = trainer.callback_metrics
    assert float(got["cv/approx_loss"]) == pytest.approx(direct.estimate, rel=1e-12)
    for k in range(5):
        assert float(got[f"cv/approx_fold_{k}"]) == pytest.approx(direct.fold_losses[k], rel=1e-12)
    # linear model + squared loss: the approximation is exact
    assert float(got["cv/rel_error"]) < 1e-7
    assert float(got["cv/exact_passes"]) > 5 * float(got["cv/approx_passes"])
    # the regulariser was taken from the module
    assert cb._reg is module.regularizer

    # logger received the metrics
    metrics_csv = Path(trainer.logger.log_dir) / "metrics.csv"  # type: ignore[union-attr]
    text = metrics_csv.read_text()
    assert "cv/approx_loss" in text and "cv/approx_fold_4" in text and "cv/exact_loss" in text

    # report section
    report = json.loads((Path(trainer.log_dir) / "influence" / "report.json").read_text())  # type: ignore[arg-type]
    sec = report["cv"]
    assert sec["estimate"]["approx"] == pytest.approx(direct.estimate, rel=1e-12)
    assert len(sec["folds"]) == 5 and len(sec["history"]) == 3
    assert sec["config"]["regularizer"]["type"] == "L1"
    assert (Path(trainer.log_dir) / "influence" / "report.html").exists()  # type: ignore[arg-type]


def test_callback_does_not_change_training(tmp_path: Path) -> None:
    a = LassoModule()
    _trainer(tmp_path / "a", [ApproximateCV(Regression(), folds=3, every_n_epochs=1)]).fit(a)
    b = LassoModule()
    _trainer(tmp_path / "b", []).fit(b)
    assert torch.equal(flatten(trainable_parameters(a)), flatten(trainable_parameters(b)))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in a.parameters())


def test_regularizer_declaration(tmp_path: Path) -> None:
    module = LassoModule(strength=0.05)
    assert find_module_regularizer(module) is module.regularizer
    # a different regulariser than the one training uses: clear error at setup
    other = L1(0.5, mask=mask_from_module(module))
    with pytest.raises(MisconfigurationError, match="differs from the module's regulariser"):
        _trainer(tmp_path, [ApproximateCV(Regression(), regularizer=other)], max_epochs=1).fit(module)
    # an equal object is accepted
    same = L1(0.05, mask=mask_from_module(module))
    cb = ApproximateCV(Regression(), regularizer=same, folds=3)
    _trainer(tmp_path / "ok", [cb], max_epochs=1).fit(LassoModule(strength=0.05))
    assert cb.last_result is not None
    # undeclared: warning that the CV assumes no penalty
    with pytest.warns(UserWarning, match="assumes an unpenalised"):
        _trainer(tmp_path / "w", [ApproximateCV(Regression(), folds=3)], max_epochs=1).fit(
            LassoModule(declare=False)
        )


def test_errors() -> None:
    with pytest.raises(MisconfigurationError, match="folds must be an integer >= 2"):
        ApproximateCV(Regression(), folds=1)
    with pytest.raises(MisconfigurationError, match="every_n_epochs"):
        ApproximateCV(Regression(), every_n_epochs=0)
    with pytest.raises(MisconfigurationError, match="regularizer must be"):
        ApproximateCV(Regression(), regularizer="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strength must be >= 0"):
        ApproximateCV(Regression(), regularizer=ElasticNet(-1.0))

    class Huber(GaussianNLL):
        exponential_family = False

    with pytest.raises(MisconfigurationError, match="curvature='hessian'"):
        ApproximateCV(Task(Huber()))
    assert ApproximateCV(Task(Huber()), curvature="hessian").curvature == "hessian"


def test_more_folds_than_examples(tmp_path: Path) -> None:
    cb = ApproximateCV(Regression(), folds=N + 1)
    with pytest.raises(MisconfigurationError, match="larger than the number of examples"):
        _trainer(tmp_path, [cb], max_epochs=1).fit(LassoModule())


def test_exact_cv_check_against_direct_exact(tmp_path: Path) -> None:
    """The callback's exact refits are the library's exact_cv (same folds, same objective)."""
    cb = ApproximateCV(Regression(), folds=3, exact_check=True, exact_tol=1e-10, report=False)
    module = LassoModule()
    _trainer(tmp_path, [cb], max_epochs=1, logger=False).fit(module)
    fb = make_fold_batches(_data(), kfold_indices(N, 3, seed=0), batch_size=256)
    ex = exact_cv(module.net, Regression(), fb, module.regularizer, tol=1e-10)
    assert cb.last_exact is not None
    assert cb.last_exact.estimate == pytest.approx(ex.estimate, rel=1e-8)


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_parity(tmp_path: Path) -> None:
    """World size 2 (uneven shards: fold sizes 30 over 2 ranks, 90 examples) equals the serial result."""
    cb = ApproximateCV(Regression(), folds=4, report=True)  # 4 folds of 23/23/22/22 examples: uneven splits
    module = LassoModule()
    trainer = _trainer(tmp_path, [cb], max_epochs=2, strategy=JoiningDDPSpawn(), devices=2)
    trainer.fit(module)
    # ddp_spawn returns the weights and callback_metrics to this process
    serial = _direct(module.net, module.regularizer, folds=4)
    got = trainer.callback_metrics
    assert float(got["cv/approx_loss"]) == pytest.approx(serial.estimate, rel=1e-10)
    for k in range(4):
        assert float(got[f"cv/approx_fold_{k}"]) == pytest.approx(serial.fold_losses[k], rel=1e-10)
    report = json.loads((tmp_path / "lightning_logs" / "version_0" / "influence" / "report.json").read_text())
    assert report["cv"]["estimate"]["approx"] == pytest.approx(serial.estimate, rel=1e-10)
    assert report["cv"]["config"]["world_size"] == 2


def test_config_defaults_and_overrides() -> None:
    from lightning_influence.config import CVConfig

    default = ApproximateCV(Regression())
    assert default.config == CVConfig(cg_rtol=1e-8, prox_tol=1e-10)  # the callback's own tolerances
    given = ApproximateCV(Regression(), config=CVConfig(solver="cg", prox_max_iter=50))
    assert (given.solver, given.config.prox_max_iter, given.cg_rtol) == ("cg", 50, CVConfig().cg_rtol)
    explicit = ApproximateCV(Regression(), config=CVConfig(solver="cg"), solver="dense", damping=1e-3)
    assert (explicit.config.solver, explicit.config.damping) == ("dense", 1e-3)
    with pytest.raises(MisconfigurationError, match="ApproximateCV: damping must be >= 0"):
        ApproximateCV(Regression(), damping=-1.0)


def test_two_instances_have_their_own_state_in_a_checkpoint(tmp_path: Path) -> None:
    a = ApproximateCV(Regression(), folds=3, every_n_epochs=1, report=False)
    b = ApproximateCV(Regression(), folds=4, every_n_epochs=1, subdir="cv_b")
    assert a.state_key != b.state_key
    trainer = _trainer(tmp_path, [a, b], max_epochs=2, logger=False)
    trainer.fit(LassoModule())  # two stateful instances with one state_key would raise here
    path = tmp_path / "both.ckpt"
    trainer.save_checkpoint(path)
    states = torch.load(path, weights_only=False)["callbacks"]
    assert states[a.state_key]["folds"] == 3 and states[b.state_key]["folds"] == 4
    assert len(states[b.state_key]["history"]) == 2
    report = json.loads((tmp_path / "cv_b" / "report.json").read_text())  # subdir, under default_root_dir
    assert report["cv"]["config"]["folds"] == 4 and "prox_max_iter" in report["cv"]["config"]
    assert not (tmp_path / "influence" / "report.json").exists()  # a: report=False
