r"""Leave-one-out (LOO) correlation: do influence scores predict exact leave-one-out refits?

For chosen training examples :math:`z_1, \dots, z_k` the exact refits :math:`\theta_{-i}` (trained without
:math:`z_i`; :meth:`~lightning_influence.evaluation.retrain.SubsetRetrainer.leave_one_out`) give the actual effect
of removal on each query's measurement,
:math:`\Delta_i(q) = m_q(\theta_{-i}) - m_q(\theta_{\text{full}})`, where :math:`\theta_{\text{full}}` comes from the
same ``train_fn`` on every example (so both sides share the training procedure). To first order, removing
:math:`z` changes the query **loss** by :math:`-\mathcal I(z, q)/N` (:mod:`lightning_influence.influence`), so the
aligned prediction is :math:`-s\,\mathcal I(z_i, q)` with :math:`s = +1` for ``measurement="loss"`` and
:math:`-1` for ``"margin"`` (the same :math:`s` as :func:`~lightning_influence.evaluation.lds.lds`).

The LOO correlation of a query is the Pearson correlation across the :math:`k` removed examples (dattri's
``loo_corr``); it is reported as the mean over queries with a seeded bootstrap interval over queries, plus the
Pearson and Spearman correlations of all (example, query) pairs pooled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_influence.evaluation.lds import _sign
from lightning_influence.evaluation.results import ConfidenceInterval, bootstrap_mean_ci, pearson, spearman
from lightning_influence.exceptions import ConfigurationError

__all__ = ["LOOResult", "loo_correlation"]


@dataclass
class LOOResult:
    r"""Influence scores against exact leave-one-out refits.

    Attributes:
        pearson: Mean over queries of the per-query Pearson correlation across removed examples.
        ci: Bootstrap interval of ``pearson`` over queries.
        per_query: ``(n_query,)`` per-query Pearson correlations (``NaN`` where undefined).
        pooled_pearson: Pearson correlation of all (removed example, query) pairs.
        pooled_spearman: Spearman correlation of all pairs.
        predicted: ``(k, n_query)`` aligned predictions :math:`-s\,\mathcal I(z_i, q)`.
        actual: ``(k, n_query)`` actual changes :math:`m(\theta_{-i}) - m(\theta_{\text{full}})`.
        removed: ``(k,)`` data-set indices of the removed examples.
        measurement: ``"loss"`` or ``"margin"``.
        info: Anything else worth keeping.

    Example::

        >>> actual = torch.tensor([[0.1, -0.2], [0.3, 0.1], [-0.2, 0.4]])
        >>> r = LOOResult.from_predictions(2 * actual, actual, torch.tensor([4, 7, 9]), num_resamples=100)
        >>> round(r.pearson, 6), round(r.pooled_pearson, 6), r.removed.tolist()
        (1.0, 1.0, [4, 7, 9])
    """

    pearson: float
    ci: ConfidenceInterval
    per_query: Tensor
    pooled_pearson: float
    pooled_spearman: float
    predicted: Tensor
    actual: Tensor
    removed: Tensor
    measurement: str = "loss"
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_predictions(
        cls,
        predicted: Tensor,
        actual: Tensor,
        removed: Tensor,
        *,
        measurement: str = "loss",
        num_resamples: int = 1000,
        level: float = 0.95,
        seed: int = 0,
    ) -> LOOResult:
        """Score aligned ``(k, n_query)`` predictions against the actual leave-one-out changes.

        Returns:
            The :class:`LOOResult`.

        Raises:
            ConfigurationError: If shapes differ or fewer than 3 examples were removed.
        """
        predicted, actual = predicted.detach().cpu().double(), actual.detach().cpu().double()
        if predicted.shape != actual.shape:
            raise ConfigurationError(
                f"predictions {tuple(predicted.shape)} and leave-one-out changes {tuple(actual.shape)} differ in shape."
            )
        if actual.shape[0] < 3:
            raise ConfigurationError(f"the LOO correlation needs at least 3 removed examples, got {actual.shape[0]}.")
        per_query = pearson(predicted, actual, dim=0)
        finite = torch.isfinite(per_query)
        value = float(per_query[finite].mean()) if bool(finite.any()) else math.nan
        return cls(
            pearson=value,
            ci=bootstrap_mean_ci(per_query, num_resamples=num_resamples, level=level, seed=seed, unit="queries"),
            per_query=per_query,
            pooled_pearson=float(pearson(predicted.reshape(-1), actual.reshape(-1))),
            pooled_spearman=float(spearman(predicted.reshape(-1), actual.reshape(-1))),
            predicted=predicted,
            actual=actual,
            removed=torch.as_tensor(removed).long().reshape(-1).cpu(),
            measurement=measurement,
        )

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """``loo_pearson``, its interval, and the pooled correlations under ``prefix``."""
        return {
            f"{prefix}loo_pearson": self.pearson,
            f"{prefix}loo_pearson_ci_low": self.ci.low,
            f"{prefix}loo_pearson_ci_high": self.ci.high,
            f"{prefix}loo_pooled_pearson": self.pooled_pearson,
            f"{prefix}loo_pooled_spearman": self.pooled_spearman,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"pearson": self.pearson, "ci": self.ci.to_dict(), "per_query": self.per_query.tolist(),
                "pooled_pearson": self.pooled_pearson, "pooled_spearman": self.pooled_spearman,
                "removed": self.removed.tolist(), "measurement": self.measurement, "info": dict(self.info)}


def loo_correlation(
    scores: Tensor,
    removed: Tensor | Sequence[int],
    outputs: Tensor,
    base_outputs: Tensor,
    *,
    measurement: str = "loss",
    train_indices: Tensor | Sequence[int] | None = None,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> LOOResult:
    r"""Correlate influence scores with exact leave-one-out refits.

    Args:
        scores: ``(n_query, n_scored)`` influence scores (this package's convention: negative = proponent).
        removed: ``(k,)`` data-set indices of the left-out examples (``RetrainResult.removed``).
        outputs: ``(k, n_query)`` measurements of the refits without each of them (``RetrainResult.outputs``).
        base_outputs: ``(n_query,)`` measurements of the model trained on the full set
            (``RetrainResult.base_outputs``).
        measurement: ``"loss"`` or ``"margin"``.
        train_indices: Data-set index of each score column (default ``arange(n_scored)``); every removed example
            needs a column.
        num_resamples: Bootstrap resamples over queries.
        level: Interval coverage.
        seed: Bootstrap seed.

    Returns:
        The :class:`LOOResult`.

    Raises:
        ConfigurationError: For mismatched shapes, a removed example without a score column, fewer than 3 removed
            examples or an unknown measurement.

    Example::

        >>> scores = torch.tensor([[-2.0, 1.0, 0.5, -0.5]])   # one query, 4 training examples
        >>> base = torch.tensor([1.0])
        >>> outputs = base - scores[0, [0, 1, 3]].unsqueeze(1) / 4   # removal changes the loss by -I/N
        >>> round(loo_correlation(scores, [0, 1, 3], outputs, base).pearson, 6)
        1.0
    """
    s = _sign(measurement)
    if scores.ndim != 2:
        raise ConfigurationError(f"scores must be (n_query, n_train), got shape {tuple(scores.shape)}.")
    rem = torch.as_tensor(removed, dtype=torch.long).reshape(-1)
    cols = torch.arange(scores.shape[1]) if train_indices is None else torch.as_tensor(train_indices).long().reshape(-1)
    if cols.numel() != scores.shape[1]:
        raise ConfigurationError(f"train_indices has {cols.numel()} entries, scores {scores.shape[1]} columns.")
    position = {int(c): j for j, c in enumerate(cols.tolist())}
    missing = [int(i) for i in rem.tolist() if int(i) not in position]
    if missing:
        raise ConfigurationError(
            f"removed examples {missing[:5]} have no score column; score them (train_indices) or drop them."
        )
    out = torch.as_tensor(outputs).double()
    base = torch.as_tensor(base_outputs).double().reshape(-1)
    if out.ndim == 1:
        out = out.unsqueeze(1)
    if out.shape != (rem.numel(), scores.shape[0]) or base.numel() != scores.shape[0]:
        raise ConfigurationError(
            f"outputs must be (k={rem.numel()}, n_query={scores.shape[0]}) and base_outputs (n_query,), got "
            f"{tuple(out.shape)} and {tuple(base.shape)}."
        )
    sel = torch.tensor([position[int(i)] for i in rem.tolist()], dtype=torch.long)
    predicted = -s * scores.detach().cpu().double()[:, sel].T  # (k, n_query)
    actual = out - base.unsqueeze(0)
    return LOOResult.from_predictions(predicted, actual, rem, measurement=measurement, num_resamples=num_resamples,
                                      level=level, seed=seed)
