"""``solver="pcg"`` of the AFIF CV: one full-data sketch preconditions every fold's solve (issue 15).

Ground truth: the dense solve of the same damped systems, and CG; the estimate must agree with both while the
curvature products drop.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_influence.config import CVConfig
from lightning_influence.cv import approximate_cv, kfold_indices, make_fold_batches
from lightning_influence.tasks import Classification


def _mlp_problem() -> tuple[nn.Module, list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """A 195-parameter float64 tanh MLP (8-16-3) trained by L-BFGS on 200 synthetic examples, 5 folds."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    w = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(x @ w, 1), 1, generator=g).squeeze(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 1e-3 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model, make_fold_batches(list(zip(x, y, strict=True)), kfold_indices(200, 5, seed=0), batch_size=64)


def test_pcg_equals_cg_and_dense_with_fewer_products() -> None:
    model, folds = _mlp_problem()
    task = Classification()
    kw = {"damping": 1e-3, "dense_max_params": 100, "cg_rtol": 1e-12}
    dense = approximate_cv(model, task, folds, solver="dense", **kw)
    cg = approximate_cv(model, task, folds, solver="cg", **kw)
    pcg = approximate_cv(model, task, folds, solver="pcg", **kw)
    assert pcg.config["solver"] == "pcg"
    assert all(f.certificate["solve"]["converged"] for f in pcg.folds + cg.folds)
    for other in (dense, cg):
        assert abs(pcg.estimate - other.estimate) <= 1e-6 * abs(other.estimate)
        for fp, fo in zip(pcg.folds, other.folds, strict=True):
            assert abs(fp.held_out_loss - fo.held_out_loss) <= 1e-6 * abs(fo.held_out_loss)
    assert pcg.cost.fisher_product_examples < cg.cost.fisher_product_examples
    # the one sketch is counted: its products over all 200 examples
    assert pcg.cost.fisher_product_examples >= CVConfig().sketch_config(195).num_products * 200


def test_auto_picks_pcg_past_the_dense_limit() -> None:
    model, folds = _mlp_problem()
    task = Classification()
    auto = approximate_cv(model, task, folds, dense_max_params=100)
    assert auto.config["solver"] == "pcg"
    damping = {f.certificate["damping"] for f in auto.folds}
    assert len(damping) == 1 and next(iter(damping)) > 0  # one lambda_max (the sketch's) for every fold
    assert all(f.certificate["solve"]["converged"] for f in auto.folds)
    dense = approximate_cv(model, task, folds, solver="dense", damping=next(iter(damping)))
    assert abs(auto.estimate - dense.estimate) <= 1e-6 * abs(dense.estimate)
    assert approximate_cv(model, task, folds, dense_max_params=1000).config["solver"] == "dense"


def test_auto_with_a_fixed_zero_damping_runs_plain_cg() -> None:
    # the Nystrom preconditioner needs damping > 0: "auto" past the dense limit falls back to CG, as before "pcg"
    model, folds = _mlp_problem()
    task = Classification()
    # (this MLP's Fisher is singular, so there is no dense damping-0 reference: the explicit CG run is the reference)
    kw = {"damping": 0.0, "cg_rtol": 1e-12, "cg_max_iter": 50}
    auto = approximate_cv(model, task, folds, dense_max_params=100, **kw)  # raised ConfigurationError before
    cg = approximate_cv(model, task, folds, solver="cg", **kw)
    assert auto.config["solver"] == "cg"
    assert auto.estimate == cg.estimate
    assert auto.cost.fisher_product_examples == cg.cost.fisher_product_examples


def test_float32_auto_damping_is_not_raised_for_the_dtype() -> None:
    # A float32 solve cannot certify rtol=1e-10 (its true residual stalls near 1e-7..1e-6): CG runs to the
    # dtype's floor (10 machine epsilons) and says so, instead of reading "not converged" and the auto rule then
    # raising the damping tenfold twice (what float32 fold solves did before the floor).
    model, folds = _mlp_problem()
    task = Classification()
    model32 = model.float()
    folds32 = [[(x.float(), y) for x, y in fold] for fold in folds]
    auto = approximate_cv(model32, task, folds32, dense_max_params=100, cg_rtol=1e-10)
    assert auto.config["solver"] == "pcg"
    damping = {f.certificate["damping"] for f in auto.folds}
    assert len(damping) == 1
    lam = next(iter(damping))
    for f in auto.folds:
        solve = f.certificate["solve"]
        assert solve["converged"], solve
        assert solve["info"]["rtol_requested"] == 1e-10
        assert abs(solve["info"]["rtol"] - 10 * torch.finfo(torch.float32).eps) < 1e-12
        assert solve["relative_residual"] <= 10 * solve["info"]["rtol"]
    # ground truth: the float64 dense solve at the same damping; float32 round-off only
    dense = approximate_cv(model.double(), task, folds, solver="dense", damping=lam)
    assert abs(auto.estimate - dense.estimate) <= 1e-4 * abs(dense.estimate)


def test_sketch_settings_come_from_the_config() -> None:
    # CVConfig.sketch_rank / sketch_iterations set pcg's one sketch: its products are counted, the answer is the
    # same (the preconditioner changes the path, not the solution)
    model, folds = _mlp_problem()
    task = Classification()
    kw = {"solver": "pcg", "damping": 1e-3, "cg_rtol": 1e-12}
    small = approximate_cv(model, task, folds, sketch_rank=8, sketch_iterations=2, **kw)
    default = approximate_cv(model, task, folds, **kw)
    assert CVConfig(sketch_rank=8, sketch_iterations=2).sketch_config(195).num_products == 36
    assert small.cost.fisher_product_examples >= 36 * 200
    iters = [sum(f.certificate["solve"]["iterations"] for f in r.folds) for r in (small, default)]
    assert iters[0] > iters[1]  # a rank-8 sketch preconditions worse than the default rank 64
    assert abs(small.estimate - default.estimate) <= 1e-6 * abs(default.estimate)
