"""Boring-style LightningModules for callback tests: tiny float64 classifiers on seeded synthetic data.

Module-level classes only (``ddp_spawn`` pickles them by reference). Every piece of data comes from a dedicated
seeded generator, never from the global RNG; only the DataLoader's shuffling and dropout use the global RNG, as
in a real training run, which is what the "monitor does not change training" tests need.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.models import bn_dropout_net, tiny_mlp


class JoiningDDPSpawn(DDPStrategy):
    """``strategy="ddp_spawn"`` whose workers destroy the gloo process group at teardown.

    Lightning leaves the group alive; a worker that then exits can abort in gloo's thread teardown ("terminate called
    without an active exception", SIGABRT), a flake seen under load. ``examples/ddp_cpu.py`` does the same by hand.
    """

    def __init__(self) -> None:
        super().__init__(start_method="spawn")

    def teardown(self) -> None:
        super().teardown()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def synthetic_classification(n: int = 32, in_features: int = 4, classes: int = 3, seed: int = 0,
                             dtype: torch.dtype = torch.float64) -> TensorDataset:
    """``n`` Gaussian inputs with labels from a fixed random linear teacher (plus a little label noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g, dtype=dtype)
    w = torch.randn(in_features, classes, generator=g, dtype=dtype)
    logits = x @ w + 0.5 * torch.randn(n, classes, generator=g, dtype=dtype)
    return TensorDataset(x, logits.argmax(1))


class TinyClassifier(pl.LightningModule):
    """A tiny classifier (``kind="mlp"``: 43 parameters; ``"bn"``: BatchNorm + dropout, 63 parameters).

    Args:
        kind: ``"mlp"`` or ``"bn"``.
        n: Training examples.
        batch_size: Training batch size.
        lr: SGD learning rate (``0.0`` keeps the weights fixed, for parity tests across world sizes).
        shuffle: Shuffle the training data (uses the global RNG, like any run).
        n_val: Validation examples (disable the loop with ``Trainer(limit_val_batches=0)``).
        data_seed: Seed of the synthetic data.
    """

    def __init__(self, kind: str = "mlp", n: int = 32, batch_size: int = 8, lr: float = 0.1, shuffle: bool = True,
                 n_val: int = 8, data_seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = tiny_mlp(dtype=torch.float64) if kind == "mlp" else bn_dropout_net(dtype=torch.float64)
        self.train_set = synthetic_classification(n, seed=data_seed)
        self.val_set = synthetic_classification(n_val, seed=data_seed + 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)
