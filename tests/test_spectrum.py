"""Trace, eigenvalue and LiSSA-setting estimators against exact float64 answers."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_influence.config import SpectrumConfig
from lightning_influence.exceptions import ConfigurationError, NonFiniteError
from lightning_influence.operators import GNHOperator
from lightning_influence.params import derive_seed
from lightning_influence.solvers import conjugate_gradient, dense_solve
from lightning_influence.spectrum import (
    DenseOperator,
    critical_batch_size,
    estimate_spectrum,
    frobenius_norm,
    hutchinson_trace,
    lanczos_lambda_max,
    lissa_settings,
    sketch_lambda_max,
)
from lightning_influence.tasks import Classification, LanguageModeling
from tests.helpers.models import tiny_cnn, tiny_mlp, tiny_transformer_lm
from tests.test_operators import cnn_case, lm_case, mlp_case

DT = torch.float64


@pytest.fixture(scope="module")
def mlp_gnh() -> tuple[GNHOperator, torch.Tensor]:
    model, task, data = mlp_case()
    op = GNHOperator(model, task, data)
    return op, op.dense()


def test_hutchinson_within_three_stderr_and_calibrated(mlp_gnh: tuple[GNHOperator, torch.Tensor]) -> None:
    op, dense = mlp_gnh
    exact = float(torch.trace(dense))
    estimates = [hutchinson_trace(op, num_probes=30, seed=s) for s in range(20)]
    # v^T A v is right-skewed here (skewness ~1.2), so the t-statistic's lower tail is heavier than a normal's:
    # over 300 seeds |z| > 3 held for 1-2 % of them (z down to -4.9). Allow one of 20 past 3 SE, none past 6.
    z = [abs(est.value - exact) / est.stderr for est in estimates]
    assert sum(v > 3 for v in z) <= 1 and max(z) <= 6, (z, exact)
    spread = float(torch.tensor([e.value for e in estimates]).std())
    mean_se = sum(e.stderr for e in estimates) / len(estimates)
    assert 0.5 <= mean_se / spread <= 2.0, (mean_se, spread)


def test_hutchinson_adaptive_stopping(mlp_gnh: tuple[GNHOperator, torch.Tensor]) -> None:
    op, _ = mlp_gnh
    est = hutchinson_trace(op, num_probes=5, rtol=0.05, max_probes=400, seed=1)
    assert est.relative_stderr <= 0.05
    assert 5 <= est.num_probes < 400
    with pytest.raises(ConfigurationError, match="num_probes"):
        hutchinson_trace(op, num_probes=1)


def test_frobenius_norm_unbiased(mlp_gnh: tuple[GNHOperator, torch.Tensor]) -> None:
    op, dense = mlp_gnh
    est = frobenius_norm(op, num_probes=60, seed=0)
    exact = float((dense**2).sum())
    assert abs(est.value - exact) <= 4 * est.stderr


@pytest.mark.parametrize("case", [mlp_case, cnn_case, lm_case], ids=["mlp", "cnn", "lm"])
def test_lanczos_within_one_percent_in_30_products(case) -> None:  # type: ignore[no-untyped-def]
    model, task, data = case()
    op = GNHOperator(model, task, data)
    exact = float(torch.linalg.eigvalsh(op.dense())[-1])
    est = lanczos_lambda_max(op, max_iter=30, seed=0)
    assert est.num_products <= 30
    assert abs(est.value - exact) <= 0.01 * exact
    assert est.value <= exact * (1 + 1e-10)  # Ritz values are lower bounds


def test_sketch_within_stated_bias() -> None:
    model, task, data = cnn_case()
    dense = GNHOperator(model, task, data).dense()
    evals = torch.linalg.eigvalsh(dense)
    lmax, tr, fro = float(evals[-1]), float(evals.sum()), float(evals.norm())
    d = 60
    for seed in range(5):
        raw = sketch_lambda_max(DenseOperator(dense), dim=d, seed=seed, bias_correction=False)
        corrected = sketch_lambda_max(DenseOperator(dense), dim=d, seed=seed)
        # uncorrected: biased upward by about Tr/d, fluctuating by O(||H||_F / sqrt(d))
        assert abs(raw.value - (lmax + tr / d)) <= 3 * fro / math.sqrt(d)
        assert abs(corrected.value - lmax) <= 3 * fro / math.sqrt(d)
        assert abs(raw.residual - tr / d) <= 3 * fro / math.sqrt(d)  # the reported correction is ~Tr/d


def test_lissa_settings_follow_paper() -> None:
    s = lissa_settings(trace=50.0, lambda_max=4.0, damping=0.01)
    assert s.eta == pytest.approx(1 / 4.01)
    assert s.batch_size == 25  # ceil(2 * 50 / 4)
    assert s.steps == math.ceil(2 * 4.01 / 0.01)
    capped = lissa_settings(trace=50.0, lambda_max=4.0, damping=0.01, dataset_size=10)
    assert capped.batch_size == 10 and capped.batch_size_capped
    assert critical_batch_size(50.0, 4.0) == 12.5
    with pytest.raises(ConfigurationError, match="damping > 0"):
        lissa_settings(1.0, 1.0, 0.0)
    with pytest.raises(NonFiniteError, match="lambda_max"):
        critical_batch_size(1.0, float("nan"))


def test_estimate_spectrum_summary(mlp_gnh: tuple[GNHOperator, torch.Tensor]) -> None:
    op, dense = mlp_gnh
    s = estimate_spectrum(op, damping=1e-2, trace_probes=200, seed=0)
    evals = torch.linalg.eigvalsh(dense)
    assert abs(s.lambda_max - float(evals[-1])) <= 0.01 * float(evals[-1])
    assert abs(s.trace - float(evals.sum())) <= 4 * s.trace_stderr
    assert s.critical_batch_size == pytest.approx(s.trace / s.lambda_max)
    assert set(s.metrics()) == {
        "curvature/trace", "curvature/trace_stderr", "curvature/lambda_max", "curvature/critical_batch_size",
        "lissa/eta", "lissa/batch_size", "lissa/steps", "curvature/products", "curvature/seconds",
    }
    with pytest.raises(ConfigurationError, match="undamped"):
        estimate_spectrum(op.with_damping(0.1))


def test_estimators_leave_global_rng_and_grads_alone() -> None:
    model = tiny_transformer_lm(dtype=DT).train()
    ids = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(0))
    op = GNHOperator(model, LanguageModeling(), [ids])
    rng = torch.get_rng_state()
    estimate_spectrum(op, trace_probes=4, lanczos_iter=5)
    sketch_lambda_max(op, dim=4)
    frobenius_norm(op, num_probes=2)
    conjugate_gradient(op, torch.ones(op.num_params, dtype=DT), damping=1.0, max_iter=5, warn=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_cg_matches_dense_solve() -> None:
    model, task, data = cnn_case()
    op = GNHOperator(model, task, data)
    b = torch.randn(op.num_params, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    exact = dense_solve(op, b, damping=1e-2).x
    res = conjugate_gradient(op, b, damping=1e-2, rtol=1e-10, max_iter=500)
    assert res.converged and res.relative_residual <= 1e-9
    assert float((res.x - exact).norm() / exact.norm()) <= 1e-7
    with pytest.warns(RuntimeWarning, match="max_iter"):
        conjugate_gradient(op, b, damping=1e-2, rtol=1e-12, max_iter=2)


def test_model_builders_are_small() -> None:
    for m in (tiny_mlp(), tiny_cnn(), tiny_transformer_lm()):
        assert sum(p.numel() for p in m.parameters()) < 200
    assert Classification().loss.name == "softmax_cross_entropy"


# ------------------------------------------------------------------------------- deflated Hutchinson
def test_deflated_hutchinson_exact_with_full_basis_unbiased_and_lower_variance(
    mlp_gnh: tuple[GNHOperator, torch.Tensor],
) -> None:
    op, dense = mlp_gnh
    exact = float(torch.trace(dense))
    # a complete orthonormal basis leaves nothing to estimate: the trace is exact and the probes are zero
    gen = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(op.num_params, op.num_params, dtype=DT, generator=gen))[0].T
    full = hutchinson_trace(op, 3, deflate=q, deflated_trace=float(torch.einsum("ip,pq,iq->", q, dense, q)))
    assert full.value == pytest.approx(exact, rel=1e-10) and full.stderr <= 1e-8 * exact
    # the Lanczos basis of a few products, drawn independently of the probes: unbiased, and a far smaller spread
    eig = lanczos_lambda_max(op, 6, tol=1e-12, seed=11)
    assert eig.basis is not None and eig.basis.shape == (6, op.num_params)
    assert eig.basis_trace == pytest.approx(float(torch.einsum("ip,pq,iq->", eig.basis, dense, eig.basis)), rel=1e-10)
    plain = torch.tensor([hutchinson_trace(op, 2, seed=s).value for s in range(150)], dtype=DT)
    defl = torch.tensor([hutchinson_trace(op, 2, seed=s, deflate=eig.basis, deflated_trace=eig.basis_trace).value
                         for s in range(150)], dtype=DT)
    se = float(defl.std() / math.sqrt(len(defl)))
    assert abs(float(defl.mean()) - exact) <= 4 * se
    assert float(defl.std()) <= 0.5 * float(plain.std())


def test_estimate_spectrum_deflates_by_default_and_can_be_switched_off(
    mlp_gnh: tuple[GNHOperator, torch.Tensor],
) -> None:
    op, _ = mlp_gnh
    plain = estimate_spectrum(op, trace_probes=6, lanczos_iter=5, trace_deflation=False)
    assert plain.trace == pytest.approx(hutchinson_trace(op, 6).value, rel=1e-12)  # the plain estimator, unchanged
    eig = lanczos_lambda_max(op, 5, tol=SpectrumConfig().lanczos_tol, seed=derive_seed(0, "lanczos"))
    deflated = estimate_spectrum(op, trace_probes=6, lanczos_iter=5)
    assert eig.basis is not None
    expected = hutchinson_trace(op, 6, deflate=eig.basis, deflated_trace=eig.basis_trace)
    assert deflated.trace == pytest.approx(expected.value, rel=1e-12)
    assert deflated.trace_stderr < plain.trace_stderr
    assert deflated.num_products == 6 + eig.num_products  # the deflation costs no product


def _wide_mlp_case() -> tuple[torch.nn.Module, Classification, list]:
    """P = 451 parameters, 24 examples of 3 classes: a GNH of rank at most 48, most of R^P its null space."""
    g = torch.Generator().manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).to(DT)
    x = torch.randn(24, 10, generator=g, dtype=DT)
    y = torch.randint(0, 3, (24,), generator=g)
    return model, Classification(), [(x[:16], y[:16]), (x[16:], y[16:])]


def test_gradient_start_is_the_loss_gradient_in_the_range_and_exact() -> None:
    from lightning_influence.operators import loss_gradient

    model, task, data = _wide_mlp_case()
    op = GNHOperator(model, task, data)
    dense = op.dense()
    exact = float(torch.linalg.eigvalsh(dense)[-1])
    grad = op.loss_gradient()
    assert torch.allclose(grad, loss_gradient(model, task, data), rtol=1e-12, atol=0)
    # the gradient J^T r lies in the GNH's range; a random start lies almost wholly in its null space
    in_range = torch.linalg.lstsq(dense, grad.unsqueeze(1)).solution.squeeze(1)
    assert torch.allclose(dense @ in_range, grad, atol=1e-10 * float(grad.norm()))
    first_gradient = lanczos_lambda_max(op, 1, start=grad).value
    first_random = lanczos_lambda_max(op, 1, seed=derive_seed(0, "lanczos")).value
    assert first_gradient > 10 * first_random, (first_gradient, first_random)
    summary = estimate_spectrum(op, trace_probes=2, lanczos_iter=30, lanczos_tol=1e-6, lanczos_start="gradient")
    assert (summary.lanczos_start, summary.start_gradients) == ("gradient", 1)
    assert abs(summary.lambda_max - exact) <= 1e-6 * exact and summary.lambda_max <= exact * (1 + 1e-10)
    direct = lanczos_lambda_max(op, 30, tol=1e-6, start=grad)
    assert summary.lambda_max == direct.value and summary.num_products == 2 + direct.num_products
    warm = estimate_spectrum(op, trace_probes=2, lanczos_start="gradient", start=summary.ritz_vector)
    assert (warm.lanczos_start, warm.start_gradients) == ("warm", 0)
    assert estimate_spectrum(op, trace_probes=2).lanczos_start == "random"  # SpectrumConfig's default


def test_zero_gradient_falls_back_to_the_random_start_and_dense_operators_refuse() -> None:
    from lightning_influence.tasks import Regression

    g = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(DT)
    x = torch.randn(9, 3, generator=g, dtype=DT)
    with torch.no_grad():
        y = model(x)  # a perfect fit: the loss gradient is exactly zero, the GNH is not
    op = GNHOperator(model, Regression(), [(x, y)])
    assert float(op.loss_gradient().abs().max()) == 0.0
    fallback = estimate_spectrum(op, trace_probes=2, lanczos_start="gradient")
    plain = estimate_spectrum(op, trace_probes=2)
    assert (fallback.lanczos_start, fallback.start_gradients) == ("random", 1)
    assert fallback.lambda_max == plain.lambda_max and fallback.trace == plain.trace
    with pytest.raises(ConfigurationError, match="loss_gradient"):
        estimate_spectrum(DenseOperator(torch.eye(3, dtype=DT)), lanczos_start="gradient")
    with pytest.raises(ConfigurationError, match="lanczos_start"):
        estimate_spectrum(op, lanczos_start="gradients")
