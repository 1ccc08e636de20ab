"""Every curvature operator against dense float64 matrices built independently with torch.func."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from lightning_influence.exceptions import BatchFormatError, ConfigurationError, NonFiniteError
from lightning_influence.operators import (
    ExpectedFisherOperator,
    FiniteDifferenceGNHOperator,
    GNHOperator,
    HessianOperator,
    SampledFisherOperator,
    gnh_product_reference,
    loss_gradient,
    make_batches,
)
from lightning_influence.params import flatten, trainable_parameters, unflatten
from lightning_influence.tasks import Classification, LanguageModeling, Regression, Task
from tests.helpers.models import bn_dropout_net, tiny_cnn, tiny_mlp, tiny_transformer_lm

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def mlp_case() -> tuple[nn.Module, Task, list]:
    g = _gen(1)
    x = torch.randn(11, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (11,), generator=g)
    return tiny_mlp(dtype=DT), Classification(), [(x[:6], y[:6]), (x[6:], y[6:])]


def cnn_case() -> tuple[nn.Module, Task, list]:
    g = _gen(2)
    x = torch.randn(7, 1, 6, 6, generator=g, dtype=DT)
    y = torch.randint(0, 3, (7,), generator=g)
    return tiny_cnn(dtype=DT), Classification(), [(x[:4], y[:4]), (x[4:], y[4:])]


def lm_case() -> tuple[nn.Module, Task, list]:
    g = _gen(3)
    ids = torch.randint(0, 7, (4, 5), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, -2:] = -100  # padding
    labels[2, 0] = -100
    return tiny_transformer_lm(dtype=DT), LanguageModeling(), [(ids[:2, :-1], labels[:2]), (ids[2:, :-1], labels[2:])]


def binary_case() -> tuple[nn.Module, Task, list]:
    g = _gen(4)
    x = torch.randn(9, 4, generator=g, dtype=DT)
    y = torch.randint(0, 2, (9,), generator=g)
    return tiny_mlp(out=1, dtype=DT), Classification("binary"), [(x, y)]


def regression_case() -> tuple[nn.Module, Task, list]:
    g = _gen(5)
    x = torch.randn(8, 4, generator=g, dtype=DT)
    y = torch.randn(8, 2, generator=g, dtype=DT)
    return tiny_mlp(out=2, dtype=DT), Regression(variance=0.5), [(x, y)]


CASES = {"mlp": mlp_case, "cnn": cnn_case, "lm": lm_case, "binary": binary_case, "regression": regression_case}


def _independent_loss_sum(task: Task, out: Tensor, y: Tensor) -> Tensor:
    """The loss written directly with torch.nn.functional, not through lightning_influence.losses."""
    if isinstance(task, LanguageModeling) or (isinstance(task, Classification) and out.shape[-1] > 1):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum")
    if isinstance(task, Classification):
        return F.binary_cross_entropy_with_logits(out.reshape(-1), y.to(out.dtype).reshape(-1), reduction="sum")
    return 0.5 * ((out - y) ** 2).sum() / 0.5  # Regression(variance=0.5)


def _count(task: Task, y: Tensor) -> int:
    return int((y != -100).sum()) if isinstance(task, LanguageModeling) else int(y.shape[0])


def dense_references(model: nn.Module, task: Task, data: list) -> tuple[Tensor, Tensor]:
    """(GNH, Hessian) of the mean loss, built from jacrev/hessian of functional_call only."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    names = list(params)
    flat = flatten(params)
    P = flat.numel()
    gnh = torch.zeros(P, P, dtype=DT)
    hess = torch.zeros(P, P, dtype=DT)
    n_total = 0
    model.eval()
    for x, y in data:

        def out_fn(theta: Tensor, x: Tensor = x) -> Tensor:
            return functional_call(model, unflatten(theta, params), (x,))

        out = out_fn(flat)
        J = jacrev(out_fn)(flat).reshape(-1, P)
        S = hessian(lambda o, y=y, out=out: _independent_loss_sum(task, o.reshape(out.shape), y))(out.reshape(-1))
        gnh += J.T @ S @ J
        hess += hessian(lambda t, y=y, f=out_fn: _independent_loss_sum(task, f(t), y))(flat)
        n_total += _count(task, y)
    assert names == list(trainable_parameters(model))
    return gnh / n_total, hess / n_total


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", sorted(CASES))
def test_operators_match_dense_float64(case: str) -> None:
    model, task, data = CASES[case]()
    gnh_ref, hess_ref = dense_references(model, task, data)
    assert gnh_ref.norm() > 0
    assert _rel(GNHOperator(model, task, data).dense(), gnh_ref) <= 1e-10
    assert _rel(ExpectedFisherOperator(model, task, data).dense(), gnh_ref) <= 1e-10
    assert _rel(HessianOperator(model, task, data).dense(), hess_ref) <= 1e-10
    fd_dirs = torch.randn(gnh_ref.shape[0], 4, generator=_gen(8), dtype=DT)
    assert _rel(FiniteDifferenceGNHOperator(model, task, data).matmat(fd_dirs), gnh_ref @ fd_dirs) <= 1e-4
    # damping, multi-vector products and the forward-only quadratic form
    op = GNHOperator(model, task, data, damping=0.3)
    V = torch.randn(op.num_params, 3, generator=_gen(9), dtype=DT)
    expected = (gnh_ref + 0.3 * torch.eye(op.num_params, dtype=DT)) @ V
    assert _rel(op.matmat(V), expected) <= 1e-10
    assert _rel(op @ V[:, 0], expected[:, 0]) <= 1e-10
    q = op.quadratic_form(V[:, 1])
    assert abs(float(q) - float(V[:, 1] @ expected[:, 1])) <= 1e-10 * abs(float(q))
    qs = op.quadratic_forms(V)
    assert _rel(qs, (V * expected).sum(0)) <= 1e-10


def test_reference_product_agrees_with_fast_path() -> None:
    model, task, data = mlp_case()
    v = torch.randn(43, generator=_gen(0), dtype=DT)
    op = GNHOperator(model, task, data[:1])
    assert _rel(op.matvec(v) * data[0][1].shape[0], gnh_product_reference(model, task, data[0], v)) <= 1e-12


@pytest.mark.parametrize("case", ["mlp", "binary", "regression", "lm"])
def test_sampled_fisher_converges_to_gnh(case: str) -> None:
    """Unbiasedness: the replicate mean's squared error is explained by the Monte-Carlo variance alone."""
    model, task, data = CASES[case]()
    gnh = GNHOperator(model, task, data).dense()
    reps = torch.stack(
        [SampledFisherOperator(model, task, data, mc_samples=64, seed=s).dense() for s in range(8)]
    )
    mean = reps.mean(0)
    var_of_mean = reps.var(0, unbiased=True).sum() / reps.shape[0]
    sq_err = ((mean - gnh) ** 2).sum()
    assert sq_err <= 3 * var_of_mean  # a biased sampler (wrong distribution) fails by orders of magnitude
    # and the error shrinks with more samples
    few = SampledFisherOperator(model, task, data, mc_samples=4, seed=100).dense()
    many = SampledFisherOperator(model, task, data, mc_samples=1024, seed=100).dense()
    assert _rel(many, gnh) < 0.5 * _rel(few, gnh)
    assert _rel(many, gnh) < 0.1


def test_loss_gradient_matches_autograd() -> None:
    model, task, data = lm_case()
    params = trainable_parameters(model)
    flat = flatten(params).requires_grad_(True)
    total, n = 0.0, 0
    for x, y in data:
        total = total + _independent_loss_sum(task, functional_call(model, unflatten(flat, params), (x,)), y)
        n += _count(task, y)
    (expected,) = torch.autograd.grad(total / n, flat)
    assert _rel(loss_gradient(model, task, data), expected) <= 1e-12


def test_frozen_parameters_are_excluded() -> None:
    model, task, data = mlp_case()
    model[0].weight.requires_grad_(False)
    op = GNHOperator(model, task, data)
    assert op.num_params == 43 - 20
    assert "0.weight" not in op.params


def test_side_effects_none_and_modes_restored() -> None:
    model = bn_dropout_net(dtype=DT).train()
    g = _gen(6)
    x, y = torch.randn(10, 4, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g)
    model.fc1.weight.grad = torch.ones_like(model.fc1.weight)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    rng = torch.get_rng_state()
    modes = [m.training for m in model.modules()]
    model.drop.eval()  # a mixed mode must be restored exactly
    modes = [m.training for m in model.modules()]
    for op in (GNHOperator(model, Classification(), [(x, y)]), HessianOperator(model, Classification(), [(x, y)]),
               SampledFisherOperator(model, Classification(), [(x, y)], seed=3)):
        op.matvec(torch.ones(op.num_params, dtype=DT))
        op.quadratic_form(torch.ones(op.num_params, dtype=DT))
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model.fc1.weight.grad, torch.ones_like(model.fc1.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc1.weight")
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k


@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
def test_works_under_inference_mode_and_no_grad(context: str) -> None:
    model, task, data = mlp_case()
    expected = GNHOperator(model, task, data).dense()
    ctx = torch.inference_mode() if context == "inference_mode" else torch.no_grad()
    with ctx:
        inf_data = [(x.clone(), y.clone()) for x, y in data]  # inference tensors under inference_mode
        op = GNHOperator(model, task, inf_data)
        got = op.matvec(torch.ones(op.num_params, dtype=DT))
        grad = loss_gradient(model, task, inf_data)
    assert _rel(got, expected @ torch.ones(43, dtype=DT)) <= 1e-12
    assert grad.norm() > 0


def test_make_batches_and_counts() -> None:
    ds = torch.utils.data.TensorDataset(torch.randn(7, 4, dtype=DT), torch.randint(0, 3, (7,)))
    batches = make_batches(ds, [6, 0, 3], batch_size=2)
    assert [len(b[1]) for b in batches] == [2, 1]
    assert torch.equal(batches[0][1], torch.stack([ds[6][1], ds[0][1]]))
    op = GNHOperator(tiny_mlp(dtype=DT), Classification(), batches)
    op.matvec(torch.zeros(op.num_params, dtype=DT))
    assert op.examples_processed == 3 and op.num_units == 3
    with pytest.raises(ConfigurationError, match="out of range"):
        make_batches(ds, [7])
    with pytest.raises(ConfigurationError, match="batch_size"):
        make_batches(ds, batch_size=0)


def test_reduce_fn_called_once_per_product() -> None:
    model, task, data = mlp_case()
    calls: list[int] = []

    def reduce_fn(t: Tensor) -> Tensor:
        calls.append(t.numel())
        return t

    op = GNHOperator(model, task, data, reduce_fn=reduce_fn)
    op.matvec(torch.ones(43, dtype=DT))
    op.quadratic_form(torch.ones(43, dtype=DT))
    assert calls == [44, 2]


def test_no_trainable_parameters_error() -> None:
    model = tiny_mlp(dtype=DT).requires_grad_(False)
    with pytest.raises(ConfigurationError, match="no trainable parameters"):
        GNHOperator(model, Classification(), [])


@pytest.mark.parametrize(
    ("task", "batch", "match"),
    [
        (Classification(), (torch.randn(4, 4, dtype=DT), torch.randint(0, 3, (5,))), "do not match logits"),
        (Classification(), (torch.randn(4, 4, dtype=DT), torch.randn(4, 3, dtype=DT)), "Use Regression"),
        (Classification(), (torch.randn(4, 4, dtype=DT), torch.tensor([0, 1, 2, 3])), r"must lie in \[0, 3\)"),
        (Classification("binary"), (torch.randn(4, 4, dtype=DT), torch.zeros(4)), "one logit per example"),
        (Regression(), (torch.randn(4, 4, dtype=DT), torch.randn(4, 1, dtype=DT)), "do not match outputs"),
        (Regression(), (torch.randn(4, 4, dtype=DT), torch.randint(0, 3, (4, 3))), "use Classification"),
        (Classification(), {"x": torch.randn(4, 4)}, "override split"),
        (Classification(), (torch.randn(4, 4, dtype=DT),), "subclass the task"),
    ],
)
def test_bad_batches_raise_clear_errors(task: Task, batch: object, match: str) -> None:
    op = GNHOperator(tiny_mlp(dtype=DT), task, [batch])
    with pytest.raises(BatchFormatError, match=match):
        op.matvec(torch.ones(op.num_params, dtype=DT))


def test_non_finite_product_names_the_batch() -> None:
    model, task, data = mlp_case()
    bad_x = data[1][0].clone()
    bad_x[0, 0] = float("nan")
    op = GNHOperator(model, task, [data[0], (bad_x, data[1][1])])
    with pytest.raises(NonFiniteError, match="batch 1"):
        op.matvec(torch.ones(43, dtype=DT))


def test_custom_dict_batch_task() -> None:
    class DictTask(Classification):
        def split(self, batch: dict) -> tuple[tuple[Tensor], Tensor]:
            return (batch["pixels"],), batch["label"]

    model, task, data = mlp_case()
    dict_data = [{"pixels": x, "label": y} for x, y in data]
    assert _rel(GNHOperator(model, DictTask(), dict_data).dense(), GNHOperator(model, task, data).dense()) <= 1e-14


def test_negative_damping_rejected() -> None:
    model, task, data = mlp_case()
    with pytest.raises(ConfigurationError, match="damping"):
        GNHOperator(model, task, data, damping=-1.0)


def test_stock_transformer_layer_supports_forward_mode() -> None:
    """nn.TransformerEncoderLayer's fused eval fast path and flash attention have no jvp; the operators avoid them."""

    class Stock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.layer = nn.TransformerEncoderLayer(4, 1, 6, dropout=0.0, batch_first=True)
            self.head = nn.Linear(4, 5)

        def forward(self, ids: Tensor) -> Tensor:
            return self.head(self.layer(self.emb(ids)))

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Stock().double()
    ids = torch.randint(0, 5, (2, 4), generator=_gen(11))
    task, data = LanguageModeling(), [ids]
    params = trainable_parameters(model)
    flat = flatten(params)
    x, y = ids[:, :-1], ids[:, 1:]
    from lightning_influence.operators import curvature_mode

    with curvature_mode(model):
        out = functional_call(model, unflatten(flat, params), (x,))
        J = jacrev(lambda t: functional_call(model, unflatten(t, params), (x,)))(flat).reshape(-1, flat.numel())
        S = hessian(lambda o: _independent_loss_sum(task, o.reshape(out.shape), y))(out.reshape(-1))
    expected = J.T @ S @ J / y.numel()
    op = GNHOperator(model, task, data)
    v = torch.randn(flat.numel(), generator=_gen(12), dtype=DT)
    assert _rel(op.matvec(v), expected @ v) <= 1e-10
    assert abs(float(op.quadratic_form(v)) - float(v @ expected @ v)) <= 1e-10 * float(v @ expected @ v)
    assert torch.backends.mha.get_fastpath_enabled()  # global switch restored


def test_curvature_mode_restores_global_switches_after_nested_and_concurrent_entries() -> None:
    """The fast-path and attention-backend flags are process-wide: the last of overlapping entries restores them."""
    import threading

    from lightning_influence.operators import curvature_mode

    cuda = torch.backends.cuda
    flags = lambda: (torch.backends.mha.get_fastpath_enabled(), cuda.flash_sdp_enabled(), cuda.math_sdp_enabled())  # noqa: E731
    before = flags()
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    inside, leave = threading.Event(), threading.Event()

    def worker() -> None:  # enters first and leaves first, while the main thread is still inside
        with curvature_mode(model):
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    assert inside.wait(10)
    with curvature_mode(model):
        leave.set()
        thread.join(10)
        assert flags() == (False, False, True)  # the worker's exit did not restore them under this entry
        with curvature_mode(model):
            assert flags() == (False, False, True)
        assert flags() == (False, False, True)
    assert flags() == before and model[1].training


@pytest.mark.parametrize("case", ["cnn", "lm", "binary"])
def test_output_jacobian_is_per_example_and_equals_the_batched_jacobian(case: str) -> None:
    """dense()'s Jacobian: one jacrev per example (vmapped), not the batched one, and the same numbers to round-off."""
    from lightning_influence.evaluator import Evaluator, curvature_mode

    model, task, data = CASES[case]()
    ev = Evaluator(model, task)
    batch = ev.prepare(data[0])
    with curvature_mode(model):
        outputs, _, J = ev.output_jacobian(batch)
        f, _ = ev.output_fn(batch)
        jac = jacrev(f)(ev.params)
    assert ev._vectorised_jacobians  # the per-example path ran; it did not fall back
    ref = torch.cat([jac[k].reshape(*outputs.shape, -1) for k in ev.params], -1)
    assert J.shape == (*outputs.shape, ev.num_params) and ref.abs().max() > 0
    assert torch.allclose(J, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
