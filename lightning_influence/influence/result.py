"""Influence results: the score matrix, its certificate, top proponents/opponents and self-influence ranking."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_influence.exceptions import ConfigurationError
from lightning_influence.metrics import (
    INFLUENCE_DAMPING,
    INFLUENCE_GRADIENT_EQUIVALENTS,
    INFLUENCE_NUM_PRODUCTS,
    INFLUENCE_NUM_QUERIES,
    INFLUENCE_NUM_TRAIN,
    INFLUENCE_SCORE_ABS_MEAN,
    INFLUENCE_SECONDS,
    INFLUENCE_SELF_INFLUENCE_MAX,
    INFLUENCE_SELF_INFLUENCE_MEAN,
    INFLUENCE_SOLVER_CONVERGED,
    INFLUENCE_SOLVER_DIVERGED,
    INFLUENCE_SOLVER_ITERATIONS,
    INFLUENCE_SOLVER_RESIDUAL,
    regroup,
)

__all__ = ["InfluenceResult", "TopK", "top_k"]


@dataclass
class TopK:
    """Top proponents (most negative influence) and opponents (most positive) per query.

    Attributes:
        proponents: ``(n_query, k)`` training data-set indices, strongest first.
        proponent_scores: Their influence scores (negative first).
        opponents: ``(n_query, k)`` training data-set indices, strongest first.
        opponent_scores: Their influence scores (positive first).

    Example::

        >>> t = top_k(torch.tensor([[0.5, -2.0, 1.0, -0.25]]), 2, train_indices=torch.tensor([10, 11, 12, 13]))
        >>> t.proponents.tolist(), t.proponent_scores.tolist()
        ([[11, 13]], [[-2.0, -0.25]])
        >>> t.opponents.tolist(), t.opponent_scores.tolist()
        ([[12, 10]], [[1.0, 0.5]])
    """

    proponents: Tensor
    proponent_scores: Tensor
    opponents: Tensor
    opponent_scores: Tensor


def top_k(scores: Tensor, k: int, train_indices: Tensor | None = None) -> TopK:
    """Top-``k`` proponents and opponents of each query under the module's sign convention.

    Args:
        scores: ``(n_query, n_train)`` influence scores.
        k: How many per query (clipped to ``n_train``).
        train_indices: Data-set index of each column (default ``arange(n_train)``).

    Returns:
        The :class:`TopK` (proponents = most negative scores, opponents = most positive).

    Raises:
        ConfigurationError: If ``scores`` is not two-dimensional.

    Example::

        >>> t = top_k(torch.tensor([[0.5, -2.0, 1.0]]), 1)
        >>> t.proponents.tolist(), t.opponents.tolist()
        ([[1]], [[2]])
    """
    if scores.ndim != 2:
        raise ConfigurationError(f"scores must be (n_query, n_train), got shape {tuple(scores.shape)}.")
    k = min(int(k), scores.shape[1])
    idx = torch.arange(scores.shape[1]) if train_indices is None else torch.as_tensor(train_indices)
    pro_s, pro_i = torch.topk(scores, k, dim=1, largest=False)
    opp_s, opp_i = torch.topk(scores, k, dim=1, largest=True)
    return TopK(idx[pro_i.cpu()], pro_s, idx[opp_i.cpu()], opp_s)


@dataclass
class InfluenceResult:
    r"""Influence scores and everything needed to trust and report them.

    Attributes:
        scores: ``(n_query, n_train)``, :math:`\mathcal I(z_j, q_i)` (module sign convention; negative = proponent).
        train_indices: Data-set index of each column.
        query_indices: Data-set index of each row.
        self_influence: ``(n_train,)`` self-influence, or ``None``.
        train_losses: ``(n_train,)`` per-example training losses (same normalisation as the gradients).
        query_losses: ``(n_query,)`` query losses.
        solve: The iHVP solver's certificate (:meth:`SolveResult.to_dict`), plus ``self_influence`` solves.
        diagnostics: Cost and timing (gradient-equivalents, seconds, products) and the spectrum if measured.
        config: The :class:`InfluenceConfig` as a dict.

    Example::

        >>> r = InfluenceResult(
        ...     scores=torch.tensor([[0.5, -2.0, 1.0]]), train_indices=torch.tensor([10, 11, 12]),
        ...     query_indices=torch.tensor([0]), self_influence=torch.tensor([0.1, 3.0, 0.2]),
        ...     train_losses=torch.zeros(3), query_losses=torch.zeros(1), solve={"converged": True})
        >>> r.top_k(1).proponents.tolist(), r.top_k(1).opponents.tolist()
        ([[11]], [[12]])
        >>> r.self_influence_ranking().tolist()
        [11, 12, 10]
        >>> r.metrics()["influence/solver_converged"], r.to_dict(top=1)["top_k"][0]["proponents"]
        (1.0, [{'train_index': 11, 'score': -2.0}])
    """

    scores: Tensor
    train_indices: Tensor
    query_indices: Tensor
    self_influence: Tensor | None
    train_losses: Tensor
    query_losses: Tensor
    solve: dict[str, Any]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def top_k(self, k: int | None = None) -> TopK:
        """Top proponents/opponents per query (``k`` defaults to ``config["top_k"]``)."""
        return top_k(self.scores, int(self.config.get("top_k", 10)) if k is None else k, self.train_indices)

    def self_influence_ranking(self) -> Tensor:
        """Training data-set indices sorted by decreasing self-influence.

        Returns:
            ``(n_train,)`` data-set indices, most self-influential first.

        Raises:
            ConfigurationError: If self-influence was not computed.
        """
        if self.self_influence is None:
            raise ConfigurationError("self-influence was not computed; rerun with self_influence=True.")
        return self.train_indices[torch.argsort(self.self_influence, descending=True).cpu()]

    def metrics(self, prefix: str = "influence/") -> dict[str, float]:
        """Scalar diagnostics under their logged names (:mod:`lightning_influence.metrics`), group ``prefix``."""
        out = {
            INFLUENCE_SOLVER_RESIDUAL: float(self.solve.get("relative_residual", math.nan)),
            INFLUENCE_SOLVER_ITERATIONS: float(self.solve.get("iterations", 0)),
            INFLUENCE_SOLVER_CONVERGED: float(bool(self.solve.get("converged", False))),
            INFLUENCE_SOLVER_DIVERGED: float(bool(self.solve.get("diverged", False))),
            INFLUENCE_NUM_PRODUCTS: float(self.diagnostics.get("num_products", 0)),
            INFLUENCE_GRADIENT_EQUIVALENTS: float(self.diagnostics.get("gradient_equivalents", 0.0)),
            INFLUENCE_SECONDS: float(self.diagnostics.get("seconds", 0.0)),
            INFLUENCE_DAMPING: float((self.diagnostics.get("damping") or {}).get("damping", math.nan)),
            INFLUENCE_NUM_TRAIN: float(self.scores.shape[1]),
            INFLUENCE_NUM_QUERIES: float(self.scores.shape[0]),
            INFLUENCE_SCORE_ABS_MEAN: float(self.scores.abs().mean()) if self.scores.numel() else 0.0,
        }
        if self.self_influence is not None and self.self_influence.numel():
            out[INFLUENCE_SELF_INFLUENCE_MEAN] = float(self.self_influence.mean())
            out[INFLUENCE_SELF_INFLUENCE_MAX] = float(self.self_influence.max())
        return regroup(out, "influence/", prefix)

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        """JSON-ready summary: config, diagnostics, solver certificate, top-k per query, self-influence ranking."""
        t = self.top_k(top)
        per_query = []
        for i, q in enumerate(self.query_indices.tolist()):
            per_query.append({
                "query_index": int(q),
                "query_loss": float(self.query_losses[i]),
                "proponents": [{"train_index": int(a), "score": float(s)}
                               for a, s in zip(t.proponents[i].tolist(), t.proponent_scores[i].tolist(), strict=False)],
                "opponents": [{"train_index": int(a), "score": float(s)}
                              for a, s in zip(t.opponents[i].tolist(), t.opponent_scores[i].tolist(), strict=False)],
            })
        out: dict[str, Any] = {
            "sign_convention": "I(z,q) = -grad l(q)^T (G + damping I)^{-1} grad l(z); negative = proponent "
                               "(upweighting z lowers the query loss), positive = opponent.",
            "config": dict(self.config),
            "solver": dict(self.solve),
            "diagnostics": dict(self.diagnostics),
            "num_train": int(self.scores.shape[1]),
            "num_queries": int(self.scores.shape[0]),
            "top_k": per_query,
        }
        if self.self_influence is not None:
            k = min(len(self.train_indices), int(self.config.get("top_k", 10)) if top is None else top)
            order = torch.argsort(self.self_influence, descending=True)[:k].cpu()
            out["self_influence_ranking"] = [
                {"train_index": int(self.train_indices[j]), "self_influence": float(self.self_influence[j]),
                 "loss": float(self.train_losses[j])} for j in order.tolist()
            ]
        return out

    def save(self, path: str | Any) -> None:
        """Write tensors and metadata with ``torch.save`` (read back with :meth:`load`)."""
        torch.save({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, path)

    @classmethod
    def load(cls, path: str | Any) -> InfluenceResult:
        """Read a result written by :meth:`save`."""
        data = torch.load(path, map_location="cpu", weights_only=False)
        return cls(**data)
