"""What a k-fold CV run returns: per-fold refits and losses, the estimate, and its cost in gradient passes."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_influence.distributed import ReduceFn, reduce_packed
from lightning_influence.metrics import (
    CV_APPROX_LOSS,
    CV_APPROX_PASSES,
    CV_APPROX_SECONDS,
    CV_EXACT_LOSS,
    CV_EXACT_PASSES,
    CV_EXACT_SECONDS,
    cv_approx_fold,
    cv_exact_fold,
)

__all__ = ["FISHER_PRODUCT_COST", "FORWARD_COST", "HESSIAN_PRODUCT_COST", "CVResult", "FoldResult", "PassCount"]

#: Cost of one product / evaluation per example, in gradient-equivalents (see :mod:`lightning_influence.cv`).
FORWARD_COST = 1.0 / 3.0
FISHER_PRODUCT_COST = 4.0 / 3.0
HESSIAN_PRODUCT_COST = 2.0


@dataclass
class PassCount:
    """Work done, counted in examples per kind and converted to gradient-equivalent passes.

    Attributes:
        num_examples: Training-set size :math:`N` (the unit of one pass).
        gradient_examples: Examples pushed through forward+backward.
        forward_examples: Examples pushed through forward only.
        fisher_product_examples: Examples used in Fisher/GNH products (per product).
        hessian_product_examples: Examples used in Hessian products (per product).
    """

    num_examples: int = 0
    gradient_examples: float = 0.0
    forward_examples: float = 0.0
    fisher_product_examples: float = 0.0
    hessian_product_examples: float = 0.0

    @property
    def passes(self) -> float:
        """Gradient-equivalent passes over the training set."""
        work = (
            self.gradient_examples
            + FORWARD_COST * self.forward_examples
            + FISHER_PRODUCT_COST * self.fisher_product_examples
            + HESSIAN_PRODUCT_COST * self.hessian_product_examples
        )
        return work / max(self.num_examples, 1)

    def as_tensor(self) -> Tensor:
        """The four counters as a float64 tensor (for a sum-reduction over ranks)."""
        return torch.tensor(
            [self.gradient_examples, self.forward_examples, self.fisher_product_examples,
             self.hessian_product_examples],
            dtype=torch.float64,
        )

    def reduced(self, reduce_fn: ReduceFn | None, device: torch.device) -> PassCount:
        """Global counts (sum over ranks); identity on a single process."""
        if reduce_fn is None:
            return self
        (total,) = reduce_packed([self.as_tensor().to(device)], reduce_fn)
        return PassCount(self.num_examples, *[float(t) for t in total.cpu().tolist()])

    def to_dict(self) -> dict[str, float]:
        """Plain summary."""
        return {
            "passes": self.passes,
            "num_examples": self.num_examples,
            "gradient_examples": self.gradient_examples,
            "forward_examples": self.forward_examples,
            "fisher_product_examples": self.fisher_product_examples,
            "hessian_product_examples": self.hessian_product_examples,
        }


@dataclass
class FoldResult:
    r"""One fold's refit (approximate or exact) and its held-out loss.

    Attributes:
        fold: Fold index.
        held_out_loss: Mean loss of the refit on the fold's units (``nan`` for an empty fold).
        held_out_units: Number of counted units in the fold (all ranks).
        train_units: Units in the remaining data.
        theta: The refit's flat parameters (``(P,)``, on the model's device).
        step_norm: :math:`\|\theta_k - \hat\theta\|`.
        num_nonzero: Non-zero entries of ``theta``.
        certificate: Solver diagnostics (linear solve and prox, or the exact refit's iterations/residual).

    Example::

        >>> from lightning_influence.cv import approximate_cv, kfold_indices, make_fold_batches
        >>> from lightning_influence.tasks import Regression
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(12, 2, generator=g, dtype=torch.float64)
        >>> y = x @ torch.tensor([[1.0], [-1.0]], dtype=torch.float64) + 0.1 * torch.randn(12, 1, generator=g,
        ...                                                                               dtype=torch.float64)
        >>> idx = kfold_indices(12, 3)
        >>> res = approximate_cv(torch.nn.Linear(2, 1).double(), Regression(), make_fold_batches(list(zip(x, y)), idx))
        >>> fold = res.folds[0]
        >>> fold.fold, fold.held_out_units, fold.train_units, fold.certificate["solve"]["converged"]
        (0, 4.0, 8.0, True)
        >>> # linear model + squared loss: the AFIF step is the exact least-squares refit without fold 0
        >>> keep = [i for i in range(12) if i not in idx[0]]
        >>> xa = torch.cat([x, torch.ones(12, 1, dtype=torch.float64)], 1)  # flat order: weight, then bias
        >>> refit = torch.linalg.lstsq(xa[keep], y[keep]).solution.reshape(-1)
        >>> torch.allclose(fold.theta, refit), round(fold.held_out_loss, 6)
        (True, 0.010759)
    """

    fold: int
    held_out_loss: float
    held_out_units: float
    train_units: float
    theta: Tensor
    step_norm: float
    num_nonzero: int
    certificate: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain summary (without ``theta``)."""
        return {
            "fold": self.fold,
            "held_out_loss": self.held_out_loss,
            "held_out_units": self.held_out_units,
            "train_units": self.train_units,
            "step_norm": self.step_norm,
            "num_nonzero": self.num_nonzero,
            "certificate": self.certificate,
        }


@dataclass
class CVResult:
    """A k-fold CV estimate with its per-fold values and cost.

    Attributes:
        estimate: Mean over non-empty folds of the fold's mean held-out loss (the usual k-fold CV estimate).
        pooled: Held-out loss pooled over all units (sum of losses / number of units).
        folds: Per-fold results.
        method: ``"afif-fisher"``, ``"afif-gnh"``, ``"afif-hessian"`` or ``"exact-<solver>"``.
        cost: Work done (:class:`PassCount`).
        seconds: Wall-clock time.
        config: The settings used (plain values).

    Example::

        >>> from lightning_influence.cv import approximate_cv, kfold_indices, make_fold_batches
        >>> from lightning_influence.tasks import Regression
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(12, 2, generator=g, dtype=torch.float64)
        >>> y = x @ torch.tensor([[1.0], [-1.0]], dtype=torch.float64) + 0.1 * torch.randn(12, 1, generator=g,
        ...                                                                               dtype=torch.float64)
        >>> idx = kfold_indices(12, 3)
        >>> res = approximate_cv(torch.nn.Linear(2, 1).double(), Regression(), make_fold_batches(list(zip(x, y)), idx))
        >>> res.method, [round(v, 6) for v in res.fold_losses], round(res.estimate, 6)
        ('afif-fisher', [0.010759, 0.005472, 0.001786], 0.006006)
        >>> # ground truth: exact least-squares refits without each fold (loss 0.5 * squared error)
        >>> xa = torch.cat([x, torch.ones(12, 1, dtype=torch.float64)], 1)
        >>> exact = []
        >>> for held in idx:
        ...     keep = [i for i in range(12) if i not in held]
        ...     w = torch.linalg.lstsq(xa[keep], y[keep]).solution
        ...     exact.append(float(0.5 * ((xa[held] @ w - y[held]) ** 2).mean()))
        >>> abs(res.estimate - sum(exact) / 3) < 1e-10, round(res.cost.passes, 4), res.config["solver"]
        (True, 5.6667, 'dense')
    """

    estimate: float
    pooled: float
    folds: list[FoldResult]
    method: str
    cost: PassCount
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def fold_losses(self) -> list[float]:
        """Held-out loss per fold."""
        return [f.held_out_loss for f in self.folds]

    @property
    def thetas(self) -> list[Tensor]:
        """Refit parameters per fold."""
        return [f.theta for f in self.folds]

    @property
    def is_exact(self) -> bool:
        """Whether this is an exact-refit result (``method`` ``"exact-<solver>"``), not an approximation."""
        return self.method.startswith("exact")

    def metrics(self) -> dict[str, float]:
        """The logged scalars: ``cv/approx_*`` (or ``cv/exact_*`` for exact refits) and one per fold.

        Returns:
            ``name -> value`` (names from :mod:`lightning_influence.metrics`).

        Example::

            >>> res = CVResult(estimate=0.5, pooled=0.5, folds=[], method="afif-fisher", cost=PassCount(10, 20.0),
            ...                seconds=1.0)
            >>> res.metrics()
            {'cv/approx_loss': 0.5, 'cv/approx_passes': 2.0, 'cv/approx_seconds': 1.0}
        """
        if self.is_exact:
            out = {CV_EXACT_LOSS: self.estimate, CV_EXACT_PASSES: self.cost.passes, CV_EXACT_SECONDS: self.seconds}
            out.update({cv_exact_fold(f.fold): f.held_out_loss for f in self.folds})
        else:
            out = {CV_APPROX_LOSS: self.estimate, CV_APPROX_PASSES: self.cost.passes,
                   CV_APPROX_SECONDS: self.seconds}
            out.update({cv_approx_fold(f.fold): f.held_out_loss for f in self.folds})
        return {k: float(v) for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary for logs and reports."""
        return {
            "estimate": self.estimate,
            "pooled": self.pooled,
            "method": self.method,
            "fold_losses": self.fold_losses,
            "folds": [f.to_dict() for f in self.folds],
            "cost": self.cost.to_dict(),
            "seconds": self.seconds,
            "config": self.config,
        }


def _finish(
    fold_results: list[FoldResult], method: str, counter: PassCount, reduce_fn: ReduceFn | None,
    device: torch.device, start: float, config: dict[str, Any],
) -> CVResult:
    nonempty = [f for f in fold_results if f.held_out_units > 0]
    estimate = float(sum(f.held_out_loss for f in nonempty) / len(nonempty)) if nonempty else math.nan
    units = sum(f.held_out_units for f in nonempty)
    pooled = float(sum(f.held_out_loss * f.held_out_units for f in nonempty) / units) if units > 0 else math.nan
    cost = counter.reduced(reduce_fn, device)
    return CVResult(estimate=estimate, pooled=pooled, folds=fold_results, method=method, cost=cost,
                    seconds=time.perf_counter() - start, config=config)
