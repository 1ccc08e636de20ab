r"""Solvers that reuse a :class:`~lightning_influence.solvers.sketch.LowRankSketch` :math:`G \approx V\Lambda V^\top`.

* :func:`preconditioned_cg` (``solver="pcg"``): CG on :math:`G + \lambda I` with the Nyström preconditioner of
  Frangella, Tropp & Udell (2023), :math:`M^{-1} = (\lambda_r + \lambda)\,V(\Lambda + \lambda)^{-1}V^\top +
  (I - VV^\top)`. It maps the top-``r`` eigenvalues of the damped system to about :math:`\lambda_r + \lambda` and
  leaves the rest, so the condition number drops from :math:`(\mu_1+\lambda)/\lambda` to about
  :math:`(\mu_{r+1}+\lambda)/\lambda`. The answer is CG's, with the same true-residual certificate
  (:func:`~lightning_influence.solvers.conjugate_gradient`); applying :math:`M^{-1}` costs no product.
* :func:`lowrank_solve` (``solver="lowrank"``): the approximate inverse
  :math:`L = V(\Lambda+\lambda)^{-1}V^\top + w(I - VV^\top)`, :math:`w = 1/(\mu_{r+1}+\lambda)` (``tail="ritz"``,
  the default) or :math:`1/\lambda` (``"damping"``), zero products per query, exact when ``r = P``.
  Its quality hint is the captured trace fraction :math:`\sum_{i\le r}\lambda_i / \mathrm{Tr}\,G`.
* :func:`lowrank_self_influence`: :math:`g^\top L g` for a block of gradients, with a per-example error bound.

**The self-influence bound.** Let :math:`G = \sum_i \mu_i u_i u_i^\top` (:math:`\mu_1 \ge \mu_2 \ge \dots \ge 0`)
and let the sketch hold the top ``r`` eigenpairs exactly, :math:`V = [u_1..u_r]`. Writing :math:`c_i = u_i^\top g`,

.. math::

   s(g) = g^\top (G+\lambda I)^{-1} g = \sum_i \frac{c_i^2}{\mu_i+\lambda}, \qquad
   \hat s(g) = g^\top L g = \sum_{i\le r} \frac{c_i^2}{\mu_i+\lambda} + \sum_{i>r} \frac{c_i^2}{\lambda},

so :math:`\hat s - s = \sum_{i>r} c_i^2 \big(\tfrac1\lambda - \tfrac1{\mu_i+\lambda}\big)
= \sum_{i>r} c_i^2 \frac{\mu_i}{\lambda(\mu_i+\lambda)}`. Every term is non-negative and
:math:`\mu \mapsto \mu/(\lambda(\mu+\lambda))` increases, so with :math:`\mu_i \le \mu_{r+1}` for :math:`i > r` and
:math:`\sum_{i>r} c_i^2 = \|(I-VV^\top)g\|^2`:

.. math::

   0 \;\le\; \hat s(g) - s(g) \;\le\; \|(I-VV^\top)g\|^2 \Big(\frac1\lambda - \frac1{\mu_{r+1}+\lambda}\Big).

With ``tail="ritz"`` (weight :math:`1/(\mu_{r+1}+\lambda)` on the complement) each discarded term is instead
:math:`c_i^2(1/(\mu_{r+1}+\lambda) - 1/(\mu_i+\lambda)) \le 0`, an under-estimate within the same bound. With
``tail="damping"`` the low-rank self-influence is an over-estimate, by at most the bound. The bound is small where the
gradient lies in the sketched subspace or the discarded spectrum is small against :math:`\lambda`. In practice the
eigenpairs are Ritz pairs and :math:`\mu_{r+1}` is estimated by the next Ritz value (``LowRankSketch.tail_eigenvalue``,
a lower estimate from a Krylov space); the bound holds to the accuracy of the sketch. With an unconverged sketch the
Ritz value can sit well below :math:`\mu_{r+1}` and the reported bound is then too small: on the 460-parameter digits
MLP of the tests (default sketch, 126 products, :math:`\lambda = 10^{-2}`) the largest reported relative bound was 0.77
against an actual largest relative over-estimate of 1.7, while the ranking was still right (Spearman 0.99+). More
``iterations`` tighten it; the over-estimate itself (error :math:`\ge 0`) held in every case we measured.

Example::

    >>> from lightning_influence.operators import DenseOperator
    >>> from lightning_influence.solvers.sketch import compute_sketch
    >>> from lightning_influence.solvers.cg import conjugate_gradient
    >>> A = torch.diag(torch.logspace(3, -2, 12, dtype=torch.float64))   # spread spectrum, P = 12
    >>> sk = compute_sketch(DenseOperator(A), rank=6, oversample=2, iterations=3, trace_probes=0)
    >>> b = torch.ones(12, dtype=torch.float64)
    >>> res = preconditioned_cg(DenseOperator(A), b, sk, damping=0.1, rtol=1e-10)
    >>> torch.allclose(res.x, b / (A.diagonal() + 0.1)), res.method, res.converged, res.iterations
    (True, 'pcg', True, 8)
    >>> plain = conjugate_gradient(DenseOperator(A), b, damping=0.1, rtol=1e-10, warn=False)
    >>> plain.converged, plain.iterations   # plain CG has not converged after P iterations (round-off)
    (False, 12)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_influence.config import CGConfig
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.operators.base import LinearOperator, as_matrix
from lightning_influence.solvers.cg import conjugate_gradient
from lightning_influence.solvers.result import SolveResult
from lightning_influence.solvers.sketch import LowRankSketch

__all__ = [
    "lowrank_self_influence", "lowrank_self_influence_from_coefficients", "lowrank_solve", "nystrom_preconditioner",
    "preconditioned_cg",
]


def _check(sketch: LowRankSketch, damping: float, num_params: int | None = None) -> None:
    if not damping > 0:
        raise ConfigurationError(f"the low-rank inverse needs damping > 0, got {damping}.")
    if num_params is not None and sketch.num_params != num_params:
        raise ConfigurationError(
            f"the sketch has {sketch.num_params} parameters but the right-hand side has {num_params}; recompute "
            "the sketch for this model."
        )


def _cast(sketch: LowRankSketch, B: Tensor) -> tuple[Tensor, Tensor]:
    return sketch.eigenvalues.to(B), sketch.eigenvectors.to(B)


def nystrom_preconditioner(sketch: LowRankSketch, damping: float) -> Callable[[Tensor], Tensor]:
    r"""The Nyström preconditioner :math:`R \mapsto (\lambda_r+\lambda) V(\Lambda+\lambda)^{-1}V^\top R + (I-VV^\top)R`.

    Returns:
        A function of ``(P, k)`` blocks.

    Raises:
        ConfigurationError: For ``damping <= 0``.

    Example::

        >>> sk = LowRankSketch(torch.tensor([3.0]), torch.tensor([[1.0], [0.0]]), 0.0)
        >>> nystrom_preconditioner(sk, 1.0)(torch.eye(2))   # (3+1)/(3+1) on u_1, 1 elsewhere
        tensor([[1., 0.],
                [0., 1.]])
    """
    _check(sketch, damping)
    lam_r = float(sketch.eigenvalues[-1]) if sketch.rank else 0.0

    def apply(R: Tensor) -> Tensor:
        evals, V = _cast(sketch, R)
        C = V.T @ R
        return R + V @ (((lam_r + damping) / (evals + damping) - 1.0).unsqueeze(1) * C)

    return apply


def preconditioned_cg(
    op: LinearOperator,
    b: Tensor,
    sketch: LowRankSketch,
    *,
    damping: float,
    config: CGConfig | None = None,
    x0: Tensor | None = None,
    **overrides: Any,
) -> SolveResult:
    r"""Solve :math:`(G + \lambda I) x = b` by CG preconditioned with the sketch (``solver="pcg"``).

    Args:
        op: The undamped operator :math:`G` (the one the sketch was computed from).
        b: Right-hand side(s), ``(P,)`` or ``(P, k)``: one block solve for all columns.
        sketch: The :class:`LowRankSketch` of ``op``.
        damping: :math:`\lambda > 0`.
        config: :class:`~lightning_influence.config.CGConfig`.
        x0: Warm start (default: zero).
        **overrides: Single fields of ``config``.

    Returns:
        CG's result (method ``"pcg"``), its ``relative_residual`` recomputed from an explicit product at exit.

    Raises:
        ConfigurationError: For ``damping <= 0`` or a sketch of another dimension, or as
            :func:`~lightning_influence.solvers.conjugate_gradient`.

    Example::

        >>> from lightning_influence.operators import DenseOperator
        >>> from lightning_influence.solvers.sketch import compute_sketch
        >>> op = DenseOperator(torch.diag(torch.tensor([9.0, 9.0, 1.0], dtype=torch.float64)))
        >>> sk = compute_sketch(op, rank=2, oversample=1, iterations=1, trace_probes=0)
        >>> res = preconditioned_cg(op, torch.ones(3, dtype=torch.float64), sk, damping=1.0, rtol=1e-12)
        >>> res.x, res.iterations, res.info["sketch_rank"]   # M^{-1}(G + I) has eigenvalues 10, 10, 2
        (tensor([0.1000, 0.1000, 0.5000], dtype=torch.float64), 2, 2)
    """
    _check(sketch, damping, op.num_params)
    res = conjugate_gradient(op, b, damping=damping, config=config, x0=x0,
                             preconditioner=nystrom_preconditioner(sketch, damping), **overrides)
    res.info.update({"sketch_rank": sketch.rank})
    return res


#: ``lowrank``'s weights on the directions the sketch leaves out (``InfluenceConfig.lowrank_tail``).
LOWRANK_TAILS = ("damping", "ritz")


def _tail_weight(sketch: LowRankSketch, damping: float, tail: str) -> float:
    r"""The weight :math:`w` of :math:`L = V(\Lambda+\lambda)^{-1}V^\top + w(I-VV^\top)`.

    Returns:
        :math:`1/\lambda` for ``"damping"``, :math:`1/(\mu_{r+1}+\lambda)` for ``"ritz"``.

    Raises:
        ConfigurationError: For a ``tail`` not in :data:`LOWRANK_TAILS`.
    """
    if tail not in LOWRANK_TAILS:
        raise ConfigurationError(f"tail must be one of {LOWRANK_TAILS}, got {tail!r}.")
    return 1.0 / damping if tail == "damping" else 1.0 / (sketch.tail_eigenvalue + damping)


def _lowrank_apply(sketch: LowRankSketch, B: Tensor, damping: float, tail: str) -> Tensor:
    # Computed in the (k, P) layout of B's columns and returned as a (P, k) view of it: with B a view of a
    # contiguous (k, P) matrix of right-hand sides (what influence_scores passes) every step is contiguous and the
    # answer is one allocation; a row-major B costs one transposed copy here.
    evals, V = _cast(sketch, B)
    w = _tail_weight(sketch, damping, tail)
    Bt = B.T.contiguous()  # no copy when B is already column-major
    coef = (Bt @ V) * (1.0 / (evals + damping) - w)  # (k, r)
    return (coef @ V.T).add_(Bt, alpha=w).T


def _column_norms(Bt: Tensor) -> Tensor:
    # Norms of the rows of a contiguous (k, P): a contiguous reduction (norm(dim=0) of a row-major (P, k) is a
    # strided one, 30x slower at P = 1.1e7, k = 100).
    return torch.linalg.vector_norm(Bt, dim=1)


def _lowrank_residual(op: LinearOperator | None, sketch: LowRankSketch, B: Tensor, X: Tensor, damping: float,
                      columns: int, tail: str) -> tuple[float, int, str]:
    """``(relative residual, products, kind)``: measured on the first ``columns`` columns, else the sketch's bound."""
    if B.shape[1] == 0:
        return 0.0, 0, "measured"
    if op is not None and columns > 0:
        k = min(columns, B.shape[1])
        Bk = B[:, :k]
        R = op.matmat(X[:, :k].contiguous()) + damping * X[:, :k] - Bk
        return float((R.norm(dim=0) / _column_norms(Bk.T.contiguous()).clamp_min(1e-300)).max()), k, "measured"
    _, V = _cast(sketch, B)
    Bt = B.T.contiguous()
    # (G+lam)Lb - b = ((G+lam)w - 1)(I-VV^T)b for an exact sketch; G's eigenvalues there lie in [0, mu_{r+1}]:
    # mu_{r+1}/lam ||(I-VV^T)b|| for w = 1/lam, mu_{r+1}/(mu_{r+1}+lam) ||(I-VV^T)b|| for w = 1/(mu_{r+1}+lam).
    w, mu = _tail_weight(sketch, damping, tail), sketch.tail_eigenvalue
    factor = max(abs(damping * w - 1.0), abs((mu + damping) * w - 1.0))
    outside = _column_norms(Bt - (Bt @ V) @ V.T)
    norms = _column_norms(Bt).clamp_min(1e-300)
    return float((factor * outside / norms).max()), 0, "bound"


def lowrank_solve(sketch: LowRankSketch, b: Tensor, *, damping: float, operator: LinearOperator | None = None,
                  residual_columns: int = 1, tail: str = "ritz") -> SolveResult:
    r"""Apply :math:`L = V(\Lambda+\lambda)^{-1}V^\top + w(I - VV^\top)` to ``b`` (``solver="lowrank"``).

    ``tail="ritz"`` (default) weighs the directions the sketch leaves out by :math:`w = 1/(\mu_{r+1}+\lambda)`: the
    inverse of :math:`V\Lambda V^\top + \mu_{r+1}(I-VV^\top) + \lambda I`, the spectrum's tail flattened at the next
    Ritz value (the Nyström preconditioner's own approximate inverse). ``tail="damping"`` takes :math:`w = 1/\lambda`,
    as if that curvature were zero (Arnoldi-style). Both are exact when ``r = P``; where the discarded eigenvalues
    are well above :math:`\lambda`, ``"ritz"`` is the closer one (measured: ``docs/scale.md``).

    Zero curvature products for the solution itself. The result's ``info`` carries ``trace_fraction`` (captured
    trace fraction, ``None`` when the sketch has no trace estimate), ``rank`` and ``tail_eigenvalue``;
    ``converged`` is ``True`` (the answer is what the sketch implies). ``relative_residual`` is, with
    ``operator`` (the undamped :math:`G` the sketch came from), the true
    :math:`\max_j \|b_j - (G+\lambda I)x_j\| / \|b_j\|` over the first ``residual_columns`` columns, measured
    with one batched product (``num_products`` counts its columns; ``info["residual"] = "measured"``); without an
    operator it is the a-priori estimate :math:`\max_j \mu_{r+1}\|(I-VV^\top)b_j\| / (\lambda\|b_j\|)`
    (``"damping"``; :math:`\mu_{r+1}+\lambda` in the denominator for ``"ritz"``), a bound when the sketch's pairs are
    exact (``info["residual"] = "bound"``, no product).

    Args:
        sketch: The :class:`LowRankSketch`.
        b: Right-hand side(s), ``(P,)`` or ``(P, k)``.
        damping: :math:`\lambda > 0`.
        operator: Optional undamped operator for the measured residual.
        residual_columns: Columns whose residual is measured (``0``: use the bound).
        tail: ``"damping"`` or ``"ritz"``, the weight on the complement of the sketch (above).

    Returns:
        The :class:`SolveResult` (method ``"lowrank"``).

    Raises:
        ConfigurationError: For ``damping <= 0`` or a sketch of another dimension.

    Example::

        >>> sk = LowRankSketch(torch.tensor([3.0]), torch.tensor([[1.0], [0.0]]), 0.0, trace=3.0)
        >>> res = lowrank_solve(sk, torch.tensor([4.0, 2.0]), damping=1.0)
        >>> res.x, res.info["trace_fraction"], res.num_products, res.relative_residual, res.info["residual"]
        (tensor([1., 2.]), 1.0, 0, 0.0, 'bound')
    """
    B, squeeze = as_matrix(b)
    _check(sketch, damping, B.shape[0])
    X = _lowrank_apply(sketch, B, damping, tail)
    residual, products, kind = _lowrank_residual(operator, sketch, B, X, damping, residual_columns, tail)
    info = {"damping": damping, "rank": sketch.rank, "tail_eigenvalue": sketch.tail_eigenvalue, "tail": tail,
            "trace_fraction": sketch.captured_trace_fraction, "sketch_products": sketch.num_products,
            "residual": kind, "residual_columns": products}
    return SolveResult(x=X[:, 0] if squeeze else X, iterations=0, relative_residual=residual, converged=True,
                       method="lowrank", num_products=products, info=info)


def lowrank_self_influence(sketch: LowRankSketch, grads: Tensor, *, damping: float, tail: str = "ritz"
                           ) -> tuple[Tensor, Tensor]:
    r"""Low-rank self-influence :math:`g^\top L g` of each row of ``grads`` ``(m, P)`` and its error bound.

    Returns:
        ``(values, bounds)``, each ``(m,)``: ``values`` over-estimate (``tail="damping"``) or under-estimate
        (``tail="ritz"``, see :func:`lowrank_solve`) the exact self-influence by at most
        ``bounds`` :math:`= \|(I-VV^\top)g\|^2 (1/\lambda - 1/(\mu_{r+1}+\lambda))` (module docstring): the
        discarded terms :math:`c_i^2/(\mu_i+\lambda)` lie between :math:`c_i^2/(\mu_{r+1}+\lambda)` and
        :math:`c_i^2/\lambda`, and each tail weight is one end of that interval.

    Raises:
        ConfigurationError: For ``damping <= 0`` or gradients of another dimension.

    Example::

        >>> sk = LowRankSketch(torch.tensor([3.0]), torch.tensor([[1.0], [0.0]]), 1.0)
        >>> lowrank_self_influence(sk, torch.tensor([[2.0, 1.0]]), damping=1.0)   # 4/4 + 1/(1+1); bound 1 (1 - 1/2)
        (tensor([1.5000]), tensor([0.5000]))
        >>> lowrank_self_influence(sk, torch.tensor([[2.0, 1.0]]), damping=1.0, tail="damping")   # 4/4 + 1/1
        (tensor([2.]), tensor([0.5000]))
    """
    if grads.ndim != 2:
        raise ConfigurationError(f"grads must be (m, P), got shape {tuple(grads.shape)}.")
    _check(sketch, damping, grads.shape[1])
    _, V = _cast(sketch, grads)
    return lowrank_self_influence_from_coefficients(sketch, grads @ V, torch.linalg.vector_norm(grads, dim=1) ** 2,
                                                    damping=damping, tail=tail)


def lowrank_self_influence_from_coefficients(
    sketch: LowRankSketch, coefficients: Tensor, squared_norms: Tensor, *, damping: float, tail: str = "ritz"
) -> tuple[Tensor, Tensor]:
    r""":func:`lowrank_self_influence` from ``C = grads @ V`` ``(m, r)`` and :math:`\|g\|^2` ``(m,)``.

    The scoring loop computes ``C`` in the same matmul as the scores (one read of each gradient chunk).

    Returns:
        ``(values, bounds)`` as :func:`lowrank_self_influence`.

    Example::

        >>> sk = LowRankSketch(torch.tensor([3.0]), torch.tensor([[1.0], [0.0]]), 1.0)
        >>> lowrank_self_influence_from_coefficients(sk, torch.tensor([[2.0]]), torch.tensor([5.0]), damping=1.0)
        (tensor([1.5000]), tensor([0.5000]))
    """
    _check(sketch, damping)
    C = coefficients
    evals = sketch.eigenvalues.to(C)
    outside = torch.clamp(squared_norms - (C * C).sum(1), min=0.0)
    values = (C * C / (evals + damping)).sum(1) + outside * _tail_weight(sketch, damping, tail)
    bounds = outside * (1.0 / damping - 1.0 / (sketch.tail_eigenvalue + damping))
    return values, bounds
