"""Attribution quality against retraining (issue 13): LDS, leave-one-out, mislabel detection; float64 ground truth."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_influence.evaluation import (
    SubsetRetrainer,
    flip_labels,
    lds,
    loo_correlation,
    mislabel_detection,
)
from lightning_influence.influence import influence_scores
from lightning_influence.tasks import Classification, Regression

DT = torch.float64


# --------------------------------------------------------------------------------------------- LDS
class Ridge:
    """Linear regression with squared loss and an L2 penalty, refitted in closed form on any subset.

    The objective is (1/N) Σ_{n∈S} ½(xₙᵀw − yₙ)² + λ/2 ‖w‖², whose Hessian at the full-data solution is the damped GNH
    G + λI of ``Regression()``: exact influence with damping λ is its first-order response to removing examples.
    """

    def __init__(self, n: int = 200, d: int = 5, n_query: int = 40, lam: float = 0.05, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.n, self.d, self.lam = n, d, lam
        self.x = torch.randn(n, d, generator=g, dtype=DT)
        w = torch.randn(d, 1, generator=g, dtype=DT)
        self.y = self.x @ w + 0.5 * torch.randn(n, 1, generator=g, dtype=DT)
        self.xq = torch.randn(n_query, d, generator=g, dtype=DT)
        self.yq = self.xq @ w + 0.5 * torch.randn(n_query, 1, generator=g, dtype=DT)

    def train(self, indices: Tensor, seed: int) -> Tensor:
        x, y = self.x[indices], self.y[indices]
        a = x.T @ x / self.n + self.lam * torch.eye(self.d, dtype=DT)
        return torch.linalg.solve(a, x.T @ y / self.n)

    def query_loss(self, w: Tensor) -> Tensor:
        return 0.5 * ((self.xq @ w - self.yq) ** 2).reshape(-1)

    def exact_scores(self) -> Tensor:
        model = nn.Linear(self.d, 1, bias=False).to(DT)
        with torch.no_grad():
            model.weight.copy_(self.train(torch.arange(self.n), 0).T)
        res = influence_scores(model, Regression(), (self.x, self.y), (self.xq, self.yq), solver="exact",
                               damping=self.lam, self_influence=False)
        return res.scores


def _shuffled(scores: Tensor, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([row[torch.randperm(row.numel(), generator=g)] for row in scores])


def test_lds_of_exact_influence_on_linear_regression_is_first_order_exact_and_shuffled_scores_give_zero() -> None:
    problem = Ridge()
    scores = problem.exact_scores()
    small = SubsetRetrainer(problem.train, problem.query_loss, n_train=problem.n, num_subsets=50, alpha=0.99,
                            seed=1).run()
    result = lds(scores, small.subsets, small.outputs, measurement="loss")
    # Removing 1 % of the examples: the retrained query losses follow the summed exact influence to first order.
    assert result.lds >= 0.95, result.per_query
    assert result.ci.low >= 0.9 and result.ci.num_resamples == 1000 and result.ci.unit == "queries"
    assert result.num_subsets == 50 and result.num_queries == 40 and result.num_undefined == 0
    # A margin-type reading of the same outputs flips the alignment: the LDS changes sign.
    assert lds(scores, small.subsets, -small.outputs, measurement="margin").lds == result.lds
    assert lds(scores, small.subsets, small.outputs, measurement="margin").lds <= -0.95
    # Removing half the data is far from first order: the LDS drops (but stays well above chance).
    half = SubsetRetrainer(problem.train, problem.query_loss, n_train=problem.n, num_subsets=50, alpha=0.5,
                           seed=1).run()
    half_lds = lds(scores, half.subsets, half.outputs).lds
    assert 0.2 < half_lds < result.lds
    # Control: the same scores shuffled across training examples carry no information.
    for run in (small, half):
        control = lds(_shuffled(scores, seed=7), run.subsets, run.outputs)
        assert abs(control.lds) <= 0.1, control.lds


# --------------------------------------------------------------------------------------------- LOO
def _lbfgs_logistic(x: Tensor, y: Tensor, lam: float, init: dict[str, Tensor] | None = None,
                    max_iter: int = 500, tol: float = 1e-13) -> nn.Linear:
    model = nn.Linear(x.shape[1], int(y.max()) + 1).to(DT)
    if init is not None:
        model.load_state_dict(init)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + lam / 2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    for p in model.parameters():
        p.grad = None
    return model


def test_loo_correlation_of_exact_influence_on_l2_logistic_regression() -> None:
    from sklearn.datasets import load_breast_cancer

    xs, ys = load_breast_cancer(return_X_y=True)
    x = torch.tensor(xs, dtype=DT)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(ys)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:200], perm[200:230]
    xt, yt, xq, yq = x[tr], y[tr], x[te], y[te]
    lam = 1e-2  # the L2 coefficient is the damping: the Hessian of the objective is G + lam I exactly
    full = _lbfgs_logistic(xt, yt, lam)
    state = {k: v.detach().clone() for k, v in full.state_dict().items()}

    def train(indices: Tensor, seed: int) -> nn.Linear:  # exact refit, warm-started from the full solution
        return _lbfgs_logistic(xt[indices], yt[indices], lam, init=state)

    def measure(model: nn.Linear) -> Tensor:
        with torch.no_grad():
            return nn.functional.cross_entropy(model(xq), yq, reduction="none")

    scores = influence_scores(full, Classification(), (xt, yt), (xq, yq), solver="exact", damping=lam,
                              self_influence=False).scores
    removed = torch.randperm(200, generator=torch.Generator().manual_seed(1))[:30]
    refits = SubsetRetrainer.leave_one_out(train, measure, n_train=200, indices=removed).run()
    assert refits.base_outputs is not None and refits.removed is not None
    assert refits.outputs.shape == (30, 30) and torch.equal(refits.removed, removed)
    result = loo_correlation(scores, refits.removed, refits.outputs, refits.base_outputs)
    assert result.pearson >= 0.95, result.per_query
    assert result.pooled_pearson >= 0.95
    assert result.ci.low >= 0.9 and result.ci.high <= 1.0
    # First order: removing z changes the query loss by about -I(z, q) / N (sign and scale, not only correlation).
    # train() averages over the N - 1 kept examples, which also weakens the penalty by lam / N for every refit alike:
    # a per-query offset, so the slope is taken on per-query centred values.
    a = result.actual - result.actual.mean(0)
    p = result.predicted - result.predicted.mean(0)
    # The exact refit exceeds the first-order step by the leverage factor 1/(1 - h) of the removed example (about
    # P/N = 0.15 on average here), so the slope is a little above 1/N, never below it or far above it.
    slope = float((a * p).sum() / (p**2).sum())
    assert 0.95 <= slope * 200 <= 1.5, slope * 200


# ---------------------------------------------------------------------------------------- mislabel
def test_self_influence_finds_flipped_digits_far_above_chance() -> None:
    from tests.helpers.data import digits_tensors

    x, y = digits_tensors()
    xt, yt = x[:1000], y[:1000]
    noisy, flipped = flip_labels(yt, 0.05, num_classes=10, seed=0)
    assert flipped.numel() == 50 and bool((noisy[flipped] != yt[flipped]).all())
    assert int((noisy != yt).sum()) == 50
    lam = 1e-2
    model = _lbfgs_logistic(xt, noisy, lam, max_iter=300, tol=1e-10)
    res = influence_scores(model, Classification(), (xt, noisy), (xt[:1], noisy[:1]), solver="exact", damping=lam,
                           self_influence=True)
    assert res.self_influence is not None
    result = mislabel_detection(res.self_influence, flipped, losses=res.train_losses, seed=0)
    si, rnd = result.rankings["self_influence"], result.rankings["random"]
    assert si.auc >= 0.9 and si.recall >= 0.8 and result.k == 50
    # Above chance by a margin chance cannot produce: the whole bootstrap interval of the self-influence AUC lies
    # above the permutation-null interval of random rankings and above the random ranking's own interval.
    assert si.auc_ci.low > result.chance_auc.high
    assert si.auc_ci.low > rnd.auc_ci.high
    assert result.chance_auc.contains(0.5) and result.chance_recall.contains(50 / 1000)
    assert si.recall_ci.low > result.chance_recall.high
    assert set(result.rankings) == {"self_influence", "loss", "random"}
