r"""Cached linearisations: repeated curvature products on a fixed batch that skip the primal forward pass.

Lanczos, CG, Hutchinson and LiSSA multiply the same operator, on the same fixed batches, by many directions.
Streaming, every product of a :math:`J^\top C J` operator repeats the primal forward pass (with dual tensors
riding on it) and a backward pass. With a cached linearisation of a batch, built once,

* a :class:`TangentProgram` (what ``torch.func.linearize`` builds, without its per-call tangent copies) gives
  :math:`v \mapsto J v` as a traced graph of the tangent computation alone (the primal values are constants in it);
  the trace is kept per model and batch (:func:`stored_tangents`), so a later operator on the same batches (the
  next monitor measurement, an operator's ``at(theta)`` copy) pays one forward pass for its constants, not a trace;
  and
* ``torch.func.vjp`` gives the pullback :math:`u \mapsto J^\top u` on the stored activations,

so a product is a tangent pass plus a backward pass, and a trace probe (forward mode only) is a tangent pass. For
:class:`~lightning_influence.operators.HessianOperator` the stored program is the tangent map of the parameter
gradient (forward over reverse, traced): :math:`v \mapsto H v` with the forward and backward passes folded into
constants, kept per model and batch like the output programs (it also returns the model's outputs, which check a
reused trace). Measured in one process against one gradient (``benchmarks/bench_curvature.py``'s batches, one
thread), the traced map beat PyHessian's retained-graph double backward on all three models: 1.13 vs 1.17-1.27
gradients on the digits MLP, 2.01-2.08 vs 2.13 on the character transformer, 1.86 vs 2.03 on the digits CNN.

The traced graphs are cleaned before they are split (:mod:`~lightning_influence.operators.graphs`): forward-mode
AD adds a zero tangent for the batch on every product (``conv(0, W)``, ``0 @ W^T``), and the loss's backward casts
to the dtype it already has. For float32 (or bfloat16) models with an ``nn.Conv2d`` on the CPU the traced
programs run channels-last (:func:`channels_last_params`: oneDNN convolves and pools two to five times faster that
way); ``stats()["channels_last"]`` counts those batches. The pullback keeps the model's layout: run channels-last
through autograd, the gradient that comes back through the model's flatten is NCHW and every later layer converts
it (measured slower than NCHW throughout).

**When it is used** (``linearization="auto"``, the default). A batch is linearised at its second product pass
(an operator used once never pays the build, which traces the model: a fixed cost of tens of milliseconds to a
second; a caller that will multiply many times says so, :meth:`LinearizationCache.expect_reuse`, and the first
pass builds) if its estimated size, three times the bytes of every submodule's outputs on that batch
(:func:`activation_bytes`), is at least :data:`AUTO_MIN_BYTES` (below it the model is so small that tracing costs
more than the cache saves) and fits the budget. Batches past the
budget (``linearization_budget``, bytes, default :data:`~lightning_influence.config.DEFAULT_LINEARIZATION_BUDGET`,
1 GiB) keep streaming. The rule depends on
sizes only, never on measured times, so the same run on a busy and an idle machine takes the same path and gives
bit-identical numbers (a resumed score store relies on that). ``"always"`` caches every batch that fits from the
first pass on, ``"never"`` streams. A model ``make_fx`` cannot trace (Python control flow on a tensor's value)
streams (``stats()["untraceable"]``). A stored trace is reused while the batch's tensors hold the same values, the
model's buffers are untouched (BatchNorm statistics updated in training force a new trace) and it still computes
the model's outputs (checked against the pullback's forward pass at no extra cost; a Python-level switch in
``forward`` that changed is caught there); ``stats()["traced"]`` counts the builds that traced.
Cached values equal streamed ones to rounding (the same operations in another order). A cache is tied to the
parameters: an in-place update (an optimizer step) is detected through the tensors' version counters and
discards it (and, in ``"auto"`` mode, switches that operator to streaming: its parameters move between products).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.autograd import forward_ad as fwad

from lightning_influence.config import DEFAULT_LINEARIZATION_BUDGET
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.operators.graphs import (
    fold_zero_tangents,
    mask_threshold_backward,
    reuse_dead_buffers,
    split_tangent_graph,
    straight_line,
)
from lightning_influence.params import ParamTree, unflatten

if TYPE_CHECKING:
    from lightning_influence.evaluator import Evaluator
    from lightning_influence.tasks import Task

__all__ = ["AUTO_MIN_BYTES", "LINEARIZATION_MODES", "LinearizationCache", "LinearizedProducts", "TangentProgram",
           "activation_bytes"]

#: Accepted values of ``linearization``.
LINEARIZATION_MODES = ("auto", "always", "never")
#: ``"auto"`` caches a batch only if its linearisation would hold at least this many bytes (4 MiB): below it the
#: model and batch are so small that tracing costs more than the cache saves. A size, not a measured time, so that
#: the path taken (and the last bits of every result) do not depend on how busy the machine is.
AUTO_MIN_BYTES = 4 * 2**20


@dataclass
class _Batch:
    """What the cache knows about one batch."""

    requests: int = 0
    saved_bytes: int | None = None
    streaming: bool = False
    entry: dict[str, Any] | None = None


@contextmanager
def _quiet_tracing() -> Iterator[None]:
    """The context a :class:`TangentProgram` traces in: one fake-tensor mode, torch.fx's harmless warning silenced.

    ``make_fx`` records every node's shape and strides as a fake tensor, and outside a tracing context it makes a
    new ``FakeTensorMode`` for each one, and each of those captures the Python stack (``traceback.extract_stack``):
    three quarters of the trace of a small CNN (0.21 s -> 0.05 s with one mode for the whole trace; the same
    graph). Modules that read attributes that are neither parameters nor buffers (Hugging Face's cached masks and
    rotary tables) make torch.fx warn once per trace.
    """
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings(), tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True))):
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
        yield


def activation_bytes(model: torch.nn.Module, run: Callable[[], Any]) -> int:
    """Bytes of every submodule's tensor outputs during ``run()`` (one forward pass, no graph).

    The estimate of a cached linearisation's size is three times this (the traced tangent graph's constants, the
    pullback's saved activations and the outputs).

    Returns:
        The byte count.

    Example::

        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
        >>> activation_bytes(m, lambda: m(torch.ones(2, 3)))  # Linear, Tanh and the Sequential: 3 x 2 x 4 floats
        96
    """
    total = [0]

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            total[0] += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return total[0]


class TangentProgram:
    r"""The tangent map :math:`v \mapsto J_f(\theta) v` of ``f``, traced once and evaluated at any :math:`\theta`.

    ``make_fx`` traces forward-mode AD through ``f`` with the parameters and the tangents as inputs; the graph is
    split into its *primal* part (every node that does not depend on a tangent: the activations, the masks) and its
    *tangent* part. :meth:`at` runs the primal part once at a point (one forward pass) and returns the map that runs
    only the tangent part, with those values as constants: what ``torch.func.linearize`` returns, without tracing
    again. Tracing costs several forward passes of Python-level work (about 6 training steps for a 1.2M-parameter
    CNN on 64 images), so a program is kept per model and batch (:func:`stored_tangents`) and reused while the
    parameters move, e.g. between :class:`~lightning_influence.callbacks.CurvatureMonitor` measurements.

    Unlike ``linearize``, the trace uses tangents laid out like the parameters, so forward-mode AD records no
    per-call copy of every tangent (``copy_`` onto ``_new_zeros_with_same_feature_meta``: two operations per
    parameter tensor per product) and the map skips linearize's pytree checks: one tangent pass of
    ``benchmarks/bench_curvature.py``'s digits MLP went from 0.47 to 0.38 gradients.

    A trace is exact at the point it was taken; elsewhere it is exact as long as ``f`` runs the same operations,
    which :meth:`at` checks by comparing the primal output it computes with ``reference`` when given (a Python-level
    switch in ``forward`` that changed since the trace then raises :class:`StaleTrace`, and the caller traces again;
    control flow on a tensor's value cannot be traced at all: :class:`Untraceable`).

    Args:
        f: Parameters -> a tensor or a dict of tensors (e.g. a gradient).
        params: A point to trace at (its names, shapes and dtypes fix the program's).

    Example::

        >>> w = {"w": torch.tensor([1.0, 2.0])}
        >>> program = TangentProgram(lambda p: (p["w"] ** 2).sum(), w)
        >>> jvp, out = program.at({"w": torch.tensor([3.0, 0.0])})
        >>> float(jvp({"w": torch.tensor([1.0, 1.0])})), float(out)  # 2 w . v and f(w) at the new point
        (6.0, 9.0)
    """

    def __init__(self, f: Callable[[ParamTree], Any], params: ParamTree) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.utils._pytree import tree_flatten

        self.names = list(params)
        n = len(self.names)
        spec: list[Any] = []

        def traced(*args: Tensor) -> list[Tensor]:
            with fwad.dual_level():
                out = f({k: fwad.make_dual(p, t) for k, p, t in zip(self.names, args[:n], args[n:], strict=True)})
                leaves, out_spec = tree_flatten(out)
                spec[:] = [out_spec]
                unpacked = [fwad.unpack_dual(leaf) for leaf in leaves]
                tangents = [torch.zeros_like(u.primal) if u.tangent is None else u.tangent for u in unpacked]
                return tangents + [u.primal for u in unpacked]

        points = [params[k].detach() for k in self.names]
        #: the strides of every traced parameter: tangents and later points are laid out the same way (a
        #: channels-last weight with one input channel is also "contiguous": its strides still steer the kernels)
        self.strides = [p.stride() for p in points]
        try:
            with _quiet_tracing():
                graph = make_fx(traced)(*points, *[torch.zeros_like(p) for p in points]).graph
        except (RuntimeError, NotImplementedError) as err:  # e.g. control flow on a tensor's value
            raise Untraceable(f"make_fx cannot trace the model: {err}") from err
        self.spec, self.num_outputs = spec[0], spec[0].num_leaves
        mask_threshold_backward(graph)
        fold_zero_tangents(graph, n)
        self._primal, self._tangent = split_tangent_graph(graph, n, self.num_outputs)
        if reuse_dead_buffers(self._tangent.graph):
            self._tangent.recompile()
        self._run_tangent = straight_line(self._tangent)  # what a product runs

    def at(self, params: ParamTree, reference: Any = None) -> tuple[Callable[[ParamTree], Any], Any]:
        """The tangent map at ``params`` and ``f(params)`` (one forward pass of the primal part).

        Args:
            params: The point (same names, shapes and dtypes as the traced one).
            reference: ``f(params)``, or its last outputs, computed otherwise (e.g. by a ``vjp``), to check the
                trace against.

        Returns:
            ``(jvp, outputs)``: the map (a tree like ``params`` -> what ``f`` returns) and ``f(params)``, detached.

        Raises:
            StaleTrace: If ``reference`` differs from the program's own output beyond rounding.
        """
        from torch.utils._pytree import tree_flatten, tree_unflatten

        with torch.no_grad():
            values = self._primal(*[_restride(params[k].detach(), st)
                                    for k, st in zip(self.names, self.strides, strict=True)])
        consts, primal_outs = values[:-self.num_outputs], list(values[-self.num_outputs:])
        if reference is not None:
            wanted = tree_flatten(reference)[0]
            for got, want in zip(primal_outs[len(primal_outs) - len(wanted):], wanted, strict=True):
                tol = 100 * torch.finfo(got.dtype).eps * (1.0 + float(want.detach().abs().max()))
                if got.shape != want.shape or not bool((got - want.detach()).abs().max() <= tol):
                    raise StaleTrace("the traced program computes other outputs at these parameters")
        tangent, layout = self._run_tangent, list(zip(self.names, self.strides, strict=True))

        def jvp(v: ParamTree) -> Any:
            return tree_unflatten(list(tangent(*consts, *[_restride(v[k], st) for k, st in layout])), self.spec)

        return jvp, tree_unflatten(primal_outs, self.spec)


class StaleTrace(RuntimeError):
    """A :class:`TangentProgram` no longer computes what its function does (trace again)."""


class Untraceable(RuntimeError):
    """``make_fx`` cannot trace the function (a cache then streams that batch)."""


@dataclass
class _StoredProgram:
    program: TangentProgram
    inputs: list[Tensor]  # the batch's tensors the trace read (compared by value when reused)
    buffers: list[tuple[int, int]]  # (id, version) of the model's buffers (BatchNorm statistics move in place)


#: Traced programs kept per model (the most recently traced); each holds its batch's input tensors.
MAX_STORED_PROGRAMS = 64
# model -> {(batch index, parameter signature): program}; forgotten with the model
_PROGRAMS: weakref.WeakKeyDictionary[torch.nn.Module, dict[Any, _StoredProgram]] = weakref.WeakKeyDictionary()
_PROGRAMS_LOCK = threading.Lock()


def _tensor_leaves(tree: Any) -> list[Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


def stored_tangents(model: torch.nn.Module, index: int, batch: Any, f: Callable[[ParamTree], Any],
                    params: ParamTree, outputs: Tensor, *, kind: str = "outputs"
                    ) -> tuple[Callable[[ParamTree], Any], bool]:
    """The tangent map of ``f`` (a function of ``batch`` under ``model``) at ``params``, traced at most once.

    A :class:`TangentProgram` is kept per model, ``kind`` (``"outputs"``: ``f`` returns the model's outputs;
    ``"hessian"``: it returns the loss gradient and then the outputs), batch index and parameter signature, and
    reused while the batch's tensors hold the same values, the model's buffers are untouched and the program still
    computes ``outputs`` (the model's outputs at ``params``, which the caller has: ``f``'s last output); otherwise
    the model is traced again.

    Returns:
        ``(jvp, traced)``: the map and whether this call traced the model.
    """
    key = (kind, index, tuple((k, tuple(p.shape), p.dtype, p.device, p.stride()) for k, p in params.items()))
    inputs, buffers = _tensor_leaves(batch), [(id(b), b._version) for b in model.buffers()]
    with _PROGRAMS_LOCK:
        stored = _PROGRAMS.get(model, {}).get(key)
    if (stored is not None and stored.buffers == buffers and len(stored.inputs) == len(inputs)
            and all(a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))
                    for a, b in zip(stored.inputs, inputs, strict=True))):
        try:
            return stored.program.at(params, reference=outputs)[0], False
        except StaleTrace:
            pass
    program = TangentProgram(f, params)
    with _PROGRAMS_LOCK:
        stored_for_model = _PROGRAMS.setdefault(model, {})
        stored_for_model.pop(key, None)
        stored_for_model[key] = _StoredProgram(program, inputs, buffers)
        while len(stored_for_model) > MAX_STORED_PROGRAMS:  # the oldest first: a program holds its batch's inputs
            stored_for_model.pop(next(iter(stored_for_model)))
    return program.at(params)[0], True


@contextmanager
def _grad_mode() -> Iterator[None]:
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _restride(t: Tensor, stride: tuple[int, ...]) -> Tensor:
    """``t``, or a copy of it with the given strides (the layout a traced program was traced with)."""
    if t.stride() == stride:
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def channels_last_params(model: torch.nn.Module, params: ParamTree) -> ParamTree:
    """``params`` with every 4-D leaf in ``channels_last`` where oneDNN convolves faster that way, else ``params``.

    oneDNN (PyTorch's CPU convolutions) computes in a channels-last layout: given NCHW tensors it reorders every
    input and output of every convolution, and NCHW pooling and their backward passes are several times slower
    than channels-last ones (measured on ``benchmarks/bench_curvature.py``'s digits CNN, one thread: a 16->32
    channel 3x3 convolution of 512 8x8 images 7.4 ms NCHW vs 2.8 ms channels-last; its input-and-weight backward
    10.2 vs 5.4 ms; the adaptive average pool 1.1 vs 0.2 ms). A convolution whose weight is channels-last runs
    channels-last and returns channels-last activations, which every later layer keeps, so the traced programs
    convert the 4-D weights once per build (a copy of the weights, not of activations) and their convolutions all
    run channels-last. Values are equal to rounding (a different summation order inside the kernels).

    Applied to models with an ``nn.Conv2d``, parameters in float32 or bfloat16 on the CPU with oneDNN available;
    float64 (the exact mode: no oneDNN kernels) and other devices keep their layout. A model whose ``forward``
    cannot take channels-last activations (``.view`` of a convolution's output) is run as it is (the caller
    retries with ``params``).

    Returns:
        A new tree (4-D leaves copied to ``channels_last``, the others as they are) or ``params`` itself.
    """
    if not torch.backends.mkldnn.is_available() or not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return params
    leaves = list(params.values())
    if not leaves or any(p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16) for p in leaves):
        return params
    if not any(p.dim() == 4 for p in leaves):
        return params
    # empty_like + copy_ rather than .contiguous(): a weight with one input channel is both "contiguous" and
    # "channels-last", and only explicit channels-last strides make its convolution (and all after it) channels-last
    return {k: torch.empty_like(p, memory_format=torch.channels_last).copy_(p) if p.dim() == 4 else p
            for k, p in params.items()}


def _versions(params: ParamTree) -> tuple[int, ...]:
    """The parameters' in-place version counters (an optimizer step moves them)."""
    return tuple(p._version for p in params.values())


class LinearizationCache:
    """Per-batch cached linearisations under a byte budget (see the module docstring for the policy).

    Args:
        mode: ``"auto"``, ``"always"`` or ``"never"``.
        budget: Most bytes of cached activations over all batches.

    Attributes:
        used_bytes: Estimated bytes held.
        cached_products: Directions multiplied through a cache.
        streamed_products: Directions multiplied by streaming (first passes, over-budget or slower batches).
        over_budget: Batches refused because the budget was full.
        built: Batches linearised so far.
        traced: Of those, batches whose tangent map traced the model (the others reused a stored
            :class:`TangentProgram`: one forward pass instead of a trace).
        untraceable: Batches streamed because ``make_fx`` could not trace the model (control flow on a value).
        channels_last: Batches linearised with channels-last convolutions (:func:`channels_last_params`).

    Raises:
        ConfigurationError: For an unknown mode or a negative budget.

    Example::

        >>> cache = LinearizationCache("auto", budget=2**20)
        >>> cache.stats()["cached_batches"], cache.enabled
        (0, True)
    """

    def __init__(self, mode: str = "auto", budget: int = DEFAULT_LINEARIZATION_BUDGET) -> None:
        if mode not in LINEARIZATION_MODES:
            raise ConfigurationError(f"linearization must be one of {LINEARIZATION_MODES}, got {mode!r}.")
        if budget < 0:
            raise ConfigurationError(f"linearization_budget must be >= 0 bytes, got {budget}; use 0 to stream.")
        self.mode, self.budget = mode, int(budget)
        self.batches: dict[int, _Batch] = {}
        self.used_bytes = self.cached_products = self.streamed_products = self.over_budget = self.built = 0
        self.traced = self.untraceable = self.channels_last = 0
        self.reused = False  # see expect_reuse
        self._versions: tuple[int, ...] | None = None

    @property
    def enabled(self) -> bool:
        """Whether any batch may be cached."""
        return self.mode != "never" and self.budget > 0

    def stats(self) -> dict[str, int]:
        """Counters for reports and tests.

        Returns:
            ``cached_batches``, ``used_bytes``, ``cached_products``, ``streamed_products``, ``over_budget``, ``built``,
            ``traced``, ``untraceable``, ``channels_last``.
        """
        cached = sum(b.entry is not None for b in self.batches.values())
        return {"cached_batches": cached, "used_bytes": self.used_bytes, "cached_products": self.cached_products,
                "streamed_products": self.streamed_products, "over_budget": self.over_budget, "built": self.built,
                "traced": self.traced, "untraceable": self.untraceable,
                "channels_last": self.channels_last}

    def clear(self) -> None:
        """Drop every entry (the parameters changed)."""
        self.batches.clear()
        self.used_bytes = 0

    def check_params(self, params: ParamTree) -> None:
        """Discard the cache if a parameter tensor was updated in place since it was built."""
        versions = _versions(params)
        if self._versions is not None and versions != self._versions:
            self.clear()
            if self.mode == "auto":  # parameters that move between products: rebuilding would cost more than it saves
                self.mode = "never"
        self._versions = versions

    def expect_reuse(self) -> None:
        """The caller will multiply every batch many times: in ``"auto"`` mode build at the first pass already.

        ``"auto"`` otherwise waits for a batch's second pass, so that an operator used once never pays a build;
        :func:`~lightning_influence.spectrum.estimate_spectrum` (Lanczos, then the probes) says so and saves one
        streamed product per measurement.
        """
        self.reused = True

    def serves(self, num_batches: int, params: ParamTree) -> bool:
        """Whether every one of ``num_batches`` batches has an entry valid for ``params`` (nothing to stream)."""
        batches = self.batches
        return (len(batches) == num_batches > 0 and all(b.entry is not None for b in batches.values())
                and self._versions == _versions(params))

    def lookup(self, index: int, build: Callable[[], dict[str, Any]], estimate: Callable[[], int]
               ) -> dict[str, Any] | None:
        """The cached entry of batch ``index``, building it when the policy says so; ``None``: stream.

        ``estimate()`` returns the bytes the entry would hold (called once per batch, before building).

        Returns:
            The entry or ``None``.
        """
        state = self.batches.setdefault(index, _Batch())
        state.requests += 1
        if state.entry is not None or not self.enabled or state.streaming:
            return state.entry
        if self.mode == "auto" and state.requests < 2 and not self.reused:
            return None
        if state.saved_bytes is None:
            state.saved_bytes = int(estimate())
        if self.mode == "auto" and state.saved_bytes < AUTO_MIN_BYTES:
            state.streaming = True
            return None
        if self.used_bytes + state.saved_bytes > self.budget:
            return self._refuse(state)
        try:
            state.entry = build()
        except Untraceable:
            self.untraceable += 1
            state.streaming = True
            return None
        self.used_bytes += state.saved_bytes
        self.built += 1
        return state.entry

    def _refuse(self, state: _Batch) -> dict[str, Any] | None:
        self.over_budget += 1
        state.streaming = True
        return None

    def count(self, directions: int, *, cached: bool) -> None:
        """Count the directions of one product pass on a batch, cached or streamed (see :meth:`stats`)."""
        if cached:
            self.cached_products += directions
        else:
            self.streamed_products += directions


class LinearizedProducts:
    r"""Mixin for curvature operators: products on a batch go through its cached linearisation when there is one.

    Placed before the operator class in the bases; its methods fall back to the streaming ones otherwise.

    Args:
        linearization: ``"auto"`` (default), ``"always"`` or ``"never"`` (see the module docstring).
        linearization_budget: Bytes of cached activations (default 1 GiB).

    Example::

        >>> from lightning_influence.operators import GNHOperator
        >>> from lightning_influence.tasks import Regression
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> op = GNHOperator(torch.nn.Linear(2, 1, bias=False).double(), Regression(),
        ...                  [(x, torch.zeros(2, 1, dtype=torch.float64))], linearization="always")
        >>> op.matvec(torch.ones(2, dtype=torch.float64)).tolist(), op.linearization.stats()["cached_products"]
        ([0.5, 2.0], 1)
    """

    if TYPE_CHECKING:
        evaluator: Evaluator
        task: Task
        params: ParamTree
        data: list[Any]

        def _output_map(self, batch_index: int, outputs: Tensor, targets: Tensor, jv: Tensor) -> Tensor: ...

        def _loss_and_outputs(self, batch: Any) -> tuple[Callable[[ParamTree], tuple[Tensor, Tensor]], Tensor,
                                                          Tensor]: ...

        def _units(self, outputs: Tensor, targets: Tensor) -> Tensor: ...

    #: ``"output"`` (J^T C J operators: cache J v and J^T u) or ``"hessian"`` (cache v -> H v).
    _linearized_kind = "output"

    def __init__(self, *args: Any, linearization: Literal["auto", "always", "never"] = "auto",
                 linearization_budget: int = DEFAULT_LINEARIZATION_BUDGET, **kwargs: Any) -> None:
        #: The per-batch cache (counters in ``linearization.stats()``).
        self.linearization = LinearizationCache(linearization, linearization_budget)
        super().__init__(*args, **kwargs)

    def at(self, theta: Tensor) -> Any:
        """The same operator at ``theta``, with an empty cache of its own.

        Returns:
            The copy.
        """
        new = super().at(theta)  # type: ignore[misc]
        new.linearization = LinearizationCache(self.linearization.mode, self.linearization.budget)
        return new

    def _product_mode(self) -> contextlib.AbstractContextManager[None]:
        """Only grad mode when every batch is served from the cache, else :func:`curvature_mode`.

        A cached product runs traced graphs and a stored pullback, neither of which reads the modules' training
        flags or the attention switches, so the walk over the modules and the process-wide switches (a tenth of a
        small model's product) are skipped.

        Returns:
            The context manager.
        """
        if self.linearization.serves(len(self.data), self.params):
            return _grad_mode()
        return super()._product_mode()  # type: ignore[misc]

    def _entry(self, i: int, batch: Any) -> dict[str, Any] | None:
        self.linearization.check_params(self.params)
        return self.linearization.lookup(i, lambda: self._build(i, batch), lambda: self._estimate(batch))

    def _estimate(self, batch: Any) -> int:
        f, _ = self.evaluator.output_fn(batch)
        return 3 * activation_bytes(self.evaluator.model, lambda: f(self.params))

    def _build(self, i: int, batch: Any) -> dict[str, Any]:
        from torch.func import grad, vjp

        if self._linearized_kind == "hessian":
            # forward over reverse, traced: v -> (H v, J v); the model outputs it also returns check a stored trace
            loss_and_outputs, outputs, units = self._loss_and_outputs(batch)
            hvp = self._tangent_map(i, batch, grad(loss_and_outputs, has_aux=True), outputs, kind="hessian")
            return {"hvp": lambda v: hvp(v)[0], "units": units}
        f, targets = self.evaluator.output_fn(batch)
        outputs, pullback = vjp(f, self.params)  # type: ignore[misc]
        outputs = outputs.detach()
        self.task.loss.validate(outputs, targets)
        return {"map": self._output_map_fn(i, outputs, targets), "jvp": self._tangent_map(i, batch, f, outputs),
                "pullback": pullback, "units": self._units(outputs, targets)}

    def _tangent_map(self, i: int, batch: Any, f: Callable[[ParamTree], Any], outputs: Tensor,
                     kind: str = "outputs") -> Callable[[ParamTree], Any]:
        """The stored tangent map of ``f`` on batch ``i`` (:func:`stored_tangents`), in the fastest layout.

        The parameters go channels-last where the model convolves faster that way (:func:`channels_last_params`); a
        ``forward`` that cannot run channels-last is built as it is.

        Returns:
            The map.
        """
        def build(params: ParamTree) -> Callable[[ParamTree], Any]:
            jvp_fn, traced = stored_tangents(self.evaluator.model, i, batch, f, params, outputs, kind=kind)
            self.linearization.traced += int(traced)
            return jvp_fn

        params = channels_last_params(self.evaluator.model, self.params)
        if params is not self.params:
            try:
                out = build(params)
            except (RuntimeError, Untraceable):  # e.g. ``.view`` of a channels-last activation
                pass
            else:
                self.linearization.channels_last += 1
                return out
        return build(self.params)

    def _output_map_fn(self, i: int, outputs: Tensor, targets: Tensor) -> Callable[[Tensor], Tensor]:
        """Batch ``i``'s output map at its cached outputs (overridden where part of it can be computed once)."""
        return functools.partial(self._output_map, i, outputs, targets)

    def _cached_product(self, i: int, entry: dict[str, Any], v: ParamTree) -> ParamTree:
        if "hvp" in entry:
            return dict(entry["hvp"](v))
        (prod,) = entry["pullback"](entry["map"](entry["jvp"](v).detach()))
        return dict(prod)

    def _batch_product(self, batch_index: int, batch: Any, v: ParamTree) -> tuple[ParamTree, Tensor]:
        entry = self._entry(batch_index, batch)
        if entry is None:
            self.linearization.count(1, cached=False)
            return super()._batch_product(batch_index, batch, v)  # type: ignore[misc]
        self.linearization.count(1, cached=True)
        return self._cached_product(batch_index, entry, v), entry["units"]

    def _batch_matmat(self, batch_index: int, batch: Any, vs: ParamTree) -> tuple[ParamTree, Tensor]:
        k = next(iter(vs.values())).shape[0]
        entry = self._entry(batch_index, batch)
        if entry is None:
            self.linearization.count(k, cached=False)
            return super()._batch_matmat(batch_index, batch, vs)  # type: ignore[misc]
        self.linearization.count(k, cached=True)
        # a loop over columns beats vmap over the traced graph
        cols = [self._cached_product(batch_index, entry, {n: t[j] for n, t in vs.items()}) for j in range(k)]
        return {n: torch.stack([c[n] for c in cols]) for n in vs}, entry["units"]

    def _batch_quadratic_forms(self, i: int, batch: Any, matrix: Tensor) -> tuple[Tensor, Tensor]:
        k = matrix.shape[1]
        entry = self._entry(i, batch)
        if entry is None or "jvp" not in entry:
            self.linearization.count(k, cached=False)
            return super()._batch_quadratic_forms(i, batch, matrix)  # type: ignore[misc]
        self.linearization.count(k, cached=True)
        qs = []
        for j in range(k):
            jv = entry["jvp"](unflatten(matrix[:, j], self.params)).detach()
            qs.append((jv * entry["map"](jv)).sum())
        return torch.stack(qs), entry["units"]
