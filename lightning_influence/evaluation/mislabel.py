r"""Mislabel detection: does ranking training examples by self-influence find the flipped labels?

:func:`flip_labels` moves a seeded fraction of the labels to a random *other* class. After training on the
corrupted set, :func:`mislabel_detection` ranks the training examples by their self-influence
:math:`s(z) = \nabla\ell(z)^\top (G+\lambda I)^{-1}\nabla\ell(z)` (largest first; see
:mod:`lightning_influence.influence`) and reports, against the same ranking by training loss and by a seeded
random ranking:

* **AUC**: the probability that a flipped example ranks above a clean one (ties count one half; the
  Mann-Whitney statistic of the average ranks); 0.5 for a random ranking;
* **recall@k**: the fraction of the flipped examples among the ``k`` highest ranked (default ``k`` = the number
  of flipped examples); :math:`k/n` in expectation for a random ranking.

Each comes with a seeded percentile-bootstrap interval over **training examples** (there are no queries here).
The chance level is given as an interval too: the spread of AUC and recall@k over seeded random rankings of the
same labels (a permutation null), so "above chance" can be checked against a number rather than against 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_influence.evaluation.results import (
    ConfidenceInterval,
    _check_level,
    bootstrap_statistic_ci,
    percentile_interval,
    rankdata,
)
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.params import make_generator

__all__ = ["DetectionScore", "MislabelResult", "detection_auc", "flip_labels", "mislabel_detection", "recall_at_k"]


def flip_labels(
    labels: Tensor, fraction: float = 0.05, num_classes: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Move ``round(fraction * n)`` seeded labels to a uniformly drawn *other* class.

    Args:
        labels: ``(n,)`` integer class labels.
        fraction: Fraction of the examples to corrupt, in ``(0, 1)``.
        num_classes: Number of classes (default ``labels.max() + 1``).
        seed: Seed of the dedicated generator.

    Returns:
        ``(noisy_labels, flipped)``: the corrupted copy and the sorted data-set indices that were flipped.

    Raises:
        ConfigurationError: For a fraction outside ``(0, 1)``, fewer than 2 classes or non-integer labels.

    Example::

        >>> y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
        >>> noisy, flipped = flip_labels(y, 0.3, seed=0)
        >>> len(flipped), bool((noisy[flipped] != y[flipped]).all()), int((noisy != y).sum())
        (3, True, 3)
    """
    y = torch.as_tensor(labels)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim != 1:
        raise ConfigurationError(
            f"labels must be a 1-D integer tensor, got dtype {y.dtype} and shape {tuple(y.shape)}."
        )
    if not 0.0 < fraction < 1.0:
        raise ConfigurationError(f"fraction must lie in (0, 1), e.g. 0.05; got {fraction}.")
    c = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if c < 2:
        raise ConfigurationError(f"flipping labels needs at least 2 classes, got num_classes={c}.")
    gen = make_generator(seed)
    count = max(1, round(fraction * y.numel()))
    flipped = torch.sort(torch.randperm(y.numel(), generator=gen)[:count]).values
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + torch.randint(1, c, (count,), generator=gen, dtype=y.dtype)) % c
    return noisy, flipped


def _as_mask(flipped: Tensor | Sequence[int], n: int) -> Tensor:
    f = torch.as_tensor(flipped)
    if f.dtype == torch.bool:
        if f.numel() != n:
            raise ConfigurationError(f"flipped is a mask of {f.numel()} entries; it must have one per example ({n}).")
        return f.reshape(-1).cpu()
    idx = f.long().reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ConfigurationError(f"flipped indices must lie in [0, {n}).")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return mask


def _auc_rows(scores: Tensor, labels: Tensor) -> Tensor:
    """AUC of each row of ``scores`` (B, n) against boolean ``labels`` (B, n); NaN when a row lacks a class."""
    ranks = rankdata(scores, dim=-1)
    lab = labels.double()
    n_pos = lab.sum(-1)
    n_neg = lab.shape[-1] - n_pos
    u = (ranks * lab).sum(-1) - n_pos * (n_pos + 1) / 2
    auc = u / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full_like(auc, float("nan")))


def _recall_rows(scores: Tensor, labels: Tensor, k: int) -> Tensor:
    top = torch.topk(scores, k, dim=-1).indices
    hits = labels.gather(-1, top).double().sum(-1)
    n_pos = labels.double().sum(-1)
    return torch.where(n_pos > 0, hits / n_pos.clamp_min(1), torch.full_like(hits, float("nan")))


def detection_auc(scores: Tensor, flipped: Tensor | Sequence[int]) -> float:
    """ROC AUC of ranking by ``scores`` (higher = more suspicious) for finding ``flipped``.

    Returns:
        The AUC in ``[0, 1]`` (ties count one half).

    Example::

        >>> detection_auc(torch.tensor([0.9, 0.1, 0.8, 0.2]), [0, 2]), detection_auc(torch.ones(4), [1])
        (1.0, 0.5)
    """
    s = torch.as_tensor(scores).double().reshape(-1)
    return float(_auc_rows(s.unsqueeze(0), _as_mask(flipped, s.numel()).unsqueeze(0))[0])


def recall_at_k(scores: Tensor, flipped: Tensor | Sequence[int], k: int) -> float:
    """Fraction of ``flipped`` among the ``k`` highest ``scores``.

    Returns:
        The recall in ``[0, 1]``.

    Example::

        >>> recall_at_k(torch.tensor([0.9, 0.1, 0.8, 0.2]), [0, 3], k=2)
        0.5
    """
    s = torch.as_tensor(scores).double().reshape(-1)
    return float(_recall_rows(s.unsqueeze(0), _as_mask(flipped, s.numel()).unsqueeze(0), int(k))[0])


@dataclass
class DetectionScore:
    """AUC and recall@k of one ranking, each with its bootstrap interval over training examples.

    Example::

        >>> ci = ConfidenceInterval(0.9, 1.0, 0.95, 100, 0, "training examples")
        >>> DetectionScore(0.95, ci, 0.8, ci).to_dict()["auc"]
        0.95
    """

    auc: float
    auc_ci: ConfidenceInterval
    recall: float
    recall_ci: ConfidenceInterval

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return {"auc": self.auc, "auc_ci": self.auc_ci.to_dict(), "recall": self.recall,
                "recall_ci": self.recall_ci.to_dict()}


@dataclass
class MislabelResult:
    """Mislabel detection by self-influence, by training loss and by a random ranking.

    Attributes:
        rankings: ``"self_influence"``, ``"loss"`` (when losses were given) and ``"random"`` -> :class:`DetectionScore`.
        chance_auc: Interval of the AUC of seeded random rankings (permutation null; centred on 0.5).
        chance_recall: Interval of recall@k of seeded random rankings (centred on ``k / n``).
        k: The ``k`` of recall@k.
        num_examples: Training examples ranked.
        num_flipped: Flipped examples among them.
        info: Anything else worth keeping.

    Example::

        >>> si = torch.tensor([5.0, 0.1, 4.0, 0.2, 0.3, 0.1])
        >>> r = mislabel_detection(si, [0, 2], num_resamples=200)
        >>> r.rankings["self_influence"].auc, r.rankings["self_influence"].recall, r.k
        (1.0, 1.0, 2)
        >>> sorted(r.metrics())[:3]
        ['mislabel_auc_random', 'mislabel_auc_self_influence', 'mislabel_chance_auc_high']
    """

    rankings: dict[str, DetectionScore]
    chance_auc: ConfidenceInterval
    chance_recall: ConfidenceInterval
    k: int
    num_examples: int
    num_flipped: int
    info: dict[str, Any] = field(default_factory=dict)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """``mislabel_auc_<ranking>``, ``mislabel_recall_<ranking>`` and the chance intervals under ``prefix``."""
        out: dict[str, float] = {}
        for name, d in self.rankings.items():
            out[f"{prefix}mislabel_auc_{name}"] = d.auc
            out[f"{prefix}mislabel_recall_{name}"] = d.recall
        out[f"{prefix}mislabel_chance_auc_low"] = self.chance_auc.low
        out[f"{prefix}mislabel_chance_auc_high"] = self.chance_auc.high
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"rankings": {k: v.to_dict() for k, v in self.rankings.items()},
                "chance_auc": self.chance_auc.to_dict(), "chance_recall": self.chance_recall.to_dict(), "k": self.k,
                "num_examples": self.num_examples, "num_flipped": self.num_flipped, "info": dict(self.info)}


def mislabel_detection(
    self_influence: Tensor,
    flipped: Tensor | Sequence[int],
    *,
    losses: Tensor | None = None,
    k: int | None = None,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> MislabelResult:
    """Rank training examples by self-influence (largest first) and score how well it finds the flipped labels.

    Args:
        self_influence: ``(n,)`` self-influence of the training examples (:attr:`InfluenceResult.self_influence
            <lightning_influence.influence.InfluenceResult.self_influence>`), in data-set order of ``flipped``.
        flipped: The flipped examples: data-set indices into ``self_influence`` or an ``(n,)`` boolean mask.
        losses: ``(n,)`` training losses (the loss ranking baseline), optional.
        k: The ``k`` of recall@k (default: the number of flipped examples).
        num_resamples: Bootstrap resamples over training examples (and random rankings of the chance level).
        level: Interval coverage.
        seed: Seed of the random ranking, the bootstrap and the chance level.

    Returns:
        The :class:`MislabelResult`.

    Raises:
        ConfigurationError: If nothing or everything is flipped, shapes differ, ``k`` is out of range, or a score
            is not finite.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> flipped = torch.arange(10)                       # 10 of 200 examples are mislabelled ...
        >>> si = torch.rand(200, generator=g, dtype=torch.float64)
        >>> si[flipped] += 1.0                               # ... and have the largest self-influence
        >>> r = mislabel_detection(si, flipped, losses=torch.rand(200, generator=g, dtype=torch.float64))
        >>> r.rankings["self_influence"].auc, r.rankings["self_influence"].auc_ci.low > r.chance_auc.high
        (1.0, True)
        >>> r.chance_auc.contains(0.5), r.rankings["loss"].auc < 0.8
        (True, True)
    """
    _check_level(level, num_resamples)
    si = torch.as_tensor(self_influence).detach().cpu().double().reshape(-1)
    n = si.numel()
    mask = _as_mask(flipped, n)
    n_pos = int(mask.sum())
    if n_pos == 0 or n_pos == n:
        raise ConfigurationError(
            f"{n_pos} of {n} examples are flipped; mislabel detection needs both flipped and clean examples."
        )
    kk = n_pos if k is None else int(k)
    if not 1 <= kk <= n:
        raise ConfigurationError(f"k must lie in [1, {n}], got {k}.")
    rankings: dict[str, Tensor] = {"self_influence": si}
    if losses is not None:
        lo = torch.as_tensor(losses).detach().cpu().double().reshape(-1)
        if lo.numel() != n:
            raise ConfigurationError(f"losses has {lo.numel()} entries, self_influence {n}.")
        rankings["loss"] = lo
    rankings["random"] = torch.rand(n, generator=make_generator(seed), dtype=torch.float64)
    for name, values in rankings.items():
        if not bool(torch.isfinite(values).all()):
            raise ConfigurationError(f"the {name} ranking has non-finite values; check the solver's certificate.")
    out: dict[str, DetectionScore] = {}
    for name, values in rankings.items():
        def auc_stat(idx: Tensor, v: Tensor = values) -> Tensor:
            return _auc_rows(v[idx], mask[idx])

        def rec_stat(idx: Tensor, v: Tensor = values) -> Tensor:
            return _recall_rows(v[idx], mask[idx], kk)

        common: dict[str, Any] = {"num_resamples": num_resamples, "level": level, "seed": seed + 1,
                                  "unit": "training examples"}
        out[name] = DetectionScore(
            auc=float(_auc_rows(values.unsqueeze(0), mask.unsqueeze(0))[0]),
            auc_ci=bootstrap_statistic_ci(n, auc_stat, **common),
            recall=float(_recall_rows(values.unsqueeze(0), mask.unsqueeze(0), kk)[0]),
            recall_ci=bootstrap_statistic_ci(n, rec_stat, **common),
        )
    # Chance level: random rankings of the same labels (permutation null).
    gen = make_generator(seed + 2)
    null_auc, null_rec = [], []
    for start in range(0, num_resamples, 250):
        b = min(250, num_resamples - start)
        rand = torch.rand(b, n, generator=gen, dtype=torch.float64)
        labels = mask.expand(b, n)
        null_auc.append(_auc_rows(rand, labels))
        null_rec.append(_recall_rows(rand, labels, kk))
    lo_a, hi_a = percentile_interval(torch.cat(null_auc), level)
    lo_r, hi_r = percentile_interval(torch.cat(null_rec), level)

    def chance(lo: float, hi: float) -> ConfidenceInterval:
        return ConfidenceInterval(lo, hi, float(level), int(num_resamples), int(seed + 2), "random rankings",
                                  "permutation null")

    return MislabelResult(
        rankings=out,
        chance_auc=chance(lo_a, hi_a),
        chance_recall=chance(lo_r, hi_r),
        k=kk,
        num_examples=n,
        num_flipped=n_pos,
    )
