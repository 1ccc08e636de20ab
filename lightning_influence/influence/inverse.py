"""The inverse of the damped curvature that ``influence_scores`` applies: one configured solver per run.

:class:`_Run` holds what every stage of :func:`~lightning_influence.influence.influence_scores` shares (model,
task, config, the training and curvature data sources, the reduction, the cost counters); :func:`_build_inverse`
turns it into one :class:`_Inverse` (exact, CG, LiSSA, or, from a low-rank sketch of the curvature computed once,
PCG or the low-rank inverse); :func:`_resolve_damping` and :func:`_resolve_solver` fill in ``damping="auto"`` and
``solver="auto"``; :func:`dense_curvature` is the dense matrix behind the exact solver.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.config import AUTO_EXACT_MAX_PARAMS, InfluenceConfig
from lightning_influence.data import DataSource
from lightning_influence.distributed import ReduceFn
from lightning_influence.evaluator import curvature_mode
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.operators.base import DENSE_MAX_PARAMS, DenseOperator
from lightning_influence.operators.curvature import CurvatureOperator, make_operator
from lightning_influence.params import num_parameters, trainable_parameters
from lightning_influence.progress import warn_projected_cost
from lightning_influence.solvers import (
    LowRankSketch,
    SampledCurvature,
    SolveResult,
    compute_sketch,
    conjugate_gradient,
    lissa,
    lowrank_solve,
    positive_definite_factor,
    preconditioned_cg,
)
from lightning_influence.spectrum import LissaSettings, SpectrumSummary, lanczos_lambda_max, lissa_settings
from lightning_influence.tasks import Task

__all__ = ["dense_curvature"]


# =========================================================================================== inverse
@dataclass
class _Inverse:
    r"""One configured :math:`(G+\lambda I)^{-1}`, applied to blocks of right-hand sides ``(P, k)``."""

    solve: Callable[[Tensor], tuple[Tensor, SolveResult]]
    state: dict[str, Any] = field(default_factory=dict)

    def __call__(self, B: Tensor) -> tuple[Tensor, SolveResult]:
        return self.solve(B)


@dataclass
class _Run:
    """What one influence computation shares between its stages (the curvature sample, the counters)."""

    model: nn.Module
    task: Task
    cfg: InfluenceConfig
    train: DataSource
    pool: DataSource
    reduce_fn: ReduceFn | None
    rank: int
    world_size: int
    counters: dict[str, float] = field(default_factory=lambda: {"example_gradients": 0.0, "example_products": 0.0})
    #: The undamped dense curvature once built (the exact solver; ``damping="auto"`` then reads its lambda_max).
    dense: Tensor | None = None

    @property
    def damping(self) -> float:
        """The numeric damping (after :func:`_resolve_damping`)."""
        assert self.cfg.damping != "auto", "damping='auto' not resolved yet"
        return float(self.cfg.damping)

    def operator(self) -> CurvatureOperator:
        return make_operator(self.cfg.curvature, self.model, self.task, self.pool, reduce_fn=self.reduce_fn,
                             dtype=self.cfg.torch_dtype(), seed=self.cfg.seed)

    def dense_curvature(self) -> Tensor:
        """The undamped dense curvature of the sample, built once (per-example Jacobians: see ``dense()``)."""
        if self.dense is None:
            op = self.operator()
            self.dense = op.dense()
            self.counters["example_products"] += self.pool.local_size * _output_dim(op)
        return self.dense


#: Lanczos products of the on-the-spot :math:`\lambda_{\max}` behind ``damping="auto"`` (no monitor spectrum).
AUTO_DAMPING_LANCZOS_ITERATIONS = 20


def _resolve_damping(run: _Run, spectrum: SpectrumSummary | LissaSettings | None) -> dict[str, Any]:
    r"""Turn ``damping="auto"`` into :math:`\lambda = \text{damping\_fraction}\cdot\lambda_{\max}` (on ``run``).

    :math:`\lambda_{\max}` comes from ``spectrum`` (e.g. a ``CurvatureMonitor``'s latest measurement; a
    :class:`LissaSettings` fixes :math:`\lambda` itself), else from a short Lanczos run on the curvature sample.

    Returns:
        What was used: ``{"damping", "rule", "lambda_max", "source"}``.

    Raises:
        ConfigurationError: If the measured :math:`\lambda_{\max}` is not positive.
    """
    cfg = run.cfg
    if cfg.damping != "auto":
        return {"damping": float(cfg.damping), "rule": "fixed", "lambda_max": None, "source": "config"}
    if isinstance(spectrum, LissaSettings):
        lam, lam_max, source = spectrum.damping, 1.0 / spectrum.eta - spectrum.damping, "lissa_settings"
    else:
        if isinstance(spectrum, SpectrumSummary) and math.isfinite(spectrum.lambda_max) and spectrum.lambda_max > 0:
            lam_max, source = float(spectrum.lambda_max), "spectrum"
        elif cfg.solver == "exact":  # the dense matrix is needed anyway: its Lanczos costs no curvature pass
            dense = DenseOperator(run.dense_curvature())
            est = lanczos_lambda_max(dense, AUTO_DAMPING_LANCZOS_ITERATIONS, tol=1e-2, seed=cfg.seed)
            lam_max, source = float(est.value), "lanczos_dense"
        else:
            op = run.operator()
            est = lanczos_lambda_max(op, AUTO_DAMPING_LANCZOS_ITERATIONS, tol=1e-2, seed=cfg.seed)
            run.counters["example_products"] += op.example_products
            lam_max, source = float(est.value), "lanczos"
        if not lam_max > 0:
            raise ConfigurationError(
                f"damping='auto' needs lambda_max > 0 of the curvature, measured {lam_max:.3g} (is the model at a "
                "point where the loss has curvature?); pass damping=<a number > 0>."
            )
        lam = cfg.damping_fraction * lam_max
    run.cfg = cfg.replace(damping=lam)
    return {"damping": lam, "rule": "auto", "fraction": cfg.damping_fraction, "lambda_max": lam_max,
            "source": source}


#: Parameters past which ``solver="exact"`` warns (the dense eigendecomposition was slower than CG at 2,410).
EXACT_SOLVER_WARN_PARAMS = 2000


def _warn_costly(run: _Run, num_queries: int, num_scored: int, chosen: bool = False) -> None:
    """Warn before a costly setting starts, with its projected cost and the setting that changes it.

    ``chosen``: the solver was picked by ``solver="auto"`` from its cost projection (no warning about it then).
    """
    cfg, p = run.cfg, num_parameters(trainable_parameters(run.model))
    if cfg.solver == "exact" and p > EXACT_SOLVER_WARN_PARAMS and not chosen:
        warn_projected_cost(
            f"solver='exact' forms the dense {p}x{p} curvature (one Jacobian per example: about the output dimension "
            f"in gradient passes over the {run.pool.global_size} curvature examples) and factors it "
            f"(~{p ** 3 / 3e9:.1f} GFLOP)", f"past {EXACT_SOLVER_WARN_PARAMS} parameters solver='auto' picks "
            "exact or pcg by their projected cost.", stacklevel=4,
        )
    if cfg.self_influence and cfg.solver not in ("exact", "lowrank"):  # lowrank: one gradient each, no solve
        warn_projected_cost(
            f"self_influence=True with solver={cfg.solver!r} solves one system per scored training example: "
            f"{num_scored} right-hand sides, about {num_scored / max(num_queries, 1):.0f}x the cost of the query "
            "solve (each CG iteration or LiSSA step is one curvature pass over its sample)", "Set "
            "self_influence=False, score fewer examples (train_indices / max_train), or use solver='exact' on a "
            "small model.", stacklevel=4,
        )


def _exact_inverse(run: _Run) -> _Inverse:
    """The Cholesky factor of the dense damped curvature, applied to blocks of right-hand sides.

    Measured 7 s against 188 s for an eigendecomposition at 9,098 parameters; positive definiteness is checked on
    the pivots.

    Returns:
        The inverse.

    Raises:
        ConfigurationError: If the damped curvature is not numerically positive definite.
    """
    lam = run.damping
    A = run.dense_curvature()
    run.dense = None  # damped in place below: one (P, P) matrix plus its factor
    A.diagonal().add_(lam)
    L = positive_definite_factor(A)
    if L is None:
        evals = torch.linalg.eigvalsh(A)  # only to say how far from positive definite it is
        lo, hi = float(evals[0]), float(evals[-1])
        raise ConfigurationError(
            f"the damped curvature G + damping*I is not positive definite (smallest eigenvalue {lo:.3g}, "
            f"largest {hi:.3g}, damping={lam}): the {run.cfg.curvature} curvature is singular"
            + (" or indefinite" if run.cfg.curvature == "hessian" else "")
            + f". Use damping > {max(0.0, -lo):.3g} (e.g. damping='auto': a fraction of lambda_max)"
            + ("; or a GNH/Fisher curvature, which is never indefinite." if run.cfg.curvature == "hessian" else ".")
        )

    min_pivot = float(L.diagonal().min()) ** 2

    def solve(B: Tensor) -> tuple[Tensor, SolveResult]:
        X = torch.cholesky_solve(B.to(A.dtype), L)
        res = float(((A @ X - B).norm(dim=0) / B.norm(dim=0).clamp_min(1e-300)).max()) if B.numel() else 0.0
        return X, SolveResult(x=X, iterations=1, relative_residual=res, converged=True, method="exact",
                              info={"damping": lam, "factorization": "cholesky",
                                    "min_pivot": min_pivot})

    return _Inverse(solve)


def _cg_inverse(run: _Run) -> _Inverse:
    op = run.operator()

    def solve(B: Tensor) -> tuple[Tensor, SolveResult]:
        before = op.example_products
        res = conjugate_gradient(op, B, damping=run.damping, config=run.cfg.cg_config())
        run.counters["example_products"] += op.example_products - before
        return res.x, res

    return _Inverse(solve)


def _lissa_inverse(run: _Run, spectrum: SpectrumSummary | LissaSettings | None) -> _Inverse:
    cfg = run.cfg
    sampler = SampledCurvature(
        run.model, run.task, run.train.dataset, batch_size=cfg.lissa_batch_size or 1, indices=run.pool.indices,
        seed=cfg.seed, curvature=cfg.curvature, collate_fn=run.train.collate_fn, reduce_fn=run.reduce_fn,
        rank=run.rank, world_size=run.world_size, dtype=cfg.torch_dtype(),
    )
    inverse = _Inverse(lambda B: (B, None), {"settings": spectrum})  # type: ignore[arg-type, return-value]

    def solve(B: Tensor) -> tuple[Tensor, SolveResult]:
        state = inverse.state
        spectrum_op = None
        if state["settings"] is None and (cfg.lissa_eta is None or cfg.lissa_steps is None):
            spectrum_op = sampler.operator(batch_size=cfg.batch_size)
        res = lissa(sampler, B, damping=run.damping, settings=state["settings"], spectrum_operator=spectrum_op,
                    config=cfg.lissa_config(), spectrum_kwargs={"seed": cfg.seed})
        run.counters["example_products"] += res.info.get("example_products", 0) / run.world_size  # global -> rank
        if spectrum_op is not None:
            run.counters["example_products"] += spectrum_op.example_products
            spec = res.info.get("spectrum", {})
            if "trace" in spec:  # reuse the measured spectrum for later blocks (self-influence)
                state["settings"] = lissa_settings(spec["trace"], spec["lambda_max"], run.damping,
                                                   constant=res.info["constant"], dataset_size=sampler.pool_size)
                state["spectrum"] = spec
        if res.info.get("certificate"):
            size = min(cfg.lissa_certificate_size, sampler.pool_size)
            run.counters["example_products"] += res.x.shape[1] * size / max(run.world_size, 1)
        return res.x, res

    inverse.solve = solve
    return inverse


def _sketch(run: _Run, op: CurvatureOperator, given: LowRankSketch | None) -> LowRankSketch:
    """The run's low-rank sketch: ``given`` (checked against this model) or computed once on the curvature sample."""
    if given is not None:
        run.cfg.sketch_config().check_rank(op.num_params)
        if given.num_params != op.num_params:
            raise ConfigurationError(
                f"the given sketch has {given.num_params} parameters but the model has {op.num_params}; recompute it."
            )
        return given
    before = op.example_products
    sk = compute_sketch(op, run.cfg.sketch_config(),
                        identity={"curvature": run.cfg.curvature, "curvature_examples": run.pool.global_size})
    run.counters["example_products"] += op.example_products - before
    return sk


def _pcg_inverse(run: _Run, given: LowRankSketch | None) -> _Inverse:
    op = run.operator()
    sk = _sketch(run, op, given)

    def solve(B: Tensor) -> tuple[Tensor, SolveResult]:
        before = op.example_products
        res = preconditioned_cg(op, B, sk, damping=run.damping, config=run.cfg.cg_config())
        run.counters["example_products"] += op.example_products - before
        return res.x, res

    return _Inverse(solve, {"sketch": sk})


def _lowrank_inverse(run: _Run, given: LowRankSketch | None) -> _Inverse:
    op = run.operator()
    sk = _sketch(run, op, given)

    def solve(B: Tensor) -> tuple[Tensor, SolveResult]:  # the residual: one product, first query column
        before = op.example_products
        res = lowrank_solve(sk, B, damping=run.damping, operator=op, tail=run.cfg.lowrank_tail)
        run.counters["example_products"] += op.example_products - before
        return res.x, res

    return _Inverse(solve, {"sketch": sk})


#: Curvatures whose dense matrix comes from per-example output Jacobians (the others need ``P`` products).
_JACOBIAN_DENSE = ("gnh", "expected_fisher", "sampled_fisher")


def _resolve_solver(run: _Run, num_queries: int, spectrum: SpectrumSummary | LissaSettings | None
                    ) -> dict[str, Any] | None:
    r"""``solver="auto"``: the exact dense solve or PCG, whichever a FLOP count projects to be cheaper (on ``run``).

    ``"exact"`` up to :data:`~.config.AUTO_EXACT_MAX_PARAMS` parameters; ``"pcg"`` past ``DENSE_MAX_PARAMS``, or
    for a curvature without a Jacobian-based dense form; in between, the projected FLOPs of the two for this
    model, curvature sample and number of queries (``F`` forward FLOPs per example and ``D`` outputs per example,
    counted on one batch of the sample with :class:`torch.utils.flop_counter.FlopCounterMode`; ``n`` curvature
    examples, ``k`` queries):

    * exact: ``n (2D + 1) F`` for the per-example Jacobians, ``2 n D P^2`` to accumulate them, ``P^3 / 3`` for the
      Cholesky factor;
    * iterative: ``k T n 4F`` (each product a forward-mode and a reverse pass), with CG's worst-case iteration count
      :math:`T = \lceil \tfrac12 \sqrt{\kappa} \ln(2/\text{rtol}) \rceil`, :math:`\kappa = 1 + \lambda_{\max}/\lambda`
      (:math:`1 + 1/\text{damping\_fraction}` under ``damping="auto"`` or with :math:`\lambda_{\max}` unknown).

    Measured: on the 9k-parameter MNIST CNN (4,500 curvature examples, 100 queries) the exact report took 65.6 s
    where CG had not finished after 95 minutes (each conv product column costs about a gradient pass); on an
    11k-parameter MLP with 20 queries PCG was 20x faster than exact (``benchmarks/bench_solver_thresholds.py``).
    The count picks the faster of the two in both.

    Returns:
        The rule and the two projections (``result.diagnostics["solver_choice"]``), ``None`` unless ``"auto"``.
    """
    cfg = run.cfg
    if cfg.solver != "auto":
        return None
    p = num_parameters(trainable_parameters(run.model))
    if p <= AUTO_EXACT_MAX_PARAMS:
        choice: dict[str, Any] = {"solver": "exact", "rule": f"at most {AUTO_EXACT_MAX_PARAMS} parameters"}
    elif p > DENSE_MAX_PARAMS or cfg.curvature not in _JACOBIAN_DENSE:
        choice = {"solver": "pcg", "rule": f"more than {DENSE_MAX_PARAMS} parameters" if p > DENSE_MAX_PARAMS
                  else f"the {cfg.curvature} curvature has no Jacobian-based dense form"}
    else:
        choice = _projected_flops(run, num_queries, spectrum)
        choice = {"solver": "exact" if choice["exact_flops"] <= choice["iterative_flops"] else "pcg",
                  "rule": "projected FLOPs", **choice}
    run.cfg = cfg.replace(solver=choice["solver"])
    return choice


def _projected_flops(run: _Run, num_queries: int, spectrum: SpectrumSummary | LissaSettings | None
                     ) -> dict[str, Any]:
    """The FLOP projections of :func:`_resolve_solver` (exact and iterative solve) and what they were built from."""
    cfg = run.cfg
    p = num_parameters(trainable_parameters(run.model))
    flops, d = _forward_profile(run.operator())
    n = run.pool.global_size
    # damping="auto" fixes lambda / lambda_max; a fixed damping needs a known lambda_max (else assume the same)
    lam_max = float(spectrum.lambda_max) if isinstance(spectrum, SpectrumSummary) else math.nan
    fixed = cfg.damping != "auto" and math.isfinite(lam_max) and lam_max > 0
    kappa = 1.0 + (lam_max / float(cfg.damping) if fixed else 1.0 / cfg.damping_fraction)
    cap = cfg.cg_max_iter or min(p, 1000)
    iters = min(cap, math.ceil(0.5 * math.sqrt(kappa) * math.log(2.0 / cfg.cg_rtol)))
    return {"exact_flops": n * (2 * d + 1) * flops + 2.0 * n * d * p * p + p**3 / 3.0,
            "iterative_flops": num_queries * iters * n * 4.0 * flops,
            "sketch_flops": cfg.sketch_config().num_products * n * 4.0 * flops,
            "forward_flops_per_example": flops, "outputs_per_example": d, "cg_iterations_bound": iters}


def _build_inverse(
    run: _Run, spectrum: SpectrumSummary | LissaSettings | None, sketch: LowRankSketch | None = None
) -> _Inverse:
    if run.cfg.solver == "exact":
        return _exact_inverse(run)
    if run.cfg.solver == "cg":
        return _cg_inverse(run)
    if run.cfg.solver == "pcg":
        return _pcg_inverse(run, sketch)
    if run.cfg.solver == "lowrank":
        return _lowrank_inverse(run, sketch)
    return _lissa_inverse(run, spectrum)


def _forward_profile(op: CurvatureOperator) -> tuple[float, int]:
    """Forward FLOPs and outputs per example, from one forward of the sample's first batch (0, 0 if it has none)."""
    from torch.utils.flop_counter import FlopCounterMode

    if not op.data:
        return 0.0, 0
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), curvature_mode(op.model), counter:
        out, _ = op.evaluator.outputs(op.data[0], validate=False)
    b = max(1, op.task.batch_size(op.data[0]))
    return counter.get_total_flops() / b, max(1, out[0].numel())


def _output_dim(op: CurvatureOperator) -> int:
    """Outputs per example (cost accounting of the Jacobian-based dense curvature)."""
    return _forward_profile(op)[1]


def dense_curvature(
    model: nn.Module,
    task: Task,
    batches: DataSource | Sequence[Any],
    *,
    curvature: str = "gnh",
    reduce_fn: ReduceFn | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""The dense undamped unit-averaged curvature matrix ``(P, P)`` (tiny models; the ``"exact"`` solver).

    A shortcut for ``make_operator(curvature, model, task, batches).dense()``: for the GNH/Fisher family it is
    assembled from per-batch output Jacobians, :math:`G = \frac1N \sum_n J_n^\top S_n J_n`, far cheaper than
    ``P`` matrix-vector products.

    Returns:
        The symmetric matrix, identical on every rank.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> dense_curvature(torch.nn.Linear(2, 1, bias=False).double(), Regression(),
        ...                 [(x, torch.zeros(2, 1, dtype=torch.float64))])
        tensor([[0.5000, 0.0000],
                [0.0000, 2.0000]], dtype=torch.float64)
    """
    return make_operator(curvature, model, task, batches, reduce_fn=reduce_fn, dtype=dtype).dense()
