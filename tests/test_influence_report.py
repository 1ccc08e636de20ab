"""InfluenceReport in a real Trainer: files, logs, monitor-tuned LiSSA, DDP parity, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.callbacks._common import MisconfigurationError
from lightning_influence.callbacks.influence_report import InfluenceReport
from lightning_influence.influence import InfluenceConfig, InfluenceResult, influence_scores
from lightning_influence.tasks import Classification
from tests.helpers.data import digits_tensors
from tests.helpers.lightning_models import JoiningDDPSpawn

F64 = torch.float64



class DigitsModule(L.LightningModule):
    """64-6-10 tanh MLP in float64, seeded; ``lr=0`` keeps the weights fixed (for exact DDP parity)."""

    def __init__(self, lr: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).double()
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DigitsData(L.LightningDataModule):
    def __init__(self, n_train: int = 121, n_val: int = 9) -> None:
        super().__init__()
        x, y = digits_tensors(F64)
        self.train_set = TensorDataset(x[:n_train], y[:n_train])
        self.val_set = TensorDataset(x[1000 : 1000 + n_val], y[1000 : 1000 + n_val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=32)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=32)


def _trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> L.Trainer:
    base: dict[str, Any] = {
        "default_root_dir": tmp_path, "max_steps": 8, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
        "enable_model_summary": False, "enable_checkpointing": False, "limit_val_batches": 1, "logger": False,
    }
    base.update(kwargs)
    return L.Trainer(callbacks=callbacks, **base)


def test_report_files_logs_and_scores_match_numerics(tmp_path: Path) -> None:
    task = Classification()
    cb = InfluenceReport(task, solver="cg", damping=1e-2, top_k=3, images=True, max_train=40, self_influence=True,
                         config=InfluenceConfig(cg_rtol=1e-11))
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, [cb], logger=logger)
    model, dm = DigitsModule(), DigitsData()
    trainer.fit(model, datamodule=dm)
    assert cb.result is not None and cb.scores_path is not None
    out = cb.scores_path.parent
    assert out == Path(trainer.log_dir) / "influence"
    # the callback's scores are exactly the numerics' scores on the trained model
    ref = influence_scores(model, task, dm.train_set, dm.val_set, solver="exact", damping=1e-2,
                           train_indices=cb.result.train_indices, self_influence=True)
    assert torch.allclose(cb.result.scores, ref.scores, rtol=1e-5, atol=1e-9)
    assert cb.result.self_influence is not None
    assert torch.allclose(cb.result.self_influence, ref.self_influence, rtol=1e-5)
    loaded = InfluenceReport.load_result(out)
    assert torch.equal(loaded.scores, cb.result.scores)
    report = json.loads((out / "report.json").read_text())
    sec = report["influence"]
    assert sec["config"]["solver"] == "cg" and len(sec["queries"]) == 9
    q0 = sec["queries"][0]
    assert q0["proponents"][0]["score"] <= q0["proponents"][-1]["score"] <= 0 or q0["proponents"][0]["score"] < 0
    assert len(sec["self_influence"]["values"]) == 40
    assert sec["train_images"] and len(sec["query_images"]) == 9  # 8x8 digits drawn as images
    assert sec["solver"]["converged"] is True
    assert (out / "report.html").exists() and "Influence" in (out / "report.html").read_text()
    m = trainer.callback_metrics
    assert float(m["influence/solver_iterations"]) == cb.result.solve["iterations"]
    assert float(m["influence/solver_residual"]) <= 1e-9
    assert float(m["influence/num_train"]) == 40
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logger.log_dir), size_guidance={"tensors": 0, "histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "influence/solver_residual" in tags["scalars"]
    assert "influence/self_influence" in tags["histograms"]
    assert "influence/solver_convergence" in tags["images"]
    assert any(t.startswith("influence/summary") for t in tags["tensors"])


def test_lissa_uses_curvature_monitor_spectrum(tmp_path: Path) -> None:
    from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor

    task = Classification()
    monitor = CurvatureMonitor(task, sample_size=None, every_n_epochs=1, on_checkpoint=False, write_report=False,
                               log_figure=False, damping=1e-2)
    cb = InfluenceReport(task, solver="lissa", damping=1e-2, max_train=20, max_queries=3, self_influence=False)
    trainer = _trainer(tmp_path, [monitor, cb], max_steps=4, max_epochs=1)
    trainer.fit(DigitsModule(), datamodule=DigitsData())
    assert monitor.latest is not None and cb.result is not None
    info = cb.result.solve["info"]
    assert info["settings_source"] == "spectrum_summary"
    assert info["spectrum"]["trace"] == pytest.approx(monitor.latest.trace)
    assert cb.result.diagnostics["spectrum_source"] == "CurvatureMonitor"
    assert cb.result.scores.shape == (3, 20)


def test_errors(tmp_path: Path) -> None:
    task = Classification()
    with pytest.raises(MisconfigurationError, match="damping must be > 0"):
        InfluenceReport(task, damping=0.0)
    with pytest.raises(MisconfigurationError, match="solver"):
        InfluenceReport(task, solver="newton")
    with pytest.raises(MisconfigurationError, match="query_indices is empty"):
        InfluenceReport(task, query_indices=[])
    with pytest.raises(MisconfigurationError, match="query_data"):
        InfluenceReport(task, query_data="test")
    empty = TensorDataset(torch.zeros(0, 64, dtype=F64), torch.zeros(0, dtype=torch.long))
    cb = InfluenceReport(task, query_data=empty)
    with pytest.raises(MisconfigurationError, match="empty"):
        _trainer(tmp_path, [cb], max_steps=1).fit(DigitsModule(), datamodule=DigitsData())


# ------------------------------------------------------------------------------------------ DDP parity
def _parity_callbacks() -> list[Any]:
    task = Classification()
    return [
        InfluenceReport(task, solver="cg", damping=1e-2, max_queries=4, subdir="inf_cg", progress_bar=False,
                        config=InfluenceConfig(cg_rtol=1e-12)),
        InfluenceReport(task, solver="lissa", damping=1e-2, max_queries=4, max_train=30, self_influence=False,
                        subdir="inf_lissa",
                        config=_lissa_config()),
    ]


def _lissa_config() -> InfluenceConfig:
    # settings measured on the spot (sharded spectrum and C.1 constant), steps capped to keep the test short
    return InfluenceConfig(lissa_max_steps=25, lissa_certificate_size=40)


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_two_processes_equal_one_process(tmp_path: Path) -> None:
    results: dict[int, dict[str, InfluenceResult]] = {}
    metrics: dict[int, float] = {}
    for devices in (1, 2):
        root = tmp_path / f"d{devices}"
        kwargs: dict[str, Any] = {"devices": devices, "max_steps": 2}
        if devices == 2:
            kwargs["strategy"] = JoiningDDPSpawn()
        trainer = _trainer(root, _parity_callbacks(), **kwargs)
        trainer.fit(DigitsModule(lr=0.0), datamodule=DigitsData())  # lr=0: both runs score the same weights
        results[devices] = {sub: InfluenceReport.load_result(root / sub) for sub in ("inf_cg", "inf_lissa")}
        metrics[devices] = float(trainer.callback_metrics["influence/num_train"])
    for sub in ("inf_cg", "inf_lissa"):
        one, two = results[1][sub], results[2][sub]
        assert torch.equal(one.train_indices, two.train_indices) and torch.equal(one.query_indices, two.query_indices)
        # CG (to 1e-12) and a fixed LiSSA recursion only differ by the order of floating-point sums
        assert torch.allclose(one.scores, two.scores, rtol=1e-8, atol=1e-10), sub
        assert two.diagnostics["world_size"] == 2 and one.diagnostics["world_size"] == 1
        if one.self_influence is not None:
            assert two.self_influence is not None
            assert torch.allclose(one.self_influence, two.self_influence, rtol=1e-8)  # joint sharded solves
    assert metrics[1] == metrics[2]  # ddp_spawn mirrors metrics back to the parent


# ------------------------------------------------------------------------------------ config and setup
def test_config_values_are_kept_unless_an_explicit_argument_overrides_them() -> None:
    task = Classification()
    assert InfluenceReport(task).config == InfluenceConfig()
    # the bug this guards: an explicit default (solver="cg") used to silently override the config's solver
    cb = InfluenceReport(task, config=InfluenceConfig(solver="lissa", damping=1e-2, top_k=3, seed=4))
    assert (cb.config.solver, cb.config.damping, cb.config.top_k, cb.config.seed) == ("lissa", 1e-2, 3, 4)
    assert (cb.solver, cb.damping, cb.seed) == ("lissa", 1e-2, 4)  # read-only views of the config
    override = InfluenceReport(task, solver="exact", self_influence=False, config=InfluenceConfig(solver="lissa"))
    assert (override.config.solver, override.config.self_influence) == ("exact", False)
    with pytest.raises(AttributeError, match=r"config\.solver"):
        cb.solver = "cg"  # type: ignore[misc]
    with pytest.raises(MisconfigurationError, match=r"InfluenceReport: .*damping (must be )?> 0"):
        InfluenceReport(task, config=InfluenceConfig(damping=0.0))


class _TrainOnly(L.LightningDataModule):
    """A datamodule without a val dataloader."""

    def train_dataloader(self) -> DataLoader:
        return DigitsData().train_dataloader()


class _StreamVal(_TrainOnly):
    """A datamodule whose val data cannot be indexed."""

    def val_dataloader(self) -> DataLoader:
        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self) -> Any:
                return iter(DigitsData().val_set)

        return DataLoader(Stream(), batch_size=4)


class _SetupSpy(L.Callback):
    setup_done = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.setup_done = True


def test_missing_query_data_raises_before_training(tmp_path: Path) -> None:
    # no val data anywhere: decided when the fit loop starts (loaders passed to fit() are attached only then)
    model = DigitsModule()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(tmp_path, [InfluenceReport(Classification(), query_data="val")], limit_val_batches=0)
    with pytest.raises(MisconfigurationError, match="needs the val data but the Trainer has no val dataloader"):
        trainer.fit(model, datamodule=_TrainOnly())
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # val data behind the datamodule's hook, not indexable: raised in setup (before the callbacks after it set up)
    spy = _SetupSpy()
    trainer = _trainer(tmp_path, [InfluenceReport(Classification(), query_data="val"), spy])
    with pytest.raises(MisconfigurationError, match="map-style"):
        trainer.fit(DigitsModule(), datamodule=_StreamVal())
    assert not spy.setup_done
    # loaders reachable only through the datamodule's hooks in setup, or passed to fit() directly: both work
    for fit_kwargs in ({"datamodule": DigitsData()},
                       {"train_dataloaders": DigitsData().train_dataloader(),
                        "val_dataloaders": DigitsData().val_dataloader()}):
        ok = InfluenceReport(Classification(), max_train=8, max_queries=2, self_influence=False, progress_bar=False)
        _trainer(tmp_path / "ok", [ok], max_steps=1).fit(DigitsModule(), **fit_kwargs)
        assert ok.result is not None and ok.result.scores.shape == (2, 8)


def test_auto_damping_follows_the_curvature_monitor(tmp_path: Path) -> None:
    from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor

    task = Classification()
    monitor = CurvatureMonitor(task, sample_size=None, every_n_epochs=1, on_checkpoint=False, write_report=False,
                               log_figure=False, damping=1e-2)
    cb = InfluenceReport(task, solver="cg", max_train=20, max_queries=3)  # damping="auto" by default
    trainer = _trainer(tmp_path, [monitor, cb], max_steps=4, max_epochs=1)
    trainer.fit(DigitsModule(), datamodule=DigitsData())
    assert monitor.latest is not None and cb.result is not None
    used = cb.result.diagnostics["damping"]
    assert used["source"] == "spectrum" and used["lambda_max"] == monitor.latest.lambda_max
    assert used["damping"] == pytest.approx(1e-3 * monitor.latest.lambda_max)
    assert float(trainer.callback_metrics["influence/damping"]) == pytest.approx(used["damping"])
    assert cb.result.self_influence is None


def test_projected_cost_warns_before_the_first_step_and_curvature_sample_sets_the_curvature(tmp_path: Path) -> None:
    from lightning_influence.callbacks._common import sample_indices

    task = Classification()
    report = InfluenceReport(task, solver="cg", damping=1e-2, max_queries=5, curvature_sample=64, store=False,
                             progress_bar=False)
    steps: list[int] = []

    class _Step(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            steps.append(1)

    module, data = DigitsModule(), DigitsData()
    trainer = _trainer(tmp_path, [report, _Step()], max_epochs=1)
    with pytest.warns(UserWarning, match=r"InfluenceReport: solver='cg' for 5 queries.* curvature of 64 examples"
                                         r".*projected about .* gradient passes.*curvature_sample=<n>"):
        trainer.fit(module, datamodule=data)
    assert steps  # it warned, then trained
    cost, result = report.projected, report.result
    assert result is not None and cost["solver"] == "cg" and cost["passes"] > 10  # the budget of a 1-epoch fit
    train_set, val_set = data.train_dataloader().dataset, data.val_dataloader().dataset
    assert result.diagnostics["curvature_examples"] == 64
    expected = sample_indices(len(train_set), 64, report.seed, "curvature")
    assert result.diagnostics["curvature_indices"] == expected.tolist()
    # the projection is CG's worst case: the products CG really took stay below it
    flops = cost["scoring_flops"] / (3 * (result.scores.shape[1] + result.scores.shape[0]))
    assert 0 < result.diagnostics["example_curvature_products"] <= cost["solve_flops"] / (4 * flops)
    # and the curvature is that sample: influence_scores on those examples gives the same scores
    again = influence_scores(module, task, train_set, val_set, train_indices=result.train_indices,
                             query_indices=result.query_indices, curvature_indices=expected, solver="cg",
                             damping=1e-2)
    assert torch.allclose(again.scores, result.scores, rtol=1e-10, atol=1e-12 * float(result.scores.abs().max()))
