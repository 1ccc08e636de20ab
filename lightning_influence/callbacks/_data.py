"""The map-style dataset behind a Trainer's dataloader, resolved the same way in ``setup`` and at measurement time.

Part of the shared callback plumbing (:mod:`lightning_influence.callbacks._common` re-exports every name here):
:class:`ResolvedData`, :func:`resolve_data`, :func:`resolve_dataset`, :func:`check_data_available` and
:func:`check_model_on_data` (one tiny forward pass in ``on_train_start``: dtype mismatch, labels out of range).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from lightning_influence.callbacks._checks import MisconfigurationError, _is_map_style
from lightning_influence.params import isolated_rng

if TYPE_CHECKING:
    from lightning_influence.tasks import Task

if TYPE_CHECKING:
    import lightning.pytorch as pl


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


def check_data_available(trainer: pl.Trainer, which: Literal["train", "val"] | Any, who: str) -> bool:
    """Check in ``setup`` what :func:`resolve_data` will find later: raise now for data that cannot be used.

    The Trainer's dataloaders are not attached yet in ``setup``; this runs :func:`resolve_data`'s own path, which then
    calls the datamodule's or the module's ``*_dataloader`` hook (under :func:`isolated_rng`), and checks that there
    is one map-style dataset behind it. When no loader is reachable yet the check cannot decide: dataloaders passed
    to ``trainer.fit(...)`` directly are only attached when the fit loop starts. Then it returns ``False`` and the
    caller checks again with :func:`resolve_data` in ``on_train_start``, still before the first training step. A
    hook that fails for another reason (e.g. it needs ``LightningModule.setup``, which runs after the callbacks')
    also defers the check.

    Returns:
        ``True`` if the data were found and are usable, ``False`` if the check has to wait for ``on_train_start``.

    Raises:
        MisconfigurationError: If the loader found has several dataloaders or no map-style dataset behind it.

    Example::

        >>> from types import SimpleNamespace
        >>> from torch.utils.data import DataLoader, IterableDataset, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.arange(4.0)))
        >>> check_data_available(SimpleNamespace(train_dataloader=loader), "train", "InfluenceReport")
        True
        >>> no_val = SimpleNamespace(val_dataloaders=None, datamodule=None, lightning_module=None)
        >>> check_data_available(no_val, "val", "InfluenceReport")   # maybe passed to fit(): ask again later
        False
        >>> class Stream(IterableDataset):
        ...     def __iter__(self):
        ...         return iter([])
        >>> try:
        ...     check_data_available(SimpleNamespace(train_dataloader=DataLoader(Stream())), "train", "InfluenceReport")
        ... except MisconfigurationError as e:
        ...     print(str(e)[:56])
        InfluenceReport needs a map-style dataset (indexable, wi
    """
    if not isinstance(which, str):
        resolve_data(trainer, which, who)  # a user dataset: checked as is
        return True
    try:
        with isolated_rng():
            if _request_loader(trainer, which) is None:
                if _fit_source_defined(trainer, which) is False:
                    raise MisconfigurationError(
                        f"{who} needs the {which} data but the Trainer has no {which} dataloader (none passed to "
                        f"fit(), no {which}_dataloader hook); pass dataset=... (a map-style dataset) to the callback "
                        f"or add a {which} dataloader."
                    )
                return False
            resolve_data(trainer, which, who)
    except MisconfigurationError:
        raise
    except Exception:  # a dataloader hook that cannot run yet: resolve_data runs again when the data are needed
        return False
    return True


def _fit_source_defined(trainer: Any, which: str) -> bool | None:
    """Whether ``trainer.fit(...)`` was given a ``which`` loader source (``None``: cannot tell, e.g. not fitting)."""
    try:
        loop = trainer.fit_loop if which == "train" else trainer.fit_loop.epoch_loop.val_loop
        source = loop._data_source
    except AttributeError:
        return None
    if source.instance is None:
        return False
    return bool(source.is_defined())


def _floating_dtypes(obj: Any) -> set[torch.dtype]:
    if isinstance(obj, Tensor):
        return {obj.dtype} if obj.is_floating_point() else set()
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return set().union(*(_floating_dtypes(o) for o in obj)) if obj else set()
    return set()


def _all_targets(dataset: Any) -> Tensor | None:
    """Every target of a dataset when they are at hand without loading examples (TensorDataset, ``.targets``)."""
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, tuple) and tensors and isinstance(tensors[-1], Tensor):
        return tensors[-1]
    targets = getattr(dataset, "targets", None)
    return torch.as_tensor(targets) if isinstance(targets, (Tensor, list)) else None


def check_model_on_data(module: nn.Module, task: Task, data: ResolvedData, who: str) -> None:
    """One forward pass of the task on two examples, before any measurement: raise on what would fail later.

    Catches a dtype mismatch between the model's parameters and the data (the callbacks feed batches to the model
    as they come, even if ``training_step`` casts them) and class labels outside the model's outputs (all labels
    of a ``TensorDataset`` / a dataset with ``.targets``, else those of the probe batch). Call it in
    ``on_train_start`` (after the strategy has moved and cast the model), so it costs nothing measurable.

    Raises:
        MisconfigurationError: Naming the data, the mismatch and the fix.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence.tasks import Classification
        >>> data = ResolvedData(TensorDataset(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3])),
        ...                     None, "train")
        >>> try:
        ...     check_model_on_data(torch.nn.Linear(3, 3), Classification(), data, "InfluenceReport")
        ... except MisconfigurationError as e:
        ...     print(str(e)[:74])
        InfluenceReport: the train data are torch.float64 but the model's paramete
    """
    from lightning_influence.evaluator import Evaluator, curvature_mode
    from lightning_influence.losses import SoftmaxCrossEntropy

    n = len(data.dataset)
    params = [p for p in module.parameters() if p.requires_grad]
    if n == 0 or not params:
        return
    collate = data.collate_fn or torch.utils.data.default_collate
    with isolated_rng():
        batch = collate([data.dataset[i] for i in range(min(n, 2))])
    dtype = params[0].dtype
    mismatch = sorted(str(d) for d in _floating_dtypes(batch) if d != dtype)
    try:
        ev = Evaluator(module, task)
        with torch.no_grad(), curvature_mode(module):
            out, _ = ev.outputs(ev.prepare(batch))
    except Exception as err:
        if mismatch:
            raise MisconfigurationError(
                f"{who}: the {data.source} data are {', '.join(mismatch)} but the model's parameters are {dtype}, "
                f"and the model fails on them ({type(err).__name__}); cast the data to the model's dtype (e.g. "
                f"TensorDataset(x.to({dtype}), y)) or the model to the data's (model.to(...), or "
                "Trainer(precision='64-true') for float64)."
            ) from err
        raise MisconfigurationError(
            f"{who}: task={task!r} does not fit the {data.source} batches ({type(err).__name__}: {err}). Pass a task "
            "whose split()/outputs() match this data (subclass the task for custom batch formats)."
        ) from err
    loss = task.loss
    labels = _all_targets(data.dataset)
    if isinstance(loss, SoftmaxCrossEntropy) and labels is not None and not labels.is_floating_point():
        k = out.shape[-1]
        valid = labels[labels != loss.ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= k):
            raise MisconfigurationError(
                f"{who}: the {data.source} labels span [{int(valid.min())}, {int(valid.max())}] but the model has "
                f"{k} outputs, so labels must lie in [0, {k}) (or equal ignore_index={loss.ignore_index}); fix the "
                "labels or the model's output layer."
            )
