"""PBRF numerics against ground truth: explicit damped-GNH influence (dense float64), closed forms, refits."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from scipy.stats import spearmanr

from lightning_influence.exceptions import ConfigurationError
from lightning_influence.operators import GNHOperator, loss_gradient
from lightning_influence.pbrf import PBRF, copy_model, pbrf_response, query_loss_measurement
from lightning_influence.solvers import conjugate_gradient, dense_solve
from lightning_influence.tasks import Classification, Regression
from tests.helpers.data import digits_tensors
from tests.helpers.models import tiny_mlp


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny float64 problems are ~30x faster single-threaded on a shared 2-core machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def _explicit_influence(model, task, op, damping, example, queries, solver="dense") -> torch.Tensor:
    """I(z, q) = -grad l(q)^T (G + lambda)^-1 grad l(z), per query, from one-example gradients."""
    gz = loss_gradient(model, task, [example])
    x, y = queries
    gq = torch.stack([loss_gradient(model, task, [(x[i : i + 1], y[i : i + 1])]) for i in range(len(y))])
    if solver == "dense":
        s = dense_solve(op, gz, damping=damping).x
    else:
        s = conjugate_gradient(op, gz, damping=damping, rtol=1e-10).x
    return -gq @ s


def _toy_classification(n: int = 60):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("optimizer", ["lbfgs", "newton_cg"])
def test_small_epsilon_pbrf_equals_damped_gnh_influence(optimizer: str) -> None:
    x, y = _toy_classification()
    model, task, damping = tiny_mlp(dtype=torch.float64), Classification(), 0.1
    data = [(x[:25], y[:25]), (x[25:], y[25:])]  # two batches: the unit average spans batches
    op = GNHOperator(model, task, data)
    queries = (x[:12], y[:12])
    pbrf = PBRF(model, task, data, damping=damping, epsilon=1e-3, optimizer=optimizer)
    infl, resp = [], []
    for m in (20, 31, 47):
        ex = (x[m : m + 1], y[m : m + 1])
        res = pbrf.response(ex, queries=[queries])
        assert res.converged, res.to_dict()
        assert res.optimizer == optimizer and res.dtype == "float64" and res.epsilon == 1e-3
        infl.append(_explicit_influence(model, task, op, damping, ex, queries))
        resp.append(res.response)
    infl_t, resp_t = torch.cat(infl), torch.cat(resp)
    assert _pearson(infl_t, resp_t) >= 0.99
    # Stronger than the required correlation: the central difference is O(eps^2) accurate.
    assert float((infl_t - resp_t).norm() / infl_t.norm()) < 1e-2


def test_linear_gaussian_pbrf_matches_closed_form_for_large_epsilon() -> None:
    """Linear model + squared error: the PBO is exactly quadratic, so its minimisers have a closed form.

    F_s(theta) = 1/2 d^T (G + lambda + s eps G_m) d + s eps g_m^T d with d = theta - theta_hat, hence
    theta_s = theta_hat - s eps (G + lambda + s eps G_m)^-1 g_m for any eps (here 0.05 = 2/N, far from "small").
    """
    from torch.func import functional_call

    from lightning_influence.params import trainable_parameters, unflatten

    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randn(40, 2, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, 3, generator=g, dtype=torch.float64))
    task, damping, eps = Regression(), 0.05, 0.05
    ex = (x[:1], y[:1] + 3.0)
    qx = torch.randn(5, 3, generator=g, dtype=torch.float64)
    qy = torch.randn(5, 2, generator=g, dtype=torch.float64)
    big_g = GNHOperator(model, task, [(x, y)]).dense()
    g_m = GNHOperator(model, task, [ex]).dense()
    grad_m = loss_gradient(model, task, [ex])
    params = trainable_parameters(model)
    theta_hat = torch.cat([p.reshape(-1) for p in params.values()])
    eye = torch.eye(len(theta_hat), dtype=torch.float64)
    measured = []
    for s in (1, -1):
        theta = theta_hat - s * eps * torch.linalg.solve(big_g + damping * eye + s * eps * g_m, grad_m)
        out = functional_call(model, unflatten(theta, params), (qx,))
        measured.append(0.5 * ((out - qy) ** 2).sum(1))
    expected = (measured[0] - measured[1]) / (2 * eps)
    # Newton-CG solves a quadratic in one step; L-BFGS reaches a relative gradient of ~1e-8 in float64.
    for optimizer, tol in (("newton_cg", 1e-10), ("lbfgs", 1e-7)):
        res = pbrf_response(model, task, [(x, y)], ex, damping=damping, epsilon=eps, queries=[(qx, qy)], tol=tol,
                            optimizer=optimizer)  # type: ignore[arg-type]
        assert res.converged, (optimizer, res.to_dict())
        torch.testing.assert_close(res.response, expected, rtol=10 * tol, atol=1e-9)
    # ... and differs from the first-order influence by O(eps^2), which is why eps matters.
    first_order = _explicit_influence(model, task, GNHOperator(model, task, [(x, y)]), damping, ex, (qx, qy))
    assert float((first_order - expected).norm()) > 1e-3 * float(expected.norm())


def test_custom_measurement_and_sign_convention() -> None:
    x, y = _toy_classification()
    model, task, damping = tiny_mlp(dtype=torch.float64), Classification(), 0.1
    pbrf = PBRF(model, task, [(x, y)], damping=damping, epsilon=1e-3)
    ex = (x[5:6], y[5:6])
    # Upweighting an example lowers its own loss: self-response (its own query loss) is negative.
    self_resp = pbrf.response(ex, queries=[ex]).response
    assert self_resp.shape == (1,) and float(self_resp[0]) < 0
    # Any measurement: here the mean logit of class 0 on the first ten inputs, vs -grad m^T (G+lambda)^-1 grad l(z).
    op = GNHOperator(model, task, [(x, y)])

    def mean_logit(module: torch.nn.Module) -> torch.Tensor:
        return module(x[:10].to(next(module.parameters()).dtype))[:, 0].mean().reshape(1)

    params = dict(model.named_parameters())
    gm = torch.autograd.grad(mean_logit(model), list(params.values()))
    gm_flat = torch.cat([t.reshape(-1) for t in gm])
    expected = -gm_flat @ dense_solve(op, loss_gradient(model, task, [ex]), damping=damping).x
    got = pbrf.response(ex, measurement=mean_logit).response
    torch.testing.assert_close(got[0], expected, rtol=1e-2, atol=1e-8)


@pytest.fixture(scope="module")
def digits_problem():
    """An 8-hidden-unit tanh MLP on 300 digits, trained (float64, 100 full-batch Adam steps) to loss ~0.13."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped fixtures run before the per-test autouse fixture
    x, y = digits_tensors()
    xtr, ytr = x[:300], y[:300]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    torch.set_num_threads(saved)
    return model, (xtr, ytr), (x[1000:1030], y[1000:1030])


def test_digits_exact_cg_and_lissa_influence_track_pbrf_at_one_over_n(digits_problem) -> None:
    """Issue 7: exact/CG vs PBRF Pearson >= 0.85, Spearman >= 0.95; auto-LiSSA >= 0.80 and >= 0.15 above grad-dot."""
    from lightning_influence.influence import gradient_dot_scores, influence_scores

    model, (xtr, ytr), (xq, yq) = digits_problem
    task, damping = Classification(), 3e-2
    train_idx = torch.arange(0, 64, 8)
    pbrf = PBRF(model, task, [(xtr, ytr)], damping=damping)  # epsilon defaults to 1/N
    assert pbrf.epsilon == pytest.approx(1 / 300)
    resp, results = pbrf.responses([(xtr[i : i + 1], ytr[i : i + 1]) for i in train_idx.tolist()], queries=[(xq, yq)])
    assert all(r.converged for r in results), [r.relative_grad_norm for r in results]
    kw = {"train_indices": train_idx, "damping": damping, "self_influence": False}
    est = {
        name: influence_scores(model, task, (xtr, ytr), (xq, yq), solver=name, seed=0, **kw).scores.T
        for name in ("exact", "cg", "lissa")
    }
    est["gradient_dot"] = gradient_dot_scores(model, task, (xtr, ytr), (xq, yq), train_indices=train_idx).T
    pearson = {k: _pearson(v, resp) for k, v in est.items()}
    spearman = {k: float(spearmanr(v.flatten().numpy(), resp.flatten().numpy())[0]) for k, v in est.items()}
    for name in ("exact", "cg"):
        assert pearson[name] >= 0.85, (name, pearson, spearman)
        assert spearman[name] >= 0.95, (name, pearson, spearman)
    print("digits PBRF correlations: pearson", pearson, "spearman", spearman)
    assert pearson["lissa"] >= 0.80, (pearson, spearman)
    assert pearson["lissa"] >= pearson["gradient_dot"] + 0.15, (pearson, spearman)


def test_preconditioned_newton_steps_give_the_same_responses_in_fewer_products(digits_problem) -> None:
    """The preconditioner built once at theta_hat (dense factor: chord steps; or sketch) changes only the cost.

    Each solve stops at the same relative gradient norm, so the responses agree to the solve tolerance; the
    data passes drop: the dense factor takes chord steps (one gradient each, no product), the sketch preconditions
    each Newton step's CG (the damped GNH of the digits MLP is ill-conditioned).
    """
    model, (xtr, ytr), (xq, yq) = digits_problem
    examples = [(xtr[i : i + 1], ytr[i : i + 1]) for i in (0, 40, 80)]
    out = {}
    for kind in ("none", "dense", "sketch"):
        pbrf = PBRF(model, Classification(), [(xtr, ytr)], damping=3e-2, preconditioner=kind)
        resp, results = pbrf.responses(examples, queries=[(xq, yq)])
        assert all(r.converged for r in results), (kind, [r.relative_grad_norm for r in results])
        products = sum(s.products + s.evaluations for r in results for s in r.solves)  # data passes
        out[kind] = (resp, products, pbrf.to_dict()["preconditioner"])
    ref, plain, info = out["none"]
    assert info == "none"
    for kind in ("dense", "sketch"):
        resp, products, info = out[kind]
        assert info["kind"] == kind and info["products"] > 0
        assert torch.allclose(resp, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max())), (kind, resp, ref)
        assert products < plain, (kind, products, plain)
    print("PBRF data passes by preconditioner:", {k: v[1] for k, v in out.items()})
    assert out["dense"][1] < plain / 8, {k: v[1] for k, v in out.items()}
    with pytest.raises(ConfigurationError, match="preconditioner"):
        PBRF(model, Classification(), [(xtr, ytr)], damping=1e-3, preconditioner="lu")


def test_stable_bregman_equals_loss_bregman_and_keeps_relative_accuracy() -> None:
    from lightning_influence.losses import SoftmaxCrossEntropy
    from lightning_influence.pbrf import stable_bregman

    g = torch.Generator().manual_seed(3)
    loss = SoftmaxCrossEntropy(ignore_index=-100)
    ref = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)  # language-model shaped, with ignored tokens
    out = ref + torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[0, :2] = -100
    torch.testing.assert_close(stable_bregman(loss, out, ref, y), loss.bregman(out, ref, y), rtol=1e-12, atol=1e-14)
    # Tiny perturbation: KL ~ 1/2 Var_p(delta); the stable form keeps ~all digits, the textbook form does not.
    delta = 1e-7 * torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    p = torch.softmax(ref, -1)
    centred = delta - (p * delta).sum(-1, keepdim=True)
    expected = 0.5 * (p * centred**2).sum(-1) * (y != -100)
    torch.testing.assert_close(stable_bregman(loss, ref + delta, ref, y), expected, rtol=1e-5, atol=0.0)


def test_trained_weights_modes_and_grads_untouched() -> None:
    x, y = _toy_classification()
    model = tiny_mlp()  # float32: the PBRF works on a float64 copy
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = pbrf_response(model, Classification(), [(x.float(), y)], (x[:1].float(), y[:1]), damping=0.1,
                        queries=[(x[:5].float(), y[:5])], epsilon=1e-2)
    assert res.dtype == "float64" and res.response.dtype == torch.float64
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in before)
    assert model.training and all(p.grad is None for p in model.parameters())
    clone = copy_model(model)
    assert clone.training and next(clone.parameters()).dtype == torch.float64


def test_epsilon_and_damping_errors() -> None:
    x, y = _toy_classification(10)
    model, task = tiny_mlp(dtype=torch.float64), Classification()
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ConfigurationError, match="epsilon must be a finite number > 0"):
            PBRF(model, task, [(x, y)], damping=0.1, epsilon=bad)
    pbrf = PBRF(model, task, [(x, y)], damping=0.1)
    with pytest.raises(ConfigurationError, match="epsilon must be"):
        pbrf.response((x[:1], y[:1]), queries=[(x, y)], epsilon=-1.0)
    with pytest.raises(ConfigurationError, match="damping must be > 0"):
        PBRF(model, task, [(x, y)], damping=0.0)
    with pytest.raises(ConfigurationError, match="exactly one of queries"):
        pbrf.response((x[:1], y[:1]))
    with pytest.raises(ConfigurationError, match="optimizer must be"):
        PBRF(model, task, [(x, y)], damping=0.1, optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="queries is empty"):
        query_loss_measurement(task, [])


@pytest.mark.parametrize("optimizer", ["lbfgs", "newton_cg"])
def test_non_convergence_is_reported_with_residual(optimizer: str) -> None:
    x, y = _toy_classification()
    model = tiny_mlp(dtype=torch.float64)
    pbrf = PBRF(model, Classification(), [(x, y)], damping=1e-3, epsilon=0.05, max_iter=1, tol=1e-12,
                optimizer=optimizer)
    with pytest.warns(RuntimeWarning, match=r"did not converge: relative gradient norm [0-9.e+-]+ \(gradient norm"):
        res = pbrf.response((x[:1], y[:1]), queries=[(x[:3], y[:3])])
    assert not res.converged
    assert res.relative_grad_norm > 1e-12 and res.grad_norm > 0
    assert [s.converged for s in res.solves] == [False, False]
    assert res.to_dict()["converged"] is False and res.to_dict()["relative_grad_norm"] == res.relative_grad_norm
    # ...and with warn=False the flag is still there (never hidden, just quiet).
    quiet = PBRF(model, Classification(), [(x, y)], damping=1e-3, epsilon=0.05, max_iter=1, tol=1e-12, warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # torch's first forward-mode product imports a module that calls the deprecated torch.jit.script: not ours
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
        assert not quiet.response((x[:1], y[:1]), queries=[(x[:3], y[:3])]).converged


class _ThreadWorld:
    """Two "ranks" as threads in one process: ``reduce_fn`` sums the ranks' tensors behind a barrier.

    Exercises exactly the contract of a data-parallel ``reduce_fn`` (every rank calls it the same number of
    times, in the same order, and gets the same sum) without spawning processes; the real ``ddp_spawn`` run is in
    ``tests/test_pbrf_callback.py``.
    """

    def __init__(self, world: int) -> None:
        import threading

        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)  # a desync fails instead of hanging
        self.lock = threading.Lock()
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world

    def reducer(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            total = torch.stack([s for s in self.slots if s is not None]).sum(0)
            self.barrier.wait()
            return total

        return reduce


def test_sharded_pbrf_equals_single_process() -> None:
    # L-BFGS only: forward-mode AD (used by the GNH products of "newton_cg") keeps a process-global dual level, so two
    # *threads* cannot run it concurrently; the real multi-process run with newton_cg is in test_pbrf_callback.py.
    optimizer = "lbfgs"
    import threading

    x, y = _toy_classification(61)  # uneven split: 31 / 30
    model = tiny_mlp(dtype=torch.float64)
    world = _ThreadWorld(2)
    out: dict[int, tuple] = {}

    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            _run(rank)
        except BaseException as exc:  # surface worker failures in the test
            errors.append(exc)
            world.barrier.abort()

    def _run(rank: int) -> None:
        lo, hi = (0, 31) if rank == 0 else (31, 61)
        pbrf = PBRF(model, Classification(), [(x[lo:hi], y[lo:hi])], damping=0.1, reduce_fn=world.reducer(rank),
                    optimizer=optimizer)  # type: ignore[arg-type]
        res = pbrf.response((x[3:4], y[3:4]), queries=[(x[:8], y[:8])])
        products = sum(s.products for s in res.solves)
        out[rank] = (res.response, pbrf.num_units, pbrf.epsilon, res.converged, pbrf.evaluations + products)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    single = pbrf_response(model, Classification(), [(x, y)], (x[3:4], y[3:4]), damping=0.1,
                           queries=[(x[:8], y[:8])], optimizer=optimizer)
    for rank in (0, 1):
        resp, units, eps, converged, reductions = out[rank]
        assert units == 61 and eps == pytest.approx(1 / 61) and converged
        torch.testing.assert_close(resp, single.response, rtol=1e-4, atol=1e-8)
        # one reduction for the unit count, then exactly one per objective evaluation and per GNH product
        assert world.calls[rank] == reductions + 1
    assert torch.equal(out[0][0], out[1][0])  # every rank took the same steps


def _fd_objective_hessian(pbrf: PBRF, example, signed_eps: float, h: float = 1e-5) -> torch.Tensor:
    """The PBO's Hessian at theta_hat by central differences of its gradient (independent of the Newton matrix)."""
    theta, P = pbrf.theta_hat, pbrf.num_params
    cols = []
    for i in range(P):
        e = torch.zeros(P, dtype=theta.dtype)
        e[i] = h
        cols.append((pbrf.objective(theta + e, example, signed_eps)[1]
                     - pbrf.objective(theta - e, example, signed_eps)[1]) / (2 * h))
    H = torch.stack(cols, 1)
    return 0.5 * (H + H.T)


def test_nonconvex_objective_is_detected_reported_and_never_worse_than_theta_hat() -> None:
    """An untrained tanh MLP, small damping, large epsilon: the PBO's Hessian at theta_hat is indefinite (checked by
    finite differences); newton_cg must say so, stop, and return a point no worse (by gradient norm) than theta_hat.
    A small epsilon with more damping is convex there and converges without the fallback."""
    x, y = _toy_classification()
    model = tiny_mlp(dtype=torch.float64)
    example = (x[:1], y[:1])
    for eps, damping, convex in [(0.5, 1e-4, False), (1e-3, 1e-2, True)]:
        pbrf = PBRF(model, Classification(), [(x, y)], damping=damping, epsilon=eps, tol=1e-6)
        for sign in (1, -1):
            lo = float(torch.linalg.eigvalsh(_fd_objective_hessian(pbrf, example, sign * eps)).min())
            assert (lo > 0) == convex, (eps, sign, lo)
        before = pbrf.nonconvex
        if convex:
            res = pbrf.response(example, queries=[(x[:3], y[:3])])
            assert res.converged and pbrf.nonconvex == before == 0, [r.relative_grad_norm for r in res.solves]
            continue
        with pytest.warns(RuntimeWarning, match="not convex"):
            res = pbrf.response(example, queries=[(x[:3], y[:3])])
        assert pbrf.nonconvex == before + 2 == pbrf.to_dict()["nonconvex_solves"] and not res.converged
        for rec in res.solves:
            assert not rec.converged and rec.relative_grad_norm <= 1.0 + 1e-12
            assert rec.iterations <= 26  # NONCONVEX_MAX_STEPS Gauss-Newton steps at most, past the first Newton try


@pytest.mark.parametrize("normalization", ["sum", "mean"])
def test_objective_at_theta_hat_equals_the_full_evaluation(normalization: str) -> None:
    """The solve's start (value 0, gradient +-eps grad l_m) costs no data pass yet equals the full objective."""
    x, y = _toy_classification()
    model = tiny_mlp(dtype=torch.float64)
    pbrf = PBRF(model, Classification(), [(x[:30], y[:30]), (x[30:], y[30:])], damping=1e-2, epsilon=0.3,
                normalization=normalization)
    example = (x[5:7], y[5:7])
    for signed in (0.3, -0.3):
        before = pbrf.evaluations
        v0, g0 = pbrf.objective_at_theta_hat(example, signed)
        assert pbrf.evaluations == before  # no data pass counted
        v, g = pbrf.objective(pbrf.theta_hat, example, signed)
        assert abs(float(v0) - float(v)) < 1e-14 and float(g0.norm()) > 0
        torch.testing.assert_close(g0, g, rtol=1e-10, atol=1e-14)
        full = loss_gradient(model, Classification(), [example]) * (2 if normalization == "sum" else 1)
        torch.testing.assert_close(g0, signed * full, rtol=1e-8, atol=1e-12)


class _Kinked(torch.nn.Module):
    """h(x) = x (w + c relu(w - a)): one parameter, the output's slope in w drops from 1 to 1 + c at w = a."""

    def __init__(self, a: float, c: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.a, self.c = a, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.w + self.c * torch.relu(self.w - self.a))


def _kinked_pbrf(a: float, c: float) -> tuple[PBRF, tuple[torch.Tensor, torch.Tensor]]:
    model = _Kinked(a, c)
    x = torch.ones(2, 1, dtype=torch.float64)
    with torch.no_grad():
        targets = model(x)  # theta_hat = 0 fits the data exactly
    pbrf = PBRF(model, Regression(), [(x, targets)], damping=0.1, epsilon=0.2)
    return pbrf, (x[:1], torch.ones(1, 1, dtype=torch.float64))


def test_newton_cg_stops_at_a_non_smooth_minimiser_instead_of_stalling() -> None:
    """Where the gradient jumps across an activation kink at the minimiser (no point has a small gradient), Newton
    steps stall; the solve must stop after STALL_STEPS of them, say why, and return a point at the kink."""
    smooth, example = _kinked_pbrf(10.0, 0.0)  # no kink on the path: the plain quadratic's minimiser
    w_smooth, rec = smooth.solve(example, 1)
    assert rec.converged and smooth.stalled == 0
    kink = 0.9 * float(w_smooth)  # kinked before the smooth minimiser, with the slope dropping to 0.1 beyond it
    pbrf, example = _kinked_pbrf(kink, -0.9)
    batch = (example[0], example[1])
    _, g_left = pbrf.objective(torch.tensor([kink - 1e-9], dtype=torch.float64), batch, pbrf.epsilon)
    _, g_right = pbrf.objective(torch.tensor([kink + 1e-9], dtype=torch.float64), batch, pbrf.epsilon)
    assert float(g_left) < -1e-3 and float(g_right) > 1e-3  # the minimiser is the kink, where no gradient is small
    with pytest.warns(RuntimeWarning, match="stalled"):
        res = pbrf.response(example, measurement=lambda m: m.w.detach().clone())
    plus = res.solves[0]
    assert pbrf.stalled >= 1 and pbrf.to_dict()["stalled_solves"] == pbrf.stalled
    assert not plus.converged and plus.relative_grad_norm <= 1.0
    assert plus.evaluations <= 40, plus.evaluations  # before the stall rule: 182 evaluations, 19 Newton steps
    assert abs(float(res.measurement_plus) - kink) <= 1e-3  # it stopped at the kink
