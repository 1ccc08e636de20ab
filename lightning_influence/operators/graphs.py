r"""Passes over the ATen graphs ``make_fx`` traces for :class:`~lightning_influence.operators.TangentProgram`.

A traced tangent map is run node by node in Python, every product, so what the graph holds is paid for on every
Lanczos step and every CG iteration. Forward-mode AD records work whose result is known when tracing:

* **zero tangents.** An input without a tangent (the batch) gets a materialised zero tangent inside formulas
  that take one for every argument: a convolution's rule adds ``conv(0, W)`` to ``conv(x, dW)``, a linear layer's
  adds ``0 @ W^T``, and the Hessian's tangent of the input-gradient path adds zeros again. The zeros are computed
  once per build in the primal part, but every product then adds a zero tensor of activation size.
  :func:`fold_zero_tangents` tracks values that are zero by construction (``zeros``, ``zeros_like``, views and
  products of them) and replaces ``a + 0``, ``0 + a`` and ``a - 0`` by ``a``;
* **identity casts and double transposes**: ``_to_copy`` to the dtype, layout and device a tensor already has
  (the loss's backward records two per product) and ``t(t(x))``.

Each rewrite keeps the graph's values exactly (bit for bit: adding an exact zero, copying, transposing twice
change nothing) and is skipped where the tensor it would return is mutated in place later or is an output (the
result must stay a fresh tensor there). :func:`split_tangent_graph` then cuts the graph into the part that runs
once per point and the part that runs per product.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

__all__ = ["fold_zero_tangents", "mask_threshold_backward", "reuse_dead_buffers", "split_tangent_graph",
           "straight_line"]

aten = torch.ops.aten

#: Ops whose result is zero (``full`` and its kin only with a zero fill, checked in :func:`_creates_zero`).
_ZERO_SOURCES = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default,
                 aten._efficientzerotensor.default, aten.full.default, aten.full_like.default, aten.new_full.default}
#: Ops that are zero when their first argument is (linear in it, or a gradient times something finite).
_ZERO_IN_FIRST = {aten.clone.default, aten._to_copy.default, aten.neg.default, aten.mul.Scalar, aten.div.Scalar,
                  aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.threshold_backward.default,
                  aten.tanh_backward.default, aten.sigmoid_backward.default, aten.gelu_backward.default,
                  aten._adaptive_avg_pool2d.default, aten.avg_pool2d.default}
#: Ops that are zero when any tensor argument is (bilinear): a convolution only without a bias.
_ZERO_IN_ANY = {aten.mm.default, aten.bmm.default, aten.mul.Tensor, aten.mv.default, aten.dot.default}


def _creates_zero(node: fx.Node) -> bool:
    if node.target in (aten.full.default, aten.full_like.default, aten.new_full.default):
        return len(node.args) > 1 and isinstance(node.args[1], int | float) and node.args[1] == 0
    return node.target in _ZERO_SOURCES


def _is_view(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and bool(target.is_view)


#: ``convolution_backward(grad, input, weight, ...)``'s outputs (grad input, weight, bias) by which argument being
#: zero makes them zero.
_CONV_BACKWARD_ZERO_IF = {0: (0, 2), 1: (0, 1), 2: (0,)}


def _zero_output_of_convolution_backward(node: fx.Node, zero: set[fx.Node]) -> bool:
    source = node.args[0] if node.target is operator.getitem else None
    if not isinstance(source, fx.Node) or source.target is not aten.convolution_backward.default:
        return False
    return any(source.args[i] in zero for i in _CONV_BACKWARD_ZERO_IF.get(node.args[1], ()))  # type: ignore[arg-type]


def _zero_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value is zero by construction (whatever the inputs' values)."""
    zero: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if (_creates_zero(node) or _zero_output_of_convolution_backward(node, zero)
                or (node.args and node.args[0] in zero and (_is_view(node) or node.target in _ZERO_IN_FIRST))
                or (node.target in _ZERO_IN_ANY and any(a in zero for a in args))
                or (node.target is aten.convolution.default and node.args[2] is None
                    and (node.args[0] in zero or node.args[1] in zero))):
            zero.add(node)
    return zero


def _may_change(node: fx.Node, *, output_ok: bool) -> bool:
    """Whether ``node``'s tensor is mutated in place or (unless ``output_ok``) returned, directly or via a view."""
    for user in node.users:
        if user.op == "output" and not output_ok:
            return True
        target = user.target
        if isinstance(target, torch._ops.OpOverload):
            if target._schema.is_mutable and user.args and user.args[0] is node:
                return True
            if target.is_view and _may_change(user, output_ok=output_ok):
                return True
    return False


def _descendants(graph: fx.Graph, roots: list[fx.Node]) -> set[fx.Node]:
    found = set(roots)
    for node in graph.nodes:
        if node.op != "output" and any(a in found for a in node.all_input_nodes):
            found.add(node)
    return found


def _meta(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _same_tensor_type(a: Any, b: Any, *, broadcast: bool = False) -> bool:
    """Same dtype and device, and the same shape (or, with ``broadcast``, ``a`` expands to ``b``'s shape)."""
    va, vb = _meta(a), _meta(b)
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype
            and va.device == vb.device and (va.shape == vb.shape or (broadcast and va.dim() <= vb.dim())))


def _expanded(a: fx.Node, like: fx.Node) -> fx.Node:
    """``a``, or a view of it broadcast to ``like``'s shape (an addend of a broadcasting add)."""
    shape = list(_meta(like).shape)
    if list(_meta(a).shape) == shape:
        return a
    with like.graph.inserting_before(like):
        view = like.graph.call_function(aten.expand.default, (a, shape))
    view.meta["val"] = _meta(a).expand(shape)
    return view


def _replacement(node: fx.Node, zero: set[fx.Node]) -> fx.Node | None:
    """The existing node ``node`` equals, if one of the rewrites applies."""
    args, target = node.args, node.target
    if target in (aten.add.Tensor, aten.sub.Tensor) and len(args) == 2 and not node.kwargs:
        a, b = args
        if b in zero and _same_tensor_type(a, node, broadcast=True):
            return _expanded(a, node)  # type: ignore[arg-type]
        if target is aten.add.Tensor and a in zero and _same_tensor_type(b, node, broadcast=True):
            return _expanded(b, node)  # type: ignore[arg-type]
    if target is aten._to_copy.default and _same_tensor_type(args[0], node) and set(node.kwargs) <= {
            "dtype", "layout", "device"} and node.kwargs.get("layout", torch.strided) == torch.strided:
        return args[0]  # type: ignore[return-value]
    if target is aten.t.default and isinstance(args[0], fx.Node) and args[0].target is aten.t.default:
        return args[0].args[0]  # type: ignore[return-value]
    return None


def fold_zero_tangents(graph: fx.Graph, num_params: int) -> int:
    """Rewrite a traced ``(params, tangents) -> ...`` graph in place (see the module docstring), drop dead code.

    A rewrite may return an existing tensor where a fresh one was returned: allowed for an output only if that
    tensor is computed per product (depends on a tangent), never for a value that is kept between products.

    Returns:
        The number of nodes replaced.

    Example::

        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> gm = make_fx(lambda p, t: t + torch.zeros(3))(torch.ones(3), torch.ones(3))  # (param, tangent)
        >>> fold_zero_tangents(gm.graph, num_params=1), [n.op for n in gm.graph.nodes]
        (1, ['placeholder', 'placeholder', 'output'])
    """
    zero = _zero_nodes(graph)
    per_product = _descendants(graph, [n for n in graph.nodes if n.op == "placeholder"][num_params:])
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or _may_change(node, output_ok=True):
            continue
        new = _replacement(node, zero)
        if new is not None and new not in per_product and _may_change(node, output_ok=False):
            if not new.users:
                graph.erase_node(new)
            continue
        if new is not None:
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            replaced += 1
    graph.eliminate_dead_code()
    return replaced


def mask_threshold_backward(graph: fx.Graph) -> int:
    """``threshold_backward(g, y, t)`` -> ``g * keep`` with ``keep = 1 - (y <= t)``: a mask of the point only.

    Split afterwards, the mask is computed once per point (a constant of the per-product part) and the per-product
    multiplication can run in place (:func:`reuse_dead_buffers`); a multiplication by a float mask is vectorised
    where a boolean ``masked_fill`` or ``where`` is not (one thread, 512x32x8x8: 0.09 ms vs 3.9 ms, and 0.19 ms for
    ``threshold_backward``). The values are the same (``y`` NaN keeps ``g``, as ``threshold_backward`` does) except
    where ``g`` itself is infinite or NaN at a masked unit (NaN instead of 0): a product that is not finite anyway.

    Returns:
        The number of nodes rewritten.

    Example::

        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> gm = make_fx(lambda g, y: torch.ops.aten.threshold_backward(g, y, 0))(torch.ones(2), torch.ones(2))
        >>> mask_threshold_backward(gm.graph), gm.recompile() is not None
        (1, True)
        >>> gm(torch.tensor([3.0, 4.0]), torch.tensor([-1.0, 2.0]))
        tensor([0., 4.])
    """
    count = 0
    for node in list(graph.nodes):
        value = _meta(node)
        if node.op != "call_function" or node.target is not aten.threshold_backward.default or not isinstance(
                value, torch.Tensor) or not value.is_floating_point():
            continue
        grad, out, threshold = node.args
        with graph.inserting_before(node):
            masked = graph.call_function(aten.le.Scalar, (out, threshold))
            as_float = graph.call_function(aten._to_copy.default, (masked,), {"dtype": value.dtype})
            keep = graph.call_function(aten.rsub.Scalar, (as_float, 1))
            product = graph.call_function(aten.mul.Tensor, (grad, keep))
        product.meta = dict(node.meta)
        node.replace_all_uses_with(product)
        graph.erase_node(node)
        count += 1
    return count


#: Functional ops -> their in-place variants, for :func:`reuse_dead_buffers`.
_IN_PLACE = {aten.add.Tensor: aten.add_.Tensor, aten.sub.Tensor: aten.sub_.Tensor, aten.mul.Tensor: aten.mul_.Tensor,
             aten.div.Tensor: aten.div_.Tensor, aten.mul.Scalar: aten.mul_.Scalar, aten.div.Scalar: aten.div_.Scalar,
             aten.neg.default: aten.neg_.default}
#: Ops whose result is a tensor of its own (no storage shared with an input).
_FRESH = {aten.convolution.default, aten.mm.default, aten.bmm.default, aten.addmm.default, aten.clone.default,
          aten._to_copy.default, aten.threshold_backward.default, aten.tanh_backward.default,
          aten.sigmoid_backward.default, aten._adaptive_avg_pool2d.default,
          aten._adaptive_avg_pool2d_backward.default, aten.avg_pool2d.default, aten.where.self, aten.sum.dim_IntList,
          *_IN_PLACE}
#: Multi-output ops whose outputs (taken by ``getitem``) are tensors of their own.
_FRESH_TUPLES = {aten.convolution_backward.default, aten.native_batch_norm_backward.default,
                 aten.native_layer_norm_backward.default, aten.native_layer_norm.default}


def _owns_buffer(node: fx.Node) -> bool:
    """Whether ``node`` is a tensor no other value shares storage with (a fresh result, or one made in place)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, fx.Node) and source.target in _FRESH_TUPLES
    if node.target in _IN_PLACE.values():
        return isinstance(node.args[0], fx.Node) and _owns_buffer(node.args[0])
    return node.target in _FRESH


def _same_layout(a: fx.Node, b: fx.Node) -> bool:
    return _same_tensor_type(a, b) and _meta(a).stride() == _meta(b).stride()


def reuse_dead_buffers(graph: fx.Graph) -> int:
    """Run elementwise ops in place on a first operand that dies there: fewer fresh activation-sized tensors.

    Applied to the per-product part only (its first operands are computed per product; a constant of the program is
    never a candidate: it is a placeholder). An operand qualifies if this op is its only user, it owns its storage
    (:data:`_FRESH`), and the result has its shape, dtype and strides. Fewer allocations per product also mean fewer
    fresh pages: with glibc's default thresholds a freed activation-sized block is returned to the system and
    faults again on its next use (``benchmarks/bench_curvature.py --steady-malloc``).

    Returns:
        The number of ops made in place.

    Example::

        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> gm = make_fx(lambda a, b: (a @ b) * 2.0 + b)(torch.eye(2), torch.ones(2, 2))
        >>> reuse_dead_buffers(gm.graph), gm.recompile() is not None  # both the scaling and the sum reuse a @ b
        (2, True)
        >>> gm(torch.eye(2), torch.ones(2, 2))
        tensor([[3., 3.],
                [3., 3.]])
    """
    count = 0
    for node in graph.nodes:
        target = _IN_PLACE.get(node.target) if node.op == "call_function" else None
        if target is None or not node.args:
            continue
        if node.target in _COMMUTATIVE and len(node.args) == 2 and not node.kwargs and not _reusable(
                node.args[0], node) and _reusable(node.args[1], node):
            node.args = (node.args[1], node.args[0])  # bias + x -> x + bias: the same sum, bit for bit
        if _reusable(node.args[0], node):
            node.target = target
            count += 1
    return count


#: Ops whose two tensor operands may be swapped (exactly: IEEE addition and multiplication commute).
_COMMUTATIVE = {aten.add.Tensor, aten.mul.Tensor}


def _reusable(base: Any, node: fx.Node) -> bool:
    return (isinstance(base, fx.Node) and len(base.users) == 1 and _owns_buffer(base)
            and _same_layout(base, node))


def split_tangent_graph(graph: Any, num_params: int, num_outputs: int) -> tuple[Any, Any]:
    """Split a traced ``(params, tangents) -> tangents + primal outputs`` graph into its primal and tangent parts.

    Returns:
        ``(primal, tangent)`` GraphModules: ``primal(*params)`` returns the values the tangent part reads, then the
        primal outputs; ``tangent(*those values, *tangents)`` returns the output tangents.

    Example::

        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> gm = make_fx(lambda p, t: [t * p.cos(), p.sin()])(torch.ones(2), torch.ones(2))  # (d sin p, sin p)
        >>> primal, tangent = split_tangent_graph(gm.graph, num_params=1, num_outputs=1)
        >>> values = primal(torch.tensor([0.0, 3.0]))  # cos p (read by the tangent part), then sin p
        >>> tangent(*values[:-1], torch.tensor([2.0, 0.0]))  # no sine or cosine is computed here
        [tensor([2., -0.])]
    """
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    out_node = next(node for node in graph.nodes if node.op == "output")
    results = list(out_node.args[0])
    tangent_outs, primal_outs = results[:num_outputs], results[num_outputs:]
    dependent = set(placeholders[num_params:])
    for node in graph.nodes:
        if node.op not in ("placeholder", "output") and any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    boundary = [node for node in graph.nodes if node not in dependent and node.op != "output"
                and (any(u in dependent for u in node.users) or node in tangent_outs)]
    ops = [node for node in graph.nodes if node.op not in ("placeholder", "output")]
    primal = _subgraph(graph, placeholders[:num_params], [n for n in ops if n not in dependent],
                       boundary + primal_outs)
    tangent = _subgraph(graph, boundary + placeholders[num_params:], [n for n in ops if n in dependent], tangent_outs)
    return primal, tangent


def _subgraph(graph: Any, inputs: list[Any], nodes: list[Any], outputs: list[Any]) -> Any:
    """Copy ``nodes`` (in graph order) into a module that reads ``inputs`` as placeholders.

    Dead code is dropped, e.g. forward-mode AD's layout checks (``is_same_size``: two per tangent use, unused).

    Returns:
        The GraphModule, returning ``outputs`` as a list.
    """
    part = fx.Graph()
    env = {node: part.placeholder(f"in_{node.name}") for node in inputs}
    for node in nodes:
        env[node] = part.node_copy(node, lambda a: env[a])
    part.output([env[o] for o in outputs])
    module = fx.GraphModule(graph.owning_module, part)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def straight_line(module: Any) -> Callable[..., Any]:
    """A plain Python function running ``module``'s graph: each ATen op called through its C++ entry point.

    ``GraphModule`` code calls ``torch.ops.aten.mm.default(...)``: an attribute chain and a Python-level
    ``OpOverload.__call__`` per node, plus ``nn.Module.__call__`` per run. Calling the overload's ``_op`` directly
    saves about a microsecond a node: 45 us of the digits MLP's 1.1 ms Hessian product (86 nodes), a tenth of its
    Python overhead. Every other argument (scalars, dtypes, lists of nodes) is bound as it was traced, and each value
    is released after its last use, as the ``GraphModule`` does.

    Returns:
        ``run(*placeholders)`` returning what the graph's output returns; the module itself for a graph with other
        node kinds (``get_attr``, ``call_module``) than placeholders, ``call_function`` and the output.

    Example::

        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> gm = make_fx(lambda a, b: [(a @ b).relu(), b.sum(0)])(torch.eye(2), torch.ones(2, 2))
        >>> straight_line(gm)(torch.eye(2), -torch.ones(2, 2))
        [tensor([[0., 0.],
                [0., 0.]]), tensor([-2., -2.])]
    """
    nodes = list(module.graph.nodes)
    if any(n.op not in ("placeholder", "call_function", "output") for n in nodes):
        return module
    names: dict[fx.Node, str] = {}
    bound: dict[str, Any] = {}

    def bind(value: Any) -> str:
        if isinstance(value, fx.Node):
            return names[value]
        if type(value) in (list, tuple) or isinstance(value, list):
            inner = ", ".join(bind(v) for v in value)
            return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
        key = f"c{len(bound)}"
        bound[key] = value
        return key

    last_use = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
    params, body = [], []
    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            names[node] = f"a{i}"
            params.append(names[node])
            continue
        if node.op == "output":
            body.append(f"    return {bind(node.args[0])}")
            break
        target = node.target._op if isinstance(node.target, torch._ops.OpOverload) else node.target
        fn = bind(target)
        args = [bind(a) for a in node.args] + [f"{k}={bind(v)}" for k, v in node.kwargs.items()]
        names[node] = f"v{i}"
        body.append(f"    {names[node]} = {fn}({', '.join(args)})")
        dead = [names[a] for a in node.all_input_nodes if last_use[a] == i]
        if dead:
            body.append(f"    del {', '.join(dict.fromkeys(dead))}")
    source = f"def run({', '.join(params)}):\n" + "\n".join(body) + "\n"
    exec(compile(source, "<straight_line>", "exec"), bound)  # our own code, generated from a traced graph
    return bound["run"]

