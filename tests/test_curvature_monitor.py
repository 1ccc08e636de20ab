"""CurvatureMonitor: values against direct spectrum calls, loggers, training invariance, resume, errors, DDP parity."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_influence.callbacks import MisconfigurationError
from lightning_influence.callbacks._common import make_reduce_fn
from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
from lightning_influence.distributed import global_sample_indices, torch_distributed_reducer
from lightning_influence.exceptions import BatchFormatError
from lightning_influence.operators import GNHOperator, make_batches
from lightning_influence.spectrum import estimate_spectrum, lissa_settings
from lightning_influence.tasks import Classification, Task
from tests.helpers.lightning_models import JoiningDDPSpawn, TinyClassifier

TAGS = (
    "curvature/trace",
    "curvature/trace_stderr",
    "curvature/lambda_max",
    "curvature/critical_batch_size",
    "lissa/eta",
    "lissa/batch_size",
    "lissa/steps",
)
SMALL = {"sample_size": 20, "batch_size": 8, "trace_probes": 6, "lanczos_iter": 8}


def _trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _operator(module: TinyClassifier, monitor: CurvatureMonitor) -> GNHOperator:
    """The GNH of the monitor's fixed sample."""
    ds = module.train_set
    idx = global_sample_indices(len(ds), monitor.sample_size, monitor.seed)
    return GNHOperator(module, monitor.task, make_batches(ds, idx, monitor.batch_size))


def _direct(module: TinyClassifier, monitor: CurvatureMonitor, start: torch.Tensor | None = None) -> Any:
    """The monitor's measurement, recomputed from scratch with the numerics API (Lanczos started at ``start``)."""
    ds = module.train_set
    op = _operator(module, monitor)
    return estimate_spectrum(op, damping=monitor.damping, config=monitor.config, dataset_size=len(ds), start=start)


# ------------------------------------------------------------------------------- values, loggers, report
def test_logged_values_match_direct_spectrum_on_checkpoint_weights_and_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import lightning_influence.callbacks.curvature_monitor as cm

    starts: list[torch.Tensor | None] = []  # the warm start of every measurement, to recompute it exactly

    def recording(*args: Any, start: torch.Tensor | None = None, **kwargs: Any) -> Any:
        starts.append(None if start is None else start.clone())
        return estimate_spectrum(*args, start=start, **kwargs)

    monkeypatch.setattr(cm, "estimate_spectrum", recording)
    pl.seed_everything(1)
    model = TinyClassifier()
    monitor = CurvatureMonitor(Classification(), every_n_steps=3, **SMALL)  # type: ignore[arg-type]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=4)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, max_steps=8, logger=logger, callbacks=[monitor, ckpt], limit_val_batches=0)
    trainer.fit(model)

    # steps 3, 6 by cadence; 4, 8 by checkpoint; nothing measured twice
    assert monitor.measured_steps == [3, 4, 6, 8]
    assert [r["trigger"] for r in monitor.history] == ["step", "checkpoint", "step", "checkpoint"]
    # the first measurement starts Lanczos at the sample's loss gradient (one gradient pass), the later ones warm
    starts_used = [(r["lanczos_start"], r["start_gradients"]) for r in monitor.history]
    assert starts_used == [("gradient", 1)] + [("warm", 0)] * 3

    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(files) == 2
    for f in files:
        state = torch.load(f, weights_only=False)
        row = state[CurvatureMonitor.CHECKPOINT_KEY]
        assert row["step"] == state["global_step"]
        fresh = TinyClassifier()
        fresh.load_state_dict(state["state_dict"])
        start = starts[monitor.measured_steps.index(row["step"])]
        assert start is not None  # a checkpoint measurement follows a cadence one: warm-started
        direct = _direct(fresh, monitor, start)
        # the trace is deflated by the Lanczos basis, so it depends on the warm start: the same start reproduces it
        assert row["trace"] == pytest.approx(direct.trace, rel=1e-10)
        assert row["lambda_max"] == pytest.approx(direct.lambda_max, rel=1e-10)
        # Lanczos is warm-started from the previous measurement's Ritz vector: a Ritz value (a lower bound) within
        # the relative residual tolerance of the exact top eigenvalue, not the cold start's digits
        exact = float(torch.linalg.eigvalsh(_operator(fresh, monitor).dense())[-1])
        assert (1 - monitor.lanczos_tol) * exact <= row["lambda_max"] <= exact * (1 + 1e-10)
        assert row["critical_batch_size"] == pytest.approx(row["trace"] / row["lambda_max"], rel=1e-10)
        again = lissa_settings(row["trace"], row["lambda_max"], monitor.damping, constant=monitor.config.constant,
                               dataset_size=len(fresh.train_set), steps_factor=monitor.config.steps_factor)
        assert row["lissa"]["steps"] == again.steps and row["lissa"]["batch_size"] == again.batch_size
        # the callback state inside the checkpoint already holds this measurement
        hist = state["callbacks"][monitor.state_key]["history"]
        assert [r["step"] for r in hist] == [s for s in monitor.measured_steps if s <= row["step"]]

    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    by_step = {r["step"]: r for r in monitor.history}
    for tag in TAGS:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == monitor.measured_steps, tag
        for e in events:
            assert e.value == pytest.approx(_metric(by_step[e.step], tag), rel=1e-6), tag
    assert "curvature/history" in acc.Tags()["images"]  # the figure of all curves at train end

    report = json.loads((Path(logger.log_dir) / "influence" / "report.json").read_text())
    assert [r["step"] for r in report["curvature"]["history"]] == monitor.measured_steps
    assert (Path(logger.log_dir) / "influence" / "report.html").stat().st_size > 1000
    for tag in TAGS:
        assert float(trainer.callback_metrics[tag]) == pytest.approx(_metric(monitor.history[-1], tag), rel=1e-12)


def _metric(row: dict[str, Any], tag: str) -> float:
    group, name = tag.split("/")
    return float(row["lissa"][name]) if group == "lissa" else float(row[name])


def test_wandb_offline_run_holds_every_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="li-test", save_dir=str(tmp_path), offline=True)
    logged: list[dict[str, Any]] = []
    run = logger.experiment
    original = run.log

    def spy(data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        logged.append(dict(data))
        return original(data, *args, **kwargs)

    monkeypatch.setattr(run, "log", spy)
    monitor = CurvatureMonitor(Classification(), every_n_steps=2, **SMALL)  # type: ignore[arg-type]
    trainer = _trainer(tmp_path, max_steps=4, logger=logger, callbacks=[monitor], limit_val_batches=0,
                       enable_checkpointing=False)
    try:
        trainer.fit(TinyClassifier())
        for tag in TAGS:
            points = [d for d in logged if tag in d]
            assert [d["trainer/global_step"] for d in points] == monitor.measured_steps == [2, 4], tag
            assert float(run.summary[tag]) == pytest.approx(_metric(monitor.history[-1], tag), rel=1e-9)
        assert any("curvature/history" in d for d in logged)  # the figure, as a W&B image
    finally:
        run.finish()


def test_epoch_cadence_on_the_val_set_and_on_a_user_dataset(tmp_path: Path) -> None:
    val = CurvatureMonitor(Classification(), dataset="val", sample_size=None, every_n_epochs=1, on_checkpoint=False,
                           trace_probes=4, lanczos_iter=6)
    user_set = TinyClassifier(n=12, data_seed=3).train_set
    user = CurvatureMonitor(Classification(), dataset=user_set, sample_size=5, every_n_epochs=2, trace_probes=4,
                            lanczos_iter=6, seed=1)
    model = TinyClassifier(n=32, n_val=8)
    _trainer(tmp_path, max_epochs=2, logger=False, callbacks=[val, user], enable_checkpointing=False).fit(model)
    assert [(r["step"], r["trigger"], r["num_units"]) for r in val.history] == [(4, "epoch", 8.0), (8, "epoch", 8.0)]
    assert [(r["step"], r["trigger"], r["num_units"]) for r in user.history] == [(8, "epoch", 5.0)]
    assert val.state_key != user.state_key  # two monitors can share a Trainer
    idx = global_sample_indices(12, 5, seed=1)
    op = GNHOperator(model, user.task, make_batches(user_set, idx, user.batch_size))
    direct = estimate_spectrum(op, damping=user.damping, trace_probes=4, lanczos_iter=6, lanczos_tol=user.lanczos_tol,
                               seed=1, dataset_size=12, lanczos_start="gradient")
    assert user.history[0]["trace"] == pytest.approx(direct.trace, rel=1e-10)  # measured on the final weights


# --------------------------------------------------------------------------------- training invariance
class _GradAndModeSpy(Callback):
    """After the monitor's hooks, the module must be in train mode with no .grad written by the monitor."""

    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert all(m.training for m in pl_module.modules())
        self.checked += 1


@pytest.mark.parametrize("kind", ["mlp", "bn"])
def test_monitor_does_not_change_training(tmp_path: Path, kind: str) -> None:
    def run(with_monitor: bool) -> tuple[dict[str, torch.Tensor], list[Any], int]:
        pl.seed_everything(123)
        model = TinyClassifier(kind=kind, n=32, batch_size=8)
        spy = _GradAndModeSpy()
        callbacks: list[Callback] = [spy]
        if with_monitor:
            callbacks.insert(0, CurvatureMonitor(Classification(), every_n_steps=1, **SMALL))  # type: ignore[arg-type]
        trainer = _trainer(tmp_path / str(with_monitor), max_epochs=2, logger=False, callbacks=callbacks,
                           limit_val_batches=2)
        trainer.fit(model)
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        rng = torch.rand(3)  # the global RNG must be where it would have been
        return {k: v.clone() for k, v in model.state_dict().items()} | {"rng": rng}, grads, spy.checked

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, base_grads, _ = run(False)
        mon, mon_grads, checked = run(True)
    assert checked == 8
    assert base.keys() == mon.keys()
    for k in base:
        assert torch.equal(base[k], mon[k]), k  # bit-identical weights, BatchNorm buffers and RNG stream
    if kind == "bn":
        assert "net.bn.running_mean" in base and "net.bn.num_batches_tracked" in base
    for a, b in zip(base_grads, mon_grads, strict=True):
        assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


class _GradModeSpy(Callback):
    def __init__(self) -> None:
        self.grad_enabled_at_val_end: list[bool] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.grad_enabled_at_val_end.append(torch.is_grad_enabled())


class _InferenceModeMonitor(CurvatureMonitor):
    """Runs the cadence hook under ``torch.inference_mode`` (as Lightning does for hooks of inference loops)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        with torch.inference_mode():
            assert torch.is_inference_mode_enabled()
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_measures_under_inference_mode_and_no_grad(tmp_path: Path) -> None:
    def run(cls: type[CurvatureMonitor]) -> tuple[CurvatureMonitor, _GradModeSpy, dict[str, torch.Tensor]]:
        pl.seed_everything(7)
        spy = _GradModeSpy()
        monitor = cls(Classification(), every_n_steps=3, **SMALL)  # type: ignore[arg-type]
        ckpt = ModelCheckpoint(dirpath=tmp_path / cls.__name__, monitor="val_loss", save_top_k=-1)
        trainer = _trainer(tmp_path, max_epochs=2, logger=False, callbacks=[spy, monitor, ckpt], inference_mode=True)
        model = TinyClassifier(kind="bn")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model)
        return monitor, spy, model.state_dict()

    inf, spy, weights = run(_InferenceModeMonitor)
    plain, _, plain_weights = run(CurvatureMonitor)
    # ModelCheckpoint(monitor=...) saves in on_validation_end, which fit runs under no_grad
    assert spy.grad_enabled_at_val_end == [False, False]
    assert [(r["step"], r["trigger"]) for r in inf.history] == [(3, "step"), (4, "checkpoint"), (6, "step"),
                                                               (8, "checkpoint")]
    for a, b in zip(inf.history, plain.history, strict=True):
        assert a["trace"] == b["trace"] and a["lambda_max"] == b["lambda_max"]
    assert all(torch.equal(weights[k], plain_weights[k]) for k in weights)


# ---------------------------------------------------------------------------------------------- resume
def test_resume_continues_history_without_gaps_or_duplicates(tmp_path: Path) -> None:
    def make(max_steps: int, root: Path) -> tuple[pl.Trainer, CurvatureMonitor]:
        monitor = CurvatureMonitor(Classification(), every_n_steps=3, **SMALL)  # type: ignore[arg-type]
        ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)  # 4 steps per epoch
        trainer = _trainer(root, max_steps=max_steps, logger=False, callbacks=[monitor, ckpt], limit_val_batches=0)
        return trainer, monitor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first_trainer, first = make(4, tmp_path / "a")
        first_trainer.fit(TinyClassifier(shuffle=False))
        (path,) = (tmp_path / "a").glob("*step=4*.ckpt")
        resumed_trainer, resumed = make(12, tmp_path / "b")
        resumed_trainer.fit(TinyClassifier(shuffle=False), ckpt_path=path)

    assert first.measured_steps == [3, 4]
    assert torch.load(path, weights_only=False)[CurvatureMonitor.CHECKPOINT_KEY]["step"] == 4
    steps = resumed.measured_steps
    assert resumed.history[:2] == first.history  # the curve continues from the checkpoint's history
    assert steps == sorted(set(steps))  # no duplicate (step 4 is not measured again after the restore)
    assert {3, 6, 9, 12} <= set(steps)  # no gap in the cadence
    saved = sorted(int(f.stem.split("step=")[1]) for f in (tmp_path / "b").glob("*.ckpt"))
    assert set(saved) <= set(steps)  # every checkpoint of the resumed run carries its measurement
    assert set(steps) == {3, 6, 9, 12} | {4} | set(saved)
    last = torch.load(tmp_path / "b" / f"epoch=2-step={saved[-1]}.ckpt", weights_only=False)
    assert [r["step"] for r in last["callbacks"][resumed.state_key]["history"]] == steps


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"trace_probes": 1}, "trace_probes must be >= 2"),
        ({"sample_size": 0}, "sample_size must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"damping": 0.0}, "damping must be > 0"),
        ({"every_n_steps": 0}, "every_n_steps must be >= 1"),
        ({"on_checkpoint": False}, "would never measure"),
        ({"dataset": "test"}, "dataset must be 'train', 'val'"),
    ],
)
def test_init_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(MisconfigurationError, match=match):
        CurvatureMonitor(Classification(), **kwargs)


def test_init_rejects_non_task() -> None:
    with pytest.raises(MisconfigurationError, match="task must be"):
        CurvatureMonitor(object())  # type: ignore[arg-type]
    assert isinstance(CurvatureMonitor("cross_entropy").task, Task)


def test_unsupported_strategy_error() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy(), loggers=[object()])
    with pytest.raises(MisconfigurationError, match=r"FSDPStrategy.*Supported: single_device, ddp, ddp_spawn"):
        CurvatureMonitor(Classification()).setup(trainer, TinyClassifier(), "fit")  # type: ignore[arg-type]


def test_sample_size_larger_than_dataset_error(tmp_path: Path) -> None:
    monitor = CurvatureMonitor(Classification(), sample_size=33)
    trainer = _trainer(tmp_path, max_steps=1, logger=False, callbacks=[monitor], limit_val_batches=0)
    with pytest.raises(MisconfigurationError, match=r"sample_size=33 is larger than the dataset \(32 examples\)"):
        trainer.fit(TinyClassifier(n=32))
    user = torch.utils.data.TensorDataset(torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    early = CurvatureMonitor(Classification(), dataset=user, sample_size=5)
    trainer = _trainer(tmp_path, max_steps=1, logger=False, callbacks=[early], limit_val_batches=0)
    with pytest.raises(MisconfigurationError, match="sample_size=5 is larger"):
        trainer.fit(TinyClassifier())


class _DictTask(Classification):
    def split(self, batch: Any) -> Any:
        if not isinstance(batch, dict):
            raise BatchFormatError("_DictTask expects dict batches with 'x' and 'y'.")
        return (batch["x"],), batch["y"]


@pytest.mark.parametrize(
    ("task", "match"),
    [(_DictTask(), "does not fit the train batches: _DictTask expects dict"), (Task("binary"), "task=")],
)
def test_task_that_does_not_fit_the_batches_errors_before_training(tmp_path: Path, task: Task, match: str) -> None:
    model = TinyClassifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = CurvatureMonitor(task, **SMALL)  # type: ignore[arg-type]
    trainer = _trainer(tmp_path, max_steps=2, logger=False, callbacks=[monitor], limit_val_batches=0)
    with pytest.raises(MisconfigurationError, match=match):
        trainer.fit(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing trained


def test_no_logger_warns_and_still_mirrors_into_callback_metrics(tmp_path: Path) -> None:
    monitor = CurvatureMonitor(Classification(), every_n_steps=2, **SMALL)  # type: ignore[arg-type]
    trainer = _trainer(tmp_path, max_steps=2, logger=False, callbacks=[monitor], limit_val_batches=0,
                       enable_checkpointing=False)
    with pytest.warns(UserWarning, match="CurvatureMonitor: no logger is attached"):
        trainer.fit(TinyClassifier())
    assert monitor.measured_steps == [2]
    for tag in TAGS:
        assert trainer.callback_metrics[tag].dtype == torch.float64
        assert float(trainer.callback_metrics[tag]) == _metric(monitor.history[0], tag)


# ------------------------------------------------------------------------------------------------- DDP
class _ShardRecorder(CurvatureMonitor):
    """Writes what each rank computed to files (ddp_spawn workers' callback state is lost)."""

    def __init__(self, out: str, **kwargs: Any) -> None:
        super().__init__(Classification(), **kwargs)
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        rank = trainer.global_rank
        reduce = make_reduce_fn(trainer)
        plain = torch_distributed_reducer()
        assert reduce is not None and plain is not None
        local = torch.tensor([float(rank + 1), 1.0], dtype=torch.float64)
        assert self.shard is not None
        torch.save(
            {
                "indices": self.shard.indices.tolist(),
                "global": self.shard.global_indices.tolist(),
                "examples_processed": self.last_examples_processed,
                "history": self.history,
                "strategy_sum": reduce(local).tolist(),
                "torch_sum": plain(local).tolist(),
                "local_after": local.tolist(),
            },
            f"{self.out}/rank{rank}.pt",
        )


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_spawn_matches_single_process_with_uneven_shards(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"sample_size": 7, "batch_size": 3, "trace_probes": 6, "lanczos_iter": 8,
                              "every_n_steps": 1, "on_checkpoint": False}
    # lr=0 keeps the weights at their (seeded) initial values on every rank, so both runs measure the same model
    single = CurvatureMonitor(Classification(), **kwargs)
    _trainer(tmp_path / "one", max_steps=1, logger=False, callbacks=[single], limit_val_batches=0,
             enable_checkpointing=False).fit(TinyClassifier(lr=0.0, n=16))

    out = tmp_path / "ddp"
    out.mkdir()
    ddp_trainer = _trainer(out, max_steps=1, logger=False, limit_val_batches=0, enable_checkpointing=False,
                           strategy=JoiningDDPSpawn(), devices=2, callbacks=[_ShardRecorder(str(out), **kwargs)])
    ddp_trainer.fit(TinyClassifier(lr=0.0, n=16))

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref = single.history[0]
    for key in ("trace", "lambda_max", "critical_batch_size"):
        print(f"ddp parity {key}: 1 process {ref[key]!r}, 2 processes {[res['history'][0][key] for res in ranks]!r}")
    print("examples per rank:", [len(res["indices"]) for res in ranks], [res["examples_processed"] for res in ranks])
    for r, res in enumerate(ranks):
        (row,) = res["history"]
        assert row["trace"] == pytest.approx(ref["trace"], rel=1e-10), r
        assert row["trace_stderr"] == pytest.approx(ref["trace_stderr"], rel=1e-8), r
        assert row["lambda_max"] == pytest.approx(ref["lambda_max"], rel=1e-10), r
        assert row["critical_batch_size"] == pytest.approx(ref["critical_batch_size"], rel=1e-10), r
        assert row["num_units"] == 7.0
        assert res["strategy_sum"] == [3.0, 2.0] and res["torch_sum"] == [3.0, 2.0]  # sums, not means
        assert res["local_after"] == [float(r + 1), 1.0]  # the reducers do not clobber their input
    # each rank computed only its unpadded shard: 4 + 3 examples, disjoint, covering the global sample
    assert ranks[0]["global"] == ranks[1]["global"]
    assert [len(res["indices"]) for res in ranks] == [4, 3]
    assert sorted(ranks[0]["indices"] + ranks[1]["indices"]) == ranks[0]["global"]
    passes = ranks[0]["examples_processed"] / 4
    assert passes == ranks[1]["examples_processed"] / 3 and passes >= 2  # same number of passes over each shard
    # the metrics mirrored into callback_metrics come back from the spawned rank 0
    assert float(ddp_trainer.callback_metrics["curvature/trace"]) == pytest.approx(ref["trace"], rel=1e-10)


# ------------------------------------------------------------------------------------------- config
def test_spectrum_config_defaults_overrides_and_report_entry(tmp_path: Path) -> None:
    from lightning_influence.config import SpectrumConfig

    default = CurvatureMonitor(Classification())
    assert default.config == SpectrumConfig(trace_probes=4, lanczos_iter=8, lanczos_tol=3e-2, lanczos_start="gradient",
                                            linearization="auto")
    given = CurvatureMonitor(Classification(), config=SpectrumConfig(lanczos_iter=20, seed=2))
    assert (given.lanczos_iter, given.trace_probes, given.seed) == (20, SpectrumConfig().trace_probes, 2)
    explicit = CurvatureMonitor(Classification(), config=SpectrumConfig(lanczos_iter=20), trace_probes=5, seed=7)
    assert (explicit.config.trace_probes, explicit.config.lanczos_iter, explicit.seed) == (5, 20, 7)
    with pytest.raises(MisconfigurationError, match=r"CurvatureMonitor: SpectrumConfig\.trace_probes"):
        CurvatureMonitor(Classification(), config=SpectrumConfig(trace_probes=1))
    with pytest.raises(MisconfigurationError, match="config must be a SpectrumConfig"):
        CurvatureMonitor(Classification(), config=object())  # type: ignore[arg-type]

    monitor = CurvatureMonitor(Classification(), every_n_steps=2, on_checkpoint=False,
                               config=SpectrumConfig(trace_probes=4, lanczos_iter=6, lambda_method="sketch",
                                                     sketch_dim=6), sample_size=20, batch_size=8)
    _trainer(tmp_path, max_steps=2, logger=False, callbacks=[monitor], limit_val_batches=0,
             enable_checkpointing=False).fit(TinyClassifier())
    assert monitor.history[0]["lambda_method"] == "sketch" and monitor.history[0]["trace_probes"] == 4
    report = json.loads((tmp_path / "influence" / "report.json").read_text())
    assert {k: report["curvature"]["config"][k] for k in monitor.config.to_dict()} == monitor.config.to_dict()


def test_default_sample_size_fits_a_small_dataset(tmp_path: Path) -> None:
    # the default ("auto": 64 at most) on a 32-example dataset measures on all 32, as sample_size=32 does
    auto = CurvatureMonitor(Classification(), every_n_steps=1, on_checkpoint=False, log_figure=False,
                            write_report=False)
    pl.seed_everything(3)
    _trainer(tmp_path, max_steps=1, logger=False, callbacks=[auto], limit_val_batches=0).fit(TinyClassifier(n=32))
    every = CurvatureMonitor(Classification(), sample_size=32, every_n_steps=1, on_checkpoint=False,
                             log_figure=False, write_report=False)
    pl.seed_everything(3)
    _trainer(tmp_path, max_steps=1, logger=False, callbacks=[every], limit_val_batches=0).fit(TinyClassifier(n=32))
    assert auto.sample_size == 32 and auto.shard is not None and auto.shard.global_size == 32
    assert auto.history[0]["trace"] == pytest.approx(every.history[0]["trace"], rel=1e-12)


def test_the_logged_curvature_figure_and_the_report_share_one_render(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """At train end the monitor logs the report's own figure (one matplotlib render for TensorBoard and the HTML)."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_influence.reporting import blocks, figures

    renders: list[int] = []
    real = figures.curvature_figure

    def counted(*args: Any, **kwargs: Any) -> Any:
        renders.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(figures, "curvature_figure", counted)
    monkeypatch.setattr("lightning_influence.reporting.sections.curvature_figure", counted)
    blocks._RENDERED.clear()
    pl.seed_everything(2)
    monitor = CurvatureMonitor(Classification(), every_n_steps=3, **SMALL)  # type: ignore[arg-type]
    logger = TensorBoardLogger(tmp_path, name="tb")
    _trainer(tmp_path, max_steps=6, logger=logger, callbacks=[monitor], limit_val_batches=0).fit(TinyClassifier())
    assert len(monitor.measured_steps) >= 2
    assert len(renders) == 1
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    (image,) = acc.Images("curvature/history")
    html = (Path(logger.log_dir) / "influence" / "report.html").read_text()
    assert image.width > 600 and image.height > 200 and "data:image/png;base64," in html
