"""Influence scores, self-influence and the curvature-free baselines (the pipeline behind ``influence_scores``).

The stages of :func:`influence_scores`, each a function of one :class:`_Run` (model, task, config, the training
and curvature :class:`~lightning_influence.data.DataSource` objects, the reduction and the cost counters):
check every argument (:func:`_prepare_run`), the query gradients (:func:`_query_gradients`), one configured
inverse (:func:`_build_inverse`: exact, CG, LiSSA, or, from a low-rank sketch of the curvature computed once,
PCG or the low-rank inverse), the training-gradient stream (:func:`_stream_scores`) and one final reduction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.config import InfluenceConfig
from lightning_influence.data import CollateFn, DataSource, as_dataset, as_indices
from lightning_influence.distributed import ReduceFn, reduce_packed, shard_indices
from lightning_influence.evaluator import Evaluator
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.influence.gradients import iter_per_example_gradients, per_example_gradients
from lightning_influence.influence.inverse import (
    _build_inverse,
    _Inverse,
    _projected_flops,
    _resolve_damping,
    _resolve_solver,
    _Run,
    _warn_costly,
    dense_curvature,
)
from lightning_influence.influence.projection import RandomProjection
from lightning_influence.influence.result import InfluenceResult
from lightning_influence.influence.store import ScoreStore, StoreError, fingerprint
from lightning_influence.params import num_parameters, trainable_parameters
from lightning_influence.solvers import LowRankSketch, lowrank_self_influence, lowrank_self_influence_from_coefficients
from lightning_influence.spectrum import LissaSettings, SpectrumSummary
from lightning_influence.tasks import Task

__all__ = ["cosine_scores", "dense_curvature", "gradient_dot_scores", "influence_scores", "projected_cost",
           "self_influence"]

ProgressFn = Callable[[str, int, int], None]


# ========================================================================================= influence
def _query_gradients(run: _Run, query: DataSource) -> tuple[Tensor, Tensor]:
    """All query gradients as the solve's right-hand sides ``(P, k)`` (every rank computes them) and their losses.

    Stored as a contiguous ``(k, P)`` matrix, one query per row, each chunk's gradients formed in place in its rows
    (no list of chunks or concatenation: at 100 queries of an 11M-parameter model each would be another 4.4 GB)
    and returned as its ``(P, k)`` transpose, a view whose columns are contiguous.

    Returns:
        ``(B, losses)``.
    """
    ev = Evaluator(run.model, run.task, input_dtype=run.cfg.torch_dtype())
    Bt = torch.empty(query.global_size, ev.num_params, dtype=ev.dtype, device=ev.device)
    losses = [loss for _, _, loss in iter_per_example_gradients(
        run.model, run.task, query.dataset, query.indices, chunk_size=run.cfg.chunk_size, evaluator=ev,
        collate_fn=query.collate_fn, normalization=run.cfg.normalization, out=Bt)]
    run.counters["example_gradients"] += query.global_size / run.world_size  # computed on every rank: count once
    return Bt.T, torch.cat(losses)


@dataclass
class _Scores:
    """This rank's share of the outputs (zeros where another rank scores)."""

    scores: Tensor
    self_influence: Tensor
    losses: Tensor
    self_solves: list[dict[str, Any]] = field(default_factory=list)
    #: ``solver="lowrank"``: per-example bound on the self-influence's error (zeros otherwise).
    self_influence_bound: Tensor = field(default_factory=lambda: torch.zeros(0))


def _chunk_self_influence(
    run: _Run, inverse: _Inverse, out: _Scores, pos: Tensor, mine: Tensor, G_local: Tensor,
    coefficients: Tensor | None = None,
) -> None:
    """Self-influence of one chunk: this rank's rows solved locally, or the whole chunk jointly under DDP."""
    if run.cfg.solver == "lowrank":  # no products: g^T L g and its error bound, row by row
        if mine.numel():
            sk = inverse.state["sketch"]
            lam, tail = run.damping, run.cfg.lowrank_tail
            values, bounds = (lowrank_self_influence(sk, G_local, damping=lam, tail=tail) if coefficients is None else
                              lowrank_self_influence_from_coefficients(
                                  sk, coefficients, torch.linalg.vector_norm(G_local, dim=1) ** 2, damping=lam,
                                  tail=tail))
            out.self_influence[mine], out.self_influence_bound[mine] = values, bounds
        return
    if run.cfg.solver == "exact" or run.world_size == 1:
        if mine.numel():
            Y, res = inverse(G_local.T.contiguous())
            out.self_influence[mine] = (G_local.T * Y).sum(0)
            out.self_solves.append(res.to_dict())
        return
    # Iterative solvers run collectives: every rank solves the same block of the whole chunk.
    block = torch.zeros(pos.numel(), G_local.shape[1], dtype=G_local.dtype, device=G_local.device)
    block[mine - pos[0]] = G_local
    (block,) = reduce_packed([block], run.reduce_fn)
    Y, res = inverse(block.T.contiguous())
    out.self_influence[mine] = (block.T * Y).sum(0)[mine - pos[0]]
    out.self_solves.append(res.to_dict())


def _stream_scores(
    run: _Run, inverse: _Inverse, X: Tensor, train_indices: Tensor, progress: ProgressFn | None,
    store: ScoreStore | None = None, done: set[int] | None = None,
) -> _Scores:
    """Stream training gradients chunk by chunk (sharded over ranks) into scores, losses and self-influence.

    With a ``store``, each chunk is written as it finishes and the chunks in ``done`` on every rank are read back

    Returns:
        This rank's share of scores, losses and self-influence.
    """
    n, k, P = train_indices.numel(), X.shape[1], X.shape[0]
    dtype, device = X.dtype, X.device
    out = _Scores(torch.zeros(k, n, dtype=dtype, device=device), torch.zeros(n, dtype=dtype, device=device),
                  torch.zeros(n, dtype=dtype, device=device),
                  self_influence_bound=torch.zeros(n, dtype=dtype, device=device))
    chunk = run.cfg.chunk_size
    positions = torch.arange(n)
    skip = _skippable(run, math.ceil(n / chunk), done) if store is not None else set()
    proj = None if run.cfg.projection_dim is None else RandomProjection(
        P, run.cfg.projection_dim, run.cfg.projection_kind, seed=run.cfg.seed)
    XT = X.T if proj is None else proj(X.T.contiguous())  # (k, P) or projected (k, projection_dim)
    # lowrank self-influence: the chunk's sketch coefficients V^T g come with its scores (no (P, k + r) copy of [X, V])
    V = (inverse.state["sketch"].eigenvectors.to(X)
         if run.cfg.solver == "lowrank" and run.cfg.self_influence and proj is None else None)
    coefficients = None
    ev = Evaluator(run.model, run.task, input_dtype=run.cfg.torch_dtype())
    workspace: Tensor | None = None  # one (chunk, P) buffer every chunk's gradients are formed in: no page faults
    for c in range(math.ceil(n / chunk)):
        pos = positions[c * chunk : (c + 1) * chunk]
        mine = shard_indices(pos, run.rank, run.world_size, "strided")
        if store is not None and c in skip:
            _read_chunk(store, c, out, mine)
            if progress is not None:
                progress("resumed", min(n, (c + 1) * chunk), n)
            continue
        n_solves = len(out.self_solves)
        G_local = torch.zeros(0, P, dtype=dtype, device=device)
        if mine.numel():
            if workspace is None:
                workspace = torch.empty(min(chunk, n), ev.num_params, dtype=ev.dtype, device=ev.device)
            _, G_local, loss_local = next(iter(iter_per_example_gradients(
                run.model, run.task, run.train.dataset, train_indices[mine], chunk_size=mine.numel(), evaluator=ev,
                collate_fn=run.train.collate_fn, normalization=run.cfg.normalization, out=workspace)))
            run.counters["example_gradients"] += mine.numel()
            out.scores[:, mine] = -(XT @ (G_local if proj is None else proj(G_local)).T)
            if V is not None:  # (V^T G^T)^T: 2.6x faster than G @ V for a (P, r) V on one CPU thread
                coefficients = (V.T @ G_local.T).T
            out.losses[mine] = loss_local
        if run.cfg.self_influence:
            _chunk_self_influence(run, inverse, out, pos, mine, G_local, coefficients)
        if store is not None:
            with _all_ranks_fail(run, store, f"write chunk {c} of"):
                _write_chunk(store, c, out, mine, out.self_solves[n_solves:], run.cfg.self_influence)
        if progress is not None:
            progress("train", min(n, (c + 1) * chunk), n)
    return out


_SOLVE_KEYS = ("method", "iterations", "relative_residual", "converged", "diverged")


def _skippable(run: _Run, num_chunks: int, done: set[int] | None) -> set[int]:
    """Chunks complete on every rank's shard (one reduction, so all ranks skip the same chunks)."""
    flags = torch.zeros(num_chunks, dtype=torch.float64)
    flags[sorted(c for c in (done or set()) if c < num_chunks)] = 1.0
    (flags,) = reduce_packed([flags], run.reduce_fn if run.world_size > 1 else None)
    return {c for c in range(num_chunks) if int(flags[c]) == run.world_size}


def _write_chunk(store: ScoreStore, c: int, out: _Scores, mine: Tensor, solves: list[dict[str, Any]],
                 with_self: bool) -> None:
    arrays = {"positions": mine, "scores": out.scores[:, mine], "train_losses": out.losses[mine]}
    if with_self:
        arrays["self_influence"] = out.self_influence[mine]
    store.write_chunk(c, arrays, {"self_solves": [{k: s[k] for k in _SOLVE_KEYS} for s in solves]})


def _read_chunk(store: ScoreStore, c: int, out: _Scores, mine: Tensor) -> None:
    saved = store.read_chunk(c)
    if not torch.equal(torch.from_numpy(saved["positions"]), mine):
        raise ConfigurationError(f"score store {store.directory}: chunk {c} holds other rows; pass a new store_dir.")
    like = out.scores
    out.scores[:, mine] = torch.from_numpy(saved["scores"]).to(device=like.device, dtype=like.dtype)
    out.losses[mine] = torch.from_numpy(saved["train_losses"]).to(device=like.device, dtype=like.dtype)
    if "self_influence" in saved:
        out.self_influence[mine] = torch.from_numpy(saved["self_influence"]).to(device=like.device, dtype=like.dtype)
    out.self_solves.extend(saved["info"].get("self_solves", []))


def _self_influence_summary(solves: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "solves": len(solves),
        "max_relative_residual": max(float(s["relative_residual"]) for s in solves),
        "all_converged": all(bool(s["converged"]) for s in solves),
        "any_diverged": any(bool(s["diverged"]) for s in solves),
        "iterations": sum(int(s["iterations"]) for s in solves),
    }


def _lowrank_summary(values: Tensor, bounds: Tensor) -> dict[str, Any]:
    """The low-rank self-influence's error bound (module :mod:`~lightning_influence.solvers.pcg`), summarised."""
    rel = bounds / values.abs().clamp_min(1e-300)
    return {"estimator": "lowrank", "solves": 0, "max_error_bound": float(bounds.max()) if bounds.numel() else 0.0,
            "max_relative_error_bound": float(rel.max()) if rel.numel() else 0.0,
            "median_relative_error_bound": float(rel.median()) if rel.numel() else 0.0}


def _prepare_run(
    model: nn.Module, task: Task, train_data: Any, query_data: Any, cfg: InfluenceConfig, *,
    train_indices: Sequence[int] | Tensor | None, query_indices: Sequence[int] | Tensor | None,
    curvature_indices: Sequence[int] | Tensor | None, collate_fn: CollateFn | None,
    query_collate_fn: CollateFn | None, reduce_fn: ReduceFn | None, rank: int, world_size: int,
) -> tuple[_Run, DataSource, Tensor]:
    """Check every argument before any work; build the training, query and curvature sources.

    Returns:
        ``(run, query source, training indices to score)``.

    Raises:
        ConfigurationError: For empty sets, bad indices or a bad rank.
    """
    if not 0 <= rank < world_size:
        raise ConfigurationError(f"rank={rank} must lie in [0, world_size={world_size}).")
    train = DataSource(as_dataset(train_data, "train_data"), None, batch_size=cfg.batch_size, collate_fn=collate_fn)
    query = DataSource(as_dataset(query_data, "query_data"), None, batch_size=cfg.chunk_size,
                       collate_fn=query_collate_fn or collate_fn)
    t_idx = as_indices(train_indices, len(train.dataset), "train_indices")
    query = query.subset(as_indices(query_indices, len(query.dataset), "query_indices"))
    if query.global_size == 0:
        raise ConfigurationError("the query set is empty: pass at least one query example (query_data/query_indices).")
    if t_idx.numel() == 0:
        raise ConfigurationError("the training set to score is empty: pass at least one training example.")
    pool_idx = as_indices(curvature_indices, len(train.dataset), "curvature_indices")
    if pool_idx.numel() == 0:
        raise ConfigurationError("curvature_indices is empty: the curvature needs training examples.")
    pool = DataSource(train.dataset, pool_idx, batch_size=cfg.batch_size, collate_fn=collate_fn, rank=rank,
                      world_size=world_size, shard_mode="strided")
    return _Run(model, task, cfg, train, pool, reduce_fn, rank, world_size), query, t_idx


def _open_store(
    store: ScoreStore | str | os.PathLike[str] | None, run: _Run, query: DataSource, t_idx: Tensor,
    spectrum: SpectrumSummary | LissaSettings | None,
) -> tuple[ScoreStore | None, set[int]]:
    """Open the score store (if any) with this run's fingerprint: the store and this rank's completed chunks."""
    if store is None:
        return None, set()
    if not isinstance(store, ScoreStore):
        store = ScoreStore(store, rank=run.rank, world_size=run.world_size)
    elif (store.rank, store.world_size) != (run.rank, run.world_size):
        raise ConfigurationError(f"store has rank={store.rank}, world_size={store.world_size} but this run has "
                                 f"rank={run.rank}, world_size={run.world_size}: build it with the run's values.")
    fp = fingerprint({k: v for k, v in run.cfg.to_dict().items() if k != "top_k"}, model=run.model,
                     train_indices=t_idx, query_indices=query.indices, curvature_indices=run.pool.indices,
                     dataset_sizes=[len(run.train.dataset), len(query.dataset)],
                     spectrum=dataclasses.asdict(spectrum) if dataclasses.is_dataclass(spectrum) else spectrum)
    fp["world_size"] = run.world_size
    num_chunks = math.ceil(t_idx.numel() / run.cfg.chunk_size)
    layout = {"num_train": t_idx.numel(), "num_queries": query.global_size, "chunk_size": run.cfg.chunk_size}
    done: set[int] = set()
    with _all_ranks_fail(run, store, "open"):
        done = store.open(fp, num_chunks=num_chunks, layout=layout)
    return store, done


@contextlib.contextmanager
def _all_ranks_fail(run: _Run, store: ScoreStore, what: str) -> Iterator[None]:
    """Under DDP, a store error on one rank raises on every rank (one reduction) instead of hanging the others."""
    err: Exception | None = None
    try:
        yield
    except (ConfigurationError, OSError) as e:
        err = e
    if run.world_size > 1:
        (failed,) = reduce_packed([float(err is not None)], run.reduce_fn)
        if float(failed) and err is None:
            raise StoreError(f"another rank failed to {what} the score store in {store.directory}; see its error.")
    if err is not None:
        raise err


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
    sketch: LowRankSketch | None = None,
    collate_fn: CollateFn | None = None,
    query_collate_fn: CollateFn | None = None,
    reduce_fn: ReduceFn | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: ProgressFn | None = None,
    store: ScoreStore | str | os.PathLike[str] | None = None,
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
        sketch: A :class:`~lightning_influence.solvers.LowRankSketch` of this model's curvature for ``"pcg"`` /
            ``"lowrank"`` (e.g. :meth:`~lightning_influence.solvers.LowRankSketch.load` of a saved one); computed
            from the curvature sample when ``None``.
        collate_fn: Collation of the training set (and of the queries unless ``query_collate_fn`` is given).
        query_collate_fn: Collation of the query set.
        reduce_fn: Sums a flat tensor over ranks (data parallel), else ``None``.
        rank: This process's rank.
        world_size: Number of ranks.
        progress: Called as ``progress(stage, done, total)`` after each chunk of training gradients (``stage``
            ``"train"``, or ``"resumed"`` for a chunk read back from ``store``), e.g. a
            :class:`~lightning_influence.progress.StageProgress` bar.
        store: A directory (or :class:`~lightning_influence.influence.store.ScoreStore`) to write every scored
            chunk to as ``.npy`` files, resuming from the chunks already there when the config, weights and
            indices match (bit-identical scores), else starting fresh with a warning. ``None``: in memory only.
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
    cfg = InfluenceConfig.resolve(config, **overrides)
    start = time.perf_counter()
    run, query, t_idx = _prepare_run(
        model, task, train_data, query_data, cfg, train_indices=train_indices,
        query_indices=query_indices, curvature_indices=curvature_indices, collate_fn=collate_fn,
        query_collate_fn=query_collate_fn, reduce_fn=reduce_fn, rank=rank, world_size=world_size,
    )
    solver_choice = _resolve_solver(run, query.global_size, spectrum)  # solver="auto": exact or pcg, by FLOPs
    damping = _resolve_damping(run, spectrum)
    _warn_costly(run, query.global_size, int(t_idx.numel()), chosen=solver_choice is not None)
    opened, done = _open_store(store, run, query, t_idx, spectrum)
    B, query_losses = _query_gradients(run, query)
    inverse = _build_inverse(run, spectrum, sketch)
    # lowrank works on the column-major right-hand sides as they are (its answer is column-major too); the other
    # solvers take the row-major (P, k) block they were written for.
    X, res = inverse(B if run.cfg.solver == "lowrank" else B.contiguous())  # (P, k)
    del B
    out = _stream_scores(run, inverse, X, t_idx, progress, opened, done)
    scores, self_inf, self_bound, losses, grads_total, products_total = reduce_packed(
        [out.scores, out.self_influence, out.self_influence_bound, out.losses, run.counters["example_gradients"],
         run.counters["example_products"]], reduce_fn if world_size > 1 else None)
    if opened is not None:
        opened.finish({"scores": scores, "train_losses": losses, "train_indices": t_idx, "query_losses": query_losses,
                       "query_indices": query.indices, **({"self_influence": self_inf} if cfg.self_influence else {})})
    solve_info = res.to_dict()
    if out.self_solves:
        solve_info["self_influence"] = _self_influence_summary(out.self_solves)
    if run.cfg.solver == "lowrank" and cfg.self_influence:
        solve_info["self_influence"] = _lowrank_summary(self_inf, self_bound)
    diagnostics = {
        "seconds": time.perf_counter() - start,
        "example_gradients": float(grads_total),
        "example_curvature_products": float(products_total),
        "gradient_equivalents": float(grads_total) + float(products_total),
        "num_products": int(res.num_products),
        "num_params": num_parameters(trainable_parameters(model)),
        "world_size": world_size,
        "curvature_examples": run.pool.global_size,
        "curvature_indices": None if curvature_indices is None else run.pool.indices.tolist(),
        "spectrum": res.info.get("spectrum") or inverse.state.get("spectrum"),
        "solver": run.cfg.solver,
        "solver_choice": solver_choice,
        "damping": damping,
    }
    if opened is not None:
        diagnostics["store"] = {"directory": str(opened.directory), "status": opened.status,
                                "resumed_chunks": len(done), "changes": opened.changes}
    if "sketch" in inverse.state:
        sk = inverse.state["sketch"]
        diagnostics["sketch"] = {"rank": sk.rank, "num_products": sk.num_products, "trace": sk.trace,
                                 "trace_fraction": sk.captured_trace_fraction, "tail_eigenvalue": sk.tail_eigenvalue,
                                 "config_hash": sk.config_hash, "computed": sketch is None}
    return InfluenceResult(
        scores=scores.cpu(), train_indices=t_idx.cpu(), query_indices=query.indices.cpu(),
        self_influence=self_inf.cpu() if cfg.self_influence else None, train_losses=losses.cpu(),
        query_losses=query_losses.cpu(), solve=solve_info, diagnostics=diagnostics,
        config={**run.cfg.to_dict(), "damping_rule": damping["rule"]},
    )


def projected_cost(
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
    collate_fn: CollateFn | None = None,
    query_collate_fn: CollateFn | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    r"""What :func:`influence_scores` with these arguments would cost, projected before any of its work.

    FLOPs, not timings: ``F`` forward FLOPs per example (counted on one batch of the curvature sample), a gradient
    taken as ``3F``, a curvature product column as ``4F`` per example, and the dense solve's BLAS work (see
    :func:`~lightning_influence.influence.inverse._resolve_solver`). ``passes`` divides the total by one gradient
    pass over the training set (``3F`` times its size). An estimate, not a bound: CG's iteration count is its
    worst case, PCG and LiSSA are counted as CG, and dense BLAS runs at more FLOPs per second than per-example
    products do (measured on the MNIST CNN: 991 passes projected for a run of 65.6 s, 88 epochs of 0.75 s).

    Returns:
        ``{"solver", "passes", "flops", "solve_flops", "scoring_flops", "solver_choice"}`` (the solver after
        ``"auto"``).

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> m = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.eye(2, dtype=torch.float64); y = torch.ones(2, 1, dtype=torch.float64)
        >>> cost = projected_cost(m, Regression(), (x, y), (x, y), damping=0.5)
        >>> cost["solver"], cost["passes"] > 0
        ('exact', True)
    """
    cfg = InfluenceConfig.resolve(config, **overrides)
    run, query, t_idx = _prepare_run(
        model, task, train_data, query_data, cfg, train_indices=train_indices, query_indices=query_indices,
        curvature_indices=curvature_indices, collate_fn=collate_fn, query_collate_fn=query_collate_fn,
        reduce_fn=None, rank=0, world_size=1,
    )
    k, scored = query.global_size, int(t_idx.numel())
    choice = _resolve_solver(run, k, spectrum)
    est = _projected_flops(run, k, spectrum) if choice is None or "exact_flops" not in choice else choice
    solver = run.cfg.solver
    flops = est["forward_flops_per_example"]
    solve = {"exact": est["exact_flops"], "lowrank": est["sketch_flops"],
             "pcg": est["sketch_flops"] + est["iterative_flops"]}.get(solver, est["iterative_flops"])
    if cfg.self_influence and solver not in ("exact", "lowrank"):
        solve *= 1.0 + scored / max(k, 1)  # one solve per scored example as well
    scoring = (scored + k) * 3.0 * flops
    total = solve + scoring
    unit = max(len(run.train.dataset) * 3.0 * flops, 1.0)
    return {"solver": solver, "passes": total / unit, "flops": total, "solve_flops": solve, "scoring_flops": scoring,
            "solver_choice": choice}


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
    ds = as_dataset(train_data, "train_data")
    idx = as_indices(indices, len(ds), "indices")
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
    n = DataSource(as_dataset(train_data, "train_data"), train_indices, batch_size=chunk_size).global_size
    workspace = torch.empty(min(chunk_size, max(n, 1)), Q.shape[1], dtype=Q.dtype, device=Q.device)  # see scale.md
    for _, G, _ in iter_per_example_gradients(model, task, train_data, train_indices, out=workspace, **kw):
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
