"""Influence for 1,000 training x 100 query examples on a digits MLP: Fisher-CG vs auto-tuned LiSSA vs exact.

Trains a 64-32-10 tanh MLP (2,410 parameters, float64) on 1,000 sklearn digits, then computes the
(100 x 1,000) influence matrix :math:`-\\nabla\\ell(q)^\\top (G+\\lambda I)^{-1}\\nabla\\ell(z)` with

* ``exact``: dense GNH from per-example Jacobians, eigendecomposition (the reference);
* ``cg``: Fisher-CG on the whole training set (relative residual 1e-6), the 100 query gradients as one block;
* ``lissa``: LiSSA with settings measured on the spot (trace, lambda_max -> eta, |B|, T), tail averaging,
  divergence guard with restarts; ``lissa_4T``: the same eta and |B| with four times the steps (about CG's time);
* ``gradient_dot``: the curvature-free baseline.

For each it reports seconds, gradient-equivalents (per-example gradients + per-example curvature products; a GNH
product of one example costs about one gradient) and the Pearson correlation of the scores with ``exact``
(overall and the median over queries). The seconds are also stated as ratios to the time of one pass of
per-example gradients over the 1,000 training examples, measured in the same run.

torch-influence (for a comparison with its LiSSA at default settings) is not installable here:
``pip download --no-deps torch-influence`` finds no distribution on the reachable index, so that comparison is
not made.

Run: ``python benchmarks/bench_influence.py [--damping 1e-2] [--threads 1]``. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from torch import Tensor, nn


def train_mlp(x: Tensor, y: Tensor, hidden: int, steps: int, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 1e-4 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model


def pearson(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-query", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sklearn.datasets import load_digits

    from lightning_influence.influence import gradient_dot_scores, influence_scores, per_example_gradients
    from lightning_influence.tasks import Classification

    xs, ys = load_digits(return_X_y=True)
    x = torch.tensor(xs, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    y = torch.tensor(ys)
    train = (x[: args.n_train], y[: args.n_train])
    query = (x[-args.n_query :], y[-args.n_query :])
    model = train_mlp(*train, hidden=args.hidden, steps=300, seed=0)
    task = Classification()
    p = sum(t.numel() for t in model.parameters())

    start = time.perf_counter()
    per_example_gradients(model, task, train, chunk_size=128)
    grad_pass = time.perf_counter() - start

    rows: dict[str, dict[str, float]] = {}
    common = {"damping": args.damping, "self_influence": False, "chunk_size": 128}
    ref = None
    for solver in ("exact", "cg", "lissa"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = influence_scores(model, task, train, query, solver=solver, **common)
        if ref is None:
            ref = r.scores
        per_query = [pearson(r.scores[i], ref[i]) for i in range(ref.shape[0])]
        info = r.solve.get("info", {})
        rows[solver] = {
            "seconds": r.diagnostics["seconds"],
            "seconds_per_gradient_pass": r.diagnostics["seconds"] / grad_pass,
            "gradient_equivalents": r.diagnostics["gradient_equivalents"],
            "pearson_vs_exact": pearson(r.scores, ref),
            "median_query_pearson_vs_exact": statistics.median(per_query),
            "iterations": r.solve["iterations"],
            "relative_residual": r.solve["relative_residual"],
            "lissa_batch_size": info.get("batch_size"),
            "lissa_eta": info.get("eta"),
            "lissa_steps": info.get("steps"),
            "lissa_restarts": len(info.get("restarts", [])) if solver == "lissa" else None,
            "warnings": len(caught),
        }
    # LiSSA given about CG's time: 4x the steps at the same eta and batch, averaging the second half
    lis = rows["lissa"]
    r = influence_scores(model, task, train, query, solver="lissa", lissa_eta=lis["lissa_eta"],
                         lissa_batch_size=lis["lissa_batch_size"], lissa_steps=4 * int(lis["lissa_steps"]), **common)
    rows["lissa_4T"] = {
        "seconds": r.diagnostics["seconds"], "seconds_per_gradient_pass": r.diagnostics["seconds"] / grad_pass,
        "gradient_equivalents": r.diagnostics["gradient_equivalents"], "pearson_vs_exact": pearson(r.scores, ref),
        "median_query_pearson_vs_exact": statistics.median([pearson(r.scores[i], ref[i]) for i in range(len(ref))]),
        "iterations": r.solve["iterations"], "relative_residual": r.solve["relative_residual"],
    }
    start = time.perf_counter()
    gd = gradient_dot_scores(model, task, train, query, chunk_size=128)
    rows["gradient_dot"] = {"seconds": time.perf_counter() - start, "pearson_vs_exact": pearson(gd, ref),
                            "median_query_pearson_vs_exact": statistics.median(
                                [pearson(gd[i], ref[i]) for i in range(ref.shape[0])]),
                            "gradient_equivalents": float(args.n_train + args.n_query)}
    rows["gradient_dot"]["seconds_per_gradient_pass"] = rows["gradient_dot"]["seconds"] / grad_pass

    print(f"digits MLP, P={p}, {args.n_train} train x {args.n_query} queries, damping={args.damping}, "
          f"one per-example gradient pass over the training set: {grad_pass:.2f} s")
    print(f"{'solver':<13}{'seconds':>9}{'x grad pass':>12}{'grad-equiv':>12}{'pearson':>9}{'med q':>8}{'iters':>7}")
    for name, row in rows.items():
        print(f"{name:<13}{row['seconds']:>9.2f}{row['seconds_per_gradient_pass']:>12.1f}"
              f"{row['gradient_equivalents']:>12.0f}{row['pearson_vs_exact']:>9.4f}"
              f"{row['median_query_pearson_vs_exact']:>8.4f}{row.get('iterations') or '':>7}")
    print(json.dumps({"benchmark": "influence", "num_params": p, "n_train": args.n_train, "n_query": args.n_query,
                      "damping": args.damping, "gradient_pass_seconds": grad_pass, "solvers": rows,
                      "torch_influence": "not installable (no distribution on the reachable index)"}))


if __name__ == "__main__":
    main()
