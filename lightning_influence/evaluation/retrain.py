r"""Retraining ground truth: train on seeded training subsets, measure the queries, cache every result on disk.

:class:`SubsetRetrainer` calls a user-supplied ``train_fn(indices, seed)`` once per subset and
``measure_fn(model)`` on its result (one value per query: a loss or a margin), for

* ``design="random"`` (the LDS, :func:`~lightning_influence.evaluation.lds.lds`): ``num_subsets`` seeded random
  subsets, each holding ``round(alpha * n)`` of the ``n`` candidate examples (default: all training examples;
  non-candidates are in every subset);
* ``design="leave_one_out"`` (:func:`~lightning_influence.evaluation.loo.loo_correlation`): the full training set
  once, then the full set without each chosen example (:meth:`SubsetRetrainer.leave_one_out`).

**Cache** (``cache_dir``; a standard format, readable without this package):

* ``manifest.json``: the configuration (design, α, M, seed, ``n_train``, candidates, the query-set fingerprint,
  fingerprints of ``train_fn`` and ``measure_fn``) and its SHA-256 ``config_hash``;
* ``subsets.npy``: the ``(num_runs, n_train)`` boolean membership of every run;
* ``run_00000.npz`` ... one file per finished run with ``outputs`` (the measurements), ``indices`` (the training
  examples used), ``seed`` and ``config_hash`` (``numpy.load`` reads them).

Every file is written to a temporary name in the same directory, flushed, ``fsync``-ed and renamed, so a killed run
never leaves a half-written result that counts as done. A re-run with the same configuration loads the finished
runs (``train_fn`` is not called for them) and trains the rest; a different configuration (another ``alpha``, a
changed ``train_fn``...) raises :class:`~lightning_influence.exceptions.ConfigurationError` naming what changed
(``on_mismatch="overwrite"`` discards the old results instead, with a warning).

A function's fingerprint is its qualified name plus the SHA-256 of ``inspect.getsource`` (for a
``functools.partial``, of the wrapped function plus the ``repr`` of its bound arguments); pass ``fingerprint=...``
to name a version yourself (required when the source is not available, e.g. in a REPL).

**Data parallel.** Rank ``r`` of ``world_size`` trains runs ``r, r + world_size, ...``; after a ``barrier()``
every rank reads all results from the (shared) cache directory. Without a cache directory, pass ``reduce_fn``
(a sum over ranks) instead. No collective runs inside ``train_fn``: each rank trains its own models.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_influence._io import atomic_write
from lightning_influence.distributed import reduce_packed
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.params import make_generator

__all__ = [
    "MANIFEST_NAME",
    "RetrainResult",
    "SubsetRetrainer",
    "callable_fingerprint",
    "random_subsets",
    "tensor_fingerprint",
]

TrainFn = Callable[[Tensor, int], Any]
MeasureFn = Callable[[Any], Any]
ReduceFn = Callable[[Tensor], Tensor]
ProgressFn = Callable[[str, int, int], None]

#: Name of the manifest file in a cache directory.
MANIFEST_NAME = "manifest.json"
_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ fingerprints
# inspect.getsource parses the module with ast; concurrent parses in threads (ranks of a thread world) can fail.
_SOURCE_LOCK = threading.Lock()


def callable_fingerprint(fn: Callable[..., Any], fingerprint: str | None = None) -> dict[str, Any]:
    """Identify a function across runs: qualified name plus a hash of its source (or a user-given string).

    Args:
        fn: A function, bound method, ``functools.partial`` or callable object.
        fingerprint: A version string chosen by the user; replaces the source hash when given.

    Returns:
        ``{"name": "module.qualname", "source_sha256": str | None, "fingerprint": str | None}``;
        ``source_sha256`` is ``None`` when the source cannot be read (then only the name identifies it).

    Example::

        >>> def train(indices, seed):
        ...     return indices.sum()
        >>> fp = callable_fingerprint(train)
        >>> fp["name"].endswith("train"), len(fp["source_sha256"])
        (True, 64)
        >>> callable_fingerprint(train, fingerprint="v2")["source_sha256"] is None
        True
    """
    target: Any = fn
    bound = ""
    while isinstance(target, functools.partial):
        bound += repr((target.args, sorted(target.keywords.items())))
        target = target.func
    if inspect.ismethod(target):
        target = target.__func__
    if not (inspect.isfunction(target) or inspect.isclass(target)) and callable(target):
        target = type(target)
    name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"
    source_hash = None
    if fingerprint is None:
        try:
            with _SOURCE_LOCK:  # CPython 3.11: "AST constructor recursion depth mismatch" in concurrent parses
                source = inspect.getsource(target)
        except (OSError, TypeError):
            source = None
        if source is not None:
            source_hash = hashlib.sha256((source + bound).encode()).hexdigest()
    return {"name": name, "source_sha256": source_hash, "fingerprint": fingerprint}


def tensor_fingerprint(*tensors: Tensor) -> str:
    """SHA-256 of the shapes, dtypes and bytes of some tensors (e.g. the query inputs and targets).

    Returns:
        A 64-character hex digest; equal tensors give equal digests.

    Example::

        >>> a = torch.arange(4.0)
        >>> tensor_fingerprint(a) == tensor_fingerprint(a.clone()), tensor_fingerprint(a) == tensor_fingerprint(a + 1)
        (True, False)
    """
    h = hashlib.sha256()
    for t in tensors:
        arr = torch.as_tensor(t).detach().cpu().contiguous()
        h.update(f"{tuple(arr.shape)}|{arr.dtype}|".encode())
        h.update(arr.reshape(-1).view(torch.uint8).numpy().tobytes() if arr.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- subsets
def random_subsets(
    n_train: int,
    num_subsets: int,
    alpha: float = 0.5,
    seed: int = 0,
    candidates: Tensor | Sequence[int] | None = None,
) -> Tensor:
    r"""Seeded random subsets: ``(num_subsets, n_train)`` membership, each with ``round(alpha * n)`` candidates.

    The draw depends only on the arguments (a dedicated generator; never the global RNG, the rank or the world
    size). Training examples that are not candidates are in every subset.

    Args:
        n_train: Training-set size.
        num_subsets: :math:`M`.
        alpha: Fraction :math:`\alpha` of the candidates kept in each subset, in ``(0, 1)``.
        seed: Seed.
        candidates: Data-set indices subject to removal (default: all).

    Returns:
        The boolean mask.

    Raises:
        ConfigurationError: For ``alpha`` outside ``(0, 1)``, a subset that would keep none or all of the
            candidates, ``num_subsets < 1`` or candidates outside ``[0, n_train)``.

    Example::

        >>> m = random_subsets(10, 3, alpha=0.5, seed=0)
        >>> m.shape, m.sum(1).tolist(), torch.equal(m, random_subsets(10, 3, alpha=0.5, seed=0))
        (torch.Size([3, 10]), [5, 5, 5], True)
    """
    cand = _candidates(candidates, n_train)
    size = _subset_size(cand.numel(), alpha)
    if num_subsets < 1:
        raise ConfigurationError(f"num_subsets must be >= 1, got {num_subsets}.")
    gen = make_generator(seed)
    mask = torch.ones(num_subsets, n_train, dtype=torch.bool)
    for m in range(num_subsets):
        drop = cand[torch.randperm(cand.numel(), generator=gen)[size:]]
        mask[m, drop] = False
    return mask


def _candidates(candidates: Tensor | Sequence[int] | None, n_train: int) -> Tensor:
    if n_train < 2:
        raise ConfigurationError(f"n_train must be >= 2 (a subset must leave something out), got {n_train}.")
    if candidates is None:
        return torch.arange(n_train)
    cand = torch.as_tensor(candidates, dtype=torch.long).reshape(-1)
    if cand.numel() and (int(cand.min()) < 0 or int(cand.max()) >= n_train):
        raise ConfigurationError(f"candidates must lie in [0, n_train={n_train}).")
    cand = torch.unique(cand)
    if cand.numel() < 2:
        raise ConfigurationError(f"candidates must hold at least 2 distinct training examples, got {cand.numel()}.")
    return cand


def _subset_size(n: int, alpha: float) -> int:
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):
        raise ConfigurationError(f"alpha (the kept fraction of each subset) must lie in (0, 1), e.g. 0.5; got {alpha}.")
    size = round(float(alpha) * n)
    if not 1 <= size <= n - 1:
        raise ConfigurationError(
            f"alpha={alpha} keeps {size} of {n} candidate examples; each subset must keep at least one and leave out "
            "at least one. Use more candidates or an alpha further from 0 and 1."
        )
    return size


# ----------------------------------------------------------------------------------------------- result
@dataclass
class RetrainResult:
    """What :meth:`SubsetRetrainer.run` measured (identical on every rank).

    Attributes:
        subsets: ``(M, n_train)`` membership of the retrained subsets (leave-one-out: without the full run).
        outputs: ``(M, n_query)`` measurements of the retrained models, float64.
        seeds: The seed passed to ``train_fn`` for each subset.
        base_outputs: ``(n_query,)`` measurements of the model trained on the full set (leave-one-out design),
            else ``None``.
        removed: ``(M,)`` the example left out by each leave-one-out run, else ``None``.
        reused: Runs this rank loaded from the cache (``train_fn`` not called), by run id.
        trained: Runs this rank trained now, by run id.
        seconds: Wall time of :meth:`SubsetRetrainer.run` on this rank.
        config: The configuration (also in ``manifest.json``) and ``config_hash``.

    Example::

        >>> r = RetrainResult(subsets=torch.ones(2, 3, dtype=torch.bool), outputs=torch.zeros(2, 4), seeds=[0, 0])
        >>> r.num_subsets, r.num_queries
        (2, 4)
    """

    subsets: Tensor
    outputs: Tensor
    seeds: list[int]
    base_outputs: Tensor | None = None
    removed: Tensor | None = None
    reused: list[int] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_subsets(self) -> int:
        """``M``."""
        return int(self.outputs.shape[0])

    @property
    def num_queries(self) -> int:
        """Measurements per run."""
        return int(self.outputs.shape[1]) if self.outputs.ndim == 2 else 1


# ---------------------------------------------------------------------------------------------- helpers
def _hash_config(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _describe_change(key: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict) and key in ("train_fn", "measure_fn"):
        if old.get("name") != new.get("name"):
            return f"{key} is a different function ({old.get('name')} in the cache, {new.get('name')} now)"
        if old.get("fingerprint") != new.get("fingerprint"):
            return f"{key}'s fingerprint changed ({old.get('fingerprint')!r} -> {new.get('fingerprint')!r})"
        return f"{key}'s source code changed (sha256 {str(old.get('source_sha256'))[:12]} -> " \
               f"{str(new.get('source_sha256'))[:12]})"
    text_old, text_new = json.dumps(old, default=str), json.dumps(new, default=str)
    if len(text_old) > 60 or len(text_new) > 60:
        return f"{key} changed"
    return f"{key}: {text_old} in the cache, {text_new} now"


class SubsetRetrainer:
    r"""Train one model per training subset with ``train_fn``, measure the queries with ``measure_fn``, cache it.

    Args:
        train_fn: ``train_fn(indices, seed)`` trains on the training examples ``indices`` (a sorted ``int64``
            tensor of data-set indices) and returns the model (anything ``measure_fn`` accepts). It must be
            deterministic given its arguments for results to be reproducible. A plain function defined in a
            module (importable, picklable) is best: its source is fingerprinted.
        measure_fn: ``measure_fn(model)`` returns the measurements, one per query (a tensor or array; a loss or
            a margin, see :func:`~lightning_influence.evaluation.lds.lds`). ``None``: ``train_fn`` returns the
            measurements itself.
        n_train: Training-set size.
        num_subsets: :math:`M` (the LDS needs at least 3; 50 or more is usual).
        alpha: Fraction of the candidates kept in each subset (default 0.5).
        seed: Seed of the subset draw.
        candidates: Training examples subject to removal (default: all; the others are in every subset).
        seed_per_subset: ``False`` (default): ``train_fn`` gets ``seed`` for every subset, so differences between
            the retrained models come from their data only; ``True``: subset ``m`` gets ``seed + 1 + m``.
        cache_dir: Directory of the on-disk cache (created if missing); ``None`` keeps results in memory.
        fingerprint: A version string for ``train_fn``/``measure_fn``, replacing their source hashes.
        query_fingerprint: Identifies the query set (e.g. :func:`tensor_fingerprint` of the query tensors); a
            change invalidates the cache.
        on_mismatch: ``"raise"`` (default) or ``"overwrite"`` when ``cache_dir`` holds another configuration.
        rank: This process's data-parallel rank.
        world_size: Number of ranks.
        barrier: Called with no argument to synchronise all ranks (required when ``world_size > 1``).
        reduce_fn: Sums a flat tensor over ranks; gathers the results when ``cache_dir`` is ``None``.
        progress: Called as ``progress("retrain", done, total)`` after every run of this rank.

    Raises:
        ConfigurationError: For a bad ``alpha``, ``num_subsets``, ``n_train``, ``on_mismatch``, rank or world
            size; for ``world_size > 1`` without a ``barrier``, or without either ``cache_dir`` or ``reduce_fn``.

    Example::

        >>> import tempfile
        >>> x = torch.arange(10, dtype=torch.float64)
        >>> def train(indices, seed):          # "training" = the mean of the kept values
        ...     return x[indices].mean()
        >>> def measure(model):                 # two queries
        ...     return torch.stack([model, -model])
        >>> cache = tempfile.mkdtemp()
        >>> first = SubsetRetrainer(train, measure, n_train=10, num_subsets=4, cache_dir=cache).run()
        >>> first.outputs.shape, first.trained, first.reused
        (torch.Size([4, 2]), [0, 1, 2, 3], [])
        >>> again = SubsetRetrainer(train, measure, n_train=10, num_subsets=4, cache_dir=cache).run()
        >>> again.trained, again.reused, torch.equal(first.outputs, again.outputs)
        ([], [0, 1, 2, 3], True)
    """

    def __init__(
        self,
        train_fn: TrainFn,
        measure_fn: MeasureFn | None = None,
        *,
        n_train: int,
        num_subsets: int = 50,
        alpha: float = 0.5,
        seed: int = 0,
        candidates: Tensor | Sequence[int] | None = None,
        seed_per_subset: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        fingerprint: str | None = None,
        query_fingerprint: str | None = None,
        on_mismatch: str = "raise",
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], Any] | None = None,
        reduce_fn: ReduceFn | None = None,
        progress: ProgressFn | None = None,
        _design: str = "random",
        _removed: Tensor | None = None,
    ) -> None:
        if not callable(train_fn):
            raise ConfigurationError(f"train_fn must be callable as train_fn(indices, seed), got {train_fn!r}.")
        if measure_fn is not None and not callable(measure_fn):
            raise ConfigurationError(f"measure_fn must be callable as measure_fn(model) or None, got {measure_fn!r}.")
        if on_mismatch not in ("raise", "overwrite"):
            raise ConfigurationError(f"on_mismatch must be 'raise' or 'overwrite', got {on_mismatch!r}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigurationError(f"rank={rank} must lie in [0, world_size={world_size}) with world_size >= 1.")
        if world_size > 1 and barrier is None:
            raise ConfigurationError(
                "world_size > 1 needs barrier= (e.g. torch.distributed.barrier or trainer.strategy.barrier) so that "
                "every rank waits for the others' results."
            )
        if world_size > 1 and cache_dir is None and reduce_fn is None:
            raise ConfigurationError(
                "world_size > 1 needs a cache_dir on a file system all ranks share, or reduce_fn= (a sum over ranks), "
                "to gather the results."
            )
        n_train = int(n_train)
        self.train_fn = train_fn
        self.measure_fn = measure_fn
        self.n_train = n_train
        self.design = _design
        self.seed = int(seed)
        self.seed_per_subset = bool(seed_per_subset)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.on_mismatch = on_mismatch
        self.rank, self.world_size = int(rank), int(world_size)
        self.barrier, self.reduce_fn, self.progress = barrier, reduce_fn, progress
        if _design == "random":
            self.candidates = _candidates(candidates, n_train)
            self.alpha = float(alpha)
            self.num_subsets = int(num_subsets)
            if self.num_subsets < 1:
                raise ConfigurationError(f"num_subsets must be >= 1 (the LDS needs >= 3), got {num_subsets}.")
            self._masks = random_subsets(n_train, self.num_subsets, self.alpha, self.seed, self.candidates)
            self.removed: Tensor | None = None
        else:
            assert _removed is not None
            self.candidates = torch.arange(n_train)
            self.alpha = math.nan
            self.removed = _removed
            self.num_subsets = int(_removed.numel())
            full = torch.ones(1, n_train, dtype=torch.bool)
            loo = torch.ones(self.num_subsets, n_train, dtype=torch.bool)
            loo[torch.arange(self.num_subsets), _removed] = False
            self._masks = torch.cat([full, loo])  # run 0 = the full training set
        self.config = self._make_config(fingerprint, query_fingerprint)
        self.config_hash = _hash_config(self.config)

    @classmethod
    def leave_one_out(
        cls,
        train_fn: TrainFn,
        measure_fn: MeasureFn | None = None,
        *,
        n_train: int,
        indices: Tensor | Sequence[int],
        **kwargs: Any,
    ) -> SubsetRetrainer:
        """Exact leave-one-out refits: the full training set once, then without each of ``indices``.

        Args:
            train_fn: As for :class:`SubsetRetrainer` (called with all-but-one indices; use a warm start from the
                trained weights and a tight tolerance: leave-one-out effects are small).
            measure_fn: As for :class:`SubsetRetrainer`.
            n_train: Training-set size.
            indices: The training examples to leave out, one refit each (distinct).
            **kwargs: ``seed``, ``cache_dir``, ``fingerprint``, ``query_fingerprint``, ``on_mismatch``, ``rank``,
                ``world_size``, ``barrier``, ``reduce_fn``, ``progress`` as for :class:`SubsetRetrainer`.

        Returns:
            The retrainer (``design="leave_one_out"``); its :meth:`run` fills ``base_outputs`` and ``removed``.

        Raises:
            ConfigurationError: For empty, repeated or out-of-range ``indices`` or an option that does not apply.

        Example::

            >>> x = torch.arange(6, dtype=torch.float64)
            >>> r = SubsetRetrainer.leave_one_out(lambda idx, seed: x[idx].sum().reshape(1), n_train=6,
            ...                                   indices=[0, 5]).run()
            >>> r.base_outputs.tolist(), r.outputs[:, 0].tolist(), r.removed.tolist()
            ([15.0], [15.0, 10.0], [0, 5])
        """
        bad = sorted(set(kwargs) & {"num_subsets", "alpha", "candidates", "seed_per_subset"})
        if bad:
            raise ConfigurationError(f"leave_one_out does not take {bad}: it refits once per entry of indices.")
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() == 0:
            raise ConfigurationError("indices is empty: pass the training examples to leave out.")
        if int(idx.min()) < 0 or int(idx.max()) >= n_train:
            raise ConfigurationError(f"indices must lie in [0, n_train={n_train}).")
        if torch.unique(idx).numel() != idx.numel():
            raise ConfigurationError("indices must be distinct (one refit per left-out example).")
        return cls(train_fn, measure_fn, n_train=n_train, _design="leave_one_out", _removed=idx, **kwargs)

    # ------------------------------------------------------------------------------------------- config
    def _make_config(self, fingerprint: str | None, query_fingerprint: str | None) -> dict[str, Any]:
        cand = self.candidates
        all_candidates = cand.numel() == self.n_train
        return {
            "format_version": _FORMAT_VERSION,
            "design": self.design,
            "n_train": self.n_train,
            "num_subsets": self.num_subsets,
            "alpha": None if self.design != "random" else self.alpha,
            "subset_size": None if self.design != "random" else _subset_size(cand.numel(), self.alpha),
            "seed": self.seed,
            "seed_per_subset": self.seed_per_subset,
            "candidates": "all" if all_candidates else tensor_fingerprint(cand),
            "num_candidates": int(cand.numel()),
            "removed": None if self.removed is None else self.removed.tolist(),
            "query_fingerprint": query_fingerprint,
            "train_fn": callable_fingerprint(self.train_fn, fingerprint),
            "measure_fn": None if self.measure_fn is None else callable_fingerprint(self.measure_fn, fingerprint),
        }

    @property
    def subsets(self) -> Tensor:
        """``(num_runs, n_train)`` membership of every run (leave-one-out: run 0 is the full set)."""
        return self._masks

    @property
    def num_runs(self) -> int:
        """Runs in total (``num_subsets``, plus the full run for leave-one-out)."""
        return int(self._masks.shape[0])

    def run_seed(self, run: int) -> int:
        """The seed passed to ``train_fn`` for run ``run``.

        Returns:
            ``seed``, or ``seed + 1 + run`` with ``seed_per_subset=True``.
        """
        return self.seed + 1 + run if self.seed_per_subset else self.seed

    def my_runs(self) -> list[int]:
        """Run ids this rank trains: ``rank, rank + world_size, ...``.

        Returns:
            The run ids.
        """
        return list(range(self.rank, self.num_runs, self.world_size))

    def run_path(self, run: int) -> Path:
        """``<cache_dir>/run_<run:05d>.npz``.

        Returns:
            The path.

        Raises:
            ConfigurationError: Without a cache directory.
        """
        if self.cache_dir is None:
            raise ConfigurationError("this SubsetRetrainer has no cache_dir.")
        return self.cache_dir / f"run_{run:05d}.npz"

    # -------------------------------------------------------------------------------------------- cache
    def _check_manifest(self) -> bool:
        """``True`` when the cache holds another configuration that must be discarded (on_mismatch='overwrite')."""
        assert self.cache_dir is not None
        path = self.cache_dir / MANIFEST_NAME
        if not path.is_file():
            stale = any(self.cache_dir.glob("run_*.npz")) if self.cache_dir.is_dir() else False
            if stale:
                raise ConfigurationError(
                    f"{self.cache_dir} holds run_*.npz files but no {MANIFEST_NAME}, so their configuration is "
                    "unknown; delete them or use another cache_dir."
                )
            return False
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigurationError(f"cannot read {path} ({err}); delete it or use another cache_dir.") from err
        if old.get("config_hash") == self.config_hash:
            return False
        old_cfg = old.get("config", {})
        changes = [_describe_change(k, old_cfg.get(k), self.config.get(k))
                   for k in sorted(set(old_cfg) | set(self.config)) if old_cfg.get(k) != self.config.get(k)]
        text = "; ".join(changes) or "the configuration hash differs"
        if self.on_mismatch == "raise":
            raise ConfigurationError(
                f"the retraining cache {self.cache_dir} was written with another configuration ({text}), so its "
                "results do not apply. Delete the directory, pass another cache_dir, or pass "
                "on_mismatch='overwrite' to discard the old results."
            )
        if self.rank == 0:
            warnings.warn(f"discarding the retraining cache {self.cache_dir}: {text}.", RuntimeWarning, stacklevel=3)
        return True

    def _prepare_cache(self) -> None:
        assert self.cache_dir is not None
        discard = self._check_manifest()  # every rank checks (and raises) the same way, before anyone writes
        self._sync()
        if self.rank == 0:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            if discard:
                for p in self.cache_dir.glob("run_*.npz"):
                    p.unlink()
            manifest = {"config": self.config, "config_hash": self.config_hash,
                        "files": {"subsets": "subsets.npy", "runs": "run_<id:05d>.npz"}}
            atomic_write(self.cache_dir / MANIFEST_NAME,
                          lambda f: f.write(json.dumps(manifest, indent=1, default=str).encode()))
            if not (self.cache_dir / "subsets.npy").is_file() or discard:
                masks = self._masks.numpy()
                atomic_write(self.cache_dir / "subsets.npy", lambda f: np.save(f, masks))
        self._sync()

    def _load_run(self, run: int) -> np.ndarray | None:
        path = self.run_path(run)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["config_hash"]) != self.config_hash:
                    return None
                return np.array(data["outputs"])
        except (OSError, ValueError, KeyError, EOFError) as err:
            warnings.warn(f"ignoring unreadable cached result {path} ({err}); it is recomputed.", RuntimeWarning,
                          stacklevel=3)
            return None

    def _save_run(self, run: int, outputs: np.ndarray, indices: Tensor, seed: int) -> None:
        arrays = {"outputs": outputs, "indices": indices.numpy(), "seed": np.asarray(seed),
                  "config_hash": np.asarray(self.config_hash)}
        atomic_write(self.run_path(run), lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]

    def _sync(self) -> None:
        if self.world_size > 1:
            assert self.barrier is not None
            self.barrier()

    def completed(self) -> list[int]:
        """Run ids whose results are in the cache for this configuration (empty without a cache).

        Returns:
            Sorted run ids.
        """
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return []
        return [r for r in range(self.num_runs) if self._load_run(r) is not None]

    def clear(self) -> None:
        """Delete the cache directory (rank 0 only; call on every rank, a barrier follows)."""
        if self.cache_dir is not None and self.rank == 0 and self.cache_dir.exists():
            shutil.rmtree(self.cache_dir)
        self._sync()

    # ---------------------------------------------------------------------------------------------- run
    def _measure(self, run: int) -> np.ndarray:
        indices = self._masks[run].nonzero().reshape(-1)
        model = self.train_fn(indices, self.run_seed(run))
        values = model if self.measure_fn is None else self.measure_fn(model)
        if isinstance(values, Tensor):
            arr = values.detach().cpu().reshape(-1).numpy()
        else:
            arr = np.asarray(values).reshape(-1)
        if arr.size == 0 or not np.issubdtype(arr.dtype, np.number):
            raise ConfigurationError(
                f"measure_fn must return one number per query (a non-empty tensor/array), got {type(values).__name__} "
                f"with {arr.size} entries."
            )
        return np.array(arr, copy=True)

    def run(self) -> RetrainResult:
        """Train and measure every run of this rank that is not cached yet, then gather all results.

        Returns:
            The :class:`RetrainResult` (identical on every rank).

        Raises:
            ConfigurationError: If the cache holds another configuration (``on_mismatch="raise"``), a result is
                missing after the barrier (another rank failed), or the runs measured different numbers of queries.
        """
        start = time.perf_counter()
        if self.cache_dir is not None:
            self._prepare_cache()
        mine = self.my_runs()
        values: dict[int, np.ndarray] = {}
        reused, trained = [], []
        for done, r in enumerate(mine, start=1):
            cached = self._load_run(r) if self.cache_dir is not None else None
            if cached is not None:
                values[r] = cached
                reused.append(r)
            else:
                out = self._measure(r)
                if self.cache_dir is not None:
                    self._save_run(r, out, self._masks[r].nonzero().reshape(-1), self.run_seed(r))
                values[r] = out
                trained.append(r)
            if self.progress is not None:
                self.progress("retrain", done, len(mine))
        if self.cache_dir is not None:
            self._sync()
            for r in range(self.num_runs):
                if r not in values:
                    got = self._load_run(r)
                    if got is None:
                        raise ConfigurationError(
                            f"run {r} has no result in {self.cache_dir} after all ranks finished: its rank failed, or "
                            "cache_dir is not on a file system every rank shares."
                        )
                    values[r] = got
            table = self._stack(values)
        elif self.world_size > 1:
            table = self._gather_by_reduce(values)
        else:
            table = self._stack(values)
        seeds = [self.run_seed(r) for r in range(self.num_runs)]
        config = {**self.config, "config_hash": self.config_hash}
        common: dict[str, Any] = {"reused": reused, "trained": trained, "seconds": time.perf_counter() - start,
                                  "config": config}
        if self.design == "random":
            return RetrainResult(subsets=self._masks.clone(), outputs=table, seeds=seeds, **common)
        return RetrainResult(subsets=self._masks[1:].clone(), outputs=table[1:], seeds=seeds[1:],
                             base_outputs=table[0], removed=self.removed, **common)

    def _stack(self, values: dict[int, np.ndarray]) -> Tensor:
        sizes = {v.size for v in values.values()}
        if len(sizes) != 1:
            raise ConfigurationError(f"measure_fn returned different numbers of values across runs: {sorted(sizes)}.")
        return torch.stack([torch.from_numpy(values[r].astype(np.float64)) for r in range(self.num_runs)])

    def _gather_by_reduce(self, values: dict[int, np.ndarray]) -> Tensor:
        assert self.reduce_fn is not None
        q_local = next(iter(values.values())).size if values else 0
        (head,) = reduce_packed([torch.tensor([float(q_local), float(bool(values))], dtype=torch.float64)],
                                self.reduce_fn)
        q = round(float(head[0]) / max(float(head[1]), 1.0))
        if any(v.size != q for v in values.values()):
            raise ConfigurationError("measure_fn returned different numbers of values on different ranks.")
        buf = torch.zeros(self.num_runs, q, dtype=torch.float64)
        for r, v in values.items():
            buf[r] = torch.from_numpy(v.astype(np.float64))
        (table,) = reduce_packed([buf], self.reduce_fn)
        return table
