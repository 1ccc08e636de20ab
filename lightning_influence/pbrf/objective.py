"""The pieces of the proximal Bregman objective: the float64 model copy, the stable divergence, measurements."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.data import prepare_batch
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.losses import LossFamily, SoftmaxCrossEntropy
from lightning_influence.params import ParamTree
from lightning_influence.tasks import Task

__all__ = ["Measurement", "copy_model", "query_loss_measurement", "stable_bregman"]

#: A measurement maps the (float64 copy of the) model, with the perturbed parameters loaded, to a tensor.
Measurement = Callable[[nn.Module], Tensor]


def copy_model(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A deep copy of ``model`` cast to ``dtype`` (the original is never modified).

    A ``LightningModule`` drops its trainer reference when copied (its ``__getstate__``), so this is safe inside
    callbacks. Frozen parameters stay frozen in the copy.

    Example::

        >>> m = torch.nn.Linear(2, 1)
        >>> c = copy_model(m)
        >>> c.weight.dtype, m.weight.dtype, c.weight.data_ptr() != m.weight.data_ptr()
        (torch.float64, torch.float32, True)

    Returns:
        The copy.
    """
    with torch.no_grad():
        clone = copy.deepcopy(model)
    return clone.to(dtype)


def stable_bregman(loss: LossFamily, outputs: Tensor, ref_outputs: Tensor, targets: Tensor) -> Tensor:
    r"""Per-unit Bregman divergence, equal to ``loss.bregman`` but accurate to :math:`O(u\,|h - h'|)` near ``h'``.

    For softmax cross-entropy, :math:`\mathrm{KL}(p_{h'} \| p_h) = \log \sum_k p'_k e^{\Delta_k}` with the
    centred difference :math:`\Delta = (h - h') - \sum_k p'_k (h - h')_k`, evaluated as
    ``log1p(sum p' (expm1(Δ) - Δ))``. The textbook form :math:`\sum p' (\log p' - \log p)` loses everything
    below ~1e-16 *absolute*, which near the PBO minimum is the size of the objective's changes, so the L-BFGS line
    search stalls; this form keeps the relative accuracy. Other families use ``loss.bregman`` (the Gaussian one is
    already a squared difference).

    Example::

        >>> h, r = torch.linspace(-2, 2, 12, dtype=torch.float64).reshape(4, 3), torch.ones(4, 3, dtype=torch.float64)
        >>> loss, y = SoftmaxCrossEntropy(), torch.tensor([0, 1, 2, 0])
        >>> torch.allclose(stable_bregman(loss, h, r, y), loss.bregman(h, r, y))
        True

    Returns:
        Per-unit divergences (zero at ignored units).
    """
    if not isinstance(loss, SoftmaxCrossEntropy):
        return loss.bregman(outputs, ref_outputs, targets)
    q = torch.softmax(ref_outputs, dim=-1)
    delta = outputs - ref_outputs
    delta = delta - (q * delta).sum(-1, keepdim=True)
    kl = torch.log1p((q * (torch.expm1(delta) - delta)).sum(-1))
    return kl * loss.unit_mask(outputs, targets).to(kl.dtype)


def _per_example_losses(
    task: Task, model: nn.Module, batch: Any, params: ParamTree | None = None, normalization: str = "sum"
) -> Tensor:
    outputs, targets = task(model, batch, params)
    loss_sum, count = task.loss.per_example(outputs, targets)
    return loss_sum if normalization == "sum" else loss_sum / count.clamp_min(1.0)


def _check_normalization(normalization: str) -> None:
    if normalization not in ("sum", "mean"):
        raise ConfigurationError(f"normalization must be 'sum' or 'mean', got {normalization!r}.")


def query_loss_measurement(task: Task, queries: Sequence[Any] | Any, normalization: str = "sum") -> Measurement:
    """The default measurement: the loss of every query example, concatenated.

    Args:
        task: The task that scores the queries.
        queries: A list of collated batches, or one collated batch; the measurement has one entry per example, in
            order.
        normalization: ``"sum"`` (loss summed over the example's units, as in
            :mod:`lightning_influence.influence`) or ``"mean"``.

    Returns:
        A :data:`Measurement` returning a tensor of shape ``(Q,)``.

    Raises:
        ConfigurationError: If there are no queries or the normalization is unknown.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> _ = torch.nn.init.zeros_(model.weight)  # theta_hat = 0
        >>> x = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
        >>> measure = query_loss_measurement(Regression(), [(x, y)])
        >>> measure(model).detach()  # 0.5 * (0 - y)^2 per query example
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    _check_normalization(normalization)
    batches = list(queries) if isinstance(queries, list) else [queries]
    if not batches:
        raise ConfigurationError("queries is empty: pass at least one query batch (or a measurement function).")

    def measure(model: nn.Module) -> Tensor:
        first = next(iter(model.parameters()))
        values = [
            _per_example_losses(task, model, prepare_batch(b, first.device, first.dtype), normalization=normalization)
            for b in batches
        ]
        return torch.cat([v.reshape(-1) for v in values])

    return measure
