r"""Per-example gradients from one batched forward and one backward, by layer hooks (no ``vmap``).

``vmap(grad(...))`` turns every convolution's weight gradient into a grouped convolution with one group per
example, which on a CPU costs about three batched gradients per example on a ResNet. For the layers whose
parameter gradient is an outer product of the layer's input and the gradient at its output, the per-example
gradient can be read off the batched pass instead (Goodfellow 2015; BackPACK's ``BatchGrad``, Opacus' grad
samplers): run the batch forward once with hooks that keep each layer's input, take the gradient of the sum of
the per-example losses with respect to each layer's *output* in one backward (which skips the weight gradients),
and form, per example :math:`b`,

- ``nn.Linear``: :math:`\partial W_b = \sum_t \delta_{bt} x_{bt}^\top`, :math:`\partial b_b = \sum_t \delta_{bt}`;
- ``nn.Conv1d``/``nn.Conv2d`` (any stride, padding, dilation, groups; zero padding): the same product with the
  unfolded (im2col) input, summed over output positions;
- ``nn.BatchNorm*`` in eval mode on running statistics, ``nn.LayerNorm``, ``nn.GroupNorm``: the output gradient
  times the normalised input, summed over the non-channel positions;
- ``nn.Embedding``: the output gradients scattered to the looked-up rows.

In eval mode with running statistics (what :func:`~lightning_influence.evaluator.curvature_mode` sets) examples
do not interact, so the gradient at example :math:`b`'s layer outputs is the gradient of its own loss, and the
result equals ``vmap(grad(...))`` exactly (tested to 1e-12 in float64). The FLOPs are those of one batched weight
gradient; on a ResNet-18 at 32×32 on one CPU thread this is several times faster than ``vmap``.

:func:`hook_plan` decides whether a model qualifies: every trainable parameter must be the ``weight``/``bias``
of one of the layers above, owned by exactly one module (no tied weights), with options the formulas cover.
A parameter read outside its module's ``forward`` (``F.linear(h, self.embed.weight)``) cannot be seen by
hooks; :class:`~lightning_influence.evaluator.Evaluator` therefore compares this path with ``vmap`` on the
first two examples once per model and keeps ``vmap`` if they differ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_influence.exceptions import ConfigurationError

__all__ = ["HookPlan", "UnsupportedModel", "check_out", "hook_plan", "per_sample_gradients"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, *_NORMS)


class UnsupportedModel(RuntimeError):
    """Raised when the hook path cannot compute a model's per-example gradients (the caller uses ``vmap``).

    Example::

        >>> issubclass(UnsupportedModel, RuntimeError)
        True
    """


@dataclass(frozen=True)
class HookPlan:
    """Which module owns which trainable parameter, and where its slice of the flat gradient starts.

    Example::

        >>> lin = torch.nn.Linear(3, 2)
        >>> hook_plan(lin, dict(lin.named_parameters())).slots
        {'': (('weight', 0, 6), ('bias', 6, 2))}
    """

    #: module name -> ((attribute, flat offset, numel), ...) for its trainable ``weight``/``bias``
    slots: Mapping[str, tuple[tuple[str, int, int], ...]]
    num_params: int


def _module_ok(m: nn.Module) -> bool:
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return m.padding_mode == "zeros" and (not isinstance(m.padding, str) or m.padding == "valid")
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        # Eval mode on running statistics only: batch statistics couple the examples of a batch.
        return not m.training and m.running_mean is not None and m.running_var is not None
    if isinstance(m, nn.Embedding):
        return m.max_norm is None and not m.scale_grad_by_freq and not m.sparse
    return isinstance(m, _SUPPORTED)


def hook_plan(model: nn.Module, params: Mapping[str, Tensor]) -> HookPlan | None:
    """The plan for ``params`` (a tree in ``named_parameters`` order), or ``None`` if some parameter is not covered.

    Call it with the model in the mode the gradients are taken in (BatchNorm qualifies in eval mode only).

    Returns:
        The plan, or ``None``.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1)).eval()
        >>> plan = hook_plan(net, dict(net.named_parameters()))
        >>> plan.num_params, sorted(plan.slots)
        (11, ['0', '2'])
        >>> hook_plan(torch.nn.GRU(2, 2), dict(torch.nn.GRU(2, 2).named_parameters())) is None
        True
    """
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    modules = dict(model.named_modules())
    by_name = dict(model.named_parameters())
    slots: dict[str, list[tuple[str, int, int]]] = {}
    offset = 0
    for name, value in params.items():
        mod_name, _, attr = name.rpartition(".")
        module = modules.get(mod_name)
        param = by_name.get(name)
        if (module is None or param is None or attr not in ("weight", "bias") or not _module_ok(module)
                or owners.get(id(param), 0) != 1):
            return None
        slots.setdefault(mod_name, []).append((attr, offset, value.numel()))
        offset += value.numel()
    return HookPlan({k: tuple(v) for k, v in slots.items()}, offset)


# ------------------------------------------------------------------------------------------ formulas
# Each formula writes example b's gradient of each trainable attribute into out[attr][b] (views into the rows of the
# gradient matrix, so the largest products land in place without a temporary).
Out = dict[str, Tensor]


def _linear(m: nn.Linear, x: Tensor, d: Tensor, out: Out) -> None:
    b = x.shape[0]
    x3, d3 = x.reshape(b, -1, x.shape[-1]), d.reshape(b, -1, d.shape[-1])
    if "weight" in out:
        torch.bmm(d3.transpose(1, 2), x3, out=out["weight"])
    if "bias" in out:
        torch.sum(d3, 1, out=out["bias"])


def _conv_geometry(m: nn.Conv1d | nn.Conv2d) -> tuple[list[int], list[int], list[int]]:
    k = len(m.kernel_size)
    padding = [0] * k if isinstance(m.padding, str) else list(m.padding)
    return list(m.stride), padding, list(m.dilation)


def _conv(m: nn.Conv1d | nn.Conv2d, x: Tensor, d: Tensor, out: Out) -> None:
    b = x.shape[0]
    stride, padding, dilation = _conv_geometry(m)
    delta = d.reshape(b, d.shape[1], -1)  # (b, c_out, L)
    if "bias" in out:
        torch.sum(delta, 2, out=out["bias"])
    if "weight" not in out:
        return
    positions = delta.shape[-1]
    if positions > m.out_channels:
        # Many output positions (early, wide layers): im2col would hold c_in k L values per example, so take one
        # weight-only convolution backward per example instead (measured faster there on one CPU thread).
        for i in range(b):
            _, gw, _ = torch.ops.aten.convolution_backward(
                d[i : i + 1], x[i : i + 1], m.weight, None, stride, padding, dilation, False, [0] * len(stride),
                m.groups, [False, True, False])
            out["weight"][i].copy_(gw)
        return
    if isinstance(m, nn.Conv1d):  # im2col as a 2-D convolution over a height-1 image
        x = x.unsqueeze(-2)
        stride, padding, dilation = [1, *stride], [0, *padding], [1, *dilation]
    kernel = [1, *m.kernel_size] if isinstance(m, nn.Conv1d) else list(m.kernel_size)
    cols = F.unfold(x, tuple(kernel), dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
    if cols.shape[-1] != positions:
        raise UnsupportedModel(f"{type(m).__name__}: unfolded positions {cols.shape[-1]} != outputs {positions}")
    g = m.groups
    if g == 1:
        torch.bmm(delta, cols.transpose(1, 2), out=out["weight"].reshape(b, m.out_channels, -1))
        return
    cols = cols.reshape(b * g, cols.shape[1] // g, -1)
    per_group = torch.bmm(delta.reshape(b * g, -1, positions), cols.transpose(1, 2))  # (b g, c_out / g, c_in k / g)
    out["weight"].copy_(per_group.reshape(out["weight"].shape))


def _normalised(m: nn.Module, x: Tensor) -> Tensor:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        assert m.running_mean is not None and m.running_var is not None
        return (x - m.running_mean.reshape(shape)) * torch.rsqrt(m.running_var.reshape(shape) + m.eps)
    if isinstance(m, nn.LayerNorm):
        dims = tuple(range(x.ndim - len(m.normalized_shape), x.ndim))
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        return (x - mean) * torch.rsqrt(var + m.eps)
    assert isinstance(m, nn.GroupNorm)
    xg = x.reshape(x.shape[0], m.num_groups, -1)
    var, mean = torch.var_mean(xg, dim=2, correction=0, keepdim=True)
    return ((xg - mean) * torch.rsqrt(var + m.eps)).reshape(x.shape)


def _norm(m: nn.Module, x: Tensor, d: Tensor, out: Out) -> None:
    b = x.shape[0]
    # LayerNorm: weight shaped like normalized_shape, summed over the positions before it; else per channel.
    k = len(m.normalized_shape) if isinstance(m, nn.LayerNorm) else 0
    shape = (b, -1, *x.shape[x.ndim - k:]) if k else (b, x.shape[1], -1)
    dim = 1 if k else 2
    if "weight" in out:  # out views are (b, C) per channel, or (b, *normalized_shape)
        torch.sum((d * _normalised(m, x)).reshape(shape), dim, out=out["weight"])
    if "bias" in out:
        torch.sum(d.reshape(shape), dim, out=out["bias"])


def _embedding(m: nn.Embedding, x: Tensor, d: Tensor, out: Out) -> None:
    b, v, dim = x.shape[0], m.num_embeddings, m.embedding_dim
    rows = (x.reshape(b, -1) + v * torch.arange(b, device=x.device).unsqueeze(1)).reshape(-1)
    grads = torch.zeros(b * v, dim, dtype=d.dtype, device=d.device).index_add_(0, rows, d.reshape(-1, dim))
    grads = grads.reshape(b, v, dim)
    if m.padding_idx is not None:
        grads[:, m.padding_idx] = 0
    out["weight"].copy_(grads)


def _formula(m: nn.Module) -> Callable[[Any, Tensor, Tensor, Out], None]:
    if isinstance(m, nn.Linear):
        return _linear
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return _conv
    if isinstance(m, nn.Embedding):
        return _embedding
    return _norm


# ---------------------------------------------------------------------------------------------- driver
def check_out(out: Tensor, batch_size: int, num_params: int, dtype: torch.dtype, device: torch.device) -> None:
    """Check a gradient buffer: a contiguous ``(batch_size, num_params)`` tensor of ``dtype`` on ``device``.

    Raises:
        ConfigurationError: Naming the expected and the given shape, dtype and device.

    Example::

        >>> check_out(torch.empty(2, 3), 2, 3, torch.float32, torch.device("cpu"))
    """
    if out.shape != (batch_size, num_params) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ConfigurationError(
            f"out must be a contiguous ({batch_size}, {num_params}) {dtype} tensor on {device}, got "
            f"{'' if out.is_contiguous() else 'a non-contiguous '}{tuple(out.shape)} {out.dtype} on {out.device}.")


def per_sample_gradients(
    model: nn.Module, plan: HookPlan, loss_fn: Callable[[], Tensor], batch_size: int, dtype: torch.dtype,
    device: torch.device, out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-example flat gradients ``(batch_size, P)`` and per-example losses of one batched forward.

    Args:
        model: The module whose hooked layers ``loss_fn`` runs (parameters may be swapped in by
            ``functional_call``; they must require grad so the layer outputs do).
        plan: From :func:`hook_plan`.
        loss_fn: Runs the forward and returns the per-example losses ``(batch_size,)``.
        batch_size: Examples in the batch.
        dtype: Dtype of the gradient matrix.
        device: Its device.
        out: A contiguous ``(batch_size, P)`` matrix of that dtype and device to write the gradients into (returned
            as ``grads``). Reusing one buffer across batches saves the first-touch page faults of a fresh
            allocation, which on a ResNet-18 (11M parameters, 64 examples: 2.9 GB) cost more than the gradients.

    Returns:
        ``(grads, losses)``, detached.

    Raises:
        UnsupportedModel: If a hooked layer's input was modified in place after the layer ran, or the losses are
            not one per example.
        ConfigurationError: If ``out`` is not such a matrix.
    """
    modules = dict(model.named_modules())
    records: list[tuple[str, Tensor, int, Tensor]] = []  # (module, input, input version, output)

    def make_hook(name: str) -> Callable[..., Tensor]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            x = args[0]
            records.append((name, x.detach(), x._version, output))
            # Later in-place ops (ReLU(inplace=True), `out += identity`) act on a copy, so `output` stays the tensor
            # whose gradient this layer's formula needs.
            return output.clone()

        return hook

    handles = [modules[name].register_forward_hook(make_hook(name)) for name in plan.slots]
    try:
        losses = loss_fn()
    finally:
        for h in handles:
            h.remove()
    if losses.shape != (batch_size,):
        raise UnsupportedModel(f"per-example losses of shape {tuple(losses.shape)}, expected ({batch_size},)")
    if not records:
        raise UnsupportedModel("no hooked layer ran")
    outputs = [r[3] for r in records]
    deltas = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
    # Every slot is written before it is read: no zero-fill of the (batch, P) matrix (at P = 1e7 that alone costs
    # as much as the per-example products); a module that ran more than once adds its later calls.
    with torch.no_grad():
        return _assemble(plan, modules, records, deltas, batch_size, dtype, device, out), losses.detach()


def _assemble(
    plan: HookPlan, modules: Mapping[str, nn.Module], records: list[tuple[str, Tensor, int, Tensor]],
    deltas: tuple[Tensor | None, ...], batch_size: int, dtype: torch.dtype, device: torch.device,
    out: Tensor | None = None,
) -> Tensor:
    if out is None:
        grads = torch.empty(batch_size, plan.num_params, dtype=dtype, device=device)
    else:
        check_out(out, batch_size, plan.num_params, dtype, device)
        grads = out
    written: set[str] = set()
    for (name, x, version, _), delta in zip(records, deltas, strict=True):
        if x._version != version:
            raise UnsupportedModel(f"the input of {name!r} was modified in place after the layer ran")
        if delta is None:
            continue
        if delta.dtype != dtype or (x.is_floating_point() and x.dtype != dtype):
            raise UnsupportedModel(f"{name!r} runs in {delta.dtype}, the gradients are {dtype}")
        module = modules[name]
        views = {attr: grads[:, start : start + numel].view(batch_size, *getattr(module, attr).shape)
                 for attr, start, numel in plan.slots[name]}
        if name not in written:
            _formula(module)(module, x, delta, views)
            written.add(name)
            continue
        extra = {attr: torch.empty(v.shape, dtype=dtype, device=device) for attr, v in views.items()}
        _formula(module)(module, x, delta, extra)
        for attr, v in views.items():
            v += extra[attr]
    for name, slots in plan.slots.items():
        if name not in written:  # never ran, or does not reach the loss
            for _, start, numel in slots:
                grads[:, start : start + numel] = 0
    return grads
