r"""Solvers for damped curvature systems :math:`(A + \lambda I) x = b`.

* :func:`conjugate_gradient`: CG on a fixed sample (Fisher-CG), to a relative residual tolerance, with several
  right-hand sides at once (one independent CG per column, products batched per iteration).
* :func:`dense_solve`: exact Cholesky/eigen solve of the dense matrix, for tiny models and tests.
* :func:`lissa`: LiSSA (paper 1) with fresh sampled batches per step (:class:`SampledCurvature`), settings from
  the measured spectrum, a divergence guard and a residual certificate on a held-out sample.

Every solver returns a :class:`SolveResult` carrying its certificate (iterations, relative residual,
convergence flag) so that the logs and the report can show how far the answer can be trusted.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap
from torch.utils._pytree import tree_map

from lightning_influence.exceptions import ConfigurationError, DivergenceError, NonFiniteError
from lightning_influence.operators import CurvatureOperator, curvature_mode, make_batches, prepare_batch
from lightning_influence.params import ParamTree, flatten, make_generator, trainable_parameters, unflatten
from lightning_influence.spectrum import (
    LinearOperatorLike,
    LissaSettings,
    SpectrumSummary,
    estimate_spectrum,
    lissa_settings,
)
from lightning_influence.tasks import Task


@dataclass
class SolveResult:
    r"""Solution of :math:`(A + \lambda I) X = B` and its certificate.

    Attributes:
        x: Solution, shaped like the right-hand side (``(P,)`` or ``(P, k)``).
        iterations: Iterations (CG) or steps (LiSSA) performed.
        relative_residual: :math:`\max_j \|b_j - (A+\lambda I) x_j\| / \|b_j\|` at exit.
        converged: Whether the tolerance was met.
        method: Solver name.
        num_products: Operator products used (one per column per iteration).
        history: Relative residual per iteration (max over columns).
        diverged: Whether the solver stopped because its iterates grew without bound.
        info: Solver-specific extras (settings, warnings).

    Example::

        >>> from lightning_influence.spectrum import DenseOperator
        >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> res = conjugate_gradient(DenseOperator(a), b, damping=1.0, rtol=1e-10)
        >>> res.method, res.converged, res.iterations, res.num_products, res.relative_residual < 1e-12
        ('cg', True, 2, 3, True)
        >>> torch.allclose(res.x, torch.linalg.solve(a + torch.eye(2, dtype=torch.float64), b))
        True
        >>> [round(r, 6) for r in res.history], res.to_dict()["info"]
        ([1.0, 0.2, 0.0], {'rtol': 1e-10, 'damping': 1.0})
    """

    x: Tensor
    iterations: int
    relative_residual: float
    converged: bool
    method: str
    num_products: int = 0
    history: list[float] = field(default_factory=list)
    diverged: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The certificate without the solution tensor."""
        return {
            "method": self.method,
            "iterations": self.iterations,
            "relative_residual": self.relative_residual,
            "converged": self.converged,
            "diverged": self.diverged,
            "num_products": self.num_products,
            "history": list(self.history),
            "info": dict(self.info),
        }


def _damped(op: LinearOperatorLike, damping: float) -> Callable[[Tensor], Tensor]:
    def apply(v: Tensor) -> Tensor:
        return op.matvec(v) + damping * v

    return apply


def _as_matrix(b: Tensor) -> tuple[Tensor, bool]:
    if b.ndim == 1:
        return b.unsqueeze(1), True
    if b.ndim == 2:
        return b, False
    raise ConfigurationError(f"right-hand side must have shape (P,) or (P, k), got {tuple(b.shape)}.")


def conjugate_gradient(
    op: LinearOperatorLike,
    b: Tensor,
    *,
    damping: float = 0.0,
    rtol: float = 1e-6,
    max_iter: int | None = None,
    x0: Tensor | None = None,
    warn: bool = True,
) -> SolveResult:
    r"""Conjugate gradient for :math:`(A + \lambda I) x = b` with a relative residual tolerance.

    ``A`` must be symmetric positive semi-definite (GNH/Fisher) and :math:`A + \lambda I` positive definite.
    Each column of ``b`` runs its own CG recursion; the products of one iteration are computed together.
    The returned ``relative_residual`` is recomputed from an explicit product at exit (not the recursive
    estimate), so it is a true certificate.

    Args:
        op: The operator (undamped; pass the damping here), e.g. a :class:`~lightning_influence.operators.GNHOperator`.
        b: Right-hand side(s), ``(P,)`` or ``(P, k)``.
        damping: :math:`\lambda \ge 0`.
        rtol: Stop when :math:`\|r_j\| \le \text{rtol}\,\|b_j\|` for every column.
        max_iter: Most iterations (default ``min(P, 1000)``).
        x0: Warm start.
        warn: Emit a ``RuntimeWarning`` if the tolerance is not met.

    Returns:
        The solution and its certificate.

    Raises:
        ConfigurationError: For negative damping, a bad shape, or a direction of non-positive curvature
            (the operator plus damping is not positive definite: increase ``damping``).
        NonFiniteError: If the iteration produces NaN/Inf.

    Example::

        >>> from lightning_influence.spectrum import DenseOperator
        >>> a = DenseOperator(torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
        >>> conjugate_gradient(a, torch.tensor([2.0, 4.0], dtype=torch.float64), damping=0.0).x
        tensor([1., 1.], dtype=torch.float64)
    """
    if damping < 0:
        raise ConfigurationError(f"damping must be >= 0, got {damping}.")
    if rtol <= 0:
        raise ConfigurationError(f"rtol must be positive, got {rtol}.")
    B, squeeze = _as_matrix(b)
    n, k = B.shape
    if n != op.num_params:
        raise ConfigurationError(f"right-hand side has {n} rows but the operator has {op.num_params} parameters.")
    apply = _damped(op, damping)

    op_matmat = getattr(op, "matmat", None)

    def matmat(X: Tensor) -> Tensor:
        if op_matmat is not None:  # one (possibly vectorised) multi-vector product
            return op_matmat(X) + damping * X
        return torch.stack([apply(X[:, j]) for j in range(X.shape[1])], 1)

    limit = max_iter if max_iter is not None else min(n, 1000)
    bnorm = B.norm(dim=0)
    safe_bnorm = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    X = torch.zeros_like(B) if x0 is None else _as_matrix(x0)[0].clone().to(B)
    R = B - matmat(X) if x0 is not None else B.clone()
    products = k if x0 is not None else 0
    P = R.clone()
    rs = (R * R).sum(0)
    history = [float((rs.sqrt() / safe_bnorm).max())]
    active = rs.sqrt() > rtol * bnorm
    it = 0
    while bool(active.any()) and it < limit:
        AP = torch.zeros_like(P)
        AP[:, active] = matmat(P[:, active])
        products += int(active.sum())
        pAp = (P * AP).sum(0)
        if bool((pAp[active] <= 0).any()):
            raise ConfigurationError(
                "conjugate gradient met a direction of non-positive curvature: the operator plus damping is not "
                f"positive definite (damping={damping}). Use the GNH/Fisher rather than the Hessian, or increase "
                "damping."
            )
        alpha = torch.where(active, rs / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rs))
        X = X + alpha * P
        R = R - alpha * AP
        rs_new = (R * R).sum(0)
        if not bool(torch.isfinite(rs_new).all()):
            raise NonFiniteError(f"conjugate gradient produced non-finite residuals at iteration {it + 1}.")
        beta = torch.where(active, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        P = torch.where(active, R + beta * P, P)
        rs = torch.where(active, rs_new, rs)
        it += 1
        history.append(float((rs.sqrt() / safe_bnorm).max()))
        active = active & (rs.sqrt() > rtol * bnorm)
    true_res = float(((B - matmat(X)).norm(dim=0) / safe_bnorm).max())
    products += k
    converged = true_res <= rtol * 10  # recursive residual can drift slightly below the true one
    if not converged and warn:
        warnings.warn(
            f"conjugate gradient stopped after {it} iterations with relative residual {true_res:.3g} > rtol={rtol}; "
            "raise max_iter or damping for a tighter solve.",
            RuntimeWarning,
            stacklevel=2,
        )
    x = X[:, 0] if squeeze else X
    return SolveResult(x=x, iterations=it, relative_residual=true_res, converged=converged, method="cg",
                       num_products=products, history=history, info={"rtol": rtol, "damping": damping})


def dense_solve(op: LinearOperatorLike | Tensor, b: Tensor, *, damping: float = 0.0) -> SolveResult:
    r"""Exact solve of :math:`(A + \lambda I) x = b` through the dense matrix (tiny models only).

    Uses a Cholesky factorisation; if that fails (singular or indefinite), an eigendecomposition, raising if
    an eigenvalue of :math:`A + \lambda I` is not positive.

    Returns:
        The solution and its (explicitly recomputed) relative residual.

    Raises:
        ConfigurationError: If :math:`A + \lambda I` is not positive definite.

    Example::

        >>> dense_solve(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), damping=1.0).x
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    if isinstance(op, Tensor):
        A = op
    else:
        dense = getattr(op, "dense", None)
        if dense is None:
            raise ConfigurationError(f"{type(op).__name__} has no dense(); pass the matrix instead.")
        A = dense()
    A = 0.5 * (A + A.T) + damping * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    B, squeeze = _as_matrix(b.to(A.dtype))
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        X = torch.cholesky_solve(B, L)
    else:
        evals, evecs = torch.linalg.eigh(A)
        if float(evals[0]) <= 0:
            raise ConfigurationError(
                f"the damped matrix is not positive definite (smallest eigenvalue {float(evals[0]):.3g} with "
                f"damping={damping}); increase damping or use the GNH instead of the Hessian."
            )
        X = evecs @ ((evecs.T @ B) / evals.unsqueeze(1))
    res = float(((B - A @ X).norm(dim=0) / B.norm(dim=0).clamp_min(1e-300)).max())
    x = X[:, 0] if squeeze else X
    return SolveResult(x=x, iterations=1, relative_residual=res, converged=math.isfinite(res), method="dense",
                       num_products=A.shape[0] if not isinstance(op, Tensor) else 0)


# ================================================================================================= LiSSA
class BatchProduct(Protocol):
    r"""What LiSSA needs: a *fresh* in-batch curvature product for every step.

    ``product(step, V)`` returns :math:`\tilde H_{\text{step}} V` (undamped, ``V`` of shape ``(P, k)``) on a batch
    that depends only on ``step`` and the sampler's seed, so that every data-parallel rank draws the same global
    batch, computes the product on its slice, and finishes it with one sum-reduction.

    Example::

        >>> class Halves:  # step t uses rows 2(t % 2), 2(t % 2) + 1; both halves have curvature I / 2
        ...     rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
        ...     num_params = 2
        ...     def __call__(self, step, matrix):
        ...         batch = self.rows[2 * (step % 2): 2 * (step % 2) + 2]
        ...         return batch.T @ (batch @ matrix) / 2
        >>> res = lissa(Halves(), torch.ones(2, dtype=torch.float64), damping=0.5, eta=0.5, steps=100,
        ...             certificate_size=None)
        >>> [round(v, 6) for v in res.x.tolist()], res.diverged  # (I / 2 + 0.5 I)^{-1} 1 = 1
        ([1.0, 1.0], False)
    """

    @property
    def num_params(self) -> int:
        """Dimension ``P``."""

    def __call__(self, step: int, matrix: Tensor) -> Tensor:
        r""":math:`\tilde H_{\text{step}} V` for ``V`` of shape ``(P, k)``."""


_VECTORISED_KINDS = ("gnh", "expected_fisher")


def _operator_class(curvature: str) -> type[CurvatureOperator]:
    from lightning_influence import operators as ops

    classes: dict[str, type[CurvatureOperator]] = {
        "gnh": ops.GNHOperator,
        "expected_fisher": ops.ExpectedFisherOperator,
        "sampled_fisher": ops.SampledFisherOperator,
        "finite_difference_gnh": ops.FiniteDifferenceGNHOperator,
        "hessian": ops.HessianOperator,
    }
    if curvature not in classes:
        raise ConfigurationError(f"curvature must be one of {sorted(classes)}, got {curvature!r}.")
    return classes[curvature]


def local_curvature_matmat(
    model: nn.Module, task: Task, batches: Sequence[Any], matrix: Tensor, *, curvature: str = "gnh", seed: int = 0
) -> tuple[Tensor, Tensor]:
    r"""Unnormalised curvature products of several vectors on this process's batches, without any reduction.

    For the GNH (and the expected Fisher, the same matrix) all ``k`` columns go through one vectorised
    forward-mode / reverse-mode pass per batch (``torch.func.vmap`` over ``jvp`` and ``vjp``); other curvature
    kinds fall back to one product per column.

    Args:
        model: The module (unwrapped, never the DDP wrapper).
        task: The task.
        batches: Collated batches already on the model's device (may be empty).
        matrix: ``V`` of shape ``(P, k)``.
        curvature: ``"gnh"``, ``"expected_fisher"``, ``"sampled_fisher"``, ``"finite_difference_gnh"`` or
            ``"hessian"``.
        seed: Label seed for ``"sampled_fisher"``.

    Returns:
        ``(S, n)``: :math:`S = \sum_{\text{units}} M_u V` of shape ``(P, k)`` and the number of counted units ``n``
        (a 0-d tensor), so that the caller can reduce ``(S, n)`` over ranks and divide.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(5, 2, generator=g, dtype=torch.float64)
        >>> y = torch.randn(5, 1, generator=g, dtype=torch.float64)
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> batches = [(x[:3], y[:3]), (x[3:], y[3:])]
        >>> s, n = local_curvature_matmat(model, Regression(), batches, torch.eye(2, dtype=torch.float64))
        >>> # linear model + squared loss: the summed GNH is X^T X (and so is the Hessian)
        >>> torch.allclose(s, x.T @ x), n
        (True, tensor(5., dtype=torch.float64))
        >>> h, _ = local_curvature_matmat(model, Regression(), batches, torch.eye(2, dtype=torch.float64),
        ...                               curvature="hessian")
        >>> torch.allclose(h, x.T @ x)
        True
    """
    params = trainable_parameters(model)
    first = next(iter(params.values()))
    V = matrix.to(device=first.device, dtype=first.dtype)
    total = torch.zeros_like(V)
    count = torch.zeros((), dtype=V.dtype, device=V.device)
    if not batches:
        return total, count
    k = V.shape[1]
    if curvature in _VECTORISED_KINDS:
        vtree = {name: t.permute(-1, *range(t.ndim - 1)) for name, t in unflatten(V, params).items()}  # (k, ...)
        with curvature_mode(model):
            for batch in batches:
                inputs, targets = task.split(batch)

                def f(p: ParamTree, inputs: tuple[Any, ...] = inputs, targets: Tensor = targets) -> Tensor:
                    out, _ = task.targets(task.outputs(task.forward(model, p, inputs)), targets)
                    return out

                _, targets = task.targets(torch.empty(0), targets)
                outputs, pullback = vjp(f, params)  # type: ignore[misc]
                outputs = outputs.detach()
                task.loss.validate(outputs, targets)
                jv = vmap(lambda t, f=f: jvp(f, (params,), (t,))[1])(vtree)
                c = vmap(lambda t, o=outputs, y=targets: task.loss.output_hvp(o, y, t))(jv.detach())
                (prod,) = vmap(pullback)(c)
                total = total + torch.cat([prod[n].reshape(k, -1) for n in params], 1).T.detach()
                count = count + task.loss.unit_mask(outputs, targets).sum().to(V.dtype)
        return total, count
    cls = _operator_class(curvature)
    extra: dict[str, Any] = {"seed": seed} if curvature == "sampled_fisher" else {}
    op = cls(model, task, list(batches), **extra)
    with curvature_mode(model):
        for i, batch in enumerate(op.data):
            for j in range(k):
                prod_tree, n = op._batch_product(i, batch, unflatten(V[:, j], op.params))
                total[:, j] += flatten(prod_tree).detach()
            count = count + n
    return total, count


class SampledCurvature:
    r"""Fresh-batch curvature products for LiSSA, drawn from a seeded generator over a pool of examples.

    Step ``t`` draws ``batch_size`` *global* pool positions from a generator seeded with ``(seed, t)`` (with
    replacement by default, as in paper 1's analysis: independent draws :math:`x \sim \mathcal U(D)`). Every
    rank draws the same positions, keeps the slice ``positions[rank::world_size]``, computes the unnormalised
    product on it with :func:`local_curvature_matmat`, and one ``reduce_fn`` call sums ``(products, unit count)``
    over ranks. A step's batch therefore does not depend on the number of ranks, and ranks with an empty slice
    still join the reduction.

    Args:
        model: The module (unwrapped).
        task: The task.
        dataset: Map-style data set (anything with ``__len__`` and ``__getitem__``).
        batch_size: Examples per step, :math:`|B|` (for language models each example is a sequence; the
            curvature is still averaged per token).
        indices: Pool of data-set indices to sample from (default: all).
        seed: Seed of the step draws.
        replacement: Draw with replacement (default) or without replacement within a step.
        curvature: See :func:`local_curvature_matmat`.
        collate_fn: Collation of examples (default ``torch.utils.data.default_collate``).
        reduce_fn: Sums a flat tensor over ranks (``None`` on one process).
        rank: This process's rank.
        world_size: Number of ranks.
        dtype: Cast floating inputs to this dtype (e.g. float64 for exact checks).
        holdout: Pool examples reserved for :meth:`certificate_operator` and never drawn by a step (default 0: the
            certificate uses an independent draw instead).

    Raises:
        ConfigurationError: For an empty pool, a non-positive batch size or a bad rank.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> x = torch.eye(3, dtype=torch.float64)
        >>> ds = torch.utils.data.TensorDataset(x, torch.zeros(3, 1, dtype=torch.float64))
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> s = SampledCurvature(model, Regression(), ds, batch_size=3, replacement=False)
        >>> s(0, torch.eye(3, dtype=torch.float64)).diagonal()  # X^T X / 3 on the whole pool
        tensor([0.3333, 0.3333, 0.3333], dtype=torch.float64)
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        dataset: Any,
        *,
        batch_size: int,
        indices: Sequence[int] | Tensor | None = None,
        seed: int = 0,
        replacement: bool = True,
        curvature: str = "gnh",
        collate_fn: Callable[[list[Any]], Any] | None = None,
        reduce_fn: Callable[[Tensor], Tensor] | None = None,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype | None = None,
        holdout: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise ConfigurationError(f"rank={rank} must lie in [0, world_size={world_size}).")
        _operator_class(curvature)
        pool = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if pool.numel() == 0:
            raise ConfigurationError("SampledCurvature: the pool of training examples is empty.")
        if not 0 <= holdout < pool.numel():
            raise ConfigurationError(f"holdout={holdout} must lie in [0, {pool.numel()}) (the pool size).")
        self.model, self.task, self.dataset = model, task, dataset
        self.batch_size = int(batch_size)
        self.seed, self.replacement, self.curvature = int(seed), bool(replacement), curvature
        self.collate_fn, self.reduce_fn = collate_fn, reduce_fn
        self.rank, self.world_size, self.dtype = int(rank), int(world_size), dtype
        if holdout:
            perm = torch.randperm(pool.numel(), generator=make_generator(self.seed + 104729))
            self.holdout_indices = pool[perm[:holdout]].sort().values
            keep = torch.ones(pool.numel(), dtype=torch.bool)
            keep[perm[:holdout]] = False
            pool = pool[keep]
        else:
            self.holdout_indices = pool[:0]
        self.pool = pool
        params = trainable_parameters(model)
        first = next(iter(params.values()))
        self._num_params = sum(p.numel() for p in params.values())
        self.param_dtype, self.device = first.dtype, first.device
        #: Curvature products computed (one per column per step).
        self.num_products = 0
        #: Examples pushed through the model by this process, summed over products (cost accounting).
        self.example_products = 0

    @property
    def num_params(self) -> int:
        """Dimension ``P``."""
        return self._num_params

    @property
    def pool_size(self) -> int:
        """Number of examples the steps draw from."""
        return int(self.pool.numel())

    def with_batch_size(self, batch_size: int) -> SampledCurvature:
        """A copy drawing ``batch_size`` examples per step (same seed, pool and sharding)."""
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}.")
        new = copy.copy(self)
        new.batch_size = int(batch_size)
        return new

    def with_seed(self, seed: int) -> SampledCurvature:
        """A copy whose steps draw from another seed."""
        new = copy.copy(self)
        new.seed = int(seed)
        return new

    def draw(self, step: int) -> Tensor:
        """The global data-set indices of step ``step`` (identical on every rank)."""
        gen = make_generator(self.seed * 1_000_003 + 7919 * int(step) + 1)
        n = self.pool.numel()
        if self.replacement:
            pos = torch.randint(0, n, (self.batch_size,), generator=gen)
        else:
            pos = torch.randperm(n, generator=gen)[: self.batch_size]
        return self.pool[pos]

    def _local_batches(self, indices: Tensor) -> list[Any]:
        mine = indices[self.rank :: self.world_size].tolist()
        if not mine:
            return []
        batches = make_batches(self.dataset, mine, batch_size=len(mine), collate_fn=self.collate_fn)
        return [prepare_batch(b, self.device, self.dtype) for b in batches]

    def __call__(self, step: int, matrix: Tensor) -> Tensor:
        r""":math:`\tilde H_{\text{step}} V`, averaged over the counted units of step ``step``'s batch.

        Returns:
            The ``(P, k)`` product, identical on every rank.

        Raises:
            ConfigurationError: If the batch has no counted unit.
        """
        idx = self.draw(step)
        batches = self._local_batches(idx)
        total, count = local_curvature_matmat(
            self.model, self.task, batches, matrix, curvature=self.curvature, seed=self.seed + step
        )
        flat = torch.cat([total.reshape(-1), count.reshape(1)])
        if self.reduce_fn is not None:
            flat = self.reduce_fn(flat)
        n = float(flat[-1])
        if n <= 0:
            raise ConfigurationError(
                f"LiSSA step {step}: the sampled batch has no counted units (all targets ignored?)."
            )
        self.num_products += matrix.shape[1]
        self.example_products += matrix.shape[1] * len(idx[self.rank :: self.world_size])
        return flat[:-1].reshape(total.shape) / n

    def operator(self, indices: Sequence[int] | Tensor | None = None, *, batch_size: int = 256) -> CurvatureOperator:
        r"""A fixed-sample operator over ``indices`` (default: the whole pool), sharded like the steps.

        Used for the on-the-spot spectrum (trace, :math:`\lambda_{\max}`) and the residual certificate.

        Returns:
            The operator (this rank's shard, reduced with the sampler's ``reduce_fn``).
        """
        idx = self.pool if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        mine = idx[self.rank :: self.world_size].tolist()
        batches = make_batches(self.dataset, mine, batch_size=batch_size, collate_fn=self.collate_fn) if mine else []
        cls = _operator_class(self.curvature)
        extra: dict[str, Any] = {"seed": self.seed} if self.curvature == "sampled_fisher" else {}
        return cls(self.model, self.task, batches, reduce_fn=self.reduce_fn, dtype=self.dtype, **extra)

    def certificate_operator(self, size: int = 512, *, seed: int | None = None) -> CurvatureOperator:
        """Operator for the residual certificate.

        Returns:
            An operator on the held-out examples if ``holdout > 0``, else on an independent seeded draw of
            ``min(size, pool)`` pool examples without replacement (none of the steps' batches).
        """
        if self.holdout_indices.numel():
            return self.operator(self.holdout_indices)
        gen = make_generator((self.seed if seed is None else seed) + 15485863)
        n = min(int(size), self.pool.numel())
        return self.operator(self.pool[torch.randperm(self.pool.numel(), generator=gen)[:n]].sort().values)


def _per_example_gnh_sums(model: nn.Module, task: Task, batch: Any, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-column sums over the batch's examples of ``H_n v`` and ``||H_n v||^2`` (``H_n``: one example's GNH).

    Returns:
        ``(sum_n H_n V (P, m), sum_n ||H_n v_j||^2 (m,), unit count)``.
    """
    params = trainable_parameters(model)
    names = list(params)
    inputs, targets = task.split(batch)

    def one(p: ParamTree, x: Any, y: Tensor, v: ParamTree) -> Tensor:
        x1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)
        y1 = y.unsqueeze(0)

        def f(pp: ParamTree) -> Tensor:
            out, _ = task.targets(task.outputs(task.forward(model, pp, x1)), y1)
            return out

        _, yy = task.targets(torch.empty(0), y1)
        out, jv = jvp(f, (p,), (v,))  # type: ignore[misc]
        c = task.loss.output_hvp(out, yy, jv)
        _, pull = vjp(f, p)  # type: ignore[misc]
        (g,) = pull(c)
        return torch.cat([g[k].reshape(-1) for k in names])

    with torch.no_grad():
        out, y = task.targets(task.outputs(task.forward(model, params, inputs)), targets)
        count = task.loss.unit_mask(out, y).sum().to(V.dtype)
    s1 = torch.zeros_like(V)
    s2 = torch.zeros(V.shape[1], dtype=V.dtype, device=V.device)
    for j in range(V.shape[1]):
        vtree = unflatten(V[:, j], params)
        hn = vmap(one, in_dims=(None, 0, 0, None))(params, inputs, targets, vtree).detach()  # (B, P)
        s1[:, j] = hn.sum(0)
        s2[j] = hn.pow(2).sum()
    return s1, s2, count


def measure_batch_constant(
    sampler: SampledCurvature,
    trace: float,
    *,
    directions: int | Tensor = 4,
    sample_size: int = 512,
    power_iter: int = 15,
    seed: int = 0,
) -> dict[str, Any]:
    r"""Condition C.1's constant :math:`C` measured along the top curvature directions (paper 1, §3 and App. C).

    LiSSA's batch rule :math:`|B| \ge C\,\mathrm{Tr}(H)/\lambda_{\max}` rests on
    :math:`\mathbb{E}\tilde H_t^2 - H^2 \preceq \frac{C}{|B|}\mathrm{Tr}(H) H`. For a batch of one example
    the excess second moment along a unit direction :math:`v` is
    :math:`\overline{\|H_n v\|^2} - \|H v\|^2`, so

    .. math:: C(v) = \frac{\overline{\|H_n v\|^2} - \|H v\|^2}{\mathrm{Tr}(H)\, v^\top H v},

    with :math:`H_n` the GNH of example :math:`n`. Lemma 3's divergence happens along the top eigenvectors, so
    :math:`C` is the maximum of :math:`C(v)` over the top ``directions`` (found by subspace iteration on a fixed
    sample of ``sample_size`` pool examples). The paper assumes :math:`C = 2`; its App. C finds 4 for GPT-2.
    Costs ``power_iter`` block products plus one per-example product per direction and example.

    Args:
        sampler: The LiSSA sampler (pool, sharding and reduction are reused).
        trace: :math:`\mathrm{Tr}(H)` of the unit-averaged GNH.
        directions: Number of top directions, or the directions themselves as a ``(P, m)`` tensor.
        sample_size: Examples in the fixed sample.
        power_iter: Subspace iterations.
        seed: Seed of the sample and start block.

    Returns:
        ``{"constant": max C(v), "per_direction": [...], "rayleigh": [v^T H v ...], "sample_size": n,
        "example_products": examples pushed through the model (all ranks)}``.

    Raises:
        ConfigurationError: For a non-positive trace or an empty sample.
    """
    if not trace > 0:
        raise ConfigurationError(f"measure_batch_constant needs a positive trace, got {trace}.")
    gen = make_generator(seed + 2750159)
    n = min(int(sample_size), sampler.pool_size)
    idx = sampler.pool[torch.randperm(sampler.pool_size, generator=gen)[:n]].sort().values
    mine = idx[sampler.rank :: sampler.world_size].tolist()
    raw = make_batches(sampler.dataset, mine, batch_size=64, collate_fn=sampler.collate_fn) if mine else []
    batches = [prepare_batch(b, sampler.device, sampler.dtype) for b in raw]

    def reduce(flat: Tensor) -> Tensor:
        return sampler.reduce_fn(flat) if sampler.reduce_fn is not None else flat

    if isinstance(directions, Tensor):
        V = directions.to(device=sampler.device, dtype=sampler.param_dtype)
        V = V / V.norm(dim=0, keepdim=True)
    else:
        V = torch.randn(sampler.num_params, int(directions), generator=gen, dtype=sampler.param_dtype).to(
            sampler.device)
        V, _ = torch.linalg.qr(V)
        for _ in range(power_iter):
            total, count = local_curvature_matmat(sampler.model, sampler.task, batches, V, curvature=sampler.curvature)
            flat = reduce(torch.cat([total.reshape(-1), count.reshape(1)]))
            V, _ = torch.linalg.qr(flat[:-1].reshape(total.shape) / flat[-1].clamp_min(1.0))
    m = V.shape[1]
    s1 = torch.zeros_like(V)
    s2 = torch.zeros(m, dtype=V.dtype, device=V.device)
    count = torch.zeros((), dtype=V.dtype, device=V.device)
    with curvature_mode(sampler.model):
        for batch in batches:
            a, b2, c = _per_example_gnh_sums(sampler.model, sampler.task, batch, V)
            s1, s2, count = s1 + a, s2 + b2, count + c
    flat = reduce(torch.cat([s1.reshape(-1), s2, count.reshape(1)]))
    units = float(flat[-1])
    if units <= 0:
        raise ConfigurationError("measure_batch_constant: the sample has no counted units.")
    hv = flat[: V.numel()].reshape(V.shape) / units
    second = flat[V.numel() : V.numel() + m] / units
    rayleigh = (V * hv).sum(0)
    per_dir = (second - hv.pow(2).sum(0)) / (trace * rayleigh.clamp_min(1e-300))
    iters = 0 if isinstance(directions, Tensor) else power_iter
    return {"constant": float(per_dir.max()), "per_direction": per_dir.tolist(), "rayleigh": rayleigh.tolist(),
            "sample_size": n, "example_products": (iters + 1) * m * n}


def _divergence_message(step: int, norm: float, bound: float, damping: float, eta: float, batch_size: int | None,
                        summary: dict[str, float]) -> str:
    msg = (f"LiSSA diverged at step {step}: ||u_t|| = {norm:.3g} exceeds the bound ||g||/lambda (times 1+slack) = "
           f"{bound:.3g} that every convergent iterate respects (damping lambda={damping:.3g}, eta={eta:.3g}, "
           f"|B|={batch_size}). ")
    trace, lmax = summary.get("trace"), summary.get("lambda_max")
    if trace is not None and lmax is not None and lmax > 0:
        need = math.ceil(2.0 * trace / lmax)
        msg += (f"Paper 1 (Thm. 1, Lemma 3) needs |B| >= C*Tr/lambda_max = 2*{trace:.3g}/{lmax:.3g} = {need} "
                f"and eta <= 1/(lambda_max + lambda) = {1.0 / (lmax + damping):.3g}. ")
    msg += ("Fix: use a larger batch (at least C*Tr(H)/lambda_max, C=2; let lissa_settings() choose it), a larger "
            "damping, or a smaller eta; or use solver='cg'.")
    return msg


def lissa(
    sampler: BatchProduct | SampledCurvature,
    b: Tensor,
    *,
    damping: float,
    settings: LissaSettings | SpectrumSummary | None = None,
    spectrum_operator: LinearOperatorLike | None = None,
    eta: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    constant: float = 2.0,
    max_steps: int = 20_000,
    x0: Tensor | None = None,
    average: float = 0.0,
    on_divergence: str = "raise",
    divergence_slack: float = 1.0,
    max_restarts: int = 2,
    certificate_operator: LinearOperatorLike | None = None,
    certificate_size: int | None = 512,
    certificate_rtol: float = 0.1,
    spectrum_kwargs: dict[str, Any] | None = None,
    measure_constant: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
) -> SolveResult:
    r"""LiSSA for :math:`(H + \lambda I)^{-1} g` with fresh sampled batches, auto-tuned from the spectrum.

    **Recursion.** Paper 1, eq. (6), is :math:`u_t = g + (I - \eta(\tilde H_t + \lambda)) u_{t-1}`, whose fixed
    point is :math:`(H+\lambda)^{-1} g / \eta`. We run the same recursion on :math:`\eta g`, i.e. the scaled
    form (paper 1, §3: SGD with step :math:`\eta` on :math:`\tfrac12 u^\top (H+\lambda) u - u^\top g`)

    .. math:: u_t = u_{t-1} - \eta\,\big[(\tilde H_t + \lambda) u_{t-1} - g\big], \qquad t = 1, \dots, T,

    with :math:`u_0 = 0` (or ``x0``), so the returned ``x`` *is* the iHVP :math:`(H+\lambda)^{-1} g` (no division
    by :math:`\eta` needed). :math:`\tilde H_t` is the undamped in-batch curvature of a fresh batch drawn by
    ``sampler`` at step ``t``. All columns of ``b`` share each step's batch (one product per column).

    **Settings** (paper 1, Thm. 1): :math:`\eta = 1/(\lambda_{\max}+\lambda)`,
    :math:`|B| \ge C\,\mathrm{Tr}(H)/\lambda_{\max}` (:math:`C=2`), :math:`T = \lceil 2/(\lambda\eta) \rceil`, via
    :func:`~lightning_influence.spectrum.lissa_settings`. Source, in order: ``settings`` (a
    :class:`~lightning_influence.spectrum.SpectrumSummary`, e.g. a :class:`CurvatureMonitor`'s ``latest``, whose
    trace and :math:`\lambda_{\max}` are re-used with *this* damping; or ready :class:`LissaSettings`), else the
    spectrum measured on the spot with :func:`~lightning_influence.spectrum.estimate_spectrum` on
    ``spectrum_operator`` (default ``sampler.operator()``, the whole pool). Explicit ``eta``, ``steps`` and
    ``batch_size`` override the derived values. A :class:`SampledCurvature` sampler is re-sized to the batch.

    **Divergence guard.** The solution obeys :math:`\|u^\star\| \le \|g\|/\lambda`; a convergent iterate stays
    below :math:`(1+\text{slack})(\|g\|/\lambda + \|u_0\|)`. When a column crosses that bound or turns non-finite,
    LiSSA stops, sets ``diverged=True`` and raises :class:`DivergenceError` (``on_divergence="raise"``) or warns
    (``"warn"``), naming the fix (a batch of at least :math:`C\,\mathrm{Tr}/\lambda_{\max}`, larger damping,
    smaller :math:`\eta`). Lemma 3 of paper 1 shows that a batch below :math:`\mathrm{Tr}/(\lambda_{\max}+\lambda)`
    makes :math:`\mathbb{E}\|u_t\|^2` grow geometrically; the guard catches it. With derived settings LiSSA
    first restarts with a doubled :math:`C` (``max_restarts``), since C.1's constant depends on the model.

    **Certificate.** ``relative_residual`` is :math:`\max_j \|(H_{\text{cert}}+\lambda)x_j - g_j\|/\|g_j\|` on a
    held-out sample operator (``certificate_operator``, or ``sampler.certificate_operator(certificate_size)``:
    the sampler's held-out examples or an independent draw that is none of the steps' batches). It mixes the
    solver error with the difference between the certificate sample's curvature and the full :math:`H`, so it
    is an upper-bound-like diagnostic rather than a pure solver residual; ``converged`` means "not diverged and
    certificate at most ``certificate_rtol``". ``history`` holds the free in-batch residual
    :math:`\|(\tilde H_t + \lambda) u_{t-1} - g\|/\|g\|` of every step (noisy), ``info["norm_history"]`` the
    largest column norm.

    Args:
        sampler: A :class:`SampledCurvature`, or any ``(step, V) -> H̃_step V`` callable with ``num_params``.
        b: Right-hand side(s) ``g``, shape ``(P,)`` or ``(P, k)``.
        damping: :math:`\lambda > 0`.
        settings: Spectrum summary or LiSSA settings to use instead of measuring.
        spectrum_operator: Operator on which to measure the spectrum when ``settings`` is not given.
        eta: Override of the step size.
        steps: Override of the number of steps.
        batch_size: Override of the batch size (only for a :class:`SampledCurvature` sampler).
        constant: :math:`C` of the batch-size rule.
        max_steps: Cap on the derived number of steps (a ``RuntimeWarning`` says when it applies).
        x0: Start iterate (default zero).
        average: Fraction of the final iterates to average (tail averaging, ``0`` = last iterate).
        on_divergence: ``"raise"`` or ``"warn"``.
        divergence_slack: The guard's slack.
        max_restarts: When the batch size was derived from a measured spectrum (not given explicitly) and the
            guard fires, restart from ``x0`` with :math:`C` doubled (a larger batch), at most this many times;
            each restart warns and is recorded in ``info["restarts"]``. Condition C.1's constant is
            model-dependent (paper 1, App. C finds :math:`C = 4` needed for GPT-2), so :math:`C = 2` can be too
            small; ``0`` disables restarts.
        certificate_operator: Held-out operator for the certificate (``None``: ask the sampler, if it can).
        certificate_size: Examples in the sampler-built certificate sample; ``None`` skips the certificate.
        certificate_rtol: Certificate tolerance for ``converged``.
        spectrum_kwargs: Extra arguments to :func:`estimate_spectrum` when measuring on the spot.
        measure_constant: With a :class:`SampledCurvature` and a spectrum (given or measured), measure
            condition C.1's constant on the model (:func:`measure_batch_constant`) and use
            :math:`\max(C_{\text{measured}}, \text{constant})` in the batch rule; recorded in
            ``info["measured_constant"]``.
        callback: Called as ``callback(step, x_t)`` after every step (``x_t`` of shape ``(P, k)``).

    Returns:
        The :class:`SolveResult`; ``info`` holds the settings used, their source, the spectrum and the guard.

    Raises:
        ConfigurationError: For ``damping <= 0``, a bad shape, ``average`` outside ``[0, 1)``, an unknown
            ``on_divergence``, or no way to obtain the settings.
        DivergenceError: If the iterates diverge and ``on_divergence="raise"``.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> x = torch.eye(3, dtype=torch.float64)
        >>> ds = torch.utils.data.TensorDataset(x, torch.zeros(3, 1, dtype=torch.float64))
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> s = SampledCurvature(model, Regression(), ds, batch_size=3, replacement=False)
        >>> res = lissa(s, torch.ones(3, dtype=torch.float64), damping=1.0, certificate_size=None)
        >>> [round(v, 4) for v in res.x.tolist()]  # (I/3 + I)^{-1} 1 = 0.75
        [0.75, 0.75, 0.75]
    """
    if not damping > 0:
        raise ConfigurationError(
            f"LiSSA needs damping > 0 (got {damping}): its number of steps grows like (lambda_max + damping)/damping "
            "and without damping the iteration need not converge. Pass damping > 0 or use solver='cg'."
        )
    if not 0.0 <= average < 1.0:
        raise ConfigurationError(f"average must lie in [0, 1), got {average}.")
    if on_divergence not in ("raise", "warn"):
        raise ConfigurationError(f"on_divergence must be 'raise' or 'warn', got {on_divergence!r}.")
    B, squeeze = _as_matrix(b)
    if B.shape[0] != sampler.num_params:
        raise ConfigurationError(f"right-hand side has {B.shape[0]} rows but the model has {sampler.num_params}.")
    dtype = getattr(sampler, "param_dtype", B.dtype)
    B = B.to(dtype)
    is_sampled = isinstance(sampler, SampledCurvature)
    sampled: SampledCurvature | None = sampler if isinstance(sampler, SampledCurvature) else None
    # ----------------------------------------------------------------------------------------- settings
    summary: dict[str, float] = {}
    source = "explicit"
    chosen: LissaSettings | None = None
    dataset_size = sampled.pool_size if sampled is not None and not sampled.replacement else None
    if isinstance(settings, LissaSettings):
        chosen, source = settings, "settings"
        if abs(settings.damping - damping) > 1e-12 * max(1.0, damping):
            warnings.warn(f"LissaSettings were made for damping={settings.damping} but LiSSA runs with damping="
                          f"{damping}; eta and steps may be off. Pass a SpectrumSummary to re-derive them.",
                          RuntimeWarning, stacklevel=2)
    elif isinstance(settings, SpectrumSummary):
        summary = {"trace": settings.trace, "lambda_max": settings.lambda_max}
        chosen = lissa_settings(settings.trace, settings.lambda_max, damping, constant=constant,
                                dataset_size=dataset_size)
        source = "spectrum_summary"
    elif settings is not None:
        raise ConfigurationError(f"settings must be a SpectrumSummary or LissaSettings, got {type(settings).__name__}.")
    elif eta is None or steps is None:
        op = spectrum_operator
        if op is None:
            if sampled is None:
                raise ConfigurationError(
                    "lissa() needs settings (a SpectrumSummary or LissaSettings), a spectrum_operator to measure "
                    "them on, or explicit eta and steps when the sampler is a plain callable."
                )
            op = sampled.operator()
        spec = estimate_spectrum(op, damping=damping, constant=constant, dataset_size=dataset_size,
                                 **(spectrum_kwargs or {}))
        summary = {"trace": spec.trace, "lambda_max": spec.lambda_max, "trace_stderr": spec.trace_stderr,
                   "num_products": float(spec.num_products)}
        chosen, source = spec.lissa, "measured"
    measured: dict[str, Any] | None = None
    if measure_constant and sampled is not None and "trace" in summary:
        measured = measure_batch_constant(sampled, summary["trace"], seed=sampled.seed)
        if measured["constant"] > constant:
            constant = measured["constant"]
            chosen = lissa_settings(summary["trace"], summary["lambda_max"], damping, constant=constant,
                                    dataset_size=dataset_size)
    eta_used = float(eta) if eta is not None else (chosen.eta if chosen is not None else float("nan"))
    if chosen is not None and steps is None and chosen.steps > max_steps:
        warnings.warn(f"LiSSA would need {chosen.steps} steps (2(lambda_max+lambda)/lambda); capped at max_steps="
                      f"{max_steps}. Increase damping or max_steps for a converged answer.", RuntimeWarning,
                      stacklevel=2)
    steps_used = int(steps) if steps is not None else min(chosen.steps if chosen is not None else 0, max_steps)
    if not (eta_used > 0 and math.isfinite(eta_used)) or steps_used < 1:
        raise ConfigurationError(f"LiSSA needs eta > 0 and steps >= 1, got eta={eta_used}, steps={steps_used}.")
    if is_sampled:
        assert isinstance(sampler, SampledCurvature)
        target = batch_size if batch_size is not None else (chosen.batch_size if chosen is not None else None)
        if target is not None and target != sampler.batch_size:
            sampler = sampler.with_batch_size(int(target))
        batch_used: int | None = sampler.batch_size
    else:
        if batch_size is not None:
            raise ConfigurationError("batch_size can only be set for a SampledCurvature sampler.")
        batch_used = getattr(sampler, "batch_size", None)
    # ---------------------------------------------------------------------------------------- iteration
    X0 = torch.zeros_like(B) if x0 is None else _as_matrix(x0)[0].to(B).clone()
    bnorm = B.norm(dim=0)
    safe_bnorm = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    bound = (1.0 + divergence_slack) * (bnorm / damping + X0.norm(dim=0))
    bound = torch.where(bound > 0, bound, torch.full_like(bound, math.inf))
    start_avg = min(steps_used - 1, math.floor((1.0 - average) * steps_used)) if average > 0 else steps_used
    can_restart = isinstance(sampler, SampledCurvature) and batch_size is None and "trace" in summary
    restarts: list[dict[str, Any]] = []
    products = 0
    example_products = int(measured["example_products"]) if measured else 0  # global, for cost accounting
    while True:
        X = X0.clone()
        avg = torch.zeros_like(X)
        n_avg = 0
        history: list[float] = []
        norm_history: list[float] = []
        diverged = False
        div_msg = ""
        t = 0
        for t in range(1, steps_used + 1):
            HX = sampler(t, X)
            products += X.shape[1]
            example_products += X.shape[1] * (batch_used or 0)
            grad_q = HX + damping * X - B
            history.append(float((grad_q.norm(dim=0) / safe_bnorm).max()))
            X = X - eta_used * grad_q
            norms = X.norm(dim=0)
            norm_history.append(float(norms.max()))
            if not bool(torch.isfinite(norms).all()) or bool((norms > bound).any()):
                diverged = True
                j = int(torch.nan_to_num(norms / bound, nan=math.inf).argmax())
                div_msg = _divergence_message(t, float(norms[j]), float(bound[j]), damping, eta_used, batch_used,
                                              summary)
                break
            if t > start_avg:
                avg += X
                n_avg += 1
            if callback is not None:
                callback(t, X)
        if not (diverged and can_restart and len(restarts) < max_restarts):
            break
        assert isinstance(sampler, SampledCurvature)
        restarts.append({"step": t, "batch_size": sampler.batch_size, "constant": constant})
        constant *= 2.0
        new_batch = max(sampler.batch_size + 1, math.ceil(constant * summary["trace"] / summary["lambda_max"]))
        if not sampler.replacement:
            new_batch = min(new_batch, sampler.pool_size)
        if new_batch <= sampler.batch_size:
            break
        warnings.warn(f"{div_msg} Restarting with C={constant:g}, |B|={new_batch} (restart {len(restarts)} of "
                      f"{max_restarts}).", RuntimeWarning, stacklevel=2)
        sampler = sampler.with_batch_size(new_batch)
        batch_used = new_batch
    info: dict[str, Any] = {
        "damping": damping, "eta": eta_used, "steps": steps_used, "batch_size": batch_used, "constant": constant,
        "settings_source": source, "spectrum": summary, "average": average, "divergence_slack": divergence_slack,
        "norm_history": norm_history, "certificate": None, "restarts": restarts,
        "example_products": example_products, "measured_constant": measured,
    }
    if diverged:
        info["divergence_message"] = div_msg
        result = SolveResult(x=X[:, 0] if squeeze else X, iterations=t, relative_residual=math.inf, converged=False,
                             method="lissa", num_products=products, history=history, diverged=True, info=info)
        if on_divergence == "raise":
            raise DivergenceError(div_msg)
        warnings.warn(div_msg, RuntimeWarning, stacklevel=2)
        return result
    if n_avg > 0:
        X = avg / n_avg
    # -------------------------------------------------------------------------------------- certificate
    cert_op = certificate_operator
    if cert_op is None and is_sampled and certificate_size is not None:
        assert isinstance(sampler, SampledCurvature)
        cert_op = sampler.certificate_operator(certificate_size)
    residual = math.nan
    if cert_op is not None:
        R = torch.stack([cert_op.matvec(X[:, j]) for j in range(X.shape[1])], 1) + damping * X - B
        products += X.shape[1]
        residual = float((R.norm(dim=0) / safe_bnorm).max())
        info["certificate"] = {"relative_residual": residual, "num_products": X.shape[1],
                               "sample": "held-out" if certificate_operator is None else "given"}
    converged = True if cert_op is None else residual <= certificate_rtol
    return SolveResult(x=X[:, 0] if squeeze else X, iterations=t, relative_residual=residual, converged=converged,
                       method="lissa", num_products=products, history=history, diverged=False, info=info)
