r"""End-to-end demo: train a small MLP on sklearn's digits and measure its Gauss-Newton curvature.

This is what ``lightning-influence demo`` (and ``make demo``) runs. It uses a plain
:class:`lightning.LightningModule` and :class:`lightning.Trainer`, then, once training has finished, calls the
Lightning-free numerics layers directly on the trained network:

1. a seeded sample of 512 training examples is cut into batches (:func:`~lightning_influence.operators.make_batches`),
2. a GNH operator :math:`G = \frac{1}{N}\sum_i J_i^\top S_i J_i` is built over them
   (:class:`~lightning_influence.operators.GNHOperator`),
3. :func:`~lightning_influence.spectrum.estimate_spectrum` returns the Hutchinson trace with its standard error,
   :math:`\lambda_{\max}` by Lanczos, the critical batch size :math:`\operatorname{Tr}(G)/\lambda_{\max}` and
   the LiSSA settings :math:`(\eta, |B|, T)` derived from them.

The summary is printed, logged to TensorBoard under ``curvature/*`` and ``lissa/*``, and written to
``curvature.json`` in the run's log directory.

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

__all__ = ["DigitsClassifier", "load_digits_datasets", "run_demo"]

#: Number of training examples the curvature summary is computed on.
CURVATURE_SAMPLE = 512
#: Batch size of the fixed batches the GNH operator averages over.
CURVATURE_BATCH_SIZE = 128
#: Damping λ used for the LiSSA recommendation (η = 1/(λ_max + λ), T = 2/(λη)).
CURVATURE_DAMPING = 1e-3


class DigitsClassifier(L.LightningModule):
    """A 64-32-10 tanh MLP trained with softmax cross-entropy and SGD with momentum.

    Args:
        in_features: Input dimension (64 pixels for digits).
        hidden: Width of the hidden layer.
        num_classes: Number of classes.
        lr: SGD learning rate.
    """

    def __init__(self, in_features: int = 64, hidden: int = 32, num_classes: int = 10, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits for a batch of flattened images."""
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
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


def run_demo(out_dir: str | Path, max_epochs: int = 20, seed: int = 0) -> dict[str, Any]:
    """Train the digits MLP with Lightning, then print and return its curvature summary.

    Args:
        out_dir: Directory for the TensorBoard logs (``<out_dir>/lightning_logs/version_<n>``).
        max_epochs: Number of training epochs.
        seed: Seed of the split, the initialisation, the data order and the curvature sample/probes.

    Returns:
        The :meth:`SpectrumSummary.to_dict` of the GNH on 512 training examples (``trace``, ``trace_stderr``,
        ``lambda_max``, ``critical_batch_size``, ``lissa`` settings, ...) plus ``val_acc``, ``num_params``,
        ``num_examples`` and ``log_dir``.

    Raises:
        ValueError: If ``max_epochs`` is smaller than 1.
        ImportError: If scikit-learn is not installed.
    """
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, got {max_epochs}.")
    # The numerics layers are imported here so that `lightning-influence --help` stays fast.
    from lightning_influence.operators import GNHOperator, make_batches
    from lightning_influence.spectrum import estimate_spectrum
    from lightning_influence.tasks import Classification

    out_dir = Path(out_dir)
    train_set, val_set = load_digits_datasets(seed)
    L.seed_everything(seed, workers=True, verbose=False)
    model = DigitsClassifier()
    loader_gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=loader_gen)
    val_loader = DataLoader(val_set, batch_size=256)

    logger = TensorBoardLogger(save_dir=str(out_dir))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stdout.isatty(),  # progress bars only on a terminal, not in logs/CI
        log_every_n_steps=5,
    )
    with warnings.catch_warnings():
        # In-memory tensors need no worker processes; Lightning warns about num_workers=0 on every loader.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader)
    val_acc = float(trainer.callback_metrics.get("val/acc", torch.tensor(float("nan"))))

    # Curvature of the trained network on a seeded sample of training examples (global RNG untouched).
    net = model.net.eval()
    sample_gen = torch.Generator().manual_seed(seed)
    n_sample = min(CURVATURE_SAMPLE, len(train_set))
    indices = torch.randperm(len(train_set), generator=sample_gen)[:n_sample].tolist()
    batches = make_batches(train_set, indices, batch_size=CURVATURE_BATCH_SIZE)
    op = GNHOperator(net, Classification(), batches)
    summary = estimate_spectrum(op, damping=CURVATURE_DAMPING, seed=seed, dataset_size=len(train_set))

    result: dict[str, Any] = dict(summary.to_dict())
    log_dir = Path(logger.log_dir)
    result.update(
        val_acc=val_acc,
        num_params=sum(p.numel() for p in net.parameters()),
        num_examples=n_sample,
        log_dir=str(log_dir),
    )
    logger.log_metrics(summary.metrics(), step=trainer.global_step)
    logger.finalize("success")
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "curvature.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    lissa = summary.lissa
    print(
        "\n".join(
            [
                "",
                f"Digits MLP ({result['num_params']} parameters) after {max_epochs} epochs: val accuracy {val_acc:.3f}",
                f"Gauss-Newton curvature on {n_sample} training examples (damping λ = {CURVATURE_DAMPING:g}):",
                f"  trace Tr(G)          = {summary.trace:.4g} ± {summary.trace_stderr:.2g} (standard error)",
                f"  lambda_max           = {summary.lambda_max:.4g}",
                f"  critical batch size  = Tr(G)/lambda_max = {summary.critical_batch_size:.3g}",
                f"  LiSSA settings       : eta = {lissa.eta:.3g}, batch size = {lissa.batch_size}, "
                f"steps = {lissa.steps}",
                f"TensorBoard logs: {log_dir}   (tensorboard --logdir {out_dir})",
                f"Summary JSON:     {log_dir / 'curvature.json'}",
            ]
        )
    )
    return result
