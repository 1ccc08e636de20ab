r"""Solvers for damped curvature systems :math:`(A + \lambda I) x = b`.

* :func:`conjugate_gradient`: CG on a fixed sample (Fisher-CG), to a relative residual tolerance, with several
  right-hand sides at once (one independent CG per column, products batched per iteration).
* :func:`dense_solve`: exact Cholesky/eigen solve of the dense matrix, for tiny models and tests.

Every solver returns a :class:`SolveResult` carrying its certificate (iterations, relative residual,
convergence flag) so that the logs and the report can show how far the answer can be trusted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_influence.exceptions import ConfigurationError, NonFiniteError
from lightning_influence.spectrum import LinearOperatorLike


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

    def matmat(X: Tensor) -> Tensor:
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
                f"positive definite (damping={damping}). Use the GNH/Fisher rather than the Hessian, or increase damping."
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
