"""The rewrites of traced tangent graphs (``operators/graphs.py``): exact, and never where they would alias."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from lightning_influence.operators.graphs import fold_zero_tangents, reuse_dead_buffers
from lightning_influence.operators.linearized import TangentProgram

aten = torch.ops.aten


def _adds_of_zero_constants(program: TangentProgram, params: dict[str, torch.Tensor]) -> int:
    """Additions in the per-product graph one of whose operands is a constant that is identically zero."""
    with torch.no_grad():
        values = program._primal(*[params[k] for k in program.names])
    placeholders = [n for n in program._tangent.graph.nodes if n.op == "placeholder"]
    consts = dict(zip(placeholders, values[:-program.num_outputs], strict=False))
    return sum(1 for node in program._tangent.graph.nodes
               if node.target in (aten.add.Tensor, aten.sub.Tensor)
               and any(isinstance(a, torch.fx.Node) and a in consts and not bool(consts[a].any()) for a in node.args))


@pytest.mark.parametrize("kind", ["outputs", "hessian"])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_tangent_graphs_add_no_zero_tangent_of_the_input(layer: str, kind: str) -> None:
    """Forward-mode AD gives the batch (no tangent) a materialised zero tangent: a linear layer's and a convolution's
    rule then add ``0 @ W^T`` / ``conv(0, W)`` on every product. The folded graph does not, and is still exact."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model: torch.nn.Module = (torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
                                  if layer == "linear" else
                                  torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                                      torch.nn.Linear(12, 3)))
    model = model.double()
    x = torch.randn(6, 5, generator=g) if layer == "linear" else torch.randn(6, 2, 4, 4, generator=g)
    x = x.double()
    params = {k: p.detach() for k, p in model.named_parameters()}

    def outputs(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, p, (x,))

    def f(p: dict[str, torch.Tensor]) -> Any:
        return outputs(p) if kind == "outputs" else torch.func.grad(lambda q: outputs(q).square().sum())(p)

    program = TangentProgram(f, params)
    assert _adds_of_zero_constants(program, params) == 0
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}
    got = program.at(params)[0](v)
    want = torch.func.jvp(f, (params,), (v,))[1]
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


def _fold(fn: Any, *args: torch.Tensor) -> tuple[Any, int]:
    gm = make_fx(fn)(*args)
    replaced = fold_zero_tangents(gm.graph, num_params=1)
    gm.recompile()
    return gm, replaced


def test_folding_keeps_fresh_tensors_where_they_are_mutated_or_would_alias_a_kept_value() -> None:
    p, t = torch.randn(3), torch.randn(3)  # a parameter (kept between products) and a tangent (per product)

    def mutated(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = (p * 2) + torch.zeros_like(p)  # y is divided in place below: folding would divide p * 2's buffer
        return y.div_(2) + t

    gm, replaced = _fold(mutated, p, t)
    assert replaced == 0 and torch.equal(gm(p, t), p + t)

    def returns_kept(p: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        return [p + torch.zeros_like(p), t * 1]  # p + 0 is an output: it must not become p itself

    gm, replaced = _fold(returns_kept, p, t)
    out = gm(p, t)
    assert replaced == 0 and out[0] is not p and torch.equal(out[0], p)

    def per_product(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        zero = torch.mm(torch.zeros(3, 2).expand(3, 2).t(), p[:, None])  # zero by construction, (2, 1)
        return (t * p)[:2, None] + zero  # a per-product value: returning it as it is is fine

    gm, replaced = _fold(per_product, p, t)
    assert replaced == 1 and torch.equal(gm(p, t), (t * p)[:2, None])
    assert not any(n.target is aten.mm.default for n in gm.graph.nodes)  # the zero's producer is dead code now


def test_broadcast_addends_and_identity_casts_fold_exactly() -> None:
    p, t = torch.randn(4), torch.randn(4)

    def fn(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bias_tangent = t[:3]
        zero = torch.zeros(5, 3)
        h = aten._to_copy.default(bias_tangent + zero, dtype=torch.float32)  # + 0 broadcast, a cast to its dtype
        return (h * p[0]).t().t() * 1.0

    gm, replaced = _fold(fn, p, t)
    assert replaced == 3  # the add (-> an expand), the cast, the double transpose
    assert torch.equal(gm(p, t), t[:3].expand(5, 3) * p[0])


def test_buffers_are_reused_only_where_the_operand_dies_and_owns_its_storage() -> None:
    a, b = torch.randn(3, 3), torch.randn(3, 3)

    def fn(a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
        kept = a @ b  # used twice: must stay intact
        view = (a @ b).t()  # a view: shares storage with the product
        return [kept * 2.0 + kept, view + 1.0, a + b, b[0] + a @ b]  # a + b: a is an input (a kept value)

    gm = make_fx(fn)(a, b)
    want = gm(a, b)
    reused = reuse_dead_buffers(gm.graph)
    gm.recompile()
    got = gm(a, b)
    in_place = sorted(str(n.target) for n in gm.graph.nodes if str(n.target).endswith("_.Tensor")
                      or str(n.target).endswith("_.Scalar"))
    # (kept * 2) + kept: the scaled copy dies in the sum; b[0] + (a @ b): swapped, the product dies there
    assert reused == 2 and in_place == ["aten.add_.Tensor", "aten.add_.Tensor"], in_place
    for x, y in zip(got, want, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a, a.clone()) and not any(t is a or t is b for t in got)


def test_threshold_masks_are_point_constants_and_exact() -> None:
    """``threshold_backward`` becomes a fill by a mask of the primal value: in the per-point part after the split."""
    from lightning_influence.operators.graphs import mask_threshold_backward, split_tangent_graph

    def fn(p: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        y = torch.relu(p * 3.0)
        return [aten.threshold_backward(t * 2.0, y, 0), y]

    gm = make_fx(fn)(torch.randn(4), torch.randn(4))
    p, t = torch.tensor([-1.0, 0.0, 2.0, float("nan")]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    want = gm(p, t)
    assert mask_threshold_backward(gm.graph) == 1
    primal, tangent = split_tangent_graph(gm.graph, num_params=1, num_outputs=1)
    assert not any(n.target is aten.le.Scalar for n in tangent.graph.nodes)  # the mask is computed per point
    assert any(n.target is aten.mul.Tensor for n in tangent.graph.nodes)
    values = primal(p)
    got = tangent(*values[:-1], t)
    assert torch.equal(got[0], want[0])  # NaN kept where threshold_backward keeps it


def test_straight_line_code_equals_the_graph_module() -> None:
    """Multi-output ops (getitem), keyword arguments, lists of nodes and scalars, and a fallback for get_attr."""
    from lightning_influence.operators.graphs import straight_line

    def fn(x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        out, mean, rstd = aten.native_layer_norm(x, [4], w, None, 1e-5)
        y = aten._to_copy(out, dtype=torch.float64)
        return [aten.cat([y, y * 2.0], 1), mean, rstd.sum(dtype=torch.float32), aten.sum(out, [0, 1], keepdim=True)]

    x, w = torch.randn(3, 4), torch.randn(4)
    gm = make_fx(fn)(x, w)
    run = straight_line(gm)
    assert run is not gm
    for a, b in zip(run(x, w), gm(x, w), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    constant = torch.randn(4)
    with_constant = make_fx(lambda x: x * constant)(x)  # the closed-over tensor becomes a get_attr node
    assert straight_line(with_constant) is with_constant
