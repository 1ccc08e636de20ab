r"""The model as a function of its trainable parameters under a :class:`~lightning_influence.tasks.Task`.

:class:`Evaluator` is the one place where a batch becomes outputs, losses and gradients at any parameter vector:
curvature operators take their output function from it, approximate CV and PBRF evaluate losses and gradients at
refitted parameters with it, and influence streams per-example gradients from it. Parameters are swapped in with
``torch.func.functional_call``, so the module's own weights and ``.grad`` fields are never touched.

:func:`curvature_mode` is the context every computation runs in: eval mode (dropout off, BatchNorm on running
statistics), autograd forced on (also under Lightning's ``inference_mode`` hooks), the math attention kernel (fused
kernels have no forward-mode derivative), and every submodule's training flag restored on exit.

All sums here are *local* (this process's batches); callers finish them with one
:func:`~lightning_influence.distributed.reduce_packed` per quantity.

Example::

    >>> from lightning_influence.tasks import Regression
    >>> m = torch.nn.Linear(1, 1, bias=False)
    >>> torch.nn.init.ones_(m.weight)
    Parameter containing:
    tensor([[1.]], requires_grad=True)
    >>> ev = Evaluator(m, Regression())
    >>> total, g, count = ev.value_and_grad([(torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1))])
    >>> float(total), g.tolist(), float(count)   # sum of (w x)^2 / 2 and its gradient sum x^2 w
    (2.5, [5.0], 2.0)
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, jacrev, vmap
from torch.utils._pytree import tree_map

from lightning_influence.data import prepare_batch
from lightning_influence.distributed import ReduceFn, reduce_packed
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.params import ParamTree, flatten, num_parameters, trainable_parameters, unflatten
from lightning_influence.per_sample import HookPlan, UnsupportedModel, check_out, hook_plan, per_sample_gradients
from lightning_influence.tasks import Task

__all__ = ["Evaluator", "Normalization", "curvature_mode"]

Normalization = str  # "sum" (default) or "mean" over an example's units
PER_EXAMPLE_METHODS = ("auto", "vmap")

# model -> {plan key: hook path agrees with autograd}; checked once per model and parameter set, forgotten with it
_HOOKS_VERIFIED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, ...], bool]] = weakref.WeakKeyDictionary()


def _plan_key(plan: HookPlan) -> tuple[str, ...]:
    return tuple(f"{m}.{a}" for m, slots in plan.slots.items() for a, _, _ in slots)


def _rows(inputs: Any, rows: slice) -> Any:
    return tree_map(lambda t: t[rows] if isinstance(t, Tensor) else t, inputs)


class _GlobalSwitches:
    """The process-global switches curvature_mode sets, counted so that nested and concurrent entries compose.

    nn.MultiheadAttention / TransformerEncoderLayer take a fused eval-mode "fast path" without forward-mode AD, and
    the fused attention kernels (flash, memory-efficient, cuDNN) have no forward-mode derivative: the math backend
    computes the same attention and supports jvp, vmap and double backward. These are process-wide flags, so the
    first of nested (or concurrent, one per thread) entries saves them and the last exit restores them, under a
    lock. Set directly rather than through ``sdpa_kernel`` (20 us a call, a tenth of a small model's product
    overhead).
    """

    _lock = threading.Lock()
    _depth = 0
    _saved: tuple[bool, ...] = ()
    _attention = ("flash", "mem_efficient", "cudnn", "math")

    @classmethod
    def enter(cls) -> None:
        with cls._lock:
            if cls._depth == 0:
                cuda = torch.backends.cuda
                cls._saved = (torch.backends.mha.get_fastpath_enabled(),
                              *(getattr(cuda, f"{k}_sdp_enabled")() for k in cls._attention))
                torch.backends.mha.set_fastpath_enabled(False)
                for k in cls._attention:
                    getattr(cuda, f"enable_{k}_sdp")(k == "math")
            cls._depth += 1

    @classmethod
    def exit(cls) -> None:
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0:
                torch.backends.mha.set_fastpath_enabled(cls._saved[0])
                for k, flag in zip(cls._attention, cls._saved[1:], strict=True):
                    getattr(torch.backends.cuda, f"enable_{k}_sdp")(flag)


@contextlib.contextmanager
def curvature_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode with autograd forced on and math attention; restores every submodule's training flag on exit.

    Cheap when the model is already in eval mode (only the flags that change are written): operators enter it
    once per product.

    Example::

        >>> m = torch.nn.Dropout().train()
        >>> with torch.no_grad(), curvature_mode(m):
        ...     (m.training, torch.is_grad_enabled())
        (False, True)
        >>> m.training
        True
    """
    training = [m for m in model.modules() if m.training]
    if training:
        model.eval()
    _GlobalSwitches.enter()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        _GlobalSwitches.exit()
        for module in training:
            module.training = True


class Evaluator:
    """Outputs, losses and gradients of ``model`` under ``task`` at its trainable parameters or any other point.

    Args:
        model: The module (only its trainable parameters are differentiated; buffers and frozen parameters come
            from the module).
        task: Batch -> ``(outputs, targets)`` and the loss family.
        params: The point to evaluate at (default: the model's trainable parameters, detached).
        input_dtype: Cast floating inputs of every batch to this dtype (``None`` keeps them).
        reduce_fn: Sums a flat tensor over ranks, for the ``global_*`` methods (``None`` on one process).
        per_example: How :meth:`per_example` differentiates: ``"auto"`` uses layer hooks
            (:mod:`lightning_influence.per_sample`: one batched forward + backward) when every trainable parameter
            belongs to a supported layer and a one-time check (the batch's largest row against plain autograd on
            that example alone) agrees, ``vmap(grad(...))`` otherwise; ``"vmap"`` always uses ``vmap``.

    Raises:
        ConfigurationError: If the model has no trainable parameter, or for an unknown ``per_example``.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> ev = Evaluator(torch.nn.Linear(2, 1), Regression())
        >>> ev.num_params, ev.at(torch.zeros(3)).loss_sums([(torch.ones(4, 2), torch.ones(4, 1))])
        (3, (tensor(2.), tensor(4.)))
    """

    def __init__(
        self, model: nn.Module, task: Task, *, params: ParamTree | None = None, input_dtype: torch.dtype | None = None,
        reduce_fn: ReduceFn | None = None, per_example: str = "auto",
    ) -> None:
        if per_example not in PER_EXAMPLE_METHODS:
            raise ConfigurationError(f"per_example must be one of {PER_EXAMPLE_METHODS}, got {per_example!r}.")
        self.model, self.task, self.reduce_fn = model, task, reduce_fn
        self.per_example_method = per_example
        self.params: ParamTree = trainable_parameters(model) if params is None else params
        self._num_params = num_parameters(self.params)  # fixed: at() keeps the shapes
        first = next(iter(self.params.values()))
        self.device, self.dtype = first.device, first.dtype
        self.input_dtype = input_dtype
        #: Examples pushed through forward-only evaluations / forward+backward gradients (cost accounting).
        self.forward_examples = 0
        self.gradient_examples = 0
        self._vectorised_grads = True
        self._vectorised_jacobians = True

    # -------------------------------------------------------------------------------------------- basics
    @property
    def num_params(self) -> int:
        """Dimension ``P`` of the trainable parameters."""
        return self._num_params

    def tree(self, theta: Tensor | None = None) -> ParamTree:
        """The parameter tree at the flat point ``theta`` (default: :attr:`params`).

        Returns:
            ``{name: tensor}`` shaped like :attr:`params`.
        """
        return self.params if theta is None else unflatten(theta, self.params)

    def at(self, theta: Tensor) -> Evaluator:
        """A copy evaluating at the flat parameter vector ``theta`` (counters start at zero).

        Returns:
            The new evaluator.
        """
        new = copy.copy(self)
        new.params = unflatten(theta.detach().to(device=self.device, dtype=self.dtype), self.params)
        new.forward_examples = new.gradient_examples = 0
        return new

    def prepare(self, batch: Any) -> Any:
        """Move a batch to the parameters' device, casting floating inputs to ``input_dtype``.

        Returns:
            The prepared batch.
        """
        return prepare_batch(batch, self.device, self.input_dtype)

    def batch_size(self, batch: Any) -> int:
        """Examples in a batch (the task's count).

        Returns:
            The number of examples.
        """
        return self.task.batch_size(batch)

    # ------------------------------------------------------------------------------------------- outputs
    def output_fn(self, batch: Any) -> tuple[Callable[[ParamTree], Tensor], Tensor]:
        """``(f, targets)`` with ``f(params)`` the aligned outputs of the batch: what curvature products differentiate.

        Returns:
            The output function and the aligned targets.
        """
        inputs, targets = self.task.split(batch)

        def f(p: ParamTree) -> Tensor:
            out, _ = self.task.targets(self.task.outputs(self.task.forward(self.model, p, inputs)), targets)
            return out

        _, aligned = self.task.targets(torch.empty(0), targets)
        return f, aligned

    def output_jacobian(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        r"""Aligned outputs, targets and their Jacobian ``(*outputs.shape, P)`` of one prepared batch, per example.

        One ``jacrev`` per example, vectorised over the batch (``vmap``): about ``D`` gradients per example for
        ``D`` outputs each. A Jacobian of the batched outputs would instead differentiate each of the batch's
        ``B D`` outputs through the whole batch, ``B`` times the work (measured on the 9k-parameter MNIST CNN:
        512 examples took 304 s that way). Models whose examples cannot be separated (``vmap`` fails, or the
        per-example outputs differ from the batched ones) take the batched Jacobian.

        Returns:
            ``(outputs, targets, J)``, detached.
        """
        f, aligned = self.output_fn(batch)
        with torch.no_grad():
            outputs = f(self.params)
        names = list(self.params)
        if self._vectorised_jacobians:
            inputs, targets = self.task.split(batch)
            task = self.task

            def out_one(p: ParamTree, x1: Any, y1: Tensor) -> tuple[Tensor, Tensor]:
                inputs1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x1)
                out, _ = task.targets(task.outputs(task.forward(self.model, p, inputs1)), y1.unsqueeze(0))
                return out, out

            try:
                jac, outs = vmap(jacrev(out_one, has_aux=True), in_dims=(None, 0, 0))(self.params, inputs, targets)
            except Exception:  # pragma: no cover - depends on the user's model (data-dependent control flow, ...)
                self._vectorised_jacobians = False
            else:
                if outs.numel() == outputs.numel() and torch.allclose(
                        outs.reshape(outputs.shape), outputs, rtol=1e-4, atol=1e-6 * float(outputs.abs().max())):
                    b = outs.shape[0]
                    J = torch.cat([jac[k].reshape(b, outs[0].numel(), -1) for k in names], -1)
                    return outputs, aligned, J.reshape(*outputs.shape, -1).detach()
                self._vectorised_jacobians = False  # examples interact or are aligned across the batch
        jac = jacrev(f, chunk_size=64)(self.params)
        J = torch.cat([jac[k].reshape(*outputs.shape, -1) for k in names], -1).detach()
        return outputs, aligned, J

    def outputs(self, batch: Any, params: ParamTree | None = None, *, validate: bool = True) -> tuple[Tensor, Tensor]:
        """Aligned ``(outputs, targets)`` of a prepared batch at ``params`` (default :attr:`params`).

        Returns:
            The outputs (differentiable in ``params``) and the targets.
        """
        return self.task(self.model, batch, self.params if params is None else params, validate=validate)

    def unit_count(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Counted units (examples, or non-ignored tokens) of a batch, in the parameters' dtype.

        Returns:
            A 0-d tensor.
        """
        return self.task.loss.unit_mask(outputs, targets).sum().to(self.dtype)

    # -------------------------------------------------------------------------------------------- losses
    def loss_sums(self, batches: Sequence[Any], theta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Local ``(loss sum, unit count)`` over ``batches`` at ``theta`` (forward only, no graph).

        Returns:
            Two 0-d tensors in the parameters' dtype.
        """
        tree = self.tree(theta)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        count = torch.zeros((), dtype=self.dtype, device=self.device)
        with curvature_mode(self.model), torch.no_grad():
            for raw in batches:
                batch = self.prepare(raw)
                out, y = self.outputs(batch, tree)
                s, c = self.task.loss.sum_and_count(out, y)
                total, count = total + s.to(self.dtype), count + c.to(self.dtype)
                self.forward_examples += self.batch_size(batch)
        return total, count

    def value_and_grad(self, batches: Sequence[Any], theta: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Local ``(loss sum, flat gradient of the loss sum, unit count)`` over ``batches`` at ``theta``.

        Returns:
            The loss sum (0-d), the gradient sum ``(P,)`` and the unit count (0-d).
        """
        p = self.num_params
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        gsum = torch.zeros(p, dtype=self.dtype, device=self.device)
        count = torch.zeros((), dtype=self.dtype, device=self.device)
        with curvature_mode(self.model):
            leaf = flatten(self.tree(theta)).detach().clone().requires_grad_(True)
            tree = unflatten(leaf, self.params)
            for raw in batches:
                batch = self.prepare(raw)
                out, y = self.outputs(batch, tree)
                s, c = self.task.loss.sum_and_count(out, y)
                (g,) = torch.autograd.grad(s, leaf, allow_unused=True)
                if g is not None:
                    gsum = gsum + g.detach()
                total, count = total + s.detach().to(self.dtype), count + c.detach().to(self.dtype)
                self.gradient_examples += self.batch_size(batch)
        return total, gsum, count

    # --------------------------------------------------------------------- global (all ranks, one reduction)
    def global_loss_sums(self, groups: Sequence[Sequence[Any]], theta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(loss sum, unit count)`` of every group of batches (e.g. every fold) over all ranks: one reduction.

        Returns:
            Two ``(len(groups),)`` tensors.
        """
        local = [self.loss_sums(g, theta) for g in groups]
        sums = torch.stack([s for s, _ in local]) if local else torch.zeros(0, dtype=self.dtype)
        counts = torch.stack([c for _, c in local]) if local else torch.zeros(0, dtype=self.dtype)
        sums, counts = reduce_packed([sums, counts], self.reduce_fn)
        return sums, counts

    def global_value_and_grad(
        self, batches: Sequence[Any], theta: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`value_and_grad` summed over all ranks (one reduction).

        Returns:
            The global loss sum, gradient sum and unit count.
        """
        total, gsum, count = reduce_packed(list(self.value_and_grad(batches, theta)), self.reduce_fn)
        return total, gsum, count

    def mean_gradient(self, batches: Sequence[Any], reduce_fn: ReduceFn | None = None) -> Tensor:
        """Flat gradient of the mean loss over all ranks' ``batches`` (one reduction).

        Args:
            batches: This rank's batches.
            reduce_fn: Overrides the evaluator's ``reduce_fn``.

        Returns:
            The gradient ``(P,)`` of the loss averaged over every counted unit.
        """
        _, gsum, count = self.value_and_grad(batches)
        gsum, count = reduce_packed([gsum, count], reduce_fn if reduce_fn is not None else self.reduce_fn)
        return gsum / count.clamp_min(1.0)

    # ------------------------------------------------------------------------------------- per-example
    def _example_loss(self, normalization: Normalization) -> Callable[..., Tensor]:
        def loss_one(p: ParamTree, inputs: tuple[Any, ...], targets: Tensor) -> Tensor:
            inputs1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, inputs)
            return self._batch_losses(p, inputs1, targets.unsqueeze(0), normalization).sum()

        return loss_one

    def per_example(self, batch: Any, normalization: Normalization = "sum", out: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
        """Per-example flat gradients ``(c, P)`` and losses ``(c,)`` of one prepared batch (``vmap`` over examples).

        ``normalization="sum"`` differentiates each example's summed unit losses (upweighting the whole example in
        the unit-averaged objective); ``"mean"`` its mean over units. Models that ``vmap`` cannot handle fall back
        to one gradient per example, with a warning. With ``out`` (a contiguous ``(c, P)`` tensor of the
        parameters' dtype and device) the gradients are written into it and ``out`` is returned: a buffer reused
        across batches saves the page faults of a fresh ``(c, P)`` allocation, which on large models cost more
        than the gradients themselves.

        Returns:
            ``(grads, losses)``.

        Raises:
            ConfigurationError: For an unknown ``normalization`` or an ``out`` of the wrong shape, dtype or layout.
        """
        if normalization not in ("sum", "mean"):
            raise ConfigurationError(f"normalization must be 'sum' or 'mean', got {normalization!r}.")
        if out is not None:
            check_out(out, self.batch_size(batch), self.num_params, self.dtype, self.device)
        with curvature_mode(self.model):
            grads, losses = self._per_example(batch, normalization, out)
        if out is not None and grads is not out:  # the vmap path allocates its own
            out.copy_(grads)
            grads = out
        return grads, losses

    def _per_example(self, batch: Any, normalization: Normalization, out: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
        inputs, targets = self.task.split(batch)
        plan = hook_plan(self.model, self.params) if self.per_example_method != "vmap" else None
        if plan is None:
            return self._vmapped(inputs, targets, normalization)
        verdicts, key = _HOOKS_VERIFIED.setdefault(self.model, {}), _plan_key(plan)
        verified = verdicts.get(key)
        if verified is not False:
            try:
                grads, losses = self._hooked(plan, inputs, targets, normalization, out)
            except UnsupportedModel:
                verdicts[key] = False
            else:
                if verified is None:
                    # First use on this model: the hooks must see every use of every parameter, and examples must not
                    # interact. Check the batch's largest row against plain autograd on that example alone (a verdict
                    # is kept only when that row is not zero, e.g. a sequence with no counted token).
                    i = int(grads.norm(dim=1).argmax())
                    ref = self._one_gradient(_rows(inputs, slice(i, i + 1)), targets[i : i + 1], normalization)
                    tol = 1e-4 if grads.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-9
                    verified = bool(torch.allclose(grads[i], ref, rtol=tol, atol=tol * float(ref.abs().max())))
                    if float(ref.abs().max()) > 0 or not verified:
                        verdicts[key] = verified
                if verified:
                    self.gradient_examples += int(targets.shape[0])
                    return grads, losses
        return self._vmapped(inputs, targets, normalization)

    def _batch_losses(self, params: ParamTree, inputs: Any, targets: Tensor, normalization: Normalization) -> Tensor:
        """Per-example losses ``(batch,)`` of one batched forward at ``params``."""
        task = self.task
        out, y = task.targets(task.outputs(task.forward(self.model, params, inputs)), targets)
        total, counts = task.loss.per_example(out, y)
        return total / counts.clamp_min(1).to(total.dtype) if normalization == "mean" else total

    def _one_gradient(self, inputs: Any, targets: Tensor, normalization: Normalization) -> Tensor:
        """Flat gradient of one example's loss by plain autograd (the hook path's reference)."""
        leaves = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
        grads = torch.autograd.grad(self._batch_losses(leaves, inputs, targets, normalization).sum(),
                                    list(leaves.values()), allow_unused=True)
        return torch.cat([(torch.zeros_like(v) if g is None else g).reshape(-1)
                          for g, v in zip(grads, leaves.values(), strict=True)])

    def _hooked(self, plan: HookPlan, inputs: Any, targets: Tensor, normalization: Normalization,
                out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One batched forward + backward with layer hooks (:mod:`lightning_influence.per_sample`)."""
        leaves = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
        return per_sample_gradients(
            self.model, plan, lambda: self._batch_losses(leaves, inputs, targets, normalization),
            int(targets.shape[0]), self.dtype, self.device, out)

    def _vmapped(self, inputs: Any, targets: Tensor, normalization: Normalization) -> tuple[Tensor, Tensor]:
        # grad_and_value: each example's loss comes out of its own gradient's forward pass, so a chunk costs one
        # forward + backward per example and no separate no-grad forward of the batch.
        fn = grad_and_value(self._example_loss(normalization))
        names = list(self.params)
        self.gradient_examples += int(targets.shape[0])
        if self._vectorised_grads:
            try:
                g, losses = vmap(fn, in_dims=(None, 0, 0))(self.params, inputs, targets)
                return torch.cat([g[k].reshape(g[k].shape[0], -1) for k in names], 1).detach(), losses.detach()
            except Exception as err:  # pragma: no cover - depends on the user's model
                warnings.warn(
                    f"vmap over per-example gradients failed ({type(err).__name__}: {err}); falling back to one "
                    "gradient per example (slower). Models with in-place ops or data-dependent control flow need "
                    "this.", RuntimeWarning, stacklevel=2,
                )
                self._vectorised_grads = False
        rows, values = [], []
        for i in range(int(targets.shape[0])):
            xi = tree_map(lambda t, i=i: t[i] if isinstance(t, Tensor) else t, inputs)
            gi, li = fn(self.params, xi, targets[i])
            rows.append(torch.cat([gi[k].reshape(-1) for k in names]))
            values.append(li)
        return torch.stack(rows).detach(), torch.stack(values).detach()
