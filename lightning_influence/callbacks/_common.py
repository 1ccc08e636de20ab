"""What every lightning_influence callback needs from the Trainer, in one rank-safe place.

* :class:`MisconfigurationError`: the callbacks' error type (a Lightning ``MisconfigurationException`` and a
  :class:`~lightning_influence.exceptions.ConfigurationError`, hence a ``ValueError``).
* :func:`check_strategy`: single device and the DDP family are supported; anything else raises, naming them.
* :func:`rank_world`: ``(rank, world_size)`` of the data-parallel group, from ``trainer.distributed_sampler_kwargs``
  (not ``trainer.world_size``, which ModelParallelStrategy sets to its data-parallel mesh).
* :func:`make_reduce_fn`: the sum-reduction that completes a sharded curvature product (``None`` on one process).
* :func:`unwrap_module`: the LightningModule itself, never the DDP wrapper (higher-order autograd and DDP hooks
  do not mix).
* :func:`resolve_data` / :func:`resolve_dataset`: the map-style dataset (and collate function) behind the
  Trainer's train or val dataloader, or a dataset the user passed.
* :func:`output_dir`: a directory resolved identically on every rank, created on rank 0, then a barrier.
* :func:`log_scalars`: scalars to every attached logger on rank 0, mirrored on every rank into
  ``trainer.callback_metrics`` (the only channel besides weights that survives ``ddp_spawn``).

Rank-safety contract: every function here that runs a collective (:func:`output_dir`, the function returned by
:func:`make_reduce_fn`) must be called on **all** ranks in the same order; side effects (files, logger calls) happen
on rank 0 only.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_influence.distributed import ReduceFn, sum_reducer
from lightning_influence.exceptions import ConfigurationError

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "SUPPORTED_STRATEGIES",
    "MisconfigurationError",
    "ResolvedData",
    "check_strategy",
    "log_scalars",
    "make_reduce_fn",
    "output_dir",
    "rank_world",
    "resolve_data",
    "resolve_dataset",
    "unwrap_module",
    "warn_no_logger",
]

#: Strategies the callbacks support (curvature work is sharded data-parallel over the unwrapped module).
SUPPORTED_STRATEGIES: tuple[str, ...] = ("single_device", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")

# Strategies that subclass a supported one but shard or compile the model: not supported.
_REJECTED_STRATEGY_NAMES = ("DeepSpeedStrategy", "XLAStrategy", "SingleDeviceXLAStrategy", "FSDPStrategy",
                            "ModelParallelStrategy")


class MisconfigurationError(MisconfigurationException, ConfigurationError):
    """A callback argument does not fit the Trainer, model or data; the message names the argument and the fix.

    Subclasses Lightning's ``MisconfigurationException`` and
    :class:`~lightning_influence.exceptions.ConfigurationError` (a ``ValueError``).

    Example::

        >>> from lightning.fabric.utilities.exceptions import MisconfigurationException
        >>> try:
        ...     raise MisconfigurationError("dataset must be 'train', 'val' or a Dataset")
        ... except ValueError as e:
        ...     print(type(e).__name__, isinstance(e, (MisconfigurationException, ConfigurationError)))
        MisconfigurationError True
    """


# ------------------------------------------------------------------------------------------- strategies
def check_strategy(trainer: pl.Trainer, who: str) -> None:
    """Raise unless the Trainer runs on a single device or with a DDP-family strategy.

    Args:
        trainer: The Trainer.
        who: The callback's name, for the message.

    Raises:
        MisconfigurationError: For FSDP, DeepSpeed, ModelParallel, XLA or any other strategy.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> check_strategy(trainer, "InfluenceReport")   # single device: fine
        >>> from types import SimpleNamespace
        >>> from lightning.pytorch.strategies import FSDPStrategy
        >>> try:
        ...     check_strategy(SimpleNamespace(strategy=FSDPStrategy()), "InfluenceReport")
        ... except MisconfigurationError as e:
        ...     print(str(e)[:59])
        InfluenceReport does not support the FSDPStrategy strategy:
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    mro_names = {cls.__name__ for cls in type(strategy).__mro__}
    rejected = mro_names.intersection(_REJECTED_STRATEGY_NAMES)
    if not rejected and isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return
    raise MisconfigurationError(
        f"{who} does not support the {type(strategy).__name__} strategy: it computes curvature products on the "
        "unwrapped module with every parameter present on every rank. Supported: "
        f"{', '.join(SUPPORTED_STRATEGIES)} (`strategy='auto'` on one device). Remove {who} from the callbacks or "
        "train with one of these strategies."
    )


def rank_world(trainer: pl.Trainer) -> tuple[int, int]:
    """``(rank, world_size)`` of the data-parallel group, from ``trainer.distributed_sampler_kwargs``.

    Returns:
        ``(0, 1)`` when the strategy reports no sampler kwargs (single device).

    Example::

        >>> import lightning.pytorch as pl
        >>> rank_world(pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        ...                       enable_progress_bar=False, enable_model_summary=False))
        (0, 1)
        >>> from types import SimpleNamespace   # what rank 1 of a 4-process DDP run reports
        >>> rank_world(SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 4, "rank": 1}))
        (1, 4)
    """
    kwargs = trainer.distributed_sampler_kwargs
    if not kwargs:
        return 0, 1
    return int(kwargs.get("rank", 0)), int(kwargs.get("num_replicas", 1))


def make_reduce_fn(trainer: pl.Trainer) -> ReduceFn | None:
    """The sum over data-parallel ranks that completes one sharded product, or ``None`` for a single process.

    Wraps ``trainer.strategy.reduce(t, reduce_op="sum")`` (an in-place ``all_reduce`` with ``ReduceOp.SUM``; gloo
    handles CPU tensors) in :func:`lightning_influence.distributed.sum_reducer`, which clones the input first.
    Every rank must call the returned function the same number of times.

    Returns:
        The reducer, or ``None`` when the world size is 1.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> make_reduce_fn(trainer) is None   # one process: nothing to reduce
        True
        >>> from types import SimpleNamespace   # a pretend 2-rank world where both ranks hold the same tensor
        >>> fake = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 0},
        ...                        strategy=SimpleNamespace(reduce=lambda t, reduce_op: t.mul_(2)))
        >>> x = torch.ones(3)
        >>> make_reduce_fn(fake)(x), x   # the input is cloned, never reduced in place
        (tensor([2., 2., 2.]), tensor([1., 1., 1.]))
    """
    _, world = rank_world(trainer)
    if world == 1:
        return None
    strategy = trainer.strategy

    def all_reduce_sum(t: Tensor) -> Tensor:
        out = strategy.reduce(t, reduce_op="sum")
        assert isinstance(out, Tensor)
        return out

    return sum_reducer(all_reduce_sum)


def unwrap_module(module: nn.Module) -> nn.Module:
    """The LightningModule (or plain module) under any DDP / DataParallel / Lightning forward wrapper.

    Curvature code must run on this module: its parameters are the ones being trained, and calling it bypasses the
    DDP hooks (which would otherwise run collectives per forward and do not support higher-order autograd).

    Returns:
        The innermost wrapped module.

    Example::

        >>> net = nn.Linear(2, 1)
        >>> unwrap_module(nn.DataParallel(net)) is net
        True
        >>> unwrap_module(net) is net
        True
    """
    seen = 0
    while seen < 10:
        seen += 1
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
            continue
        inner = getattr(module, "_forward_module", None)  # Lightning's _LightningModuleWrapperBase
        if isinstance(inner, nn.Module) and inner is not module:
            module = inner
            continue
        break
    return module


# ------------------------------------------------------------------------------------------------- data
@dataclass
class ResolvedData:
    """A map-style dataset with the collate function its dataloader used.

    Attributes:
        dataset: Indexable with ``len``.
        collate_fn: Collates a list of examples (``None``: ``torch.utils.data.default_collate``).
        source: Where it came from (``"train"``, ``"val"``, ``"user"``), for messages and reports.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> data = ResolvedData(TensorDataset(torch.arange(4.0)), None, "user")
        >>> len(data.dataset), data.collate_fn, data.source
        (4, None, 'user')
    """

    dataset: Any
    collate_fn: Callable[[list[Any]], Any] | None
    source: str


def _single_loader(loaders: Any, which: str, who: str) -> Any:
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence) and not hasattr(loaders, "dataset"):
        if len(loaders) != 1:
            raise MisconfigurationError(
                f"{who} found {len(loaders)} {which} dataloaders and cannot pick one; pass dataset=... explicitly."
            )
        loaders = loaders[0]
    return loaders


def _request_loader(trainer: pl.Trainer, which: str) -> Any:
    loaders = trainer.train_dataloader if which == "train" else trainer.val_dataloaders
    if loaders is not None:
        return loaders
    hook = "train_dataloader" if which == "train" else "val_dataloader"
    from lightning.pytorch.utilities.model_helpers import is_overridden

    dm = getattr(trainer, "datamodule", None)
    if dm is not None and is_overridden(hook, dm):
        return getattr(dm, hook)()
    module = trainer.lightning_module
    if module is not None and is_overridden(hook, module):
        return getattr(module, hook)()
    return None


def _is_map_style(dataset: Any) -> bool:
    from torch.utils.data import IterableDataset

    return (not isinstance(dataset, IterableDataset)) and hasattr(dataset, "__getitem__") and hasattr(
        dataset, "__len__"
    )


def resolve_data(trainer: pl.Trainer, which: Literal["train", "val"] | Any, who: str = "callback") -> ResolvedData:
    """The dataset (and collate function) to measure on.

    Args:
        trainer: The Trainer (its train/val dataloaders, or its datamodule's / module's dataloader hooks).
        which: ``"train"``, ``"val"`` or a map-style dataset (used as is with the default collate).
        who: The callback's name, for messages.

    Returns:
        The resolved dataset.

    Raises:
        MisconfigurationError: If no such dataloader exists, several exist, or the dataset is not map-style
            (indexable with a length); the message says to pass ``dataset=...``.

    Example::

        >>> from types import SimpleNamespace
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.arange(6.0))
        >>> trainer = SimpleNamespace(train_dataloader=DataLoader(ds, batch_size=2), val_dataloaders=None)
        >>> data = resolve_data(trainer, "train")
        >>> data.dataset is ds, data.source
        (True, 'train')
        >>> resolve_data(trainer, ds).source   # a dataset passed by the user is used as is
        'user'
        >>> import lightning.pytorch as pl
        >>> unfitted = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> try:
        ...     resolve_data(unfitted, "val", "PBRFValidation")
        ... except MisconfigurationError as e:
        ...     print(str(e)[:64])
        PBRFValidation needs the val data but the Trainer has no val dat
    """
    if not isinstance(which, str):
        if not _is_map_style(which):
            raise MisconfigurationError(
                f"{who}: dataset must be a map-style dataset (indexable, with len()), got {type(which).__name__}."
            )
        return ResolvedData(which, None, "user")
    if which not in ("train", "val"):
        raise MisconfigurationError(f"{who}: dataset must be 'train', 'val' or a Dataset, got {which!r}.")
    loader = _single_loader(_request_loader(trainer, which), which, who)
    if loader is None:
        raise MisconfigurationError(
            f"{who} needs the {which} data but the Trainer has no {which} dataloader; pass dataset=... "
            "(a map-style dataset) to the callback."
        )
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not _is_map_style(dataset):
        kind = type(dataset).__name__ if dataset is not None else type(loader).__name__
        raise MisconfigurationError(
            f"{who} needs a map-style dataset (indexable, with len()) behind the {which} dataloader, got {kind}; "
            "pass dataset=... (a map-style dataset) to the callback."
        )
    return ResolvedData(dataset, getattr(loader, "collate_fn", None), which)


def resolve_dataset(trainer: pl.Trainer, which: Literal["train", "val"] | Any, who: str = "callback") -> Any:
    """The map-style dataset behind ``which`` (see :func:`resolve_data`, which also returns the collate function).

    Returns:
        The dataset.

    Example::

        >>> from types import SimpleNamespace
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.arange(6.0))
        >>> trainer = SimpleNamespace(train_dataloader=None, val_dataloaders=[DataLoader(ds)])
        >>> resolve_dataset(trainer, "val") is ds
        True
    """
    return resolve_data(trainer, which, who).dataset


# -------------------------------------------------------------------------------------------- outputs
def output_dir(trainer: pl.Trainer, subdir: str = "influence") -> Path:
    """``<trainer.log_dir>/<subdir>`` (or under ``default_root_dir``), identical on every rank; call on ALL ranks.

    ``trainer.log_dir`` broadcasts rank 0's value, so calling this on one rank only would hang. The directory is
    created on rank 0, then all ranks meet at a barrier.

    Returns:
        The directory path.

    Example::

        >>> import tempfile
        >>> import lightning.pytorch as pl
        >>> root = tempfile.mkdtemp()
        >>> trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
        >>> path = output_dir(trainer)   # no logger: under default_root_dir
        >>> path == Path(root) / "influence", path.is_dir()
        (True, True)
        >>> import shutil; shutil.rmtree(root)
    """
    base = trainer.log_dir
    if base is None:
        base = trainer.strategy.broadcast(trainer.default_root_dir)
    path = Path(base) / subdir if subdir else Path(base)
    if trainer.is_global_zero:
        path.mkdir(parents=True, exist_ok=True)
    trainer.strategy.barrier("lightning_influence.output_dir")
    return path


_WARNED_NO_LOGGER: weakref.WeakSet[Any] = weakref.WeakSet()


def warn_no_logger(trainer: pl.Trainer, who: str = "lightning_influence") -> bool:
    """Warn (once per Trainer, rank 0) when no logger is attached; :func:`log_scalars` then only mirrors.

    Args:
        trainer: The Trainer.
        who: The callback's name, for the message.

    Returns:
        ``True`` if the Trainer has no logger.

    Example::

        >>> import warnings
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_no_logger(trainer, "InfluenceReport"), warn_no_logger(trainer, "InfluenceReport")
        (True, True)
        >>> len(caught)   # once per Trainer
        1
        >>> print(str(caught[0].message)[:57])
        InfluenceReport: no logger is attached to the Trainer, so
    """
    if trainer.loggers:
        return False
    if trainer not in _WARNED_NO_LOGGER:
        _WARNED_NO_LOGGER.add(trainer)
        rank_zero_warn(
            f"{who}: no logger is attached to the Trainer, so its scalars are only available in "
            "`trainer.callback_metrics`. Pass `logger=TensorBoardLogger(...)` (or another logger) to the Trainer to "
            "see them as curves.",
            category=UserWarning,
        )
    return True


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Log scalars to every attached logger (rank 0) and mirror them into ``trainer.callback_metrics`` (all ranks).

    Call with the same, already reduced values on every rank. Usable from any hook, including ``on_train_end``
    (where ``pl_module.log`` is forbidden). Without a logger the values are still mirrored, and a warning is issued
    once per Trainer.

    Args:
        trainer: The Trainer.
        metrics: ``name -> value``; names such as ``"curvature/trace"``.
        step: The step to log at (normally ``trainer.global_step``).

    Example::

        >>> import warnings
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")   # the one-time "no logger is attached" warning
        ...     log_scalars(trainer, {"curvature/trace": 2.5}, step=0)
        >>> trainer.callback_metrics["curvature/trace"]
        tensor(2.5000, dtype=torch.float64)
    """
    values = {k: float(v) for k, v in metrics.items()}
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
    warn_no_logger(trainer)
    trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()})
