"""AFIF approximate k-fold CV (lightning_influence.cv) against exact refits.

Ground truth: scikit-learn Lasso / ElasticNet refits for linear models with squared loss (where the quadratic
model is exact), our own proximal-Newton / FISTA refits for L1-logistic regression.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, make_friedman1
from sklearn.linear_model import ElasticNet as SkElasticNet
from sklearn.linear_model import Lasso as SkLasso
from torch import Tensor, nn

from lightning_influence.cv import (
    approximate_cv,
    check_curvature_for_loss,
    exact_cv,
    fit_regularized,
    kfold_indices,
    make_fold_batches,
    regularization_penalty,
)
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.losses import GaussianNLL
from lightning_influence.params import flatten, trainable_parameters
from lightning_influence.regularizers import L1, ElasticNet, GroupLasso, NoRegularizer, mask_from_named_parameters
from lightning_influence.tasks import Classification, Regression, Task

# ------------------------------------------------------------------------------------------------ data


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / x.std(0)


def _regression_data(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "friedman1":
        x, y = make_friedman1(n_samples=400, noise=1.0, random_state=0)
    else:
        x, y = load_diabetes(return_X_y=True)
        y = (y - y.mean()) / y.std()
    return _standardise(x), y


def _linear(d: int, out: int = 1) -> nn.Module:
    torch.manual_seed(0)  # only for the initial weights, which every test overwrites
    return nn.Linear(d, out).double()


def _load(model: nn.Module, theta: Tensor) -> None:
    torch.nn.utils.vector_to_parameters(theta, [p for p in model.parameters() if p.requires_grad])


def _sk_model(kind: str, alpha: float) -> SkLasso | SkElasticNet:
    if kind == "l1":
        return SkLasso(alpha=alpha, tol=1e-15, max_iter=10**6)
    return SkElasticNet(alpha=alpha, l1_ratio=0.5, tol=1e-15, max_iter=10**6)


def _sk_cv(x: np.ndarray, y: np.ndarray, folds: list[list[int]], kind: str, alpha_of: dict[int, float]) -> list[float]:
    out = []
    for k, idx in enumerate(folds):
        train = np.setdiff1d(np.arange(len(y)), idx)
        m = _sk_model(kind, alpha_of[k]).fit(x[train], y[train])
        r = x[idx] @ m.coef_ + m.intercept_ - y[idx]
        out.append(float(0.5 * np.mean(r**2)))  # GaussianNLL(variance=1) = 0.5 * squared error
    return out


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("dataset", ["friedman1", "diabetes"])
@pytest.mark.parametrize("kind", ["l1", "elastic_net"])
def test_linear_squared_loss_is_exact(dataset: str, kind: str) -> None:
    """Approximate 10-fold CV == exact 10-fold CV (sklearn refits) to 1e-8 relative, per fold and overall."""
    x, y = _regression_data(dataset)
    n, d = x.shape
    lam = 0.05 if dataset == "friedman1" else 0.02
    model = _linear(d)
    mask = mask_from_named_parameters(trainable_parameters(model))  # bias unpenalised, like sklearn's intercept
    reg = L1(lam, mask=mask) if kind == "l1" else ElasticNet(lam, l1_ratio=0.5, mask=mask)
    # theta_hat: the full-data fit (the quadratic model is exact, so any theta_hat would do; use the real one).
    full = _sk_model(kind, lam).fit(x, y)
    _load(model, torch.tensor(np.r_[full.coef_, full.intercept_]))
    before = flatten(trainable_parameters(model)).clone()
    folds = kfold_indices(n, 10, seed=1)
    data = list(zip(torch.tensor(x), torch.tensor(y).reshape(-1, 1), strict=True))
    fold_batches = make_fold_batches(data, folds, batch_size=128)

    approx = approximate_cv(model, Regression(), fold_batches, reg)
    truth = _sk_cv(x, y, folds, kind, dict.fromkeys(range(10), lam))
    assert approx.estimate == pytest.approx(float(np.mean(truth)), rel=1e-8)
    np.testing.assert_allclose(approx.fold_losses, truth, rtol=1e-8)
    # the trained weights are untouched
    assert torch.equal(flatten(trainable_parameters(model)), before)

    # The paper's weighted objective (1/N) sum_{i not in k} l_i + lam*pi is the mean objective with lam*N/(N-n_k).
    weighted = approximate_cv(model, Regression(), fold_batches, reg, fold_objective="weighted")
    alphas = {k: lam * n / (n - len(f)) for k, f in enumerate(folds)}
    truth_w = _sk_cv(x, y, folds, kind, alphas)
    np.testing.assert_allclose(weighted.fold_losses, truth_w, rtol=1e-8)
    assert abs(weighted.estimate - approx.estimate) > 1e-6  # the two conventions really differ


def test_linear_exact_with_matrix_free_path_and_own_refit() -> None:
    """CG + matvec-metric prox give the same answer; our exact refit (prox-Newton) agrees with sklearn."""
    x, y = _regression_data("friedman1")
    model = _linear(x.shape[1])
    reg = L1(0.05, mask=mask_from_named_parameters(trainable_parameters(model)))
    full = _sk_model("l1", 0.05).fit(x, y)
    _load(model, torch.tensor(np.r_[full.coef_, full.intercept_]))
    folds = kfold_indices(len(y), 5, seed=2)
    data = list(zip(torch.tensor(x), torch.tensor(y).reshape(-1, 1), strict=True))
    fb = make_fold_batches(data, folds, batch_size=400)
    truth = _sk_cv(x, y, folds, "l1", dict.fromkeys(range(5), 0.05))
    cg = approximate_cv(model, Regression(), fb, reg, solver="cg", cg_rtol=1e-12, prox_tol=1e-12)
    assert cg.config["solver"] == "cg"
    np.testing.assert_allclose(cg.fold_losses, truth, rtol=1e-7)
    ex = exact_cv(model, Regression(), fb, reg, method="prox_newton", tol=1e-12)
    np.testing.assert_allclose(ex.fold_losses, truth, rtol=1e-9)


# ------------------------------------------------------------------------------------------------ fixed point


def _logistic_problem(n: int = 200, d: int = 6, seed: int = 0) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.tensor([2.0, -1.5, 0.0, 0.0, 1.0, 0.0][:d], dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w)).to(torch.float64)
    model = nn.Sequential(nn.Linear(d, 1), nn.Flatten(0)).double()
    return model, list(zip(x, y, strict=True))


@pytest.mark.parametrize("reg_name", ["l1", "elastic_net", "group_lasso"])
def test_empty_fold_returns_theta_hat(reg_name: str) -> None:
    """With an empty fold, the AFIF update is the prox fixed point: theta_tilde = theta_hat (non-quadratic loss)."""
    model, data = _logistic_problem()
    task = Classification("binary")
    mask = mask_from_named_parameters(trainable_parameters(model))
    reg = {
        "l1": L1(0.02, mask=mask),
        "elastic_net": ElasticNet(0.03, l1_ratio=0.7, mask=mask),
        "group_lasso": GroupLasso(0.03, groups=[(0, 2), (2, 4), (4, 6)]),
    }[reg_name]
    all_batches = make_fold_batches(data, [list(range(len(data)))], batch_size=256)[0]
    theta_hat, cert = fit_regularized(model, task, all_batches, reg, method="prox_newton", tol=1e-13)
    assert cert["converged"]
    _load(model, theta_hat)
    if reg_name != "group_lasso":
        assert int((theta_hat == 0).sum()) >= 1  # the non-smooth part is active
    folds = [list(range(0, 100)), list(range(100, 200)), []]
    fb = make_fold_batches(data, folds, batch_size=256)
    res = approximate_cv(model, task, fb, reg)
    empty = res.folds[2]
    assert empty.held_out_units == 0 and np.isnan(empty.held_out_loss)
    assert torch.allclose(empty.theta, theta_hat, rtol=0, atol=1e-9)
    assert torch.equal(empty.theta == 0, theta_hat == 0) or reg_name == "group_lasso"
    # non-empty folds do move
    assert res.folds[0].step_norm > 1e-3
    # at a minimiser, centring on the full-data step changes nothing
    centred = approximate_cv(model, task, fb, reg, center=True)
    np.testing.assert_allclose(centred.fold_losses[:2], res.fold_losses[:2], rtol=1e-8)
    assert res.estimate == pytest.approx(np.mean(res.fold_losses[:2]))


# ------------------------------------------------------------------------------------------------ logistic


def _breast_cancer() -> tuple[nn.Module, list[tuple[Tensor, Tensor]], Tensor]:
    x, y = load_breast_cancer(return_X_y=True)
    data = list(zip(torch.tensor(_standardise(x)), torch.tensor(y, dtype=torch.float64), strict=True))
    model = nn.Sequential(nn.Linear(30, 1), nn.Flatten(0)).double()
    return model, data, mask_from_named_parameters(trainable_parameters(model))


STRENGTHS = [0.003, 0.006, 0.012, 0.025, 0.05]


def test_l1_logistic_breast_cancer_cv_curve() -> None:
    """10 folds x 5 strengths: approx CV within 2 % of exact CV everywhere; selected strength same or adjacent."""
    model, data, mask = _breast_cancer()
    task = Classification("binary")
    folds = kfold_indices(len(data), 10, seed=0)
    fb = make_fold_batches(data, folds, batch_size=1024)
    all_batches = make_fold_batches(data, [list(range(len(data)))], batch_size=1024)[0]
    approx, exact, full_f = [], [], []
    for lam in STRENGTHS:
        reg = L1(lam, mask=mask)
        theta_hat, cert = fit_regularized(model, task, all_batches, reg, method="prox_newton", tol=1e-11)
        assert cert["converged"]
        _load(model, theta_hat)
        a = approximate_cv(model, task, fb, reg)
        e = exact_cv(model, task, fb, reg, method="prox_newton", tol=1e-10)
        f = approximate_cv(model, task, fb, reg, downdate=False)
        assert all(fr.certificate["converged"] for fr in e.folds)
        approx.append(a.estimate)
        exact.append(e.estimate)
        full_f.append(f.estimate)
    rel = np.abs(np.array(approx) / np.array(exact) - 1)
    assert rel.max() < 0.02, rel
    assert abs(int(np.argmin(approx)) - int(np.argmin(exact))) <= 1
    # the paper's single full-data Fisher is worse than the downdated one (on average over the grid)
    rel_full = np.abs(np.array(full_f) / np.array(exact) - 1)
    assert rel_full.mean() > rel.mean()


def test_hessian_variant_equals_fisher_for_canonical_glm() -> None:
    """For a linear model with a canonical link the Hessian equals the Fisher, so both variants agree."""
    model, data = _logistic_problem(n=120)
    task = Classification("binary")
    reg = L1(0.02, mask=mask_from_named_parameters(trainable_parameters(model)))
    all_batches = make_fold_batches(data, [list(range(len(data)))], batch_size=256)[0]
    theta_hat, _ = fit_regularized(model, task, all_batches, reg, method="prox_newton", tol=1e-12)
    _load(model, theta_hat)
    fb = make_fold_batches(data, kfold_indices(len(data), 4, seed=3), batch_size=64)
    fisher = approximate_cv(model, task, fb, reg, curvature="fisher")
    hessian = approximate_cv(model, task, fb, reg, curvature="hessian")
    gnh = approximate_cv(model, task, fb, reg, curvature="gnh")
    assert hessian.method == "afif-hessian"
    np.testing.assert_allclose(hessian.fold_losses, fisher.fold_losses, rtol=1e-9)
    np.testing.assert_allclose(gnh.fold_losses, fisher.fold_losses, rtol=1e-12)


def test_cost_of_approximate_cv_vs_warm_started_refits() -> None:
    """Approximate CV uses <= 1/5 of the gradient-equivalent passes of warm-started exact (FISTA) refits."""
    model, data, mask = _breast_cancer()
    task = Classification("binary")
    reg = L1(0.012, mask=mask)
    all_batches = make_fold_batches(data, [list(range(len(data)))], batch_size=1024)[0]
    theta_hat, _ = fit_regularized(model, task, all_batches, reg, method="prox_newton", tol=1e-11)
    _load(model, theta_hat)
    fb = make_fold_batches(data, kfold_indices(len(data), 10, seed=0), batch_size=1024)
    approx = approximate_cv(model, task, fb, reg)
    # A lenient exact tolerance (gradient mapping 1e-5) favours the baseline; it is still far more expensive.
    exact = exact_cv(model, task, fb, reg, method="fista", tol=1e-5)
    assert approx.cost.num_examples == exact.cost.num_examples == len(data)
    assert approx.cost.passes > 0 and exact.cost.passes > 0
    assert approx.cost.passes <= exact.cost.passes / 5, (approx.cost.to_dict(), exact.cost.to_dict())
    assert approx.estimate == pytest.approx(exact.estimate, rel=0.02)


# ------------------------------------------------------------------------------------------------ errors & API


def test_clear_errors() -> None:
    with pytest.raises(ConfigurationError, match="larger than the number of training examples"):
        kfold_indices(5, 6)
    with pytest.raises(ConfigurationError, match="folds must be an integer >= 2"):
        kfold_indices(5, 1)
    with pytest.raises(ValueError, match="strength must be >= 0"):
        L1(-0.1)
    with pytest.raises(ValueError, match="strength must be >= 0"):
        ElasticNet(-1.0)

    class Huber(GaussianNLL):
        exponential_family = False

    task = Task(Huber())
    with pytest.raises(ConfigurationError, match="curvature='hessian'"):
        check_curvature_for_loss(task, "fisher")
    model = _linear(2)
    data = [(torch.randn(2, dtype=torch.float64), torch.randn(1, dtype=torch.float64)) for _ in range(12)]
    fb = make_fold_batches(data, kfold_indices(12, 3))
    with pytest.raises(ConfigurationError, match="exponential family"):
        approximate_cv(model, task, fb, L1(0.1))
    assert approximate_cv(model, task, fb, L1(0.1), curvature="hessian").method == "afif-hessian"
    with pytest.raises(ConfigurationError, match="curvature must be one of"):
        approximate_cv(model, Regression(), fb, curvature="kfac")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="fold_objective"):
        approximate_cv(model, Regression(), fb, fold_objective="sum")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="smooth objective"):
        exact_cv(model, Regression(), fb, L1(0.1), method="lbfgs")
    with pytest.raises(ValueError, match="mask has length"):
        approximate_cv(model, Regression(), fb, L1(0.1, mask=[True, False]))
    with pytest.raises(ConfigurationError, match="Regularizer"):
        approximate_cv(model, Regression(), fb, "l1")  # type: ignore[arg-type]


def test_smooth_problem_lbfgs_refit_matches_approx_for_ridge_like_linear() -> None:
    """No regulariser: approximate CV of least squares equals exact refits by L-BFGS (closed-form check too)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3 * torch.randn(60, 1, generator=g,
                                                                                         dtype=torch.float64)
    model = _linear(3)
    data = list(zip(x, y, strict=True))
    folds = kfold_indices(60, 6, seed=0)
    fb = make_fold_batches(data, folds, batch_size=16)
    approx = approximate_cv(model, Regression(), fb, NoRegularizer())
    exact = exact_cv(model, Regression(), fb, None, method="lbfgs", tol=1e-9)
    np.testing.assert_allclose(approx.fold_losses, exact.fold_losses, rtol=1e-8)
    xa = torch.cat([x, torch.ones(60, 1, dtype=torch.float64)], 1)
    closed = []
    for idx in folds:
        tr = [i for i in range(60) if i not in idx]
        w = torch.linalg.lstsq(xa[tr], y[tr]).solution
        closed.append(float(0.5 * ((xa[idx] @ w - y[idx]) ** 2).mean()))
    np.testing.assert_allclose(approx.fold_losses, closed, rtol=1e-8)


def test_regularization_penalty_is_differentiable_and_consistent() -> None:
    model = _linear(3)
    reg = L1(0.5, mask=mask_from_named_parameters(trainable_parameters(model)))
    pen = regularization_penalty(model, reg)
    assert pen.requires_grad
    assert float(pen.detach()) == pytest.approx(float(reg.penalty(flatten(trainable_parameters(model)))))
    pen.backward()
    assert model.weight.grad is not None
    assert torch.allclose(model.weight.grad, 0.5 * torch.sign(model.weight.detach()))
    assert model.bias.grad is not None and torch.equal(model.bias.grad, torch.zeros(1, dtype=torch.float64))


def test_kfold_indices_is_a_seeded_partition() -> None:
    a = kfold_indices(23, 4, seed=7)
    assert sorted(i for f in a for i in f) == list(range(23))
    assert [len(f) for f in a] == [6, 6, 6, 5]
    assert a == kfold_indices(23, 4, seed=7) and a != kfold_indices(23, 4, seed=8)
    state = torch.random.get_rng_state()
    kfold_indices(23, 4, seed=9)
    assert torch.equal(state, torch.random.get_rng_state())


# ------------------------------------------------------------------------------------ damping="auto"


def test_auto_damping_singular_fold_matches_exact_refits() -> None:
    """A fold whose remaining data has a constant feature (collinear with the bias): undamped AFIF used to raise
    "not positive definite"; ``damping="auto"`` adds the least damping and matches exact refits within 2 %."""
    g = torch.Generator().manual_seed(0)
    n, k = 300, 5
    idx = kfold_indices(n, k, seed=0)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x[:, 2] = 1.0
    x[idx[0], 2] = torch.randn(len(idx[0]), generator=g, dtype=torch.float64)  # varies only in fold 0
    w = torch.tensor([[1.5, -1.0, 0.5], [-0.5, 1.0, -0.5]], dtype=torch.float64)
    y = torch.multinomial(torch.softmax(x @ w.T, 1), 1, generator=g).squeeze(1)
    folds = make_fold_batches(list(zip(x, y, strict=True)), idx, batch_size=64)
    model, task = _linear(3, 2), Classification()
    theta, _ = fit_regularized(model, task, [b for f in folds for b in f], tol=1e-12)
    _load(model, theta)
    with pytest.raises(ConfigurationError, match="singular or indefinite") as err:
        approximate_cv(model, task, folds, damping=0.0)
    assert "GNH" not in str(err.value)
    approx = approximate_cv(model, task, folds)
    assert approx.config["damping"] == "auto"
    used = [f.certificate["damping"] for f in approx.folds]
    assert all(0 < d < 1e-6 for d in used), used
    exact = exact_cv(model, task, folds, tol=1e-10)
    for fa, fe in zip(approx.folds, exact.folds, strict=True):
        assert abs(fa.held_out_loss - fe.held_out_loss) <= 0.02 * fe.held_out_loss
    assert torch.allclose(approx.folds[0].theta, exact.folds[0].theta, atol=1e-2)
    matrix_free = approximate_cv(model, task, folds, solver="cg")  # no factorisation: CG's own auto rule
    for fa, fe in zip(matrix_free.folds, exact.folds, strict=True):
        assert abs(fa.held_out_loss - fe.held_out_loss) <= 0.02 * fe.held_out_loss


def test_auto_damping_is_zero_on_positive_definite_folds() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [0.5], [-1.0]], dtype=torch.float64) + 0.1 * torch.randn(40, 1, generator=g,
                                                                                         dtype=torch.float64)
    folds = make_fold_batches(list(zip(x, y, strict=True)), kfold_indices(40, 4))
    res = approximate_cv(_linear(3), Regression(), folds)
    assert [f.certificate["damping"] for f in res.folds] == [0.0] * 4
    res_cg = approximate_cv(_linear(3), Regression(), folds, solver="cg")
    assert [f.certificate["damping"] for f in res_cg.folds] == [0.0] * 4
    assert abs(res.estimate - res_cg.estimate) <= 1e-6 * res.estimate
