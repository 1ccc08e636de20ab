r"""Streamed per-example gradients: ``torch.func.vmap(grad(...))`` over chunks, never the ``(n, P)`` matrix at once.

Gradients are of each example's *summed* unit losses (``normalization="sum"``; one unit for classification, the
non-ignored tokens of a sequence for language models) with respect to the trainable parameters, flattened in
:func:`~lightning_influence.params.trainable_parameters` order, computed in eval mode with autograd forced on (also
under ``torch.inference_mode``) by :meth:`~lightning_influence.evaluator.Evaluator.per_example`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.data import CollateFn, DataSource
from lightning_influence.evaluator import Evaluator
from lightning_influence.exceptions import ConfigurationError, NonFiniteError
from lightning_influence.params import num_parameters, trainable_parameters
from lightning_influence.tasks import Task

__all__ = ["iter_per_example_gradients", "per_example_gradients"]


def _check_finite(grads: Tensor, losses: Tensor, chunk: Tensor) -> None:
    # A row sum is finite when every entry is (NaN and inf propagate), and costs one read of the chunk instead of a
    # (c, P) boolean mask; only a non-finite sum (possibly a finite overflow) takes the exact entry-wise test.
    if bool(torch.isfinite(grads.sum(1)).all()) and bool(torch.isfinite(losses).all()):
        return
    bad = ~(torch.isfinite(grads).all(1) & torch.isfinite(losses))
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise NonFiniteError(
            f"the per-example gradient of example {int(chunk[j])} (data-set index) is not finite "
            f"(loss {float(losses[j])}). Inspect that example's inputs/targets, or the model's outputs "
            "on it (overflowing logits, NaN weights)."
        )


def iter_per_example_gradients(
    model: nn.Module,
    task: Task,
    dataset: Any,
    indices: Sequence[int] | Tensor | None = None,
    *,
    chunk_size: int = 64,
    collate_fn: CollateFn | None = None,
    normalization: str = "sum",
    dtype: torch.dtype | None = None,
    check_finite: bool = True,
    evaluator: Evaluator | None = None,
    out: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Stream per-example gradients in chunks: yields ``(indices, grads (c, P), losses (c,))``.

    Args:
        model: The module.
        task: The task.
        dataset: Map-style data set or a tuple of tensors.
        indices: Which examples (default all), in order.
        chunk_size: Examples per vectorised chunk (memory ``chunk_size * P``).
        collate_fn: Collation (default ``default_collate``).
        normalization: ``"sum"`` or ``"mean"`` over the example's units.
        dtype: Cast floating inputs to this dtype.
        check_finite: Raise :class:`NonFiniteError` naming the first example with a non-finite gradient.
        evaluator: Reuse this evaluator (its counters then include these gradients).
        out: A contiguous ``(m, P)`` buffer in the parameters' dtype, ``m`` at least the number of examples or at
            least ``chunk_size`` rows: the chunk at positions ``[s, s + c)`` is written into ``out[s:s + c]`` when it
            has the rows, else into ``out[:c]`` (a workspace reused by every chunk, each overwriting the last), and
            yielded as that view. Without it every chunk allocates a fresh ``(c, P)`` matrix, whose first-touch
            page faults cost more than the gradients on an 11M-parameter ResNet.

    Yields:
        ``(indices, grads, losses)`` per chunk.

    Raises:
        NonFiniteError: If an example's gradient (or loss) is not finite; the message names its data-set index.
        ConfigurationError: For a bad ``chunk_size``/``normalization`` or indices out of range.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> m = torch.nn.Linear(1, 1, bias=False)
        >>> _ = torch.nn.init.ones_(m.weight)
        >>> data = (torch.tensor([[1.0], [2.0], [3.0]]), torch.zeros(3, 1))
        >>> chunks = iter_per_example_gradients(m, Regression(), data, chunk_size=2)
        >>> [(idx.tolist(), g.shape[0]) for idx, g, _ in chunks]
        [([0, 1], 2), ([2], 1)]
    """
    if chunk_size < 1:
        raise ConfigurationError(f"chunk_size must be >= 1, got {chunk_size}.")
    if normalization not in ("sum", "mean"):
        raise ConfigurationError(f"normalization must be 'sum' or 'mean', got {normalization!r}.")
    source = DataSource(dataset, indices, batch_size=chunk_size, collate_fn=collate_fn)
    ev = evaluator if evaluator is not None else Evaluator(model, task, input_dtype=dtype)
    if out is not None and out.shape[0] < min(chunk_size, source.global_size):
        raise ConfigurationError(f"out has {out.shape[0]} rows; it needs at least chunk_size={chunk_size} (a "
                                 f"workspace) or one per example ({source.global_size}).")
    whole = out is not None and out.shape[0] >= source.global_size
    for s in range(0, source.global_size, chunk_size):
        chunk = source.indices[s : s + chunk_size]
        (batch,) = source.collate(chunk, batch_size=chunk.numel())
        rows = None if out is None else out[s : s + chunk.numel()] if whole else out[: chunk.numel()]
        grads, losses = ev.per_example(ev.prepare(batch), normalization, rows)
        if check_finite:
            _check_finite(grads, losses, chunk)
        yield chunk, grads, losses


def per_example_gradients(
    model: nn.Module,
    task: Task,
    dataset: Any,
    indices: Sequence[int] | Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """All per-example gradients as an ``(n, P)`` matrix (see :func:`iter_per_example_gradients` for arguments).

    Returns:
        ``(n, P)`` tensor; for large ``n`` prefer the streaming iterator or
        :func:`~lightning_influence.influence.influence_scores`.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> m = torch.nn.Linear(1, 1, bias=False)
        >>> torch.nn.init.ones_(m.weight)
        Parameter containing:
        tensor([[1.]], requires_grad=True)
        >>> per_example_gradients(m, Regression(), (torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1)))
        tensor([[1.],
                [4.]])
    """
    parts = [g for _, g, _ in iter_per_example_gradients(model, task, dataset, indices, **kwargs)]
    if not parts:
        return torch.zeros(0, num_parameters(trainable_parameters(model)))
    return torch.cat(parts, 0)
