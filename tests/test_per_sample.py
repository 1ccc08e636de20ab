"""Hook-based per-example gradients (``lightning_influence.per_sample``) against independent ground truth.

Ground truth is one ``torch.autograd.grad`` per example at batch size 1 on the module's own parameters (no
``functional_call``, no ``vmap``, no hooks), in float64. Every layer formula is exercised, both convolution paths
(per-example backward when output positions outnumber output channels, im2col otherwise), in-place ops after
hooked layers, a module called twice, frozen weights, and the cases that must fall back to ``vmap``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_influence.evaluator import _HOOKS_VERIFIED, Evaluator, curvature_mode
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.influence import iter_per_example_gradients as per_example_iter
from lightning_influence.influence import per_example_gradients
from lightning_influence.per_sample import hook_plan
from lightning_influence.tasks import Classification, LanguageModeling, Task

F64 = torch.float64


class ResidualCNN(nn.Module):
    """Conv (both paths, groups, stride, dilation), BatchNorm eval, in-place ReLU and +=, Group/LayerNorm, Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)  # 64 positions > 4 channels: loop path
        self.relu = nn.ReLU(inplace=True)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(4)
        self.c3, self.gn = nn.Conv2d(4, 32, 3, stride=2, dilation=2, padding=2), nn.GroupNorm(4, 32)  # 16 <= 32: im2col
        self.ln = nn.LayerNorm(16)
        self.c4 = nn.Conv1d(32, 24, 3, padding=1, groups=4)  # 16 positions <= 24 channels: im2col, grouped
        self.fc = nn.Linear(24 * 16, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(h))
        y += h
        y = self.relu(y)
        z = self.ln(self.gn(self.c3(y)).flatten(2))  # (b, 32, 16), normalised over the last dim
        return self.fc(self.c4(z).flatten(1))


class TokenModel(nn.Module):
    """Embedding (with padding_idx), a Linear called twice on a sequence, LayerNorm over features."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        h = torch.tanh(self.mix(h))
        h = self.norm(torch.tanh(self.mix(h)) + h)
        return self.head(h)


class ReadsWeightOutside(nn.Module):
    """Ties the output layer to the embedding through ``F.linear``: invisible to hooks, caught by the check."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, ids: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.mix(self.emb(ids))), self.emb.weight)


def _reference(model: nn.Module, task: Task, inputs: Tensor, targets: Tensor, normalization: str = "sum") -> Tensor:
    """One autograd gradient per example on the module itself."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    with curvature_mode(model):
        for i in range(inputs.shape[0]):
            out, y = task.targets(task.outputs(model(inputs[i : i + 1])), targets[i : i + 1])
            total, count = task.loss.per_example(out, y)
            value = total.sum() / count.clamp_min(1).sum() if normalization == "mean" else total.sum()
            grads = torch.autograd.grad(value, params, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for g, p in zip(grads, params, strict=True)]))
    return torch.stack(rows)


def _image_case() -> tuple[nn.Module, Task, Tensor, Tensor]:
    torch.manual_seed(0)
    model = ResidualCNN().to(F64)
    for bn in (model.b1, model.b2):
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return model, Classification(), torch.randn(6, 3, 8, 8, dtype=F64), torch.randint(0, 5, (6,))


def _token_case() -> tuple[nn.Module, Task, Tensor, Tensor]:
    torch.manual_seed(1)
    model = TokenModel().to(F64)
    ids = torch.randint(0, 11, (5, 7))
    labels = ids.roll(-1, 1)
    labels[:, -2:] = -100  # ignored tokens
    labels[0] = -100  # one example with no counted token
    return model, LanguageModeling(), ids, labels



@pytest.mark.parametrize("case", [_image_case, _token_case], ids=["residual-cnn", "token-model"])
@pytest.mark.parametrize("normalization", ["sum", "mean"])
def test_hook_gradients_equal_per_example_autograd(case, normalization: str) -> None:
    model, task, x, y = case()
    ev = Evaluator(model, task)
    with curvature_mode(model):
        assert hook_plan(model, ev.params) is not None  # every parameter is covered: the hook path is taken
    grads, losses = ev.per_example((x, y), normalization)
    assert _HOOKS_VERIFIED[model] and all(_HOOKS_VERIFIED[model].values())
    ref = _reference(model, task, x, y, normalization)
    torch.testing.assert_close(grads, ref, rtol=1e-12, atol=1e-12)
    vm, vm_losses = Evaluator(model, task, per_example="vmap").per_example((x, y), normalization)
    torch.testing.assert_close(grads, vm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses, vm_losses, rtol=1e-12, atol=1e-12)
    assert ev.gradient_examples == x.shape[0]


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.unused = nn.Linear(2, 2)  # registered but never called: its gradient is zero

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def test_frozen_weight_and_unused_module() -> None:
    torch.manual_seed(2)
    model = WithUnused().to(F64)
    model.body[0].weight.requires_grad_(False)  # only its bias is differentiated
    x, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,))
    ev = Evaluator(model, Classification())
    grads, _ = ev.per_example((x, y))
    with curvature_mode(model):
        assert hook_plan(model, ev.params) is not None
    assert grads.shape == (5, 4 + 4 * 2 + 2 + 6)
    torch.testing.assert_close(grads, _reference(model, Classification(), x, y), rtol=1e-12, atol=1e-12)
    assert grads[:, -6:].abs().max() == 0  # the unused layer's slot is written as zeros, not left uninitialised


def test_parameter_read_outside_its_module_falls_back_to_vmap() -> None:
    torch.manual_seed(3)
    model = ReadsWeightOutside().to(F64)
    task = LanguageModeling()
    ids = torch.randint(0, 9, (4, 6))
    ev = Evaluator(model, task)
    with curvature_mode(model):
        assert hook_plan(model, ev.params) is not None  # the plan cannot see F.linear(h, emb.weight) ...
    grads, _ = ev.per_example((ids[:, :-1], ids[:, 1:]))
    assert _HOOKS_VERIFIED[model] and not any(_HOOKS_VERIFIED[model].values())  # ... the one-time check does
    torch.testing.assert_close(grads, _reference(model, task, ids[:, :-1], ids[:, 1:]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda: nn.GRU(3, 2),  # no formula
    lambda: nn.BatchNorm1d(3),  # train mode: batch statistics couple the examples
    lambda: nn.BatchNorm1d(3, track_running_stats=False).eval(),  # batch statistics even in eval
    lambda: nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"),
    lambda: nn.Embedding(5, 2, max_norm=1.0),
], ids=["gru", "bn-train", "bn-no-running-stats", "circular-padding", "embedding-max-norm"])
def test_models_without_a_formula_have_no_plan(make) -> None:
    m = make()
    assert hook_plan(m, {k: v.detach() for k, v in m.named_parameters()}) is None


def test_tied_weights_have_no_plan_and_still_give_exact_gradients() -> None:
    torch.manual_seed(4)
    model = TokenModel().to(F64)
    model.head.weight = model.emb.weight  # tied like GPT-2's lm_head: two modules own one parameter
    task = LanguageModeling()
    ev = Evaluator(model, task)
    with curvature_mode(model):
        assert hook_plan(model, ev.params) is None
    ids = torch.randint(1, 11, (3, 6))
    grads, _ = ev.per_example((ids[:, :-1], ids[:, 1:]))
    torch.testing.assert_close(grads, _reference(model, task, ids[:, :-1], ids[:, 1:]), rtol=1e-12, atol=1e-12)


def test_streamed_gradients_use_the_hook_path_and_match_vmap_in_float32() -> None:
    torch.manual_seed(5)
    model, task, x, y = _image_case()
    model = model.float()
    G = per_example_gradients(model, task, (x.float(), y), chunk_size=4)
    assert _HOOKS_VERIFIED[model] and all(_HOOKS_VERIFIED[model].values())
    ref, _ = Evaluator(model, task, per_example="vmap").per_example((x.float(), y))
    torch.testing.assert_close(G, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_unknown_per_example_method_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="per_example must be one of"):
        Evaluator(nn.Linear(2, 1), Classification(), per_example="loop")


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_gradients_formed_in_a_reused_buffer_equal_fresh_ones(method: str) -> None:
    # The scoring loop forms every chunk's gradients in one workspace (no page faults of a fresh (chunk, P) matrix):
    # the rows must be the exact per-example gradients whatever the buffer held before, on both paths.
    model, task, x, y = _image_case()
    ev = Evaluator(model, task, per_example=method)
    ref = _reference(model, task, x, y)
    buf = torch.full((4, ev.num_params), float("nan"), dtype=F64)  # stale contents must all be overwritten
    for rows in (slice(0, 4), slice(2, 6)):
        g, _ = ev.per_example((x[rows], y[rows]), "sum", out=buf)
        assert g.data_ptr() == buf.data_ptr()
        torch.testing.assert_close(g, ref[rows], rtol=1e-12, atol=1e-12)
    # Streaming: a workspace of chunk_size rows is overwritten chunk by chunk; a buffer with a row per example is
    # filled in place.
    work = torch.full((4, ev.num_params), float("nan"), dtype=F64)
    for idx, g, _ in per_example_iter(model, task, (x, y), chunk_size=4, out=work):
        assert g.data_ptr() == work.data_ptr()
        torch.testing.assert_close(g, ref[idx], rtol=1e-12, atol=1e-12)
    whole = torch.full((6, ev.num_params), float("nan"), dtype=F64)
    list(per_example_iter(model, task, (x, y), chunk_size=4, out=whole))
    torch.testing.assert_close(whole, ref, rtol=1e-12, atol=1e-12)


def test_a_bad_gradient_buffer_is_a_clear_error() -> None:
    model, task, x, y = _image_case()
    ev = Evaluator(model, task)
    for bad in (torch.empty(6, ev.num_params + 1, dtype=F64), torch.empty(6, ev.num_params),
                torch.empty(ev.num_params, 6, dtype=F64).T):
        with pytest.raises(ConfigurationError, match="out must be a contiguous"):
            ev.per_example((x, y), out=bad)
    with pytest.raises(ConfigurationError, match="needs at least chunk_size=4"):
        next(per_example_iter(model, task, (x, y), chunk_size=4, out=torch.empty(3, ev.num_params, dtype=F64)))
