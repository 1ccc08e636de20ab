"""Argument checks of the callbacks: every message reads ``"<Callback>: <arg> must be ..., got ...; <fix>"``.

Part of the shared callback plumbing (:mod:`lightning_influence.callbacks._common` re-exports every name here):
:class:`MisconfigurationError`, :func:`check_task`, :func:`check_int`, :func:`check_number`, :func:`check_choice`,
:func:`check_dataset`, :func:`resolve_config` and :func:`config_field`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, overload

from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_influence.config import Config
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.tasks import Task

C = TypeVar("C", bound=Config)


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


# ------------------------------------------------------------------------------------------- arguments
def _must_be(who: str, name: str, rule: str, shown: str, fix: str | None) -> str:
    """``"<who>: <name> must be <rule>, got <shown>; <fix>"`` (the callbacks' argument-error style)."""
    return f"{who}: {name} must be {rule}, got {shown}" + (f"; {fix}" if fix else ".")


def check_task(task: Any, who: str, *, allow_loss_name: bool = False) -> Task:
    """``task`` as a :class:`~lightning_influence.tasks.Task` (a loss name builds one if ``allow_loss_name``).

    Returns:
        The task.

    Raises:
        MisconfigurationError: For anything else, or an unknown loss name.

    Example::

        >>> from lightning_influence.tasks import Classification
        >>> isinstance(check_task(Classification(), "InfluenceReport"), Classification)
        True
        >>> type(check_task("mse", "CurvatureMonitor", allow_loss_name=True)).__name__
        'Task'
        >>> try:
        ...     check_task(object(), "ApproximateCV")
        ... except MisconfigurationError as e:
        ...     print(str(e)[:73])
        ApproximateCV: task must be a lightning_influence.tasks.Task, got object;
    """
    if allow_loss_name and isinstance(task, str):
        try:
            return Task(task)
        except (ConfigurationError, ValueError, KeyError) as err:
            raise MisconfigurationError(f"{who}: task={task!r} is not a known loss name ({err}).") from err
    if not isinstance(task, Task):
        raise MisconfigurationError(
            f"{who}: task must be a lightning_influence.tasks.Task, got {type(task).__name__}; pass e.g. "
            "Classification(), Regression() or LanguageModeling() (subclass Task for custom batch formats)."
        )
    return task


@overload
def check_int(
    who: str, name: str, value: Any, minimum: int = ..., *, allow_none: Literal[False] = ..., rule: str | None = ...,
    fix: str | None = ...,
) -> int: ...
@overload
def check_int(
    who: str, name: str, value: Any, minimum: int = ..., *, allow_none: bool, rule: str | None = ...,
    fix: str | None = ...,
) -> int | None: ...
def check_int(
    who: str, name: str, value: Any, minimum: int = 1, *, allow_none: bool = False, rule: str | None = None,
    fix: str | None = None,
) -> int | None:
    """An integer ``>= minimum`` (or ``None`` when ``allow_none``); bools and fractional numbers are rejected.

    Args:
        who: The callback's name.
        name: The argument's name.
        value: Its value.
        minimum: The smallest allowed value.
        allow_none: Accept ``None`` (returned as is).
        rule: The rule as the message states it (default ``">= <minimum>"``).
        fix: What to do instead, appended to the message.

    Returns:
        ``int(value)``, or ``None``.

    Raises:
        MisconfigurationError: Naming the argument, the rule and the value.

    Example::

        >>> check_int("PBRFValidation", "num_train", 3)
        3
        >>> try:
        ...     check_int("PBRFValidation", "num_train", 0, fix="validate at least one training example")
        ... except MisconfigurationError as e:
        ...     print(e)
        PBRFValidation: num_train must be >= 1, got 0; validate at least one training example
    """
    if value is None and allow_none:
        return None
    stated = (rule or f">= {minimum}") + (" or None" if allow_none else "")
    integral = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or int(value) < minimum:
        raise MisconfigurationError(_must_be(who, name, stated, repr(value), fix))
    return int(value)


@overload
def check_number(
    who: str, name: str, value: Any, *, strict: bool = ..., allow_none: Literal[False] = ..., fix: str | None = ...,
) -> float: ...
@overload
def check_number(
    who: str, name: str, value: Any, *, strict: bool = ..., allow_none: bool, fix: str | None = ...,
) -> float | None: ...
def check_number(
    who: str, name: str, value: Any, *, strict: bool = True, allow_none: bool = False, fix: str | None = None,
) -> float | None:
    """A finite number ``> 0`` (``strict``) or ``>= 0``, or ``None`` when ``allow_none``.

    Returns:
        ``float(value)``, or ``None``.

    Raises:
        MisconfigurationError: Naming the argument, the rule and the value.

    Example::

        >>> check_number("ApproximateCV", "damping", 0.0, strict=False)
        0.0
        >>> try:
        ...     check_number("InfluenceReport", "damping", 0.0, fix="try 1e-3")
        ... except MisconfigurationError as e:
        ...     print(e)
        InfluenceReport: damping must be > 0, got 0.0; try 1e-3
    """
    if value is None and allow_none:
        return None
    stated = ("> 0" if strict else ">= 0") + (" or None" if allow_none else "")
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value > 0 if strict else value >= 0):
        raise MisconfigurationError(_must_be(who, name, stated, repr(value), fix))
    return float(value)


def check_damping(
    who: str, name: str, value: Any, *, strict: bool = True, allow_none: bool = True, fix: str | None = None,
) -> float | str | None:
    """A damping: ``"auto"``, a finite number ``> 0`` (``strict``) or ``>= 0``, or ``None`` when ``allow_none``.

    Returns:
        ``"auto"``, ``float(value)`` or ``None``.

    Raises:
        MisconfigurationError: Naming the argument, the rule and the value.

    Example::

        >>> check_damping("ApproximateCV", "damping", "auto"), check_damping("ApproximateCV", "damping", 1e-3)
        ('auto', 0.001)
    """
    if value == "auto" and isinstance(value, str):
        return "auto"
    if isinstance(value, str):
        stated = ("> 0" if strict else ">= 0") + ", 'auto'" + (" or None" if allow_none else "")
        raise MisconfigurationError(_must_be(who, name, f"a number {stated}", repr(value), fix))
    return check_number(who, name, value, strict=strict, allow_none=allow_none, fix=fix)


def check_choice(who: str, name: str, value: Any, choices: Sequence[Any], fix: str | None = None) -> Any:
    """``value`` if it is one of ``choices``.

    Returns:
        ``value``.

    Raises:
        MisconfigurationError: Listing the choices.

    Example::

        >>> try:
        ...     check_choice("PBRFValidation", "optimizer", "adam", ("lbfgs", "newton_cg"))
        ... except MisconfigurationError as e:
        ...     print(e)
        PBRFValidation: optimizer must be 'lbfgs' or 'newton_cg', got 'adam'.
    """
    if value not in choices:
        listed = [repr(c) for c in choices]
        stated = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " or " + listed[-1]
        raise MisconfigurationError(_must_be(who, name, stated, repr(value), fix))
    return value


def check_dataset(who: str, name: str, value: Any, allowed: Sequence[str] = ("train", "val")) -> Any:
    """A dataset spec: one of the names in ``allowed`` or a map-style dataset (indexable, with ``len()``).

    Returns:
        ``value``.

    Raises:
        MisconfigurationError: For another name or an object that is not a map-style dataset.

    Example::

        >>> check_dataset("CurvatureMonitor", "dataset", "val")
        'val'
        >>> try:
        ...     check_dataset("InfluenceReport", "train_data", "val", allowed=("train",))
        ... except MisconfigurationError as e:
        ...     print(e)
        InfluenceReport: train_data must be 'train' or a map-style Dataset, got 'val'.
    """
    if isinstance(value, str) and value in allowed:
        return value
    if isinstance(value, str) or not _is_map_style(value):
        stated = ", ".join(repr(a) for a in allowed) + " or a map-style Dataset"
        shown = repr(value) if isinstance(value, str) else type(value).__name__
        fix = None if isinstance(value, str) else "an IterableDataset or a DataLoader cannot be indexed"
        raise MisconfigurationError(_must_be(who, name, stated, shown, fix))
    return value


def check_picklable_datasets(who: str, state: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Raise a clear error while a callback is pickled (``ddp_spawn``, in the parent) if a dataset cannot be.

    Called from the callbacks' ``__getstate__``: under ``strategy="ddp_spawn"`` Lightning pickles the Trainer with its
    callbacks *before* the worker processes start, so this is the earliest point that knows the data must travel.
    A class defined inside a function (``<locals>`` in its qualified name) is the common case pickle cannot handle.

    Args:
        who: The callback's name.
        state: The callback's ``__dict__`` (returned unchanged).
        names: The attributes that hold dataset specs (``"train"``/``"val"`` strings or dataset objects).

    Returns:
        ``state``.

    Raises:
        MisconfigurationError: Naming the attribute, the dataset class and the fix.

    Example::

        >>> def make():
        ...     class Local(list):
        ...         pass
        ...     return Local([1, 2])
        >>> try:
        ...     check_picklable_datasets("ApproximateCV", {"dataset": make()}, ["dataset"])
        ... except MisconfigurationError as e:
        ...     print("make.<locals>.Local" in str(e), "Define the dataset class at module level" in str(e))
        True True
        >>> check_picklable_datasets("ApproximateCV", {"dataset": "train"}, ["dataset"])
        {'dataset': 'train'}
    """
    for name in names:
        value = state.get(name)
        qualname = type(value).__qualname__
        if value is not None and not isinstance(value, str) and "<locals>" in qualname:
            raise MisconfigurationError(
                f"{who}: {name} is a {qualname}, a class defined inside a function, which cannot be pickled to the "
                "worker processes that strategy='ddp_spawn' starts (Lightning pickles the callbacks before they "
                "start). Define the dataset class at module level, or use strategy='ddp' (which does not pickle "
                "the callbacks)."
            )
    return state


def resolve_config(who: str, cls: type[C], config: C | None, default: C, **explicit: Any) -> C:
    """The callback's resolved config: ``config`` (or ``default``) with the explicit arguments that are not ``None``.

    So ``InfluenceReport(config=InfluenceConfig(solver="lissa"))`` keeps ``"lissa"``, while
    ``InfluenceReport(solver="exact", config=...)`` overrides the config's solver.

    Args:
        who: The callback's name.
        cls: The config class.
        config: The user's config, or ``None`` for ``default``.
        default: The callback's default config (its own defaults where they differ from the numerics').
        **explicit: The explicit keyword arguments duplicating config fields (``None``: take the config's).

    Returns:
        The validated config.

    Raises:
        MisconfigurationError: For a config of another type or a field that fails validation.

    Example::

        >>> from lightning_influence.config import CGConfig
        >>> resolve_config("X", CGConfig, CGConfig(rtol=1e-3), CGConfig(), rtol=None, max_iter=5)
        CGConfig(rtol=0.001, max_iter=5, warn=True)
    """
    try:
        return cls.resolve(default if config is None else config, **{k: v for k, v in explicit.items()
                                                                    if v is not None})
    except ConfigurationError as err:
        raise MisconfigurationError(f"{who}: {err}") from err


class _ConfigField:
    """Read-only attribute reading the field of the same name from ``self.config``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj.config, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"{type(obj).__name__}.{self.name} is config.{self.name}; pass it to __init__ instead.")


def config_field() -> Any:
    """Declare a callback attribute that reads the same-named field of ``self.config`` (read-only).

    Returns:
        The descriptor.

    Example::

        >>> from lightning_influence.config import CGConfig
        >>> class Holder:
        ...     rtol: float = config_field()
        ...     def __init__(self):
        ...         self.config = CGConfig(rtol=1e-4)
        >>> Holder().rtol
        0.0001
    """
    return _ConfigField()


def _is_map_style(dataset: Any) -> bool:
    from torch.utils.data import IterableDataset

    return (not isinstance(dataset, IterableDataset)) and hasattr(dataset, "__getitem__") and hasattr(
        dataset, "__len__"
    )


# ----------------------------------------------------------------------------------------- trainer state
def check_listed_once(callbacks: Sequence[Any], who: str) -> None:
    """Raise if a ``who`` callback instance is in ``trainer.callbacks`` twice.

    (Two stateful instances with one ``state_key`` are rejected by Lightning itself when the Trainer is built.)
    Called by :func:`~lightning_influence.callbacks._common.check_strategy` in every callback's ``setup``.

    Raises:
        MisconfigurationError: Saying how to fix the list.

    Example::

        >>> from lightning.pytorch.callbacks import Callback
        >>> class InfluenceReport(Callback): ...
        >>> cb = InfluenceReport()
        >>> try:
        ...     check_listed_once([cb, cb], "InfluenceReport")
        ... except MisconfigurationError as e:
        ...     print(str(e)[:60])
        InfluenceReport is listed 2 times in Trainer(callbacks=...);
    """
    mine = [c for c in callbacks if type(c).__name__ == who]
    for cb in mine:
        count = sum(c is cb for c in mine)
        if count > 1:
            raise MisconfigurationError(f"{who} is listed {count} times in Trainer(callbacks=...); list it once.")
    # Stateful twins (same state_key) Lightning rejects itself when the Trainer is built, and stateful callbacks name
    # their files and report sections after their state; two stateless ones in one subdir overwrite each other.
    stateless = [c for c in mine if not _is_stateful(c)]
    for i, a in enumerate(stateless):
        for b in stateless[i + 1:]:
            subdir = getattr(a, "subdir", None)
            if subdir is not None and subdir == getattr(b, "subdir", None):
                raise MisconfigurationError(
                    f"{who}: Trainer(callbacks=...) holds two {who} callbacks writing to the same subdir "
                    f"{subdir!r}; their report files would collide. Remove one, or pass another subdir= to one of them."
                )


def _is_stateful(callback: Any) -> bool:
    """Whether the callback keeps checkpoint state (overrides ``state_dict``)."""
    from lightning.pytorch.callbacks import Callback

    return type(callback).state_dict is not Callback.state_dict


def parameter_signature(module: Any) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """``(name, shape, dtype)`` of every trainable parameter: what must not change between measurements.

    Returns:
        The signature.

    Example::

        >>> import torch
        >>> parameter_signature(torch.nn.Linear(2, 1))
        (('weight', (1, 2), 'torch.float32'), ('bias', (1,), 'torch.float32'))
    """
    return tuple((n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters() if p.requires_grad)


def check_same_parameters(owner: Any, module: Any, who: str) -> None:
    """Store the trainable-parameter signature at the first measurement; raise if a later one differs.

    Raises:
        MisconfigurationError: Naming what changed and the fix.

    Example::

        >>> import torch
        >>> class Owner: ...
        >>> owner, model = Owner(), torch.nn.Linear(2, 1)
        >>> check_same_parameters(owner, model, "CurvatureMonitor")
        >>> _ = model.bias.requires_grad_(False)
        >>> try:
        ...     check_same_parameters(owner, model, "CurvatureMonitor")
        ... except MisconfigurationError as e:
        ...     print(str(e)[:71])
        CurvatureMonitor: the trainable parameters changed between measurements
    """
    signature = parameter_signature(module)
    first = getattr(owner, "_param_signature", None)
    if first is None:
        owner._param_signature = signature
        return
    if signature != first:
        old, new = {s[0]: s for s in first}, {s[0]: s for s in signature}
        changed = sorted(set(old) ^ set(new)) + sorted(n for n in set(old) & set(new) if old[n] != new[n])
        raise MisconfigurationError(
            f"{who}: the trainable parameters changed between measurements ({len(first)} -> {len(signature)} "
            f"tensors; changed: {changed[:5]}), so the measurements would not be comparable. Freeze or unfreeze "
            "parameters before trainer.fit(), or use one callback per phase."
        )
