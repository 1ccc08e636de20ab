"""Reproduce paper 1's Figure 1 in spirit: auto-tuned LiSSA influence vs the PBRF on a model that trains here.

A tanh MLP is trained on sklearn's 8x8 digits (float64). For ``--num-train`` random training examples and
``--num-queries`` held-out queries we compute

* the LiSSA influence :math:`I(z, q) = -\\nabla\\ell(q)^\\top (G+\\lambda)^{-1}\\nabla\\ell(z)` with the settings
  derived from the spectrum (``influence_scores(solver="lissa")``, paper 1 Table 1 / Thm. 1), and
* the PBRF response of every query loss to upweighting the training example (``lightning_influence.pbrf``,
  L-BFGS on the proximal Bregman objective in float64, central difference at ±ε),

and draw one scatter panel per training example (x = LiSSA, y = PBRF, dashed line y = x), like the paper's
Figure 1 / Figures 6-7. Each training example is put in one of the paper's three cases:

* **near zero**: both responses are small — RMS of the PBRF and of LiSSA over the queries below
  ``--zero-frac`` (default 0.1) times the median over training examples of the PBRF RMS;
* **agree**: otherwise, if Pearson ≥ ``--agree-pearson`` (0.9) and the relative error
  ``||LiSSA - PBRF|| / ||PBRF||`` ≤ ``--agree-relerr`` (0.3): the points lie along y = x;
* **disagree**: everything else (both large, not along y = x).

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/repro_pbrf_fig1.py            # writes docs/figures/pbrf_fig1.png

Prints the per-example table, the case counts and the overall correlations. Measured with the defaults
(64-32-10 MLP, 2410 parameters, 60 Adam steps, N = 1000, λ = 1e-3, ε = 1/N, 12 training examples × 200 queries;
LiSSA settings from the spectrum: η = 3.84, |B| = 71, T = 521): agree 11, near zero 0, disagree 1 (train #375,
Pearson 0.938 but relative error 0.57); overall Pearson vs PBRF: LiSSA 0.949, gradient-dot 0.434. PBRF (24
Gauss-Newton-CG solves, all converged, worst relative gradient norm 1e-5) took 136 s on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def main() -> None:
    """Train, compute LiSSA and PBRF, classify, plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-train", type=int, default=12)
    ap.add_argument("--num-queries", type=int, default=200)
    ap.add_argument("--train-size", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60, help="full-batch Adam steps")
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--epsilon", type=float, default=None, help="PBO epsilon (default 1/N)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zero-frac", type=float, default=0.1)
    ap.add_argument("--agree-pearson", type=float, default=0.9)
    ap.add_argument("--agree-relerr", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/figures/pbrf_fig1.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.datasets import load_digits

    from lightning_influence.influence import gradient_dot_scores, influence_scores
    from lightning_influence.operators import make_batches
    from lightning_influence.params import make_generator
    from lightning_influence.pbrf import PBRF
    from lightning_influence.tasks import Classification

    x_np, y_np = load_digits(return_X_y=True)
    x = torch.tensor(x_np, dtype=torch.float64)
    x = (x - x.mean(0)) / torch.where(x.std(0) > 0, x.std(0), torch.ones_like(x[0]))
    y = torch.tensor(y_np, dtype=torch.int64)
    gen = make_generator(args.seed)
    perm = torch.randperm(len(y), generator=gen)
    tr, te = perm[: args.train_size], perm[args.train_size :]
    xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, args.hidden), torch.nn.Tanh(),
                                    torch.nn.Linear(args.hidden, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(args.steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xtr), ytr)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).double().mean())
        train_loss = float(torch.nn.functional.cross_entropy(model(xtr), ytr))
    p = sum(t.numel() for t in model.parameters())
    print(f"model: 64-{args.hidden}-10 tanh MLP, {p} params, {args.steps} Adam steps; train loss {train_loss:.3f}, "
          f"test acc {acc:.3f}; N = {len(ytr)}")

    task = Classification()
    train_sel = torch.randperm(len(ytr), generator=gen)[: args.num_train]
    query_sel = torch.randperm(len(yte), generator=gen)[: args.num_queries]

    t0 = time.perf_counter()
    lissa = influence_scores(model, task, (xtr, ytr), (xte, yte), solver="lissa", damping=args.damping,
                             train_indices=train_sel, query_indices=query_sel, self_influence=False, seed=args.seed)
    t_lissa = time.perf_counter() - t0
    info = json.dumps(lissa.solve.get("info", {}), default=str)[:400]
    print(f"LiSSA: {t_lissa:.1f}s, iterations {lissa.solve['iterations']}, converged {lissa.solve['converged']}, "
          f"diverged {lissa.solve['diverged']}, relative residual {lissa.solve['relative_residual']:.3g}; {info}")
    gdot = gradient_dot_scores(model, task, (xtr, ytr), (xte, yte), train_indices=train_sel, query_indices=query_sel)

    t0 = time.perf_counter()
    pbrf = PBRF(model, task, make_batches(torch.utils.data.TensorDataset(xtr, ytr), batch_size=len(ytr)),
                damping=args.damping, epsilon=args.epsilon)
    queries = make_batches(torch.utils.data.TensorDataset(xte, yte), query_sel, batch_size=len(query_sel))
    examples = [(xtr[i : i + 1], ytr[i : i + 1]) for i in train_sel.tolist()]
    resp, results = pbrf.responses(examples, queries=queries)
    t_pbrf = time.perf_counter() - t0
    print(f"PBRF: {t_pbrf:.1f}s, epsilon {pbrf.epsilon:.3g}, damping {args.damping}, optimizer {pbrf.optimizer}, "
          f"all converged {all(r.converged for r in results)}, worst relative grad norm "
          f"{max(r.relative_grad_norm for r in results):.2g}")

    L = lissa.scores.T.double()  # (num_train, num_queries)
    G = gdot.T.double()
    R = resp
    rms_r = R.pow(2).mean(1).sqrt()
    rms_l = L.pow(2).mean(1).sqrt()
    scale = float(rms_r.median())

    def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
        if float(a.std()) == 0 or float(b.std()) == 0:
            return math.nan
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    cases = []
    print(f"\n{'train':>6} {'label':>5} {'rms PBRF':>9} {'rms LiSSA':>9} {'pearson':>8} {'relerr':>7}  case")
    for i in range(len(train_sel)):
        pr = pearson(L[i], R[i])
        rel = float((L[i] - R[i]).norm() / R[i].norm().clamp_min(1e-300))
        if float(rms_r[i]) < args.zero_frac * scale and float(rms_l[i]) < args.zero_frac * scale:
            case = "near zero"
        elif pr >= args.agree_pearson and rel <= args.agree_relerr:
            case = "agree"
        else:
            case = "disagree"
        cases.append(case)
        print(f"{int(train_sel[i]):>6} {int(ytr[train_sel[i]]):>5} {float(rms_r[i]):9.3g} {float(rms_l[i]):9.3g} "
              f"{pr:8.3f} {rel:7.3f}  {case}")
    counts = {c: cases.count(c) for c in ("agree", "near zero", "disagree")}
    overall = {"lissa": pearson(L, R), "gradient_dot": pearson(G, R)}
    print(f"\ncases: {counts} (thresholds: near zero = both RMS < {args.zero_frac} x median PBRF RMS "
          f"({args.zero_frac * scale:.3g}); agree = Pearson >= {args.agree_pearson} and relative error <= "
          f"{args.agree_relerr})")
    print(f"overall Pearson vs PBRF: LiSSA {overall['lissa']:.3f}, gradient-dot {overall['gradient_dot']:.3f}")

    cols = 4
    rows = math.ceil(len(train_sel) / cols)
    fig, axes = plt.subplots(rows + 1, cols, figsize=(3.0 * cols, 3.0 * (rows + 1)),
                             gridspec_kw={"height_ratios": [0.8] + [1.0] * rows})
    colors = {"agree": "C2", "near zero": "C7", "disagree": "C3"}
    for j in range(cols):
        axes[0, j].axis("off")
    for k in range(min(cols, len(train_sel))):  # first row: the first training images, like the paper
        axes[0, k].imshow(xtr[train_sel[k]].reshape(8, 8).numpy(), cmap="gray_r")
        axes[0, k].set_title(f"train #{int(train_sel[k])} (label {int(ytr[train_sel[k]])})", fontsize=8)
    for i in range(rows * cols):
        ax = axes[1 + i // cols, i % cols]
        if i >= len(train_sel):
            ax.axis("off")
            continue
        lx, ry = L[i].numpy(), R[i].numpy()
        ax.scatter(lx, ry, s=6, alpha=0.6, color=colors[cases[i]])
        lo, hi = min(lx.min(), ry.min()), max(lx.max(), ry.max())
        ax.plot([lo, hi], [lo, hi], ls="--", lw=0.8, color="0.3")
        ax.set_title(f"#{int(train_sel[i])}: {cases[i]} (r={pearson(L[i], R[i]):.2f})", fontsize=8)
        ax.tick_params(labelsize=6)
        if i % cols == 0:
            ax.set_ylabel("PBRF", fontsize=8)
        if i // cols == rows - 1:
            ax.set_xlabel("LiSSA influence", fontsize=8)
    fig.suptitle(f"LiSSA vs PBRF, digits MLP ({p} params), λ={args.damping}, ε={pbrf.epsilon:.2g}; "
                 f"agree {counts['agree']}, near zero {counts['near zero']}, disagree {counts['disagree']}",
                 fontsize=9)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
