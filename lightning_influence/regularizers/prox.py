r"""The metric forms and the solver behind :meth:`Regularizer.prox`: FISTA on the quadratic model.

A metric :math:`D` (:data:`Metric`) is a dense ``(P, P)`` tensor, a :data:`MatVec` callable ``x -> D @ x`` or a
:class:`SupportsMatvec` object. The solver minimises

.. math::

    F(x) = \tfrac12 (x - v)^\top D (x - v) + \lambda\pi(x)

given only products with :math:`D` and the penalty's closed-form step
:math:`u, s \mapsto \operatorname{prox}_{s\lambda\pi}(u)`, so it knows nothing of the regulariser classes:

* ``_lipschitz_estimate``: the step constant :math:`L \approx \lambda_{\max}(D)`, exact by ``eigvalsh`` for a
  dense metric up to 2048 coordinates (which also checks that :math:`D` is PSD), otherwise
  :func:`~lightning_influence.spectrum.lanczos_lambda_max` times a 5 % margin. Ritz values are lower bounds of
  :math:`\lambda_{\max}`; the margin and FISTA's backtracking make an underestimate safe.
* ``_fista``: FISTA with gradient-based adaptive restart, backtracking on :math:`L` and, when given a
  ``polish`` callable, an exact solve on the support once the sign pattern is stable, accepted only if it
  lowers the residual. It returns a :class:`ProxResult`, the solution with its convergence certificate.

Plain PyTorch; any floating dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_influence.exceptions import ConfigurationError, NonFiniteError
from lightning_influence.operators.base import FunctionOperator
from lightning_influence.spectrum import lanczos_lambda_max

__all__ = ["MatVec", "Metric", "ProxResult", "SupportsMatvec"]

MatVec = Callable[[Tensor], Tensor]
"""A symmetric positive-(semi)definite linear operator given as ``x -> D @ x``."""


@runtime_checkable
class SupportsMatvec(Protocol):
    """Any linear-operator object with a ``matvec`` method (e.g. :mod:`~lightning_influence.operators`).

    Example::

        >>> import torch
        >>> from lightning_influence.regularizers import L1
        >>> from lightning_influence.spectrum import DenseOperator
        >>> D = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> isinstance(DenseOperator(D), SupportsMatvec), isinstance(D, SupportsMatvec)
        (True, False)
        >>> # an operator metric gives the same prox as the dense matrix it wraps
        >>> v = torch.tensor([1.0, -0.1], dtype=torch.float64)
        >>> res = L1(0.3).prox(v, DenseOperator(D), tol=1e-12)
        >>> # closed form: x_2 = 0 and, on the support, 2 (x_1 - 1) + 0.5 (0 + 0.1) + 0.3 = 0, so x_1 = 0.825
        >>> res.converged, torch.allclose(res.x, L1(0.3).prox(v, D, tol=1e-12).x), [round(t, 8) for t in res.x.tolist()]
        (True, True, [0.825, 0.0])
    """

    def matvec(self, v: Tensor, /) -> Tensor:
        """Return ``D @ v``."""
        ...


Metric = Tensor | MatVec | SupportsMatvec
"""A metric: a dense ``(P, P)`` tensor, a matrix-vector product callable, or an object with ``matvec``."""

_ProxStep = Callable[[Tensor, float | Tensor], Tensor]
"""The penalty's closed-form step ``(u, s) -> prox_{s * strength * pi}(u)`` (no validation)."""

_Polish = Callable[[Tensor, Tensor], Tensor | None]
"""``(D v, x) -> exact minimiser on the support/sign pattern of x``, or None if there is none."""

# Dense metrics up to this size get an exact eigendecomposition (Lipschitz constant + PSD check);
# larger ones use Lanczos like operator metrics.
_DENSE_EIGH_MAX_SIZE = 2048
# Lanczos for lambda_max(D) when no Lipschitz constant is given: at most this many products, stopping at this
# relative Ritz residual; the Ritz value (a lower bound) is multiplied by the safety margin.
_LANCZOS_ITERATIONS = 30
_LANCZOS_TOL = 1e-4
_LIPSCHITZ_SAFETY = 1.05
# The active-set solve is attempted once the sign pattern of the iterate is stable for this many iterations.
_PATTERN_STABLE_ITERS = 3


@dataclass
class ProxResult:
    r"""Result of :meth:`Regularizer.prox` together with its convergence certificate.

    The residual is the norm of the proximal-gradient mapping relative to the gradient at zero,

    .. math::

        r(x) = \frac{L \,\lVert x - \operatorname{prox}_{\lambda\pi/L}\big(x - D(x - v)/L\big)\rVert_2}
                    {\lVert D v \rVert_2},

    which is zero exactly at the minimiser (the analogue of CG's relative residual
    :math:`\lVert b - Ax\rVert/\lVert b\rVert`). For a strongly convex problem the relative error
    of :math:`x` is at most of order :math:`\kappa(D)\, r(x)`.

    Attributes:
        x: The (approximate) proximal point, same shape/dtype/device as ``v``.
        iterations: FISTA iterations performed (0 for closed forms and for an already optimal ``x0``).
        residual: Relative residual :math:`r(x)` of the returned ``x`` (0.0 for closed forms).
        converged: Whether ``residual <= tol``.
        matvecs: Number of metric-vector products used (including the Lipschitz estimate).
        method: ``"identity"``, ``"closed_form"``, ``"fista"`` or ``"fista+active_set"``.
        lipschitz: The step-size constant :math:`L` finally used (``None`` for closed forms).

    Example::

        >>> import torch
        >>> from lightning_influence.regularizers import ProxResult
        >>> ProxResult(x=torch.zeros(2), iterations=0, residual=0.0, converged=True).to_dict()["converged"]
        True
    """

    x: Tensor
    iterations: int
    residual: float
    converged: bool
    matvecs: int = 0
    method: str = "closed_form"
    lipschitz: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable summary (without the vector ``x``) for logs and reports.

        Returns:
            Dictionary with ``iterations``, ``residual``, ``converged``, ``matvecs``, ``method``, ``lipschitz``,
            ``num_params`` and ``num_nonzero``.

        Example::

            >>> import torch
            >>> ProxResult(torch.tensor([0.0, 2.0]), 3, 1e-12, True).to_dict()["num_nonzero"]
            1
        """
        return {
            "iterations": int(self.iterations),
            "residual": float(self.residual),
            "converged": bool(self.converged),
            "matvecs": int(self.matvecs),
            "method": self.method,
            "lipschitz": None if self.lipschitz is None else float(self.lipschitz),
            "num_params": int(self.x.numel()),
            "num_nonzero": int(torch.count_nonzero(self.x).item()),
        }


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a, b).item())


def _norm(a: Tensor) -> float:
    return float(torch.linalg.vector_norm(a).item())


# ----------------------------------------------------------------------------------------------------------
# The metric: dense checks, operator checks, Lipschitz constant
# ----------------------------------------------------------------------------------------------------------
def _check_dense_metric(metric: Tensor, num_params: int) -> Tensor:
    """Validate a dense ``(P, P)`` metric.

    Returns:
        Its exact symmetrisation ``(D + D^T) / 2``.

    Raises:
        ConfigurationError: If it is not square, does not match ``num_params``, is not floating, not finite or
            not symmetric up to ``sqrt(eps)`` relative to its largest entry.
    """
    if metric.ndim != 2 or metric.shape[0] != metric.shape[1]:
        raise ConfigurationError(f"metric must be a square (P, P) matrix, got shape {tuple(metric.shape)}")
    if metric.shape[0] != num_params:
        raise ConfigurationError(
            f"metric has shape {tuple(metric.shape)} but v has {num_params} entries; expected ({num_params}, "
            f"{num_params})"
        )
    if not metric.is_floating_point():
        raise ConfigurationError(f"metric must have a floating dtype, got {metric.dtype}")
    if not bool(torch.isfinite(metric).all()):
        raise ConfigurationError("metric contains non-finite values (NaN or Inf)")
    scale = float(metric.abs().max().item()) if metric.numel() else 0.0
    asym = float((metric - metric.T).abs().max().item()) if metric.numel() else 0.0
    if asym > math.sqrt(torch.finfo(metric.dtype).eps) * max(scale, torch.finfo(metric.dtype).tiny):
        raise ConfigurationError(
            f"metric must be symmetric: max |D - D^T| = {asym:.3e} (max |D| = {scale:.3e}); "
            "symmetrise it with (D + D.T) / 2"
        )
    return 0.5 * (metric + metric.T)


def _checked_matvec(operator: MatVec) -> MatVec:
    """Wrap a user's ``x -> D @ x``.

    Returns:
        The same product, raising on a wrong shape and cast to the dtype of ``x``.

    Raises:
        ConfigurationError: From the returned callable, if ``operator(x)`` is not a tensor shaped like ``x``.
    """

    def matvec(x: Tensor) -> Tensor:
        out = operator(x)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ConfigurationError(
                f"metric(x) must return a tensor of shape {tuple(x.shape)} like x (the product D @ x), got {shape}"
            )
        return out.to(dtype=x.dtype)

    return matvec


def _dense_lambda_max(dense: Tensor) -> float:
    eig = torch.linalg.eigvalsh(dense)
    lam_max = float(eig[-1].item())
    lam_min = float(eig[0].item())
    eps = torch.finfo(dense.dtype).eps
    if lam_max <= 0 or lam_min < -100 * eps * dense.shape[0] * abs(lam_max):
        raise ConfigurationError(
            f"metric must be positive (semi)definite: eigenvalues span [{lam_min:.3e}, {lam_max:.3e}]; "
            "add damping (D + mu * I)"
        )
    return lam_max


def _lipschitz_estimate(matvec: MatVec, like: Tensor, dense: Tensor | None = None) -> tuple[float, int]:
    r"""Step constant :math:`L \approx \lambda_{\max}(D)` for ``_fista``.

    Exact ``eigvalsh`` for a ``dense`` metric up to ``_DENSE_EIGH_MAX_SIZE`` coordinates (0 products);
    otherwise seeded Lanczos (never touches the global RNG) on ``matvec``, times ``_LIPSCHITZ_SAFETY``.

    Returns:
        ``(L, metric products used)``.

    Raises:
        ConfigurationError: If the metric is not positive (semi)definite by this estimate.
    """
    if dense is not None and dense.shape[0] <= _DENSE_EIGH_MAX_SIZE:
        return _dense_lambda_max(dense), 0
    op = FunctionOperator(matvec, like.numel(), like.dtype, like.device)
    est = lanczos_lambda_max(op, _LANCZOS_ITERATIONS, tol=_LANCZOS_TOL)
    if not est.value > 0:
        raise ConfigurationError(
            f"metric does not look positive (semi)definite: Lanczos gives lambda_max = {est.value:.3e}; "
            "pass lipschitz= explicitly or add damping"
        )
    return _LIPSCHITZ_SAFETY * est.value, est.num_products


# ----------------------------------------------------------------------------------------------------------
# FISTA
# ----------------------------------------------------------------------------------------------------------
class _Quadratic:
    """The smooth part f(x) = 1/2 (x - v)^T D (x - v), the prox step, and a count of products with D."""

    def __init__(self, dv: Tensor, matvec: MatVec, prox_step: _ProxStep) -> None:
        self.dv = dv
        self._matvec = matvec
        self.prox_step = prox_step
        self.products = 0
        scale = _norm(dv)
        self.scale = 1.0 if scale == 0.0 else scale  # v = 0 (or D v = 0): absolute residual

    def matvec(self, x: Tensor) -> Tensor:
        self.products += 1
        return self._matvec(x)

    def residual(self, x: Tensor, dx: Tensor, lip: float) -> float:
        """Relative proximal-gradient residual r(x) of :class:`ProxResult`, given ``dx = D x``."""
        grad = dx - self.dv
        step_point = self.prox_step(x - grad / lip, 1.0 / lip)
        return lip * _norm(x - step_point) / self.scale


def _backtracking_step(model: _Quadratic, y: Tensor, dy: Tensor, lip: float) -> tuple[Tensor, Tensor, float]:
    """Proximal-gradient step from ``y``; doubles ``lip`` while D's curvature along the step exceeds it."""
    grad_y = dy - model.dv
    while True:
        x_new = model.prox_step(y - grad_y / lip, 1.0 / lip)
        dx_new = model.matvec(x_new)
        d = x_new - y
        dd = _dot(d, d)
        curvature = _dot(d, dx_new - dy)
        if dd == 0.0 or not math.isfinite(curvature) or curvature <= lip * dd * (1.0 + 1e-10):
            return x_new, dx_new, lip  # a non-finite product is reported by the caller
        lip = max(2.0 * lip, 1.05 * curvature / dd)


class _ActiveSetPolish:
    """Proposes the exact solve on the support once the sign pattern of the iterates is stable (once per pattern)."""

    def __init__(self, solve: _Polish, x: Tensor) -> None:
        self.solve = solve
        self.pattern = torch.sign(x)
        self.stable = 0
        self.tried: Tensor | None = None

    def propose(self, dv: Tensor, x: Tensor) -> Tensor | None:
        new_pattern = torch.sign(x)
        if torch.equal(new_pattern, self.pattern):
            self.stable += 1
        else:
            self.pattern, self.stable = new_pattern, 0
        if self.stable < _PATTERN_STABLE_ITERS or (self.tried is not None and torch.equal(self.pattern, self.tried)):
            return None
        self.tried = self.pattern
        candidate = self.solve(dv, x)
        return candidate if candidate is not None and bool(torch.isfinite(candidate).all()) else None


def _fista(
    prox_step: _ProxStep,
    *,
    v: Tensor,
    dv: Tensor,
    matvec: MatVec,
    lipschitz: float,
    x0: Tensor | None,
    tol: float,
    max_iter: int,
    polish: _Polish | None = None,
    name: str = "Regularizer",
) -> ProxResult:
    """FISTA with gradient restart and backtracking on f(x) = 1/2 (x - v)^T D (x - v) plus the penalty.

    ``dv`` is ``D v`` (already computed by the caller); ``matvecs`` of the result counts only the products
    made here. ``name`` prefixes the error message.

    Returns:
        The last iterate (or accepted active-set candidate) with its residual; ``converged`` is ``residual <= tol``.

    Raises:
        NonFiniteError: If an iterate becomes non-finite (the metric product returned NaN/Inf).
    """
    model = _Quadratic(dv, matvec, prox_step)
    lip = lipschitz
    if x0 is None:
        x, dx = v.clone(), dv.clone()
    else:
        x = x0.clone()
        dx = model.matvec(x)
    res = model.residual(x, dx, lip)
    method = "fista"
    if res <= tol:
        return ProxResult(
            x=x, iterations=0, residual=res, converged=True, matvecs=model.products, method=method, lipschitz=lip
        )

    x_prev, dx_prev = x, dx
    t = 1.0
    tracker = None if polish is None else _ActiveSetPolish(polish, x)
    iterations = 0
    for k in range(1, max_iter + 1):
        iterations = k
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        beta = (t - 1.0) / t_next
        y = x + beta * (x - x_prev)
        dy = dx + beta * (dx - dx_prev)
        x_new, dx_new, lip = _backtracking_step(model, y, dy, lip)
        if _dot(y - x_new, x_new - x) > 0.0:  # gradient restart (O'Donoghue & Candes 2015)
            t_next = 1.0
        x_prev, dx_prev, x, dx, t = x, dx, x_new, dx_new, t_next
        res = model.residual(x, dx, lip)
        if res <= tol:
            break
        if not math.isfinite(res):
            raise NonFiniteError(
                f"{name}.prox: the iterate became non-finite at iteration {k} (residual {res}); "
                "the metric product returned NaN/Inf or is not a fixed symmetric PSD operator"
            )
        candidate = None if tracker is None else tracker.propose(dv, x)
        if candidate is not None:
            d_candidate = model.matvec(candidate)
            res_candidate = model.residual(candidate, d_candidate, lip)
            if res_candidate < res:
                method = "fista+active_set"
                x, dx, res, t = candidate, d_candidate, res_candidate, 1.0
                x_prev, dx_prev = x, dx
                if res <= tol:
                    break
    return ProxResult(
        x=x,
        iterations=iterations,
        residual=res,
        converged=res <= tol,
        matvecs=model.products,
        method=method,
        lipschitz=lip,
    )
