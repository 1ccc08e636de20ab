"""Choose the L1 strength of a logistic regression by approximate 10-fold CV, with one training run per strength.

The LightningModule declares its regulariser (``self.regularizer``) and adds the very same object's penalty to the
training loss through :func:`lightning_influence.cv.regularization_penalty`; :class:`ApproximateCV` reads it from the
module, so training and CV cannot disagree. Training (full-batch L-BFGS on the scikit-learn breast-cancer data) is
run once per strength; the callback replaces the 10 refits per strength that exact CV would need, and with
``--exact-check`` also runs them to show the difference.

Run::

    PYTHONPATH=. .venv/bin/python examples/tabular_l1_logistic_cv.py [--exact-check]

and open ``runs/l1_cv/lam_*/lightning_logs/version_0/influence/report.html`` (or TensorBoard on ``runs/l1_cv``,
scalars ``cv/approx_loss`` and ``cv/approx_fold_<k>``).
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_breast_cancer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.callbacks.approximate_cv import ApproximateCV
from lightning_influence.cv import regularization_penalty
from lightning_influence.regularizers import L1, mask_from_module
from lightning_influence.tasks import Classification


def dataset() -> TensorDataset:
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    return TensorDataset(torch.tensor(x), torch.tensor(y, dtype=torch.float64))


class L1Logistic(L.LightningModule):
    """Logistic regression with an L1 penalty on the weights (bias unpenalised)."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(30, 1), nn.Flatten(0)).double()
        nn.init.zeros_(self.net[0].weight)
        nn.init.zeros_(self.net[0].bias)
        self.task = Classification("binary")
        self.regularizer = L1(strength, mask=mask_from_module(self))
        self.automatic_optimization = False

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        # A proximal-gradient (ISTA) epoch on the full batch: exact zeros, converges to the lasso solution.
        opt = self.optimizers()
        out, y = self.task(self, batch)
        loss = self.task.loss.mean(out, y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        with torch.no_grad():  # prox of lr * lambda * ||w||_1 on the penalised coordinates
            lr = opt.param_groups[0]["lr"]
            w = self.net[0].weight
            w.copy_(torch.sign(w) * torch.clamp(w.abs() - lr * self.regularizer.strength, min=0.0))
        objective = loss + regularization_penalty(self, self.regularizer)
        self.log("train/objective", objective, prog_bar=True)
        return objective

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(), batch_size=1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.003, 0.006, 0.012, 0.025, 0.05])
    parser.add_argument("--epochs", type=int, default=3000)
    parser.add_argument("--exact-check", action="store_true")
    parser.add_argument("--root", default="runs/l1_cv")
    args = parser.parse_args()

    results = []
    for lam in args.strengths:
        cv = ApproximateCV(Classification("binary"), folds=10, seed=0, exact_check=args.exact_check,
                           center=True, exact_tol=1e-7)
        trainer = L.Trainer(
            max_epochs=args.epochs, logger=TensorBoardLogger(f"{args.root}/lam_{lam:g}"), callbacks=[cv],
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            log_every_n_steps=100,
        )
        trainer.fit(L1Logistic(lam))
        assert cv.last_result is not None
        row = {"lambda": lam, "approx": cv.last_result.estimate, "passes": cv.last_result.cost.passes}
        if cv.last_exact is not None:
            row.update({"exact": cv.last_exact.estimate, "exact_passes": cv.last_exact.cost.passes})
        results.append(row)
    for r in results:
        print("  ".join(f"{k}={v:.5g}" for k, v in r.items()))
    best = min(results, key=lambda r: r["approx"])
    print(f"selected lambda (approximate 10-fold CV): {best['lambda']:g}")


if __name__ == "__main__":
    main()
