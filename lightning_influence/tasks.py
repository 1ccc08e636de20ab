"""Tasks: how a batch becomes ``(outputs, targets)`` and which loss family scores it.

A :class:`Task` is the one piece of user knowledge the estimators need. It splits a collated batch into
model inputs and targets (:meth:`Task.split`), calls the model (:meth:`Task.forward`, through
``torch.func.functional_call`` so that parameters can be swapped) and post-processes the raw output
(:meth:`Task.outputs`, e.g. ``.logits`` of a Hugging Face model). Custom batch formats are a small subclass::

    class DictClassification(Classification):
        def split(self, batch):
            return (batch["pixel_values"],), batch["labels"]

Mapping batches (Hugging Face style, ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``) need no
subclass: every key but ``labels`` is passed to the model as a keyword argument, ``labels`` are the targets, and a
model output with ``.logits`` (a ``ModelOutput``) is read through it. For a Hugging Face model a 2-D
``attention_mask`` is expanded to the additive 4-D mask the model would build itself (causal for
:class:`LanguageModeling`), which the model uses as is: no mask-building branch that reads tensor values runs,
so ``torch.func.vmap`` and ``jvp`` go through GPT-2 and BERT.

Tasks hold only plain values, so they pickle (``ddp_spawn``) and can be configured from a LightningCLI YAML.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_influence.exceptions import BatchFormatError, ConfigurationError
from lightning_influence.losses import BinaryLogistic, GaussianNLL, LossFamily, SoftmaxCrossEntropy, get_loss

Inputs = tuple[Any, ...]

#: Key of the targets in a mapping batch (the Hugging Face convention).
LABELS_KEY = "labels"


def _accepts_keywords(model: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """Whether ``model.forward`` takes every key of ``kwargs`` as a keyword (or has ``**kwargs``)."""
    cls = type(model)
    if cls not in _FORWARD_KEYWORDS:  # once per class: forward runs at every product
        _FORWARD_KEYWORDS[cls] = _forward_keywords(cls)
    keywords = _FORWARD_KEYWORDS[cls]
    return keywords is None or set(kwargs) <= keywords


_FORWARD_KEYWORDS: dict[type[nn.Module], frozenset[str] | None] = {}


def _forward_keywords(cls: type[nn.Module]) -> frozenset[str] | None:
    """The keyword parameters of ``cls.forward`` (``None``: any keyword)."""
    try:
        sig = inspect.signature(cls.forward)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(name for name, p in sig.parameters.items() if p.kind in kinds)


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is or wraps a Hugging Face ``transformers`` model (a config with an attention implementation).

    A ``LightningModule`` holding the HF model as a submodule (``self.model = GPT2LMHeadModel(cfg)``, with
    ``forward(**batch)`` calling it) counts. The answer is cached per module instance (it is asked at every masked
    forward; the module tree is walked once).

    Returns:
        ``True`` for a ``PreTrainedModel``-like module or a module containing one.

    Example::

        >>> is_hf_model(torch.nn.Linear(2, 2))
        False
    """
    cached = _IS_HF.get(model)
    if cached is None:
        cached = _IS_HF[model] = any(hasattr(getattr(m, "config", None), "_attn_implementation")
                                     for m in model.modules())
    return cached


#: :func:`is_hf_model` per module instance (weak: a dropped model leaves the cache).
_IS_HF: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def expand_attention_mask(mask: Tensor, dtype: torch.dtype, causal: bool) -> Tensor:
    """The additive 4-D attention mask ``(batch, 1, query, key)`` a Hugging Face model builds from a 2-D mask.

    Kept positions are 0 and masked ones the dtype's most negative value; ``causal`` also masks future keys.
    Only tensor arithmetic, so it works under ``torch.func.vmap``.

    Returns:
        The mask, shape ``(batch, 1, length, length)`` (causal) or ``(batch, 1, 1, length)``.

    Example::

        >>> m = expand_attention_mask(torch.tensor([[1, 1, 0]]), torch.float32, causal=True)
        >>> (m[0, 0] == 0).int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 0]]
    """
    keep = mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, L)
    if causal:
        n = mask.shape[-1]
        keep = keep & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(keep, zero, torch.finfo(dtype).min)


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

    #: Whether a 2-D attention mask of a Hugging Face model is expanded causally (decoder language models).
    causal_attention = False

    def __init__(self, loss: str | LossFamily) -> None:
        self.loss: LossFamily = get_loss(loss)

    # -------------------------------------------------------------------------------------------- hooks
    def split(self, batch: Any) -> tuple[Inputs, Tensor]:
        """Split a collated batch into a tuple of positional model inputs and the targets.

        A mapping batch with ``labels`` becomes ``((keyword inputs,), labels)``: a single mapping as the inputs
        means keyword arguments (see :meth:`forward`).

        Returns:
            ``(inputs, targets)`` with ``inputs`` a tuple of positional model inputs.

        Raises:
            BatchFormatError: If the batch is not a ``(inputs, targets)`` pair or a mapping with ``labels``.
        """
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y = batch
            return (x,), y
        if isinstance(batch, Mapping):
            if LABELS_KEY in batch:
                return ({k: v for k, v in batch.items() if k != LABELS_KEY},), batch[LABELS_KEY]
            raise BatchFormatError(
                f"{type(self).__name__} got a dict batch with keys {sorted(batch)} but no 'labels'; add the targets "
                "under 'labels' or subclass the task and override split(batch) -> ((inputs,), targets)."
            )
        kind = f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else (
            f"a {type(batch).__name__}"
        )
        raise BatchFormatError(
            f"{type(self).__name__} expects batches of (inputs, targets) but got {kind}; subclass the task and "
            "override split(batch)."
        )

    def forward(self, model: nn.Module, params: Mapping[str, Tensor], inputs: Inputs) -> Any:
        """Call ``model`` with ``params`` swapped in (other parameters and buffers come from the module).

        ``inputs`` made of one mapping are keyword arguments; a Hugging Face model's 2-D ``attention_mask`` among
        them is expanded by :func:`expand_attention_mask` first.

        Returns:
            The raw model output (a tensor, a ``ModelOutput``, a tuple...).
        """
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            kwargs = dict(inputs[0])
            mask = kwargs.get("attention_mask")
            if isinstance(mask, Tensor) and mask.ndim == 2 and is_hf_model(model):
                dtype = next(iter(params.values())).dtype if params else next(model.parameters()).dtype
                kwargs["attention_mask"] = expand_attention_mask(mask, dtype, self.causal_attention)
            if "input_ids" in kwargs and not _accepts_keywords(model, kwargs):
                # A plain module with forward(ids): the token ids positionally, as for tensor batches.
                return functional_call(model, dict(params), (kwargs["input_ids"],), strict=False)
            return functional_call(model, dict(params), (), kwargs, strict=False)
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

    Dict batches (``{"input_ids": ..., "attention_mask": ..., "labels": ...}``, e.g. for
    ``BertForSequenceClassification``) work as they are: see the module docstring.

    Args:
        loss: ``"cross_entropy"`` (default) or ``"binary"``, or a loss instance.
        label_smoothing: The module's ``CrossEntropyLoss(label_smoothing=...)`` (default 0), so that losses,
            gradients and influence are those of the loss actually trained on.

    Raises:
        BatchFormatError: For a loss that is not a classification loss.
        ConfigurationError: For ``label_smoothing`` with a non-softmax loss or outside ``[0, 1)``.

    Example::

        >>> task = Classification()
        >>> out, y = task(torch.nn.Linear(3, 4), (torch.zeros(2, 3), torch.tensor([0, 3])))
        >>> tuple(out.shape)
        (2, 4)
        >>> Classification(label_smoothing=0.1).loss
        SoftmaxCrossEntropy(ignore_index=-100, label_smoothing=0.1)
    """

    def __init__(self, loss: str | LossFamily = "cross_entropy", label_smoothing: float = 0.0) -> None:
        super().__init__(loss)
        if not isinstance(self.loss, (SoftmaxCrossEntropy, BinaryLogistic)):
            raise BatchFormatError(
                f"Classification needs a cross-entropy or binary logistic loss, got {self.loss.name}; "
                "use Regression() for a Gaussian/MSE loss."
            )
        if label_smoothing:
            if not isinstance(self.loss, SoftmaxCrossEntropy):
                raise ConfigurationError(
                    f"label_smoothing applies to softmax cross-entropy, not {self.loss.name}; drop label_smoothing "
                    "or use loss='cross_entropy'."
                )
            self.loss = SoftmaxCrossEntropy(self.loss.ignore_index, label_smoothing)


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
    padding/prompt tokens), or a Hugging Face mapping with ``input_ids`` and optionally ``attention_mask`` and
    ``labels`` (padded with ``-100``). A mapping is shifted as Hugging Face's causal-LM loss does (``logits[:, :-1]``
    against ``labels[:, 1:]``): the model sees every per-token input without its last position, which a causal
    model's earlier logits do not depend on. Without ``labels`` the labels are the ``input_ids`` with masked
    positions ignored. The loss is the mean over non-ignored target tokens, and one unit of curvature is one token;
    masked tokens count in neither the loss nor the GNH.

    Args:
        ignore_index: Label value excluded from the loss (default ``-100``).
        shift: For mapping batches: whether labels still need the one-step shift (Hugging Face convention,
            default ``True``); ``False`` for labels already aligned with the logits.
        label_smoothing: The training loss's label smoothing (default 0).

    Example::

        >>> task = LanguageModeling()
        >>> (x,), y = task.split(torch.tensor([[1, 2, 3]]))
        >>> x.tolist(), y.tolist()
        ([[1, 2]], [[2, 3]])
        >>> batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 0]])}
        >>> (kw,), y = task.split(batch)
        >>> kw["input_ids"].tolist(), kw["attention_mask"].tolist(), y.tolist()
        ([[5, 6]], [[1, 1]], [[6, -100]])
    """

    causal_attention = True

    def __init__(self, ignore_index: int = -100, shift: bool = True, label_smoothing: float = 0.0) -> None:
        super().__init__(SoftmaxCrossEntropy(ignore_index=ignore_index, label_smoothing=label_smoothing))
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
            return self._split_mapping(batch)
        return super().split(batch)

    def _split_mapping(self, batch: Mapping[str, Any]) -> tuple[Inputs, Tensor]:
        if "input_ids" not in batch:
            raise BatchFormatError(
                f"LanguageModeling got a dict batch with keys {sorted(batch)} but no 'input_ids'; override split()."
            )
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch.get(LABELS_KEY)
        if labels is None:
            labels = ids if mask is None else ids.masked_fill(mask == 0, self.ignore_index)
        kwargs = {k: v for k, v in batch.items() if k != LABELS_KEY}
        if self.shift:  # every per-token input (ids, mask, token types, positions) loses its last position
            length = ids.shape[-1]
            kwargs = {
                k: v[:, :-1] if isinstance(v, Tensor) and v.ndim == 2 and v.shape[-1] == length else v
                for k, v in kwargs.items()
            }
            labels = labels[:, 1:]
        if set(kwargs) == {"input_ids"}:  # ids alone go in positionally: model(ids), for any LM
            return (kwargs["input_ids"],), labels
        return (kwargs,), labels

    def to_dict(self) -> dict[str, object]:
        """Plain description including ``ignore_index``."""
        return {**super().to_dict(), "ignore_index": self.ignore_index, "shift": self.shift}
