"""Solvers against ground truth: Fisher-CG vs a dense solve, LiSSA vs the exact iHVP, and paper 1's Lemma 3."""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch
from torch import Tensor, nn

from lightning_influence.exceptions import ConfigurationError, DivergenceError
from lightning_influence.influence import dense_curvature
from lightning_influence.operators import ExpectedFisherOperator, GNHOperator, make_batches
from lightning_influence.solvers import (
    SampledCurvature,
    conjugate_gradient,
    dense_solve,
    lissa,
    local_curvature_matmat,
    measure_batch_constant,
)
from lightning_influence.spectrum import DenseOperator, estimate_spectrum, lissa_settings
from lightning_influence.tasks import Classification, Regression, Task
from tests.helpers.data import digits_tensors

F64 = torch.float64



@lru_cache(maxsize=1)
def digits_mlp() -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 MLP (64-6-10, 460 parameters) briefly trained on 300 digits, seeded, global RNG untouched."""
    x, y = digits_tensors(F64)
    x, y = x[:300], y[:300]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model, x, y


def test_fisher_cg_matches_dense_solve_digits_mlp() -> None:
    model, x, y = digits_mlp()
    task = Classification()
    batches = make_batches(torch.utils.data.TensorDataset(x, y), batch_size=300)
    op = ExpectedFisherOperator(model, task, batches)  # "Fisher-CG": the expected Fisher (= GNH for softmax CE)
    G = dense_curvature(model, task, batches)  # independent path: per-example Jacobians and S_h
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(op.num_params, 2, generator=gen, dtype=F64)
    damping = 1e-2
    exact = dense_solve(G, b, damping=damping).x
    res = conjugate_gradient(op, b, damping=damping, rtol=1e-10, max_iter=2000)
    rel = float((res.x - exact).norm() / exact.norm())
    assert rel <= 1e-6, rel
    assert res.converged and res.relative_residual <= 1e-9
    assert res.iterations == len(res.history) - 1 > 0


def test_lissa_full_batch_converges_to_exact_solution() -> None:
    """With the whole pool as every step's batch, LiSSA is deterministic Richardson iteration: it must converge."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen, dtype=F64)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(40, 1, dtype=F64))
    model = nn.Linear(5, 1, bias=False).double()
    sampler = SampledCurvature(model, Regression(), ds, batch_size=40, replacement=False)
    H = x.T @ x / 40
    b = torch.randn(5, 2, generator=gen, dtype=F64)
    lam = 0.5
    lmax = float(torch.linalg.eigvalsh(H)[-1])
    res = lissa(sampler, b, damping=lam, eta=1 / (lmax + lam), steps=400, certificate_operator=DenseOperator(H))
    exact = torch.linalg.solve(H + lam * torch.eye(5, dtype=F64), b)
    assert torch.allclose(res.x, exact, rtol=1e-9, atol=1e-10)
    assert res.relative_residual < 1e-9 and res.converged and not res.diverged
    assert res.num_products == 400 * 2 + 2


def test_sampler_draws_are_seeded_and_sharding_is_exact() -> None:
    model, x, y = digits_mlp()
    task = Classification()
    ds = torch.utils.data.TensorDataset(x, y)
    s = SampledCurvature(model, task, ds, batch_size=7, seed=3)
    assert torch.equal(s.draw(5), s.with_batch_size(7).draw(5))
    assert not torch.equal(s.draw(5), s.draw(6))
    V = torch.randn(s.num_params, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    full = s(5, V)
    # two ranks: each takes idx[rank::2]; local sums add up to the one-process product (7 examples: uneven split)
    idx = s.draw(5)
    parts = [local_curvature_matmat(model, task, make_batches(ds, idx[r::2].tolist(), batch_size=7), V) for r in (0, 1)]
    total = (parts[0][0] + parts[1][0]) / (parts[0][1] + parts[1][1])
    assert torch.allclose(total, full, rtol=1e-12, atol=1e-14)
    # the vectorised GNH path equals the reference operator
    op = GNHOperator(model, task, make_batches(ds, idx.tolist(), batch_size=7))
    assert torch.allclose(op.matvec(V[:, 0]), full[:, 0], rtol=1e-10, atol=1e-12)


def test_lissa_argument_errors() -> None:
    model, x, y = digits_mlp()
    s = SampledCurvature(model, Classification(), torch.utils.data.TensorDataset(x, y), batch_size=4)
    b = torch.zeros(s.num_params, dtype=F64)
    with pytest.raises(ConfigurationError, match="damping > 0"):
        lissa(s, b, damping=0.0)
    with pytest.raises(ConfigurationError, match="average"):
        lissa(s, b, damping=1.0, average=1.0, eta=0.1, steps=2)
    with pytest.raises(ConfigurationError, match="rows"):
        lissa(s, torch.zeros(3, dtype=F64), damping=1.0, eta=0.1, steps=2)
    class Plain:
        num_params = 3

        def __call__(self, step: int, v: Tensor) -> Tensor:
            return v

    with pytest.raises(ConfigurationError, match="settings"):
        lissa(Plain(), torch.zeros(3, dtype=F64), damping=1.0)
    with pytest.warns(RuntimeWarning, match="damping"):
        lissa(s, b, damping=1.0, settings=lissa_settings(10.0, 1.0, 0.5), certificate_size=None, steps=1)


# ------------------------------------------------------------------------------------ paper 1, Lemma 3
def _hadamard(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


class _ScaledLogit(nn.Module):
    """Paper 1's model: log p(y=1|x) = θᵀx − log(e^{θᵀx} + e^{−θᵀx}), i.e. a logistic logit h = 2θᵀx."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * x @ self.theta


def _lemma3_problem(dim: int = 24, n: int = 32) -> tuple[nn.Module, Task, torch.utils.data.Dataset, Tensor]:
    """x = V s with s_i = sqrt(λ_i) ε_i: rows of a Hadamard matrix give E[εεᵀ] = I exactly, so the dataset GNH
    at θ = 0 is exactly H = V Λ Vᵀ and ||x||² = Tr(H) for every example (paper 1, App. C.1)."""
    gen = torch.Generator().manual_seed(0)
    lam = torch.linspace(1.0, 0.5, dim, dtype=F64)  # flat spectrum: Tr/λ_max ≈ 18
    V, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64))
    eps = _hadamard(n)[:, 1 : dim + 1]  # columns of a Hadamard matrix are orthogonal with ±1 entries
    x = (eps * lam.sqrt()) @ V.T
    yv = torch.tensor([0, 1] * (n // 2))
    H = V @ torch.diag(lam) @ V.T
    return _ScaledLogit(dim), Classification("binary"), torch.utils.data.TensorDataset(x, yv), H


def test_lemma3_construction_is_exact() -> None:
    model, task, ds, H = _lemma3_problem()
    G = dense_curvature(model, task, make_batches(ds, batch_size=32))
    assert torch.allclose(G, H, atol=1e-12)
    x = ds.tensors[0]
    assert torch.allclose((x * x).sum(1), torch.full((32,), float(torch.trace(H)), dtype=F64))


def test_lemma3_small_batch_diverges_and_recommended_batch_converges() -> None:
    model, task, ds, H = _lemma3_problem()
    damping = 0.05
    tr, lmax = float(torch.trace(H)), float(torch.linalg.eigvalsh(H)[-1])
    eta = 1.0 / (lmax + damping)
    small = 2
    assert small < tr / (lmax + damping)  # Lemma 3's regime
    # Lemma 3: R = (1 - η(H+λ))² + η²(E H̃² − H²), with E H̃² − H² = Tr(H) H/|B| − H²/|B|; its top eigenvalue > 1
    R = (torch.eye(24, dtype=F64) - eta * (H + damping * torch.eye(24, dtype=F64))) @ (
        torch.eye(24, dtype=F64) - eta * (H + damping * torch.eye(24, dtype=F64))
    ) + eta**2 * (tr * H - H @ H) / small
    assert float(torch.linalg.eigvalsh(R)[-1]) > 1.0

    sampler = SampledCurvature(model, task, ds, batch_size=small, seed=0)
    u0 = torch.ones(24, dtype=F64)
    g0 = torch.zeros(24, dtype=F64)  # the lemma's setting: g = 0, u* = 0, u0 ≠ 0
    with pytest.raises(DivergenceError, match=r"larger batch.*larger\s+damping.*smaller eta"):
        lissa(sampler, g0, damping=damping, eta=eta, steps=2000, x0=u0, certificate_size=None)
    with pytest.warns(RuntimeWarning, match="diverged"):
        res = lissa(sampler, g0, damping=damping, eta=eta, steps=2000, x0=u0, on_divergence="warn",
                    certificate_size=None)
    assert res.diverged and not res.converged and res.iterations < 2000
    # also with a real right-hand side
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(24, generator=gen, dtype=F64)
    with pytest.raises(DivergenceError, match=r"\|B\|=2"):
        lissa(sampler, g, damping=damping, eta=eta, steps=2000, certificate_size=None)

    # recommended settings measured on the spot: |B| >= 2 Tr/λ_max, η = 1/(λ_max+λ), T = 2/(λη)
    spec = estimate_spectrum(sampler.operator(), damping=damping, constant=2.0)  # the paper's rule
    # the rule applied to the measured spectrum (whose Hutchinson trace is within 3 SE of the exact one)
    assert abs(spec.trace - tr) <= 3 * spec.trace_stderr, (spec.trace, spec.trace_stderr, tr)
    assert spec.lissa.batch_size >= 2 * (tr - 3 * spec.trace_stderr) / lmax - 1
    A = H + damping * torch.eye(24, dtype=F64)
    exact = torch.linalg.solve(A, g)
    res0 = lissa(sampler, g0, damping=damping, settings=spec, x0=u0, certificate_size=None, max_restarts=0)
    assert not res0.diverged and res0.info["batch_size"] == spec.lissa.batch_size
    assert res0.info["settings_source"] == "spectrum_summary"
    assert float(res0.x.norm()) < 0.05 * float(u0.norm())  # g = 0: the iterate contracts to u* = 0
    res = lissa(sampler, g, damping=damping, settings=spec, certificate_operator=DenseOperator(H), max_restarts=0,
                average=0.5)
    assert not res.diverged and res.converged is (res.relative_residual <= 0.1)
    # Theorem 1: E||u_T − u*||² ≲ (1−λη)^{2T}||u*||² + η² Tr(H)/|B| · gᵀ(H+λ)⁻¹g
    eta_s, T, batch = spec.lissa.eta, spec.lissa.steps, spec.lissa.batch_size
    bound = (1 - damping * eta_s) ** (2 * T) * float(exact.norm() ** 2) + eta_s**2 * tr / batch * float(g @ exact)
    assert float((res.x - exact).norm() ** 2) <= bound
    assert float((res.x - exact).norm() / exact.norm()) < 0.25


def test_lemma3_mean_square_growth_matches_theory() -> None:
    """Without the guard, the mean of ||u_t||² over independent runs grows geometrically (paper 1, Lemma 3)."""
    model, task, ds, H = _lemma3_problem()
    damping, small, steps = 0.05, 2, 12
    lmax = float(torch.linalg.eigvalsh(H)[-1])
    eta = 1.0 / (lmax + damping)
    u0 = torch.ones(24, dtype=F64)
    sq = []
    for seed in range(60):
        s = SampledCurvature(model, task, ds, batch_size=small, seed=seed)
        res = lissa(s, torch.zeros(24, dtype=F64), damping=damping, eta=eta, steps=steps, x0=u0,
                    divergence_slack=math.inf, certificate_size=None)
        sq.append(float(res.x.norm() ** 2))
    assert sum(sq) / len(sq) > 100 * float(u0.norm() ** 2)  # grows by orders of magnitude in 12 steps


# ------------------------------------------------------------------------- condition C.1's constant
def test_measured_batch_constant_is_exact_on_lemma3_construction() -> None:
    """On Lemma 3's data E H̃² − H² = (Tr(H) H − H²)/|B|, so along an eigenvector C(v) = 1 − λ_v/Tr(H)."""
    model, task, ds, H = _lemma3_problem()
    evals, evecs = torch.linalg.eigh(H)
    tr = float(evals.sum())
    sampler = SampledCurvature(model, task, ds, batch_size=1)
    dirs = evecs[:, [-1, -2, 0]]
    out = measure_batch_constant(sampler, tr, directions=dirs, sample_size=32)
    expected = 1.0 - evals[[-1, -2, 0]] / tr
    assert torch.allclose(torch.tensor(out["per_direction"], dtype=F64), expected, rtol=1e-10)
    assert torch.allclose(torch.tensor(out["rayleigh"], dtype=F64), evals[[-1, -2, 0]], rtol=1e-10)


def test_measured_batch_constant_matches_dense_per_example_gnh() -> None:
    model, x, y = digits_mlp()
    task = Classification()
    ds = torch.utils.data.TensorDataset(x[:40], y[:40])
    per_example = [dense_curvature(model, task, [(x[i : i + 1], y[i : i + 1])]) for i in range(40)]
    H = torch.stack(per_example).mean(0)
    tr = float(torch.trace(H))
    V = torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    V = V / V.norm(dim=0)
    second = torch.stack([torch.stack([(Hn @ V[:, j]).pow(2).sum() for Hn in per_example]).mean() for j in (0, 1)])
    hv = H @ V
    expected = (second - hv.pow(2).sum(0)) / (tr * (V * hv).sum(0))
    out = measure_batch_constant(SampledCurvature(model, task, ds, batch_size=1), tr, directions=V, sample_size=40)
    assert torch.allclose(torch.tensor(out["per_direction"], dtype=F64), expected, rtol=1e-9)
    # subspace iteration finds the top directions; LiSSA then uses max(C_measured, C)
    auto = measure_batch_constant(SampledCurvature(model, task, ds, batch_size=1), tr, directions=2, sample_size=40)
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert max(auto["rayleigh"]) == pytest.approx(top, rel=1e-3)
    res = lissa(SampledCurvature(model, task, ds, batch_size=1), torch.ones(H.shape[0], dtype=F64), damping=0.05,
                measure_constant=True, constant=0.5, certificate_size=None, steps=3)
    assert res.info["measured_constant"]["constant"] > 0.5
    assert res.info["constant"] == pytest.approx(res.info["measured_constant"]["constant"])


def test_cg_tolerance_floor_follows_the_dtype() -> None:
    # rtol below 10 float32 epsilons is unattainable: float32 CG stops there, converged, and records both
    # tolerances; float64 keeps the requested one (condition number ~1e3, so float32 can reach the floor).
    # Ground truth: the float64 dense solve.
    from lightning_influence.operators import DenseOperator
    from lightning_influence.solvers.cg import effective_rtol

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(0, 3, 60, dtype=torch.float64)) @ q.T
    b = torch.randn(60, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(a + 1.0 * torch.eye(60, dtype=torch.float64), b)
    r64 = conjugate_gradient(DenseOperator(a), b, damping=1.0, rtol=1e-12, max_iter=500)
    assert r64.info["rtol"] == 1e-12 and r64.converged
    assert torch.allclose(r64.x, exact, rtol=1e-9, atol=1e-12)
    r32 = conjugate_gradient(DenseOperator(a.float()), b.float(), damping=1.0, rtol=1e-12, max_iter=500)
    floor = effective_rtol(1e-12, torch.float32)
    assert floor == 10 * torch.finfo(torch.float32).eps
    assert r32.converged and r32.info == {"rtol": floor, "rtol_requested": 1e-12, "damping": 1.0}
    assert r32.iterations < 500
    assert float((r32.x.double() - exact).norm() / exact.norm()) < 1e-3
