"""Influence at scale: cg vs pcg vs lowrank vs LiSSA on models of 10^5, 10^6 and ~1.1*10^7 parameters.

Models (float32, synthetic data, briefly trained with Adam so the curvature is not the initial one):

* ``mlp_1e5``: 784-128-10 MLP on MNIST-shaped inputs (101,770 parameters);
* ``cnn_1e6``: conv(3->32)-pool-conv(32->64)-pool-fc(4096->256)-fc(256->10) on 3x32x32 inputs (~1.07M);
* ``resnet18``: a ResNet-18-style CIFAR network (BasicBlocks 64-128-256-512, ~11.2M), 3x32x32 inputs;
* ``digits``: the 64-32-10 digits MLP (2,410 parameters, float64, 1,000 sklearn digits): lowrank self-influence
  of all 1,000 examples, timed, and its Spearman correlation with the exact self-influence.

For each model: one sketch (``compute_sketch`` over the curvature sample, timed, its products counted), then with
the same queries and the same sketch: ``cg`` and ``pcg`` query solves to the same relative residual (their
products give ``pcg_speedup``), ``lowrank`` scores for all queries plus the self-influence of all N training
examples (its gradient passes after the sketch, in training epochs, give ``scoring_epochs``), and LiSSA where
it fits the time budget. A "training epoch" is measured in the same run: forward + backward over the N examples
in batches of 64. Gradient-equivalent passes count one per-example gradient or one per-example curvature product
as one pass. Peak RSS is the process's high-water mark after each model (``ru_maxrss``).

Run: ``python benchmarks/bench_scale.py [--quick]`` (quick: smaller N, sample, queries and rank; the ResNet is
measured with sketch + lowrank + a capped pcg only). ``--n/--queries/--pool/--rank/--chunk/--methods`` override
the chosen specs, e.g. the ResNet's scoring cost at 100 queries without the capped pcg:
``--quick --models resnet18 --n 640 --queries 100 --chunk 32 --methods lowrank``. Prints a table, then one JSON
line with ``pcg_speedup``,
``scoring_epochs``, ``sketch_products`` (dicts per model) and the rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.data import DataSource
from lightning_influence.influence import influence_scores
from lightning_influence.operators import GNHOperator
from lightning_influence.solvers import compute_sketch, lowrank_self_influence
from lightning_influence.tasks import Classification


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = nn.GroupNorm(8, cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = nn.GroupNorm(8, cout)
        self.skip = nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(8, cout))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.n1(self.c1(x)))
        return torch.relu(self.n2(self.c2(h)) + self.skip(x))


def resnet18(width: int = 64) -> nn.Module:
    """ResNet-18 for 32x32 inputs (GroupNorm instead of BatchNorm: per-example gradients stay per-example)."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.GroupNorm(8, width), nn.ReLU()]
    cin = width
    for i, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        layers += [_Block(cin, cout, 1 if i == 0 else 2), _Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "mlp_1e5":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 10)), (1, 28, 28)
    if name == "cnn_1e6":
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(4096, 256), nn.ReLU(), nn.Linear(256, 10)), (3, 32, 32)
    return resnet18(), (3, 32, 32)


def synthetic(n: int, shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    w = torch.randn(x[0].numel(), 10, generator=g)
    y = (x.flatten(1) @ w + 3.0 * torch.randn(n, 10, generator=g)).argmax(1)
    return x, y


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> float:
    """A few Adam steps; returns the seconds of one epoch (forward + backward over x in batches of 64)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for s in range(steps):
        i = torch.arange(s * 64, (s + 1) * 64) % x.shape[0]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    t = time.perf_counter()
    for i in range(0, x.shape[0], 64):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
    opt.zero_grad()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - t


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _row(model: str, method: str, res: Any, seconds: float, n: int, epoch: float, **extra: Any) -> dict[str, Any]:
    d = res.diagnostics
    return {"model": model, "method": method, "seconds": seconds, "epochs_time": seconds / epoch,
            "products": d["example_curvature_products"], "gradients": d["example_gradients"],
            "grad_equiv_epochs": d["gradient_equivalents"] / n, "iterations": res.solve["iterations"],
            "residual": res.solve["relative_residual"], "rss_mb": rss_mb(), **extra}


def bench_model(name: str, spec: dict[str, Any], args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict]:
    model, shape = build(name)
    n, nq, pool, rank = spec["n"], spec["queries"], spec["pool"], spec["rank"]
    x, y = synthetic(n + nq, shape, seed=1)
    epoch = train(model, x[:n], y[:n], spec["steps"])
    P = sum(p.numel() for p in model.parameters())
    train_set, query = (x[:n], y[:n]), (x[n:], y[n:])
    cur = list(range(pool))
    common: dict[str, Any] = {"damping": spec["damping"], "curvature_indices": cur, "chunk_size": spec["chunk"],
                              "batch_size": spec["chunk"], "cg_rtol": spec["rtol"], "cg_max_iter": spec["max_iter"]}
    op = GNHOperator(model, Classification(), DataSource(torch.utils.data.TensorDataset(*train_set), cur,
                                                         batch_size=spec["chunk"]))
    t = time.perf_counter()
    sk = compute_sketch(op, rank=rank, oversample=spec["oversample"], iterations=spec["iterations"],
                        trace_probes=spec["trace_probes"])
    sketch_s = time.perf_counter() - t
    sketch_ex = op.example_products
    info = {"num_params": P, "n_train": n, "queries": nq, "pool": pool, "rank": rank, "epoch_seconds": epoch,
            "sketch_seconds": sketch_s, "sketch_products": sk.num_products, "sketch_example_products": sketch_ex,
            "sketch_epochs": sketch_ex / n, "trace_fraction": sk.captured_trace_fraction}
    rows = []
    qidx = list(range(nq))
    for method in spec["methods"]:
        kw = dict(common)
        kw["self_influence"] = method == "lowrank"
        if method == "lissa":
            kw.update(lissa_max_steps=spec.get("lissa_steps", 2000), lissa_chains=1, lissa_on_divergence="warn",
                      lissa_measure_constant=False, lissa_certificate_size=0)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = influence_scores(model, Classification(), train_set, query, solver=method, query_indices=qidx,
                                   sketch=sk if method in ("pcg", "lowrank") else None, **kw)
        rows.append(_row(name, method, res, time.perf_counter() - t, n, epoch))
        print(f"{name:>9} {method:>8} {P:>9} {rows[-1]['seconds']:>8.1f}s {rows[-1]['products']:>11.0f} "
              f"{rows[-1]['grad_equiv_epochs']:>8.2f} {rows[-1]['epochs_time']:>8.2f} {rows[-1]['iterations']:>5} "
              f"{rows[-1]['residual']:>9.2e} {rows[-1]['rss_mb']:>8.0f}", flush=True)
    by = {r["method"]: r for r in rows}
    if "cg" in by and "pcg" in by:
        info["pcg_speedup"] = by["cg"]["products"] / max(by["pcg"]["products"], 1)
        info["cg_residual"], info["pcg_residual"] = by["cg"]["residual"], by["pcg"]["residual"]
    if "lowrank" in by:  # queries + self-influence of all N after the sketch, in training epochs (wall time)
        info["scoring_epochs"] = by["lowrank"]["seconds"] / epoch
        info["scoring_gradient_epochs"] = by["lowrank"]["gradients"] / n
    return rows, info


def bench_digits(args: argparse.Namespace) -> dict[str, Any]:
    from scipy.stats import spearmanr
    from sklearn.datasets import load_digits

    from lightning_influence.influence import per_example_gradients

    xs, ys = load_digits(return_X_y=True)
    x = torch.tensor((xs - xs.mean(0)) / (xs.std(0) + (xs.std(0) == 0)), dtype=torch.float64)[:1000]
    y = torch.tensor(ys)[:1000]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    lam = 1e-2
    t = time.perf_counter()
    res = influence_scores(model, Classification(), (x, y), (x[:1], y[:1]), solver="lowrank", damping=lam,
                           chunk_size=250, batch_size=250, self_influence=True)
    lowrank_s = time.perf_counter() - t
    op = GNHOperator(model, Classification(), [(x[i : i + 250], y[i : i + 250]) for i in range(0, 1000, 250)])
    G = op.dense()
    grads = per_example_gradients(model, Classification(), (x, y))
    ev, U = torch.linalg.eigh(G)
    exact = ((grads @ U) ** 2 / (ev + lam)).sum(1)
    assert res.self_influence is not None
    rho = float(spearmanr(res.self_influence.numpy(), exact.numpy()).statistic)
    sk = compute_sketch(op, rank=32, trace_probes=0)
    t = time.perf_counter()
    lowrank_self_influence(sk, grads, damping=lam)
    apply_s = time.perf_counter() - t
    out = {"num_params": int(G.shape[0]), "seconds_total": lowrank_s, "spearman": rho,
           "seconds_sketch_apply_only": apply_s, "sketch": res.diagnostics["sketch"]}
    print(f"   digits lowrank self-influence of 1000: {lowrank_s:.2f}s total (sketch included), "
          f"{apply_s:.3f}s given the sketch and gradients; Spearman vs exact {rho:.4f}", flush=True)
    return out


def specs(quick: bool) -> dict[str, dict[str, Any]]:
    if quick:
        return {
            "mlp_1e5": {"n": 500, "queries": 20, "pool": 200, "rank": 32, "oversample": 10, "iterations": 3,
                        "trace_probes": 8, "steps": 30, "chunk": 50, "damping": 1e-3, "rtol": 1e-4,
                        "max_iter": 300, "methods": ("cg", "pcg", "lowrank", "lissa"), "lissa_steps": 300},
            "cnn_1e6": {"n": 200, "queries": 10, "pool": 50, "rank": 128, "oversample": 10, "iterations": 3,
                        "trace_probes": 4, "steps": 10, "chunk": 25, "damping": 1e-3, "rtol": 1e-4,
                        "max_iter": 150, "methods": ("cg", "pcg", "lowrank")},
            "resnet18": {"n": 40, "queries": 4, "pool": 8, "rank": 8, "oversample": 4, "iterations": 2,
                         "trace_probes": 2, "steps": 2, "chunk": 4, "damping": 1e-3, "rtol": 1e-3,
                         "max_iter": 10, "methods": ("pcg", "lowrank")},
        }
    return {
        "mlp_1e5": {"n": 5000, "queries": 100, "pool": 1000, "rank": 64, "oversample": 10, "iterations": 3,
                    "trace_probes": 16, "steps": 100, "chunk": 100, "damping": 1e-3, "rtol": 1e-6,
                    "max_iter": 1000, "methods": ("cg", "pcg", "lowrank", "lissa"), "lissa_steps": 3000},
        "cnn_1e6": {"n": 5000, "queries": 100, "pool": 500, "rank": 64, "oversample": 10, "iterations": 3,
                    "trace_probes": 8, "steps": 50, "chunk": 50, "damping": 1e-3, "rtol": 1e-6,
                    "max_iter": 1000, "methods": ("cg", "pcg", "lowrank")},
        "resnet18": {"n": 5000, "queries": 100, "pool": 100, "rank": 32, "oversample": 10, "iterations": 2,
                     "trace_probes": 4, "steps": 10, "chunk": 16, "damping": 1e-3, "rtol": 1e-4,
                     "max_iter": 100, "methods": ("pcg", "lowrank")},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="mlp_1e5,cnn_1e6,resnet18,digits")
    for key in ("n", "queries", "pool", "rank", "chunk"):
        parser.add_argument(f"--{key}", type=int, default=None, help=f"override every model's {key}")
    parser.add_argument("--methods", default=None, help="override every model's methods (comma-separated)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':>9} {'method':>8} {'P':>9} {'wall':>9} {'products':>11} {'gr-ep':>8} {'t-ep':>8} {'iter':>5} "
          f"{'residual':>9} {'rssMB':>8}")
    rows: list[dict[str, Any]] = []
    infos: dict[str, Any] = {}
    for name, spec in specs(args.quick).items():
        if name not in args.models.split(","):
            continue
        spec.update({k: getattr(args, k) for k in ("n", "queries", "pool", "rank", "chunk")
                     if getattr(args, k) is not None})
        if args.methods:
            spec["methods"] = tuple(args.methods.split(","))
        r, info = bench_model(name, spec, args)
        rows += r
        infos[name] = info
        print(f"{name:>9} sketch: {info['sketch_products']} products ({info['sketch_epochs']:.2f} epochs of "
              f"per-example products, {info['sketch_seconds']:.1f}s), trace fraction {info['trace_fraction']}, "
              f"epoch {info['epoch_seconds']:.2f}s", flush=True)
    digits = bench_digits(args) if "digits" in args.models.split(",") else None
    print(json.dumps({
        "quick": args.quick,
        "pcg_speedup": {k: v.get("pcg_speedup") for k, v in infos.items()},
        "scoring_epochs": {k: v.get("scoring_epochs") for k, v in infos.items()},
        "sketch_products": {k: v["sketch_products"] for k, v in infos.items()},
        "models": infos, "digits": digits, "rows": rows,
    }, default=float))


if __name__ == "__main__":
    main()
