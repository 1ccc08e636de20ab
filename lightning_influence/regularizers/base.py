r"""The contract of every regulariser: the :class:`Regularizer` base class and its argument checks.

:class:`Regularizer` implements :meth:`~Regularizer.penalty`, :meth:`~Regularizer.prox_diag` and the metric prox
:meth:`~Regularizer.prox` once; a concrete penalty (:mod:`lightning_influence.regularizers.penalties`) supplies its
unscaled value ``_pi`` and closed-form step ``_prox_core``. :meth:`~Regularizer.prox` checks its arguments, takes
the closed form for a diagonal dense metric and otherwise hands the quadratic model to the solver in
:mod:`lightning_influence.regularizers.prox`.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_influence.exceptions import ConfigurationError
from lightning_influence.regularizers.prox import (
    MatVec,
    Metric,
    ProxResult,
    SupportsMatvec,
    _check_dense_metric,
    _checked_matvec,
    _fista,
    _lipschitz_estimate,
    _Polish,
)

__all__ = ["Regularizer"]


MaskLike = Tensor | Sequence[bool] | None


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
            f"lipschitz must be None (estimate it) or a finite float > 0 "
            f"(an estimate of lambda_max(D)), got {lipschitz!r}"
        )


def _check_x0(x0: object, v: Tensor) -> Tensor:
    x0 = _check_vector("x0", x0)
    if x0.shape != v.shape:
        raise ConfigurationError(f"x0 must have the shape of v {tuple(v.shape)}, got {tuple(x0.shape)}")
    return x0.to(dtype=v.dtype, device=v.device)


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

            >>> from lightning_influence.regularizers import L1
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
            >>> from lightning_influence.regularizers import L1
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
            >>> from lightning_influence.regularizers import L1
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
        ``lipschitz=None``) up to 30 Lanczos products are extra.

        Args:
            v: Point of shape ``(P,)`` (e.g. the Newton/natural-gradient step :math:`\hat\theta - F^{-1} b`).
            metric: Dense ``(P, P)`` symmetric PSD tensor, or the operator form: an object with a ``matvec``
                method (a :class:`~lightning_influence.operators` operator) or a callable ``x -> D @ x``,
                returning ``(P,)``.
            x0: Warm start of shape ``(P,)``; default ``v``.
            tol: Relative residual tolerance (>= 0).
            max_iter: Maximum number of FISTA iterations (>= 0).
            lipschitz: Estimate of :math:`\lambda_{\max}(D)`; if None it is computed (eigvalsh for dense
                :math:`D` up to 2048, otherwise at most 30 seeded Lanczos products
                (:func:`~lightning_influence.spectrum.lanczos_lambda_max`) times 1.05). Backtracking
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
            >>> from lightning_influence.regularizers import ElasticNet
            >>> D = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
            >>> v = torch.tensor([1.0, 1.0], dtype=torch.float64)
            >>> res = ElasticNet(0.1, l1_ratio=0.5).prox(v, lambda x: D @ x, tol=1e-12)
            >>> res.converged
            True
        """
        v, dense, operator, x0 = self._prox_arguments(v, metric, x0, tol, max_iter, lipschitz)
        if self._is_trivial():
            return ProxResult(x=v.clone(), iterations=0, residual=0.0, converged=True, method="identity")
        if dense is not None:
            result = self._prox_diagonal(v, dense)
            if result is None:
                result = self._prox_dense(v, dense, x0=x0, tol=tol, max_iter=max_iter, lipschitz=lipschitz)
        else:
            assert operator is not None
            result = self._prox_matvec(v, operator, x0=x0, tol=tol, max_iter=max_iter, lipschitz=lipschitz)
        self._warn_unconverged(result, tol, max_iter)
        return result

    # -- the steps of prox -------------------------------------------------------------------------------------
    def _prox_arguments(
        self, v: Tensor, metric: Metric, x0: Tensor | None, tol: float, max_iter: int, lipschitz: float | None
    ) -> tuple[Tensor, Tensor | None, MatVec | None, Tensor | None]:
        """Validate the arguments of :meth:`prox`.

        Returns:
            ``(v, dense, operator, x0)``: exactly one of the dense metric (symmetrised; promoted with ``v`` to their
            common dtype on ``v``'s device) and the operator's product is not None.

        Raises:
            ConfigurationError: On any invalid argument (see :meth:`prox`).
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
        return v, dense, operator, None if x0 is None else _check_x0(x0, v)

    def _prox_diagonal(self, v: Tensor, dense: Tensor) -> ProxResult | None:
        """Closed form for a positive diagonal dense metric (None if the metric is not one or has none here)."""
        diag = dense.diagonal()
        off_diagonal_zero = bool(torch.equal(dense, torch.diag_embed(diag)))
        if not (off_diagonal_zero and bool((diag > 0).all()) and self._diag_closed_form_ok(diag)):
            return None
        x = self._prox_core(v, 1.0 / diag)
        return ProxResult(x=x, iterations=0, residual=0.0, converged=True, method="closed_form")

    def _prox_dense(
        self, v: Tensor, dense: Tensor, *, x0: Tensor | None, tol: float, max_iter: int, lipschitz: float | None
    ) -> ProxResult:
        """FISTA with a dense metric, polished by the exact active-set solve where the penalty has one."""

        def matvec(x: Tensor) -> Tensor:
            return dense @ x

        def active_set(dv: Tensor, x: Tensor) -> Tensor | None:
            return self._active_set_candidate(dense, dv, x)

        lip, products = (lipschitz, 0) if lipschitz is not None else _lipschitz_estimate(matvec, v, dense)
        dv = matvec(v)
        return self._solve(v, dv, matvec, lip, products + 1, active_set, x0=x0, tol=tol, max_iter=max_iter)

    def _prox_matvec(
        self, v: Tensor, operator: MatVec, *, x0: Tensor | None, tol: float, max_iter: int, lipschitz: float | None
    ) -> ProxResult:
        """FISTA with an operator metric (products only; no active-set polish).

        Returns:
            The solver's result; its ``matvecs`` include ``D v`` and the Lipschitz estimate.

        Raises:
            ConfigurationError: If ``D v`` is not finite, or from the shape check of every product.
        """
        matvec = _checked_matvec(operator)
        dv = matvec(v)
        if not bool(torch.isfinite(dv).all()):
            raise ConfigurationError("metric(v) returned non-finite values (NaN or Inf); check the curvature operator")
        lip, products = (lipschitz, 0) if lipschitz is not None else _lipschitz_estimate(matvec, v)
        return self._solve(v, dv, matvec, lip, products + 1, None, x0=x0, tol=tol, max_iter=max_iter)

    def _solve(
        self,
        v: Tensor,
        dv: Tensor,
        matvec: MatVec,
        lipschitz: float,
        products: int,
        polish: _Polish | None,
        *,
        x0: Tensor | None,
        tol: float,
        max_iter: int,
    ) -> ProxResult:
        """Run the solver on the quadratic model; ``products`` already spent (``D v``, Lipschitz) are added."""
        result = _fista(
            self._prox_core,
            v=v,
            dv=dv,
            matvec=matvec,
            lipschitz=float(lipschitz),
            x0=x0,
            tol=tol,
            max_iter=max_iter,
            polish=polish,
            name=type(self).__name__,
        )
        result.matvecs += products
        return result

    def _warn_unconverged(self, result: ProxResult, tol: float, max_iter: int) -> None:
        if not result.converged:
            warnings.warn(
                f"{type(self).__name__}.prox did not converge: relative residual {result.residual:.3e} > "
                f"tol={tol:.3e} after max_iter={max_iter} iterations ({result.matvecs} metric products). "
                "Increase max_iter, loosen tol, warm-start with x0, or damp an ill-conditioned metric.",
                RuntimeWarning,
                stacklevel=3,  # the caller of prox
            )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable description for logs and reports.

        Returns:
            Dictionary with at least ``type``, ``strength`` and mask statistics (``num_params``,
            ``num_penalised``; ``None`` when every coordinate is penalised by default).

        Example::

            >>> from lightning_influence.regularizers import L1
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
