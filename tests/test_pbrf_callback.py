"""PBRFValidation: the table against an independent PBRF, weights untouched, DDP parity, actionable errors."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.callbacks._common import MisconfigurationError
from lightning_influence.callbacks.influence_report import InfluenceReport
from lightning_influence.callbacks.pbrf_validation import PBRFValidation, correlation_table
from lightning_influence.pbrf import PBRF
from lightning_influence.tasks import Classification
from tests.helpers.data import digits_tensors
from tests.helpers.lightning_models import JoiningDDPSpawn

DAMPING = 3e-2



def _digits() -> tuple[TensorDataset, TensorDataset]:
    x, y = digits_tensors()
    return TensorDataset(x[:300], y[:300]), TensorDataset(x[1000:1030], y[1000:1030])


class PretrainedDigits(L.LightningModule):
    """A digits MLP pre-trained in plain PyTorch (float64); the Trainer then runs one step with lr=0.

    So one- and two-process runs validate exactly the same weights (the table must agree).
    """

    def __init__(self) -> None:
        super().__init__()
        train, _ = _digits()
        x, y = train.tensors
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)).double()
        opt = torch.optim.Adam(self.net.parameters(), lr=1e-2)
        for _ in range(100):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(self.net(x), y).backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(_digits()[0], batch_size=100)


class _Snapshot(Callback):
    """Records the weights at on_train_end (placed before PBRFValidation) and checks them after it."""

    def __init__(self, check: _Snapshot | None = None) -> None:
        self.check = check
        self.state: dict[str, torch.Tensor] | None = None
        self.ok: bool | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        if self.check is None:
            self.state = state
        else:
            assert self.check.state is not None
            self.ok = state.keys() == self.check.state.keys() and all(
                torch.equal(state[k], self.check.state[k]) and state[k].dtype == self.check.state[k].dtype
                for k in state
            )
            trainer.callback_metrics["test/weights_unchanged"] = torch.tensor(float(self.ok))


def _callbacks(
    num_train: int = 4, num_queries: int = 10, solver: str = "cg", **kw
) -> tuple[list[Callback], PBRFValidation]:
    _, query = _digits()
    report = InfluenceReport(Classification(), query_data=query, solver=solver, damping=DAMPING, max_train=40,
                             self_influence=False, progress_bar=False)
    before = _Snapshot()
    pbrf = PBRFValidation(Classification(), num_train=num_train, num_queries=num_queries, **kw)
    after = _Snapshot(before)
    return [report, before, pbrf, after], pbrf


def _trainer(tmp_path: Path, callbacks: list[Callback], **kw) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, max_steps=1, callbacks=callbacks, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, logger=kw.pop("logger", True), **kw)


def test_table_matches_independent_pbrf_and_weights_unchanged(tmp_path: Path) -> None:
    callbacks, cb = _callbacks()
    model = PretrainedDigits()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(tmp_path, callbacks, accelerator="cpu", devices=1)
    trainer.fit(model)
    res = cb.result
    assert res is not None
    # Trained weights: unchanged by the validation (checked inside on_train_end and after fit).
    assert float(trainer.callback_metrics["test/weights_unchanged"]) == 1.0
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    # Independent PBRF on the first validated example, straight from pbrf.py.
    train, query = _digits()
    i = int(res.train_indices[0])
    q = res.query_indices
    ref = PBRF(model.net, Classification(), [train.tensors], damping=DAMPING).response(
        (train.tensors[0][i : i + 1], train.tensors[1][i : i + 1]), queries=[(query.tensors[0][q], query.tensors[1][q])]
    )
    torch.testing.assert_close(res.pbrf[0], ref.response, rtol=1e-5, atol=1e-9)
    # Ground truth: CG (the report's solver) and exact damped-GNH influence track the PBRF at eps = 1/N.
    metrics = trainer.callback_metrics
    for key in ("pbrf/pearson_cg", "pbrf/pearson_exact", "pbrf/spearman_cg", "pbrf/pearson_gradient_dot",
                "pbrf/converged_fraction", "pbrf/max_relative_grad_norm"):
        assert key in metrics, key
    assert float(metrics["pbrf/pearson_cg"]) >= 0.85 and float(metrics["pbrf/pearson_exact"]) >= 0.85
    assert float(metrics["pbrf/converged_fraction"]) == 1.0
    # The metrics are the torchmetrics correlations of the stored matrices.
    rows, _ = correlation_table(res.pbrf, res.estimates)
    assert {r["estimator"]: r["pearson"] for r in rows}["cg"] == pytest.approx(float(metrics["pbrf/pearson_cg"]))
    # Report section with a verdict sentence, the table and the scatter data.
    report = json.loads((Path(trainer.log_dir) / "influence" / "report.json").read_text())
    section = report["pbrf"]
    assert "agree" in section["verdict"] and "ρ =" in section["verdict"]
    assert {r["estimator"] for r in section["correlations"]} == {"cg", "exact", "gradient_dot"}
    assert len(section["scatter"][0]["pbrf"]) == 4 * 10
    assert (Path(trainer.log_dir) / "influence" / "report.html").exists()
    # TensorBoard got the table (text), the verdict and one scatter image per estimator.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trainer.log_dir), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"pbrf/scatter_cg", "pbrf/scatter_exact", "pbrf/scatter_gradient_dot"} <= set(tags["images"])
    assert any(t.startswith("pbrf/correlations") for t in tags["tensors"])
    assert "pbrf/pearson_cg" in tags["scalars"]


def test_auto_lissa_report_tracks_pbrf_and_beats_gradient_dot(tmp_path: Path) -> None:
    """Issue 7: auto-tuned LiSSA vs PBRF Pearson >= 0.80 and at least 0.15 above the gradient-dot baseline."""
    callbacks, cb = _callbacks(num_train=8, num_queries=30, solver="lissa")
    trainer = _trainer(tmp_path, callbacks, accelerator="cpu", devices=1, logger=False)
    trainer.fit(PretrainedDigits())
    m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("pbrf/")}
    assert m["pbrf/pearson_lissa"] >= 0.80, m
    assert m["pbrf/pearson_lissa"] >= m["pbrf/pearson_gradient_dot"] + 0.15, m
    assert m["pbrf/pearson_exact"] >= 0.85, m
    assert cb.result is not None and cb.result.config["report_solver"] == "lissa"


def test_missing_influence_report_names_the_callback_to_add(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [PBRFValidation(Classification())], accelerator="cpu", devices=1, logger=False)
    expected = r"add InfluenceReport\(\.\.\.\) before PBRFValidation in callbacks"
    with pytest.raises(MisconfigurationError, match=expected):
        trainer.fit(PretrainedDigits())


def test_influence_report_after_validation_is_an_error(tmp_path: Path) -> None:
    _, query = _digits()
    cbs = [PBRFValidation(Classification()), InfluenceReport(Classification(), query_data=query, damping=DAMPING)]
    trainer = _trainer(tmp_path, cbs, accelerator="cpu", devices=1, logger=False)
    with pytest.raises(MisconfigurationError, match="comes before InfluenceReport"):
        trainer.fit(PretrainedDigits())


class _SilentReport(InfluenceReport):
    """An InfluenceReport that produced nothing (e.g. skipped)."""

    def on_train_end(self, trainer, pl_module) -> None:
        return None


def test_no_scores_to_validate(tmp_path: Path) -> None:
    _, query = _digits()
    cbs = [_SilentReport(Classification(), query_data=query, damping=DAMPING), PBRFValidation(Classification())]
    trainer = _trainer(tmp_path, cbs, accelerator="cpu", devices=1, logger=False)
    with pytest.raises(MisconfigurationError, match="no influence scores to validate"):
        trainer.fit(PretrainedDigits())


@pytest.mark.parametrize(("kw", "match"), [
    ({"epsilon": 0.0}, "epsilon must be > 0"),
    ({"epsilon": -1e-3}, "epsilon must be > 0"),
    ({"damping": 0.0}, "damping must be > 0"),
    ({"num_train": 0}, "num_train must be >= 1"),
    ({"optimizer": "adam"}, "optimizer must be"),
])
def test_argument_errors(kw: dict, match: str) -> None:
    with pytest.raises(MisconfigurationError, match=match):
        PBRFValidation(Classification(), **kw)


def test_non_convergence_is_flagged_in_metrics_and_verdict(tmp_path: Path) -> None:
    callbacks, cb = _callbacks(num_train=2, num_queries=5, max_iter=1, tol=1e-12)
    trainer = _trainer(tmp_path, callbacks, accelerator="cpu", devices=1)
    with pytest.warns(RuntimeWarning, match="did not converge: relative gradient norm"):
        trainer.fit(PretrainedDigits())
    assert float(trainer.callback_metrics["pbrf/converged_fraction"]) == 0.0
    assert float(trainer.callback_metrics["pbrf/max_relative_grad_norm"]) > 1e-12
    assert cb.result is not None and "did not converge" in cb.result.verdict


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_two_process_ddp_table_equals_one_process(tmp_path: Path) -> None:
    tables = {}
    for devices, strategy in ((1, "auto"), (2, JoiningDDPSpawn())):
        callbacks, _ = _callbacks(num_train=3, num_queries=8)
        trainer = _trainer(tmp_path / f"w{devices}", callbacks, accelerator="cpu", devices=devices, strategy=strategy)
        trainer.fit(PretrainedDigits())
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("pbrf/")}
        report = json.loads(next((tmp_path / f"w{devices}").rglob("report.json")).read_text())["pbrf"]
        tables[devices] = (metrics, report)
        assert float(trainer.callback_metrics["test/weights_unchanged"]) == 1.0
    (m1, r1), (m2, r2) = tables[1], tables[2]
    assert m1.keys() == m2.keys() and len(m1) >= 8
    for k in m1:
        if k != "pbrf/max_relative_grad_norm":
            assert m2[k] == pytest.approx(m1[k], rel=1e-6, abs=1e-9), k
    assert r2["config"]["world_size"] == 2 and r1["config"]["world_size"] == 1
    assert r1["train_indices"] == r2["train_indices"] and r1["query_indices"] == r2["query_indices"]
    for s1, s2 in zip(r1["scatter"], r2["scatter"], strict=True):
        assert s1["estimator"] == s2["estimator"]
        torch.testing.assert_close(torch.tensor(s2["pbrf"]), torch.tensor(s1["pbrf"]), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(torch.tensor(s2["estimate"]), torch.tensor(s1["estimate"]), rtol=1e-5, atol=1e-9)


def test_config_values_are_kept_unless_an_explicit_argument_overrides_them() -> None:
    from lightning_influence.config import PBRFConfig

    assert PBRFValidation(Classification()).config == PBRFConfig()
    given = PBRFValidation(Classification(), config=PBRFConfig(optimizer="lbfgs", tol=1e-6, history_size=10))
    assert (given.optimizer, given.tol, given.config.history_size) == ("lbfgs", 1e-6, 10)
    explicit = PBRFValidation(Classification(), tol=1e-4, epsilon=1e-3, config=PBRFConfig(optimizer="lbfgs"))
    assert (explicit.config.optimizer, explicit.config.tol, explicit.config.epsilon) == ("lbfgs", 1e-4, 1e-3)
