"""Is the module trained on the task's loss? One check, run by every callback before the first training step.

Curvature, influence and CV assume the task's loss (plain or label-smoothed cross-entropy, binary logistic,
Gaussian/MSE, token cross-entropy). A module trained with label smoothing, class weights, a focal or any custom loss
would silently get the curvature of another loss. :func:`loss_mismatches` finds it two ways:

* loss modules the LightningModule holds (``nn.CrossEntropyLoss(label_smoothing=..., weight=...)``,
  ``nn.BCEWithLogitsLoss(pos_weight=...)``, ``nn.NLLLoss(weight=...)``) whose settings the task does not share;
* the value of ``training_step`` on one training batch (eval mode, no gradient, logging muted, RNG isolated)
  against the task's loss on the same batch (plus the declared regulariser's penalty), same parameters.

:func:`check_loss_matches` runs it once per module and task and warns with
:class:`~lightning_influence.exceptions.LossMismatchWarning`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_influence.data import prepare_batch
from lightning_influence.evaluator import curvature_mode
from lightning_influence.exceptions import LossMismatchWarning
from lightning_influence.losses import SoftmaxCrossEntropy
from lightning_influence.params import isolated_rng
from lightning_influence.tasks import Task

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["check_loss_matches", "loss_mismatches"]

_CHECK_EXAMPLES = 8
_REL_TOL = 1e-3


def _attribute_mismatches(module: nn.Module, task: Task) -> list[str]:
    loss = task.loss
    found: list[str] = []
    for name, sub in module.named_modules():
        where = f"self.{name}" if name else "the module"
        if isinstance(sub, nn.CrossEntropyLoss):
            smoothing = float(sub.label_smoothing)
            assumed = loss.label_smoothing if isinstance(loss, SoftmaxCrossEntropy) else 0.0
            if not math.isclose(smoothing, assumed, abs_tol=1e-12):
                found.append(f"{where} = CrossEntropyLoss(label_smoothing={smoothing:g}) but the task assumes "
                             f"label_smoothing={assumed:g}; declare it with Classification(label_smoothing="
                             f"{smoothing:g}) (or LanguageModeling(label_smoothing={smoothing:g}))")
        if isinstance(sub, (nn.CrossEntropyLoss, nn.NLLLoss)) and sub.weight is not None:
            found.append(f"{where} = {type(sub).__name__}(weight=...) uses class weights, which no task loss supports; "
                         "the curvature is that of the unweighted loss (drop the weights, or treat the results as "
                         "those of the unweighted loss)")
        if isinstance(sub, nn.BCEWithLogitsLoss) and (sub.pos_weight is not None or sub.weight is not None):
            found.append(f"{where} = BCEWithLogitsLoss with pos_weight/weight, which the binary logistic task loss "
                         "does not support")
    return found


@contextlib.contextmanager
def _muted_logging(module: nn.Module) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` as no-ops (``training_step`` is called outside Lightning's loop)."""
    saved: dict[str, Any] = {k: module.__dict__[k] for k in ("log", "log_dict") if k in module.__dict__}
    module.__dict__["log"] = lambda *a, **k: None
    module.__dict__["log_dict"] = lambda *a, **k: None
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            module.__dict__.pop(k, None)
        module.__dict__.update(saved)


def _step_loss(module: nn.Module, batch: Any) -> Tensor | None:
    step = getattr(module, "training_step", None)
    if step is None:
        return None
    try:
        with _muted_logging(module):
            out = step(batch, 0)
    except Exception:  # a step that needs the loop (manual optimisation, self.trainer...): cannot compare
        return None
    if isinstance(out, Mapping):
        out = out.get("loss")
    return out.detach() if isinstance(out, Tensor) and out.numel() == 1 else None


def loss_mismatches(
    module: nn.Module, task: Task, batch: Any | None = None, regularizer: Any | None = None
) -> list[str]:
    """Reasons to believe ``module`` trains on another loss than ``task``'s (empty when they agree).

    Args:
        module: The (unwrapped) LightningModule or any module with a ``training_step(batch, batch_idx)``.
        task: The task the estimators use.
        batch: One training batch for the value comparison (``None``: only the loss modules are inspected).
        regularizer: The module's declared regulariser, whose penalty the training loss includes.

    Returns:
        One sentence per mismatch found.

    Example::

        >>> from lightning_influence.tasks import Classification
        >>> m = torch.nn.Linear(2, 3)
        >>> m.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        >>> loss_mismatches(m, Classification())[0][:60]
        'self.loss_fn = CrossEntropyLoss(label_smoothing=0.1) but the'
        >>> loss_mismatches(m, Classification(label_smoothing=0.1))
        []
    """
    found = _attribute_mismatches(module, task)
    if batch is None:
        return found
    params = next(iter(module.parameters()), None)
    device = params.device if params is not None else torch.device("cpu")
    with isolated_rng(), curvature_mode(module), torch.no_grad():
        prepared = prepare_batch(batch, device)
        trained = _step_loss(module, prepared)
        if trained is None:
            return found
        try:
            out, y = task(module, prepared)
            assumed = task.loss.mean(out, y)
        except Exception:  # a task that does not fit the batches: the callbacks raise their own, clearer error
            return found
        if regularizer is not None:
            from lightning_influence.cv.folds import regularization_penalty

            assumed = assumed + regularization_penalty(module, regularizer)
    t, a = float(trained), float(assumed)
    if not math.isclose(t, a, rel_tol=_REL_TOL, abs_tol=1e-6):
        found.append(f"training_step returns loss {t:.6g} on a training batch while the task's loss "
                     f"{task.loss!r} gives {a:.6g} (eval mode, same parameters)")
    return found


def check_loss_matches(trainer: pl.Trainer, pl_module: nn.Module, task: Task, who: str) -> list[str]:
    """Warn (:class:`~lightning_influence.exceptions.LossMismatchWarning`) if the module trains on another loss.

    Called by every callback in ``on_train_start`` (the first hook with the training data attached, before the
    first step); runs once per module and task however many callbacks share them. The batch is the first
    examples of the training set collated as its dataloader does; modules without a usable training set or
    ``training_step`` get the loss-module inspection only.

    Returns:
        The mismatches found (empty when none, or when this module and task were checked already).

    Example::

        >>> from types import SimpleNamespace
        >>> from lightning_influence.tasks import Classification
        >>> m = torch.nn.Linear(2, 3)
        >>> m.loss_fn = torch.nn.CrossEntropyLoss(weight=torch.ones(3))
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     _ = check_loss_matches(SimpleNamespace(train_dataloader=None), m, Classification(), "InfluenceReport")
        >>> w[0].category.__name__
        'LossMismatchWarning'
    """
    from lightning_influence.callbacks._common import unwrap_module
    from lightning_influence.callbacks._data import resolve_data
    from lightning_influence.callbacks.approximate_cv import find_module_regularizer

    pl_module = unwrap_module(pl_module)

    checked = pl_module.__dict__.setdefault("_lightning_influence_loss_checked", set())
    key = repr(task)
    if key in checked:
        return []
    checked.add(key)
    batch = None
    with contextlib.suppress(Exception):  # no usable training set: inspect the loss modules only
        data = resolve_data(trainer, "train", who)
        n = min(_CHECK_EXAMPLES, len(data.dataset))
        collate = data.collate_fn or torch.utils.data.default_collate
        batch = collate([data.dataset[i] for i in range(n)]) if n else None
    regularizer = None
    with contextlib.suppress(Exception):
        regularizer = find_module_regularizer(pl_module)
    found = loss_mismatches(pl_module, task, batch, regularizer)
    if found:
        rank_zero_warn(
            f"{who}: the curvature, influence and CV assume the task's loss {task.loss!r}, but the module seems to "
            f"train on another: {'; '.join(found)}. Declare the loss actually used on the task (a supported option "
            "such as label_smoothing), or train on the task's loss; otherwise the results are those of the assumed "
            "loss.", category=LossMismatchWarning,
        )
    return found
