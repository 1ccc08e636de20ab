r"""Exponential-family losses with their output-space curvature.

Each loss is the negative log-likelihood of an exponential family in its canonical (natural) parameter
``h`` (the model output), so three quantities have closed forms that the operators use:

* the output-space Hessian product :math:`S_h v = \nabla_h^2 \ell(h, y)\, v`, which does not depend on ``y``;
* the output gradient :math:`\nabla_h \ell(h, y)` (for the sampled-label Fisher);
* the Bregman divergence :math:`D(h, h', y) = \ell(h, y) - \ell(h', y) - (h - h')^\top \nabla_h \ell(h', y)`,
  which for these families equals :math:`\mathrm{KL}(p_{h'} \,\|\, p_h)` and is the data term of the PBRF.

Losses act on *units*: one unit is one example for classification and regression, and one token for
language modelling. Every loss reports ``(sum, count)`` so that means, and their distributed reductions,
are always "sum over units divided by the number of non-ignored units".

For canonical exponential families the Fisher with labels drawn from the model equals the Gauss-Newton
Hessian (GNH): :math:`\mathbb{E}_{\hat y \sim p_h} \nabla_h \ell(h,\hat y) \nabla_h \ell(h,\hat y)^\top = S_h`.
:meth:`LossFamily.expected_fisher_output_vp` computes the left-hand side by explicit enumeration, an
independent path that the tests compare with :meth:`LossFamily.output_hvp`.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_influence.exceptions import BatchFormatError, ConfigurationError


class LossFamily(ABC):
    """Negative log-likelihood of an exponential family in its natural parameter (the model output).

    Example::

        >>> loss = get_loss("cross_entropy")
        >>> isinstance(loss, LossFamily)
        True
        >>> h = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
        >>> y, v = torch.tensor([2]), torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
        >>> s_v = loss.output_hvp(h, y, v)  # closed form (diag(p) - p p^T) v
        >>> torch.allclose(s_v, loss.expected_fisher_output_vp(h, y, v))  # Fisher = GNH (canonical family)
        True
        >>> total, count = loss.sum_and_count(h, y)
        >>> round(float(total), 4), int(count)
        (0.2413, 1)
    """

    #: Short name used in reports and errors.
    name: str = "loss"

    # ----------------------------------------------------------------------------------------------- shape
    @abstractmethod
    def validate(self, outputs: Tensor, targets: Tensor) -> None:
        """Raise :class:`BatchFormatError` naming the problem if ``outputs`` and ``targets`` do not fit."""

    @abstractmethod
    def unit_mask(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Boolean mask over units (``True`` = counted), shaped like the unit dimensions."""

    # ------------------------------------------------------------------------------------------- values
    @abstractmethod
    def unit_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-unit losses, zero at ignored units."""

    def sum_and_count(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Sum of unit losses and number of counted units (as a tensor, for reductions)."""
        mask = self.unit_mask(outputs, targets)
        return self.unit_losses(outputs, targets).sum(), mask.sum().to(outputs.dtype)

    def mean(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean loss over counted units (the training objective's convention)."""
        total, count = self.sum_and_count(outputs, targets)
        return total / count.clamp_min(1.0)

    def per_example(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example loss sums and unit counts, each of shape ``(batch,)``."""
        losses = self.unit_losses(outputs, targets)
        mask = self.unit_mask(outputs, targets).to(outputs.dtype)
        if losses.ndim == 1:
            return losses, mask
        return losses.reshape(losses.shape[0], -1).sum(1), mask.reshape(mask.shape[0], -1).sum(1)

    # ---------------------------------------------------------------------------------------- curvature
    @abstractmethod
    def output_hvp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        """Closed-form :math:`S_h v` per unit (shape of ``outputs``), zero at ignored units."""

    def output_hvp_map(self, outputs: Tensor, targets: Tensor) -> Callable[[Tensor], Tensor]:
        """:meth:`output_hvp` at fixed outputs as a map, with what does not depend on ``v`` computed once.

        Cached linearisations multiply one batch's output Hessian by many tangents (a softmax per product costs a
        tenth of a small model's gradient).

        Returns:
            ``v -> S_h v``, accepting leading column dimensions like :meth:`output_hvp`.
        """
        return functools.partial(self.output_hvp, outputs, targets)

    @abstractmethod
    def output_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        r""":math:`\nabla_h \ell(h, y)` per unit (shape of ``outputs``), zero at ignored units."""

    @abstractmethod
    def expected_fisher_output_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        r""":math:`\sum_y p_h(y) g_y g_y^\top v` by explicit enumeration/expectation (independent of ``output_hvp``)."""

    @abstractmethod
    def sample_targets(
        self, outputs: Tensor, targets: Tensor, generator: torch.Generator, num_samples: int | None = None
    ) -> Tensor:
        """Labels drawn from the model's predictive distribution; ignored units stay ignored.

        With ``num_samples`` the result has a leading dimension of that size (all draws in one call), and
        :meth:`output_grad` accepts such stacked targets.
        """

    @abstractmethod
    def bregman(self, outputs: Tensor, ref_outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-unit Bregman divergence :math:`D(h, h', y)` with ``h' = ref_outputs``; zero at ignored units."""

    def to_dict(self) -> dict[str, object]:
        """Plain description for reports."""
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _check_floating(outputs: Tensor, who: str) -> None:
    if not torch.is_floating_point(outputs):
        raise BatchFormatError(f"{who}: model outputs must be floating point, got dtype {outputs.dtype}.")


class SoftmaxCrossEntropy(LossFamily):
    r"""Softmax cross-entropy over the last dimension, for classification and token-level language modelling.

    Outputs are logits of shape ``(..., K)`` and targets integer class indices of shape ``(...)``. Units whose
    target equals ``ignore_index`` are excluded from sums and counts, so the mean is over non-ignored tokens,
    matching ``torch.nn.functional.cross_entropy(..., ignore_index=...)``.

    .. math:: \ell(h, y) = -q^\top \log \mathrm{softmax}(h), \quad q = (1-\varepsilon) e_y + \varepsilon/K,
        \qquad \nabla_h \ell = p - q, \qquad S_h = \mathrm{diag}(p) - p p^\top.

    With label smoothing :math:`\varepsilon` (``torch.nn.CrossEntropyLoss(label_smoothing=...)``) the target is the
    smoothed distribution :math:`q`; because :math:`\sum_k q_k = 1`, the output Hessian :math:`S_h` (hence the GNH
    and the expected Fisher) and the Bregman divergence are those of plain cross-entropy; the loss and its gradient
    :math:`p - q` change.

    Args:
        ignore_index: Target value that marks a unit to ignore (default ``-100``, as in PyTorch).
        label_smoothing: :math:`\varepsilon \in [0, 1)`, as in ``torch.nn.functional.cross_entropy``
            (default 0).

    Raises:
        ConfigurationError: For ``label_smoothing`` outside ``[0, 1)``.

    Example::

        >>> loss = SoftmaxCrossEntropy()
        >>> h, y = torch.zeros(2, 3), torch.tensor([0, 2])
        >>> round(float(loss.mean(h, y)), 4)
        1.0986
    """

    name = "softmax_cross_entropy"

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0) -> None:
        self.ignore_index = int(ignore_index)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ConfigurationError(
                f"label_smoothing must lie in [0, 1), got {label_smoothing!r}; pass the value the module's "
                "CrossEntropyLoss uses (0 for none)."
            )
        self.label_smoothing = float(label_smoothing)

    def validate(self, outputs: Tensor, targets: Tensor) -> None:
        """Check logits ``(..., K)`` against integer targets ``(...)``."""
        _check_floating(outputs, self.name)
        if outputs.ndim < 2:
            raise BatchFormatError(
                f"{self.name}: logits must have shape (batch, ..., num_classes), got {tuple(outputs.shape)}. "
                "For a single logit per example use BinaryLogistic (Classification(loss='binary'))."
            )
        if torch.is_floating_point(targets):
            hint = " They have the shape of the outputs: is this a regression? Use Regression()." if (
                targets.shape == outputs.shape
            ) else ""
            raise BatchFormatError(
                f"{self.name}: targets must be integer class indices, got dtype {targets.dtype}.{hint}"
            )
        if tuple(targets.shape) != tuple(outputs.shape[:-1]):
            raise BatchFormatError(
                f"{self.name}: targets of shape {tuple(targets.shape)} do not match logits of shape "
                f"{tuple(outputs.shape)}; expected targets of shape {tuple(outputs.shape[:-1])}."
            )
        valid = targets[targets != self.ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= outputs.shape[-1]):
            raise BatchFormatError(
                f"{self.name}: target values must lie in [0, {outputs.shape[-1]}) or equal ignore_index="
                f"{self.ignore_index}; got range [{int(valid.min())}, {int(valid.max())}]."
            )

    def unit_mask(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Non-ignored units."""
        return targets != self.ignore_index

    def unit_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-unit cross-entropy."""
        k = outputs.shape[-1]
        flat = F.cross_entropy(
            outputs.reshape(-1, k), targets.reshape(-1), ignore_index=self.ignore_index, reduction="none",
            label_smoothing=self.label_smoothing,
        )
        return flat.reshape(targets.shape)

    def output_hvp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        r""":math:`(\mathrm{diag}(p) - pp^\top) v`."""
        return self.output_hvp_map(outputs, targets)(v)

    def output_hvp_map(self, outputs: Tensor, targets: Tensor) -> Callable[[Tensor], Tensor]:
        """The softmax, masked at ignored units (a 0/1 factor of ``p`` masks the whole product), taken once."""
        p = torch.softmax(outputs, dim=-1) * self.unit_mask(outputs, targets).unsqueeze(-1).to(outputs.dtype)

        def product(v: Tensor) -> Tensor:
            pv = p * v
            return pv - p * pv.sum(-1, keepdim=True)

        return product

    def output_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """:math:`p - q` (:math:`q = e_y` without label smoothing)."""
        mask = targets != self.ignore_index  # may carry a leading sample dimension
        p = torch.softmax(outputs, dim=-1)
        k = outputs.shape[-1]
        q = F.one_hot(torch.where(mask, targets, 0), k).to(p.dtype)
        if self.label_smoothing:
            q = (1.0 - self.label_smoothing) * q + self.label_smoothing / k
        return (p - q) * mask.unsqueeze(-1).to(p.dtype)

    def expected_fisher_output_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        r""":math:`\sum_k p_k (p - e_k)(p - e_k)^\top v`, enumerating all ``K`` labels."""
        p = torch.softmax(outputs, dim=-1)
        eye = torch.eye(outputs.shape[-1], dtype=p.dtype, device=p.device)
        g = p.unsqueeze(-2) - eye  # (..., K labels, K outputs): g[..., k, :] = p - e_k
        coef = p * (g @ v.unsqueeze(-1)).squeeze(-1)  # p_k * (g_k . v)
        out = (coef.unsqueeze(-1) * g).sum(-2)
        return out * self.unit_mask(outputs, targets).unsqueeze(-1).to(out.dtype)

    def sample_targets(
        self, outputs: Tensor, targets: Tensor, generator: torch.Generator, num_samples: int | None = None
    ) -> Tensor:
        """Categorical draws from ``softmax(outputs)``."""
        k = outputs.shape[-1]
        m = 1 if num_samples is None else num_samples
        p = torch.softmax(outputs.detach(), dim=-1).reshape(-1, k)
        draws = torch.multinomial(p.to(generator.device), m, replacement=True, generator=generator)
        draws = draws.T.reshape(m, *targets.shape).to(targets.device)
        draws = torch.where(self.unit_mask(outputs, targets), draws, targets)
        return draws[0] if num_samples is None else draws

    def bregman(self, outputs: Tensor, ref_outputs: Tensor, targets: Tensor) -> Tensor:
        r""":math:`\mathrm{KL}(\mathrm{softmax}(h') \| \mathrm{softmax}(h))`."""
        logp = torch.log_softmax(outputs, dim=-1)
        logq = torch.log_softmax(ref_outputs, dim=-1)
        kl = (logq.exp() * (logq - logp)).sum(-1)
        return kl * self.unit_mask(outputs, targets).to(kl.dtype)


#: Token-level cross-entropy is softmax cross-entropy over ``(batch, seq, vocab)`` logits with ``ignore_index``.
TokenCrossEntropy = SoftmaxCrossEntropy


class BinaryLogistic(LossFamily):
    r"""Binary logistic loss on one logit per example, targets in ``{0, 1}``.

    .. math:: \ell(h, y) = \log(1 + e^h) - y h, \qquad S_h = \sigma(h)(1 - \sigma(h)).

    Example::

        >>> round(float(BinaryLogistic().mean(torch.zeros(4), torch.tensor([0, 1, 1, 0]))), 4)
        0.6931
    """

    name = "binary_logistic"

    @staticmethod
    def _flat(outputs: Tensor) -> Tensor:
        return outputs.reshape(outputs.shape[0]) if outputs.ndim == 2 and outputs.shape[1] == 1 else outputs

    def validate(self, outputs: Tensor, targets: Tensor) -> None:
        """Check one logit per example against 0/1 targets of the same length."""
        _check_floating(outputs, self.name)
        if not (outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1)):
            raise BatchFormatError(
                f"{self.name}: expected one logit per example, shape (batch,) or (batch, 1), got "
                f"{tuple(outputs.shape)}. For several classes use Classification() (softmax cross-entropy)."
            )
        if targets.numel() != outputs.shape[0]:
            raise BatchFormatError(
                f"{self.name}: {targets.numel()} targets for {outputs.shape[0]} logits; targets must have shape "
                "(batch,) or (batch, 1)."
            )
        bad = (targets != 0) & (targets != 1)
        if bool(bad.any()):
            raise BatchFormatError(f"{self.name}: targets must be 0 or 1; found {targets[bad][:3].tolist()}.")

    def unit_mask(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """All units count."""
        return torch.ones(outputs.shape[0], dtype=torch.bool, device=outputs.device)

    def unit_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example logistic loss."""
        h = self._flat(outputs)
        return F.softplus(h) - targets.reshape(h.shape).to(h.dtype) * h

    def output_hvp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        r""":math:`\sigma(1-\sigma) v`."""
        s = torch.sigmoid(outputs)
        return s * (1 - s) * v

    def output_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        r""":math:`\sigma(h) - y`."""
        y = (
            targets.reshape(outputs.shape)
            if targets.numel() == outputs.numel()
            else targets.reshape(-1, *outputs.shape)
        )
        return torch.sigmoid(outputs) - y.to(outputs.dtype)

    def expected_fisher_output_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        r""":math:`\sigma (\sigma - 1)^2 v + (1 - \sigma) \sigma^2 v` (both labels enumerated)."""
        s = torch.sigmoid(outputs)
        return (s * (s - 1) ** 2 + (1 - s) * s**2) * v

    def sample_targets(
        self, outputs: Tensor, targets: Tensor, generator: torch.Generator, num_samples: int | None = None
    ) -> Tensor:
        """Bernoulli draws with probability ``sigmoid(outputs)``."""
        p = torch.sigmoid(outputs.detach()).reshape(targets.shape).to(generator.device)
        if num_samples is not None:
            p = p.expand(num_samples, *p.shape)
        return torch.bernoulli(p, generator=generator).to(device=targets.device, dtype=targets.dtype)

    def bregman(self, outputs: Tensor, ref_outputs: Tensor, targets: Tensor) -> Tensor:
        """KL between the Bernoulli distributions of ``ref_outputs`` and ``outputs``."""
        h, r = self._flat(outputs), self._flat(ref_outputs)
        q = torch.sigmoid(r)
        return q * (F.logsigmoid(r) - F.logsigmoid(h)) + (1 - q) * (F.logsigmoid(-r) - F.logsigmoid(-h))


class GaussianNLL(LossFamily):
    r"""Gaussian negative log-likelihood with fixed variance (squared error), summed over output dimensions.

    .. math:: \ell(h, y) = \frac{\|h - y\|^2}{2\sigma^2}, \qquad S_h = I / \sigma^2.

    Note this is ``0.5 / variance`` times PyTorch's ``mse_loss(reduction="sum")`` per example; the curvature
    scales accordingly, so use the same loss for training if you compare magnitudes.

    Args:
        variance: The fixed noise variance :math:`\sigma^2` (default 1).

    Raises:
        ConfigurationError: If ``variance`` is not positive.

    Example::

        >>> float(GaussianNLL().mean(torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2)))
        1.0
    """

    name = "gaussian_nll"

    def __init__(self, variance: float = 1.0) -> None:
        if not variance > 0:
            raise ConfigurationError(f"GaussianNLL(variance={variance}): the variance must be positive.")
        self.variance = float(variance)

    def validate(self, outputs: Tensor, targets: Tensor) -> None:
        """Check targets shaped exactly like the outputs."""
        _check_floating(outputs, self.name)
        if tuple(targets.shape) != tuple(outputs.shape):
            raise BatchFormatError(
                f"{self.name}: targets of shape {tuple(targets.shape)} do not match outputs of shape "
                f"{tuple(outputs.shape)}; reshape them (e.g. y.view(-1, 1)) so that they agree exactly."
            )
        if not torch.is_floating_point(targets):
            raise BatchFormatError(
                f"{self.name}: regression targets must be floating point, got {targets.dtype}. Integer labels "
                "suggest classification: use Classification()."
            )

    def unit_mask(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """All examples count."""
        return torch.ones(outputs.shape[0], dtype=torch.bool, device=outputs.device)

    def unit_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example squared error over all output dimensions, divided by ``2 variance``."""
        diff = (outputs - targets.to(outputs.dtype)).reshape(outputs.shape[0], -1)
        return 0.5 * (diff**2).sum(1) / self.variance

    def output_hvp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        r""":math:`v / \sigma^2`."""
        return v / self.variance

    def output_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        r""":math:`(h - y) / \sigma^2`."""
        return (outputs - targets.to(outputs.dtype)) / self.variance

    def expected_fisher_output_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        r""":math:`\mathbb{E}[(h-y)(h-y)^\top] v / \sigma^4 = v / \sigma^2` for :math:`y \sim N(h, \sigma^2 I)`."""
        second_moment = self.variance  # E[(h - y)_i (h - y)_j] = variance * delta_ij
        return second_moment * v / self.variance**2

    def sample_targets(
        self, outputs: Tensor, targets: Tensor, generator: torch.Generator, num_samples: int | None = None
    ) -> Tensor:
        """``outputs + sigma * noise``."""
        shape = outputs.shape if num_samples is None else (num_samples, *outputs.shape)
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=outputs.dtype)
        return (outputs.detach() + noise.to(outputs.device) * self.variance**0.5).to(targets.dtype)

    def bregman(self, outputs: Tensor, ref_outputs: Tensor, targets: Tensor) -> Tensor:
        r""":math:`\|h - h'\|^2 / (2\sigma^2)` per example."""
        diff = (outputs - ref_outputs).reshape(outputs.shape[0], -1)
        return 0.5 * (diff**2).sum(1) / self.variance


def get_loss(name: str | LossFamily) -> LossFamily:
    """Resolve a loss by name (``"cross_entropy"``, ``"binary"``, ``"mse"``/``"gaussian"``) or pass one through.

    Returns:
        The :class:`LossFamily` instance (``name`` itself when it already is one).

    Raises:
        ConfigurationError: For an unknown name; the message lists the known ones.

    Example::

        >>> get_loss("binary").name
        'binary_logistic'
    """
    if isinstance(name, LossFamily):
        return name
    table: dict[str, type[LossFamily]] = {
        "cross_entropy": SoftmaxCrossEntropy,
        "ce": SoftmaxCrossEntropy,
        "softmax_cross_entropy": SoftmaxCrossEntropy,
        "binary": BinaryLogistic,
        "binary_logistic": BinaryLogistic,
        "bce": BinaryLogistic,
        "mse": GaussianNLL,
        "gaussian": GaussianNLL,
        "gaussian_nll": GaussianNLL,
    }
    if name not in table:
        raise ConfigurationError(
            f"unknown loss {name!r}; choose one of {sorted(table)} or pass a LossFamily instance. Only "
            "exponential-family negative log-likelihoods have a GNH equal to their Fisher."
        )
    return table[name]()
