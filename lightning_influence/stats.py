r"""Agreement statistics: how well influence estimates track a reference, and the sentence that says so.

One home for the numbers :class:`~lightning_influence.callbacks.pbrf_validation.PBRFValidation` computes and
:mod:`~lightning_influence.reporting` shows:

* :func:`pearson_along` / :func:`spearman_along`: column-wise correlations of two ``(n, k)`` tensors in float64
  (Pearson through ``torchmetrics.functional.pearson_corrcoef``; Spearman as the Pearson correlation of average
  ranks, :func:`rankdata`, because torchmetrics' Spearman computes in float32 and returns 0 for a constant input),
  ``NaN`` for an undefined column (fewer than two points, a constant side); :func:`pearson` / :func:`spearman`: the
  same for two vectors, as a float. The approximate-CV, PBRF and attribution (LDS, LOO) code all use these;
* :func:`median`: the median of the finite values (``NaN`` if there are none); :func:`as_finite`: a JSON value
  as a finite float or ``None``;
* :func:`correlation_table`: one row per estimator against the PBRF, pooled and per training example;
* :func:`verdict`: the plain-language sentence on a correlation table.

The verdict lives next to the table because it is the table's only reader: the row schema (``"estimator"``,
``"pearson"``, ``"spearman"``, ``"n"``) is written and interpreted in this one file.

Plain PyTorch: no Lightning import.

Example::

    >>> import torch
    >>> pbrf = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
    >>> rows, _ = correlation_table(pbrf, {"cg": 2 * pbrf})
    >>> verdict(rows, report_solver="cg")[:54]
    "The report's cg influence scores agree closely with re"
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_influence.exceptions import ConfigurationError

__all__ = [
    "as_finite",
    "correlation_table",
    "median",
    "pearson",
    "pearson_along",
    "rankdata",
    "spearman",
    "spearman_along",
    "verdict",
]

_BASELINE = "gradient_dot"  # estimator name of the curvature-free baseline in correlation tables
_CLOSE, _MODERATE = 0.9, 0.7  # Pearson thresholds of the verdict
_Vector = Tensor | Sequence[float]


def _correlation(metric: Callable[[Tensor, Tensor], Tensor], x: _Vector, y: _Vector) -> float:
    """``metric`` of ``x`` and ``y`` in float64; NaN where it is undefined (fewer than two points, constant input)."""
    xs = torch.as_tensor(x, dtype=torch.float64).detach().flatten()
    ys = torch.as_tensor(y, dtype=torch.float64).detach().flatten()
    if xs.numel() < 2 or float(xs.std()) == 0.0 or float(ys.std()) == 0.0:
        return math.nan
    return float(metric(xs, ys))


def rankdata(x: Tensor, dim: int = -1) -> Tensor:
    """Average ranks ``1..n`` along ``dim`` (ties get the mean of the positions they occupy), as float64.

    Args:
        x: Any real tensor.
        dim: The dimension to rank along.

    Returns:
        Ranks shaped like ``x``.

    Example::

        >>> rankdata(torch.tensor([10.0, 30.0, 20.0, 20.0])).tolist()
        [1.0, 4.0, 2.5, 2.5]
        >>> rankdata(torch.tensor([[3.0, 1.0], [2.0, 2.0]]), dim=0).tolist()
        [[2.0, 1.0], [1.0, 2.0]]
    """
    moved = torch.as_tensor(x).movedim(dim, -1)
    shape = moved.shape
    n = shape[-1] if moved.ndim else 1
    rows = moved.reshape(-1, n)
    if n == 0:
        return torch.zeros(shape, dtype=torch.float64).movedim(-1, dim)
    s, order = torch.sort(rows, dim=-1, stable=True)
    new_group = torch.ones_like(s, dtype=torch.bool)
    new_group[:, 1:] = s[:, 1:] != s[:, :-1]
    group = torch.cumsum(new_group.long(), dim=-1) - 1  # (r, n), 0-based group id within the row
    r = rows.shape[0]
    flat_group = (group + torch.arange(r).unsqueeze(1) * n).reshape(-1)
    pos = torch.arange(1, n + 1, dtype=torch.float64).expand(r, n).reshape(-1)
    first = torch.full((r * n,), math.inf, dtype=torch.float64).scatter_reduce(0, flat_group, pos, "amin")
    last = torch.full((r * n,), -math.inf, dtype=torch.float64).scatter_reduce(0, flat_group, pos, "amax")
    avg_sorted = (0.5 * (first + last))[flat_group].reshape(r, n)
    ranks = torch.empty_like(avg_sorted).scatter_(-1, order, avg_sorted)
    return ranks.reshape(shape).movedim(-1, dim)


def pearson_along(x: Tensor, y: Tensor, dim: int = 0) -> Tensor:
    """Pearson correlation of ``x`` and ``y`` along ``dim`` (column-wise for ``(n, k)`` inputs), float64.

    Returns:
        The correlations (the other dimensions of the inputs); ``NaN`` where either side is constant.

    Raises:
        ConfigurationError: If the shapes differ.

    Example::

        >>> x = torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
        >>> pearson_along(x, torch.tensor([[2.0, 0.0], [4.0, 1.0], [6.0, 2.0]])).tolist()
        [1.0, nan]
    """
    if x.shape != y.shape:
        raise ConfigurationError(f"pearson_along: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}.")
    from torchmetrics.functional import pearson_corrcoef

    xs, ys = x.double().movedim(dim, 0), y.double().movedim(dim, 0)
    shape = xs.shape[1:]
    xs, ys = xs.reshape(xs.shape[0], -1), ys.reshape(ys.shape[0], -1)
    # Constant columns (zero spread up to rounding) have no correlation.
    spread = lambda t: (t - t.mean(0)).abs().amax(0)  # noqa: E731
    scale = 1e-13 * torch.ones(())
    defined = (spread(xs) > scale * xs.abs().amax(0).clamp_min(1e-300)) & (
        spread(ys) > scale * ys.abs().amax(0).clamp_min(1e-300))
    if xs.shape[0] < 2 or not bool(defined.any()):
        return torch.full(shape, math.nan, dtype=torch.float64)
    out = torch.full((xs.shape[1],), math.nan, dtype=torch.float64)
    cols = defined.nonzero().reshape(-1)
    r = pearson_corrcoef(xs[:, cols], ys[:, cols]).reshape(-1).to(torch.float64)
    out[cols] = r.clamp(-1.0, 1.0)
    return out.reshape(shape)


def spearman_along(x: Tensor, y: Tensor, dim: int = 0) -> Tensor:
    """Spearman rank correlation along ``dim``: the Pearson correlation of the average ranks (:func:`rankdata`).

    Returns:
        The correlations; ``NaN`` where either side is constant.

    Example::

        >>> spearman_along(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 8.0, 27.0, 64.0])).item()
        1.0
    """
    return pearson_along(rankdata(x, dim), rankdata(y, dim), dim)


def pearson(x: _Vector, y: _Vector) -> float:
    """Pearson correlation of two equally long vectors (``torchmetrics``, float64).

    Args:
        x: Values (tensor or sequence; flattened).
        y: Values of the same length.

    Returns:
        The correlation, or ``NaN`` for fewer than two points or a constant input.

    Example::

        >>> pearson([1.0, 2.0, 3.0], [2.0, 4.0, 7.0]) > 0.99, math.isnan(pearson([1.0, 2.0], [3.0, 3.0]))
        (True, True)
    """
    return _correlation(pearson_along, x, y)


def spearman(x: _Vector, y: _Vector) -> float:
    """Spearman rank correlation of two equally long vectors (``torchmetrics``, float64).

    Args:
        x: Values (tensor or sequence; flattened).
        y: Values of the same length.

    Returns:
        The rank correlation, or ``NaN`` for fewer than two points or a constant input.

    Example::

        >>> round(spearman([1.0, 2.0, 3.0], [1.0, 10.0, 100.0]), 4), math.isnan(spearman([1.0], [2.0]))
        (1.0, True)
    """
    return _correlation(spearman_along, x, y)


def median(values: Iterable[float]) -> float:
    """Median of the finite values (NaN and ±inf are ignored).

    Args:
        values: Numbers.

    Returns:
        The median, or ``NaN`` if no value is finite.

    Example::

        >>> median([3.0, float("nan"), 1.0, 2.0, 10.0]), math.isnan(median([float("nan")]))
        (2.5, True)
    """
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else 0.5 * (finite[mid - 1] + finite[mid])


def correlation_table(pbrf: Tensor, estimates: dict[str, Tensor]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pearson/Spearman of each estimator against the PBRF, overall (pooled) and per training example.

    Args:
        pbrf: ``(num_train, num_queries)`` PBRF responses.
        estimates: Estimator name → scores of the same shape.

    Returns:
        ``(rows, per_example)``: one row per estimator with ``pearson``, ``spearman`` (pooled over all pairs), their
        medians over training examples and ``n``; and, per estimator, the per-example lists.

    Raises:
        ConfigurationError: If a shape differs from the PBRF's.

    Example::

        >>> r = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
        >>> rows, _ = correlation_table(r, {"exact": 2 * r})
        >>> round(rows[0]["pearson"], 6), round(rows[0]["spearman"], 6)
        (1.0, 1.0)
    """
    rows: list[dict[str, Any]] = []
    per_example: dict[str, Any] = {}
    for name, est in estimates.items():
        if est.shape != pbrf.shape:
            raise ConfigurationError(f"{name} scores have shape {tuple(est.shape)}, the PBRF {tuple(pbrf.shape)}.")
        pe_p = [pearson(est[i], pbrf[i]) for i in range(pbrf.shape[0])]
        pe_s = [spearman(est[i], pbrf[i]) for i in range(pbrf.shape[0])]
        rows.append(
            {
                "estimator": name,
                "pearson": pearson(est, pbrf),
                "spearman": spearman(est, pbrf),
                "pearson_median_per_example": median(pe_p),
                "spearman_median_per_example": median(pe_s),
                "n": int(pbrf.numel()),
            }
        )
        per_example[name] = {"pearson": pe_p, "spearman": pe_s}
    return rows, per_example


def as_finite(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` for anything else (missing, non-numeric, bool, NaN, ±inf).

    What the verdict and the report read from JSON rows, where a correlation may be ``null`` or a string.

    Args:
        value: Any value.

    Returns:
        The float, or ``None``.

    Example::

        >>> as_finite("0.5"), as_finite(None), as_finite(True), as_finite(float("nan")), as_finite([1])
        (0.5, None, None, None, None)
    """
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


# ---------------------------------------------------------------------------------------------------- verdict
def _judged_row(rows: Sequence[Mapping[str, Any]], report_solver: str | None) -> Mapping[str, Any] | None:
    """The report solver's row if named, else the best finite-Pearson row (the baseline only if nothing else)."""
    if report_solver is not None:
        return next((r for r in rows if r.get("estimator") == report_solver), None)
    finite = [r for r in rows if as_finite(r.get("pearson")) is not None]
    candidates = [r for r in finite if r.get("estimator") != _BASELINE] or finite
    return max(candidates, key=lambda r: float(r["pearson"]), default=None)


_NOT_COMPUTED = "The PBRF comparison could not be computed (constant scores or responses)."


def _numbers(row: Mapping[str, Any], p: float) -> str:
    """``"Pearson ρ = …, Spearman ρ = … over n pairs"`` with the parts the row has."""
    s, n = as_finite(row.get("spearman")), row.get("n")
    text = f"Pearson ρ = {p:.3f}"
    text += f", Spearman ρ = {s:.3f}" if s is not None else ""
    return text + (f" over {n} pairs" if isinstance(n, int) and not isinstance(n, bool) else "")


def _agreement(subject: str, p: float, numbers: str) -> str:
    """Rule 3 of :func:`verdict`: the sentence for Pearson ``p``."""
    if p >= _CLOSE:
        return (
            f"{subject} agree closely with retraining (PBRF): {numbers}; they can be trusted to rank training examples."
        )
    if p >= _MODERATE:
        return (
            f"{subject} agree only moderately with retraining (PBRF): {numbers}; trust the strongest "
            "proponents/opponents, not fine-grained rankings."
        )
    return (
        f"{subject} disagree with retraining (PBRF): {numbers}; do not rely on them (increase the damping, the "
        "LiSSA batch size or the solver iterations, and check the solver diagnostics)."
    )


def verdict(rows: Sequence[Mapping[str, Any]], report_solver: str | None = None, converged: bool = True) -> str:
    """A plain-language sentence on how well influence scores agree with the PBRF (retraining).

    Rules, in order:

    1. **Which row.** With ``report_solver`` named, its row (the scores the report published). Without one, the
       row with the largest finite Pearson correlation, preferring influence estimators to the gradient-dot
       baseline (``"gradient_dot"``), which is judged only when nothing else has a value.
    2. **Nothing to judge.** A named solver whose row is missing or whose Pearson is not finite (constant scores
       or responses) gives "The PBRF comparison could not be computed ..."; with no solver named and no finite
       Pearson anywhere the verdict is empty (``""``: there is nothing to say).
    3. **Agreement** (Pearson ρ of the judged row): ρ ≥ 0.9 "agree closely", ρ ≥ 0.7 "agree only moderately",
       otherwise "disagree" (with what to change). The sentence quotes ρ, the Spearman ρ and the number of pairs
       when the row has them.
    4. **Baseline.** If the table has a finite gradient-dot row other than the judged one, its Pearson ρ is added.
    5. **Convergence.** ``converged=False`` adds a warning that the PBRF reference is approximate.

    Args:
        rows: Correlation rows with ``"estimator"`` and ``"pearson"`` (optionally ``"spearman"``, ``"n"``), as
            :func:`correlation_table` returns them or as stored in ``report.json``.
        report_solver: The estimator whose scores are on trial (the influence report's solver); ``None`` judges
            the best row.
        converged: Whether every PBRF solve converged.

    Returns:
        The sentence (empty only when no solver is named and no row has a finite Pearson).

    Example::

        >>> rows = [{"estimator": "cg", "pearson": 0.95, "spearman": 0.9, "n": 40},
        ...         {"estimator": "gradient_dot", "pearson": 0.5}]
        >>> print(verdict(rows, report_solver="cg", converged=False))  # doctest: +NORMALIZE_WHITESPACE
        The report's cg influence scores agree closely with retraining (PBRF): Pearson ρ = 0.950, Spearman ρ = 0.900
        over 40 pairs; they can be trusted to rank training examples. The gradient-dot baseline reaches Pearson
        ρ = 0.500. Warning: some PBRF solves did not converge (see the certificates); the reference is approximate.
        >>> verdict(rows)[:45], verdict([{"estimator": "cg", "pearson": None}])
        ('The cg influence scores agree closely with re', '')
    """
    row = _judged_row(rows, report_solver)
    p = None if row is None else as_finite(row.get("pearson"))
    if row is None or p is None:
        return "" if report_solver is None else _NOT_COMPUTED
    whose = "The report's" if report_solver is not None else "The"
    text = _agreement(f"{whose} {row.get('estimator', 'influence')} influence scores", p, _numbers(row, p))
    gd = next((r for r in rows if r.get("estimator") == _BASELINE and r is not row), None)
    gd_p = None if gd is None else as_finite(gd.get("pearson"))
    if gd_p is not None:
        text += f" The gradient-dot baseline reaches Pearson ρ = {gd_p:.3f}."
    if not converged:
        text += " Warning: some PBRF solves did not converge (see the certificates); the reference is approximate."
    return text
