r"""Conjugate gradient for :math:`(A + \lambda I) X = B` on a fixed sample (Fisher-CG), true-residual certified."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_influence.config import CGConfig
from lightning_influence.exceptions import ConfigurationError, NonFiniteError
from lightning_influence.operators.base import LinearOperator, as_matrix
from lightning_influence.solvers.result import SolveResult

__all__ = ["RTOL_FLOOR_EPS", "conjugate_gradient", "effective_rtol"]

#: The tightest relative residual CG is run to, in machine epsilons of the right-hand side's dtype (about 1.2e-6
#: in float32, 2.2e-15 in float64). Below it a float32 solve's true residual stalls (measured: 1.3e-7 to 3e-6 on
#: the GPT-2 example's fold solves) while the recursive one keeps falling, so a tighter ``rtol`` only buys
#: iterations, and a certificate that then reads "not converged" is a statement about the dtype, not the solve.
#: The floor is what a well-conditioned float32 solve reaches; the attainable residual grows with the condition
#: number (about kappa * eps), so an ill-conditioned float32 solve may still stop short of it, and says so.
RTOL_FLOOR_EPS = 10.0


def effective_rtol(rtol: float, dtype: torch.dtype) -> float:
    """``rtol`` raised to :data:`RTOL_FLOOR_EPS` machine epsilons of ``dtype`` (the tolerance CG is run to).

    Returns:
        ``max(rtol, RTOL_FLOOR_EPS * eps(dtype))``.

    Example::

        >>> effective_rtol(1e-10, torch.float64), round(effective_rtol(1e-10, torch.float32), 9)
        (1e-10, 1.192e-06)
    """
    return max(float(rtol), RTOL_FLOOR_EPS * float(torch.finfo(dtype).eps))


def _damped_matmat(op: LinearOperator, damping: float) -> Any:
    def apply(X: Tensor) -> Tensor:
        return op.matmat(X) + damping * X

    return apply


def _cg_iterations(
    apply: Any, B: Tensor, X: Tensor, R: Tensor, rtol: float, limit: int, damping: float,
    precondition: Any = None,
) -> tuple[Tensor, int, int, list[float]]:
    """The (preconditioned) CG recursion, one independent recursion per column, products batched per iteration.

    ``precondition`` maps residuals ``(P, k)`` to :math:`M^{-1} R` (symmetric positive definite); the stopping
    test is on the unpreconditioned residual either way.

    Returns:
        ``(X, iterations, products, history)``.

    Raises:
        ConfigurationError: On a direction of non-positive curvature.
        NonFiniteError: On non-finite residuals.
    """
    bnorm = B.norm(dim=0)
    safe_bnorm = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    Z = R if precondition is None else precondition(R)
    P = Z.clone()
    rs = (R * R).sum(0)
    rz = (R * Z).sum(0)
    history = [float((rs.sqrt() / safe_bnorm).max())]
    active = rs.sqrt() > rtol * bnorm
    it = products = 0
    while bool(active.any()) and it < limit:
        AP = torch.zeros_like(P)
        AP[:, active] = apply(P[:, active])
        products += int(active.sum())
        pAp = (P * AP).sum(0)
        if bool((pAp[active] <= 0).any()):
            raise ConfigurationError(
                "conjugate gradient met a direction of non-positive curvature: the operator plus damping is not "
                f"positive definite (damping={damping}). Use the GNH/Fisher rather than the Hessian, or increase "
                "damping."
            )
        alpha = torch.where(active, rz / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rz))
        X = X + alpha * P
        R = R - alpha * AP
        rs_new = (R * R).sum(0)
        if not bool(torch.isfinite(rs_new).all()):
            raise NonFiniteError(f"conjugate gradient produced non-finite residuals at iteration {it + 1}.")
        Z = R if precondition is None else precondition(R)
        rz_new = (R * Z).sum(0)
        beta = torch.where(active, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        P = torch.where(active, Z + beta * P, P)
        rs = torch.where(active, rs_new, rs)
        rz = torch.where(active, rz_new, rz)
        it += 1
        history.append(float((rs.sqrt() / safe_bnorm).max()))
        active = active & (rs.sqrt() > rtol * bnorm)
    return X, it, products, history


def conjugate_gradient(
    op: LinearOperator,
    b: Tensor,
    *,
    damping: float = 0.0,
    config: CGConfig | None = None,
    x0: Tensor | None = None,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
    **overrides: Any,
) -> SolveResult:
    r"""Conjugate gradient for :math:`(A + \lambda I) x = b` with a relative residual tolerance.

    ``A`` must be symmetric positive semi-definite (GNH/Fisher) and :math:`A + \lambda I` positive definite.
    Each column of ``b`` runs its own CG recursion; the products of one iteration are computed together
    (one ``matmat``). The returned ``relative_residual`` is recomputed from an explicit product at exit (not the
    recursive estimate), so it is a true certificate.

    Args:
        op: The operator (undamped; pass the damping here), e.g. a :class:`~lightning_influence.operators.GNHOperator`.
        b: Right-hand side(s), ``(P,)`` or ``(P, k)``.
        damping: :math:`\lambda \ge 0`.
        config: :class:`~lightning_influence.config.CGConfig` (``rtol``, ``max_iter``, ``warn``).
        x0: Warm start.
        preconditioner: :math:`R \mapsto M^{-1} R` on ``(P, k)`` blocks, symmetric positive definite (e.g. the
            sketch's Nyström inverse, :func:`~lightning_influence.solvers.pcg.preconditioned_cg`); no products.
        **overrides: Single fields of ``config`` (``rtol=1e-8``, ``max_iter=50``, ``warn=False``).

    Returns:
        The solution and its certificate.

    Raises:
        ConfigurationError: For negative damping, a bad shape or setting, or a direction of non-positive curvature
            (the operator plus damping is not positive definite: increase ``damping``).
        NonFiniteError: If the iteration produces NaN/Inf.

    Example::

        >>> from lightning_influence.operators import DenseOperator
        >>> a = DenseOperator(torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
        >>> conjugate_gradient(a, torch.tensor([2.0, 4.0], dtype=torch.float64), damping=0.0).x
        tensor([1., 1.], dtype=torch.float64)
    """
    cfg = CGConfig.resolve(config, **overrides)
    if damping < 0:
        raise ConfigurationError(f"damping must be >= 0, got {damping}.")
    B, squeeze = as_matrix(b)
    n, k = B.shape
    if n != op.num_params:
        raise ConfigurationError(f"right-hand side has {n} rows but the operator has {op.num_params} parameters.")
    apply = _damped_matmat(op, damping)
    limit = cfg.max_iter if cfg.max_iter is not None else min(n, 1000)
    X = torch.zeros_like(B) if x0 is None else as_matrix(x0)[0].clone().to(B)
    R = B - apply(X) if x0 is not None else B.clone()
    rtol = effective_rtol(cfg.rtol, B.dtype)
    X, it, products, history = _cg_iterations(apply, B, X, R, rtol, limit, damping, preconditioner)
    products += k if x0 is not None else 0
    bnorm = B.norm(dim=0)
    safe_bnorm = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    true_res = float(((B - apply(X)).norm(dim=0) / safe_bnorm).max())
    products += k
    converged = true_res <= rtol * 10  # recursive residual can drift slightly below the true one
    if not converged and cfg.warn:
        warnings.warn(
            f"conjugate gradient stopped after {it} iterations with relative residual {true_res:.3g} > "
            f"rtol={rtol:.3g}; raise max_iter or damping for a tighter solve.",
            RuntimeWarning,
            stacklevel=2,
        )
    x = X[:, 0] if squeeze else X
    method = "cg" if preconditioner is None else "pcg"
    return SolveResult(x=x, iterations=it, relative_residual=true_res, converged=converged, method=method,
                       num_products=products, history=history,
                       info={"rtol": rtol, "rtol_requested": cfg.rtol, "damping": damping})
