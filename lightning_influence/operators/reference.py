"""An independent GNH product for tests and benchmarks: ``torch.func.jvp`` then ``torch.func.vjp``, no caches."""

from __future__ import annotations

from typing import Any

import torch  # noqa: F401  (the doctest example builds tensors)
from torch import Tensor, nn
from torch.func import jvp, vjp

from lightning_influence.evaluator import curvature_mode
from lightning_influence.params import ParamTree, flatten, trainable_parameters, unflatten
from lightning_influence.tasks import Task

__all__ = ["gnh_product_reference"]


def gnh_product_reference(model: nn.Module, task: Task, batch: Any, v: Tensor) -> Tensor:
    """Unnormalised GNH product of one batch by ``torch.func.jvp`` then ``torch.func.vjp`` (two forward passes).

    A second, independent implementation kept for tests and benchmarks.

    Returns:
        The flat, unnormalised GNH product for ``batch`` (length ``P``).

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
        >>> batch = (x, torch.zeros(2, 1, dtype=torch.float64))
        >>> m = torch.nn.Linear(2, 1, bias=False).double()
        >>> gnh_product_reference(m, Regression(), batch, torch.ones(2, dtype=torch.float64))  # X^T X 1
        tensor([9., 4.], dtype=torch.float64)
    """
    params = trainable_parameters(model)
    inputs, targets = task.split(batch)

    def f(p: ParamTree) -> Tensor:
        out, _ = task.targets(task.outputs(task.forward(model, p, inputs)), targets)
        return out

    with curvature_mode(model):
        outputs, jv = jvp(f, (params,), (unflatten(v, params),))  # type: ignore[misc]
        c = task.loss.output_hvp(outputs, targets, jv)
        _, pullback = vjp(f, params)  # type: ignore[misc]
        (prod,) = pullback(c)
    return flatten(prod)
