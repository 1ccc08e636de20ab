r"""End-to-end demo: a small MLP on sklearn's digits with all four lightning_influence callbacks.

This is what ``lightning-influence demo`` (and ``make demo``) runs. A :class:`DigitsClassifier` (64-16-10 tanh
MLP, 1,210 parameters, with an L1 penalty it declares as ``self.regularizer``) is trained with a plain
:class:`lightning.Trainer` on :class:`DigitsDataModule`, with

1. :class:`~lightning_influence.callbacks.curvature_monitor.CurvatureMonitor`: GNH trace ± standard error,
   :math:`\lambda_{\max}`, critical batch size and LiSSA settings every ``monitor_every`` epochs on a fixed
   sample of 512 training examples;
2. :class:`~lightning_influence.callbacks.influence_report.InfluenceReport`: influence of 400 training examples
   on 20 validation queries (exact damped-GNH solve: the model is tiny), self-influence ranking, 8x8 images;
3. :class:`~lightning_influence.callbacks.approximate_cv.ApproximateCV`: approximate 5-fold CV of the
   L1-penalised loss (AFIF: downdated Fisher + proximal step);
4. :class:`~lightning_influence.callbacks.pbrf_validation.PBRFValidation`: the influence scores of 3 training
   examples checked against the proximal Bregman response function.

Outputs: TensorBoard logs in ``<out>/lightning_logs/version_<n>/``, the HTML report
``<log_dir>/influence/report.html`` (with ``report.json``), ``curvature.json`` (the last curvature summary)
and ``curvature.png`` (the monitor's curvature figure). :class:`DigitsClassifier` and :class:`DigitsDataModule`
are also what ``configs/digits_all_callbacks.yaml`` trains through LightningCLI.

scikit-learn is needed for the data set only (``pip install scikit-learn`` or the ``demo`` extra).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsClassifier", "DigitsDataModule", "demo_callbacks", "load_digits_datasets", "run_demo"]

#: Number of training examples the curvature summary is computed on.
CURVATURE_SAMPLE = 512
#: Batch size of the fixed batches the GNH operator averages over.
CURVATURE_BATCH_SIZE = 128
#: Damping λ used for the LiSSA recommendation (η = 1/(λ_max + λ), T = 2/(λη)) and the influence solve.
CURVATURE_DAMPING = 1e-3


class DigitsClassifier(L.LightningModule):
    r"""A 64-16-10 tanh MLP trained with softmax cross-entropy (+ an optional L1 penalty) and SGD with momentum.

    The module declares its penalty as ``self.regularizer`` (an :class:`~lightning_influence.regularizers.L1` on
    every parameter) and adds :func:`~lightning_influence.cv.regularization_penalty` of that very object to the
    training loss, which is how :class:`~lightning_influence.callbacks.approximate_cv.ApproximateCV` learns what
    was minimised.

    Args:
        in_features: Input dimension (64 pixels for digits).
        hidden: Width of the hidden layer.
        num_classes: Number of classes.
        lr: SGD learning rate.
        l1: Strength of the L1 penalty :math:`\lambda\lVert\theta\rVert_1` (0 for none).

    Example::

        >>> model = DigitsClassifier(hidden=8, l1=1e-4)
        >>> model(torch.zeros(2, 64)).shape, model.regularizer.strength
        (torch.Size([2, 10]), 0.0001)
    """

    def __init__(
        self, in_features: int = 64, hidden: int = 16, num_classes: int = 10, lr: float = 0.05, l1: float = 1e-4
    ) -> None:
        from lightning_influence.regularizers import L1

        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))
        self.lr = lr
        self.regularizer = L1(l1)

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits for a batch of flattened images."""
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        if stage == "train" and self.regularizer.strength > 0:
            from lightning_influence.cv import regularization_penalty

            loss = loss + regularization_penalty(self, self.regularizer)
        acc = (logits.argmax(dim=-1) == y).float().mean()
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val", on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one training batch."""
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy and accuracy on one validation batch."""
        return self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum 0.9."""
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def load_digits_datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Load sklearn's 8x8 digits, standardise with training statistics and split 80/20 (stratified).

    Args:
        seed: Seed of the train/validation split.

    Returns:
        ``(train, val)`` datasets of ``(float32 features of shape (64,), int64 label)`` pairs.

    Raises:
        ImportError: If scikit-learn is not installed.

    Example::

        >>> train, val = load_digits_datasets(seed=0)
        >>> len(train), len(val), train[0][0].shape
        (1437, 360, torch.Size([64]))
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler
    except ImportError as err:  # pragma: no cover - exercised only without scikit-learn
        raise ImportError(
            "The lightning-influence demo trains on scikit-learn's bundled digits data set, but scikit-learn is "
            "not installed. Install it with `pip install scikit-learn` (or `pip install 'lightning-influence[demo]'`)."
        ) from err

    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_train)

    def as_dataset(features: Any, labels: Any) -> TensorDataset:
        return TensorDataset(
            torch.as_tensor(scaler.transform(features), dtype=torch.float32),
            torch.as_tensor(labels, dtype=torch.int64),
        )

    return as_dataset(x_train, y_train), as_dataset(x_val, y_val)


class DigitsDataModule(L.LightningDataModule):
    """sklearn's digits as a LightningDataModule (standardised, stratified 80/20 split, see load_digits_datasets).

    Args:
        batch_size: Training batch size (validation uses 256).
        seed: Seed of the split and of the training data order.

    Example::

        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> len(dm.train_set), len(dm.val_set)
        (1437, 360)
    """

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        """Load and split the data (once)."""
        if self.train_set is None:
            self.train_set, self.val_set = load_digits_datasets(self.seed)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (seeded generator)."""
        assert self.train_set is not None
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        """Validation batches of 256."""
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=256)


class _StageBar(L.Callback):
    """Open a progress bar for the post-training stage of the callback that follows it (and close the last one)."""

    def __init__(self, stages: list[str], index: int, show: bool) -> None:
        self.stages, self.index, self.show = stages, index, show

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = _StageBar._open
        if state is not None:
            state.update(1)
            state.close()
            _StageBar._open = None
        if self.show and self.index < len(self.stages) and trainer.is_global_zero:
            from tqdm.auto import tqdm  # type: ignore[import-untyped]

            _StageBar._open = tqdm(total=1, desc=f"[{self.index + 1}/{len(self.stages)}] {self.stages[self.index]}",
                                   bar_format="{desc}: {bar} {elapsed}", leave=True)

    _open: Any = None


def demo_callbacks(
    monitor_every: int = 2, num_queries: int = 20, max_train: int = 400, pbrf_train: int = 3, progress: bool = True,
    quick: bool = False,
) -> list[L.Callback]:
    """The four lightning_influence callbacks the demo trains with, interleaved with post-training stage bars.

    Args:
        monitor_every: CurvatureMonitor cadence in epochs.
        num_queries: Validation queries of InfluenceReport.
        max_train: Training examples InfluenceReport scores (the curvature uses all of them).
        pbrf_train: Training examples PBRFValidation checks (two PBO solves each).
        progress: Show a progress bar per post-training stage on rank 0.
        quick: Cheaper train-end stages for tests (2 folds, PBO solves of at most 3 Newton steps, no exact-influence
            baseline in the PBRF table); the same callbacks and report sections.

    Returns:
        ``[bar, CurvatureMonitor, bar, InfluenceReport, bar, ApproximateCV, bar, PBRFValidation, bar]``.

    Example::

        >>> [type(cb).__name__ for cb in demo_callbacks(progress=False)][1::2]
        ['CurvatureMonitor', 'InfluenceReport', 'ApproximateCV', 'PBRFValidation']
    """
    from lightning_influence.callbacks.approximate_cv import ApproximateCV
    from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
    from lightning_influence.callbacks.influence_report import InfluenceReport
    from lightning_influence.callbacks.pbrf_validation import PBRFValidation
    from lightning_influence.tasks import Classification

    task = Classification()
    stages = [
        "CurvatureMonitor: curvature figure",
        f"InfluenceReport: {num_queries} queries x {max_train} training examples",
        f"ApproximateCV: {2 if quick else 5}-fold approximate CV",
        f"PBRFValidation: {pbrf_train} training examples x 2 PBO solves",
    ]
    main = [
        CurvatureMonitor(task, every_n_epochs=monitor_every, on_checkpoint=False, sample_size=CURVATURE_SAMPLE,
                         damping=CURVATURE_DAMPING, trace_probes=8, lanczos_iter=12),
        InfluenceReport(task, query_data="val", solver="exact", damping=CURVATURE_DAMPING, max_queries=num_queries,
                        max_train=max_train, top_k=5, images=True, progress_bar=progress),
        ApproximateCV(task, folds=2 if quick else 5, damping=CURVATURE_DAMPING, cg_rtol=1e-6, prox_tol=1e-6),
        PBRFValidation(task, num_train=pbrf_train, num_queries=5, exact_max_params=0 if quick else 2000,
                       tol=1e-3 if quick else None, max_iter=3 if quick else None),
    ]
    out: list[L.Callback] = [_StageBar(stages, 0, progress)]
    for i, cb in enumerate(main):
        out += [cb, _StageBar(stages, i + 1, progress)]
    return out


def run_demo(
    out_dir: str | Path, max_epochs: int = 20, seed: int = 0, *, max_train: int = 400, num_queries: int = 20,
    pbrf_train: int = 3, quick: bool = False,
) -> dict[str, Any]:
    """Train the digits MLP with all four callbacks, then print where the logs and the report are.

    Args:
        out_dir: Directory for the TensorBoard logs (``<out_dir>/lightning_logs/version_<n>``).
        max_epochs: Number of training epochs.
        seed: Seed of the split, the initialisation, the data order and the curvature sample/probes.
        max_train: Training examples InfluenceReport scores.
        num_queries: Validation queries InfluenceReport explains.
        pbrf_train: Training examples PBRFValidation checks.
        quick: Cheaper train-end stages (see :func:`demo_callbacks`), for tests.

    Returns:
        The last :meth:`SpectrumSummary.to_dict` of the CurvatureMonitor (``trace``, ``trace_stderr``,
        ``lambda_max``, ``critical_batch_size``, ``lissa`` settings, ...) plus ``val_acc``, ``num_params``,
        ``num_examples``, ``log_dir``, ``report`` (the HTML path), ``cv`` (approximate CV estimate),
        ``pbrf`` (the PBRF verdict) and ``seconds``.

    Raises:
        ValueError: If ``max_epochs`` is smaller than 1.
        ImportError: If scikit-learn is not installed.

    Example::

        >>> result = run_demo("runs/demo", max_epochs=2, max_train=64)  # doctest: +SKIP
        >>> Path(result["report"]).name  # doctest: +SKIP
        'report.html'
    """
    import time

    if max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, got {max_epochs}.")
    from lightning_influence.callbacks.approximate_cv import ApproximateCV
    from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
    from lightning_influence.callbacks.pbrf_validation import PBRFValidation

    start = time.perf_counter()
    out_dir = Path(out_dir)
    L.seed_everything(seed, workers=True, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=seed)
    model = DigitsClassifier()
    show = sys.stdout.isatty() or sys.stderr.isatty()  # progress bars only on a terminal, not in logs/CI
    callbacks = demo_callbacks(monitor_every=max(1, min(2, max_epochs)), num_queries=num_queries,
                               max_train=max_train, pbrf_train=pbrf_train, progress=show, quick=quick)
    logger = TensorBoardLogger(save_dir=str(out_dir))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=show,
        log_every_n_steps=5,
    )
    with warnings.catch_warnings():
        # In-memory tensors need no worker processes; Lightning warns about num_workers=0 on every loader.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, datamodule=dm)
    val_acc = float(trainer.callback_metrics.get("val/acc", torch.tensor(float("nan"))))
    monitor = next(cb for cb in callbacks if isinstance(cb, CurvatureMonitor))
    cv = next(cb for cb in callbacks if isinstance(cb, ApproximateCV))
    pbrf = next(cb for cb in callbacks if isinstance(cb, PBRFValidation))
    summary = monitor.latest
    assert summary is not None  # measured at least at the last epoch
    train_set = dm.train_set
    assert train_set is not None

    log_dir = Path(logger.log_dir)
    report = log_dir / "influence" / "report.html"
    result: dict[str, Any] = dict(summary.to_dict())
    result.update(
        val_acc=val_acc,
        num_params=sum(p.numel() for p in model.parameters()),
        num_examples=min(CURVATURE_SAMPLE, len(train_set)),
        log_dir=str(log_dir),
        report=str(report),
        cv=cv.last_result.estimate if cv.last_result is not None else None,
        pbrf=getattr(pbrf.result, "verdict", None),
        seconds=time.perf_counter() - start,
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "curvature.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    _save_curvature_figure(monitor, log_dir / "curvature.png")

    _print_summary(result, summary, model, max_epochs, out_dir)
    return result


def _print_summary(result: dict[str, Any], summary: Any, model: Any, max_epochs: int, out_dir: Path) -> None:
    """Print the demo's curvature summary, CV estimate, PBRF verdict and where the logs and report are."""
    log_dir, report, val_acc = Path(result["log_dir"]), Path(result["report"]), result["val_acc"]
    lissa = summary.lissa
    print(
        "\n".join(
            [
                "",
                f"Digits MLP ({result['num_params']} parameters, L1 {model.regularizer.strength:g}) after {max_epochs} "
                f"epochs: val accuracy {val_acc:.3f}   ({result['seconds']:.0f} s)",
                f"Gauss-Newton curvature on {result['num_examples']} training examples "
                f"(damping λ = {CURVATURE_DAMPING:g}):",
                f"  trace Tr(G)          = {summary.trace:.4g} ± {summary.trace_stderr:.2g} (standard error)",
                f"  lambda_max           = {summary.lambda_max:.4g}",
                f"  critical batch size  = Tr(G)/lambda_max = {summary.critical_batch_size:.3g}",
                f"  LiSSA settings       : eta = {lissa.eta:.3g}, batch size = {lissa.batch_size}, "
                f"steps = {lissa.steps}",
                f"Approximate 5-fold CV loss: {result['cv']:.4g}" if result["cv"] is not None else "",
                f"PBRF check: {result['pbrf']}" if result["pbrf"] else "",
                "",
                f"TensorBoard logs: {log_dir}",
                f"HTML report:      {report}",
                f"Summary JSON:     {log_dir / 'curvature.json'}",
                "View them with:",
                f"  tensorboard --logdir {out_dir}    # then open http://localhost:6006",
                f"  python -m webbrowser file://{report.resolve()}",
            ]
        )
    )


def _save_curvature_figure(monitor: Any, path: Path) -> None:
    """Write the monitor's curvature history figure (the one logged as ``curvature/history``) as a PNG."""
    from lightning_influence.reporting.figures import close_figure, curvature_figure

    fig = curvature_figure(monitor.history)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    close_figure(fig)
