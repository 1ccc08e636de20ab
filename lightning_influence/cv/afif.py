r"""AFIF approximate k-fold CV: one curvature solve and one metric prox per fold, no refits (paper 2, eq. 9)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.config import CVConfig
from lightning_influence.cv.folds import Batches, _local_examples, _validate_common, check_curvature_for_loss
from lightning_influence.cv.results import CVResult, FoldResult, PassCount, _finish
from lightning_influence.distributed import ReduceFn, reduce_packed
from lightning_influence.evaluator import Evaluator
from lightning_influence.exceptions import ConfigurationError, NonFiniteError
from lightning_influence.operators import ScaledOperator, make_operator
from lightning_influence.params import flatten
from lightning_influence.regularizers import Regularizer
from lightning_influence.solvers import SolveResult, conjugate_gradient, dense_solve
from lightning_influence.solvers.pcg import preconditioned_cg
from lightning_influence.solvers.sketch import LowRankSketch, compute_sketch
from lightning_influence.spectrum import lanczos_lambda_max
from lightning_influence.tasks import Task

__all__ = ["AUTO_DAMPING_RELATIVE", "approximate_cv", "least_damping", "matrix_free_solver"]


@dataclass
class _Folds:
    """What every fold's update needs, computed once: unit counts, gradient sums and (dense) curvature sums."""

    model: nn.Module
    task: Task
    folds: Sequence[Batches]
    cfg: CVConfig
    reduce_fn: ReduceFn | None
    theta_hat: Tensor
    units: list[float]
    local_examples: list[int]
    grad_sums: list[Tensor]
    counter: PassCount
    dense_sums: list[Tensor] | None = None
    sketch: LowRankSketch | None = None

    @property
    def total_units(self) -> float:
        return sum(self.units)

    @property
    def cost_attr(self) -> str:
        return "hessian_product_examples" if self.cfg.curvature == "hessian" else "fisher_product_examples"

    def scale(self, j: int | None) -> float:
        """:math:`c_k`: 1/(remaining units) for "mean", 1/N for "weighted" (and for the full data)."""
        if j is None or self.cfg.fold_objective == "weighted":
            return 1.0 / self.total_units
        return 1.0 / (self.total_units - self.units[j])


def _fold_statistics(
    model: nn.Module, task: Task, folds: Sequence[Batches], cfg: CVConfig, reduce_fn: ReduceFn | None,
    num_examples: int | None, use_dense: bool,
) -> _Folds:
    """Unit counts (one forward pass), per-fold gradient sums and, for the dense solver, per-fold curvature sums."""
    ev = Evaluator(model, task, reduce_fn=reduce_fn)
    theta_hat = flatten(ev.params).detach().clone()
    _, units_t = ev.global_loss_sums(folds)
    units = [float(u) for u in units_t]
    if sum(units) <= 0:
        raise ConfigurationError("the folds contain no counted units (empty data, or every target ignored).")
    local_examples = [_local_examples(task, b) for b in folds]
    if num_examples is None:
        (total,) = reduce_packed([torch.tensor(float(sum(local_examples)), dtype=torch.float64)], reduce_fn)
        num_examples = round(float(total))
    counter = PassCount(num_examples=num_examples, forward_examples=float(ev.forward_examples))
    grad_sums = []
    for j, batches in enumerate(folds):
        _, g, _ = ev.global_value_and_grad(batches)
        grad_sums.append(g.to(theta_hat))
        counter.gradient_examples += local_examples[j]
    state = _Folds(model, task, folds, cfg, reduce_fn, theta_hat, units, local_examples, grad_sums, counter)
    if use_dense:
        p = theta_hat.numel()
        state.dense_sums = []
        for j in range(len(folds)):
            if units[j] > 0:
                op = make_operator(cfg.curvature, model, task, folds[j], reduce_fn=reduce_fn)
                state.dense_sums.append(op.dense().to(theta_hat) * units[j])
                setattr(counter, state.cost_attr, getattr(counter, state.cost_attr) + p * local_examples[j])
            else:
                state.dense_sums.append(torch.zeros(p, p, dtype=theta_hat.dtype, device=theta_hat.device))
    return state


#: Relative floor of ``damping="auto"``: the damping added beyond :math:`\max(0, -\lambda_{\min})` is this times
#: :math:`\lambda_{\max}` (float64; at least ``P * eps`` of the dtype otherwise).
AUTO_DAMPING_RELATIVE = 1e-8


def least_damping(a: Tensor) -> float:
    r"""The least damping :math:`\delta \ge 0` that makes the symmetric matrix ``a`` safely positive definite.

    ``0`` when a Cholesky factorisation succeeds with no pivot below :math:`\epsilon_{rel}\max_i a_{ii}`; else
    :math:`\max(0, -\lambda_{\min}) + \epsilon_{rel}\lambda_{\max}` from an eigendecomposition, with
    :math:`\epsilon_{rel}` = :data:`AUTO_DAMPING_RELATIVE` (or ``P`` times the dtype's machine epsilon, if larger).

    Returns:
        :math:`\delta`.

    Example::

        >>> least_damping(torch.eye(2, dtype=torch.float64))
        0.0
        >>> least_damping(torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64))  # singular: rank one
        2e-08
    """
    rel = max(AUTO_DAMPING_RELATIVE, a.shape[0] * torch.finfo(a.dtype).eps)
    chol, info = torch.linalg.cholesky_ex(a)
    scale = float(a.diagonal().abs().max()) if a.numel() else 0.0
    if int(info) == 0 and float(chol.diagonal().min()) ** 2 > rel * scale:
        return 0.0
    evals = torch.linalg.eigvalsh(a)
    lo, hi = float(evals[0]), float(evals[-1])
    return max(0.0, -lo) + rel * max(abs(hi), abs(lo), torch.finfo(a.dtype).tiny)


def _dense_metric(state: _Folds, others: list[int], c: float) -> tuple[Tensor, float]:
    """:math:`A_k` as a dense matrix (downdated from the per-fold sums, or the full-data mean) and its damping."""
    assert state.dense_sums is not None
    p = state.theta_hat.numel()
    zeros = torch.zeros(p, p, dtype=state.theta_hat.dtype, device=state.theta_hat.device)
    if state.cfg.downdate:
        a = c * sum((state.dense_sums[i] for i in others), zeros)
    else:
        a = sum(state.dense_sums, zeros) / state.total_units
    a = 0.5 * (a + a.T)
    damping = least_damping(a) if state.cfg.damping == "auto" else float(state.cfg.damping)
    if damping > 0:
        a = a + damping * torch.eye(p, dtype=a.dtype, device=a.device)
    return a, damping


def _operator_metric(state: _Folds, others: list[int], c: float, damping: float) -> ScaledOperator:
    """:math:`A_k` matrix-free: one operator over the batches it averages, scaled to the fold's :math:`c_k`."""
    used = others if state.cfg.downdate else list(range(len(state.folds)))
    batches = [bb for i in used for bb in state.folds[i]]
    op = make_operator(state.cfg.curvature, state.model, state.task, batches, reduce_fn=state.reduce_fn)
    scale = c * sum(state.units[i] for i in used) if state.cfg.downdate else 1.0
    return _damped(ScaledOperator(op, scale), damping)


def _count(state: _Folds, op: Any) -> None:
    """Add the per-example curvature products ``op`` (or, for a :class:`ScaledOperator`, its operator) has spent."""
    spent = getattr(op.op if isinstance(op, ScaledOperator) else op, "example_products", 0)
    setattr(state.counter, state.cost_attr, getattr(state.counter, state.cost_attr) + spent)


#: ``damping="auto"`` with CG: undamped CG gets this many iterations before damping is added.
AUTO_DAMPING_CG_TRIAL = 50
#: ``damping="auto"`` with CG: the damping after a failed undamped trial, relative to :math:`\lambda_{\max}`.
AUTO_DAMPING_CG_RELATIVE = 1e-4


def _cg_step(state: _Folds, others: list[int], c: float, b: Tensor) -> tuple[ScaledOperator, SolveResult, float]:
    r"""CG on :math:`A_k x = b` with the configured damping.

    Under ``damping="auto"``: undamped CG for at most :data:`AUTO_DAMPING_CG_TRIAL` iterations; if it does not
    converge (or meets non-positive curvature), :data:`AUTO_DAMPING_CG_RELATIVE` times :math:`\lambda_{\max}`
    (20 Lanczos products), raised tenfold while CG still fails (at most twice more).

    Returns:
        The damped metric, the solve and the damping used.

    Raises:
        ConfigurationError: If CG meets non-positive curvature at every damping tried.
    """
    cfg = state.cfg
    if cfg.damping != "auto":
        metric = _operator_metric(state, others, c, float(cfg.damping))
        return metric, conjugate_gradient(metric, b, rtol=cfg.cg_rtol, max_iter=cfg.cg_max_iter), float(cfg.damping)
    limit = cfg.cg_limit(state.theta_hat.numel())
    damping, sol = 0.0, None
    for attempt in range(4):
        metric = _operator_metric(state, others, c, damping)
        budget = min(limit, AUTO_DAMPING_CG_TRIAL) if attempt == 0 else limit
        try:
            sol = conjugate_gradient(metric, b, rtol=cfg.cg_rtol, max_iter=budget, warn=attempt == 3)
        except ConfigurationError:
            sol = None
        if sol is not None and sol.converged:
            break
        _count(state, metric)  # a failed attempt's products are spent too
        if attempt == 0:
            lanczos_op = _operator_metric(state, others, c, 0.0)
            lam_max = abs(lanczos_lambda_max(lanczos_op, 20).value)
            _count(state, lanczos_op)
            damping = AUTO_DAMPING_CG_RELATIVE * max(lam_max, 1e-300)
        else:
            damping *= 10.0
    if sol is None:
        raise ConfigurationError(
            f"conjugate gradient met non-positive curvature even with damping {damping:.3g}: the curvature is "
            "indefinite (a Hessian away from a minimum?); pass a larger damping or curvature='fisher'."
        )
    return metric, sol, damping


def _full_sketch(state: _Folds) -> LowRankSketch:
    """The sketch of the full-data mean curvature, computed once (its products go into the pass count)."""
    if state.sketch is None:
        batches = [bb for fold in state.folds for bb in fold]
        op = make_operator(state.cfg.curvature, state.model, state.task, batches, reduce_fn=state.reduce_fn)
        p = state.theta_hat.numel()
        state.sketch = compute_sketch(op, state.cfg.sketch_config(p))
        _count(state, op)
    return state.sketch


def matrix_free_solver(cfg: CVConfig) -> str:
    """``"cg"`` or ``"pcg"``: the solver ``cfg`` runs when the curvature is not dense.

    ``"auto"`` picks ``"pcg"`` unless the damping is a fixed 0 (the Nyström preconditioner needs a positive
    damping; plain CG then runs as before ``"pcg"`` existed).

    Returns:
        ``"cg"`` or ``"pcg"``.

    Example::

        >>> matrix_free_solver(CVConfig()), matrix_free_solver(CVConfig(damping=0.0))
        ('pcg', 'cg')
    """
    if cfg.solver == "cg" or (cfg.solver == "auto" and cfg.damping != "auto" and not float(cfg.damping) > 0):
        return "cg"
    return "pcg"


def _pcg_step(state: _Folds, others: list[int], c: float, b: Tensor) -> tuple[ScaledOperator, SolveResult, float]:
    r"""CG on :math:`A_k x = b` preconditioned by the full-data sketch (``solver="pcg"``).

    :math:`A_k` is ``scale`` times the mean curvature of the remaining folds, close to ``scale`` times the
    full-data mean, so the sketch's eigenvalues are multiplied by the fold metric's ``scale`` (1 for the "mean"
    objective) before use: preconditioner, damping and operator are then on one scale. Under ``damping="auto"``
    there is no undamped trial and no per-fold Lanczos: :math:`\delta` = :data:`AUTO_DAMPING_CG_RELATIVE` times
    ``scale`` times the sketch's top eigenvalue (a :math:`\lambda_{\max}` estimate shared by every fold; the
    downdated folds differ from the full data by one fold's share), raised tenfold while PCG does not converge
    (at most twice). So "auto" is always damped here, where CG's rule may use :math:`\delta = 0` on a
    positive-definite :math:`A_k`; pass a fixed damping to compare the two. The answer carries CG's true-residual
    certificate.

    Returns:
        The damped metric, the solve and the damping used.

    Raises:
        ConfigurationError: If PCG meets non-positive curvature at every damping.
    """
    cfg = state.cfg
    sketch = _full_sketch(state)
    op0 = _operator_metric(state, others, c, 0.0)
    scaled = LowRankSketch(sketch.eigenvalues * op0.scale, sketch.eigenvectors, sketch.tail_eigenvalue * op0.scale,
                           num_products=sketch.num_products, config=sketch.config)
    limit = cfg.cg_limit(state.theta_hat.numel())
    if cfg.damping != "auto":
        damping = float(cfg.damping)  # > 0: CVConfig rejects solver="pcg" with a fixed damping <= 0
        sol = preconditioned_cg(op0, b, scaled, damping=damping, rtol=cfg.cg_rtol, max_iter=limit)
        return _damped(op0, damping), sol, damping
    lam_max = float(scaled.eigenvalues[0]) if scaled.rank else 0.0
    damping = AUTO_DAMPING_CG_RELATIVE * max(lam_max, 1e-300)
    for attempt in range(3):
        try:
            sol = preconditioned_cg(op0, b, scaled, damping=damping, rtol=cfg.cg_rtol, max_iter=limit,
                                    warn=attempt == 2)
        except ConfigurationError:
            if attempt == 2:
                raise
            damping *= 10.0
            continue
        if sol.converged or attempt == 2:
            break
        damping *= 10.0
    return _damped(op0, damping), sol, damping


def _damped(op: ScaledOperator, damping: float) -> ScaledOperator:
    metric = op.with_damping(damping)
    assert isinstance(metric, ScaledOperator)
    return metric


def _afif_update(state: _Folds, reg: Regularizer, j: int | None) -> tuple[Tensor, dict[str, Any]]:
    """AFIF step without fold ``j`` (``None``: on all the data, for ``center``)."""
    cfg, theta_hat = state.cfg, state.theta_hat
    c = state.scale(j)
    others = [i for i in range(len(state.folds)) if i != j]
    b = c * sum((state.grad_sums[i] for i in others), torch.zeros_like(theta_hat))
    metric: Any
    if state.dense_sums is not None:
        metric, damping = _dense_metric(state, others, c)
        sol = dense_solve(metric, b)
    elif cfg.solver == "cg":
        metric, sol, damping = _cg_step(state, others, c, b)
    else:
        metric, sol, damping = _pcg_step(state, others, c, b)
    cert: dict[str, Any] = {"solve": {k_: v for k_, v in sol.to_dict().items() if k_ != "history"},
                            "damping": damping}
    prox = reg.prox(theta_hat - sol.x.to(theta_hat), metric, x0=theta_hat, tol=cfg.prox_tol,
                    max_iter=cfg.prox_max_iter)
    if not isinstance(metric, Tensor):
        _count(state, metric)
    cert["prox"] = prox.to_dict()
    theta = prox.x.to(theta_hat)
    if not bool(torch.isfinite(theta).all()):
        raise NonFiniteError(
            f"approximate refit (fold {j}) is not finite (damping {cert['damping']:.3g}); the curvature is probably "
            "singular: use damping='auto' or a larger damping."
        )
    return theta, cert


def _held_out(state: _Folds, thetas: list[Tensor], certs: list[dict[str, Any]]) -> list[FoldResult]:
    """Held-out loss of every fold at its refit (one forward pass over the fold each)."""
    ev = Evaluator(state.model, state.task, reduce_fn=state.reduce_fn)
    results = []
    for j, theta in enumerate(thetas):
        sums, cnt = ev.global_loss_sums([state.folds[j]], theta)
        n = float(cnt[0])
        results.append(FoldResult(
            fold=j, held_out_loss=float(sums[0] / cnt[0]) if n > 0 else math.nan, held_out_units=n,
            train_units=state.total_units - state.units[j], theta=theta,
            step_norm=float((theta - state.theta_hat).norm()), num_nonzero=int(torch.count_nonzero(theta)),
            certificate=certs[j],
        ))
    state.counter.forward_examples += ev.forward_examples
    return results


def approximate_cv(
    model: nn.Module,
    task: Task,
    folds: Sequence[Batches],
    regularizer: Regularizer | None = None,
    *,
    config: CVConfig | None = None,
    reduce_fn: ReduceFn | None = None,
    num_examples: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    **overrides: Any,
) -> CVResult:
    r"""AFIF approximate k-fold CV: one curvature solve and one metric prox per fold, no refits.

    For each fold :math:`k`,
    :math:`\tilde\theta_k = \operatorname{prox}^{A_k}_{\lambda\pi}(\hat\theta - A_k^{-1}\nabla f_{-k}(\hat\theta))`
    (module docstring for :math:`A_k`, :math:`f_{-k}` and the two fold objectives), then the held-out loss of
    :math:`\tilde\theta_k` on fold :math:`k`. The trained weights (the model's current parameters,
    :math:`\hat\theta`) are not modified.

    Args:
        model: The trained model (:math:`\hat\theta` = its trainable parameters).
        task: Batch -> ``(outputs, targets)`` and the loss family.
        folds: One list of collated batches per fold (under data parallelism: this rank's shard of each fold;
            every rank must pass the same number of folds). Build it with :func:`make_fold_batches`.
        regularizer: The penalty :math:`\lambda\pi` used in training (``None``: no penalty).
        config: :class:`~lightning_influence.config.CVConfig`: ``curvature`` (``"fisher"`` default, ``"gnh"``, or
            ``"hessian"`` for Hessian-based approximate CV), ``downdate`` (the fold-downdated :math:`A_k`, default,
            or the paper's single full-data one), ``fold_objective`` (``"mean"``/``"weighted"``), ``solver``
            (``"dense"``, ``"cg"``, ``"pcg"``: CG preconditioned by one full-data sketch shared by the folds, or
            ``"auto"``: dense up to ``dense_max_params`` parameters, ``"pcg"`` above), ``damping``
            (:math:`\delta \ge 0` added to :math:`A_k` for singular curvature; the quadratic model is then no
            longer exact for linear models), ``cg_rtol``/``cg_max_iter``, ``prox_tol``/``prox_max_iter`` and
            ``center`` (for weights that are not yet a minimiser: subtract the step the full data would still take,
            :math:`\tilde\theta_k \leftarrow \tilde\theta_k + \hat\theta - T(\hat\theta)` with :math:`T` the same
            update on all the data, so only the effect of removing the fold remains; at a minimiser it changes
            nothing, for one extra solve and prox).
        reduce_fn: Sums a flat tensor over ranks (``None`` on one process).
        num_examples: Global training-set size for the pass count (default: counted, one extra reduction).
        progress: Called as ``progress(done, total)`` after each fold's update.
        **overrides: Single fields of ``config`` (``damping=1e-3``, ``solver="cg"``, ...).

    Returns:
        The estimate, per-fold losses/refits/certificates, and the cost in gradient-equivalent passes.

    Raises:
        ConfigurationError: Bad ``curvature``/``solver``/``fold_objective``/``damping``, a Fisher requested for a
            non-exponential-family loss, a regulariser that does not fit the parameters, an indefinite
            Hessian (add ``damping``), or a dataset with no counted units.
        NonFiniteError: If an update is not finite.

    Example::

        >>> from lightning_influence.cv import kfold_indices, make_fold_batches
        >>> from lightning_influence.tasks import Regression
        >>> model = torch.nn.Linear(2, 1).double()
        >>> g = torch.Generator().manual_seed(0)
        >>> data = [(torch.randn(2, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64))
        ...         for _ in range(12)]
        >>> folds = make_fold_batches(data, kfold_indices(12, 3))
        >>> approximate_cv(model, Regression(), folds).method
        'afif-fisher'
    """
    start = time.perf_counter()
    cfg = CVConfig.resolve(config, **overrides)
    params, reg = _validate_common(model, folds, regularizer, cfg.fold_objective)
    check_curvature_for_loss(task, cfg.curvature)
    p = sum(t.numel() for t in params.values())
    use_dense = cfg.solver == "dense" or (cfg.solver == "auto" and p <= cfg.dense_max_params)
    if cfg.solver == "auto":
        cfg = cfg.replace(solver="dense" if use_dense else matrix_free_solver(cfg))
    state = _fold_statistics(model, task, folds, cfg, reduce_fn, num_examples, use_dense)
    shift = torch.zeros_like(state.theta_hat)
    if cfg.center:
        full_step, _ = _afif_update(state, reg, None)
        shift = state.theta_hat - full_step
    thetas, certs = [], []
    for j in range(len(folds)):
        theta, cert = _afif_update(state, reg, j)
        thetas.append(theta + shift)
        certs.append(cert)
        if progress is not None:
            progress(j + 1, len(folds))
    results = _held_out(state, thetas, certs)
    config_dict = {**cfg.to_dict(), "solver": cfg.solver, "regularizer": reg.to_dict(),
                   "folds": len(folds), "num_params": p, "task": task.to_dict()}
    return _finish(results, f"afif-{cfg.curvature}", state.counter, reduce_fn, state.theta_hat.device, start,
                   config_dict)
