"""Cost of one curvature product relative to one gradient, ours and the peers', side by side in one run.

For three models (digits MLP, a CNN on 8x8 digit images, a character transformer LM) this times, on the same
batch and interleaved (every repeat runs every entry ``--burst`` times in a row, as solvers call products, so
background load affects all alike):

* ``grad``: one gradient of the mean loss with plain autograd (what a training step pays);
* ours: ``gnh`` (streamed :class:`GNHOperator` product: tangents on the primal pass + one backward),
  ``gnh_cached`` (the same with the batch's cached linearisation, :mod:`lightning_influence.operators.linearized`),
  ``hessian`` / ``hessian_cached``, ``trace_probe`` / ``trace_probe_cached`` (one forward-mode quadratic form);
* peers, when installed (``pip install lightning-influence[bench]``; a missing peer is skipped with a note):
  curvlinops ``GGNLinearOperator``, BackPACK ``ggn_vector_product_from_plist``, hessian-eigenthings
  ``GGNOperator`` (GNH products) and PyHessian's retained-graph Hessian product (reverse over reverse; ours is
  a traced forward-over-reverse map). Each peer's product is first
  checked against ours (relative error <= 1e-3 in float32); one that disagrees is reported and not timed.

Prints a table and, last, one JSON line: per model ``gnh_ratio``, ``gnh_cached_ratio``, ``hessian_ratio``,
``hessian_cached_ratio``, ``trace_probe_ratio``, ``trace_probe_cached_ratio`` and ``<peer>_ratio`` (all
relative to ``grad``: the median over repeats of the entry's time over the same repeat's gradient time). Goals:
gnh_cached <= 1.35x, trace probe <= 0.7x, Hessian <= 2x, ahead of every peer.

``--steady-malloc`` sets glibc's allocator thresholds for the process (``mallopt``: allocations up to 32 MiB from
the heap, freed memory kept up to 1 GiB), as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` or jemalloc /
tcmalloc would. With glibc's defaults every activation-sized tensor may come from a fresh ``mmap`` whose pages fault
on first touch, and whether they do depends on the allocation history: the gradient and the products alike swing
by up to a third between runs (measured: the digits CNN's gradient 14.6-20.2 ms, 431-2,844 page faults a call;
0-115 with the thresholds set). The ratios without it are what a default process sees; with it, the compute.

Run: ``python benchmarks/bench_curvature.py [--quick] [--repeats 20] [--burst 5] [--threads 1] [--steady-malloc]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.operators import GNHOperator, HessianOperator
from lightning_influence.tasks import Classification

Case = tuple[str, nn.Module, tuple[torch.Tensor, torch.Tensor]]


class CharTransformer(nn.Module):
    """One pre-norm transformer block over characters; outputs ``(N * T, vocab)`` logits (flattened tokens)."""

    def __init__(self, vocab: int = 64, d: int = 64, heads: int = 4, length: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        self.block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.triu(torch.full((length, length), float("-inf")), 1), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        out = self.head(self.block(self.emb(ids) + self.pos[:t], src_mask=self.mask[:t, :t], is_causal=True))
        return out.reshape(-1, out.shape[-1])


def cases(quick: bool) -> list[Case]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    n = 256 if quick else 512
    x = torch.tensor((x - x.mean(0)) / (x.std(0) + 1e-8), dtype=torch.float32)[:n]
    y = torch.tensor(y)[:n]
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10))
        cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
        lm = CharTransformer()
    ids = torch.randint(0, 64, (16 if quick else 32, 65), generator=gen)
    return [("digits_mlp", mlp.eval(), (x, y)), ("digits_cnn", cnn.eval(), (x.reshape(-1, 1, 8, 8), y)),
            ("char_transformer", lm.train(), (ids[:, :-1], ids[:, 1:].reshape(-1)))]  # dropout 0: no fast path


# ------------------------------------------------------------------------------------------------- peers
def _split(v: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [c.view_as(p) for c, p in zip(v.split([p.numel() for p in params]), params, strict=True)]


def _curvlinops(model: nn.Module, batch: Any, params: list[torch.Tensor]) -> Callable[[torch.Tensor], Any]:
    from curvlinops import GGNLinearOperator

    op = GGNLinearOperator(model, nn.CrossEntropyLoss(), params, [batch], check_deterministic=False)
    return lambda v: op @ v


def _backpack(model: nn.Module, batch: Any, params: list[torch.Tensor]) -> Callable[[torch.Tensor], Any]:
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

    def product(v: torch.Tensor) -> torch.Tensor:
        out = model(batch[0])
        loss = F.cross_entropy(out, batch[1])
        return torch.cat([t.reshape(-1) for t in ggn_vector_product_from_plist(loss, out, params, _split(v, params))])

    return product


def _eigenthings(model: nn.Module, batch: Any, params: list[torch.Tensor]) -> Callable[[torch.Tensor], Any]:
    from hessian_eigenthings import GGNOperator, supervised_forward, supervised_loss_of_output

    op = GGNOperator(model, [batch], supervised_forward, supervised_loss_of_output(F.cross_entropy))
    return op.matvec


def _pyhessian(model: nn.Module, batch: Any, params: list[torch.Tensor]) -> Callable[[torch.Tensor], Any]:
    from pyhessian.utils import hessian_vector_product

    loss = F.cross_entropy(model(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, params, create_graph=True)  # the retained graph: primal pass paid once

    def product(v: torch.Tensor) -> torch.Tensor:
        hv = hessian_vector_product(list(grads), params, _split(v, params))
        return torch.cat([t.reshape(-1) for t in hv])

    return product


#: name -> (builder, what it computes: "gnh" or "hessian")
PEERS: dict[str, tuple[Callable[..., Callable[[torch.Tensor], Any]], str]] = {
    "curvlinops": (_curvlinops, "gnh"),
    "backpack": (_backpack, "gnh"),
    "hessian_eigenthings": (_eigenthings, "gnh"),
    "pyhessian": (_pyhessian, "hessian"),
}


def _peer_products(model: nn.Module, batch: Any, reference: dict[str, torch.Tensor], v: torch.Tensor,
                   notes: list[str], name: str) -> dict[str, Callable[[], object]]:
    params = [p for p in model.parameters() if p.requires_grad]
    fns: dict[str, Callable[[], object]] = {}
    for peer, (build, kind) in PEERS.items():
        try:
            product = build(model, batch, params)
            got = torch.as_tensor(product(v)).reshape(-1).to(v.dtype)
        except ImportError as err:
            notes.append(f"{peer}: not installed ({err.name}); skipped")
            continue
        except Exception as err:
            notes.append(f"{name}/{peer}: failed ({type(err).__name__}: {str(err)[:80]}); skipped")
            continue
        ref = reference[kind]
        error = float((got - ref).norm() / ref.norm())
        if not error <= 1e-3:
            notes.append(f"{name}/{peer}: {kind} product disagrees with ours (relative error {error:.1e}); not timed")
            continue
        fns[peer] = lambda product=product: product(v)
    return fns


# -------------------------------------------------------------------------------------------------- main
def _time(fns: dict[str, Callable[[], object]], repeats: int, burst: int) -> dict[str, list[float]]:
    """Seconds per call of every entry in every repeat: each repeat runs every entry ``burst`` times in a row.

    In a row, as Lanczos, CG and Hutchinson call products (and training calls gradients); the entries still take
    turns within every repeat, so load that changes over the run affects all alike.
    """
    for fn in fns.values():  # warm-up (and cache builds)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            for _ in range(burst):
                fn()
            times[key].append((time.perf_counter() - start) / burst)
    return times


def paired_ratio(times: list[float], grads: list[float]) -> float:
    """Median over repeats of an entry's time over the same repeat's gradient time.

    Pairing within a repeat cancels load that changes between repeats (the machines these run on are shared).
    """
    return statistics.median(t / g for t, g in zip(times, grads, strict=True))


def measure(name: str, model: nn.Module, batch: Any, repeats: int, burst: int, notes: list[str]) -> dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    v = torch.randn(n_params, generator=torch.Generator().manual_seed(1))
    col = v[:, None]
    task = Classification()
    ops = {mode: (GNHOperator(model, task, [batch], check_finite=False, linearization=mode),
                  HessianOperator(model, task, [batch], check_finite=False, linearization=mode))
           for mode in ("never", "always")}
    reference = {"gnh": ops["never"][0].matvec(v), "hessian": ops["never"][1].matvec(v)}
    for kind, op in zip(("gnh", "hessian"), ops["always"], strict=True):
        error = float((op.matvec(v) - reference[kind]).norm() / reference[kind].norm())
        # 1e-3, as for the peers: float32 in another layout (channels-last) rounds differently, and a ReLU unit
        # within rounding of its kink may switch (one of the CNN's 1M units does: 3e-4 on its Hessian product)
        assert error < 1e-3, f"{name}: cached {kind} product disagrees with the streamed one ({error:.1e})"

    def grad_step() -> None:
        torch.autograd.grad(F.cross_entropy(model(batch[0]), batch[1]), params)

    fns: dict[str, Callable[[], object]] = {
        "grad": grad_step,
        "gnh": lambda: ops["never"][0].matvec(v),
        "gnh_cached": lambda: ops["always"][0].matvec(v),
        "hessian": lambda: ops["never"][1].matvec(v),
        "hessian_cached": lambda: ops["always"][1].matvec(v),
        "trace_probe": lambda: ops["never"][0].quadratic_forms(col),
        "trace_probe_cached": lambda: ops["always"][0].quadratic_forms(col),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.fx constant-folding chatter from linearize
        fns.update(_peer_products(model, batch, reference, v, notes, name))
        times = _time(fns, repeats, burst)
    out = {"params": float(n_params), "grad_ms": statistics.median(times["grad"]) * 1e3}
    out.update({f"{k}_ratio": paired_ratio(times[k], times["grad"]) for k in fns if k != "grad"})
    return out


def steady_malloc() -> bool:
    """Keep freed memory in glibc's heap (no ``mmap``/``munmap`` per tensor); ``False`` where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 2**30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--burst", type=int, default=5, help="consecutive calls of an entry per repeat")
    parser.add_argument("--quick", action="store_true", help="smaller batches and 7 repeats")
    parser.add_argument("--steady-malloc", action="store_true", help="glibc thresholds: no page faults per tensor")
    args = parser.parse_args()
    malloc = "glibc defaults"
    if args.steady_malloc:
        malloc = "steady (mallopt: mmap threshold 32 MiB, trim threshold 1 GiB)" if steady_malloc() else (
            "glibc defaults (mallopt unavailable)")
    torch.set_num_threads(args.threads)
    repeats = 7 if args.quick else args.repeats
    notes: list[str] = []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # attention with double-backward support, for every entry alike
        results = {name: measure(name, model, batch, repeats, args.burst, notes)
                   for name, model, batch in cases(args.quick)}
    for note in dict.fromkeys(notes):
        print("note:", note)
    keys = sorted({k for r in results.values() for k in r if k.endswith("_ratio")},
                  key=lambda k: (k.split("_")[0] not in ("gnh", "hessian", "trace"), k))
    print(f"{'model':18s} {'params':>8s} {'grad ms':>8s} " + " ".join(f"{k[:-6]:>19s}" for k in keys))
    for name, r in results.items():
        cols = " ".join(f"{r[k]:>18.2f}x" if k in r else f"{'-':>19s}" for k in keys)
        print(f"{name:18s} {int(r['params']):>8d} {r['grad_ms']:>8.2f} {cols}")
    print(json.dumps({"benchmark": "curvature_products", "threads": args.threads, "repeats": repeats,
                      "burst": args.burst, "malloc": malloc, "notes": list(dict.fromkeys(notes)),
                      "ratios_to_grad": results}))


if __name__ == "__main__":
    main()
