r"""Data for curvature work: a dataset, its chosen examples, their batches and this rank's shard, made once.

Every estimator of the package reads its examples through a :class:`DataSource`: the dataset (any map-style
dataset, or a tuple of tensors), the *global* sample of example indices (identical on every rank), the batch size,
the collate function and this process's rank and world size. The source takes this rank's slice with
:func:`~lightning_influence.distributed.shard_indices` and collates it once (under :func:`isolated_rng`, so a
dataset's augmentations never advance the training run's random stream); operators, gradient streams and samplers
then share those batches instead of re-batching the dataset.

A list of already collated batches is accepted wherever a source is expected (:meth:`DataSource.coerce`): it is
this process's share of the sample as it stands.

Example::

    >>> ds = torch.utils.data.TensorDataset(torch.arange(7.0), torch.arange(7))
    >>> src = DataSource(ds, batch_size=2, rank=1, world_size=2)   # rank 1 of 2 takes examples 4, 5, 6
    >>> src.local_indices.tolist(), [len(b[0]) for b in src.batches()]
    ([4, 5, 6], [2, 1])
    >>> src.global_size, src.local_size
    (7, 3)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from lightning_influence.distributed import ShardMode, shard_indices
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.params import isolated_rng

__all__ = ["CollateFn", "DataSource", "as_dataset", "as_indices", "make_batches", "prepare_batch"]

CollateFn = Callable[[list[Any]], Any]


def prepare_batch(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor of a batch to ``device``; clone inference-mode tensors so autograd can use them.

    Floating tensors are cast to ``dtype`` when given (e.g. float64 for exact checks).

    Returns:
        The batch with the same structure, its tensors on ``device``.

    Example::

        >>> with torch.inference_mode():
        ...     x = torch.ones(2)
        >>> b = prepare_batch({"x": x, "y": torch.tensor([1, 2])}, torch.device("cpu"), torch.float64)
        >>> b["x"].dtype, b["y"].dtype  # only floating tensors are cast
        (torch.float64, torch.int64)
        >>> x.is_inference(), b["x"].is_inference()
        (True, False)
    """

    def move(x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        if dtype is not None and torch.is_floating_point(x):
            x = x.to(device=device, dtype=dtype)
        else:
            x = x.to(device=device)
        return x.clone() if x.is_inference() else x

    with torch.inference_mode(False):
        return tree_map(move, batch)


def as_dataset(data: Any, name: str = "data") -> Any:
    """A map-style dataset from ``data`` (a tuple of tensors becomes a ``TensorDataset``).

    Returns:
        The dataset.

    Raises:
        ConfigurationError: If ``data`` has no ``__len__`` / ``__getitem__``.

    Example::

        >>> len(as_dataset((torch.zeros(3, 2), torch.zeros(3))))
        3
    """
    if isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data):
        return torch.utils.data.TensorDataset(*data)
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise ConfigurationError(
            f"{name} must be a map-style dataset (with __len__ and __getitem__) or a tuple of tensors (a list is "
            f"treated as a data set), got {type(data).__name__}."
        )
    return data


def as_indices(indices: Sequence[int] | Tensor | None, n: int, name: str = "indices") -> Tensor:
    """``indices`` as a 1-D ``int64`` tensor (default ``arange(n)``), checked against ``[0, n)``.

    Returns:
        The index tensor.

    Raises:
        ConfigurationError: If an index lies outside ``[0, n)``.

    Example::

        >>> as_indices(None, 3).tolist(), as_indices([2, 0], 3).tolist()
        ([0, 1, 2], [2, 0])
    """
    idx = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        bad = idx[(idx < 0) | (idx >= n)][:5].tolist()
        raise ConfigurationError(f"{name} contain indices {bad} outside [0, {n}) (the dataset has {n} examples).")
    return idx


def make_batches(
    dataset: Any,
    indices: Sequence[int] | Tensor | None = None,
    batch_size: int = 128,
    collate_fn: CollateFn | None = None,
) -> list[Any]:
    """Collate ``dataset[i]`` for ``i`` in ``indices`` into a list of batches (the operators' data format).

    Args:
        dataset: Anything indexable returning one example (a map-style ``Dataset``, a list of tuples...).
        indices: Which examples, in order (default: all of ``range(len(dataset))``).
        batch_size: Examples per batch; the last batch may be smaller.
        collate_fn: How to collate a list of examples (default ``torch.utils.data.default_collate``).

    Returns:
        The list of collated batches (possibly empty, e.g. for a rank with no shard).

    Raises:
        ConfigurationError: For a non-positive ``batch_size`` or an index out of range.

    Example::

        >>> ds = torch.utils.data.TensorDataset(torch.arange(5.0), torch.arange(5))
        >>> [len(b[0]) for b in make_batches(ds, batch_size=2)]
        [2, 2, 1]
    """
    from torch.utils.data import default_collate

    if batch_size <= 0:
        raise ConfigurationError(f"batch_size must be positive, got {batch_size}.")
    n = len(dataset)
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ConfigurationError(f"indices {bad[:5]} are out of range for a dataset of {n} examples.")
    collate = collate_fn or default_collate
    return [collate([dataset[i] for i in idx[s : s + batch_size]]) for s in range(0, len(idx), batch_size)]


class DataSource:
    """A dataset, its global sample, batching and this rank's shard; collated once and shared by every consumer.

    Args:
        dataset: A map-style dataset or a tuple of tensors.
        indices: The global sample (data-set indices, identical on every rank; default: every example).
        batch_size: Examples per batch.
        collate_fn: Collation (default ``torch.utils.data.default_collate``).
        rank: This process's data-parallel rank.
        world_size: Number of data-parallel ranks.
        shard_mode: How the sample is split over ranks (:func:`~lightning_influence.distributed.shard_indices`).

    Raises:
        ConfigurationError: For a bad dataset, index, batch size or rank.

    Example::

        >>> ds = torch.utils.data.TensorDataset(torch.arange(6.0), torch.arange(6))
        >>> src = DataSource(ds, [5, 1, 3], batch_size=2)
        >>> [b[1].tolist() for b in src.batches()]
        [[5, 1], [3]]
        >>> src.batches() is src.batches()   # collated once
        True
        >>> [b[1].tolist() for b in src.subset([0, 2]).batches()]
        [[0, 2]]
    """

    def __init__(
        self,
        dataset: Any,
        indices: Sequence[int] | Tensor | None = None,
        *,
        batch_size: int = 128,
        collate_fn: CollateFn | None = None,
        rank: int = 0,
        world_size: int = 1,
        shard_mode: ShardMode = "contiguous",
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}.")
        self.dataset = as_dataset(dataset, "dataset")
        self.indices = as_indices(indices, len(self.dataset), "indices")
        self.batch_size = int(batch_size)
        self.collate_fn = collate_fn
        self.rank, self.world_size, self.shard_mode = int(rank), int(world_size), shard_mode
        self.local_indices = shard_indices(self.indices, self.rank, self.world_size, shard_mode)
        self._batches: list[Any] | None = None
        self._prepared: dict[tuple[str, str], list[Any]] = {}

    # ------------------------------------------------------------------------------------------- builders
    @classmethod
    def from_batches(cls, batches: Sequence[Any]) -> DataSource:
        """A source over already collated batches (this process's share as it stands; no dataset behind it).

        Returns:
            The source; :meth:`batches` returns ``list(batches)``.

        Example::

            >>> src = DataSource.from_batches([(torch.zeros(2, 1), torch.zeros(2))])
            >>> len(src.batches()), src.dataset is None
            (1, True)
        """
        src = cls.__new__(cls)
        src.dataset, src.collate_fn = None, None
        src.indices = src.local_indices = torch.zeros(0, dtype=torch.long)
        src.batch_size, src.rank, src.world_size, src.shard_mode = 0, 0, 1, "contiguous"
        src._batches = list(batches)
        src._prepared = {}
        return src

    @classmethod
    def coerce(cls, data: DataSource | Sequence[Any]) -> DataSource:
        """``data`` itself if it is a source, else a source over the given list of collated batches.

        Returns:
            A :class:`DataSource`.

        Raises:
            ConfigurationError: If ``data`` is neither a source nor a sequence of batches.

        Example::

            >>> src = DataSource.coerce([(torch.zeros(1, 1), torch.zeros(1))])
            >>> DataSource.coerce(src) is src
            True
        """
        if isinstance(data, DataSource):
            return data
        if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
            raise ConfigurationError(
                f"expected a DataSource or a list of collated batches, got {type(data).__name__}; build one with "
                "DataSource(dataset, indices, batch_size=...) or make_batches(dataset, indices)."
            )
        return cls.from_batches(data)

    def subset(self, indices: Sequence[int] | Tensor, *, batch_size: int | None = None) -> DataSource:
        """The same dataset, collation and sharding over another global sample.

        Returns:
            A new source (nothing collated yet).

        Raises:
            ConfigurationError: If this source has no dataset behind it (built from batches).
        """
        if self.dataset is None:
            raise ConfigurationError("a DataSource built from collated batches has no dataset to draw a subset from.")
        return DataSource(self.dataset, indices, batch_size=batch_size or self.batch_size, collate_fn=self.collate_fn,
                          rank=self.rank, world_size=self.world_size, shard_mode=self.shard_mode)

    def with_batch_size(self, batch_size: int) -> DataSource:
        """A copy that batches the same shard ``batch_size`` examples at a time.

        Returns:
            A new source.
        """
        return self.subset(self.indices, batch_size=batch_size)

    # --------------------------------------------------------------------------------------------- access
    @property
    def global_size(self) -> int:
        """Examples in the whole sample (all ranks)."""
        return int(self.indices.numel()) if self.dataset is not None else self.local_size

    @property
    def local_size(self) -> int:
        """Examples on this rank."""
        if self.dataset is None:
            return sum(_batch_len(b) for b in self._batches or [])
        return int(self.local_indices.numel())

    def batches(self) -> list[Any]:
        """This rank's shard, collated (once; later calls return the same list).

        Returns:
            The list of collated batches (empty for an empty shard).
        """
        if self._batches is None:
            with isolated_rng():
                self._batches = make_batches(self.dataset, self.local_indices, self.batch_size, self.collate_fn)
        return self._batches

    def prepared(self, device: torch.device, dtype: torch.dtype | None = None) -> list[Any]:
        """:meth:`batches` moved to ``device`` (floating tensors cast to ``dtype``), cached per device and dtype.

        Returns:
            The prepared batches.
        """
        key = (str(device), str(dtype))
        if key not in self._prepared:
            self._prepared[key] = [prepare_batch(b, device, dtype) for b in self.batches()]
        return self._prepared[key]

    def collate(self, indices: Sequence[int] | Tensor, batch_size: int | None = None) -> list[Any]:
        """Collate the given data-set indices (e.g. a fresh random batch) without caching them.

        ``batch_size`` defaults to this source's; pass ``len(indices)`` for one batch.

        Returns:
            The collated batches.

        Raises:
            ConfigurationError: If this source has no dataset behind it.
        """
        if self.dataset is None:
            raise ConfigurationError("a DataSource built from collated batches cannot collate new indices.")
        with isolated_rng():
            return make_batches(self.dataset, indices, batch_size or self.batch_size or max(1, len(indices)),
                                self.collate_fn)

    def copy(self) -> DataSource:
        """A shallow copy sharing the collated batches.

        Returns:
            The copy.
        """
        return copy.copy(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain description (sizes, batching, rank): what a report or a manifest records.

        Returns:
            ``{"global_size", "local_size", "batch_size", "rank", "world_size", "dataset_size"}``.
        """
        return {
            "global_size": self.global_size,
            "local_size": self.local_size,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "dataset_size": len(self.dataset) if self.dataset is not None else None,
        }


def _batch_len(batch: Any) -> int:
    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, Tensor) and t.ndim > 0]
    return int(leaves[-1].shape[0]) if leaves else 0
