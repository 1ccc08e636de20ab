"""Tasks: how a batch becomes ``(outputs, targets)`` and which loss family scores it.

A :class:`Task` is the one piece of user knowledge the estimators need. It splits a collated batch into
model inputs and targets (:meth:`Task.split`), calls the model (:meth:`Task.forward`, through
``torch.func.functional_call`` so that parameters can be swapped) and post-processes the raw output
(:meth:`Task.outputs`, e.g. ``.logits`` of a Hugging Face model). Custom batch formats are a small subclass::

    class DictClassification(Classification):
        def split(self, batch):
            return (batch["pixel_values"],), batch["labels"]

Tasks hold only plain values, so they pickle (``ddp_spawn``) and can be configured from a LightningCLI YAML.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_influence.exceptions import BatchFormatError
from lightning_influence.losses import BinaryLogistic, GaussianNLL, LossFamily, SoftmaxCrossEntropy, get_loss

Inputs = tuple[Any, ...]


class Task:
    """Base task: batches are ``(inputs, targets)`` pairs (tuple or list), outputs are the model's output.

    Args:
        loss: The loss family, or its name (see :func:`lightning_influence.losses.get_loss`).

    Example::

        >>> task = Task("mse")
        >>> model = torch.nn.Linear(2, 1)
        >>> out, y = task(model, (torch.zeros(4, 2), torch.zeros(4, 1)))
        >>> out.shape, y.shape
        (torch.Size([4, 1]), torch.Size([4, 1]))
    """

    def __init__(self, loss: str | LossFamily) -> None:
        self.loss: LossFamily = get_loss(loss)

    # -------------------------------------------------------------------------------------------- hooks
    def split(self, batch: Any) -> tuple[Inputs, Tensor]:
        """Split a collated batch into a tuple of positional model inputs and the targets.

        Returns:
            ``(inputs, targets)`` with ``inputs`` a tuple of positional model inputs.

        Raises:
            BatchFormatError: If the batch is not a ``(inputs, targets)`` pair.
        """
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y = batch
            return (x,), y
        if isinstance(batch, Mapping):
            raise BatchFormatError(
                f"{type(self).__name__} got a dict batch with keys {sorted(batch)}; subclass the task and override "
                "split(batch) -> ((inputs,), targets) for this format."
            )
        kind = f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else (
            f"a {type(batch).__name__}"
        )
        raise BatchFormatError(
            f"{type(self).__name__} expects batches of (inputs, targets) but got {kind}; subclass the task and "
            "override split(batch)."
        )

    def forward(self, model: nn.Module, params: Mapping[str, Tensor], inputs: Inputs) -> Any:
        """Call ``model`` with ``params`` swapped in (other parameters and buffers come from the module)."""
        return functional_call(model, dict(params), inputs, strict=False)

    def outputs(self, raw: Any) -> Tensor:
        """Turn the raw model output into the tensor the loss expects (handles ``.logits`` and dicts)."""
        if isinstance(raw, Tensor):
            return raw
        logits = getattr(raw, "logits", None)
        if isinstance(logits, Tensor):
            return logits
        if isinstance(raw, Mapping) and isinstance(raw.get("logits"), Tensor):
            return raw["logits"]
        if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], Tensor):
            return raw[0]
        raise BatchFormatError(
            f"{type(self).__name__} cannot find the output tensor in a model output of type {type(raw).__name__}; "
            "override outputs(raw) to return the logits/predictions."
        )

    def targets(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Align outputs and targets (e.g. shift for language modelling). Identity by default."""
        return outputs, targets

    # ------------------------------------------------------------------------------------------- driver
    def __call__(
        self, model: nn.Module, batch: Any, params: Mapping[str, Tensor] | None = None, *, validate: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Run the model on a batch and return aligned, validated ``(outputs, targets)``."""
        inputs, targets = self.split(batch)
        raw = self.forward(model, params if params is not None else {}, inputs)
        outputs, targets = self.targets(self.outputs(raw), targets)
        if validate:
            self.loss.validate(outputs.detach(), targets)
        return outputs, targets

    def batch_size(self, batch: Any) -> int:
        """Number of examples in a batch (the leading dimension of the targets)."""
        _, targets = self.split(batch)
        return int(targets.shape[0])

    def to_dict(self) -> dict[str, object]:
        """Plain description for reports and configs."""
        return {"task": type(self).__name__, "loss": self.loss.to_dict()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(loss={self.loss!r})"


class Classification(Task):
    """Classification with softmax cross-entropy (``loss="cross_entropy"``) or binary logistic (``"binary"``).

    Args:
        loss: ``"cross_entropy"`` (default) or ``"binary"``, or a loss instance.

    Example::

        >>> task = Classification()
        >>> out, y = task(torch.nn.Linear(3, 4), (torch.zeros(2, 3), torch.tensor([0, 3])))
        >>> tuple(out.shape)
        (2, 4)
    """

    def __init__(self, loss: str | LossFamily = "cross_entropy") -> None:
        super().__init__(loss)
        if not isinstance(self.loss, (SoftmaxCrossEntropy, BinaryLogistic)):
            raise BatchFormatError(
                f"Classification needs a cross-entropy or binary logistic loss, got {self.loss.name}; "
                "use Regression() for a Gaussian/MSE loss."
            )


class Regression(Task):
    """Regression with a Gaussian negative log-likelihood (squared error / 2 variance).

    Args:
        variance: Noise variance of the Gaussian likelihood (default 1).

    Example::

        >>> Regression().loss.name
        'gaussian_nll'
    """

    def __init__(self, variance: float = 1.0) -> None:
        super().__init__(GaussianNLL(variance))


class LanguageModeling(Task):
    """Next-token prediction with token-level cross-entropy and ``ignore_index``.

    Batches are either a ``LongTensor`` of token ids ``(batch, length)`` (inputs are ``ids[:, :-1]``, targets
    ``ids[:, 1:]``), or an ``(input_ids, labels)`` pair that is already aligned (labels at ``ignore_index`` for
    padding/prompt tokens), or a mapping with ``input_ids`` and optionally ``labels``. The loss is the mean over
    non-ignored target tokens, and one unit of curvature is one token.

    Args:
        ignore_index: Label value excluded from the loss (default ``-100``).
        shift: For mapping batches with ``labels``: whether labels still need the one-step shift (Hugging Face
            convention, default ``True``).

    Example::

        >>> task = LanguageModeling()
        >>> (x,), y = task.split(torch.tensor([[1, 2, 3]]))
        >>> x.tolist(), y.tolist()
        ([[1, 2]], [[2, 3]])
    """

    def __init__(self, ignore_index: int = -100, shift: bool = True) -> None:
        super().__init__(SoftmaxCrossEntropy(ignore_index=ignore_index))
        self.ignore_index = int(ignore_index)
        self.shift = bool(shift)

    def split(self, batch: Any) -> tuple[Inputs, Tensor]:
        """Accept token-id tensors, aligned ``(inputs, labels)`` pairs, or mappings with ``input_ids``."""
        if isinstance(batch, Tensor):
            if batch.ndim != 2 or torch.is_floating_point(batch):
                raise BatchFormatError(
                    f"LanguageModeling expects integer token ids of shape (batch, length), got {batch.dtype} "
                    f"{tuple(batch.shape)}."
                )
            return (batch[:, :-1],), batch[:, 1:]
        if isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise BatchFormatError(
                    f"LanguageModeling got a dict batch with keys {sorted(batch)} but no 'input_ids'; override split()."
                )
            ids = batch["input_ids"]
            labels = batch.get("labels", ids)
            if self.shift:
                return (ids[:, :-1],), labels[:, 1:]
            return (ids,), labels
        return super().split(batch)

    def to_dict(self) -> dict[str, object]:
        """Plain description including ``ignore_index``."""
        return {**super().to_dict(), "ignore_index": self.ignore_index, "shift": self.shift}
