r"""Approximate k-fold cross-validation through the (approximate) Fisher, with a proximal step (AFIF).

Given parameters :math:`\hat\theta` trained on :math:`N` units (examples; tokens for language models) with the
objective

.. math:: L(\theta) = \frac{1}{N} \sum_{i=1}^{N} \ell_i(\theta) + \lambda\pi(\theta)

(``regularizer`` holds :math:`\lambda\pi`; the same object must be added to the training loss, see
:func:`regularization_penalty`), the refit without fold :math:`k` minimises the **fold objective**

.. math::

    L_{-k}(\theta) = f_{-k}(\theta) + \lambda\pi(\theta), \qquad
    f_{-k}(\theta) = c_k \sum_{i \notin k} \ell_i(\theta), \qquad
    c_k = \begin{cases} 1/(N - n_k) & \texttt{fold\_objective="mean"} \text{ (default)} \\
                        1/N & \texttt{fold\_objective="weighted"} \text{ (the paper's } w = 1 - 1_k\text{)}
          \end{cases}

"mean" is ordinary k-fold CV: the same training recipe (mean loss + the same :math:`\lambda\pi`) re-run on the
remaining data, which is also what ``sklearn``'s ``LassoCV`` refits. "weighted" is the paper's weighted objective
:math:`\frac1N \sum_i w_i \ell_i + \lambda\pi` (eq. 1), equivalent to "mean" with the penalty scaled by
:math:`N/(N-n_k)`. Replacing :math:`f_{-k}` by its quadratic model at :math:`\hat\theta` with curvature
:math:`A_k` gives the AFIF update (paper, eq. 9, adapted to leave-fold-out):

.. math::

    \tilde\theta_k = \operatorname{prox}^{A_k}_{\lambda\pi}\big(\hat\theta - A_k^{-1} \nabla f_{-k}(\hat\theta)\big),
    \qquad
    \operatorname{prox}^{D}_{\lambda\pi}(v) = \arg\min_\theta \tfrac12 (\theta - v)^\top D (\theta - v)
    + \lambda\pi(\theta),

with :math:`\nabla f_{-k}(\hat\theta) = c_k \sum_{i\notin k} \nabla\ell_i(\hat\theta)` the smooth-part gradient of
the remaining data (not zero at :math:`\hat\theta` when :math:`\pi` is non-smooth) and, by default, the
**downdated** Fisher

.. math:: A_k = c_k \sum_{i \notin k} F_i = c_k \big(N \bar F - n_k \bar F_k\big) \quad (\texttt{downdate=True}),

computed as the sum of the other folds' Fisher sums (no subtraction, so no cancellation). The paper's choice,
one full-data :math:`A_k = \bar F = \frac1N\sum_i F_i` for every fold (``downdate=False``), over-counts the
held-out fold's curvature: for "mean" its relative curvature error is :math:`O(n_k/N)` per fold plus the
difference between :math:`\bar F_k` and :math:`\bar F`; for "weighted" :math:`\bar F` is
:math:`N/(N - n_k)` times too large. Both bias :math:`\tilde\theta_k` towards :math:`\hat\theta` and the CV
estimate downwards (see ``benchmarks/repro_afif_fig1.py`` for measured numbers).

Exactness: for a model linear in :math:`\theta` with the Gaussian (squared) loss the quadratic model is exact and
:math:`\tilde\theta_k` is the exact fold refit for any :math:`\hat\theta` (tests check it to 1e-8 against
scikit-learn's Lasso / ElasticNet refits). For an empty fold :math:`\tilde\theta = \hat\theta` whenever
:math:`\hat\theta` minimises :math:`L` (its optimality condition is the prox fixed point).

Curvature choices (``curvature=``): ``"fisher"`` (:class:`~lightning_influence.operators.ExpectedFisherOperator`,
the AFIF default), ``"gnh"`` (:class:`~lightning_influence.operators.GNHOperator`, identical for these losses)
and ``"hessian"`` (:class:`~lightning_influence.operators.HessianOperator`, the Hessian-based approximate CV of
Wilson et al. 2020 / the paper's comparison; may be indefinite away from a minimum: add ``damping``).

Linear solves and prox: ``solver="dense"`` forms each :math:`A_k` (``P`` products per fold, tiny models) and
uses :func:`~lightning_influence.solvers.dense_solve` (Cholesky) and a dense-metric prox (FISTA + exact
active-set polish); ``solver="cg"`` stays matrix-free: :func:`~lightning_influence.solvers.conjugate_gradient`
on the complement's operator and a matvec-metric prox (each FISTA step is one operator product).
``"auto"`` picks dense up to ``dense_max_params`` parameters.

Cost accounting: every result carries :class:`PassCount`, the number of *gradient-equivalent passes* over the
training set: a gradient over :math:`n` examples counts :math:`n/N`, a forward-only evaluation
:math:`n/(3N)`, a Fisher/GNH product :math:`\tfrac43 n/N` (one forward with tangents + one backward) and a
Hessian product :math:`2n/N` (forward-over-reverse).

Everything here is plain PyTorch (no Lightning). The trained weights are never modified: every evaluation at a
new :math:`\theta` goes through ``torch.func.functional_call`` with the flat vector unflattened.

Example::

    >>> import torch
    >>> from lightning_influence.tasks import Regression
    >>> from lightning_influence.regularizers import L1
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    >>> y = x @ torch.tensor([[1.0], [0.0], [-2.0]], dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1).double()
    >>> folds = make_fold_batches(list(zip(x, y)), kfold_indices(40, 4, seed=0), batch_size=16)
    >>> res = approximate_cv(model, Regression(), folds, L1(0.1))
    >>> len(res.fold_losses), res.estimate > 0
    (4, True)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_influence.exceptions import ConfigurationError, NonFiniteError
from lightning_influence.losses import BinaryLogistic, GaussianNLL, LossFamily, SoftmaxCrossEntropy
from lightning_influence.operators import (
    CurvatureOperator,
    ExpectedFisherOperator,
    GNHOperator,
    HessianOperator,
    ReduceFn,
    curvature_mode,
    loss_gradient,
    make_batches,
    prepare_batch,
)
from lightning_influence.params import ParamTree, flatten, make_generator, trainable_parameters, unflatten
from lightning_influence.regularizers import NoRegularizer, Regularizer
from lightning_influence.solvers import conjugate_gradient, dense_solve
from lightning_influence.tasks import Task

__all__ = [
    "CVResult",
    "FoldResult",
    "PassCount",
    "approximate_cv",
    "check_curvature_for_loss",
    "exact_cv",
    "fit_regularized",
    "kfold_indices",
    "make_fold_batches",
    "regularization_penalty",
]

Curvature = Literal["fisher", "gnh", "hessian"]
FoldObjective = Literal["mean", "weighted"]
Batches = Sequence[Any]

#: Cost of one product / evaluation per example, in gradient-equivalents (see module docstring).
FORWARD_COST = 1.0 / 3.0
FISHER_PRODUCT_COST = 4.0 / 3.0
HESSIAN_PRODUCT_COST = 2.0

_EXPONENTIAL_FAMILIES: tuple[type[LossFamily], ...] = (SoftmaxCrossEntropy, BinaryLogistic, GaussianNLL)
_OPERATORS: dict[str, type[CurvatureOperator]] = {
    "fisher": ExpectedFisherOperator,
    "gnh": GNHOperator,
    "hessian": HessianOperator,
}


# ------------------------------------------------------------------------------------------------ folds
def kfold_indices(num_examples: int, folds: int, seed: int = 0, shuffle: bool = True) -> list[list[int]]:
    """Seeded k-fold split of ``range(num_examples)`` into ``folds`` disjoint, near-equal folds.

    The permutation comes from a private generator (:func:`~lightning_influence.params.make_generator`), so the
    global RNG is untouched and every process computes the same split. Fold sizes differ by at most one; each
    fold's indices are sorted.

    Args:
        num_examples: Size of the training set.
        folds: Number of folds ``K >= 2``.
        seed: Seed of the permutation.
        shuffle: Permute before splitting (``False``: contiguous blocks).

    Returns:
        ``K`` lists of indices.

    Raises:
        ConfigurationError: If ``folds < 2`` or ``folds > num_examples``.

    Example::

        >>> [len(f) for f in kfold_indices(10, 3)]
        [4, 3, 3]
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigurationError(f"folds must be an integer >= 2, got {folds!r}.")
    if folds > num_examples:
        raise ConfigurationError(
            f"folds={folds} is larger than the number of training examples ({num_examples}); use at most "
            f"{num_examples} folds (folds={num_examples} is leave-one-out)."
        )
    order = torch.randperm(num_examples, generator=make_generator(seed)) if shuffle else torch.arange(num_examples)
    return [sorted(int(i) for i in chunk) for chunk in torch.tensor_split(order, folds)]


def make_fold_batches(
    dataset: Any,
    fold_indices: Sequence[Sequence[int]],
    batch_size: int = 256,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> list[list[Any]]:
    """Collate each fold's examples into batches (the data format of :func:`approximate_cv`).

    Args:
        dataset: Indexable dataset (one example per index).
        fold_indices: Indices per fold (e.g. :func:`kfold_indices`, or this rank's slice of each fold).
        batch_size: Examples per batch.
        collate_fn: Collation function (default ``torch.utils.data.default_collate``).

    Returns:
        One list of batches per fold (an empty fold, or an empty shard, gives an empty list).

    Example::

        >>> ds = list(zip(torch.arange(5.0), torch.arange(5.0)))
        >>> [len(b) for b in make_fold_batches(ds, [[0, 1, 2], [3, 4]], batch_size=2)]
        [2, 1]
    """
    return [make_batches(dataset, list(idx), batch_size, collate_fn) for idx in fold_indices]


# ------------------------------------------------------------------------------------------------ checks
def check_curvature_for_loss(task: Task, curvature: str) -> None:
    """Check that the requested curvature is available and meaningful for the task's loss.

    The Fisher (and the GNH standing in for it) is the AFIF curvature only for negative log-likelihoods of an
    exponential family in its natural parameter (the model output). Custom :class:`LossFamily` subclasses can
    declare ``exponential_family = True``.

    Args:
        task: The task whose ``loss`` is checked.
        curvature: ``"fisher"``, ``"gnh"`` or ``"hessian"``.

    Raises:
        ConfigurationError: For an unknown curvature, or ``"fisher"``/``"gnh"`` with a loss that is not an
            exponential-family NLL (use ``curvature="hessian"``).

    Example::

        >>> from lightning_influence.tasks import Classification
        >>> check_curvature_for_loss(Classification(), "fisher")
    """
    if curvature not in _OPERATORS:
        raise ConfigurationError(f"curvature must be one of {sorted(_OPERATORS)}, got {curvature!r}.")
    if curvature == "hessian":
        return
    loss = task.loss
    declared = getattr(loss, "exponential_family", None)
    is_family = bool(declared) if declared is not None else isinstance(loss, _EXPONENTIAL_FAMILIES)
    if not is_family:
        raise ConfigurationError(
            f"curvature={curvature!r} needs a loss that is the negative log-likelihood of an exponential family in "
            f"the model output (cross-entropy, binary logistic, Gaussian/squared error), but the task's loss is "
            f"{type(loss).__name__}, for which the Fisher is not the curvature of the loss. Use "
            "curvature='hessian' (Hessian-based approximate CV), or set exponential_family = True on the loss "
            "class if it is one."
        )


def _check_fold_objective(fold_objective: str) -> None:
    if fold_objective not in ("mean", "weighted"):
        raise ConfigurationError(
            f"fold_objective must be 'mean' (refit the mean loss on the remaining data) or 'weighted' (the paper's "
            f"(1/N) sum_i w_i l_i), got {fold_objective!r}."
        )


def _check_regularizer(regularizer: Regularizer | None, num_params: int) -> Regularizer:
    if regularizer is None:
        return NoRegularizer()
    if not isinstance(regularizer, Regularizer):
        raise ConfigurationError(
            f"regularizer must be a lightning_influence.regularizers.Regularizer (L1, ElasticNet, GroupLasso, "
            f"NoRegularizer) or None, got {type(regularizer).__name__}."
        )
    regularizer._check_size(num_params)
    return regularizer


def regularization_penalty(model: nn.Module, regularizer: Regularizer) -> Tensor:
    r"""The penalty :math:`\lambda\pi(\theta)` of the model's live trainable parameters, for the training loss.

    Use it in ``training_step`` so that training and (approximate) CV use the same regulariser object::

        loss = task.loss.mean(*task(self, batch)) + regularization_penalty(self, self.regularizer)

    The flat order is that of :func:`~lightning_influence.params.trainable_parameters` (the order the CV code
    and :func:`~lightning_influence.regularizers.mask_from_named_parameters` use). Unlike
    ``flatten(trainable_parameters(model))``, which is detached, the result is differentiable.

    Args:
        model: The module being trained.
        regularizer: The penalty.

    Returns:
        A differentiable 0-d tensor.

    Raises:
        ConfigurationError: If the model has no trainable parameter.

    Example::

        >>> from lightning_influence.regularizers import L1
        >>> m = torch.nn.Linear(2, 1)
        >>> regularization_penalty(m, L1(1.0)).requires_grad
        True
    """
    live = [p.reshape(-1) for _, p in model.named_parameters() if p.requires_grad]
    if not live:
        raise ConfigurationError(f"{type(model).__name__} has no trainable parameters to penalise.")
    return regularizer.penalty(torch.cat(live))


# ------------------------------------------------------------------------------------------------ results
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
        total = reduce_fn(self.as_tensor().to(device)).cpu().tolist()
        return PassCount(self.num_examples, *[float(t) for t in total])

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


# ------------------------------------------------------------------------------------------------ helpers
class _Evaluator:
    """Loss sums / gradients at arbitrary flat parameters via ``functional_call``, with pass counting."""

    def __init__(self, model: nn.Module, task: Task, reduce_fn: ReduceFn | None, counter: PassCount) -> None:
        self.model, self.task, self.reduce_fn, self.counter = model, task, reduce_fn, counter
        self.params: ParamTree = trainable_parameters(model)
        first = next(iter(self.params.values()))
        self.device, self.dtype = first.device, first.dtype

    def _reduce(self, t: Tensor) -> Tensor:
        return self.reduce_fn(t) if self.reduce_fn is not None else t

    def _prepared(self, batches: Batches) -> list[Any]:
        return [prepare_batch(b, self.device) for b in batches]

    def loss_sums(self, batches_per_fold: Sequence[Batches], theta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(loss sum, unit count) per fold at ``theta`` (default: the trained weights); one reduction."""
        tree = self.params if theta is None else unflatten(theta, self.params)
        k = len(batches_per_fold)
        local = torch.zeros(2 * k, dtype=self.dtype, device=self.device)
        with curvature_mode(self.model), torch.no_grad():
            for j, batches in enumerate(batches_per_fold):
                for batch in self._prepared(batches):
                    inputs, targets = self.task.split(batch)
                    out, y = self.task.targets(self.task.outputs(self.task.forward(self.model, tree, inputs)), targets)
                    self.task.loss.validate(out, y)
                    s, c = self.task.loss.sum_and_count(out, y)
                    local[j] += s.to(self.dtype)
                    local[k + j] += c.to(self.dtype)
                    self.counter.forward_examples += self.task.batch_size(batch)
        total = self._reduce(local)
        return total[:k], total[k:]

    def value_and_grad(self, batches: Batches, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss sum, gradient sum, unit count) over ``batches`` at ``theta``; one reduction."""
        p = theta.numel()
        local = torch.zeros(p + 2, dtype=self.dtype, device=self.device)
        with curvature_mode(self.model):
            leaf = theta.detach().clone().requires_grad_(True)
            tree = unflatten(leaf, self.params)
            for batch in self._prepared(batches):
                inputs, targets = self.task.split(batch)
                out, y = self.task.targets(self.task.outputs(self.task.forward(self.model, tree, inputs)), targets)
                s, c = self.task.loss.sum_and_count(out, y)
                (g,) = torch.autograd.grad(s, leaf, allow_unused=True)
                if g is not None:
                    local[:p] += g.detach()
                local[p] += s.detach().to(self.dtype)
                local[p + 1] += c.detach().to(self.dtype)
                self.counter.gradient_examples += self.task.batch_size(batch)
        total = self._reduce(local)
        return total[p], total[:p], total[p + 1]


    def dense_hessian(self, batches: Batches, theta: Tensor) -> Tensor:
        """Dense Hessian of the loss SUM over ``batches`` at ``theta`` (tiny models); one reduction."""
        p = theta.numel()
        local = torch.zeros(p, p, dtype=self.dtype, device=self.device)
        with curvature_mode(self.model):
            for batch in self._prepared(batches):
                inputs, targets = self.task.split(batch)

                def loss_sum(t: Tensor, inputs: Any = inputs, targets: Tensor = targets) -> Tensor:
                    tree = unflatten(t, self.params)
                    out, y = self.task.targets(self.task.outputs(self.task.forward(self.model, tree, inputs)), targets)
                    return self.task.loss.sum_and_count(out, y)[0]

                local += torch.func.jacrev(torch.func.grad(loss_sum))(theta.detach()).detach()
                self.counter.hessian_product_examples += p * self.task.batch_size(batch)
        return self._reduce(local.reshape(-1)).reshape(p, p)


class _ScaledOperator:
    """``scale * op`` (+ damping) as a LinearOperatorLike for :func:`conjugate_gradient` and the prox."""

    def __init__(self, op: CurvatureOperator, scale: float, damping: float, counter: PassCount, cost_attr: str,
                 examples: float) -> None:
        self.op, self.scale, self.damping = op, scale, damping
        self.counter, self.cost_attr, self.examples = counter, cost_attr, examples
        self.num_params = op.num_params

    def matvec(self, v: Tensor) -> Tensor:
        setattr(self.counter, self.cost_attr, getattr(self.counter, self.cost_attr) + self.examples)
        return self.scale * self.op.matvec(v) + self.damping * v

    def __call__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def quadratic_form(self, v: Tensor) -> Tensor:
        return torch.dot(v, self.matvec(v))


def _local_examples(task: Task, batches: Batches) -> int:
    return sum(task.batch_size(b) for b in batches)


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


def _validate_common(
    model: nn.Module, folds: Sequence[Batches], regularizer: Regularizer | None, fold_objective: str,
) -> tuple[ParamTree, Regularizer]:
    _check_fold_objective(fold_objective)
    if isinstance(folds, (str, bytes)) or not isinstance(folds, Sequence) or len(folds) < 1:
        raise ConfigurationError("folds must be a non-empty list with one list of batches per fold.")
    params = trainable_parameters(model)
    reg = _check_regularizer(regularizer, sum(t.numel() for t in params.values()))
    return params, reg


# ------------------------------------------------------------------------------------------------ AFIF CV
def approximate_cv(
    model: nn.Module,
    task: Task,
    folds: Sequence[Batches],
    regularizer: Regularizer | None = None,
    *,
    curvature: Curvature = "fisher",
    downdate: bool = True,
    fold_objective: FoldObjective = "mean",
    solver: Literal["auto", "dense", "cg"] = "auto",
    damping: float = 0.0,
    cg_rtol: float = 1e-10,
    cg_max_iter: int | None = None,
    prox_tol: float = 1e-12,
    prox_max_iter: int = 10_000,
    dense_max_params: int = 2000,
    center: bool = False,
    reduce_fn: ReduceFn | None = None,
    num_examples: int | None = None,
) -> CVResult:
    r"""AFIF approximate k-fold CV: one curvature solve and one metric prox per fold, no refits.

    For each fold :math:`k`,
    :math:`\tilde\theta_k = \operatorname{prox}^{A_k}_{\lambda\pi}(\hat\theta - A_k^{-1}\nabla f_{-k}(\hat\theta))`
    (module docstring for :math:`A_k`, :math:`f_{-k}` and the two fold objectives), then the held-out loss of
    :math:`\tilde\theta_k` on fold :math:`k`. The trained weights (the model's current parameters,
    :math:`\hat\theta`) are not modified.

    Args:
        model: The trained model (:math:`\hat\theta` = its trainable parameters).
        task: Batch -> ``(outputs, targets)`` and the loss family.
        folds: One list of collated batches per fold (under data parallelism: this rank's shard of each fold;
            every rank must pass the same number of folds). Build it with :func:`make_fold_batches`.
        regularizer: The penalty :math:`\lambda\pi` used in training (``None``: no penalty).
        curvature: ``"fisher"`` (default), ``"gnh"`` or ``"hessian"`` (Hessian-based approximate CV).
        downdate: Use the fold-downdated curvature :math:`A_k` (default) or the paper's single full-data one.
        fold_objective: ``"mean"`` (default) or ``"weighted"``.
        solver: ``"dense"``, ``"cg"`` or ``"auto"`` (dense up to ``dense_max_params`` parameters).
        damping: :math:`\delta \ge 0` added as :math:`\delta I` to :math:`A_k` (for singular curvature; the
            quadratic model is then no longer exact for linear models).
        cg_rtol: CG relative residual tolerance.
        cg_max_iter: CG iteration cap (default ``min(P, 1000)``).
        prox_tol: Relative residual tolerance of the metric prox.
        prox_max_iter: FISTA iteration cap of the prox.
        dense_max_params: Largest ``P`` for which ``"auto"`` forms dense matrices.
        center: For weights that are not (yet) a minimiser, e.g. mid-training: subtract the step the full data
            would still take, :math:`\tilde\theta_k \leftarrow \tilde\theta_k + \hat\theta - T(\hat\theta)`
            with :math:`T` the same update on all the data, so only the effect of removing the fold remains. At a
            minimiser :math:`T(\hat\theta) = \hat\theta` and this changes nothing (one extra solve and prox).
        reduce_fn: Sums a flat tensor over ranks (``None`` on one process).
        num_examples: Global training-set size for the pass count (default: counted, one extra reduction).

    Returns:
        The estimate, per-fold losses/refits/certificates, and the cost in gradient-equivalent passes.

    Raises:
        ConfigurationError: Bad ``curvature``/``solver``/``fold_objective``/``damping``, a Fisher requested for a
            non-exponential-family loss, a regulariser that does not fit the parameters, an indefinite
            Hessian (add ``damping``), or a dataset with no counted units.
        NonFiniteError: If an update is not finite.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> model = torch.nn.Linear(2, 1).double()
        >>> g = torch.Generator().manual_seed(0)
        >>> data = [(torch.randn(2, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64))
        ...         for _ in range(12)]
        >>> folds = make_fold_batches(data, kfold_indices(12, 3))
        >>> approximate_cv(model, Regression(), folds).method
        'afif-fisher'
    """
    start = time.perf_counter()
    params, reg = _validate_common(model, folds, regularizer, fold_objective)
    check_curvature_for_loss(task, curvature)
    if solver not in ("auto", "dense", "cg"):
        raise ConfigurationError(f"solver must be 'auto', 'dense' or 'cg', got {solver!r}.")
    if damping < 0:
        raise ConfigurationError(f"damping must be >= 0, got {damping}.")
    theta_hat = flatten(params).detach().clone()
    p = theta_hat.numel()
    use_dense = solver == "dense" or (solver == "auto" and p <= dense_max_params)
    k = len(folds)
    counter = PassCount()
    ev = _Evaluator(model, task, reduce_fn, counter)
    op_cls = _OPERATORS[curvature]
    cost_attr = "hessian_product_examples" if curvature == "hessian" else "fisher_product_examples"

    # Unit counts per fold (and the losses at theta_hat): one forward pass, one reduction.
    _, units_t = ev.loss_sums(folds)
    units = [float(u) for u in units_t]
    total_units = sum(units)
    if total_units <= 0:
        raise ConfigurationError("the folds contain no counted units (empty data, or every target ignored).")
    local_examples = [_local_examples(task, b) for b in folds]
    if num_examples is None:
        ex = torch.tensor([float(sum(local_examples))], dtype=torch.float64, device=theta_hat.device)
        num_examples = round(float(reduce_fn(ex)[0])) if reduce_fn is not None else int(ex[0])
    counter.num_examples = num_examples

    # Gradient sums per fold at theta_hat through the foundation's loss_gradient (mean * count).
    grad_sums: list[Tensor] = []
    for j in range(k):
        g = loss_gradient(model, task, folds[j], reduce_fn=reduce_fn)
        counter.gradient_examples += local_examples[j]
        grad_sums.append(g.to(theta_hat) * units[j])

    def scale_for(j: int) -> float:
        remaining = total_units - units[j]
        return 1.0 / remaining if fold_objective == "mean" else 1.0 / total_units

    # Curvature sums per fold (dense) or complement operators (matrix-free).
    dense_sums: list[Tensor] = []
    if use_dense:
        for j in range(k):
            if units[j] > 0:
                op = op_cls(model, task, folds[j], reduce_fn=reduce_fn)
                dense_sums.append(op.dense().to(theta_hat) * units[j])
                setattr(counter, cost_attr, getattr(counter, cost_attr) + p * local_examples[j])
            else:
                dense_sums.append(torch.zeros(p, p, dtype=theta_hat.dtype, device=theta_hat.device))
        full_mean = sum(dense_sums, torch.zeros(p, p, dtype=theta_hat.dtype, device=theta_hat.device)) / total_units

    def update(j: int | None) -> tuple[Tensor, dict[str, Any]]:
        """AFIF step without fold ``j`` (``None``: on all the data, for ``center``)."""
        c = scale_for(j) if j is not None else 1.0 / total_units
        others = [i for i in range(k) if i != j]
        b = c * sum((grad_sums[i] for i in others), torch.zeros_like(theta_hat))
        cert: dict[str, Any] = {}
        if use_dense:
            if downdate:
                a = c * sum((dense_sums[i] for i in others), torch.zeros(p, p, dtype=theta_hat.dtype,
                                                                         device=theta_hat.device))
            else:
                a = full_mean.clone()
            if damping > 0:
                a = a + damping * torch.eye(p, dtype=a.dtype, device=a.device)
            a = 0.5 * (a + a.T)
            sol = dense_solve(a, b)
            metric: Any = a
        else:
            used = others if downdate else list(range(k))
            batches = [bb for i in used for bb in folds[i]]
            n_ex = float(sum(local_examples[i] for i in used))
            op = op_cls(model, task, batches, reduce_fn=reduce_fn)
            scale = c * sum(units[i] for i in used) if downdate else 1.0
            lin = _ScaledOperator(op, scale, damping, counter, cost_attr, n_ex)
            sol = conjugate_gradient(lin, b, rtol=cg_rtol, max_iter=cg_max_iter)
            metric = lin
        cert["solve"] = {k_: v for k_, v in sol.to_dict().items() if k_ != "history"}
        v = theta_hat - sol.x.to(theta_hat)
        prox = reg.prox(v, metric, x0=theta_hat, tol=prox_tol, max_iter=prox_max_iter)
        cert["prox"] = prox.to_dict()
        theta = prox.x.to(theta_hat)
        if not bool(torch.isfinite(theta).all()):
            raise NonFiniteError(
                f"approximate refit (fold {j}) is not finite; the curvature is probably singular: add damping."
            )
        return theta, cert

    shift = torch.zeros_like(theta_hat)
    if center:
        full_step, _ = update(None)
        shift = theta_hat - full_step
    results: list[FoldResult] = []
    thetas: list[Tensor] = []
    certs: list[dict[str, Any]] = []
    for j in range(k):
        theta, cert = update(j)
        thetas.append(theta + shift)
        certs.append(cert)

    # Held-out losses: fold j at theta_j (one forward pass over fold j each).
    for j in range(k):
        sums, cnt = ev.loss_sums([folds[j]], thetas[j])
        n = float(cnt[0])
        results.append(FoldResult(
            fold=j,
            held_out_loss=float(sums[0] / cnt[0]) if n > 0 else math.nan,
            held_out_units=n,
            train_units=total_units - units[j],
            theta=thetas[j],
            step_norm=float((thetas[j] - theta_hat).norm()),
            num_nonzero=int(torch.count_nonzero(thetas[j])),
            certificate=certs[j],
        ))
    config = {
        "curvature": curvature, "downdate": downdate, "fold_objective": fold_objective,
        "solver": "dense" if use_dense else "cg", "damping": damping, "cg_rtol": cg_rtol, "prox_tol": prox_tol,
        "regularizer": reg.to_dict(), "folds": k, "num_params": p, "task": task.to_dict(), "center": center,
    }
    return _finish(results, f"afif-{curvature}", counter, reduce_fn, theta_hat.device, start, config)


# ------------------------------------------------------------------------------------------------ exact CV
def _fista_refit(
    ev: _Evaluator, batches: Batches, reg: Regularizer, x0: Tensor, scale: float, tol: float, max_iter: int,
) -> tuple[Tensor, dict[str, Any]]:
    r"""FISTA with backtracking and adaptive restart on :math:`c\sum_i \ell_i(\theta) + \lambda\pi(\theta)`.

    Stops when the composite gradient mapping :math:`\|L(y - \operatorname{prox}(y - \nabla f(y)/L))\|` is
    below ``tol`` (absolute, in the units of the mean-loss gradient).

    Returns:
        The minimiser and its certificate (iterations, residual, converged, final step constant).
    """

    def fg(theta: Tensor) -> tuple[Tensor, Tensor]:
        s, g, _ = ev.value_and_grad(batches, theta)
        return scale * s, scale * g

    def f_only(theta: Tensor) -> Tensor:
        sums, _ = ev.loss_sums([batches], theta)
        return scale * sums[0]

    x = x0.clone()
    y = x.clone()
    t = 1.0
    lip = 1.0
    f_y, g_y = fg(y)
    # Initial Lipschitz guess from a small secant step along the gradient.
    gnorm = float(g_y.norm())
    if gnorm > 0:
        h = 1e-4 * (1.0 + float(x.norm())) / gnorm
        _, g2 = fg(y - h * g_y)
        lip = max(float((g2 - g_y).norm()) / (h * gnorm), 1e-12)
    it = 0
    residual = math.inf
    while it < max_iter:
        lip *= 0.9
        while True:
            x_new = reg.prox_diag(y - g_y / lip, 1.0 / lip)
            d = x_new - y
            f_new = f_only(x_new)
            bound = f_y + torch.dot(g_y, d) + 0.5 * lip * torch.dot(d, d)
            if float(f_new) <= float(bound) + 1e-14 * (1.0 + abs(float(f_y))):
                break
            lip *= 2.0
        residual = lip * float(d.norm())
        it += 1
        if residual <= tol:
            x = x_new
            break
        if float(torch.dot(y - x_new, x_new - x)) > 0:  # adaptive restart (O'Donoghue & Candes)
            t = 1.0
            y = x_new.clone()
        else:
            t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            y = x_new + ((t - 1.0) / t_new) * (x_new - x)
            t = t_new
        x = x_new
        f_y, g_y = fg(y)
    return x, {"method": "fista", "iterations": it, "residual": residual, "converged": residual <= tol,
               "lipschitz": lip}


def _prox_newton_refit(
    ev: _Evaluator, batches: Batches, reg: Regularizer, x0: Tensor, scale: float, tol: float, max_iter: int,
) -> tuple[Tensor, dict[str, Any]]:
    r"""Proximal Newton with the dense Hessian and a backtracking line search (tiny models, fast ground truth).

    Stops when the step-one gradient mapping :math:`\|x - \operatorname{prox}_{\lambda\pi}(x - \nabla f(x))\|`
    is below ``tol``.

    Returns:
        The minimiser and its certificate (iterations, residual, converged).
    """
    x = x0.clone()
    it = 0
    residual = math.inf
    p = x.numel()
    eye = torch.eye(p, dtype=x.dtype, device=x.device)
    while it < max_iter:
        s, g, _ = ev.value_and_grad(batches, x)
        f, g = scale * s, scale * g
        residual = float((x - reg.prox_diag(x - g, 1.0)).norm())
        if residual <= tol:
            break
        h = scale * ev.dense_hessian(batches, x)
        h = 0.5 * (h + h.T)
        shift = max(0.0, -float(torch.linalg.eigvalsh(h)[0])) + 1e-12 * max(1.0, float(h.diagonal().abs().max()))
        h = h + shift * eye
        v = x - torch.linalg.solve(h, g)
        z = reg.prox(v, h, x0=x, tol=1e-14, max_iter=100_000).x
        d = z - x
        pen_x = reg.penalty(x)
        decrease = float(torch.dot(g, d) + reg.penalty(z) - pen_x)
        step = 1.0
        obj = float(f + pen_x)
        for _ in range(60):
            trial = x + step * d
            sums, _ = ev.loss_sums([batches], trial)
            if float(scale * sums[0] + reg.penalty(trial)) <= obj + 0.25 * step * decrease + 1e-15 * abs(obj):
                break
            step *= 0.5
        x = x + step * d
        it += 1
    return x, {"method": "prox_newton", "iterations": it, "residual": residual, "converged": residual <= tol}


def _lbfgs_refit(
    ev: _Evaluator, batches: Batches, x0: Tensor, scale: float, tol: float, max_iter: int,
) -> tuple[Tensor, dict[str, Any]]:
    theta = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")
    evals = [0]

    def closure() -> Tensor:
        opt.zero_grad()
        s, g, _ = ev.value_and_grad(batches, theta.detach())
        theta.grad = scale * g
        evals[0] += 1
        return scale * s

    opt.step(closure)
    x = theta.detach()
    _, g, _ = ev.value_and_grad(batches, x)
    residual = float((scale * g).abs().max())
    return x, {"method": "lbfgs", "iterations": evals[0], "residual": residual, "converged": residual <= tol * 10}


def fit_regularized(
    model: nn.Module,
    task: Task,
    batches: Batches,
    regularizer: Regularizer | None = None,
    *,
    x0: Tensor | None = None,
    method: Literal["fista", "lbfgs", "prox_newton"] = "fista",
    tol: float = 1e-10,
    max_iter: int = 100_000,
    reduce_fn: ReduceFn | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    r"""Minimise :math:`\frac1N\sum_i \ell_i(\theta) + \lambda\pi(\theta)` over ``batches`` (the exact-refit solver).

    The model is only read (its trainable parameters fix shapes and the default start); load the returned flat
    vector yourself (e.g. ``torch.nn.utils.vector_to_parameters`` on the trainable parameters) if wanted.

    Args:
        model: Module defining the parametrisation.
        task: Batch -> ``(outputs, targets)`` and the loss family.
        batches: The training data (this rank's shard).
        regularizer: The penalty (``None``: none).
        x0: Start (default: the model's current parameters).
        method: ``"fista"`` (any regulariser) or ``"lbfgs"`` (smooth only).
        tol: Stopping tolerance (see :func:`exact_cv`).
        max_iter: Iteration cap.
        reduce_fn: Sums a flat tensor over ranks.

    Returns:
        ``(theta, certificate)`` with the flat minimiser and the solver's iterations/residual/convergence.

    Raises:
        ConfigurationError: For ``method="lbfgs"`` with a non-smooth regulariser or an unknown method.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> m = torch.nn.Linear(1, 1, bias=False).double()
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> theta, cert = fit_regularized(m, Regression(), [(x, 3 * x)], tol=1e-12)
        >>> round(float(theta[0]), 6), cert["converged"]
        (3.0, True)
    """
    params = trainable_parameters(model)
    reg = _check_regularizer(regularizer, sum(t.numel() for t in params.values()))
    _check_method(method, reg)
    counter = PassCount()
    ev = _Evaluator(model, task, reduce_fn, counter)
    start = flatten(params).detach().clone() if x0 is None else x0.detach().clone()
    _, units = ev.loss_sums([batches])
    if float(units[0]) <= 0:
        raise ConfigurationError("batches contain no counted units.")
    scale = 1.0 / float(units[0])
    if method == "fista":
        theta, cert = _fista_refit(ev, batches, reg, start, scale, tol, max_iter)
    elif method == "prox_newton":
        theta, cert = _prox_newton_refit(ev, batches, reg, start, scale, tol, max_iter)
    else:
        theta, cert = _lbfgs_refit(ev, batches, start, scale, tol, max_iter)
    cert["cost"] = counter.reduced(reduce_fn, start.device).to_dict()
    return theta, cert


def _check_method(method: str, reg: Regularizer) -> None:
    if method not in ("fista", "lbfgs", "prox_newton"):
        raise ConfigurationError(f"method must be 'fista', 'lbfgs' or 'prox_newton', got {method!r}.")
    if method == "lbfgs" and not isinstance(reg, NoRegularizer) and reg.strength > 0:
        raise ConfigurationError(
            f"method='lbfgs' needs a smooth objective, but the regulariser is {type(reg).__name__}; use method='fista'."
        )


def exact_cv(
    model: nn.Module,
    task: Task,
    folds: Sequence[Batches],
    regularizer: Regularizer | None = None,
    *,
    fold_objective: FoldObjective = "mean",
    method: Literal["fista", "lbfgs", "prox_newton"] = "fista",
    tol: float = 1e-10,
    max_iter: int = 100_000,
    warm_start: bool = True,
    reduce_fn: ReduceFn | None = None,
    num_examples: int | None = None,
) -> CVResult:
    r"""Exact k-fold CV by refitting the fold objective of every fold to a tight tolerance (small models).

    Each refit minimises :math:`L_{-k}` (module docstring) from :math:`\hat\theta` (``warm_start``) or from the
    model's parameters scaled by zero, by FISTA with backtracking and adaptive restart (any regulariser), or by
    L-BFGS with strong-Wolfe line search (smooth problems only: ``NoRegularizer``). This is the ground truth the
    approximate CV is compared with; on non-convex models it finds the local minimum near the warm start.

    Args:
        model: The trained model (warm start :math:`\hat\theta`; never modified).
        task: Batch -> ``(outputs, targets)`` and the loss family.
        folds: One list of batches per fold, as for :func:`approximate_cv`.
        regularizer: The penalty :math:`\lambda\pi` (``None``: no penalty).
        fold_objective: ``"mean"`` (default) or ``"weighted"``.
        method: ``"fista"`` or ``"lbfgs"``.
        tol: FISTA: composite gradient-mapping norm; L-BFGS: max-norm of the gradient.
        max_iter: Iteration cap per fold.
        warm_start: Start from :math:`\hat\theta` (else from zero).
        reduce_fn: Sums a flat tensor over ranks.
        num_examples: Global training-set size for the pass count (default: counted).

    Returns:
        The exact CV estimate, per-fold refits with their certificates, and the cost.

    Raises:
        ConfigurationError: For ``method="lbfgs"`` with a non-smooth regulariser, or bad arguments.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> model = torch.nn.Linear(2, 1).double()
        >>> g = torch.Generator().manual_seed(0)
        >>> data = [(torch.randn(2, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64))
        ...         for _ in range(12)]
        >>> exact_cv(model, Regression(), make_fold_batches(data, kfold_indices(12, 3))).method
        'exact-fista'
    """
    start = time.perf_counter()
    params, reg = _validate_common(model, folds, regularizer, fold_objective)
    _check_method(method, reg)
    theta_hat = flatten(params).detach().clone()
    k = len(folds)
    counter = PassCount()
    ev = _Evaluator(model, task, reduce_fn, counter)
    _, units_t = ev.loss_sums(folds)
    units = [float(u) for u in units_t]
    total_units = sum(units)
    if total_units <= 0:
        raise ConfigurationError("the folds contain no counted units (empty data, or every target ignored).")
    if num_examples is None:
        ex = torch.tensor([float(sum(_local_examples(task, b) for b in folds))], dtype=torch.float64,
                          device=theta_hat.device)
        num_examples = round(float(reduce_fn(ex)[0])) if reduce_fn is not None else int(ex[0])
    counter.num_examples = num_examples
    results: list[FoldResult] = []
    for j in range(k):
        batches = [b for i in range(k) if i != j for b in folds[i]]
        remaining = total_units - units[j]
        scale = 1.0 / remaining if fold_objective == "mean" else 1.0 / total_units
        x0 = theta_hat if warm_start else torch.zeros_like(theta_hat)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if method == "fista":
                theta, cert = _fista_refit(ev, batches, reg, x0, scale, tol, max_iter)
            elif method == "prox_newton":
                theta, cert = _prox_newton_refit(ev, batches, reg, x0, scale, tol, max_iter)
            else:
                theta, cert = _lbfgs_refit(ev, batches, x0, scale, tol, max_iter)
        if not cert["converged"]:
            warnings.warn(
                f"exact refit of fold {j} stopped at residual {cert['residual']:.3g} > tol={tol} after "
                f"{cert['iterations']} iterations; raise max_iter.",
                RuntimeWarning,
                stacklevel=2,
            )
        sums, cnt = ev.loss_sums([folds[j]], theta)
        n = float(cnt[0])
        results.append(FoldResult(
            fold=j,
            held_out_loss=float(sums[0] / cnt[0]) if n > 0 else math.nan,
            held_out_units=n,
            train_units=remaining,
            theta=theta,
            step_norm=float((theta - theta_hat).norm()),
            num_nonzero=int(torch.count_nonzero(theta)),
            certificate=cert,
        ))
    config = {"method": method, "fold_objective": fold_objective, "tol": tol, "warm_start": warm_start,
              "regularizer": reg.to_dict(), "folds": k, "num_params": theta_hat.numel()}
    return _finish(results, f"exact-{method}", counter, reduce_fn, theta_hat.device, start, config)
