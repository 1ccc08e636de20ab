"""Influence scores against ground truth: dense float64 solves, paper 1's bag-of-words closed form (App. E),
exact leave-one-out retraining (L2-logistic regression on breast_cancer) and auto-tuned LiSSA vs exact."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_influence.exceptions import ConfigurationError, DivergenceError, NonFiniteError
from lightning_influence.influence import (
    InfluenceConfig,
    InfluenceResult,
    cosine_scores,
    dense_curvature,
    gradient_dot_scores,
    influence_scores,
    iter_per_example_gradients,
    per_example_gradients,
    self_influence,
    top_k,
)
from lightning_influence.operators import GNHOperator, make_batches
from lightning_influence.tasks import Classification, LanguageModeling, Task
from tests.helpers.data import digits_tensors
from tests.helpers.models import tiny_mlp, tiny_transformer_lm

F64 = torch.float64



def _corr(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def _spearman(a: Tensor, b: Tensor) -> float:
    return _corr(a.argsort().argsort().to(F64), b.argsort().argsort().to(F64))


@lru_cache(maxsize=1)
def digits_model() -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """64-8-10 tanh MLP (610 parameters), float64, trained on 400 digits with a little weight decay."""
    x, y = digits_tensors(F64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[:400]), y[:400])
        (loss + 1e-3 * sum((p**2).sum() for p in model.parameters())).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model, x[:400], y[:400], x[1500:1505], y[1500:1505]


def _tiny_problem(n: int = 30) -> tuple[nn.Module, Task, tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return tiny_mlp(dtype=F64), Classification(), (x, y)


# ------------------------------------------------------------------------------------ per-example grads
def test_per_example_gradients_match_autograd_and_chunking() -> None:
    model, task, (x, y) = _tiny_problem()
    G = per_example_gradients(model, task, (x, y), chunk_size=7)
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    assert torch.allclose(G, torch.stack(rows), atol=1e-12)
    chunks = list(iter_per_example_gradients(model, task, (x, y), [3, 1, 2], chunk_size=2))
    assert [c[0].tolist() for c in chunks] == [[3, 1], [2]]
    assert torch.allclose(torch.cat([c[1] for c in chunks]), G[[3, 1, 2]])
    assert all(p.grad is None for p in model.parameters())


def test_language_model_gradient_is_sum_over_non_ignored_tokens() -> None:
    model = tiny_transformer_lm(dtype=F64)
    task = LanguageModeling()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (4, 5), generator=gen)
    labels = ids.clone()
    labels[1, 3:] = -100  # padding in sequence 1
    batches = [{"input_ids": ids[i], "labels": labels[i]} for i in range(4)]
    G = per_example_gradients(model, task, batches, chunk_size=3)
    Gm = per_example_gradients(model, task, batches, chunk_size=3, normalization="mean")
    for i in range(4):
        model.zero_grad()
        logits = model(ids[i : i + 1, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 7), labels[i, 1:].reshape(-1), ignore_index=-100,
                                           reduction="sum")
        loss.backward()
        ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.allclose(G[i], ref, atol=1e-10)
        assert torch.allclose(Gm[i], ref / int((labels[i, 1:] != -100).sum()), atol=1e-10)
    model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------- exact vs brute force
def test_exact_and_cg_scores_match_brute_force_and_sign() -> None:
    model, task, (x, y) = _tiny_problem()
    damping = 0.05
    G = GNHOperator(model, task, make_batches(torch.utils.data.TensorDataset(x, y), batch_size=8)).dense()
    g = per_example_gradients(model, task, (x, y))
    A = G + damping * torch.eye(G.shape[0], dtype=F64)
    brute = -g[:5] @ torch.linalg.solve(A, g.T)  # I(z, q) = -∇ℓ(q)ᵀ (G+λ)⁻¹ ∇ℓ(z), rows = queries
    brute_self = torch.einsum("np,pn->n", g, torch.linalg.solve(A, g.T))
    for solver in ("exact", "cg"):
        r = influence_scores(model, task, (x, y), (x, y), query_indices=range(5), solver=solver, damping=damping,
                             cg_rtol=1e-12, chunk_size=4, self_influence=True)
        assert torch.allclose(r.scores, brute, rtol=1e-8, atol=1e-10), solver
        assert r.self_influence is not None
        assert torch.allclose(r.self_influence, brute_self, rtol=1e-8, atol=1e-10), solver
        assert torch.allclose(-r.scores[torch.arange(5), torch.arange(5)], brute_self[:5], rtol=1e-8)
        assert (r.self_influence >= 0).all()
    t = r.top_k(3)
    assert torch.equal(t.proponents, torch.argsort(brute, dim=1)[:, :3])  # most negative first = proponents
    assert torch.equal(t.opponents, torch.argsort(brute, dim=1, descending=True)[:, :3])
    d = r.to_dict()
    assert d["top_k"][0]["proponents"][0]["score"] <= d["top_k"][0]["opponents"][-1]["score"]
    assert len(d["self_influence_ranking"]) == 10
    assert r.metrics()["influence/solver_iterations"] >= 1


def test_baselines_share_the_sign_convention() -> None:
    model, task, (x, y) = _tiny_problem()
    g = per_example_gradients(model, task, (x, y))
    dot = gradient_dot_scores(model, task, (x, y), (x, y), query_indices=[0, 1], chunk_size=8)
    assert torch.allclose(dot, -g[:2] @ g.T)
    cos = cosine_scores(model, task, (x, y), (x, y), query_indices=[0, 1])
    assert torch.allclose(cos[0, 0], torch.tensor(-1.0, dtype=F64))
    # large damping: (G+λ)⁻¹ → I/λ, so λ·influence → gradient-dot
    r = influence_scores(model, task, (x, y), (x, y), query_indices=[0, 1], solver="exact", damping=1e6,
                         self_influence=False)
    assert torch.allclose(1e6 * r.scores, dot, rtol=1e-4)


def test_result_roundtrip(tmp_path: Any) -> None:
    model, task, (x, y) = _tiny_problem(12)
    r = influence_scores(model, task, (x, y), (x, y), query_indices=[0], solver="exact", damping=0.1)
    r.save(tmp_path / "scores.pt")
    back = InfluenceResult.load(tmp_path / "scores.pt")
    assert torch.equal(back.scores, r.scores) and back.config == r.config


# ---------------------------------------------------------------------- paper 1, App. E: bag of words
class BagOfWords(nn.Module):
    """log p(d) = Σ_t count(t, d) log p_t with p = softmax(x): the logits are the parameters x for every token."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(logits.clone())

    def forward(self, ids: Tensor) -> Tensor:
        return self.x.expand(*ids.shape, self.x.shape[0])


class DocumentTask(Task):
    """A document is a tensor of token ids; every token is a unit predicted from the logits."""

    def __init__(self) -> None:
        super().__init__("cross_entropy")

    def split(self, batch: Any) -> tuple[tuple[Any, ...], Tensor]:
        return (batch,), batch


def _corpus() -> tuple[list[Tensor], Tensor]:
    gen = torch.Generator().manual_seed(0)
    vocab, length, docs = 6, 5, 12
    weights = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0, 0.5], dtype=F64)
    d = torch.multinomial(weights.expand(docs, vocab), length, replacement=True, generator=gen)
    counts = torch.nn.functional.one_hot(d, vocab).sum((0, 1)).to(F64)
    assert bool((counts > 0).all())
    return list(d), counts / counts.sum()  # the maximum-likelihood p: the trained bag-of-words model


def test_bag_of_words_influence_is_tfidf_closed_form() -> None:
    docs, p = _corpus()
    vocab, length = p.numel(), docs[0].numel()
    model, task = BagOfWords(p.log()), DocumentTask()
    tf = torch.stack([torch.nn.functional.one_hot(d, vocab).sum(0).to(F64) / length for d in docs])  # TF(t, d)
    # per-document gradient of −log p(d) is −|d|(TF_d − p); the GNH averaged over tokens is diag(p) − ppᵀ
    for lam in (1e-2, 1e-3):
        a = p + lam
        dvec = p / a
        inv = torch.diag(1 / a) + torch.outer(dvec, dvec) / (lam * (p / a).sum())  # Sherman-Morrison (App. E)
        grads = -length * (tf - p)
        expected = -grads @ inv @ grads.T  # I(d1, d2), symmetric here
        for solver in ("exact", "cg"):
            r = influence_scores(model, task, docs, docs, solver=solver, damping=lam, cg_rtol=1e-13)
            assert torch.allclose(r.scores, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max())), solver
    # damping → 0: I(d1, d2) = −|d|² (Σ_t TF(t,d1) TF(t,d2) / p_t − 1); paper 1 writes Σ_t TF·TF/p_t, which is
    # the same up to the constant −1 (1ᵀ∇ log p(d) = 0 makes diag(p)⁻¹ an inverse on the gradients' subspace)
    # and the scale −|d|² of this convention.
    tfidf = (tf / p) @ tf.T
    r = influence_scores(model, task, docs, docs, solver="exact", damping=1e-10)
    assert torch.allclose(r.scores, -(length**2) * (tfidf - 1.0), rtol=1e-6, atol=1e-6)
    assert torch.allclose(-r.scores / length**2 + 1.0, tfidf, rtol=1e-6)


# ----------------------------------------------------------------------- breast cancer leave-one-out
def _fit_logistic(x: Tensor, y: Tensor, lam: float, n_total: int, theta0: Tensor | None = None) -> Tensor:
    """Newton's method on (1/n_total) Σ ℓ_i + λ/2 ||θ||² for a linear logit [x, 1] θ (float64, to 1e-13)."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1)
    theta = torch.zeros(xb.shape[1], dtype=F64) if theta0 is None else theta0.clone()
    for _ in range(50):
        s = torch.sigmoid(xb @ theta)
        grad = xb.T @ (s - y) / n_total + lam * theta
        hess = (xb.T * (s * (1 - s))) @ xb / n_total + lam * torch.eye(xb.shape[1], dtype=F64)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if float(step.norm()) < 1e-13:
            break
    return theta


def test_breast_cancer_influence_matches_leave_one_out_retraining() -> None:
    from sklearn.datasets import load_breast_cancer

    xs, ys = load_breast_cancer(return_X_y=True)
    x = torch.tensor(xs, dtype=F64)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(ys, dtype=F64)
    xtr, ytr, xte, yte = x[:500], y[:500], x[500:], y[500:]
    n, lam = len(xtr), 1e-2
    theta = _fit_logistic(xtr, ytr, lam, n)
    model = nn.Linear(30, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:30].reshape(1, 30))
        model.bias.copy_(theta[30:])

    def qloss(th: Tensor, i: int) -> float:
        h = xte[i] @ th[:30] + th[30]
        return float(nn.functional.softplus(h) - yte[i] * h)

    q = int(torch.tensor([qloss(theta, i) for i in range(len(xte))]).argmax())  # the worst-predicted test point
    task = Classification("binary")
    r = influence_scores(model, task, (xtr, ytr.long()), (xte, yte.long()), query_indices=[q], solver="exact",
                         damping=lam, self_influence=False)
    scores = r.scores[0]
    top = scores.abs().argsort(descending=True)[:40]
    predicted = -scores[top] / n  # removing z (ε = −1/N) changes the query loss by −I(z, q)/N
    actual = []
    for j in top.tolist():
        keep = torch.ones(n, dtype=torch.bool)
        keep[j] = False
        th_j = _fit_logistic(xtr[keep], ytr[keep], lam, n, theta0=theta)
        actual.append(qloss(th_j, q) - qloss(theta, q))
    actual_t = torch.tensor(actual, dtype=F64)
    pearson, spearman = _corr(predicted, actual_t), _spearman(predicted, actual_t)
    assert pearson >= 0.9 and spearman >= 0.9, (pearson, spearman)


# --------------------------------------------------------------------------- auto-tuned LiSSA vs exact
def test_auto_tuned_lissa_scores_match_exact_digits_mlp() -> None:
    model, x, y, xq, yq = digits_model()
    task = Classification()
    common: dict[str, Any] = {"train_indices": range(100), "damping": 1e-3, "self_influence": False}
    exact = influence_scores(model, task, (x, y), (xq, yq), solver="exact", **common)
    lis = influence_scores(model, task, (x, y), (xq, yq), solver="lissa", **common)  # default settings
    assert lis.solve["info"]["settings_source"] == "measured"
    assert lis.solve["info"]["measured_constant"]["constant"] > 2.0  # C.1's constant on this model exceeds 2
    assert not lis.solve["diverged"]
    pearson = _corr(lis.scores, exact.scores)
    assert pearson >= 0.98, pearson
    assert lis.diagnostics["gradient_equivalents"] > exact.diagnostics["example_gradients"]


# ---------------------------------------------------------------------------------------------- errors
def test_lissa_restarts_with_a_larger_batch_after_divergence() -> None:
    model, x, y, xq, yq = digits_model()
    with pytest.warns(RuntimeWarning, match="Restarting with C=4"):  # C = 2 (paper 1) diverges on this model
        r = influence_scores(model, Classification(), (x, y), (xq, yq), solver="lissa", damping=1e-3,
                             lissa_constant=2.0, lissa_measure_constant=False, train_indices=range(10),
                             self_influence=False)
    assert not r.solve["diverged"] and r.solve["info"]["restarts"][0]["constant"] == 2.0
    assert r.solve["info"]["constant"] == 4.0


def test_clear_errors() -> None:
    model, task, (x, y) = _tiny_problem(12)
    with pytest.raises(ConfigurationError, match="query set is empty"):
        influence_scores(model, task, (x, y), (x, y), query_indices=[], solver="exact")
    with pytest.raises(ConfigurationError, match="solver must be one of"):
        influence_scores(model, task, (x, y), (x, y), solver="newton")
    with pytest.raises(ConfigurationError, match="damping > 0"):
        influence_scores(model, task, (x, y), (x, y), solver="lissa", damping=0.0)
    # the true Hessian of an untrained net is indefinite: damping 0 must be refused, never silently solved
    with pytest.raises(ConfigurationError, match="not positive definite"):
        influence_scores(model, task, (x, y), (x, y), solver="exact", curvature="hessian", damping=0.0)
    with pytest.raises(ConfigurationError, match="non-positive curvature"):
        influence_scores(model, task, (x, y), (x, y), solver="cg", curvature="hessian", damping=0.0)
    with pytest.raises(ConfigurationError, match="not positive definite"):  # PSD but singular GNH, damping 0
        influence_scores(model, task, (x, y), (x, y), solver="exact", damping=0.0)
    bad = x.clone()
    bad[7, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="example 7"):
        influence_scores(model, task, (bad, y), (x, y), curvature_indices=range(5), solver="exact", damping=0.1)
    with pytest.raises(DivergenceError, match="larger batch"):
        influence_scores(model, task, (x, y), (x, y), solver="lissa", damping=1e-4, lissa_batch_size=1,
                         lissa_eta=50.0, lissa_steps=500, self_influence=False)
    with pytest.raises(ConfigurationError, match="dataset"):
        influence_scores(model, task, 3, (x, y))
    with pytest.raises(ConfigurationError, match=r"\(n_query, n_train\)"):
        top_k(torch.zeros(3), 1)
    InfluenceConfig().validate()


def test_self_influence_wrapper_and_iterative_self_influence() -> None:
    model, task, (x, y) = _tiny_problem(20)
    exact = self_influence(model, task, (x, y), damping=0.1, solver="exact")
    cg = self_influence(model, task, (x, y), damping=0.1, solver="cg", cg_rtol=1e-12)
    assert torch.allclose(exact, cg, rtol=1e-8)
    with pytest.raises(ConfigurationError, match="not computed"):
        influence_scores(model, task, (x, y), (x, y), solver="exact", damping=0.1,
                         self_influence=False).self_influence_ranking()


def test_dense_curvature_matches_operator() -> None:
    model, task, (x, y) = _tiny_problem()
    batches = make_batches(torch.utils.data.TensorDataset(x, y), batch_size=7)
    assert torch.allclose(dense_curvature(model, task, batches), GNHOperator(model, task, batches).dense(),
                          atol=1e-13)


# ------------------------------------------------------------------------------------ damping="auto"
def test_auto_damping_is_a_fraction_of_lambda_max_measured_on_the_spot() -> None:
    model, task, (x, y) = _tiny_problem()
    G = GNHOperator(model, task, make_batches(torch.utils.data.TensorDataset(x, y), batch_size=8)).dense()
    lam_max = float(torch.linalg.eigvalsh(G)[-1])
    r = influence_scores(model, task, (x, y), (x, y), query_indices=range(3))  # defaults: auto solver and damping
    used = r.diagnostics["damping"]
    # the exact solver (auto's pick on this tiny model) reads lambda_max off its dense matrix: no curvature pass
    assert r.diagnostics["solver"] == "exact" and used["rule"] == "auto" and used["source"] == "lanczos_dense"
    assert used["lambda_max"] == pytest.approx(lam_max, rel=1e-3)
    cg = influence_scores(model, task, (x, y), (x, y), query_indices=range(3), solver="cg")
    assert cg.diagnostics["damping"]["source"] == "lanczos"
    assert cg.diagnostics["damping"]["lambda_max"] == pytest.approx(lam_max, rel=1e-3)
    assert used["damping"] == pytest.approx(1e-3 * used["lambda_max"])
    assert r.config["damping"] == used["damping"] and r.config["damping_rule"] == "auto"
    assert r.metrics()["influence/damping"] == used["damping"]
    assert r.self_influence is None  # self-influence only when asked
    fixed = influence_scores(model, task, (x, y), (x, y), query_indices=range(3), solver="exact",
                             damping=used["damping"])
    assert float((r.scores - fixed.scores).abs().max()) <= 1e-4 * float(fixed.scores.abs().max())
    assert fixed.diagnostics["damping"]["rule"] == "fixed"
    half = influence_scores(model, task, (x, y), (x, y), query_indices=range(3), solver="exact",
                            damping_fraction=0.5)
    assert half.diagnostics["damping"]["damping"] == pytest.approx(0.5 * lam_max, rel=1e-3)
    with pytest.raises(ConfigurationError, match="damping_fraction"):
        InfluenceConfig(damping_fraction=0.0).validate()
    with pytest.raises(ConfigurationError, match="'auto'"):
        InfluenceConfig(damping="big").validate()  # type: ignore[arg-type]


def _auto_case(kind: str) -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    if kind == "conv":  # 2,650 parameters, ~0.7 MFLOP per example: each product column costs a lot per parameter
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 16, 3, padding=1), nn.Tanh(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        x = torch.randn(64, 1, 12, 12, generator=g, dtype=torch.float64)
    else:  # 3,010 parameters, ~6 kFLOP per example
        model = nn.Sequential(nn.Linear(64, 40), nn.Tanh(), nn.Linear(40, 10))
        x = torch.randn(64, 64, generator=g, dtype=torch.float64)
    return model.double(), x, torch.randint(0, 10, (64,), generator=g)


@pytest.mark.parametrize(("kind", "queries", "expected"), [("conv", 16, "exact"), ("mlp", 1, "pcg")])
def test_auto_solver_picks_the_cheaper_of_exact_and_pcg_by_projected_flops(kind: str, queries: int,
                                                                           expected: str) -> None:
    torch.manual_seed(0)
    model, x, y = _auto_case(kind)
    task = Classification()
    r = influence_scores(model, task, (x, y), (x[:queries], y[:queries]), damping=0.1)  # solver="auto" by default
    choice = r.diagnostics["solver_choice"]
    assert r.diagnostics["solver"] == choice["solver"] == expected and choice["rule"] == "projected FLOPs"
    assert choice["forward_flops_per_example"] > 0 and choice["outputs_per_example"] == 10
    assert (choice["exact_flops"] <= choice["iterative_flops"]) == (expected == "exact")
    other = influence_scores(model, task, (x, y), (x[:queries], y[:queries]), damping=0.1,
                             solver="cg" if expected == "exact" else "exact", cg_rtol=1e-10)
    scale = float(other.scores.abs().max())
    assert float((r.scores - other.scores).abs().max()) <= 1e-5 * scale  # either way the same, certified answer
