r"""The penalties: :class:`L1`, :class:`ElasticNet`, :class:`GroupLasso` and :class:`NoRegularizer`.

Each is a dataclass with plain arguments (YAML ``class_path`` + ``init_args``) that supplies the unscaled penalty
``_pi`` and its closed-form step ``_prox_core``; :class:`~lightning_influence.regularizers.base.Regularizer` does
the rest. L1 and elastic net share ``_SeparableL1L2``, which also gives the exact active-set solve that polishes
FISTA in a dense metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_influence.exceptions import ConfigurationError
from lightning_influence.regularizers.base import (
    MaskLike,
    Regularizer,
    _as_mask,
    _check_step,
    _check_strength,
    _check_vector,
)

__all__ = ["L1", "ElasticNet", "GroupLasso", "NoRegularizer"]


class _SeparableL1L2(Regularizer):
    """Shared implementation of c1 * ||theta_M||_1 + c2 / 2 * ||theta_M||^2 over the mask M."""

    mask: MaskLike
    _mask: Tensor | None

    def __post_init__(self) -> None:
        """Validate and normalise the arguments: ``strength``, the subclass's own, then ``mask``."""
        self.strength = _check_strength(self.strength)
        self._check_own_arguments()
        self._mask = _as_mask(self.mask)
        self.mask = self._mask

    def _check_own_arguments(self) -> None:
        """Validate (and normalise) the arguments other than ``strength`` and ``mask``; none by default."""

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

    def _check_own_arguments(self) -> None:
        ratio = self.l1_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
            raise ConfigurationError(f"l1_ratio must be a float in [0, 1] (1 = lasso, 0 = ridge), got {ratio!r}")
        self.l1_ratio = float(ratio)

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
