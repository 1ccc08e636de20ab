"""Tests of lightning_influence.regularizers against independent ground truth (float64).

Ground truths used:
- scikit-learn's coordinate-descent Lasso/ElasticNet after the Cholesky reduction D = R^T R
  (1/2 (t - v)^T D (t - v) + lam * pi(t) = n * [1/(2n) ||R v - R t||^2 + (lam / n) * pi(t)], n = P rows),
- the closed-form zero threshold ||D v||_inf <= lam * l1_ratio <=> prox = 0,
- the Schur-complement elimination of unpenalised coordinates,
- the KKT conditions of the group-lasso prox,
- closed-form soft / block-soft thresholding for diagonal metrics.
"""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import ElasticNet as SkElasticNet
from sklearn.linear_model import Lasso as SkLasso
from torch import Tensor

from lightning_influence.exceptions import ConfigurationError, NonFiniteError
from lightning_influence.regularizers import (
    L1,
    ElasticNet,
    GroupLasso,
    NoRegularizer,
    ProxResult,
    Regularizer,
    mask_from_module,
    mask_from_named_parameters,
)

DT = torch.float64
P = 20
AGREEMENT = 1e-8  # relative agreement required against independent solvers
KKT_TOL = 1e-8


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def random_spd(p: int, cond: float, seed: int) -> tuple[Tensor, Tensor]:
    """Random SPD matrix with eigenvalues log-spaced in [1, cond] and a random point v."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=DT))
    eig = torch.logspace(0.0, math.log10(cond), p, dtype=DT)
    d = q @ torch.diag(eig) @ q.T
    v = torch.randn(p, generator=gen, dtype=DT)
    return 0.5 * (d + d.T), v


def as_operator(d: Tensor) -> Callable[[Tensor], Tensor]:
    def matvec(x: Tensor) -> Tensor:
        return d @ x

    return matvec


def sklearn_prox(d: Tensor, v: Tensor, lam: float, l1_ratio: float) -> Tensor:
    """Independent solution via sklearn after the Cholesky reduction D = R^T R (R upper, n = P rows).

    sklearn minimises 1/(2n) ||y - X w||^2 + a*rho ||w||_1 + a(1-rho)/2 ||w||^2. With X = R, y = R v this is
    our objective divided by n, hence a = lam / n and rho = l1_ratio.
    """
    r = torch.linalg.cholesky(d).T
    x, y = r.numpy(), (r @ v).numpy()
    n = x.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # an unconverged reference must fail the test
        if l1_ratio == 1.0:
            model = SkLasso(alpha=lam / n, fit_intercept=False, tol=1e-14, max_iter=1_000_000)
        else:
            model = SkElasticNet(alpha=lam / n, l1_ratio=l1_ratio, fit_intercept=False, tol=1e-14, max_iter=1_000_000)
        model.fit(x, y)
    return torch.from_numpy(np.asarray(model.coef_, dtype=np.float64))


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def make_reg(kind: str, lam: float, mask: Tensor | None = None) -> Regularizer:
    if kind == "l1":
        return L1(lam, mask=mask)
    ratio = float(kind.split("-")[1])
    return ElasticNet(lam, l1_ratio=ratio, mask=mask)


def l1_ratio_of(kind: str) -> float:
    return 1.0 if kind == "l1" else float(kind.split("-")[1])


# (condition number, seed): well conditioned, moderately ill-conditioned, ill-conditioned
METRICS = [(10.0, 1), (300.0, 2), (1e4, 3)]
FRACTIONS = [0.05, 0.3, 0.7]  # lam as a fraction of the zero threshold ||D v||_inf / l1_ratio


# --------------------------------------------------------------------------------------------------------------
# L1 / elastic net prox in a non-diagonal metric vs sklearn
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["dense", "operator"])
@pytest.mark.parametrize("kind", ["l1", "enet-0.5", "enet-0.2"])
@pytest.mark.parametrize(("cond", "seed"), METRICS)
def test_prox_matches_sklearn(form: str, kind: str, cond: float, seed: int) -> None:
    d, v = random_spd(P, cond, seed)
    ratio = l1_ratio_of(kind)
    lam_zero = float((d @ v).abs().max()) / ratio
    for frac in FRACTIONS:
        lam = frac * lam_zero
        reg = make_reg(kind, lam)
        metric = d if form == "dense" else as_operator(d)
        res = reg.prox(v, metric, tol=1e-13, max_iter=20_000)
        ref = sklearn_prox(d, v, lam, ratio)
        assert res.converged, res
        assert ref.abs().max() > 0  # non-trivial case
        assert rel_err(res.x, ref) <= AGREEMENT, (frac, rel_err(res.x, ref))
        # sklearn's zeros are exact zeros of ours too (the support is identified)
        assert torch.equal(res.x == 0, ref == 0)


@pytest.mark.parametrize("form", ["dense", "operator"])
@pytest.mark.parametrize("kind", ["l1", "enet-0.5"])
@pytest.mark.parametrize(("cond", "seed"), METRICS)
def test_zero_threshold(form: str, kind: str, cond: float, seed: int) -> None:
    """prox = 0 iff ||D v||_inf <= lam * l1_ratio (subgradient condition at 0)."""
    d, v = random_spd(P, cond, seed)
    ratio = l1_ratio_of(kind)
    lam_zero = float((d @ v).abs().max()) / ratio
    metric = d if form == "dense" else as_operator(d)

    above = make_reg(kind, 1.001 * lam_zero).prox(v, metric, tol=1e-13, max_iter=20_000)
    assert above.converged
    assert torch.count_nonzero(above.x) == 0

    below = make_reg(kind, 0.99 * lam_zero).prox(v, metric, tol=1e-13, max_iter=20_000)
    assert below.converged
    assert torch.count_nonzero(below.x) >= 1
    ref = sklearn_prox(d, v, 0.99 * lam_zero * 1.0, ratio)
    assert rel_err(below.x, ref) <= AGREEMENT


def test_backtracking_recovers_from_underestimated_lipschitz() -> None:
    d, v = random_spd(P, 300.0, 4)
    lam = 0.2 * float((d @ v).abs().max())
    lam_max = float(torch.linalg.eigvalsh(d)[-1])
    res = L1(lam).prox(v, as_operator(d), lipschitz=0.01 * lam_max, tol=1e-13, max_iter=20_000)
    assert res.converged
    assert res.lipschitz is not None and res.lipschitz >= 0.5 * lam_max
    assert rel_err(res.x, sklearn_prox(d, v, lam, 1.0)) <= AGREEMENT


class _MatvecOnly:
    """A linear-operator object that is not callable (like the operators of lightning_influence.operators)."""

    def __init__(self, d: Tensor) -> None:
        self.d = d
        self.calls = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.calls += 1
        return self.d @ v


def test_metric_object_with_matvec() -> None:
    d, v = random_spd(P, 300.0, 20)
    lam = 0.2 * float((d @ v).abs().max())
    op = _MatvecOnly(d)
    res = ElasticNet(lam, l1_ratio=0.7).prox(v, op, tol=1e-13)
    assert res.converged
    assert op.calls == res.matvecs  # every product is counted in the certificate
    assert rel_err(res.x, sklearn_prox(d, v, lam, 0.7)) <= AGREEMENT


def test_dense_promotes_float32_metric_to_float64() -> None:
    d, v = random_spd(8, 10.0, 5)
    res = L1(0.1).prox(v, d.to(torch.float32), tol=1e-12)
    assert res.x.dtype == DT
    assert res.converged


# --------------------------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["dense", "operator"])
@pytest.mark.parametrize("kind", ["l1", "enet-0.5"])
def test_mask_matches_schur_complement_reduction(form: str, kind: str) -> None:
    """Unpenalised coordinates u are eliminated exactly: the penalised block p solves a lasso in the Schur
    complement S = D_pp - D_pu D_uu^{-1} D_up around v_p, and u = v_u - D_uu^{-1} D_up (theta_p - v_p)."""
    d, v = random_spd(P, 300.0, 6)
    mask = torch.ones(P, dtype=torch.bool)
    mask[[0, 3, 7, 8, 15]] = False
    pen, unp = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
    d_pp, d_pu, d_uu = d[pen][:, pen], d[pen][:, unp], d[unp][:, unp]
    schur = d_pp - d_pu @ torch.linalg.solve(d_uu, d_pu.T)
    schur = 0.5 * (schur + schur.T)
    ratio = l1_ratio_of(kind)
    lam = 0.3 * float((schur @ v[pen]).abs().max()) / ratio

    res = make_reg(kind, lam, mask=mask).prox(v, d if form == "dense" else as_operator(d), tol=1e-13)
    assert res.converged

    theta_p = sklearn_prox(schur, v[pen], lam, ratio)
    theta_u = v[unp] - torch.linalg.solve(d_uu, d_pu.T @ (theta_p - v[pen]))
    expected = torch.empty(P, dtype=DT)
    expected[pen], expected[unp] = theta_p, theta_u
    assert torch.count_nonzero(theta_p) not in (0, theta_p.numel())
    assert rel_err(res.x, expected) <= AGREEMENT
    # unpenalised coordinates are the unpenalised quadratic minimiser given the penalised block
    grad_u = (d @ (res.x - v))[unp]
    assert grad_u.abs().max() <= 1e-10 * float((d @ v).norm())


@pytest.mark.parametrize("kind", ["l1", "enet-0.4"])
def test_mask_false_untouched_in_diagonal_metric(kind: str) -> None:
    gen = torch.Generator().manual_seed(7)
    v = torch.randn(P, generator=gen, dtype=DT)
    diag = torch.rand(P, generator=gen, dtype=DT) + 0.5
    mask = torch.rand(P, generator=gen) > 0.4
    reg = make_reg(kind, 10.0, mask=mask)  # so strong that every penalised coordinate is zero
    out = reg.prox(v, torch.diag(diag)).x
    assert torch.equal(out[~mask], v[~mask])
    assert torch.count_nonzero(out[mask]) == 0
    out_diag = reg.prox_diag(v, 0.7)
    assert torch.equal(out_diag[~mask], v[~mask])


def test_mask_from_named_parameters_order_and_patterns() -> None:
    params = {
        "fc1.weight": torch.zeros(3, 2),
        "fc1.bias": torch.zeros(3),
        "norm.weight": torch.zeros(3),
        "bias_head.weight": torch.zeros(1, 3),
        "fc2.bias": torch.zeros(1),
    }
    mask = mask_from_named_parameters(params)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [True] * 6 + [False] * 3 + [True] * 3 + [True] * 3 + [False]
    mask = mask_from_named_parameters(params, exclude=("bias", "norm.*"))
    assert mask.tolist() == [True] * 6 + [False] * 3 + [False] * 3 + [True] * 3 + [False]
    # the order is the dict's iteration order, matching torch.cat([p.reshape(-1) for p in params.values()])
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    assert mask.numel() == flat.numel()


def test_mask_from_module_excludes_norm_layers_and_frozen_params() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 1, bias=False))
    net[2].weight.requires_grad_(False)
    mask = mask_from_module(net)
    # Linear(2,3): 6 weights (penalised) + 3 biases; LayerNorm: 3 + 3 (unpenalised); frozen Linear dropped
    assert mask.tolist() == [True] * 6 + [False] * 3 + [False] * 6
    mask_all = mask_from_module(net, unpenalise_norm_layers=False, trainable_only=False)
    assert mask_all.tolist() == [True] * 6 + [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3


# --------------------------------------------------------------------------------------------------------------
# diagonal metrics: closed forms
# --------------------------------------------------------------------------------------------------------------
def test_diagonal_metric_is_exact_soft_threshold() -> None:
    gen = torch.Generator().manual_seed(8)
    v = 2 * torch.randn(P, generator=gen, dtype=DT)
    diag = torch.rand(P, generator=gen, dtype=DT) + 0.1
    lam = 0.8
    expected_l1 = torch.sign(v) * torch.clamp(v.abs() - lam / diag, min=0.0)
    res = L1(lam).prox(v, torch.diag(diag))
    assert res.method == "closed_form" and res.iterations == 0
    assert torch.equal(res.x, expected_l1)
    assert torch.count_nonzero(expected_l1) not in (0, P)

    alpha = 0.3
    expected_en = torch.sign(v) * torch.clamp(v.abs() - lam * alpha / diag, min=0.0) / (1 + lam * (1 - alpha) / diag)
    assert torch.allclose(ElasticNet(lam, l1_ratio=alpha).prox(v, torch.diag(diag)).x, expected_en, rtol=1e-15, atol=0)

    # prox_diag with a scalar step is prox in the metric I / step
    assert torch.equal(L1(lam).prox_diag(v, 0.5), torch.sign(v) * torch.clamp(v.abs() - lam * 0.5, min=0.0))
    # the iterative solver on the same diagonal metric as an operator agrees
    res_op = L1(lam).prox(v, as_operator(torch.diag(diag)), tol=1e-14)
    assert res_op.method == "fista"
    assert rel_err(res_op.x, expected_l1) <= 1e-12


def test_group_lasso_closed_form_and_singletons_equal_l1() -> None:
    gen = torch.Generator().manual_seed(9)
    v = torch.randn(12, generator=gen, dtype=DT)
    groups: list[tuple[int, int]] = [(0, 3), (3, 7), (7, 9)]
    reg = GroupLasso(0.6, groups=groups)
    step = 0.5  # the metric I / step is then exactly 2 I
    expected = v.clone()
    for (a, b), w in zip(groups, [math.sqrt(3), 2.0, math.sqrt(2)], strict=True):
        nrm = float(v[a:b].norm())
        expected[a:b] = max(0.0, 1 - step * 0.6 * w / nrm) * v[a:b]
    assert torch.allclose(reg.prox_diag(v, step), expected, rtol=1e-15, atol=1e-16)
    assert torch.allclose(reg.prox(v, torch.eye(12, dtype=DT) / step).x, expected, rtol=1e-15, atol=1e-16)

    # singleton groups with unit weights are exactly the lasso, also in a non-diagonal metric
    d, v = random_spd(10, 100.0, 10)
    lam = 0.3 * float((d @ v).abs().max())
    singles = GroupLasso(lam, groups=[[i] for i in range(10)], weights=[1.0] * 10)
    x_singles = singles.prox(v, as_operator(d), tol=1e-13).x
    assert rel_err(x_singles, sklearn_prox(d, v, lam, 1.0)) <= AGREEMENT


# --------------------------------------------------------------------------------------------------------------
# group lasso in a non-diagonal metric: KKT conditions
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["dense", "operator"])
@pytest.mark.parametrize(("cond", "seed", "explicit_weights"), [(30.0, 11, False), (1e3, 12, True)])
def test_group_lasso_kkt(form: str, cond: float, seed: int, explicit_weights: bool) -> None:
    p = 24
    d, v = random_spd(p, cond, seed)
    v = 3 * v
    groups: list[list[int]] = [[0, 1, 2], [3, 4], [5, 9, 13, 17], [6, 7, 8], [10, 11], [12], [14, 15, 16], [18, 19]]
    ungrouped = [20, 21, 22, 23]
    weights = [0.5, 1.0, 2.0, 1.5, 0.7, 1.0, 3.0, 0.2] if explicit_weights else None
    reg = GroupLasso(1.0, groups=groups, weights=weights)
    w = reg.to_dict()["weights"]
    grad0 = d @ v
    # a strength between the smallest and largest per-group zero thresholds gives both kinds of groups
    thresholds = sorted(float(grad0[g].norm()) / wg for g, wg in zip(groups, w, strict=True))
    lam = 0.5 * (thresholds[2] + thresholds[-3])
    reg = GroupLasso(lam, groups=groups, weights=weights)

    res = reg.prox(v, d if form == "dense" else as_operator(d), tol=1e-13, max_iter=50_000)
    assert res.converged, res
    theta = res.x
    grad = d @ (theta - v)
    scale = float(grad0.norm())
    n_zero = n_nonzero = 0
    for g, wg in zip(groups, w, strict=True):
        nrm = float(theta[g].norm())
        if nrm == 0.0:
            n_zero += 1
            assert float(grad[g].norm()) <= lam * wg * (1 + KKT_TOL)
        else:
            n_nonzero += 1
            stationarity = grad[g] + lam * wg * theta[g] / nrm
            assert float(stationarity.norm()) <= KKT_TOL * scale
    assert n_zero >= 1 and n_nonzero >= 1
    assert float(grad[ungrouped].norm()) <= KKT_TOL * scale
    # penalty value matches the definition
    expected_pen = lam * sum(wg * float(theta[g].norm()) for g, wg in zip(groups, w, strict=True))
    assert math.isclose(float(reg.penalty(theta)), expected_pen, rel_tol=1e-14)


# --------------------------------------------------------------------------------------------------------------
# solver behaviour: warm start, non-convergence, trivial cases
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["l1", "group"])
def test_warm_start_reduces_iterations(kind: str) -> None:
    d, v = random_spd(P, 1e3, 13)
    lam = 0.1 * float((d @ v).abs().max())
    reg: Regularizer = L1(lam) if kind == "l1" else GroupLasso(lam, groups=[(i, i + 4) for i in range(0, P, 4)])
    metric = as_operator(d)
    cold = reg.prox(v, metric, tol=1e-12)
    assert cold.converged and cold.iterations > 20
    # a nearby problem (as in consecutive CV folds) warm-started from the previous solution
    gen = torch.Generator().manual_seed(14)
    v2 = v + 1e-4 * torch.randn(P, generator=gen, dtype=DT)
    cold2 = reg.prox(v2, metric, tol=1e-12)
    warm2 = reg.prox(v2, metric, x0=cold.x, tol=1e-12)
    assert warm2.converged
    assert warm2.iterations < cold2.iterations
    assert rel_err(warm2.x, cold2.x) <= 1e-9
    # an already optimal warm start is returned unchanged
    again = reg.prox(v, metric, x0=cold.x, tol=1e-12)
    assert again.iterations == 0 and torch.equal(again.x, cold.x)


def test_non_convergence_warns_with_residual() -> None:
    d, v = random_spd(P, 1e4, 15)
    lam = 0.05 * float((d @ v).abs().max())
    with pytest.warns(RuntimeWarning, match=r"did not converge: relative residual .* > tol=1\.000e-14 .*max_iter=3"):
        res = GroupLasso(lam, groups=[(0, 10), (10, 20)]).prox(v, as_operator(d), tol=1e-14, max_iter=3)
    assert not res.converged
    assert res.iterations == 3
    assert res.residual > 1e-14


def test_converged_result_does_not_warn() -> None:
    d, v = random_spd(P, 10.0, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = L1(0.1).prox(v, d)
    assert res.converged and res.residual <= 1e-10


def test_trivial_cases_return_v() -> None:
    d, v = random_spd(P, 10.0, 17)
    for reg in (NoRegularizer(), L1(0.0), ElasticNet(0.0), L1(5.0, mask=[False] * P), GroupLasso(1.0, groups=[])):
        res = reg.prox(v, d)
        assert torch.equal(res.x, v) and res.converged and res.iterations == 0
        assert torch.equal(reg.prox_diag(v, 1.0), v)
    assert float(NoRegularizer().penalty(v)) == 0.0
    # v = 0: the prox is 0 with any metric
    zero = torch.zeros(P, dtype=DT)
    assert torch.equal(L1(1.0).prox(zero, as_operator(d)).x, zero)


def test_prox_result_to_dict_and_regularizer_to_dict() -> None:
    d, v = random_spd(P, 10.0, 18)
    summary = L1(0.5).prox(v, d).to_dict()
    assert set(summary) >= {"iterations", "residual", "converged", "matvecs", "method", "num_nonzero"}
    assert ProxResult(torch.zeros(2), 0, 0.0, True).to_dict()["num_nonzero"] == 0
    assert L1(0.5, mask=[True, False, True]).to_dict() == {
        "type": "L1",
        "strength": 0.5,
        "num_params": 3,
        "num_penalised": 2,
    }
    assert ElasticNet(0.5, l1_ratio=0.25).to_dict()["l1_ratio"] == 0.25
    assert GroupLasso(1.0, groups=[(0, 4), [6, 9]]).to_dict()["group_sizes"] == [4, 2]


def test_regularizers_pickle_roundtrip() -> None:
    """Callbacks are pickled by ddp_spawn: a regulariser must survive it unchanged."""
    d, v = random_spd(10, 10.0, 22)
    for reg in (
        L1(0.3, mask=[True] * 9 + [False]),
        ElasticNet(0.3, l1_ratio=0.6),
        GroupLasso(0.5, groups=[(0, 4), [5, 7, 9]], weights=[1.0, 2.0]),
        NoRegularizer(),
    ):
        clone = pickle.loads(pickle.dumps(reg))
        assert clone.to_dict() == reg.to_dict()
        assert torch.equal(clone.prox(v, d, tol=1e-12).x, reg.prox(v, d, tol=1e-12).x)


# --------------------------------------------------------------------------------------------------------------
# penalty values and gradients
# --------------------------------------------------------------------------------------------------------------
def test_penalty_values_and_gradients() -> None:
    theta = torch.tensor([1.5, -2.0, 0.0, 0.5, 3.0], dtype=DT, requires_grad=True)
    mask = torch.tensor([True, True, True, False, True])

    pen = L1(0.3, mask=mask).penalty(theta)
    pen.backward()
    assert math.isclose(float(pen.detach()), 0.3 * (1.5 + 2.0 + 3.0), rel_tol=1e-15)
    assert theta.grad is not None
    assert theta.grad.tolist() == pytest.approx([0.3, -0.3, 0.0, 0.0, 0.3], abs=1e-15)

    theta.grad = None
    pen = ElasticNet(0.3, l1_ratio=0.25, mask=mask).penalty(theta)
    pen.backward()
    sq = 1.5**2 + 2.0**2 + 3.0**2
    assert math.isclose(float(pen.detach()), 0.3 * (0.25 * 6.5 + 0.75 / 2 * sq), rel_tol=1e-15)
    assert theta.grad is not None
    assert theta.grad[3] == 0.0 and math.isclose(float(theta.grad[4]), 0.3 * (0.25 + 0.75 * 3.0), rel_tol=1e-15)

    theta.grad = None
    pen = GroupLasso(2.0, groups=[(0, 2), [2]]).penalty(theta)  # second group is exactly zero
    pen.backward()
    assert math.isclose(float(pen.detach()), 2.0 * math.sqrt(2) * 2.5, rel_tol=1e-15)
    assert theta.grad is not None and bool(torch.isfinite(theta.grad).all())
    assert float(theta.grad[2]) == 0.0


# --------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------
def test_errors_are_configuration_errors_and_value_errors() -> None:
    assert issubclass(ConfigurationError, ValueError)
    with pytest.raises(ValueError, match=r"strength must be >= 0"):
        L1(-0.5)


def test_invalid_constructor_arguments() -> None:
    with pytest.raises(ConfigurationError, match=r"strength must be >= 0 \(use strength=0 for no penalty\)"):
        L1(-1.0)
    with pytest.raises(ConfigurationError, match=r"strength must be finite"):
        ElasticNet(float("nan"))
    with pytest.raises(ConfigurationError, match=r"strength must be a real number"):
        L1("0.1")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"l1_ratio must be a float in \[0, 1\]"):
        ElasticNet(1.0, l1_ratio=1.5)
    with pytest.raises(ConfigurationError, match=r"l1_ratio must be a float in \[0, 1\]"):
        ElasticNet(1.0, l1_ratio=-0.1)
    with pytest.raises(ConfigurationError, match=r"mask must contain booleans"):
        L1(1.0, mask=[0, 2])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match=r"mask must be a boolean tensor"):
        L1(1.0, mask=torch.ones(3))
    with pytest.raises(ConfigurationError, match=r"mask must be 1-D"):
        L1(1.0, mask=torch.ones(2, 2, dtype=torch.bool))


def test_invalid_groups() -> None:
    with pytest.raises(ConfigurationError, match=r"groups must not overlap: index 2 appears in groups 0 and 1"):
        GroupLasso(1.0, groups=[(0, 3), (2, 5)])
    with pytest.raises(ConfigurationError, match=r"groups must not overlap: index 1 appears twice in the same group"):
        GroupLasso(1.0, groups=[[1, 1]])
    with pytest.raises(ConfigurationError, match=r"index -1 out of range"):
        GroupLasso(1.0, groups=[[0, -1]])
    with pytest.raises(ConfigurationError, match=r"needs 0 <= start < stop"):
        GroupLasso(1.0, groups=[(3, 3)])
    with pytest.raises(ConfigurationError, match=r"group 0 is empty"):
        GroupLasso(1.0, groups=[[]])
    with pytest.raises(ConfigurationError, match=r"weights has 1 entries but there are 2 groups"):
        GroupLasso(1.0, groups=[(0, 2), (2, 4)], weights=[1.0])
    with pytest.raises(ConfigurationError, match=r"weights must be finite and >= 0"):
        GroupLasso(1.0, groups=[(0, 2)], weights=[-1.0])
    reg = GroupLasso(1.0, groups=[(0, 2), [5, 9]])
    with pytest.raises(ConfigurationError, match=r"groups index out of range: largest index 9 .* only 6 entries"):
        reg.prox(torch.ones(6, dtype=DT), torch.eye(6, dtype=DT))
    with pytest.raises(ConfigurationError, match=r"groups index out of range"):
        reg.penalty(torch.ones(6, dtype=DT))
    with pytest.raises(ConfigurationError, match=r"constant within each group"):
        reg.prox_diag(torch.ones(10, dtype=DT), torch.linspace(1, 2, 10, dtype=DT))


def test_invalid_prox_inputs() -> None:
    d, v = random_spd(4, 10.0, 19)
    reg = L1(0.1)
    with pytest.raises(ConfigurationError, match=r"mask has length 3 but the flat parameter vector has 4 entries"):
        L1(0.1, mask=[True, True, False]).prox(v, d)
    with pytest.raises(ConfigurationError, match=r"mask has length 3"):
        L1(0.1, mask=[True, True, False]).penalty(v)
    with pytest.raises(ConfigurationError, match=r"metric must be a square \(P, P\) matrix"):
        reg.prox(v, torch.ones(4, 3, dtype=DT))
    with pytest.raises(ConfigurationError, match=r"metric has shape \(5, 5\) but v has 4 entries"):
        reg.prox(v, torch.eye(5, dtype=DT))
    with pytest.raises(ConfigurationError, match=r"metric must be symmetric"):
        reg.prox(v, d + torch.triu(torch.ones(4, 4, dtype=DT), 1))
    with pytest.raises(ConfigurationError, match=r"metric must be positive \(semi\)definite"):
        reg.prox(v, -d)
    with pytest.raises(ConfigurationError, match=r"metric contains non-finite"):
        reg.prox(v, torch.full((4, 4), float("nan"), dtype=DT))
    with pytest.raises(ConfigurationError, match=r"metric\(x\) must return a tensor of shape \(4,\)"):
        reg.prox(v, lambda x: torch.zeros(3, dtype=DT))
    with pytest.raises(ConfigurationError, match=r"metric\(v\) returned non-finite"):
        reg.prox(v, lambda x: x * float("inf"))
    with pytest.raises(
        ConfigurationError,
        match=r"metric must be a dense \(P, P\) tensor, a callable x -> D @ x or an object with \.matvec",
    ):
        reg.prox(v, 3.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"v contains non-finite values"):
        reg.prox(torch.tensor([1.0, float("inf"), 0.0, 0.0], dtype=DT), d)
    with pytest.raises(ConfigurationError, match=r"v must be a 1-D flat parameter vector"):
        reg.prox(v.reshape(2, 2), d)
    with pytest.raises(ConfigurationError, match=r"x0 must have the shape of v"):
        reg.prox(v, d, x0=torch.zeros(3, dtype=DT))
    with pytest.raises(ConfigurationError, match=r"x0 contains non-finite"):
        reg.prox(v, d, x0=torch.full((4,), float("nan"), dtype=DT))
    with pytest.raises(ConfigurationError, match=r"tol must be a finite float >= 0"):
        reg.prox(v, d, tol=-1.0)
    with pytest.raises(ConfigurationError, match=r"max_iter must be an int >= 0"):
        reg.prox(v, d, max_iter=-5)
    with pytest.raises(ConfigurationError, match=r"lipschitz must be None .* or a finite float > 0"):
        reg.prox(v, d, lipschitz=0.0)
    with pytest.raises(ConfigurationError, match=r"step must be finite and > 0"):
        reg.prox_diag(v, 0.0)
    with pytest.raises(ConfigurationError, match=r"step must be finite and > 0 in every coordinate"):
        reg.prox_diag(v, torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=DT))
    with pytest.raises(ConfigurationError, match=r"v must have a floating dtype"):
        reg.prox_diag(torch.ones(4, dtype=torch.long), 1.0)


def test_operator_turning_non_finite_raises() -> None:
    d, v = random_spd(6, 10.0, 21)
    calls = {"n": 0}

    def flaky(x: Tensor) -> Tensor:
        calls["n"] += 1
        return d @ x if calls["n"] <= 3 else torch.full_like(x, float("nan"))

    with pytest.raises(NonFiniteError, match=r"non-finite at iteration \d+"):
        L1(0.01).prox(v, flaky, lipschitz=10.0)


def test_invalid_mask_helper_inputs() -> None:
    with pytest.raises(ConfigurationError, match=r"named_params is empty"):
        mask_from_named_parameters({})
    with pytest.raises(ConfigurationError, match=r"exclude must be a sequence of patterns"):
        mask_from_named_parameters({"w": torch.zeros(2)}, exclude="bias")
    with pytest.raises(ConfigurationError, match=r"named_params is empty"):
        mask_from_module(torch.nn.ReLU())
