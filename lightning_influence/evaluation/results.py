r"""Statistics shared by the attribution-quality measures: ranks, correlations and bootstrap intervals.

One implementation of each, in torch (float64), batched over columns:

* :func:`rankdata`: average ranks (ties share the mean of their positions), sort-based, ``O(n log n)`` per row.
* :func:`pearson` / :func:`spearman`: column-wise correlations of two ``(n, k)`` tensors; a constant column gives
  ``NaN`` (a correlation is undefined there), never a silent 0.
* :func:`bootstrap_mean_ci`: a seeded percentile bootstrap interval of the mean of per-unit values (per query
  for LDS and LOO), drawn from a dedicated :class:`torch.Generator` (the global RNG is never used).
* :class:`ConfidenceInterval`: the interval with its level, the number of resamples, the seed and what was
  resampled, so a reader can judge it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_influence.exceptions import ConfigurationError
from lightning_influence.params import make_generator
from lightning_influence.stats import pearson_along as pearson
from lightning_influence.stats import rankdata
from lightning_influence.stats import spearman_along as spearman

__all__ = [  # pearson, rankdata, spearman: re-exported from lightning_influence.stats (one implementation)
    "ConfidenceInterval",
    "bootstrap_mean_ci",
    "bootstrap_statistic_ci",
    "pearson",
    "percentile_interval",
    "rankdata",
    "spearman",
]


@dataclass(frozen=True)
class ConfidenceInterval:
    """A percentile bootstrap confidence interval.

    Attributes:
        low: Lower end.
        high: Upper end.
        level: Coverage, e.g. ``0.95``.
        num_resamples: Bootstrap resamples drawn.
        seed: Seed of the resampling generator.
        unit: What was resampled (``"queries"`` for LDS and LOO, ``"training examples"`` for mislabel detection).
        method: ``"percentile bootstrap"`` (or ``"permutation null"`` for a chance baseline).

    Example::

        >>> ci = ConfidenceInterval(0.8, 0.9, 0.95, 1000, 0, "queries")
        >>> ci.contains(0.85), ci.width, ci.to_dict()["num_resamples"]
        (True, 0.09999999999999998, 1000)
    """

    low: float
    high: float
    level: float
    num_resamples: int
    seed: int
    unit: str
    method: str = "percentile bootstrap"

    @property
    def width(self) -> float:
        """``high - low``."""
        return self.high - self.low

    def contains(self, value: float) -> bool:
        """Whether ``low <= value <= high``."""
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def _check_level(level: float, num_resamples: int) -> None:
    if not 0.0 < level < 1.0:
        raise ConfigurationError(f"level must lie in (0, 1), e.g. 0.95; got {level}.")
    if num_resamples < 1:
        raise ConfigurationError(f"num_resamples must be >= 1, got {num_resamples}.")


def percentile_interval(samples: Tensor, level: float) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the finite entries of ``samples``.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when no entry is finite.

    Example::

        >>> [round(v, 6) for v in percentile_interval(torch.arange(101.0), 0.9)]
        [5.0, 95.0]
    """
    finite = samples[torch.isfinite(samples)].double()
    if finite.numel() == 0:
        return math.nan, math.nan
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(finite, q).tolist()
    return float(lo), float(hi)


def bootstrap_statistic_ci(
    n: int,
    statistic: Callable[[Tensor], Tensor],
    *,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    unit: str = "queries",
    chunk: int = 250,
) -> ConfidenceInterval:
    """Percentile bootstrap interval of ``statistic`` over ``n`` units resampled with replacement.

    Args:
        n: Number of units.
        statistic: Maps an ``(B, n)`` tensor of resampled unit indices to the ``(B,)`` statistics.
        num_resamples: Resamples ``B`` in total (drawn in chunks of ``chunk``).
        level: Coverage.
        seed: Seed of the dedicated generator.
        unit: What the units are (recorded in the interval).
        chunk: Resamples per call of ``statistic`` (bounds memory).

    Returns:
        The :class:`ConfidenceInterval`.

    Raises:
        ConfigurationError: For ``n < 1``, a level outside (0, 1) or ``num_resamples < 1``.

    Example::

        >>> v = torch.linspace(0, 1, 50, dtype=torch.float64)
        >>> ci = bootstrap_statistic_ci(50, lambda idx: v[idx].mean(1), num_resamples=500, seed=0)
        >>> ci.low < 0.5 < ci.high, ci.unit
        (True, 'queries')
    """
    _check_level(level, num_resamples)
    if n < 1:
        raise ConfigurationError(f"bootstrap needs at least one {unit[:-1] if unit.endswith('s') else unit}, got 0.")
    gen = make_generator(seed)
    parts = []
    done = 0
    while done < num_resamples:
        b = min(chunk, num_resamples - done)
        idx = torch.randint(0, n, (b, n), generator=gen)
        parts.append(statistic(idx).double().reshape(-1))
        done += b
    low, high = percentile_interval(torch.cat(parts), level)
    return ConfidenceInterval(low, high, float(level), int(num_resamples), int(seed), unit)


def bootstrap_mean_ci(
    values: Tensor,
    *,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    unit: str = "queries",
) -> ConfidenceInterval:
    """Seeded percentile bootstrap interval of the mean of ``values`` (``NaN`` entries are left out first).

    Args:
        values: ``(n,)`` per-unit values (e.g. the Spearman correlation of each query).
        num_resamples: Bootstrap resamples.
        level: Coverage (default 0.95).
        seed: Seed of the dedicated generator.
        unit: What the entries are.

    Returns:
        The :class:`ConfidenceInterval` (``nan`` ends when no value is finite).

    Example::

        >>> ci = bootstrap_mean_ci(torch.tensor([0.7, 0.8, 0.9, 0.85, 0.75]), num_resamples=2000, seed=1)
        >>> 0.7 <= ci.low < 0.8 < ci.high <= 0.9, ci.num_resamples
        (True, 2000)
    """
    v = torch.as_tensor(values).double().reshape(-1)
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        _check_level(level, num_resamples)
        return ConfidenceInterval(math.nan, math.nan, float(level), int(num_resamples), int(seed), unit)
    return bootstrap_statistic_ci(v.numel(), lambda idx: v[idx].mean(1), num_resamples=num_resamples, level=level,
                                  seed=seed, unit=unit)


