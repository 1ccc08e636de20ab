"""What every lightning_influence callback needs from the Trainer, in one rank-safe place.

Arguments (``__init__``), all raising :class:`MisconfigurationError` as ``"<Callback>: <arg> must be ..., got ...;
<fix>"``:

* :func:`check_task`, :func:`check_int`, :func:`check_number`, :func:`check_damping`, :func:`check_choice`,
  :func:`check_dataset`;
* :func:`resolve_config`: a callback's typed config (:mod:`lightning_influence.config`) with the explicit keyword
  arguments that are not ``None`` applied on top; :func:`config_field` exposes one of its fields as a read-only
  attribute (``monitor.trace_probes`` is ``monitor.config.trace_probes``).

The Trainer (``setup`` and the hooks):

* :class:`MisconfigurationError`: the callbacks' error type (a Lightning ``MisconfigurationException`` and a
  :class:`~lightning_influence.exceptions.ConfigurationError`, hence a ``ValueError``).
* :func:`check_strategy`: single device and the DDP family are supported; anything else raises, naming them.
* :class:`RunContext`: the run preamble of every measurement in one object (unwrapped module, rank, world size,
  ``reduce_fn``, strategy, step), built by :meth:`RunContext.from_trainer`; its :meth:`RunContext.source` turns
  resolved data and a global sample into a :class:`~lightning_influence.data.DataSource` sharded over the ranks.
* :func:`rank_world`, :func:`make_reduce_fn`, :func:`unwrap_module`: the pieces :class:`RunContext` is built from.
* :func:`resolve_data` / :func:`resolve_dataset`: the map-style dataset (and collate function) behind the
  Trainer's train or val dataloader, or a dataset the user passed; :func:`check_data_available` runs the same
  resolution in ``setup`` (when the dataloaders may not be attached yet) and only checks that the data exist.
* :func:`sample_indices`: a seeded subset of ``range(n)``, identical on every rank.
* :func:`find_callback`: a companion callback by type, optionally required to come before this one.
* :func:`isolated_rng`: :func:`lightning_influence.params.isolated_rng` (the one RNG-isolation context).

Outputs:

* :func:`publish`: log the scalars, resolve the output directory on every rank, write a report section on rank 0,
  then an unconditional barrier; built on :func:`log_scalars` (scalars to every logger on rank 0, mirrored on every
  rank into ``trainer.callback_metrics``, the only channel besides weights that survives ``ddp_spawn``) and
  :func:`output_dir` (a directory resolved identically on every rank, created on rank 0, then a barrier).

Rank-safety contract: every function here that runs a collective (:func:`publish`, :func:`output_dir`, the function
returned by :func:`make_reduce_fn`) must be called on **all** ranks in the same order; side effects (files, logger
calls) happen on rank 0 only.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_influence.callbacks._checks import (
    MisconfigurationError,
    check_choice,
    check_damping,
    check_dataset,
    check_int,
    check_listed_once,
    check_number,
    check_picklable_datasets,
    check_same_parameters,
    check_task,
    config_field,
    resolve_config,
)
from lightning_influence.callbacks._data import (
    ResolvedData,
    check_data_available,
    check_model_on_data,
    resolve_data,
    resolve_dataset,
)
from lightning_influence.data import CollateFn, DataSource
from lightning_influence.distributed import ReduceFn, global_sample_indices, sum_reducer
from lightning_influence.params import derive_seed, isolated_rng

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

__all__ = [
    "SUPPORTED_STRATEGIES",
    "MisconfigurationError",
    "ResolvedData",
    "RunContext",
    "check_before_training",
    "check_choice",
    "check_damping",
    "check_data_available",
    "check_dataset",
    "check_int",
    "check_listed_once",
    "check_model_on_data",
    "check_number",
    "check_picklable_datasets",
    "check_same_parameters",
    "check_strategy",
    "check_task",
    "config_field",
    "find_callback",
    "isolated_rng",
    "log_scalars",
    "make_reduce_fn",
    "output_dir",
    "publish",
    "rank_world",
    "require_influence_report",
    "resolve_config",
    "resolve_data",
    "resolve_dataset",
    "sample_indices",
    "unwrap_module",
    "warn_no_logger",
]

#: Strategies the callbacks support (curvature work is sharded data-parallel over the unwrapped module).
SUPPORTED_STRATEGIES: tuple[str, ...] = ("single_device", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")

# Strategies that subclass a supported one but shard or compile the model: not supported.
_REJECTED_STRATEGY_NAMES = ("DeepSpeedStrategy", "XLAStrategy", "SingleDeviceXLAStrategy", "FSDPStrategy",
                            "ModelParallelStrategy")


# ------------------------------------------------------------------------------------------- strategies
def check_strategy(trainer: pl.Trainer, who: str) -> None:
    """Raise unless the Trainer runs on a single device or with a DDP-family strategy (and ``who`` is listed once).

    Args:
        trainer: The Trainer.
        who: The callback's name, for the message.

    Raises:
        MisconfigurationError: For FSDP, DeepSpeed, ModelParallel, XLA or any other strategy, or a callback listed
            twice (:func:`check_listed_once`).

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

    check_listed_once(getattr(trainer, "callbacks", ()), who)
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


def check_before_training(
    trainer: pl.Trainer, pl_module: pl.LightningModule, owner: Any, task: Any, datasets: Sequence[Any], who: str,
) -> None:
    """``on_train_start`` checks of a callback: the model on each of its ``datasets`` (:func:`check_model_on_data`).

    Runs after the strategy has moved and cast the model, before the first step; also forgets the trainable
    parameter signature of a previous fit (:func:`check_same_parameters` stores it at the first measurement).

    Raises:
        MisconfigurationError: From :func:`resolve_data` or :func:`check_model_on_data`.

    Example::

        >>> from types import SimpleNamespace
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence.tasks import Regression
        >>> data = TensorDataset(torch.randn(3, 2), torch.randn(3, 1))
        >>> check_before_training(SimpleNamespace(), torch.nn.Linear(2, 1), object(), Regression(), [data], "X")
    """
    if hasattr(owner, "__dict__"):
        owner._param_signature = None
    module = unwrap_module(pl_module)
    with isolated_rng():
        for which in datasets:
            check_model_on_data(module, task, resolve_data(trainer, which, who), who)


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


@dataclass(frozen=True)
class RunContext:
    """The run preamble of one measurement: what every callback needs from the Trainer, taken once.

    Building it runs no collective; :attr:`reduce_fn` does (call it the same number of times on every rank).

    Attributes:
        trainer: The Trainer.
        module: The unwrapped LightningModule (never the DDP wrapper).
        rank: Data-parallel rank (:func:`rank_world`).
        world_size: Data-parallel world size.
        reduce_fn: The sum over ranks (:func:`make_reduce_fn`; ``None`` on one process).
        strategy: ``trainer.strategy``.
        who: The callback's name, for messages.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> ctx = RunContext.from_trainer(trainer, nn.Linear(2, 1), "InfluenceReport")
        >>> ctx.rank, ctx.world_size, ctx.reduce_fn, ctx.step
        (0, 1, None, 0)
        >>> from torch.utils.data import TensorDataset
        >>> data = ResolvedData(TensorDataset(torch.arange(5.0)), None, "user")
        >>> ctx.source(data, [4, 0, 2], batch_size=2).local_indices.tolist()
        [4, 0, 2]
    """

    trainer: pl.Trainer
    module: nn.Module
    rank: int
    world_size: int
    reduce_fn: ReduceFn | None
    strategy: Any
    who: str

    @classmethod
    def from_trainer(cls, trainer: pl.Trainer, pl_module: nn.Module, who: str) -> RunContext:
        """Unwrap the module and read rank, world size, reducer and strategy from the Trainer.

        Returns:
            The context.
        """
        rank, world = rank_world(trainer)
        return cls(trainer, unwrap_module(pl_module), rank, world, make_reduce_fn(trainer), trainer.strategy, who)

    @property
    def step(self) -> int:
        """``trainer.global_step`` (the step every scalar of this run is logged at)."""
        return int(self.trainer.global_step)

    def resolve(self, which: Literal["train", "val"] | Any) -> ResolvedData:
        """:func:`resolve_data` for this callback.

        Returns:
            The resolved dataset.
        """
        return resolve_data(self.trainer, which, self.who)

    def source(
        self, data: ResolvedData, indices: Sequence[int] | Tensor | None = None, *, batch_size: int,
        shard: bool = True, collate_fn: CollateFn | None = None,
    ) -> DataSource:
        """A :class:`~lightning_influence.data.DataSource` over a global sample of ``data``, sharded over the ranks.

        Args:
            data: The resolved dataset.
            indices: The global sample (identical on every rank; default every example).
            batch_size: Examples per batch.
            shard: Take this rank's slice (default); ``False`` keeps the whole sample on every rank.
            collate_fn: Override of the dataset's collate function.

        Returns:
            The source (nothing collated until :meth:`DataSource.batches`).
        """
        rank, world = (self.rank, self.world_size) if shard else (0, 1)
        return DataSource(data.dataset, indices, batch_size=batch_size, collate_fn=collate_fn or data.collate_fn,
                          rank=rank, world_size=world)


def sample_indices(n: int, size: int | None, seed: int, *tags: object) -> Tensor:
    """A seeded, sorted subset of ``size`` of ``range(n)`` (all of it when ``size`` is ``None`` or ``>= n``).

    Identical on every rank. ``tags`` name the purpose of the draw (:func:`~lightning_influence.params.derive_seed`),
    so two draws from one user seed are independent; without tags the seed is used as is.

    Returns:
        ``int64`` data-set indices.

    Example::

        >>> sample_indices(5, None, 0).tolist(), sample_indices(5, 9, 0).tolist()
        ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
        >>> torch.equal(sample_indices(100, 3, 0, "queries"), sample_indices(100, 3, 0, "queries"))
        True
    """
    clipped = None if size is None or size >= n else size
    return global_sample_indices(n, clipped, derive_seed(seed, *tags) if tags else seed)


def find_callback(trainer: pl.Trainer, cls: type[Callback], *, before: Callback | None = None) -> Any:
    """The first callback in ``trainer.callbacks`` that is a ``cls``, or ``None``.

    Args:
        trainer: The Trainer.
        cls: The companion callback's class.
        before: This callback, if the companion must run first: both use the same hook and Lightning calls them in
            list order, so a companion after ``before`` raises.

    Returns:
        The companion callback, or ``None`` if there is none.

    Raises:
        MisconfigurationError: If ``before`` is given and the companion comes after it.

    Example::

        >>> from types import SimpleNamespace
        >>> from lightning.pytorch.callbacks import Callback, LearningRateMonitor
        >>> me, other = Callback(), LearningRateMonitor()
        >>> find_callback(SimpleNamespace(callbacks=[other, me]), LearningRateMonitor, before=me) is other
        True
        >>> try:
        ...     find_callback(SimpleNamespace(callbacks=[me, other]), LearningRateMonitor, before=me)
        ... except MisconfigurationError as e:
        ...     print(str(e)[:54])
        Callback comes before LearningRateMonitor in callbacks
    """
    callbacks = list(getattr(trainer, "callbacks", []))
    found = next((i for i, cb in enumerate(callbacks) if isinstance(cb, cls)), None)
    if found is None:
        return None
    me = next((i for i, cb in enumerate(callbacks) if cb is before), None) if before is not None else None
    if me is not None and found > me:
        who, name = type(before).__name__, cls.__name__
        raise MisconfigurationError(
            f"{who} comes before {name} in callbacks, so {name}'s results would not exist yet when it runs (both "
            f"use on_train_end): add {name}(...) before {who} in callbacks."
        )
    return callbacks[found]


# -------------------------------------------------------------------------------------------- outputs
def require_influence_report(trainer: pl.Trainer, callback: Callback, who: str, uses: str) -> Any:
    """The Trainer's ``InfluenceReport``, which must come before ``callback`` (its scores are what ``who`` uses).

    Returns:
        The ``InfluenceReport``.

    Raises:
        MisconfigurationError: If there is none (``"<who> <uses> but the Trainer has no InfluenceReport: add ..."``),
            or it comes after ``callback``.

    Example::

        >>> from types import SimpleNamespace
        >>> try:
        ...     require_influence_report(SimpleNamespace(callbacks=[]), object(), "PBRFValidation",
        ...                              "validates InfluenceReport's scores")
        ... except MisconfigurationError as e:
        ...     print(str(e)[:60])
        PBRFValidation validates InfluenceReport's scores but the Tr
    """
    from lightning_influence.callbacks.influence_report import InfluenceReport

    report = find_callback(trainer, InfluenceReport, before=callback)  # raises if it comes after the callback
    if report is None:
        raise MisconfigurationError(
            f"{who} {uses} but the Trainer has no InfluenceReport: add InfluenceReport(...) before {who} in callbacks."
        )
    return report


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


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int, who: str = "lightning_influence") -> None:
    """Log scalars to every attached logger (rank 0) and mirror them into ``trainer.callback_metrics`` (all ranks).

    Call with the same, already reduced values on every rank. Usable from any hook, including ``on_train_end``
    (where ``pl_module.log`` is forbidden). Without a logger the values are still mirrored, and a warning is issued
    once per Trainer.

    Args:
        trainer: The Trainer.
        metrics: ``name -> value``; names such as ``"curvature/trace"``.
        step: The step to log at (normally ``trainer.global_step``).
        who: The callback's name, for the one-time "no logger" warning.

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
    warn_no_logger(trainer, who)
    trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()})


def publish(
    trainer: pl.Trainer,
    *,
    step: int,
    metrics: Mapping[str, float] | None = None,
    subdir: str = "influence",
    section: str | None = None,
    content: Callable[[Path | None], Mapping[str, Any] | None] | None = None,
    who: str = "lightning_influence",
) -> Path | None:
    """Publish one result; call on ALL ranks, with the same ``metrics`` names and ``section``.

    In this order, identical on every rank (style rule 7):

    1. :func:`log_scalars` (logger calls on rank 0, ``callback_metrics`` on every rank);
    2. :func:`output_dir` when a ``section`` is written (``trainer.log_dir`` broadcasts; then a barrier);
    3. on rank 0 only: ``content(directory)``, which may log media or write files and returns the section's data
       (``None``: write nothing), merged into ``report.json`` / ``report.html`` by
       :class:`~lightning_influence.reporting.ReportStore`;
    4. an unconditional barrier, so no rank reads the report before it is written.

    Args:
        trainer: The Trainer.
        step: The step to log at.
        metrics: Scalars, already reduced (the same on every rank).
        subdir: Report directory under the log dir.
        section: Report section to write (``None``: no report; ``content`` still runs, with ``None``).
        content: Rank-0 side effects returning the section's data.
        who: The callback's name, for the one-time "no logger" warning.

    Returns:
        The report directory (``None`` when no section is written).

    Example::

        >>> import tempfile, warnings
        >>> import lightning.pytorch as pl
        >>> root = tempfile.mkdtemp()
        >>> trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")   # no logger attached
        ...     path = publish(trainer, step=0, metrics={"cv/approx_loss": 0.5}, section="cv",
        ...                    content=lambda d: {"estimate": {"approx": 0.5}})
        >>> import json; json.loads((path / "report.json").read_text())["cv"]
        {'estimate': {'approx': 0.5}}
        >>> float(trainer.callback_metrics["cv/approx_loss"])
        0.5
        >>> import shutil; shutil.rmtree(root)
    """
    if metrics:
        log_scalars(trainer, metrics, step, who)
    directory = output_dir(trainer, subdir) if section is not None else None  # collective: all ranks
    if trainer.is_global_zero and content is not None:
        data = content(directory)
        if data is not None and directory is not None and section is not None:
            from lightning_influence.reporting import ReportStore

            ReportStore(directory).update(section, data)
    trainer.strategy.barrier(f"lightning_influence.publish.{section or 'media'}")
    return directory
