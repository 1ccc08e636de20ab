"""Where ``solver="auto"`` should switch from the exact dense solve to ``"pcg"``: both timed on MLPs of growing size.

For 64-h-10 tanh MLPs (float64, digits-like random data, briefly trained) with ``P`` from about 160 to 3,000
parameters, it times :func:`~lightning_influence.influence.influence_scores` with ``solver="exact"`` (dense GNH from
per-example Jacobians + eigendecomposition, cost ~ ``N * outputs`` gradient passes + ``P^3``) and ``solver="pcg"``
(sketch + preconditioned CG to rtol 1e-6), same data, 20 queries, no self-influence, interleaved, median of the
repeats. The threshold is the largest ``P`` at which ``exact`` is no slower than ``pcg`` (the exact answer is also
certified to round-off, so it is preferred on a tie). ``AUTO_EXACT_MAX_PARAMS`` in ``config.py`` records it.

Run: ``python benchmarks/bench_solver_thresholds.py [--quick]``. Prints a table, then one JSON line
(``threshold_params``, ``rows``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from lightning_influence.influence import influence_scores
from lightning_influence.tasks import Classification


def _model(hidden: int, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hiddens", default=None, help="comma-separated hidden widths (default 2,5,10,20,40,80,150)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hiddens = [2, 10, 30] if args.quick else [2, 5, 10, 20, 40, 80, 150]
    if args.hiddens:
        hiddens = [int(h) for h in args.hiddens.split(",")]
    n = 200 if args.quick else args.n_train
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g, dtype=torch.float64)
    y = (x[:, :10] + 0.5 * torch.randn(n, 10, generator=g, dtype=torch.float64)).argmax(1)
    rows = []
    print(f"{'P':>6} {'exact s':>9} {'pcg s':>9} {'ratio':>7}")
    for h in hiddens:
        model = _model(h, x, y)
        P = sum(p.numel() for p in model.parameters())
        times: dict[str, list[float]] = {"exact": [], "pcg": []}
        for _ in range(args.repeats):
            for solver in ("exact", "pcg"):
                t = time.perf_counter()
                influence_scores(model, Classification(), (x, y), (x[:20], y[:20]), solver=solver, damping=1e-2,
                                 self_influence=False, sketch_rank=32, sketch_trace_probes=0)
                times[solver].append(time.perf_counter() - t)
        te, tp = statistics.median(times["exact"]), statistics.median(times["pcg"])
        rows.append({"num_params": P, "exact_seconds": te, "pcg_seconds": tp, "exact_over_pcg": te / tp})
        print(f"{P:>6} {te:>9.2f} {tp:>9.2f} {te / tp:>7.2f}")
    faster = [r["num_params"] for r in rows if r["exact_over_pcg"] <= 1.0]
    print(json.dumps({"threshold_params": max(faster) if faster else 0, "n_train": n, "rows": rows}))


if __name__ == "__main__":
    main()
