r"""Data-parallel sharding of curvature work: seeded global draws, per-rank slices, one sum-reduction per product.

Curvature products are sums over examples, so sharding them across data-parallel ranks is exact:

1. every rank draws the **same** global sample with :func:`global_sample_indices` (a dedicated seeded
   ``torch.Generator``; the global RNG is never touched);
2. each rank takes its slice with :func:`shard_indices` (no padding, no duplicates: an uneven split is fine and a
   rank may get no example at all);
3. each rank accumulates local sums over its slice on the *unwrapped* module, with no per-batch collective;
4. one sum-reduction of ``(local sum, local count)`` completes each product
   (:class:`~lightning_influence.operators.CurvatureOperator` does exactly that when given a ``reduce_fn``).

Every rank must make the same sequence of reductions, including a rank with an empty shard, which contributes
zeros. The helpers here are plain PyTorch (no Lightning import); the callbacks build their ``reduce_fn`` from the
Trainer's strategy (:func:`lightning_influence.callbacks._common.make_reduce_fn`), and
:func:`torch_distributed_reducer` serves plain ``torch.distributed`` programs.

Example::

    >>> idx = global_sample_indices(10, 7, seed=0)   # identical on every rank
    >>> [len(shard_indices(idx, r, 2)) for r in range(2)]
    [4, 3]
    >>> torch.equal(torch.cat([shard_indices(idx, r, 2) for r in range(2)]), idx)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_influence.exceptions import ConfigurationError
from lightning_influence.params import make_generator

#: Sums a flat tensor over the data-parallel ranks (every rank calls it with a tensor of the same shape).
ReduceFn = Callable[[Tensor], Tensor]

__all__ = [
    "CountingReducer",
    "ReduceFn",
    "ShardSpec",
    "global_sample_indices",
    "make_shard",
    "reduce_packed",
    "reduce_sum_and_count",
    "shard_indices",
    "shard_sizes",
    "sum_reducer",
    "torch_distributed_reducer",
]

ShardMode = Literal["contiguous", "strided"]


def global_sample_indices(n: int, size: int | None = None, seed: int = 0) -> Tensor:
    """Draw ``size`` distinct indices from ``range(n)`` with a seeded generator, identically on every rank.

    The draw depends only on ``(n, size, seed)``: never on the global RNG, the rank or the world size. The result
    is sorted, so it describes a set (the order of the examples does not change a sum).

    Args:
        n: Number of examples to draw from (the dataset size).
        size: Sample size; ``None`` takes every example (``arange(n)``, no draw).
        seed: Seed of the dedicated generator.

    Returns:
        A sorted ``int64`` tensor of ``size`` distinct indices.

    Raises:
        ConfigurationError: If ``n < 1``, ``size < 1`` or ``size > n`` (sampling is without replacement).

    Example::

        >>> global_sample_indices(5, 3, seed=1).tolist() == global_sample_indices(5, 3, seed=1).tolist()
        True
        >>> global_sample_indices(4).tolist()
        [0, 1, 2, 3]
    """
    if n < 1:
        raise ConfigurationError(f"cannot draw a sample from an empty dataset (n={n}).")
    if size is None:
        return torch.arange(n, dtype=torch.int64)
    if size < 1:
        raise ConfigurationError(f"sample size must be >= 1, got {size}.")
    if size > n:
        raise ConfigurationError(
            f"sample size {size} is larger than the dataset ({n} examples); sampling is without replacement, so "
            f"pass a sample size <= {n}."
        )
    perm = torch.randperm(n, generator=make_generator(seed), dtype=torch.int64)
    return torch.sort(perm[:size]).values


def shard_sizes(total: int, world_size: int) -> list[int]:
    """Sizes of the contiguous shards of ``total`` items over ``world_size`` ranks (first ranks get one more).

    Returns:
        One size per rank, summing to ``total``.

    Raises:
        ConfigurationError: For ``world_size < 1``.

    Example::

        >>> shard_sizes(7, 2), shard_sizes(1, 3)
        ([4, 3], [1, 0, 0])
    """
    if world_size < 1:
        raise ConfigurationError(f"world_size must be >= 1, got {world_size}.")
    base, extra = divmod(total, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def shard_indices(indices: Tensor, rank: int, world_size: int, mode: ShardMode = "contiguous") -> Tensor:
    """This rank's slice of the global ``indices``: no padding, no duplicates, possibly empty.

    The slices of all ranks partition ``indices`` exactly.

    Args:
        indices: The global sample (from :func:`global_sample_indices`), identical on every rank.
        rank: This process's global rank (``trainer.distributed_sampler_kwargs["rank"]``).
        world_size: Number of data-parallel replicas (``...["num_replicas"]``).
        mode: ``"contiguous"``: consecutive blocks, sizes from :func:`shard_sizes`; ``"strided"``:
            ``indices[rank::world_size]`` (what an unrepeated distributed sampler yields).

    Returns:
        The 1-D slice for ``rank`` (a view or copy of ``indices``; empty when ``rank >= len(indices)``).

    Raises:
        ConfigurationError: For ``world_size < 1``, ``rank`` outside ``[0, world_size)``, a non 1-D ``indices`` or
            an unknown ``mode``.

    Example::

        >>> shard_indices(torch.arange(7), 1, 2).tolist(), shard_indices(torch.arange(7), 1, 2, "strided").tolist()
        ([4, 5, 6], [1, 3, 5])
    """
    if world_size < 1:
        raise ConfigurationError(f"world_size must be >= 1, got {world_size}.")
    if not 0 <= rank < world_size:
        raise ConfigurationError(f"rank must be in [0, {world_size}), got {rank}.")
    if indices.ndim != 1:
        raise ConfigurationError(f"indices must be 1-D, got shape {tuple(indices.shape)}.")
    if mode == "contiguous":
        sizes = shard_sizes(len(indices), world_size)
        start = sum(sizes[:rank])
        return indices[start : start + sizes[rank]]
    if mode == "strided":
        return indices[rank::world_size]
    raise ConfigurationError(f"mode must be 'contiguous' or 'strided', got {mode!r}.")


@dataclass(frozen=True)
class ShardSpec:
    """One rank's share of a seeded global sample.

    Attributes:
        global_indices: The whole sample (identical on every rank).
        indices: This rank's slice of it.
        rank: This rank.
        world_size: Number of data-parallel replicas.
        seed: Seed of the draw.
        dataset_size: Size of the dataset the sample was drawn from.

    Example::

        >>> spec = make_shard(dataset_size=10, sample_size=7, seed=0, rank=1, world_size=2)
        >>> spec.global_size, spec.local_size
        (7, 3)
        >>> torch.equal(spec.indices, shard_indices(spec.global_indices, 1, 2))
        True
        >>> spec.to_dict()
        {'global_size': 7, 'local_size': 3, 'rank': 1, 'world_size': 2, 'seed': 0, 'dataset_size': 10}
    """

    global_indices: Tensor
    indices: Tensor
    rank: int
    world_size: int
    seed: int
    dataset_size: int

    @property
    def global_size(self) -> int:
        """Examples in the whole sample."""
        return len(self.global_indices)

    @property
    def local_size(self) -> int:
        """Examples on this rank (may be 0)."""
        return len(self.indices)

    def to_dict(self) -> dict[str, Any]:
        """Plain description (for reports and checkpoints): sizes, rank, seed; not the indices themselves."""
        return {
            "global_size": self.global_size,
            "local_size": self.local_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
        }


def make_shard(
    dataset_size: int,
    sample_size: int | None,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    mode: ShardMode = "contiguous",
) -> ShardSpec:
    """Draw the global sample and take this rank's slice in one call.

    Returns:
        The shard description.

    Raises:
        ConfigurationError: As :func:`global_sample_indices` and :func:`shard_indices`.

    Example::

        >>> spec = make_shard(10, 7, seed=0, rank=1, world_size=2)
        >>> spec.global_size, spec.local_size
        (7, 3)
    """
    global_idx = global_sample_indices(dataset_size, sample_size, seed)
    local = shard_indices(global_idx, rank, world_size, mode)
    return ShardSpec(global_idx, local, rank, world_size, int(seed), int(dataset_size))


# ----------------------------------------------------------------------------------------------- reducers
def sum_reducer(all_reduce_sum: Callable[[Tensor], Tensor]) -> ReduceFn:
    """Wrap a collective that sums a tensor over ranks into a safe :data:`ReduceFn`.

    The input is cloned first (many collectives, e.g. Lightning's ``strategy.reduce``, work in place) and the
    shape of the result is checked.

    Args:
        all_reduce_sum: Returns the elementwise sum of its argument over all ranks (every rank calls it).

    Returns:
        A function usable as ``reduce_fn`` of the curvature operators.

    Example::

        >>> double = sum_reducer(lambda t: t * 2)   # a pretend 2-rank world where both ranks hold the same tensor
        >>> double(torch.ones(2))
        tensor([2., 2.])
    """

    def reduce(local: Tensor) -> Tensor:
        out = all_reduce_sum(local.detach().clone())
        if not isinstance(out, Tensor) or out.shape != local.shape:
            raise RuntimeError(
                f"the sum-reduction returned {type(out).__name__} of shape {getattr(out, 'shape', None)}, "
                f"expected a tensor of shape {tuple(local.shape)}."
            )
        return out

    return reduce


def torch_distributed_reducer(group: Any = None) -> ReduceFn | None:
    """A ``reduce_fn`` that all-reduces with ``torch.distributed`` (``None`` when not initialised or world 1).

    For plain PyTorch programs; Lightning users get theirs from the Trainer's strategy.

    Args:
        group: Process group (default: the world).

    Returns:
        The reducer, or ``None`` when there is nothing to reduce over.

    Example::

        >>> import torch.distributed as dist
        >>> dist.is_available() and dist.is_initialized()
        False
        >>> torch_distributed_reducer() is None   # no process group: a single process, nothing to reduce
        True
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return None

    def all_reduce(t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    return sum_reducer(all_reduce)


class CountingReducer:
    """Wrap a ``reduce_fn`` (or the identity) and count its calls: a check that every rank reduced once per product.

    Args:
        inner: The reducer to wrap; ``None`` means a single process (identity).

    Example::

        >>> r = CountingReducer()
        >>> _ = r(torch.ones(3)); r.calls
        1
    """

    def __init__(self, inner: ReduceFn | None = None) -> None:
        self.inner = inner
        self.calls = 0
        self.elements = 0

    def __call__(self, local: Tensor) -> Tensor:
        """Count, then reduce (or pass through)."""
        self.calls += 1
        self.elements += local.numel()
        return self.inner(local) if self.inner is not None else local


def reduce_packed(tensors: Sequence[Tensor | float], reduce_fn: ReduceFn | None) -> list[Tensor]:
    """Sum several tensors over ranks with ONE reduction: pack them flat, reduce, unpack to their shapes.

    This is the package's only cross-rank reduction of local sums; every sharded product, gradient, loss and score
    goes through it (or through :func:`reduce_sum_and_count`, built on it). Call it on every rank with tensors of
    the same shapes, also on a rank whose shard is empty (zeros).

    Args:
        tensors: Tensors (any shapes) or Python numbers; they are packed in the dtype and on the device of the first
            tensor (float64 on the CPU if there is none).
        reduce_fn: Sums a flat tensor over ranks (``None`` on one process: the values come back unchanged, possibly
            as the input tensors themselves).

    Returns:
        The reduced tensors, in order, with their original shapes (numbers come back as 0-d tensors).

    Example::

        >>> a, b = reduce_packed([torch.ones(2, 2), 3.0], sum_reducer(lambda t: 2 * t))  # a pretend 2-rank world
        >>> a.tolist(), float(b)
        ([[2.0, 2.0], [2.0, 2.0]], 6.0)
    """
    first = next((t for t in tensors if isinstance(t, Tensor)), None)
    dtype = first.dtype if first is not None else torch.float64
    device = first.device if first is not None else torch.device("cpu")
    parts = [torch.as_tensor(t, dtype=dtype).to(device) if not isinstance(t, Tensor) else t for t in tensors]
    if reduce_fn is None:  # one process: nothing to sum, so no packing copy (a result may share the input's memory)
        return [t.detach().to(device=device, dtype=dtype) for t in parts]
    flat = reduce_fn(torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in parts]))
    out, offset = [], 0
    for t in parts:
        out.append(flat[offset : offset + t.numel()].reshape(t.shape))
        offset += t.numel()
    return out


def reduce_sum_and_count(
    local_sum: Tensor, local_count: float | Tensor, reduce_fn: ReduceFn | None
) -> tuple[Tensor, float]:
    """Complete a sharded sum with one reduction of ``(sum, count)``; call it on every rank, even with count 0.

    Args:
        local_sum: This rank's sum (any shape; zeros for an empty shard).
        local_count: This rank's number of units.
        reduce_fn: Sums a flat tensor over ranks (``None`` on one process).

    Returns:
        ``(global_sum, global_count)``.

    Example::

        >>> reduce_sum_and_count(torch.tensor([2.0, 4.0]), 2, None)
        (tensor([2., 4.]), 2.0)
    """
    total, count = reduce_packed([local_sum, local_count], reduce_fn)
    return total, float(count)
