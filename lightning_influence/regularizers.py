r"""Non-smooth regularisers and their proximal operators in a non-diagonal metric.

The approximate-Fisher influence / approximate cross-validation step of AFIF needs, for a penalty
:math:`\lambda\pi`, the proximal operator in the metric of a curvature matrix :math:`D` (a Fisher,
Gauss-Newton or Hessian approximation):

.. math::

    \operatorname{prox}^{D}_{\lambda\pi}(v)
    = \arg\min_\theta \tfrac12 (\theta - v)^\top D (\theta - v) + \lambda \pi(\theta),

which is the paper's :math:`\arg\min_\theta (v-\theta)^\top D (v-\theta) + 2\lambda\pi(\theta)`
divided by two. For diagonal :math:`D` it is closed form; otherwise it is solved on the quadratic model by
FISTA with adaptive (gradient) restart and backtracking, and, for a dense :math:`D` and separable
penalties (L1, elastic net), by an exact active-set solve once FISTA has identified the support.

Everything acts on a FLAT parameter vector :math:`\theta \in \mathbb{R}^P`; an optional boolean ``mask``
marks the penalised coordinates (``False`` = unpenalised, e.g. biases). Regularisers are dataclasses with
plain arguments so that they can be configured from YAML (``class_path`` + ``init_args``).

This module is plain PyTorch (no Lightning import) and works in any floating dtype (float64 for tests).

Example::

    >>> import torch
    >>> from lightning_influence.regularizers import L1
    >>> D = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    >>> v = torch.tensor([1.0, -0.1], dtype=torch.float64)
    >>> res = L1(0.3).prox(v, D, tol=1e-12)
    >>> res.converged, res.x[1].item()
    (True, 0.0)
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_influence.exceptions import ConfigurationError, NonFiniteError

__all__ = [
    "L1",
    "ElasticNet",
    "GroupLasso",
    "MatVec",
    "Metric",
    "NoRegularizer",
    "ProxResult",
    "Regularizer",
    "SupportsMatvec",
    "mask_from_module",
    "mask_from_named_parameters",
]

MatVec = Callable[[Tensor], Tensor]
"""A symmetric positive-(semi)definite linear operator given as ``x -> D @ x``."""


@runtime_checkable
class SupportsMatvec(Protocol):
    """Any linear-operator object with a ``matvec`` method (e.g. :mod:`~lightning_influence.operators`).

    Example::

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

MaskLike = Tensor | Sequence[bool] | None

# Dense metrics up to this size get an exact eigendecomposition (Lipschitz constant + PSD check);
# larger ones use power iteration like operator metrics.
_DENSE_EIGH_MAX_SIZE = 2048
# Power iteration for lambda_max(D) when no Lipschitz constant is given (operator form).
_POWER_ITERATIONS = 30
_POWER_SAFETY = 1.05
# The active-set solve is attempted once the sign pattern of the iterate is stable for this many iterations.
_PATTERN_STABLE_ITERS = 3


# ----------------------------------------------------------------------------------------------------------
# Result type
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------------------
def _check_strength(strength: object) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise ConfigurationError(
            f"strength must be a real number >= 0 (use strength=0 for no penalty), got {strength!r}"
        )
    value = float(strength)
    if not math.isfinite(value):
        raise ConfigurationError(f"strength must be finite and >= 0 (use strength=0 for no penalty), got {value}")
    if value < 0:
        raise ConfigurationError(f"strength must be >= 0 (use strength=0 for no penalty), got {value}")
    return value


def _as_mask(mask: MaskLike) -> Tensor | None:
    if mask is None:
        return None
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise ConfigurationError(
                f"mask must be a boolean tensor (True = penalised, False = unpenalised), got dtype {mask.dtype}"
            )
        if mask.ndim != 1:
            raise ConfigurationError(f"mask must be 1-D over the flat parameter vector, got shape {tuple(mask.shape)}")
        return mask.detach().clone()
    if isinstance(mask, (str, bytes)) or not isinstance(mask, Sequence):
        raise ConfigurationError(f"mask must be a boolean tensor or a list of booleans, got {type(mask).__name__}")
    if not all(isinstance(m, bool) for m in mask):
        raise ConfigurationError(
            "mask must contain booleans (True = penalised, False = unpenalised), not indices; "
            "build it with mask_from_named_parameters(...)"
        )
    return torch.tensor(list(mask), dtype=torch.bool)


def _check_vector(name: str, t: object, *, check_finite: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise ConfigurationError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 1:
        raise ConfigurationError(
            f"{name} must be a 1-D flat parameter vector, got shape {tuple(t.shape)}; flatten it with .reshape(-1)"
        )
    if not t.is_floating_point():
        raise ConfigurationError(f"{name} must have a floating dtype (float64 recommended), got {t.dtype}")
    if check_finite and not bool(torch.isfinite(t).all()):
        raise ConfigurationError(f"{name} contains non-finite values (NaN or Inf)")
    return t


def _check_step(step: float | Tensor, v: Tensor) -> float | Tensor:
    if isinstance(step, Tensor):
        if step.ndim == 0:
            step = float(step.item())
        else:
            if step.shape != v.shape:
                raise ConfigurationError(
                    f"step must be a positive float or a tensor shaped like v {tuple(v.shape)}, "
                    f"got shape {tuple(step.shape)}"
                )
            if not bool(torch.isfinite(step).all()) or not bool((step > 0).all()):
                raise ConfigurationError("step must be finite and > 0 in every coordinate")
            return step.to(dtype=v.dtype, device=v.device)
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise ConfigurationError(f"step must be a positive float or tensor, got {type(step).__name__}")
    value = float(step)
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"step must be finite and > 0, got {value}")
    return value


def _check_solver_args(tol: float, max_iter: int, lipschitz: float | None) -> None:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ConfigurationError(f"tol must be a finite float >= 0 (relative residual), got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ConfigurationError(f"max_iter must be an int >= 0, got {max_iter!r}")
    if lipschitz is not None and (
        isinstance(lipschitz, bool)
        or not isinstance(lipschitz, (int, float))
        or not math.isfinite(lipschitz)
        or lipschitz <= 0
    ):
        raise ConfigurationError(
            f"lipschitz must be None (estimate by power iteration) or a finite float > 0 "
            f"(an estimate of lambda_max(D)), got {lipschitz!r}"
        )


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a, b).item())


def _norm(a: Tensor) -> float:
    return float(torch.linalg.vector_norm(a).item())


# ----------------------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------------------
class Regularizer(ABC):
    r"""Base class of penalties :math:`\lambda\pi(\theta)` over a flat parameter vector.

    Subclasses are dataclasses with plain arguments (floats, bools, lists) so they can be configured from
    YAML. ``strength`` is :math:`\lambda \ge 0`; a boolean ``mask`` (length :math:`P`) marks penalised
    coordinates. The proximal operator in a symmetric positive-(semi)definite metric :math:`D` is

    .. math::

        \operatorname{prox}^{D}_{\lambda\pi}(v)
        = \arg\min_\theta \tfrac12 (\theta - v)^\top D (\theta - v) + \lambda \pi(\theta).

    Subclasses implement :meth:`_pi` (unscaled penalty) and :meth:`_prox_core` (closed-form prox for a
    scalar or per-coordinate step); the non-diagonal prox is generic.

    Example::

        >>> import torch
        >>> from lightning_influence.regularizers import L1
        >>> reg = L1(0.5, mask=[True, False])
        >>> reg.penalty(torch.tensor([-2.0, 3.0], dtype=torch.float64)).item()
        1.0
    """

    strength: float

    # -- hooks -------------------------------------------------------------------------------------------------
    @abstractmethod
    def _pi(self, theta: Tensor) -> Tensor:
        """Unscaled penalty pi(theta) as a differentiable scalar (no validation)."""

    @abstractmethod
    def _prox_core(self, v: Tensor, step: float | Tensor) -> Tensor:
        """Closed-form prox of step * strength * pi at v (no validation); step scalar or per-coordinate."""

    def check_size(self, num_params: int) -> None:
        """Check that the mask/groups fit a flat parameter vector of ``num_params`` entries.

        Call it once when the parameter vector is known (e.g. in a callback's ``setup``) to fail early.

        Args:
            num_params: Length :math:`P` of the flat parameter vector.

        Raises:
            ConfigurationError: If the mask length differs from ``num_params`` or a group index is out of range.

        Example::

            >>> L1(0.1, mask=[True, False]).check_size(2)
        """
        self._check_size(num_params)

    def _check_size(self, num_params: int) -> None:
        """Raise if the regulariser's mask/groups do not fit a vector of ``num_params`` entries."""
        mask = self._mask_tensor()
        if mask is not None and mask.numel() != num_params:
            raise ConfigurationError(
                f"mask has length {mask.numel()} but the flat parameter vector has {num_params} entries; "
                "build the mask with mask_from_named_parameters over the same parameters"
            )

    def _mask_tensor(self) -> Tensor | None:
        return None

    def _is_trivial(self) -> bool:
        """Whether the prox is the identity (no strength or nothing penalised)."""
        mask = self._mask_tensor()
        return self.strength == 0.0 or (mask is not None and not bool(mask.any()))

    def _diag_closed_form_ok(self, diag: Tensor) -> bool:
        """Whether prox in the metric diag(diag) equals ``_prox_core(v, 1 / diag)``."""
        return True

    def _active_set_candidate(self, dense: Tensor, dv: Tensor, x: Tensor) -> Tensor | None:
        """Exact minimiser on the support/sign pattern of ``x`` (dense metric), or None if unavailable."""
        return None

    # -- public API --------------------------------------------------------------------------------------------
    def penalty(self, theta: Tensor) -> Tensor:
        r"""Return :math:`\lambda\pi(\theta)` as a differentiable scalar tensor.

        Suitable for adding to a training loss; autograd gives a subgradient at kinks (0 at
        :math:`\theta_i = 0` for L1, 0 for a zero group). For speed on the training hot path the values of
        ``theta`` are not checked for NaN/Inf (no device synchronisation).

        .. math::

            \text{penalty}(\theta) = \lambda\,\pi(\theta)

        Args:
            theta: Flat parameter vector of shape ``(P,)`` (floating dtype).

        Returns:
            A 0-d tensor with the dtype/device of ``theta``.

        Raises:
            ConfigurationError: If ``theta`` is not a 1-D floating tensor or does not match the mask/groups.

        Example::

            >>> import torch
            >>> L1(2.0).penalty(torch.tensor([1.0, -0.5])).item()
            3.0
        """
        theta = _check_vector("theta", theta, check_finite=False)
        self._check_size(theta.numel())
        return self.strength * self._pi(theta)

    def prox_diag(self, v: Tensor, step: float | Tensor) -> Tensor:
        r"""Closed-form prox in the identity (or diagonal) metric.

        .. math::

            \operatorname{prox}_{s\lambda\pi}(v)
            = \arg\min_\theta \tfrac12 \lVert\theta - v\rVert_2^2 / s + \lambda\pi(\theta).

        A per-coordinate ``step`` tensor :math:`s_i` gives the prox in the diagonal metric
        :math:`D = \operatorname{diag}(1/s_i)`.

        Args:
            v: Point of shape ``(P,)``.
            step: Step :math:`s > 0`, a float or a positive tensor shaped like ``v``.

        Returns:
            The proximal point, same shape/dtype/device as ``v``.

        Raises:
            ConfigurationError: On a non-finite or non-1-D ``v``, a non-positive step, or a mask/group size mismatch.

        Example::

            >>> import torch
            >>> L1(1.0).prox_diag(torch.tensor([3.0, -0.5]), 0.5)
            tensor([2.5000, 0.0000])
        """
        v = _check_vector("v", v)
        self._check_size(v.numel())
        checked = _check_step(step, v)
        if self._is_trivial():
            return v.clone()
        return self._prox_core(v, checked)

    def prox(
        self,
        v: Tensor,
        metric: Metric,
        *,
        x0: Tensor | None = None,
        tol: float = 1e-10,
        max_iter: int = 10_000,
        lipschitz: float | None = None,
    ) -> ProxResult:
        r"""Prox in a symmetric positive-(semi)definite metric :math:`D` (dense tensor or matvec callable).

        .. math::

            \operatorname{prox}^{D}_{\lambda\pi}(v)
            = \arg\min_\theta \tfrac12 (\theta - v)^\top D (\theta - v) + \lambda \pi(\theta)

        Solved by FISTA on the quadratic model with gradient-based adaptive restart and backtracking on the
        step constant :math:`L` (so an underestimate of :math:`\lambda_{\max}(D)` is safe), stopping when the
        relative proximal-gradient residual (see :class:`ProxResult`) is ``<= tol``. A dense diagonal
        :math:`D` is solved in closed form. For a dense :math:`D` and L1 / elastic net, once the sign
        pattern is stable an exact linear solve on the active set is tried and accepted only if its residual
        is smaller; it typically ends at machine precision. The residual at ``x0`` is checked first, so an
        already optimal warm start is returned unchanged with ``iterations == 0``.

        Each FISTA iteration costs one metric-vector product; the product :math:`Dv` and (operator form,
        ``lipschitz=None``) up to 30 power-iteration products are extra.

        Args:
            v: Point of shape ``(P,)`` (e.g. the Newton/natural-gradient step :math:`\hat\theta - F^{-1} b`).
            metric: Dense ``(P, P)`` symmetric PSD tensor, or the operator form: an object with a ``matvec``
                method (a :class:`~lightning_influence.operators` operator) or a callable ``x -> D @ x``,
                returning ``(P,)``.
            x0: Warm start of shape ``(P,)``; default ``v``.
            tol: Relative residual tolerance (>= 0).
            max_iter: Maximum number of FISTA iterations (>= 0).
            lipschitz: Estimate of :math:`\lambda_{\max}(D)`; if None it is computed (eigvalsh for dense
                :math:`D` up to 2048, otherwise 30 seeded power iterations times 1.05). Backtracking
                increases it when needed.

        Returns:
            A :class:`ProxResult`; ``x`` has the promoted dtype of ``v`` and ``metric``.

        Raises:
            ConfigurationError: On non-finite or mis-shaped ``v``/``x0``/``metric``, a non-square, non-symmetric or
                indefinite dense metric, a metric whose size does not match ``v``, mask/group size
                mismatches, or invalid ``tol``/``max_iter``/``lipschitz``.
            NonFiniteError: If an operator metric starts returning NaN/Inf during the iterations.

        Warns:
            RuntimeWarning: If the residual is still above ``tol`` after ``max_iter`` iterations (the result is
                returned with ``converged=False``).

        Example::

            >>> import torch
            >>> D = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
            >>> v = torch.tensor([1.0, 1.0], dtype=torch.float64)
            >>> res = ElasticNet(0.1, l1_ratio=0.5).prox(v, lambda x: D @ x, tol=1e-12)
            >>> res.converged
            True
        """
        v = _check_vector("v", v)
        num_params = v.numel()
        self._check_size(num_params)
        _check_solver_args(tol, max_iter, lipschitz)

        dense: Tensor | None = None
        operator: MatVec | None = None
        if isinstance(metric, Tensor):
            dense = _check_dense_metric(metric, num_params)
            dtype = torch.promote_types(v.dtype, dense.dtype)
            dense = dense.to(dtype=dtype, device=v.device)
            v = v.to(dtype=dtype)
        elif isinstance(metric, SupportsMatvec):
            operator = metric.matvec
        elif callable(metric):
            operator = metric
        else:
            raise ConfigurationError(
                f"metric must be a dense (P, P) tensor, a callable x -> D @ x or an object with .matvec, "
                f"got {type(metric).__name__}"
            )
        if x0 is not None:
            x0 = _check_vector("x0", x0)
            if x0.shape != v.shape:
                raise ConfigurationError(f"x0 must have the shape of v {tuple(v.shape)}, got {tuple(x0.shape)}")
            x0 = x0.to(dtype=v.dtype, device=v.device)

        if self._is_trivial():
            return ProxResult(x=v.clone(), iterations=0, residual=0.0, converged=True, method="identity")

        matvecs = 0
        if dense is not None:
            dense_metric = dense
            diag = dense_metric.diagonal()
            off_diagonal_zero = bool(torch.equal(dense_metric, torch.diag_embed(diag)))
            if off_diagonal_zero and bool((diag > 0).all()) and self._diag_closed_form_ok(diag):
                x = self._prox_core(v, 1.0 / diag)
                return ProxResult(x=x, iterations=0, residual=0.0, converged=True, method="closed_form")

            def matvec(x: Tensor) -> Tensor:
                return dense_metric @ x

            if lipschitz is None:
                if num_params <= _DENSE_EIGH_MAX_SIZE:
                    lipschitz = _dense_lambda_max(dense_metric)
                else:
                    lam, used = _power_lambda_max(matvec, v)
                    matvecs += used
                    lipschitz = _POWER_SAFETY * lam

            def active_set(dv: Tensor, x: Tensor) -> Tensor | None:
                return self._active_set_candidate(dense_metric, dv, x)

            polish: Callable[[Tensor, Tensor], Tensor | None] | None = active_set
            dv = matvec(v)
        else:
            assert operator is not None
            user_operator = operator

            def matvec(x: Tensor) -> Tensor:
                out = user_operator(x)
                if not isinstance(out, Tensor) or out.shape != x.shape:
                    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ConfigurationError(
                        f"metric(x) must return a tensor of shape {tuple(x.shape)} like x (the product D @ x), "
                        f"got {shape}"
                    )
                return out.to(dtype=x.dtype)

            dv = matvec(v)
            if not bool(torch.isfinite(dv).all()):
                raise ConfigurationError(
                    "metric(v) returned non-finite values (NaN or Inf); check the curvature operator"
                )
            if lipschitz is None:
                lam, used = _power_lambda_max(matvec, v)
                matvecs += used
                lipschitz = _POWER_SAFETY * lam
            polish = None
        matvecs += 1

        result = _fista(
            self,
            v=v,
            dv=dv,
            matvec=matvec,
            lipschitz=float(lipschitz),
            x0=x0,
            tol=tol,
            max_iter=max_iter,
            polish=polish,
        )
        result.matvecs += matvecs
        if not result.converged:
            warnings.warn(
                f"{type(self).__name__}.prox did not converge: relative residual {result.residual:.3e} > "
                f"tol={tol:.3e} after max_iter={max_iter} iterations ({result.matvecs} metric products). "
                "Increase max_iter, loosen tol, warm-start with x0, or damp an ill-conditioned metric.",
                RuntimeWarning,
                stacklevel=2,
            )
        return result

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable description for logs and reports.

        Returns:
            Dictionary with at least ``type``, ``strength`` and mask statistics (``num_params``,
            ``num_penalised``; ``None`` when every coordinate is penalised by default).

        Example::

            >>> L1(0.1).to_dict()["type"]
            'L1'
        """
        mask = self._mask_tensor()
        return {
            "type": type(self).__name__,
            "strength": float(self.strength),
            "num_params": None if mask is None else int(mask.numel()),
            "num_penalised": None if mask is None else int(mask.sum().item()),
        }


# ----------------------------------------------------------------------------------------------------------
# Metric helpers and the solver
# ----------------------------------------------------------------------------------------------------------
def _check_dense_metric(metric: Tensor, num_params: int) -> Tensor:
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


def _power_lambda_max(matvec: MatVec, like: Tensor) -> tuple[float, int]:
    """Seeded power iteration (never touches the global RNG); returns (Rayleigh quotient, products)."""
    gen = torch.Generator(device=like.device)
    gen.manual_seed(0)
    x = torch.randn(like.shape, generator=gen, dtype=like.dtype, device=like.device)
    x = x / torch.linalg.vector_norm(x)
    lam = 0.0
    used = 0
    for _ in range(_POWER_ITERATIONS):
        y = matvec(x)
        used += 1
        new_lam = _dot(x, y)
        ny = torch.linalg.vector_norm(y)
        if not math.isfinite(new_lam) or float(ny.item()) == 0.0:
            break
        converged = abs(new_lam - lam) <= 1e-4 * abs(new_lam)
        lam = new_lam
        x = y / ny
        if converged:
            break
    if not lam > 0:
        raise ConfigurationError(
            f"metric does not look positive (semi)definite: power iteration gives lambda_max = {lam:.3e}; "
            "pass lipschitz= explicitly or add damping"
        )
    return lam, used


def _fista(
    reg: Regularizer,
    *,
    v: Tensor,
    dv: Tensor,
    matvec: MatVec,
    lipschitz: float,
    x0: Tensor | None,
    tol: float,
    max_iter: int,
    polish: Callable[[Tensor, Tensor], Tensor | None] | None,
) -> ProxResult:
    """FISTA with gradient restart and backtracking on f(x) = 1/2 (x - v)^T D (x - v)."""
    lip = lipschitz
    matvecs = 0
    scale = _norm(dv)
    if scale == 0.0:
        scale = 1.0  # v = 0 (or D v = 0): absolute residual

    def residual(x: Tensor, dx: Tensor) -> float:
        grad = dx - dv
        step_point = reg._prox_core(x - grad / lip, 1.0 / lip)
        return lip * _norm(x - step_point) / scale

    if x0 is None:
        x, dx = v.clone(), dv.clone()
    else:
        x = x0.clone()
        dx = matvec(x)
        matvecs += 1
    res = residual(x, dx)
    method = "fista"
    if res <= tol:
        return ProxResult(
            x=x, iterations=0, residual=res, converged=True, matvecs=matvecs, method=method, lipschitz=lip
        )

    x_prev, dx_prev = x, dx
    t = 1.0
    pattern = torch.sign(x)
    stable = 0
    polished_pattern: Tensor | None = None
    iterations = 0
    for k in range(1, max_iter + 1):
        iterations = k
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        beta = (t - 1.0) / t_next
        y = x + beta * (x - x_prev)
        dy = dx + beta * (dx - dx_prev)
        grad_y = dy - dv
        while True:
            x_new = reg._prox_core(y - grad_y / lip, 1.0 / lip)
            dx_new = matvec(x_new)
            matvecs += 1
            d = x_new - y
            dd = _dot(d, d)
            curvature = _dot(d, dx_new - dy)
            if dd == 0.0 or not math.isfinite(curvature) or curvature <= lip * dd * (1.0 + 1e-10):
                break  # a non-finite product is reported just below
            lip = max(2.0 * lip, 1.05 * curvature / dd)  # backtracking: D's curvature exceeds L
        if _dot(y - x_new, x_new - x) > 0.0:  # gradient restart (O'Donoghue & Candes 2015)
            t_next = 1.0
        x_prev, dx_prev, x, dx, t = x, dx, x_new, dx_new, t_next
        res = residual(x, dx)
        if res <= tol:
            break
        if not math.isfinite(res):
            raise NonFiniteError(
                f"{type(reg).__name__}.prox: the iterate became non-finite at iteration {k} (residual {res}); "
                "the metric product returned NaN/Inf or is not a fixed symmetric PSD operator"
            )

        if polish is not None:
            new_pattern = torch.sign(x)
            if torch.equal(new_pattern, pattern):
                stable += 1
            else:
                pattern, stable = new_pattern, 0
            if stable >= _PATTERN_STABLE_ITERS and (
                polished_pattern is None or not torch.equal(pattern, polished_pattern)
            ):
                polished_pattern = pattern
                candidate = polish(dv, x)
                if candidate is not None and bool(torch.isfinite(candidate).all()):
                    d_candidate = matvec(candidate)
                    matvecs += 1
                    res_candidate = residual(candidate, d_candidate)
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
        matvecs=matvecs,
        method=method,
        lipschitz=lip,
    )


# ----------------------------------------------------------------------------------------------------------
# Concrete regularisers
# ----------------------------------------------------------------------------------------------------------
class _SeparableL1L2(Regularizer):
    """Shared implementation of c1 * ||theta_M||_1 + c2 / 2 * ||theta_M||^2 over the mask M."""

    _mask: Tensor | None

    @property
    def _l1(self) -> float:
        raise NotImplementedError

    @property
    def _l2(self) -> float:
        raise NotImplementedError

    def _mask_tensor(self) -> Tensor | None:
        return self._mask

    def _mask_on(self, like: Tensor) -> Tensor | None:
        return None if self._mask is None else self._mask.to(device=like.device)

    def _pi_parts(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        mask = self._mask_on(theta)
        penalised = theta if mask is None else torch.where(mask, theta, torch.zeros_like(theta))
        return penalised.abs().sum(), 0.5 * (penalised * penalised).sum()

    def _prox_core(self, v: Tensor, step: float | Tensor) -> Tensor:
        thr = step * (self.strength * self._l1)
        # soft threshold sign(v) * max(|v| - thr, 0), written so that zeros are +0.0
        out = v - torch.minimum(torch.maximum(v, -thr), thr) if isinstance(thr, Tensor) else v - v.clamp(-thr, thr)
        ridge = self.strength * self._l2
        if ridge != 0.0:
            out = out / (1.0 + step * ridge)
        mask = self._mask_on(v)
        return out if mask is None else torch.where(mask, out, v)

    def _active_set_candidate(self, dense: Tensor, dv: Tensor, x: Tensor) -> Tensor | None:
        # Stationarity on A = {penalised, nonzero} U {unpenalised}, theta = 0 elsewhere:
        #   (D_AA + lam * c2 * diag(m_A)) theta_A = (D v)_A - lam * c1 * (m * sign(x))_A
        mask = self._mask_on(x)
        pen = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
        signs = torch.sign(x)
        active = (signs != 0) | ~pen
        candidate = torch.zeros_like(x)
        if not bool(active.any()):
            return candidate
        idx = torch.nonzero(active).squeeze(1)
        pen_a = pen[idx].to(dtype=x.dtype)
        system = dense[idx][:, idx] + torch.diag_embed(self.strength * self._l2 * pen_a)
        rhs = dv[idx] - self.strength * self._l1 * pen_a * signs[idx]
        try:
            theta_a = torch.linalg.solve(system, rhs)
        except RuntimeError:  # singular on the active set (PSD metric)
            return None
        keep_sign = (torch.sign(theta_a) == signs[idx]) | (pen_a == 0)
        if not bool(keep_sign.all()):
            return None
        candidate[idx] = theta_a
        return candidate


@dataclass(eq=False)
class L1(_SeparableL1L2):
    r"""Lasso penalty :math:`\lambda \lVert \theta_M \rVert_1` over the masked coordinates :math:`M`.

    .. math::

        \pi(\theta) = \sum_{i \in M} |\theta_i|, \qquad
        \operatorname{prox}_{s\lambda\pi}(v)_i = \operatorname{sign}(v_i)\max(|v_i| - s\lambda, 0)\ (i\in M).

    In a metric :math:`D = R^\top R` (e.g. :math:`R` the upper Cholesky factor, :math:`n = P` rows),
    ``L1(lam).prox(v, D).x`` is the lasso solution ``sklearn.linear_model.Lasso(alpha=lam / n,
    fit_intercept=False).fit(R, R @ v).coef_`` (sklearn minimises
    :math:`\frac{1}{2n}\lVert y - Xw\rVert^2 + \alpha\lVert w\rVert_1`). With every coordinate penalised,
    the prox is exactly zero iff :math:`\lVert D v\rVert_\infty \le \lambda`.

    Args:
        strength: :math:`\lambda \ge 0` (0 disables the penalty).
        mask: Boolean tensor or list of length :math:`P`; ``False`` = unpenalised. ``None`` penalises all.

    Raises:
        ConfigurationError: If ``strength`` is negative or non-finite, or ``mask`` is not boolean / not 1-D.

    Example::

        >>> import torch
        >>> L1(1.0, mask=[True, False]).prox_diag(torch.tensor([0.5, 0.5]), 1.0)
        tensor([0.0000, 0.5000])
    """

    strength: float
    mask: MaskLike = None
    _mask: Tensor | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        """Validate and normalise the arguments."""
        self.strength = _check_strength(self.strength)
        self._mask = _as_mask(self.mask)
        self.mask = self._mask

    @property
    def _l1(self) -> float:
        return 1.0

    @property
    def _l2(self) -> float:
        return 0.0

    def _pi(self, theta: Tensor) -> Tensor:
        return self._pi_parts(theta)[0]


@dataclass(eq=False)
class ElasticNet(_SeparableL1L2):
    r"""Elastic-net penalty, parametrised exactly like scikit-learn's ``ElasticNet``.

    .. math::

        \pi(\theta) = \alpha \lVert \theta_M \rVert_1 + \frac{1 - \alpha}{2} \lVert \theta_M \rVert_2^2,
        \qquad
        \operatorname{prox}_{s\lambda\pi}(v)_i
        = \frac{\operatorname{sign}(v_i)\max(|v_i| - s\lambda\alpha, 0)}{1 + s\lambda(1 - \alpha)}
        \ (i \in M),

    with :math:`\lambda` = ``strength`` and :math:`\alpha` = ``l1_ratio``. Mapping to sklearn: for a
    metric :math:`D = X^\top X` with :math:`X` of :math:`n` rows (the Cholesky reduction: :math:`X = R`,
    the upper-triangular factor of :math:`D`, :math:`n = P`), ``ElasticNet(strength, l1_ratio).prox(v, D).x``
    equals ``sklearn.linear_model.ElasticNet(alpha=strength / n, l1_ratio=l1_ratio,
    fit_intercept=False).fit(X, X @ v).coef_``, because sklearn minimises
    :math:`\frac{1}{2n}\lVert y - Xw\rVert^2 + \alpha_{sk}\rho\lVert w\rVert_1
    + \frac{\alpha_{sk}(1-\rho)}{2}\lVert w\rVert^2`, i.e. our objective divided by :math:`n`: so
    ``alpha_sk = strength / n`` and ``rho = l1_ratio`` unchanged. ``l1_ratio=1`` is :class:`L1`,
    ``l1_ratio=0`` is ridge :math:`\frac{\lambda}{2}\lVert\theta_M\rVert^2`. With every coordinate
    penalised the prox is exactly zero iff :math:`\lVert D v\rVert_\infty \le \lambda\alpha`.

    Args:
        strength: :math:`\lambda \ge 0` (0 disables the penalty).
        l1_ratio: :math:`\alpha \in [0, 1]`.
        mask: Boolean tensor or list of length :math:`P`; ``False`` = unpenalised. ``None`` penalises all.

    Raises:
        ConfigurationError: If ``strength`` is negative/non-finite, ``l1_ratio`` is outside [0, 1], or ``mask`` is
            not boolean / not 1-D.

    Example::

        >>> import torch
        >>> ElasticNet(1.0, l1_ratio=0.5).prox_diag(torch.tensor([2.0]), 1.0)
        tensor([1.])
    """

    strength: float
    l1_ratio: float = 0.5
    mask: MaskLike = None
    _mask: Tensor | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        """Validate and normalise the arguments."""
        self.strength = _check_strength(self.strength)
        ratio = self.l1_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
            raise ConfigurationError(f"l1_ratio must be a float in [0, 1] (1 = lasso, 0 = ridge), got {ratio!r}")
        self.l1_ratio = float(ratio)
        self._mask = _as_mask(self.mask)
        self.mask = self._mask

    @property
    def _l1(self) -> float:
        return self.l1_ratio

    @property
    def _l2(self) -> float:
        return 1.0 - self.l1_ratio

    def _pi(self, theta: Tensor) -> Tensor:
        l1, sq = self._pi_parts(theta)
        return self.l1_ratio * l1 + (1.0 - self.l1_ratio) * sq

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable description (adds ``l1_ratio``).

        Returns:
            Dictionary as :meth:`Regularizer.to_dict` plus ``l1_ratio``.

        Example::

            >>> ElasticNet(0.1, l1_ratio=0.3).to_dict()["l1_ratio"]
            0.3
        """
        out = super().to_dict()
        out["l1_ratio"] = self.l1_ratio
        return out


@dataclass(eq=False)
class GroupLasso(Regularizer):
    r"""Group lasso :math:`\lambda \sum_g w_g \lVert \theta_g \rVert_2` over disjoint groups.

    .. math::

        \pi(\theta) = \sum_g w_g \lVert \theta_g \rVert_2, \qquad
        \operatorname{prox}_{s\lambda\pi}(v)_g
        = \max\Big(0, 1 - \frac{s\lambda w_g}{\lVert v_g \rVert_2}\Big) v_g.

    Coordinates in no group are unpenalised. The optimality conditions of the metric prox are
    :math:`(D(\theta - v))_g + \lambda w_g \theta_g / \lVert\theta_g\rVert = 0` for nonzero groups,
    :math:`\lVert (D(v - \theta))_g \rVert \le \lambda w_g` for zero groups, and
    :math:`(D(\theta - v))_i = 0` for ungrouped coordinates.

    Args:
        strength: :math:`\lambda \ge 0` (0 disables the penalty).
        groups: Disjoint groups of flat indices: each entry is either a ``tuple`` ``(start, stop)``, the
            half-open range ``start <= i < stop``, or a ``list`` of explicit indices. From YAML every sequence is
            a list, so ``[[0, 3]]`` means the indices 0 and 3, not a range: write ranges out, or build the
            regulariser in Python.
        weights: Non-negative :math:`w_g`, one per group; default :math:`\sqrt{|g|}`.

    Raises:
        ConfigurationError: On negative/non-finite ``strength``, empty, malformed, negative or overlapping groups,
            or ``weights`` of the wrong length / negative / non-finite. Indices beyond the parameter vector
            raise when the regulariser is applied.

    Example::

        >>> import torch
        >>> reg = GroupLasso(1.0, groups=[(0, 2)], weights=[1.0])
        >>> reg.prox_diag(torch.tensor([3.0, 4.0, 9.0]), 1.0)
        tensor([2.4000, 3.2000, 9.0000])
    """

    strength: float
    groups: Sequence[list[int] | tuple[int, int]]
    weights: list[float] | None = None
    _index: Tensor = field(init=False, repr=False, default_factory=lambda: torch.zeros(0, dtype=torch.long))
    _segment: Tensor = field(init=False, repr=False, default_factory=lambda: torch.zeros(0, dtype=torch.long))
    _first: Tensor = field(init=False, repr=False, default_factory=lambda: torch.zeros(0, dtype=torch.long))
    _weights: Tensor = field(init=False, repr=False, default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    def __post_init__(self) -> None:
        """Validate the groups/weights and precompute index tensors."""
        self.strength = _check_strength(self.strength)
        if isinstance(self.groups, (str, bytes)) or not isinstance(self.groups, Sequence):
            raise ConfigurationError(
                f"groups must be a list of index lists or (start, stop) tuples, got {self.groups!r}"
            )
        expanded: list[list[int]] = []
        owner: dict[int, int] = {}
        for g, group in enumerate(self.groups):
            indices = _expand_group(g, group)
            for i in indices:
                if i in owner:
                    where = "twice in the same group" if owner[i] == g else f"in groups {owner[i]} and {g}"
                    raise ConfigurationError(f"groups must not overlap: index {i} appears {where}")
                owner[i] = g
            expanded.append(indices)
        if self.weights is None:
            weights = [math.sqrt(len(ix)) for ix in expanded]
        else:
            if isinstance(self.weights, (str, bytes)) or not isinstance(self.weights, Sequence):
                raise ConfigurationError(f"weights must be a list of floats (one per group), got {self.weights!r}")
            if len(self.weights) != len(expanded):
                raise ConfigurationError(
                    f"weights has {len(self.weights)} entries but there are {len(expanded)} groups"
                )
            weights = []
            for w in self.weights:
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                    raise ConfigurationError(f"weights must be finite and >= 0, got {w!r}")
                weights.append(float(w))
        self._index = torch.tensor([i for ix in expanded for i in ix], dtype=torch.long)
        self._segment = torch.tensor([g for g, ix in enumerate(expanded) for _ in ix], dtype=torch.long)
        self._first = torch.tensor([ix[0] for ix in expanded], dtype=torch.long)
        self._weights = torch.tensor(weights, dtype=torch.float64)

    @property
    def num_groups(self) -> int:
        """Number of groups."""
        return int(self._first.numel())

    def _check_size(self, num_params: int) -> None:
        if self._index.numel() and int(self._index.max().item()) >= num_params:
            raise ConfigurationError(
                f"groups index out of range: largest index {int(self._index.max().item())} but the flat "
                f"parameter vector has only {num_params} entries"
            )

    def _is_trivial(self) -> bool:
        return self.strength == 0.0 or self.num_groups == 0

    def _tensors(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return (
            self._index.to(like.device),
            self._segment.to(like.device),
            self._weights.to(dtype=like.dtype, device=like.device),
        )

    def _group_sq_norms(self, v: Tensor, index: Tensor, segment: Tensor) -> Tensor:
        vg = v[index]
        return torch.zeros(self.num_groups, dtype=v.dtype, device=v.device).index_add(0, segment, vg * vg)

    def _pi(self, theta: Tensor) -> Tensor:
        if self.num_groups == 0:
            return theta.sum() * 0.0
        index, segment, weights = self._tensors(theta)
        sq = self._group_sq_norms(theta, index, segment)
        positive = sq > 0
        norms = torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), 0.0)
        return (weights * norms).sum()

    def _prox_core(self, v: Tensor, step: float | Tensor) -> Tensor:
        if self.num_groups == 0:
            return v.clone()
        index, segment, weights = self._tensors(v)
        group_step: float | Tensor = step
        if isinstance(step, Tensor):
            group_step = step[self._first.to(v.device)]
        norms = torch.sqrt(self._group_sq_norms(v, index, segment))
        thr = group_step * self.strength * weights
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        factor = torch.where(norms > thr, 1.0 - thr / safe, torch.zeros_like(norms))
        out = v.clone()
        out[index] = v[index] * factor[segment]
        return out

    def _diag_closed_form_ok(self, diag: Tensor) -> bool:
        index = self._index.to(diag.device)
        first = self._first.to(diag.device)
        return bool(torch.equal(diag[index], diag[first][self._segment.to(diag.device)]))

    def prox_diag(self, v: Tensor, step: float | Tensor) -> Tensor:
        r"""Closed-form block soft-thresholding (see :meth:`Regularizer.prox_diag`).

        .. math::

            \operatorname{prox}_{s\lambda\pi}(v)_g
            = \max\Big(0, 1 - \frac{s\lambda w_g}{\lVert v_g\rVert}\Big) v_g

        Args:
            v: Point of shape ``(P,)``.
            step: Step :math:`s > 0`: a float, or a positive tensor shaped like ``v`` that is constant
                within each group (a diagonal metric that is not constant on a group has no closed form).

        Returns:
            The proximal point.

        Raises:
            ConfigurationError: On invalid ``v``/``step``, out-of-range groups, or a step varying within a group.

        Example::

            >>> import torch
            >>> GroupLasso(10.0, groups=[[0, 1]]).prox_diag(torch.tensor([3.0, 4.0]), 1.0)
            tensor([0., 0.])
        """
        v = _check_vector("v", v)
        self._check_size(v.numel())
        checked = _check_step(step, v)
        if isinstance(checked, Tensor) and not self._diag_closed_form_ok(checked):
            raise ConfigurationError(
                "GroupLasso.prox_diag needs a step that is constant within each group; use prox(v, metric) "
                "for a general diagonal metric"
            )
        if self._is_trivial():
            return v.clone()
        return self._prox_core(v, checked)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable description (adds group statistics and weights).

        Returns:
            Dictionary with ``type``, ``strength``, ``num_groups``, ``num_penalised`` (grouped coordinates),
            ``group_sizes`` and ``weights``.

        Example::

            >>> GroupLasso(0.1, groups=[(0, 3), [5, 7]]).to_dict()["group_sizes"]
            [3, 2]
        """
        sizes = torch.bincount(self._segment, minlength=self.num_groups).tolist() if self.num_groups else []
        return {
            "type": type(self).__name__,
            "strength": float(self.strength),
            "num_params": None,
            "num_penalised": int(self._index.numel()),
            "num_groups": self.num_groups,
            "group_sizes": [int(s) for s in sizes],
            "weights": [float(w) for w in self._weights.tolist()],
        }


def _expand_group(g: int, group: object) -> list[int]:
    if isinstance(group, tuple):
        if len(group) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in group):
            raise ConfigurationError(
                f"group {g}: a tuple must be an index range (start, stop) of two ints, got {group!r}; "
                "use a list for explicit indices"
            )
        start, stop = group
        if start < 0 or stop <= start:
            raise ConfigurationError(f"group {g}: range (start, stop) needs 0 <= start < stop, got {group!r}")
        return list(range(start, stop))
    if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
        raise ConfigurationError(f"group {g} must be a list of indices or a (start, stop) tuple, got {group!r}")
    if len(group) == 0:
        raise ConfigurationError(f"group {g} is empty; every group needs at least one index")
    indices: list[int] = []
    for i in group:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ConfigurationError(f"group {g}: indices must be ints, got {i!r}")
        if i < 0:
            raise ConfigurationError(f"group {g}: index {i} out of range (indices must be >= 0)")
        indices.append(i)
    return indices


@dataclass(eq=False)
class NoRegularizer(Regularizer):
    r"""No penalty: :math:`\pi \equiv 0`, so every prox is the identity (smooth-only approximate CV).

    .. math::

        \operatorname{prox}^{D}_{0}(v) = v

    Example::

        >>> import torch
        >>> NoRegularizer().prox(torch.tensor([1.0, 2.0]), torch.eye(2)).x
        tensor([1., 2.])
    """

    strength: float = field(init=False, default=0.0)

    def _pi(self, theta: Tensor) -> Tensor:
        return theta.sum() * 0.0

    def _prox_core(self, v: Tensor, step: float | Tensor) -> Tensor:
        return v.clone()

    def _is_trivial(self) -> bool:
        return True


# ----------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------
def _excluded(name: str, exclude: Sequence[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(last == pattern or fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def mask_from_named_parameters(named_params: Mapping[str, Tensor], exclude: Sequence[str] = ("bias",)) -> Tensor:
    r"""Build the flat boolean penalty mask of a parameter dict (True = penalised).

    The flat order is the iteration order of ``named_params`` with each tensor flattened by
    ``.reshape(-1)``, matching the flat parameter vector :math:`\theta = (\operatorname{vec}(W_1), \dots)`.

    .. math::

        m_i = \begin{cases} 0 & \text{coordinate } i \text{ belongs to an excluded name} \\
        1 & \text{otherwise} \end{cases}

    A name is excluded when a pattern equals its last dotted component (``"bias"`` matches ``"fc.bias"`` but
    not ``"bias_net.weight"``) or matches the full name as an ``fnmatch`` glob (``"*norm*"``,
    ``"encoder.*"``). Norm-layer weights are only excluded by name; use :func:`mask_from_module` to exclude
    them by layer type.

    Args:
        named_params: Ordered mapping name -> tensor (e.g. ``dict(model.named_parameters())``).
        exclude: Names/glob patterns of unpenalised parameters.

    Returns:
        A CPU ``torch.bool`` tensor of length :math:`P = \sum \text{numel}`.

    Raises:
        ConfigurationError: If ``named_params`` is empty, a value is not a tensor, or ``exclude`` is a bare string.

    Example::

        >>> import torch
        >>> params = {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}
        >>> mask_from_named_parameters(params).tolist()
        [True, True, True, True, False, False]
    """
    if isinstance(exclude, (str, bytes)):
        raise ConfigurationError(f"exclude must be a sequence of patterns, e.g. ('bias',), not the string {exclude!r}")
    if len(named_params) == 0:
        raise ConfigurationError("named_params is empty: the model has no (trainable) parameters to build a mask for")
    pieces: list[Tensor] = []
    for name, tensor in named_params.items():
        if not isinstance(tensor, Tensor):
            raise ConfigurationError(f"named_params[{name!r}] must be a tensor, got {type(tensor).__name__}")
        pieces.append(torch.full((tensor.numel(),), not _excluded(name, exclude), dtype=torch.bool))
    return torch.cat(pieces)


_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def mask_from_module(
    module: nn.Module,
    exclude: Sequence[str] = ("bias",),
    *,
    unpenalise_norm_layers: bool = True,
    trainable_only: bool = True,
) -> Tensor:
    r"""Build the penalty mask of a module's parameters, also excluding normalisation layers by type.

    The flat order is ``module.named_parameters()`` (restricted to ``requires_grad`` parameters when
    ``trainable_only``), each flattened by ``.reshape(-1)``.

    .. math::

        m = \text{mask\_from\_named\_parameters}(\text{params}, \text{exclude}) \wedge
        \neg\,[\text{parameter of a norm layer}]

    Args:
        module: The model.
        exclude: Names/glob patterns of unpenalised parameters (see :func:`mask_from_named_parameters`).
        unpenalise_norm_layers: Also leave parameters of BatchNorm/LayerNorm/GroupNorm/InstanceNorm/RMSNorm
            layers unpenalised.
        trainable_only: Only include parameters with ``requires_grad``.

    Returns:
        A CPU ``torch.bool`` tensor.

    Raises:
        ConfigurationError: If the module has no (trainable) parameters.

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.LayerNorm(1))
        >>> mask_from_module(net).tolist()
        [True, True, False, False, False]
    """
    norm_names: set[str] = set()
    if unpenalise_norm_layers:
        for module_name, sub in module.named_modules():
            if isinstance(sub, _NORM_LAYERS):
                prefix = f"{module_name}." if module_name else ""
                norm_names.update(prefix + n for n, _ in sub.named_parameters(recurse=False))
    params = {n: p for n, p in module.named_parameters() if p.requires_grad or not trainable_only}
    mask = mask_from_named_parameters(params, exclude)
    if norm_names:
        keep = torch.cat([torch.full((p.numel(),), n not in norm_names, dtype=torch.bool) for n, p in params.items()])
        mask = mask & keep
    return mask
