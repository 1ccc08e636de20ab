"""Loss families: closed forms against autograd and definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, hessian

from lightning_influence.exceptions import ConfigurationError
from lightning_influence.losses import BinaryLogistic, GaussianNLL, LossFamily, SoftmaxCrossEntropy, get_loss
from lightning_influence.params import make_generator

DT = torch.float64


def _case(loss: LossFamily) -> tuple[torch.Tensor, torch.Tensor]:
    g = make_generator(0)
    if isinstance(loss, SoftmaxCrossEntropy):
        h = torch.randn(3, 4, 5, generator=g, dtype=DT)
        y = torch.randint(0, 5, (3, 4), generator=g)
        y[1, 2] = loss.ignore_index
        return h, y
    if isinstance(loss, BinaryLogistic):
        return torch.randn(6, generator=g, dtype=DT), torch.randint(0, 2, (6,), generator=g)
    return torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, 3, generator=g, dtype=DT)


LOSSES = [SoftmaxCrossEntropy(), BinaryLogistic(), GaussianNLL(variance=2.0)]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda x: x.name)
def test_output_hvp_and_grad_match_autograd(loss: LossFamily) -> None:
    h, y = _case(loss)
    v = torch.randn(h.shape, generator=make_generator(1), dtype=DT)
    total = lambda o: loss.unit_losses(o, y).sum()  # noqa: E731
    H = hessian(total)(h).reshape(h.numel(), h.numel())
    assert torch.allclose(loss.output_hvp(h, y, v).reshape(-1), H @ v.reshape(-1), atol=1e-13)
    assert torch.allclose(loss.output_grad(h, y), grad(total)(h), atol=1e-13)
    assert torch.allclose(loss.expected_fisher_output_vp(h, y, v), loss.output_hvp(h, y, v), atol=1e-13)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda x: x.name)
def test_bregman_matches_definition(loss: LossFamily) -> None:
    h, y = _case(loss)
    h2 = h + 0.3 * torch.randn(h.shape, generator=make_generator(2), dtype=DT)
    g_ref = loss.output_grad(h2, y)
    definition = loss.unit_losses(h, y) - loss.unit_losses(h2, y)
    inner = (h - h2) * g_ref
    event_dims = h.ndim - loss.unit_mask(h, y).ndim
    definition = definition - (inner.sum(dim=tuple(range(-event_dims, 0))) if event_dims else inner)
    assert torch.allclose(loss.bregman(h, h2, y), definition, atol=1e-12)
    assert bool((loss.bregman(h, h2, y) >= -1e-14).all())
    assert float(loss.bregman(h, h, y).abs().max()) < 1e-14


def test_cross_entropy_ignore_index_mean_matches_torch() -> None:
    loss = SoftmaxCrossEntropy()
    h, y = _case(loss)
    expected = F.cross_entropy(h.reshape(-1, 5), y.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss.mean(h, y), expected, atol=1e-14)
    total, count = loss.sum_and_count(h, y)
    assert int(count) == 11
    per_ex, per_count = loss.per_example(h, y)
    assert per_count.tolist() == [4.0, 3.0, 4.0] and torch.allclose(per_ex.sum(), total)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda x: x.name)
def test_sampled_targets_follow_the_model(loss: LossFamily) -> None:
    h, y = _case(loss)
    draws = loss.sample_targets(h, y, make_generator(3), num_samples=20000)
    assert draws.shape == (20000, *y.shape)
    if isinstance(loss, SoftmaxCrossEntropy):
        assert bool((draws[:, 1, 2] == -100).all())  # ignored stays ignored
        freq = F.one_hot(draws[:, 0, 0], 5).to(DT).mean(0)
        expected = torch.softmax(h[0, 0], -1)
    elif isinstance(loss, BinaryLogistic):
        freq, expected = draws.to(DT).mean(0), torch.sigmoid(h)
    else:
        freq, expected = draws.mean(0), h
        assert abs(float(draws.var(0).mean()) - 2.0) < 0.1
    assert float((freq - expected).abs().max()) < 0.03  # ~6 standard errors at 20k draws
    single = loss.sample_targets(h, y, make_generator(3))
    assert single.shape == y.shape


def test_get_loss_names_and_errors() -> None:
    assert isinstance(get_loss("mse"), GaussianNLL)
    with pytest.raises(ConfigurationError, match="unknown loss 'hinge'"):
        get_loss("hinge")
    with pytest.raises(ConfigurationError, match="variance must be positive"):
        GaussianNLL(0.0)
