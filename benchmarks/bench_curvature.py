"""Cost of one curvature product relative to one gradient, measured in one run (issue 3 benchmark).

For three small models (digits MLP, a CNN on 8x8 digit images, a character transformer LM) this times, on the
same batch:

* ``grad``: one gradient of the mean loss with plain autograd (``loss.backward``), what a training step pays;
* ``gnh``: one GNH product (:class:`GNHOperator.matvec`: forward-mode tangent on the primal pass + one backward);
* ``gnh_ref``: the textbook torch.func ``jvp`` then ``vjp`` product (two forward passes);
* ``fd``: one finite-difference GNH product (paper 1, App. D);
* ``hessian``: one true Hessian product (forward-over-reverse);
* ``trace_probe``: one Hutchinson quadratic form vᵀGv (forward mode only);
* ``trace_probe_batched``: per-probe cost when 16 probes share one vectorised pass.

Timings are medians over interleaved repeats, so background load affects every entry alike. Prints a table and,
last, one JSON line with the ratios to ``grad``. Goal: gnh <= 1.5x (stretch 1.35x), trace probe <= 1.0x.

Run: ``python benchmarks/bench_curvature.py [--repeats 30] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.operators import (
    FiniteDifferenceGNHOperator,
    GNHOperator,
    HessianOperator,
    gnh_product_reference,
)
from lightning_influence.tasks import Classification, LanguageModeling, Task


class CharTransformer(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 64, heads: int = 4, length: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        self.block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.triu(torch.full((length, length), float("-inf")), 1), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        return self.head(self.block(self.emb(ids) + self.pos[:t], src_mask=self.mask[:t, :t], is_causal=True))


def cases() -> list[tuple[str, nn.Module, Task, object, Callable[[nn.Module, object], torch.Tensor]]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / (x.std(0) + 1e-8), dtype=torch.float32)[:512]
    y = torch.tensor(y)[:512]
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10))
        cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
        lm = CharTransformer()
    ids = torch.randint(0, 64, (32, 65), generator=gen)

    def ce(model: nn.Module, batch: object) -> torch.Tensor:
        bx, by = batch  # type: ignore[misc]
        return F.cross_entropy(model(bx), by)

    def lm_loss(model: nn.Module, batch: object) -> torch.Tensor:
        b = batch  # type: ignore[assignment]
        logits = model(b[:, :-1])  # type: ignore[index]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))  # type: ignore[index]

    return [
        ("digits_mlp", mlp, Classification(), (x, y), ce),
        ("digits_cnn", cnn, Classification(), (x.reshape(-1, 1, 8, 8), y), ce),
        ("char_transformer", lm, LanguageModeling(), ids, lm_loss),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, float]] = {}
    for name, model, task, batch, loss_fn in cases():
        params = [p for p in model.parameters() if p.requires_grad]
        n_params = sum(p.numel() for p in params)
        v = torch.randn(n_params, generator=torch.Generator().manual_seed(1))
        block = torch.randn(n_params, 16, generator=torch.Generator().manual_seed(2))
        gnh = GNHOperator(model, task, [batch], check_finite=False)
        fd = FiniteDifferenceGNHOperator(model, task, [batch], check_finite=False)
        hess = HessianOperator(model, task, [batch], check_finite=False)
        model.eval()

        def grad_step(model: nn.Module = model, batch: object = batch, loss_fn=loss_fn, params=params) -> None:
            torch.autograd.grad(loss_fn(model, batch), params)

        fns: dict[str, Callable[[], object]] = {
            "grad": grad_step,
            "gnh": lambda gnh=gnh, v=v: gnh.matvec(v),
            "gnh_ref": lambda model=model, task=task, batch=batch, v=v: gnh_product_reference(model, task, batch, v),
            "fd": lambda fd=fd, v=v: fd.matvec(v),
            "hessian": lambda hess=hess, v=v: hess.matvec(v),
            "trace_probe": lambda gnh=gnh, v=v: gnh.quadratic_form(v),
            "trace_probe_batched": lambda gnh=gnh, block=block: gnh.quadratic_forms(block),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for key, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
        med = {k: statistics.median(t) for k, t in times.items()}
        med["trace_probe_batched"] /= block.shape[1]
        results[name] = {"params": float(n_params), "grad_ms": med["grad"] * 1e3}
        results[name].update({k: med[k] / med["grad"] for k in fns if k != "grad"})
    header = f"{'model':18s} {'params':>8s} {'grad ms':>8s} " + " ".join(
        f"{k:>12s}" for k in ["gnh", "gnh_ref", "fd", "hessian", "trace_probe", "trace_probe_batched"]
    )
    print(header)
    for name, r in results.items():
        cols = " ".join(f"{r[k]:>11.2f}x" for k in ["gnh", "gnh_ref", "fd", "hessian", "trace_probe",
                                                     "trace_probe_batched"])
        print(f"{name:18s} {int(r['params']):>8d} {r['grad_ms']:>8.2f} {cols}")
    print(json.dumps({"benchmark": "curvature_products", "ratios_to_grad": results}))


if __name__ == "__main__":
    main()
