"""The test helpers themselves: tiny, deterministic, RNG-neutral and correct under torch.func in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jvp, vjp

from tests.helpers.models import (
    BNDropoutNet,
    ManualLayerNorm,
    TinyTransformerLM,
    bn_dropout_net,
    num_params,
    tiny_cnn,
    tiny_mlp,
    tiny_transformer_lm,
)


def _case(name: str) -> tuple[nn.Module, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    f64 = torch.float64
    if name == "mlp":
        return tiny_mlp(dtype=f64), torch.randn(6, 4, generator=gen, dtype=f64)
    if name == "cnn":
        return tiny_cnn(dtype=f64), torch.randn(6, 1, 6, 6, generator=gen, dtype=f64)
    if name == "transformer":
        return tiny_transformer_lm(dtype=f64), torch.randint(0, 7, (3, 5), generator=gen)
    if name == "bn_dropout":
        return bn_dropout_net(dtype=f64), torch.randn(6, 4, generator=gen, dtype=f64)
    raise AssertionError(name)


CASES = ["mlp", "cnn", "transformer", "bn_dropout"]


@pytest.mark.parametrize("name", CASES)
def test_models_are_tiny(name: str) -> None:
    model, _ = _case(name)
    assert 0 < num_params(model) < 200


def test_builders_are_deterministic_and_leave_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    first = [tiny_mlp(), tiny_cnn(), tiny_transformer_lm(), bn_dropout_net()]
    second = [tiny_mlp(), tiny_cnn(), tiny_transformer_lm(), bn_dropout_net()]
    assert torch.equal(state, torch.random.get_rng_state())
    for a, b in zip(first, second, strict=True):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb)
    assert not torch.equal(tiny_mlp(seed=0)[0].weight, tiny_mlp(seed=1)[0].weight)


def test_plain_classes_are_constructible() -> None:
    assert isinstance(TinyTransformerLM(vocab=7, d_model=4, n_heads=1, seq_len=5), nn.Module)
    assert isinstance(TinyTransformerLM(d_model=4, n_heads=2), nn.Module)
    assert isinstance(BNDropoutNet(), nn.Module)
    with pytest.raises(ValueError, match="must divide"):
        TinyTransformerLM(d_model=4, n_heads=3)


def _flat(model: nn.Module):
    params = {k: v.detach() for k, v in model.named_parameters()}
    names, shapes = list(params), [v.shape for v in params.values()]
    flat = torch.cat([v.reshape(-1) for v in params.values()])

    def unflatten(vec: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            out[name] = vec[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return out

    return params, flat, unflatten


@pytest.mark.parametrize("name", CASES)
def test_torch_func_products_in_float64(name: str) -> None:
    """jvp matches central differences, vjp is its adjoint, the dense Hessian of a scalar loss is symmetric."""
    model, x = _case(name)
    model.eval()
    _, flat, unflatten = _flat(model)

    def f(vec: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflatten(vec), (x,))

    gen = torch.Generator().manual_seed(2)
    v = torch.randn(flat.shape, generator=gen, dtype=flat.dtype)
    out, jv = jvp(f, (flat,), (v,))
    eps = 1e-6
    fd = (f(flat + eps * v) - f(flat - eps * v)) / (2 * eps)
    torch.testing.assert_close(jv, fd, rtol=1e-6, atol=1e-7)

    u = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    _, pullback = vjp(f, flat)
    (ju,) = pullback(u)
    torch.testing.assert_close((jv * u).sum(), (ju * v).sum())

    loss = lambda vec: torch.logsumexp(f(vec), dim=-1).sum()  # noqa: E731
    hess = hessian(loss)(flat)
    assert torch.isfinite(hess).all()
    torch.testing.assert_close(hess, hess.T, rtol=0, atol=1e-10)


def test_manual_layer_norm_matches_native_forward() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    ours = ManualLayerNorm(4).double()
    native = nn.LayerNorm(4).double()
    with torch.no_grad():
        for p, q in zip(ours.parameters(), native.parameters(), strict=True):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            q.copy_(p)
    torch.testing.assert_close(ours(x), native(x))


def test_bn_dropout_net_modes() -> None:
    model, x = _case("bn_dropout")
    model.eval()
    torch.testing.assert_close(model(x), model(x))  # no dropout, running stats
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        a = model(x)
        b = model(x)
    assert not torch.allclose(a, b)  # dropout active in train mode


def test_digits_tensors() -> None:
    pytest.importorskip("sklearn", reason="digits come from scikit-learn")
    from tests.helpers.data import digits_tensors

    x, y = digits_tensors(torch.float64)
    assert x.shape == (1797, 64)
    assert x.dtype == torch.float64
    assert y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    torch.testing.assert_close(x.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-12, rtol=0)
    x32, _ = digits_tensors(torch.float32)
    assert x32.dtype == torch.float32
