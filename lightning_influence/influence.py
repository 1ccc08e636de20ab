r"""Influence of training examples on query losses through the damped Gauss-Newton Hessian.

**Sign convention (the only one in this package).** For a training example :math:`z` and a query :math:`q`

.. math:: \mathcal I(z, q) = -\nabla\ell(q)^\top (G + \lambda I)^{-1} \nabla\ell(z),

where :math:`G` is the (undamped) GNH of the *mean* training loss, averaged over units (examples, or tokens for
language models; see :mod:`lightning_influence.operators`), :math:`\lambda` the damping and :math:`\ell` the
loss. :math:`\mathcal I(z, q)` is the derivative of the query loss with respect to *upweighting* :math:`z`:
with :math:`\theta(\epsilon) = \arg\min \frac1N\sum_n \ell_n + \epsilon\,\ell(z) + \frac\lambda2\|\theta-\hat\theta\|^2`
(the PBRF of paper 1, eq. 5, to first order), :math:`d\ell(q)/d\epsilon = \mathcal I(z, q)`. Hence

* :math:`\mathcal I(z, q) < 0`: upweighting :math:`z` *lowers* the query loss, :math:`z` is a **proponent**
  (helpful); the most negative scores are the top proponents;
* :math:`\mathcal I(z, q) > 0`: upweighting :math:`z` *raises* the query loss, :math:`z` is an **opponent**
  (harmful); the most positive scores are the top opponents;
* removing :math:`z` from an :math:`N`-example training set (:math:`\epsilon = -1/N`) changes the query loss
  by about :math:`-\mathcal I(z, q)/N`.

(Paper 1 writes :math:`-\nabla f(q)^\top H^{-1}\nabla\ell(z)` with :math:`f = \log p = -\ell`, the opposite sign.)
The **self-influence** is :math:`s(z) = \nabla\ell(z)^\top (G+\lambda I)^{-1}\nabla\ell(z) = -\mathcal I(z, z) \ge 0`;
large values flag examples the model bends for (e.g. mislabelled ones). The **gradient-dot** and **cosine**
baselines keep the same sign and meaning with the curvature replaced by the identity:
:math:`-\nabla\ell(q)^\top\nabla\ell(z)` and :math:`-\cos(\nabla\ell(q), \nabla\ell(z))`.

**Per-example gradients** :math:`\nabla\ell(z)` are gradients of the example's *summed* unit losses (one unit for
classification/regression; for a language-model sequence, the sum over its non-ignored tokens), matching
upweighting the whole example in the unit-averaged objective. ``normalization="mean"`` uses the per-example
mean over units instead. They are computed with ``torch.func.vmap(grad(...))`` over ``functional_call`` in
chunks of ``chunk_size`` examples and streamed into dot products, so the ``(n_train, P)`` matrix is never
stored.

**Solvers** for :math:`(G+\lambda I)^{-1}` applied to the *query* gradients (``k`` solves rather than
``n_train``): ``"cg"`` (Fisher-CG on the whole training set, :func:`~lightning_influence.solvers.conjugate_gradient`),
``"lissa"`` (:func:`~lightning_influence.solvers.lissa` with fresh batches and settings from the spectrum) and
``"exact"`` (dense matrix from per-example Jacobians and a Cholesky factorisation; tiny models).

Everything here is plain PyTorch. For data parallelism pass ``rank``, ``world_size`` and ``reduce_fn`` (sums a
flat tensor over ranks): curvature products and training examples are sharded, every rank runs the same
reductions in the same order, and every rank returns the same full result.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, vmap
from torch.utils._pytree import tree_map

from lightning_influence.exceptions import ConfigurationError, NonFiniteError
from lightning_influence.operators import (
    CurvatureOperator,
    curvature_mode,
    make_batches,
    prepare_batch,
)
from lightning_influence.params import ParamTree, num_parameters, trainable_parameters
from lightning_influence.solvers import (
    SampledCurvature,
    SolveResult,
    _operator_class,
    conjugate_gradient,
    lissa,
    local_curvature_matmat,
)
from lightning_influence.spectrum import DEFAULT_LISSA_CONSTANT, LissaSettings, SpectrumSummary
from lightning_influence.tasks import Task

ReduceFn = Callable[[Tensor], Tensor]
ProgressFn = Callable[[str, int, int], None]

__all__ = [
    "InfluenceConfig",
    "InfluenceResult",
    "TopK",
    "cosine_scores",
    "gradient_dot_scores",
    "influence_scores",
    "iter_per_example_gradients",
    "per_example_gradients",
    "self_influence",
    "top_k",
]

SOLVERS = ("cg", "lissa", "exact")


# ================================================================================================== config
@dataclass
class InfluenceConfig:
    r"""Every setting of an influence computation (plain values: picklable, JSON-able, CLI-friendly).

    Attributes:
        damping: :math:`\lambda > 0` added to the GNH (for L2-regularised training, the L2 coefficient).
        solver: ``"cg"``, ``"lissa"`` or ``"exact"``.
        curvature: ``"gnh"`` (default), ``"expected_fisher"``, ``"sampled_fisher"``, ``"finite_difference_gnh"``
            or ``"hessian"`` (may be indefinite; for comparison).
        batch_size: Examples per batch of the fixed-sample curvature operator (CG, certificate, spectrum).
        chunk_size: Examples per vectorised per-example gradient chunk (bounds memory at ``chunk_size * P``).
        normalization: ``"sum"`` (default: per-example gradient of the summed unit losses) or ``"mean"``.
        self_influence: Also compute the self-influence of every scored training example (costs
            ``n_train / n_query`` times the query solve for the iterative solvers; cheap for ``"exact"``).
        top_k: Proponents/opponents kept per query in :meth:`InfluenceResult.to_dict`.
        cg_rtol: CG relative residual tolerance.
        cg_max_iter: CG iteration cap (default ``min(P, 1000)``).
        lissa_constant: :math:`C` of the batch rule :math:`|B| \ge C\,\mathrm{Tr}/\lambda_{\max}` (default 4:
            paper 1 takes 2, but its own App. C check needs 4 for GPT-2, our digits MLPs diverge at 2, and the
            sampling error falls like :math:`1/|B|`; LiSSA still doubles it after a detected divergence).
        lissa_average: Fraction of final LiSSA iterates averaged (default 0.75: at the paper's
            :math:`T = 2/(\lambda\eta)` the last iterate is dominated by sampling noise; on digits MLPs averaging the
            last 75 % beat the last 50 % for every seed we tried, and both beat the last iterate by far).
        lissa_max_steps: Cap on LiSSA steps.
        lissa_max_restarts: Restarts with doubled :math:`C` after a detected divergence.
        lissa_on_divergence: ``"raise"`` or ``"warn"``.
        lissa_certificate_size: Examples in the held-out certificate sample (``0``: no certificate).
        lissa_batch_size: Override of the derived LiSSA batch size.
        lissa_steps: Override of the derived number of steps.
        lissa_eta: Override of the derived step size.
        lissa_measure_constant: Measure condition C.1's constant on the model
            (:func:`~lightning_influence.solvers.measure_batch_constant`) and use it when it exceeds
            ``lissa_constant``.
        seed: Seed of every random draw (LiSSA batches, probes, sampled labels).
        dtype: ``"float64"``/``"float32"`` to cast floating inputs (the model's dtype is used for products).
    """

    damping: float = 1e-3
    solver: str = "cg"
    curvature: str = "gnh"
    batch_size: int = 256
    chunk_size: int = 64
    normalization: str = "sum"
    self_influence: bool = True
    top_k: int = 10
    cg_rtol: float = 1e-6
    cg_max_iter: int | None = None
    lissa_constant: float = DEFAULT_LISSA_CONSTANT
    lissa_average: float = 0.75
    lissa_max_steps: int = 20_000
    lissa_max_restarts: int = 2
    lissa_on_divergence: str = "raise"
    lissa_certificate_size: int = 512
    lissa_batch_size: int | None = None
    lissa_steps: int | None = None
    lissa_eta: float | None = None
    lissa_measure_constant: bool = True
    seed: int = 0
    dtype: str | None = None

    def validate(self) -> None:
        """Check the values; raises :class:`ConfigurationError` naming the argument and the fix.

        Raises:
            ConfigurationError: For an unknown solver/curvature/normalization or a non-positive size.
        """
        if self.solver not in SOLVERS:
            raise ConfigurationError(f"solver must be one of {SOLVERS}, got {self.solver!r}.")
        _operator_class(self.curvature)
        if self.normalization not in ("sum", "mean"):
            raise ConfigurationError(f"normalization must be 'sum' or 'mean', got {self.normalization!r}.")
        for name in ("batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.top_k < 0:
            raise ConfigurationError(f"top_k must be >= 0, got {self.top_k}.")
        if self.damping < 0:
            raise ConfigurationError(f"damping must be >= 0, got {self.damping}.")
        if self.solver == "lissa" and not self.damping > 0:
            raise ConfigurationError(f"solver='lissa' needs damping > 0, got {self.damping}.")
        if self.dtype not in (None, "float64", "float32", "float16", "bfloat16"):
            raise ConfigurationError(f"dtype must be None or a floating dtype name, got {self.dtype!r}.")

    def torch_dtype(self) -> torch.dtype | None:
        """``dtype`` as a ``torch.dtype``."""
        return None if self.dtype is None else getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return dataclasses.asdict(self)


# ================================================================================================ results
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
        """Scalar diagnostics under their logged names (``influence/solver_residual``, ...)."""
        out = {
            f"{prefix}solver_residual": float(self.solve.get("relative_residual", math.nan)),
            f"{prefix}solver_iterations": float(self.solve.get("iterations", 0)),
            f"{prefix}solver_converged": float(bool(self.solve.get("converged", False))),
            f"{prefix}solver_diverged": float(bool(self.solve.get("diverged", False))),
            f"{prefix}num_products": float(self.diagnostics.get("num_products", 0)),
            f"{prefix}gradient_equivalents": float(self.diagnostics.get("gradient_equivalents", 0.0)),
            f"{prefix}seconds": float(self.diagnostics.get("seconds", 0.0)),
            f"{prefix}num_train": float(self.scores.shape[1]),
            f"{prefix}num_queries": float(self.scores.shape[0]),
            f"{prefix}score_abs_mean": float(self.scores.abs().mean()) if self.scores.numel() else 0.0,
        }
        if self.self_influence is not None and self.self_influence.numel():
            out[f"{prefix}self_influence_mean"] = float(self.self_influence.mean())
            out[f"{prefix}self_influence_max"] = float(self.self_influence.max())
        return out

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


# ===================================================================================== per-example grads
def _as_dataset(data: Any, name: str) -> Any:
    if isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data):
        return torch.utils.data.TensorDataset(*data)
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise ConfigurationError(
            f"{name} must be a map-style dataset (with __len__ and __getitem__) or a tuple of tensors (a list is "
            f"treated as a data set), got {type(data).__name__}."
        )
    return data


def _as_indices(indices: Sequence[int] | Tensor | None, n: int, name: str) -> Tensor:
    idx = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ConfigurationError(f"{name} contain indices outside [0, {n}).")
    return idx


def _example_loss_fn(model: nn.Module, task: Task, normalization: str) -> Callable[..., Tensor]:
    def loss_one(p: ParamTree, inputs: tuple[Any, ...], targets: Tensor) -> Tensor:
        inputs1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, inputs)
        out, y = task.targets(task.outputs(task.forward(model, p, inputs1)), targets.unsqueeze(0))
        total = task.loss.unit_losses(out, y).sum()
        if normalization == "mean":
            total = total / task.loss.unit_mask(out, y).sum().clamp_min(1).to(total.dtype)
        return total

    return loss_one


def _chunk_gradients(
    model: nn.Module, task: Task, params: ParamTree, batch: Any, normalization: str, state: dict[str, bool]
) -> tuple[Tensor, Tensor]:
    """Per-example flat gradients ``(c, P)`` and losses ``(c,)`` of one collated chunk."""
    inputs, targets = task.split(batch)
    with torch.no_grad():
        out, y = task.targets(task.outputs(task.forward(model, params, inputs)), targets)
        task.loss.validate(out, y)
        loss_sum, count = task.loss.per_example(out, y)
        losses = loss_sum / count.clamp_min(1) if normalization == "mean" else loss_sum
    fn = _example_loss_fn(model, task, normalization)
    names = list(params)
    if state.get("vectorised", True):
        try:
            g = vmap(grad(fn), in_dims=(None, 0, 0))(params, inputs, targets)
            flat = torch.cat([g[k].reshape(g[k].shape[0], -1) for k in names], 1)
            return flat.detach(), losses.detach()
        except Exception as err:  # pragma: no cover - depends on the user's model
            warnings.warn(
                f"vmap over per-example gradients failed ({type(err).__name__}: {err}); falling back to one "
                "gradient per example (slower). Models with in-place ops or data-dependent control flow need this.",
                RuntimeWarning, stacklevel=3,
            )
            state["vectorised"] = False
    rows = []
    n = int(targets.shape[0])
    for i in range(n):
        xi = tree_map(lambda t, i=i: t[i] if isinstance(t, Tensor) else t, inputs)
        gi = grad(fn)(params, xi, targets[i])
        rows.append(torch.cat([gi[k].reshape(-1) for k in names]))
    return torch.stack(rows).detach(), losses.detach()


def iter_per_example_gradients(
    model: nn.Module,
    task: Task,
    dataset: Any,
    indices: Sequence[int] | Tensor | None = None,
    *,
    chunk_size: int = 64,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    normalization: str = "sum",
    dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Stream per-example gradients in chunks: yields ``(indices, grads (c, P), losses (c,))``.

    Gradients are of each example's summed unit losses (``normalization="sum"``; see the module docstring) with
    respect to the trainable parameters, flattened in :func:`~lightning_influence.params.trainable_parameters`
    order, computed in eval mode with autograd forced on (also under ``torch.inference_mode``).

    Args:
        model: The module.
        task: The task.
        dataset: Map-style data set or a tuple of tensors.
        indices: Which examples (default all), in order.
        chunk_size: Examples per vectorised chunk (memory ``chunk_size * P``).
        collate_fn: Collation (default ``default_collate``).
        normalization: ``"sum"`` or ``"mean"`` over the example's units.
        dtype: Cast floating inputs to this dtype.
        check_finite: Raise :class:`NonFiniteError` naming the first example with a non-finite gradient.

    Yields:
        ``(indices, grads, losses)`` per chunk.

    Raises:
        NonFiniteError: If an example's gradient (or loss) is not finite; the message names its data-set index.
        ConfigurationError: For a bad ``chunk_size``/``normalization`` or indices out of range.
    """
    if chunk_size < 1:
        raise ConfigurationError(f"chunk_size must be >= 1, got {chunk_size}.")
    if normalization not in ("sum", "mean"):
        raise ConfigurationError(f"normalization must be 'sum' or 'mean', got {normalization!r}.")
    ds = _as_dataset(dataset, "dataset")
    idx = _as_indices(indices, len(ds), "indices")
    params = trainable_parameters(model)
    first = next(iter(params.values()))
    state: dict[str, bool] = {}
    with curvature_mode(model):
        for s in range(0, idx.numel(), chunk_size):
            chunk = idx[s : s + chunk_size]
            (batch,) = make_batches(ds, chunk.tolist(), batch_size=chunk.numel(), collate_fn=collate_fn)
            batch = prepare_batch(batch, first.device, dtype)
            grads, losses = _chunk_gradients(model, task, params, batch, normalization, state)
            if check_finite:
                bad = ~(torch.isfinite(grads).all(1) & torch.isfinite(losses))
                if bool(bad.any()):
                    j = int(bad.nonzero()[0])
                    raise NonFiniteError(
                        f"the per-example gradient of example {int(chunk[j])} (data-set index) is not finite "
                        f"(loss {float(losses[j])}). Inspect that example's inputs/targets, or the model's outputs "
                        "on it (overflowing logits, NaN weights)."
                    )
            yield chunk, grads, losses


def per_example_gradients(
    model: nn.Module,
    task: Task,
    dataset: Any,
    indices: Sequence[int] | Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """All per-example gradients as an ``(n, P)`` matrix (see :func:`iter_per_example_gradients` for arguments).

    Returns:
        ``(n, P)`` tensor; for large ``n`` prefer the streaming iterator or :func:`influence_scores`.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> m = torch.nn.Linear(1, 1, bias=False)
        >>> torch.nn.init.ones_(m.weight)
        Parameter containing:
        tensor([[1.]], requires_grad=True)
        >>> per_example_gradients(m, Regression(), (torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1)))
        tensor([[1.],
                [4.]])
    """
    parts = [g for _, g, _ in iter_per_example_gradients(model, task, dataset, indices, **kwargs)]
    if not parts:
        return torch.zeros(0, num_parameters(trainable_parameters(model)))
    return torch.cat(parts, 0)


# ====================================================================================== exact curvature
def dense_curvature(
    model: nn.Module,
    task: Task,
    batches: Sequence[Any],
    *,
    curvature: str = "gnh",
    reduce_fn: ReduceFn | None = None,
    dtype: torch.dtype | None = None,
    jacobian_chunk: int = 64,
) -> Tensor:
    r"""The dense undamped unit-averaged curvature matrix ``(P, P)`` (tiny models; the ``"exact"`` solver).

    For the GNH/expected Fisher it is assembled from per-batch output Jacobians,
    :math:`G = \frac1N \sum_n J_n^\top S_n J_n` (``torch.func.jacrev`` and the closed-form :math:`S_h`), which is
    far cheaper than ``P`` matrix-vector products; other curvature kinds use the operator's ``dense()``.

    Returns:
        The symmetric matrix, identical on every rank.

    Raises:
        ConfigurationError: If ``P > 5000`` or the sample has no counted unit.
    """
    params = trainable_parameters(model)
    P = num_parameters(params)
    if P > 5000:
        raise ConfigurationError(f"the exact solver forms a {P}x{P} matrix; use solver='cg' or 'lissa' for P > 5000.")
    first = next(iter(params.values()))
    if curvature not in ("gnh", "expected_fisher"):
        extra: dict[str, Any] = {}
        op = _operator_class(curvature)(model, task, list(batches), reduce_fn=reduce_fn, dtype=dtype, **extra)
        return op.dense()
    total = torch.zeros(P, P, dtype=first.dtype, device=first.device)
    count = torch.zeros((), dtype=first.dtype, device=first.device)
    names = list(params)
    with curvature_mode(model):
        for raw in batches:
            batch = prepare_batch(raw, first.device, dtype)
            inputs, targets = task.split(batch)

            def f(p: ParamTree, inputs: tuple[Any, ...] = inputs, targets: Tensor = targets) -> Tensor:
                out, _ = task.targets(task.outputs(task.forward(model, p, inputs)), targets)
                return out

            with torch.no_grad():
                outputs = f(params)
            _, y = task.targets(torch.empty(0), targets)
            task.loss.validate(outputs, y)
            jac = jacrev(f, chunk_size=jacobian_chunk)(params)
            J = torch.cat([jac[k].reshape(*outputs.shape, -1) for k in names], -1).detach()  # (*out, P)
            SJ = vmap(lambda j, o=outputs, yy=y: task.loss.output_hvp(o, yy, j), in_dims=-1, out_dims=-1)(J)
            total += J.reshape(-1, P).T @ SJ.reshape(-1, P)
            count += task.loss.unit_mask(outputs, y).sum().to(total.dtype)
    flat = torch.cat([total.reshape(-1), count.reshape(1)])
    if reduce_fn is not None:
        flat = reduce_fn(flat)
    n = float(flat[-1])
    if n <= 0:
        raise ConfigurationError("dense_curvature: the curvature sample has no counted units.")
    G = flat[:-1].reshape(P, P) / n
    return 0.5 * (G + G.T)


class _IHVP:
    """One configured inverse, applied to blocks of right-hand sides ``(P, k)``."""

    def __init__(self, solve: Callable[[Tensor], tuple[Tensor, SolveResult]], certificate: dict[str, Any]) -> None:
        self._solve = solve
        self.certificate = certificate

    def __call__(self, B: Tensor) -> tuple[Tensor, SolveResult]:
        return self._solve(B)


def _build_ihvp(
    model: nn.Module,
    task: Task,
    dataset: Any,
    pool: Tensor,
    cfg: InfluenceConfig,
    *,
    spectrum: SpectrumSummary | LissaSettings | None,
    reduce_fn: ReduceFn | None,
    rank: int,
    world_size: int,
    collate_fn: Callable[[list[Any]], Any] | None,
    counters: dict[str, float],
    progress: ProgressFn | None,
) -> _IHVP:
    dtype = cfg.torch_dtype()
    mine = pool[rank::world_size].tolist()
    batches = make_batches(dataset, mine, batch_size=cfg.batch_size, collate_fn=collate_fn) if mine else []
    lam = cfg.damping
    if cfg.solver == "exact":
        G = dense_curvature(model, task, batches, curvature=cfg.curvature, reduce_fn=reduce_fn, dtype=dtype)
        counters["example_products"] += len(mine) * _output_dim(model, task, batches, dtype)
        A = G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        evals, evecs = torch.linalg.eigh(A)
        lo, hi = float(evals[0]), float(evals[-1])
        if lo <= max(hi, 1.0) * G.shape[0] * torch.finfo(G.dtype).eps:
            raise ConfigurationError(
                f"the damped curvature G + damping*I is not positive definite (smallest eigenvalue {lo:.3g}, "
                f"largest {hi:.3g}, damping={lam}). Use damping > 0 (and the GNH rather than the Hessian, which "
                "can be indefinite)."
            )

        def solve_exact(B: Tensor) -> tuple[Tensor, SolveResult]:
            X = evecs @ ((evecs.T @ B.to(A.dtype)) / evals.unsqueeze(1))
            res = float(((A @ X - B).norm(dim=0) / B.norm(dim=0).clamp_min(1e-300)).max()) if B.numel() else 0.0
            return X, SolveResult(x=X, iterations=1, relative_residual=res, converged=True, method="exact",
                                  info={"damping": lam, "lambda_min": lo, "lambda_max": hi})

        return _IHVP(solve_exact, {})
    cls = _operator_class(cfg.curvature)
    extra: dict[str, Any] = {"seed": cfg.seed} if cfg.curvature == "sampled_fisher" else {}
    if cfg.solver == "cg":
        op = _MultiVectorOperator(cls(model, task, batches, reduce_fn=reduce_fn, dtype=dtype, **extra), cfg)

        def solve_cg(B: Tensor) -> tuple[Tensor, SolveResult]:
            before = op.examples_processed
            res = conjugate_gradient(op, B, damping=lam, rtol=cfg.cg_rtol, max_iter=cfg.cg_max_iter)
            counters["example_products"] += op.examples_processed - before
            return res.x, res

        return _IHVP(solve_cg, {})
    sampler = SampledCurvature(
        model, task, dataset, batch_size=cfg.lissa_batch_size or 1, indices=pool, seed=cfg.seed,
        curvature=cfg.curvature, collate_fn=collate_fn, reduce_fn=reduce_fn, rank=rank, world_size=world_size,
        dtype=dtype,
    )
    state: dict[str, Any] = {"settings": spectrum}

    def solve_lissa(B: Tensor) -> tuple[Tensor, SolveResult]:
        spectrum_op = None
        if state["settings"] is None and (cfg.lissa_eta is None or cfg.lissa_steps is None):
            spectrum_op = sampler.operator(batch_size=cfg.batch_size)
        res = lissa(
            sampler, B, damping=lam, settings=state["settings"], spectrum_operator=spectrum_op,
            eta=cfg.lissa_eta, steps=cfg.lissa_steps, batch_size=cfg.lissa_batch_size,
            constant=cfg.lissa_constant, max_steps=cfg.lissa_max_steps, average=cfg.lissa_average,
            on_divergence=cfg.lissa_on_divergence, max_restarts=cfg.lissa_max_restarts,
            certificate_size=cfg.lissa_certificate_size or None,
            spectrum_kwargs={"seed": cfg.seed}, measure_constant=cfg.lissa_measure_constant,
        )
        counters["example_products"] += res.info.get("example_products", 0) / world_size  # global -> per rank
        if spectrum_op is not None:
            counters["example_products"] += spectrum_op.examples_processed
            spec = res.info.get("spectrum", {})
            if "trace" in spec:  # reuse the measured spectrum for later blocks (self-influence)
                from lightning_influence.spectrum import lissa_settings

                state["settings"] = lissa_settings(
                    spec["trace"], spec["lambda_max"], lam, constant=res.info["constant"],
                    dataset_size=sampler.pool_size,
                )
                state["spectrum"] = spec
        if res.info.get("certificate"):
            counters["example_products"] += res.x.shape[1] * min(cfg.lissa_certificate_size, sampler.pool_size) / max(
                world_size, 1)
        return res.x, res

    return _IHVP(solve_lissa, state)


class _MultiVectorOperator:
    """A fixed-sample operator whose ``matmat`` pushes all columns through one vectorised pass and one reduction."""

    def __init__(self, op: CurvatureOperator, cfg: InfluenceConfig) -> None:
        self.op = op
        self.curvature = cfg.curvature
        self.seed = cfg.seed
        self.examples_processed = 0
        self._local_examples = sum(op.task.batch_size(b) for b in op.data)

    @property
    def num_params(self) -> int:
        return self.op.num_params

    @property
    def param_dtype(self) -> torch.dtype:
        return self.op.param_dtype

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v.reshape(-1, 1))[:, 0]

    def quadratic_form(self, v: Tensor) -> Tensor:
        return torch.dot(v, self.matvec(v))

    def matmat(self, matrix: Tensor) -> Tensor:
        if self.curvature not in ("gnh", "expected_fisher"):
            self.examples_processed += self._local_examples * matrix.shape[1]
            return self.op.matmat(matrix)
        total, count = local_curvature_matmat(self.op.model, self.op.task, self.op.data, matrix,
                                              curvature=self.curvature, seed=self.seed)
        flat = torch.cat([total.reshape(-1), count.reshape(1)])
        if self.op.reduce_fn is not None:
            flat = self.op.reduce_fn(flat)
        n = float(flat[-1])
        if n <= 0:
            raise ConfigurationError("the curvature sample has no counted units (empty data, or all targets ignored).")
        self.examples_processed += self._local_examples * matrix.shape[1]
        out = flat[:-1].reshape(total.shape) / n
        if self.op.check_finite and not bool(torch.isfinite(out).all()):
            raise NonFiniteError("a curvature product is not finite; check the inputs and the model's outputs.")
        return out


def _output_dim(model: nn.Module, task: Task, batches: Sequence[Any], dtype: torch.dtype | None) -> int:
    """Outputs per example (for cost accounting of the Jacobian-based dense curvature)."""
    if not batches:
        return 0
    params = trainable_parameters(model)
    first = next(iter(params.values()))
    batch = prepare_batch(batches[0], first.device, dtype)
    with torch.no_grad(), curvature_mode(model):
        out, _ = task(model, batch, params, validate=False)
    return max(1, out[0].numel())


# =========================================================================================== influence
def influence_scores(
    model: nn.Module,
    task: Task,
    train_data: Any,
    query_data: Any,
    *,
    config: InfluenceConfig | None = None,
    train_indices: Sequence[int] | Tensor | None = None,
    query_indices: Sequence[int] | Tensor | None = None,
    curvature_indices: Sequence[int] | Tensor | None = None,
    spectrum: SpectrumSummary | LissaSettings | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    query_collate_fn: Callable[[list[Any]], Any] | None = None,
    reduce_fn: ReduceFn | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: ProgressFn | None = None,
    **overrides: Any,
) -> InfluenceResult:
    r"""Influence :math:`\mathcal I(z, q) = -\nabla\ell(q)^\top (G+\lambda I)^{-1}\nabla\ell(z)` of training on queries.

    Solves :math:`(G+\lambda I) X = [\nabla\ell(q_1), \dots, \nabla\ell(q_k)]` once (``k`` right-hand sides), then
    streams per-example training gradients in chunks and takes dot products, so memory is
    :math:`O((k + \text{chunk}) P)`. Sign convention, normalisation and solvers: see the module docstring.

    Args:
        model: The trained module (the unwrapped ``LightningModule`` under DDP).
        task: How batches become ``(outputs, targets)``.
        train_data: Training set (map-style data set or tuple of tensors); the curvature is its GNH.
        query_data: Query set (same formats).
        config: Settings (:class:`InfluenceConfig`); keyword ``overrides`` replace single fields
            (e.g. ``solver="exact", damping=1e-2``).
        train_indices: Training examples to score (default all).
        query_indices: Queries (default all).
        curvature_indices: Training examples forming :math:`G` (default: the whole training set).
        spectrum: A :class:`SpectrumSummary` (e.g. ``CurvatureMonitor.latest``) or :class:`LissaSettings` for
            LiSSA; measured on the spot when ``None``.
        collate_fn: Collation of the training set (and of the queries unless ``query_collate_fn`` is given).
        query_collate_fn: Collation of the query set.
        reduce_fn: Sums a flat tensor over ranks (data parallel), else ``None``.
        rank: This process's rank.
        world_size: Number of ranks.
        progress: Called as ``progress(stage, done, total)`` while training gradients stream.
        **overrides: Fields of :class:`InfluenceConfig`.

    Returns:
        The :class:`InfluenceResult` (identical on every rank).

    Raises:
        ConfigurationError: Empty query or training set, unknown option, damping that leaves the curvature
            singular or indefinite (exact/CG), or bad indices.
        DivergenceError: If LiSSA diverges (and ``lissa_on_divergence="raise"``).
        NonFiniteError: If a gradient is not finite (names the data-set index).

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> m = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.eye(2, dtype=torch.float64); y = torch.ones(2, 1, dtype=torch.float64)
        >>> r = influence_scores(m, Regression(), (x, y), (x, y), solver="exact", damping=0.5, self_influence=False)
        >>> r.scores.shape
        torch.Size([2, 2])
    """
    cfg = dataclasses.replace(config or InfluenceConfig(), **overrides)
    cfg.validate()
    start = time.perf_counter()
    train_ds = _as_dataset(train_data, "train_data")
    query_ds = _as_dataset(query_data, "query_data")
    t_idx = _as_indices(train_indices, len(train_ds), "train_indices")
    q_idx = _as_indices(query_indices, len(query_ds), "query_indices")
    if q_idx.numel() == 0:
        raise ConfigurationError("the query set is empty: pass at least one query example (query_data/query_indices).")
    if t_idx.numel() == 0:
        raise ConfigurationError("the training set to score is empty: pass at least one training example.")
    pool = _as_indices(curvature_indices, len(train_ds), "curvature_indices")
    if pool.numel() == 0:
        raise ConfigurationError("curvature_indices is empty: the curvature needs training examples.")
    if not 0 <= rank < world_size:
        raise ConfigurationError(f"rank={rank} must lie in [0, world_size={world_size}).")
    dtype = cfg.torch_dtype()
    grad_kw: dict[str, Any] = {"chunk_size": cfg.chunk_size, "collate_fn": collate_fn,
                               "normalization": cfg.normalization, "dtype": dtype}
    counters: dict[str, float] = {"example_gradients": 0.0, "example_products": 0.0}
    # -------------------------------------------------------------------------------- query gradients
    Q_parts, q_losses = [], []
    q_kw = {**grad_kw, "collate_fn": query_collate_fn or collate_fn}
    for _, g, loss in iter_per_example_gradients(model, task, query_ds, q_idx, **q_kw):
        Q_parts.append(g)
        q_losses.append(loss)
    Q = torch.cat(Q_parts, 0)  # (k, P) on every rank
    counters["example_gradients"] += q_idx.numel() / world_size  # every rank computes them: count once globally
    query_losses = torch.cat(q_losses)
    # ------------------------------------------------------------------------------------------- solve
    ihvp = _build_ihvp(model, task, train_ds, pool, cfg, spectrum=spectrum, reduce_fn=reduce_fn, rank=rank,
                       world_size=world_size, collate_fn=collate_fn, counters=counters, progress=progress)
    X, res = ihvp(Q.T.contiguous())  # (P, k)
    solve_info = res.to_dict()
    # ------------------------------------------------------------------------- stream training examples
    n, k = t_idx.numel(), q_idx.numel()
    device, fdtype = Q.device, Q.dtype
    scores = torch.zeros(k, n, dtype=fdtype, device=device)
    self_inf = torch.zeros(n, dtype=fdtype, device=device)
    losses = torch.zeros(n, dtype=fdtype, device=device)
    params = trainable_parameters(model)
    P = num_parameters(params)
    want_self = cfg.self_influence
    joint_self = want_self and cfg.solver != "exact" and world_size > 1
    self_solves: list[dict[str, Any]] = []
    chunk = cfg.chunk_size
    total_chunks = math.ceil(n / chunk)
    positions = torch.arange(n)
    for c in range(total_chunks):
        pos = positions[c * chunk : (c + 1) * chunk]
        mine = pos[pos % world_size == rank]
        G_local = torch.zeros(0, P, dtype=fdtype, device=device)
        if mine.numel():
            _, G_local, loss_local = next(iter(iter_per_example_gradients(
                model, task, train_ds, t_idx[mine], **{**grad_kw, "chunk_size": mine.numel()})))
            counters["example_gradients"] += mine.numel()
            scores[:, mine] = -(X.T @ G_local.T)
            losses[mine] = loss_local
        if want_self:
            if cfg.solver == "exact" or (world_size == 1 and mine.numel()):
                if mine.numel():
                    Y, r_self = ihvp(G_local.T.contiguous())
                    self_inf[mine] = (G_local.T * Y).sum(0)
                    self_solves.append(r_self.to_dict())
            elif joint_self:
                block = torch.zeros(pos.numel(), P, dtype=fdtype, device=device)
                block[mine - pos[0]] = G_local
                assert reduce_fn is not None
                block = reduce_fn(block.reshape(-1)).reshape(pos.numel(), P)
                Y, r_self = ihvp(block.T.contiguous())
                vals = (block.T * Y).sum(0)
                self_inf[mine] = vals[mine - pos[0]]
                self_solves.append(r_self.to_dict())
        if progress is not None:
            progress("train", min(n, (c + 1) * chunk), n)
    # ------------------------------------------------------------------------------------ gather (once)
    flat = torch.cat([scores.reshape(-1), self_inf, losses,
                      torch.tensor([counters["example_gradients"], counters["example_products"]],
                                   dtype=fdtype, device=device)])
    if reduce_fn is not None and world_size > 1:
        flat = reduce_fn(flat)
    scores = flat[: k * n].reshape(k, n)
    self_out = flat[k * n : k * n + n] if want_self else None
    losses = flat[k * n + n : k * n + 2 * n]
    grads_total, products_total = float(flat[-2]), float(flat[-1])
    if reduce_fn is None or world_size == 1:
        products_total = counters["example_products"]
    seconds = time.perf_counter() - start
    if self_solves:
        solve_info["self_influence"] = {
            "solves": len(self_solves),
            "max_relative_residual": max(float(s["relative_residual"]) for s in self_solves),
            "all_converged": all(bool(s["converged"]) for s in self_solves),
            "any_diverged": any(bool(s["diverged"]) for s in self_solves),
            "iterations": sum(int(s["iterations"]) for s in self_solves),
        }
    diagnostics = {
        "seconds": seconds,
        "example_gradients": grads_total,
        "example_curvature_products": products_total,
        "gradient_equivalents": grads_total + products_total,
        "num_products": int(res.num_products),
        "num_params": P,
        "world_size": world_size,
        "curvature_examples": int(pool.numel()),
        "curvature_indices": None if curvature_indices is None else pool.tolist(),
        "spectrum": res.info.get("spectrum") or ihvp.certificate.get("spectrum"),
    }
    return InfluenceResult(
        scores=scores.cpu(), train_indices=t_idx.cpu(), query_indices=q_idx.cpu(),
        self_influence=None if self_out is None else self_out.cpu(), train_losses=losses.cpu(),
        query_losses=query_losses.cpu(), solve=solve_info, diagnostics=diagnostics, config=cfg.to_dict(),
    )


def self_influence(
    model: nn.Module,
    task: Task,
    train_data: Any,
    *,
    indices: Sequence[int] | Tensor | None = None,
    config: InfluenceConfig | None = None,
    **kwargs: Any,
) -> Tensor:
    r"""Self-influence :math:`\nabla\ell(z)^\top (G+\lambda I)^{-1}\nabla\ell(z)` of training examples.

    A convenience wrapper around :func:`influence_scores` (one dummy query, the first scored example).

    Returns:
        ``(n,)`` self-influences of ``indices`` (default all), in order.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> m = torch.nn.Linear(2, 1, bias=False).double()
        >>> torch.nn.init.zeros_(m.weight)
        Parameter containing:
        tensor([[0., 0.]], dtype=torch.float64, requires_grad=True)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.tensor([[1.0], [1.0], [-1.0]], dtype=torch.float64)
        >>> s = self_influence(m, Regression(), (x, y), solver="exact", damping=0.1)
        >>> [round(v, 4) for v in s.tolist()]
        [1.4209, 2.4665, 1.5013]
        >>> g = -y * x  # per-example gradients of (w^T x - y)^2 / 2 at w = 0
        >>> h = x.T @ x / 3 + 0.1 * torch.eye(2, dtype=torch.float64)  # damped GNH
        >>> torch.allclose(s, (g @ torch.linalg.inv(h) * g).sum(1)), bool((s >= 0).all())
        (True, True)
    """
    ds = _as_dataset(train_data, "train_data")
    idx = _as_indices(indices, len(ds), "indices")
    res = influence_scores(model, task, ds, ds, config=config, train_indices=idx, query_indices=idx[:1],
                           self_influence=True, **kwargs)
    assert res.self_influence is not None
    return res.self_influence


def _gradient_similarity(
    model: nn.Module, task: Task, train_data: Any, query_data: Any, *, cosine: bool,
    train_indices: Sequence[int] | Tensor | None, query_indices: Sequence[int] | Tensor | None,
    chunk_size: int, normalization: str, collate_fn: Callable[[list[Any]], Any] | None,
) -> Tensor:
    # Floating inputs follow the model's dtype (e.g. PBRFValidation's float64 copy of a float32 model).
    dtype = next(iter(trainable_parameters(model).values())).dtype
    kw: dict[str, Any] = {"chunk_size": chunk_size, "normalization": normalization, "collate_fn": collate_fn,
                          "dtype": dtype}
    Q = per_example_gradients(model, task, query_data, query_indices, **kw)
    if Q.shape[0] == 0:
        raise ConfigurationError("the query set is empty.")
    if cosine:
        Q = Q / Q.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cols = []
    for _, G, _ in iter_per_example_gradients(model, task, train_data, train_indices, **kw):
        if cosine:
            G = G / G.norm(dim=1, keepdim=True).clamp_min(1e-300)
        cols.append(-(Q @ G.T))
    return torch.cat(cols, 1)


def gradient_dot_scores(
    model: nn.Module,
    task: Task,
    train_data: Any,
    query_data: Any,
    *,
    train_indices: Sequence[int] | Tensor | None = None,
    query_indices: Sequence[int] | Tensor | None = None,
    chunk_size: int = 64,
    normalization: str = "sum",
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> Tensor:
    r"""Gradient-dot baseline :math:`-\nabla\ell(q)^\top\nabla\ell(z)` (same sign convention; negative = proponent).

    Returns:
        ``(n_query, n_train)`` scores.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> m = torch.nn.Linear(2, 1, bias=False).double()
        >>> torch.nn.init.zeros_(m.weight)
        Parameter containing:
        tensor([[0., 0.]], dtype=torch.float64, requires_grad=True)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.tensor([[1.0], [1.0], [-1.0]], dtype=torch.float64)
        >>> s = gradient_dot_scores(m, Regression(), (x, y), (x, y))
        >>> g = -y * x  # per-example gradients at w = 0
        >>> torch.allclose(s, -(g @ g.T))
        True
        >>> s.diagonal().tolist()  # an example is its own proponent (negative score)
        [-1.0, -4.0, -2.0]
    """
    return _gradient_similarity(model, task, train_data, query_data, cosine=False, train_indices=train_indices,
                                query_indices=query_indices, chunk_size=chunk_size, normalization=normalization,
                                collate_fn=collate_fn)


def cosine_scores(
    model: nn.Module,
    task: Task,
    train_data: Any,
    query_data: Any,
    *,
    train_indices: Sequence[int] | Tensor | None = None,
    query_indices: Sequence[int] | Tensor | None = None,
    chunk_size: int = 64,
    normalization: str = "sum",
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> Tensor:
    r"""Cosine baseline :math:`-\cos(\nabla\ell(q), \nabla\ell(z))` (same sign convention).

    Returns:
        ``(n_query, n_train)`` scores in ``[-1, 1]``.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> m = torch.nn.Linear(2, 1, bias=False).double()
        >>> torch.nn.init.zeros_(m.weight)
        Parameter containing:
        tensor([[0., 0.]], dtype=torch.float64, requires_grad=True)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.tensor([[1.0], [1.0], [-1.0]], dtype=torch.float64)
        >>> s = cosine_scores(m, Regression(), (x, y), (x, y))
        >>> [round(v, 4) for v in s[2].tolist()]  # gradients (-1, -1) vs (-1, 0), (0, -2) and itself
        [0.7071, 0.7071, -1.0]
    """
    return _gradient_similarity(model, task, train_data, query_data, cosine=True, train_indices=train_indices,
                                query_indices=query_indices, chunk_size=chunk_size, normalization=normalization,
                                collate_fn=collate_fn)
