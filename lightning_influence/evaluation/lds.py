r"""Linear datamodeling score (LDS): do summed influence scores predict what retraining on a subset does?

For :math:`M` training subsets :math:`S_1, \dots, S_M` (random :math:`\alpha`-fractions of the training set,
:class:`~lightning_influence.evaluation.retrain.SubsetRetrainer`) and a query :math:`q`, let
:math:`y_m(q)` be the measured output of the model retrained on :math:`S_m` (the query loss, or a margin) and

.. math:: \hat y_m(q) = s \sum_{z \in S_m} \mathcal I(z, q)

the predicted subset effect (the attribution model of Ilyas et al., 2022, and Park et al., 2023 (TRAK); dattri and
kronfluence use the same definition). The LDS of query :math:`q` is the Spearman rank correlation, across the
:math:`M` subsets, of :math:`\hat y_m(q)` and :math:`y_m(q)`; the LDS is its mean over queries. It is reported
with a seeded percentile-bootstrap interval over queries.

**Sign alignment** :math:`s`. This package's scores are
:math:`\mathcal I(z, q) = -\nabla\ell(q)^\top (G+\lambda I)^{-1}\nabla\ell(z)`: the derivative of the query **loss**
with respect to upweighting :math:`z`, **negative for a proponent** (see :mod:`lightning_influence.influence`).
Keeping a proponent in the subset lowers the query loss, so a more negative sum predicts a lower loss:

* ``measurement="loss"`` (the output moves with the query loss: the loss itself, a squared error): :math:`s = +1`;
* ``measurement="margin"`` (the output moves against it: a margin, a log-probability, a correct-class logit):
  :math:`s = -1`.

After alignment a higher predicted value means a higher measured value, so a good estimator has LDS near 1 and a
random one LDS near 0. (dattri's and TRAK's scores are positive for proponents; convert them with
:math:`\mathcal I = -\text{score}` before calling :func:`lds`.) Only the ranking across subsets matters, so a
positive rescaling of the scores (``1/N``, a damping convention) leaves the LDS unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_influence.evaluation.results import ConfidenceInterval, bootstrap_mean_ci, spearman
from lightning_influence.exceptions import ConfigurationError

__all__ = ["MEASUREMENTS", "LDSResult", "lds", "predicted_subset_effects", "subset_masks"]

#: ``measurement`` values and the sign :math:`s` they put on the summed scores.
MEASUREMENTS: dict[str, float] = {"loss": 1.0, "margin": -1.0}


def _sign(measurement: str) -> float:
    if measurement not in MEASUREMENTS:
        raise ConfigurationError(
            f"measurement must be 'loss' (outputs rise with the query loss) or 'margin' (outputs fall with it: "
            f"margins, log-probabilities), got {measurement!r}."
        )
    return MEASUREMENTS[measurement]


def subset_masks(subsets: Tensor | Sequence[Sequence[int]], n_train: int) -> Tensor:
    """Subsets as an ``(M, n_train)`` boolean membership mask.

    Args:
        subsets: A boolean ``(M, n_train)`` mask, or ``M`` index lists / an ``(M, k)`` integer tensor of members.
        n_train: Training-set size.

    Returns:
        The ``(M, n_train)`` mask.

    Raises:
        ConfigurationError: For a mask of the wrong width, an index outside ``[0, n_train)`` or no subset.

    Example::

        >>> subset_masks([[0, 2], [1, 2]], 3).tolist()
        [[True, False, True], [False, True, True]]
    """
    if isinstance(subsets, Tensor) and subsets.dtype == torch.bool:
        if subsets.ndim != 2 or subsets.shape[1] != n_train:
            raise ConfigurationError(
                f"subsets is a boolean mask of shape {tuple(subsets.shape)}; it must be (num_subsets, {n_train}) "
                "(one column per training example scored)."
            )
        mask = subsets.cpu()
    else:
        rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in subsets]
        mask = torch.zeros(len(rows), n_train, dtype=torch.bool)
        for m, r in enumerate(rows):
            if r.numel() and (int(r.min()) < 0 or int(r.max()) >= n_train):
                raise ConfigurationError(f"subset {m} has training indices outside [0, {n_train}).")
            mask[m, r] = True
    if mask.shape[0] == 0:
        raise ConfigurationError("subsets is empty: the LDS needs at least 3 retrained subsets (M >= 50 is usual).")
    return mask


def predicted_subset_effects(
    scores: Tensor,
    subsets: Tensor | Sequence[Sequence[int]],
    *,
    measurement: str = "loss",
    train_indices: Tensor | Sequence[int] | None = None,
    n_train: int | None = None,
) -> Tensor:
    r"""The aligned predicted outputs :math:`\hat y_m(q) = s\sum_{z\in S_m}\mathcal I(z, q)`, shape ``(M, n_query)``.

    Args:
        scores: ``(n_query, n_scored)`` influence scores in this package's convention (negative = proponent).
        subsets: Membership of each retrained subset (see :func:`subset_masks`), over the whole training set.
        measurement: ``"loss"`` or ``"margin"`` (the sign :math:`s`; see the module docstring).
        train_indices: Training data-set index of each score column (default ``arange(n_scored)``). Examples
            without a column contribute nothing to the prediction (they are in every subset, e.g. unscored ones).
        n_train: Training-set size (default: the subsets' width, or ``max(train_indices) + 1``).

    Returns:
        The ``(M, n_query)`` float64 predictions.

    Raises:
        ConfigurationError: For a bad shape, index or measurement.

    Example::

        >>> scores = torch.tensor([[-1.0, 0.5, 2.0]])   # one query: example 0 helps it, example 2 hurts it
        >>> predicted_subset_effects(scores, [[0, 1], [1, 2]]).tolist()
        [[-0.5], [2.5]]
    """
    s = _sign(measurement)
    if scores.ndim != 2:
        raise ConfigurationError(f"scores must be (n_query, n_train), got shape {tuple(scores.shape)}.")
    cols = torch.arange(scores.shape[1]) if train_indices is None else torch.as_tensor(train_indices).long().reshape(-1)
    if cols.numel() != scores.shape[1]:
        raise ConfigurationError(
            f"train_indices has {cols.numel()} entries but scores has {scores.shape[1]} columns; pass one data-set "
            "index per score column."
        )
    if n_train is None:
        if isinstance(subsets, Tensor) and subsets.dtype == torch.bool:
            n_train = int(subsets.shape[1])
        else:
            n_train = int(cols.max()) + 1 if cols.numel() else 0
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= n_train):
        raise ConfigurationError(
            f"the score columns map to training indices in [{int(cols.min())}, {int(cols.max())}] but the subsets "
            f"cover n_train={n_train} examples; pass train_indices= (the data-set index of each score column) and "
            "subsets over the whole training set."
        )
    mask = subset_masks(subsets, n_train)[:, cols].double()  # (M, n_scored)
    return s * (mask @ scores.detach().cpu().double().T)


@dataclass
class LDSResult:
    """The linear datamodeling score of one set of scores against retraining.

    Attributes:
        lds: Mean over queries of the per-query Spearman correlation (queries with an undefined correlation, i.e.
            constant predictions or outputs, are left out and counted in ``num_undefined``).
        ci: Bootstrap interval of ``lds`` over queries.
        per_query: ``(n_query,)`` Spearman correlations (``NaN`` where undefined).
        predicted: ``(M, n_query)`` aligned predicted outputs (higher = higher measured output expected).
        actual: ``(M, n_query)`` measured outputs of the retrained models.
        measurement: ``"loss"`` or ``"margin"``.
        num_undefined: Queries whose correlation is undefined.
        info: Anything else worth keeping (subset fraction, estimator, timings).

    Example::

        >>> actual = torch.tensor([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])   # 3 subsets x 2 queries
        >>> r = LDSResult.from_predictions(actual.clone(), actual, num_resamples=100)
        >>> r.lds, r.per_query.tolist(), r.metrics()["lds"]
        (1.0, [1.0, 1.0], 1.0)
    """

    lds: float
    ci: ConfidenceInterval
    per_query: Tensor
    predicted: Tensor
    actual: Tensor
    measurement: str = "loss"
    num_undefined: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_subsets(self) -> int:
        """``M``."""
        return int(self.actual.shape[0])

    @property
    def num_queries(self) -> int:
        """Number of queries."""
        return int(self.actual.shape[1])

    @classmethod
    def from_predictions(
        cls,
        predicted: Tensor,
        actual: Tensor,
        *,
        measurement: str = "loss",
        num_resamples: int = 1000,
        level: float = 0.95,
        seed: int = 0,
        info: dict[str, Any] | None = None,
    ) -> LDSResult:
        """Score already aligned ``(M, n_query)`` predictions against the measured outputs.

        Returns:
            The :class:`LDSResult`.

        Raises:
            ConfigurationError: If the shapes differ or fewer than 3 subsets are given.
        """
        predicted = predicted.detach().cpu().double()
        actual = torch.as_tensor(actual).detach().cpu().double()
        if actual.ndim == 1:
            actual = actual.unsqueeze(1)
        if predicted.shape != actual.shape:
            raise ConfigurationError(
                f"the retrained outputs have shape {tuple(actual.shape)} but the predictions {tuple(predicted.shape)}; "
                "outputs must be (num_subsets, n_query) with the queries in the order of the score rows."
            )
        if actual.shape[0] < 3:
            raise ConfigurationError(f"the LDS needs at least 3 subsets (a rank correlation), got {actual.shape[0]}.")
        per_query = spearman(predicted, actual, dim=0)
        finite = torch.isfinite(per_query)
        value = float(per_query[finite].mean()) if bool(finite.any()) else math.nan
        ci = bootstrap_mean_ci(per_query, num_resamples=num_resamples, level=level, seed=seed, unit="queries")
        return cls(lds=value, ci=ci, per_query=per_query, predicted=predicted, actual=actual, measurement=measurement,
                   num_undefined=int((~finite).sum()), info=dict(info or {}))

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """``lds``, ``lds_ci_low``, ``lds_ci_high``, ``lds_num_subsets``, ``lds_num_queries`` under ``prefix``."""
        return {
            f"{prefix}lds": self.lds,
            f"{prefix}lds_ci_low": self.ci.low,
            f"{prefix}lds_ci_high": self.ci.high,
            f"{prefix}lds_num_subsets": float(self.num_subsets),
            f"{prefix}lds_num_queries": float(self.num_queries),
        }

    def scatter(self, max_points: int = 5000) -> dict[str, list[float]]:
        """Predicted vs actual, each standardised per query across subsets (so every query shares the axes).

        Returns:
            ``{"predicted": [...], "actual": [...]}``, at most ``max_points`` pairs (the first queries first).
        """

        def z(t: Tensor) -> Tensor:
            sd = t.std(0, keepdim=True)
            return (t - t.mean(0, keepdim=True)) / torch.where(sd > 0, sd, torch.ones_like(sd))

        keep = torch.isfinite(self.per_query)
        p, a = z(self.predicted[:, keep]).T.reshape(-1), z(self.actual[:, keep]).T.reshape(-1)
        return {"predicted": p[:max_points].tolist(), "actual": a[:max_points].tolist()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no ``(M, n_query)`` matrices; see :meth:`scatter`)."""
        return {
            "lds": self.lds,
            "ci": self.ci.to_dict(),
            "per_query": self.per_query.tolist(),
            "measurement": self.measurement,
            "num_subsets": self.num_subsets,
            "num_queries": self.num_queries,
            "num_undefined": self.num_undefined,
            "info": dict(self.info),
        }


def lds(
    scores: Tensor,
    subsets: Tensor | Sequence[Sequence[int]],
    outputs: Tensor,
    *,
    measurement: str = "loss",
    train_indices: Tensor | Sequence[int] | None = None,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> LDSResult:
    r"""Linear datamodeling score of ``scores`` against models retrained on ``subsets``.

    For each query, the Spearman correlation across the :math:`M` subsets between the aligned predicted effect
    :math:`s\sum_{z \in S_m}\mathcal I(z, q)` and the measured output :math:`y_m(q)`; the LDS is the mean over
    queries, with a seeded percentile-bootstrap interval over queries. :math:`s = +1` for
    ``measurement="loss"``, :math:`-1` for ``"margin"``, because this package's scores are negative for
    proponents and measure the derivative of the query **loss** (module docstring).

    Args:
        scores: ``(n_query, n_scored)`` influence scores (:attr:`InfluenceResult.scores
            <lightning_influence.influence.InfluenceResult.scores>`); convert other libraries' scores to this
            convention first.
        subsets: ``(M, n_train)`` boolean membership (``RetrainResult.subsets``) or ``M`` index lists.
        outputs: ``(M, n_query)`` measured outputs of the retrained models (``RetrainResult.outputs``).
        measurement: ``"loss"`` or ``"margin"``: what ``outputs`` measure.
        train_indices: Training data-set index of each score column (default ``arange(n_scored)``).
        num_resamples: Bootstrap resamples over queries.
        level: Interval coverage.
        seed: Bootstrap seed.

    Returns:
        The :class:`LDSResult`.

    Raises:
        ConfigurationError: For mismatched shapes, fewer than 3 subsets or an unknown measurement.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> scores = torch.randn(4, 20, generator=g, dtype=torch.float64)       # 4 queries x 20 training examples
        >>> masks = torch.rand(30, 20, generator=g) < 0.5                       # 30 random half-subsets
        >>> outputs = masks.double() @ scores.T + 0.01 * torch.randn(30, 4, generator=g, dtype=torch.float64)
        >>> r = lds(scores, masks, outputs)                                     # outputs = a loss: s = +1
        >>> r.lds > 0.99, r.ci.low > 0.99, r.num_subsets
        (True, True, 30)
        >>> lds(scores, masks, -outputs, measurement="margin").lds > 0.99      # a margin moves the other way
        True
    """
    outputs = torch.as_tensor(outputs)
    n_train = int(subsets.shape[1]) if isinstance(subsets, Tensor) and subsets.dtype == torch.bool else None
    if n_train is None:
        cols = torch.arange(scores.shape[1]) if train_indices is None else torch.as_tensor(train_indices)
        n_train = max(int(cols.max()) + 1 if cols.numel() else 0,
                      max((int(torch.as_tensor(s).max()) + 1 for s in subsets if len(s)), default=0))
    predicted = predicted_subset_effects(scores, subsets, measurement=measurement, train_indices=train_indices,
                                         n_train=n_train)
    return LDSResult.from_predictions(predicted, outputs, measurement=measurement, num_resamples=num_resamples,
                                      level=level, seed=seed)
