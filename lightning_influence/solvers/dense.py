r"""Exact solve of :math:`(A + \lambda I) X = B` through the dense matrix (tiny models, tests, ground truth)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_influence.exceptions import ConfigurationError
from lightning_influence.operators.base import LinearOperator, as_matrix
from lightning_influence.solvers.result import SolveResult

__all__ = ["dense_solve", "positive_definite_factor"]


def positive_definite_factor(A: Tensor) -> Tensor | None:
    r"""Lower Cholesky factor of a symmetric matrix that is numerically positive definite, else ``None``.

    Numerically: the factorisation succeeds and every pivot :math:`L_{ii}^2` (each bounds the smallest eigenvalue
    from above) exceeds :math:`P\,\epsilon \max(1, \max_i A_{ii})`, so a singular PSD matrix whose factorisation
    survives on rounding is refused too.

    Returns:
        ``L`` with :math:`A = L L^\top`, or ``None``.

    Example::

        >>> positive_definite_factor(torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
        tensor([[2., 0.],
                [0., 1.]], dtype=torch.float64)
        >>> positive_definite_factor(torch.ones(2, 2, dtype=torch.float64)) is None   # singular
        True
    """
    L, info = torch.linalg.cholesky_ex(A)
    floor = max(float(A.diagonal().max()), 1.0) * A.shape[0] * torch.finfo(A.dtype).eps
    if int(info) != 0 or float(L.diagonal().min()) ** 2 <= floor:
        return None
    return L


def dense_solve(op: LinearOperator | Tensor, b: Tensor, *, damping: float = 0.0) -> SolveResult:
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
    B, squeeze = as_matrix(b.to(A.dtype))
    L = positive_definite_factor(A)
    if L is not None:
        X = torch.cholesky_solve(B, L)
    else:
        evals, evecs = torch.linalg.eigh(A)
        if float(evals[0]) <= 0:
            raise ConfigurationError(
                f"the damped matrix is not positive definite (smallest eigenvalue {float(evals[0]):.3g} with "
                f"damping={damping}): the matrix is singular or indefinite; increase damping to more than "
                f"{max(0.0, -float(evals[0])):.3g} (approximate CV: damping='auto' adds the least damping that "
                "makes it positive definite)."
            )
        X = evecs @ ((evecs.T @ B) / evals.unsqueeze(1))
    res = float(((B - A @ X).norm(dim=0) / B.norm(dim=0).clamp_min(1e-300)).max())
    x = X[:, 0] if squeeze else X
    return SolveResult(x=x, iterations=1, relative_residual=res, converged=math.isfinite(res), method="dense",
                       num_products=A.shape[0] if not isinstance(op, Tensor) else 0)
