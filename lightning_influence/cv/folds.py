"""Folds, argument checks and the training penalty shared by approximate and exact k-fold CV."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.data import CollateFn, make_batches
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.losses import BinaryLogistic, GaussianNLL, LossFamily, SoftmaxCrossEntropy
from lightning_influence.params import ParamTree, make_generator, trainable_parameters
from lightning_influence.regularizers import NoRegularizer, Regularizer
from lightning_influence.tasks import Task

__all__ = ["check_curvature_for_loss", "kfold_indices", "make_fold_batches", "regularization_penalty"]

Batches = Sequence[Any]
CURVATURES = ("fisher", "gnh", "hessian")
_EXPONENTIAL_FAMILIES: tuple[type[LossFamily], ...] = (SoftmaxCrossEntropy, BinaryLogistic, GaussianNLL)


def kfold_indices(num_examples: int, folds: int, seed: int = 0, shuffle: bool = True) -> list[list[int]]:
    """Seeded k-fold split of ``range(num_examples)`` into ``folds`` disjoint, near-equal folds.

    The permutation comes from a private generator (:func:`~lightning_influence.params.make_generator`), so the
    global RNG is untouched and every process computes the same split. Fold sizes differ by at most one; each
    fold's indices are sorted.

    Args:
        num_examples: Size of the training set.
        folds: Number of folds ``K >= 2``.
        seed: Seed of the permutation.
        shuffle: Permute before splitting (``False``: contiguous blocks).

    Returns:
        ``K`` lists of indices.

    Raises:
        ConfigurationError: If ``folds < 2`` or ``folds > num_examples``.

    Example::

        >>> [len(f) for f in kfold_indices(10, 3)]
        [4, 3, 3]
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigurationError(f"folds must be an integer >= 2, got {folds!r}.")
    if folds > num_examples:
        raise ConfigurationError(
            f"folds={folds} is larger than the number of training examples ({num_examples}); use at most "
            f"{num_examples} folds (folds={num_examples} is leave-one-out)."
        )
    order = torch.randperm(num_examples, generator=make_generator(seed)) if shuffle else torch.arange(num_examples)
    return [sorted(int(i) for i in chunk) for chunk in torch.tensor_split(order, folds)]


def make_fold_batches(
    dataset: Any,
    fold_indices: Sequence[Sequence[int]],
    batch_size: int = 256,
    collate_fn: CollateFn | None = None,
) -> list[list[Any]]:
    """Collate each fold's examples into batches (the data format of :func:`approximate_cv`).

    Args:
        dataset: Indexable dataset (one example per index).
        fold_indices: Indices per fold (e.g. :func:`kfold_indices`, or this rank's slice of each fold).
        batch_size: Examples per batch.
        collate_fn: Collation function (default ``torch.utils.data.default_collate``).

    Returns:
        One list of batches per fold (an empty fold, or an empty shard, gives an empty list).

    Example::

        >>> ds = list(zip(torch.arange(5.0), torch.arange(5.0)))
        >>> [len(b) for b in make_fold_batches(ds, [[0, 1, 2], [3, 4]], batch_size=2)]
        [2, 1]
    """
    return [make_batches(dataset, list(idx), batch_size, collate_fn) for idx in fold_indices]


def check_curvature_for_loss(task: Task, curvature: str) -> None:
    """Check that the requested curvature is available and meaningful for the task's loss.

    The Fisher (and the GNH standing in for it) is the AFIF curvature only for negative log-likelihoods of an
    exponential family in its natural parameter (the model output). Custom :class:`LossFamily` subclasses can
    declare ``exponential_family = True``.

    Args:
        task: The task whose ``loss`` is checked.
        curvature: ``"fisher"``, ``"gnh"`` or ``"hessian"``.

    Raises:
        ConfigurationError: For an unknown curvature, or ``"fisher"``/``"gnh"`` with a loss that is not an
            exponential-family NLL (use ``curvature="hessian"``).

    Example::

        >>> from lightning_influence.tasks import Classification
        >>> check_curvature_for_loss(Classification(), "fisher")
    """
    if curvature not in CURVATURES:
        raise ConfigurationError(f"curvature must be one of {sorted(CURVATURES)}, got {curvature!r}.")
    if curvature == "hessian":
        return
    loss = task.loss
    declared = getattr(loss, "exponential_family", None)
    is_family = bool(declared) if declared is not None else isinstance(loss, _EXPONENTIAL_FAMILIES)
    if not is_family:
        raise ConfigurationError(
            f"curvature={curvature!r} needs a loss that is the negative log-likelihood of an exponential family in "
            f"the model output (cross-entropy, binary logistic, Gaussian/squared error), but the task's loss is "
            f"{type(loss).__name__}, for which the Fisher is not the curvature of the loss. Use "
            "curvature='hessian' (Hessian-based approximate CV), or set exponential_family = True on the loss "
            "class if it is one."
        )


def _check_fold_objective(fold_objective: str) -> None:
    if fold_objective not in ("mean", "weighted"):
        raise ConfigurationError(
            f"fold_objective must be 'mean' (refit the mean loss on the remaining data) or 'weighted' (the paper's "
            f"(1/N) sum_i w_i l_i), got {fold_objective!r}."
        )


def _check_regularizer(regularizer: Regularizer | None, num_params: int) -> Regularizer:
    if regularizer is None:
        return NoRegularizer()
    if not isinstance(regularizer, Regularizer):
        raise ConfigurationError(
            f"regularizer must be a lightning_influence.regularizers.Regularizer (L1, ElasticNet, GroupLasso, "
            f"NoRegularizer) or None, got {type(regularizer).__name__}."
        )
    regularizer._check_size(num_params)
    return regularizer


def regularization_penalty(model: nn.Module, regularizer: Regularizer) -> Tensor:
    r"""The penalty :math:`\lambda\pi(\theta)` of the model's live trainable parameters, for the training loss.

    Use it in ``training_step`` so that training and (approximate) CV use the same regulariser object::

        loss = task.loss.mean(*task(self, batch)) + regularization_penalty(self, self.regularizer)

    The flat order is that of :func:`~lightning_influence.params.trainable_parameters` (the order the CV code
    and :func:`~lightning_influence.regularizers.mask_from_named_parameters` use). Unlike
    ``flatten(trainable_parameters(model))``, which is detached, the result is differentiable.

    Args:
        model: The module being trained.
        regularizer: The penalty.

    Returns:
        A differentiable 0-d tensor.

    Raises:
        ConfigurationError: If the model has no trainable parameter.

    Example::

        >>> from lightning_influence.regularizers import L1
        >>> m = torch.nn.Linear(2, 1)
        >>> regularization_penalty(m, L1(1.0)).requires_grad
        True
    """
    live = [p.reshape(-1) for _, p in model.named_parameters() if p.requires_grad]
    if not live:
        raise ConfigurationError(f"{type(model).__name__} has no trainable parameters to penalise.")
    return regularizer.penalty(torch.cat(live))


def _local_examples(task: Task, batches: Batches) -> int:
    return sum(task.batch_size(b) for b in batches)


def _validate_common(
    model: nn.Module, folds: Sequence[Batches], regularizer: Regularizer | None, fold_objective: str,
) -> tuple[ParamTree, Regularizer]:
    _check_fold_objective(fold_objective)
    if isinstance(folds, (str, bytes)) or not isinstance(folds, Sequence) or len(folds) < 1:
        raise ConfigurationError("folds must be a non-empty list with one list of batches per fold.")
    params = trainable_parameters(model)
    reg = _check_regularizer(regularizer, sum(t.numel() for t in params.values()))
    return params, reg
