r"""Exact k-fold CV by refits (the ground truth approximate CV is checked against) and the refit solvers."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_influence.cv.folds import Batches, _check_regularizer, _local_examples, _validate_common
from lightning_influence.cv.results import CVResult, FoldResult, PassCount, _finish
from lightning_influence.distributed import ReduceFn, reduce_packed
from lightning_influence.evaluator import Evaluator
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.operators import HessianOperator
from lightning_influence.params import flatten, trainable_parameters
from lightning_influence.regularizers import NoRegularizer, Regularizer
from lightning_influence.tasks import Task

__all__ = ["exact_cv", "fit_regularized"]

FoldObjective = Literal["mean", "weighted"]


def _dense_hessian_sum(ev: Evaluator, batches: Batches, theta: Tensor, counter: PassCount) -> Tensor:
    """Dense Hessian of the loss SUM over all ranks' ``batches`` at ``theta`` (tiny models; one reduction)."""
    op = HessianOperator(ev.model, ev.task, batches, reduce_fn=ev.reduce_fn, params=ev.tree(theta))
    counter.hessian_product_examples += op.num_params * sum(ev.batch_size(b) for b in op.data)
    return op.dense() * op.num_units


def _sync_counter(counter: PassCount, ev: Evaluator) -> None:
    """Add the evaluator's work counts (this rank's forward and gradient examples) to the pass count."""
    counter.forward_examples += ev.forward_examples
    counter.gradient_examples += ev.gradient_examples


def _fista_refit(
    ev: Evaluator, batches: Batches, reg: Regularizer, x0: Tensor, scale: float, tol: float, max_iter: int,
) -> tuple[Tensor, dict[str, Any]]:
    r"""FISTA with backtracking and adaptive restart on :math:`c\sum_i \ell_i(\theta) + \lambda\pi(\theta)`.

    Stops when the composite gradient mapping :math:`\|L(y - \operatorname{prox}(y - \nabla f(y)/L))\|` is
    below ``tol`` (absolute, in the units of the mean-loss gradient).

    Returns:
        The minimiser and its certificate (iterations, residual, converged, final step constant).
    """

    def fg(theta: Tensor) -> tuple[Tensor, Tensor]:
        s, g, _ = ev.global_value_and_grad(batches, theta)
        return scale * s, scale * g

    def f_only(theta: Tensor) -> Tensor:
        sums, _ = ev.global_loss_sums([batches], theta)
        return scale * sums[0]

    x = x0.clone()
    y = x.clone()
    t = 1.0
    lip = 1.0
    f_y, g_y = fg(y)
    # Initial Lipschitz guess from a small secant step along the gradient.
    gnorm = float(g_y.norm())
    if gnorm > 0:
        h = 1e-4 * (1.0 + float(x.norm())) / gnorm
        _, g2 = fg(y - h * g_y)
        lip = max(float((g2 - g_y).norm()) / (h * gnorm), 1e-12)
    it = 0
    residual = math.inf
    while it < max_iter:
        lip *= 0.9
        while True:
            x_new = reg.prox_diag(y - g_y / lip, 1.0 / lip)
            d = x_new - y
            f_new = f_only(x_new)
            bound = f_y + torch.dot(g_y, d) + 0.5 * lip * torch.dot(d, d)
            if float(f_new) <= float(bound) + 1e-14 * (1.0 + abs(float(f_y))):
                break
            lip *= 2.0
        residual = lip * float(d.norm())
        it += 1
        if residual <= tol:
            x = x_new
            break
        if float(torch.dot(y - x_new, x_new - x)) > 0:  # adaptive restart (O'Donoghue & Candes)
            t = 1.0
            y = x_new.clone()
        else:
            t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            y = x_new + ((t - 1.0) / t_new) * (x_new - x)
            t = t_new
        x = x_new
        f_y, g_y = fg(y)
    return x, {"method": "fista", "iterations": it, "residual": residual, "converged": residual <= tol,
               "lipschitz": lip}


def _prox_newton_refit(
    ev: Evaluator, batches: Batches, reg: Regularizer, x0: Tensor, scale: float, tol: float, max_iter: int,
    counter: PassCount,
) -> tuple[Tensor, dict[str, Any]]:
    r"""Proximal Newton with the dense Hessian and a backtracking line search (tiny models, fast ground truth).

    Stops when the step-one gradient mapping :math:`\|x - \operatorname{prox}_{\lambda\pi}(x - \nabla f(x))\|`
    is below ``tol``.

    Returns:
        The minimiser and its certificate (iterations, residual, converged).
    """
    x = x0.clone()
    it = 0
    residual = math.inf
    p = x.numel()
    eye = torch.eye(p, dtype=x.dtype, device=x.device)
    while it < max_iter:
        s, g, _ = ev.global_value_and_grad(batches, x)
        f, g = scale * s, scale * g
        residual = float((x - reg.prox_diag(x - g, 1.0)).norm())
        if residual <= tol:
            break
        h = scale * _dense_hessian_sum(ev, batches, x, counter)
        h = 0.5 * (h + h.T)
        shift = max(0.0, -float(torch.linalg.eigvalsh(h)[0])) + 1e-12 * max(1.0, float(h.diagonal().abs().max()))
        h = h + shift * eye
        v = x - torch.linalg.solve(h, g)
        z = reg.prox(v, h, x0=x, tol=1e-14, max_iter=100_000).x
        d = z - x
        pen_x = reg.penalty(x)
        decrease = float(torch.dot(g, d) + reg.penalty(z) - pen_x)
        step = 1.0
        obj = float(f + pen_x)
        for _ in range(60):
            trial = x + step * d
            sums, _ = ev.global_loss_sums([batches], trial)
            if float(scale * sums[0] + reg.penalty(trial)) <= obj + 0.25 * step * decrease + 1e-15 * abs(obj):
                break
            step *= 0.5
        x = x + step * d
        it += 1
    return x, {"method": "prox_newton", "iterations": it, "residual": residual, "converged": residual <= tol}


def _lbfgs_refit(
    ev: Evaluator, batches: Batches, x0: Tensor, scale: float, tol: float, max_iter: int,
) -> tuple[Tensor, dict[str, Any]]:
    theta = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")
    evals = [0]

    def closure() -> Tensor:
        opt.zero_grad()
        s, g, _ = ev.global_value_and_grad(batches, theta.detach())
        theta.grad = scale * g
        evals[0] += 1
        return scale * s

    opt.step(closure)
    x = theta.detach()
    _, g, _ = ev.global_value_and_grad(batches, x)
    residual = float((scale * g).abs().max())
    return x, {"method": "lbfgs", "iterations": evals[0], "residual": residual, "converged": residual <= tol * 10}


def _refit(
    method: str, ev: Evaluator, batches: Batches, reg: Regularizer, x0: Tensor, scale: float, tol: float,
    max_iter: int, counter: PassCount,
) -> tuple[Tensor, dict[str, Any]]:
    """Minimise ``scale * sum of losses + penalty`` from ``x0`` with the named method."""
    if method == "fista":
        return _fista_refit(ev, batches, reg, x0, scale, tol, max_iter)
    if method == "prox_newton":
        return _prox_newton_refit(ev, batches, reg, x0, scale, tol, max_iter, counter)
    return _lbfgs_refit(ev, batches, x0, scale, tol, max_iter)


def fit_regularized(
    model: nn.Module,
    task: Task,
    batches: Batches,
    regularizer: Regularizer | None = None,
    *,
    x0: Tensor | None = None,
    method: Literal["fista", "lbfgs", "prox_newton"] = "fista",
    tol: float = 1e-10,
    max_iter: int = 100_000,
    reduce_fn: ReduceFn | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    r"""Minimise :math:`\frac1N\sum_i \ell_i(\theta) + \lambda\pi(\theta)` over ``batches`` (the exact-refit solver).

    The model is only read (its trainable parameters fix shapes and the default start); load the returned flat
    vector yourself (e.g. ``torch.nn.utils.vector_to_parameters`` on the trainable parameters) if wanted.

    Args:
        model: Module defining the parametrisation.
        task: Batch -> ``(outputs, targets)`` and the loss family.
        batches: The training data (this rank's shard).
        regularizer: The penalty (``None``: none).
        x0: Start (default: the model's current parameters).
        method: ``"fista"`` (any regulariser) or ``"lbfgs"`` (smooth only).
        tol: Stopping tolerance (see :func:`exact_cv`).
        max_iter: Iteration cap.
        reduce_fn: Sums a flat tensor over ranks.

    Returns:
        ``(theta, certificate)`` with the flat minimiser and the solver's iterations/residual/convergence.

    Raises:
        ConfigurationError: For ``method="lbfgs"`` with a non-smooth regulariser or an unknown method.

    Example::

        >>> from lightning_influence.cv import kfold_indices, make_fold_batches
        >>> from lightning_influence.tasks import Regression
        >>> m = torch.nn.Linear(1, 1, bias=False).double()
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> theta, cert = fit_regularized(m, Regression(), [(x, 3 * x)], tol=1e-12)
        >>> round(float(theta[0]), 6), cert["converged"]
        (3.0, True)
    """
    params = trainable_parameters(model)
    reg = _check_regularizer(regularizer, sum(t.numel() for t in params.values()))
    _check_method(method, reg)
    counter = PassCount()
    ev = Evaluator(model, task, reduce_fn=reduce_fn)
    start = flatten(params).detach().clone() if x0 is None else x0.detach().clone()
    _, units = ev.global_loss_sums([batches])
    if float(units[0]) <= 0:
        raise ConfigurationError("batches contain no counted units.")
    scale = 1.0 / float(units[0])
    theta, cert = _refit(method, ev, batches, reg, start, scale, tol, max_iter, counter)
    _sync_counter(counter, ev)
    cert["cost"] = counter.reduced(reduce_fn, start.device).to_dict()
    return theta, cert


def _check_method(method: str, reg: Regularizer) -> None:
    if method not in ("fista", "lbfgs", "prox_newton"):
        raise ConfigurationError(f"method must be 'fista', 'lbfgs' or 'prox_newton', got {method!r}.")
    if method == "lbfgs" and not isinstance(reg, NoRegularizer) and reg.strength > 0:
        raise ConfigurationError(
            f"method='lbfgs' needs a smooth objective, but the regulariser is {type(reg).__name__}; use method='fista'."
        )


def exact_cv(
    model: nn.Module,
    task: Task,
    folds: Sequence[Batches],
    regularizer: Regularizer | None = None,
    *,
    fold_objective: FoldObjective = "mean",
    method: Literal["fista", "lbfgs", "prox_newton"] = "fista",
    tol: float = 1e-10,
    max_iter: int = 100_000,
    warm_start: bool = True,
    reduce_fn: ReduceFn | None = None,
    num_examples: int | None = None,
) -> CVResult:
    r"""Exact k-fold CV by refitting the fold objective of every fold to a tight tolerance (small models).

    Each refit minimises :math:`L_{-k}` (module docstring) from :math:`\hat\theta` (``warm_start``) or from the
    model's parameters scaled by zero, by FISTA with backtracking and adaptive restart (any regulariser), or by
    L-BFGS with strong-Wolfe line search (smooth problems only: ``NoRegularizer``). This is the ground truth the
    approximate CV is compared with; on non-convex models it finds the local minimum near the warm start.

    Args:
        model: The trained model (warm start :math:`\hat\theta`; never modified).
        task: Batch -> ``(outputs, targets)`` and the loss family.
        folds: One list of batches per fold, as for :func:`approximate_cv`.
        regularizer: The penalty :math:`\lambda\pi` (``None``: no penalty).
        fold_objective: ``"mean"`` (default) or ``"weighted"``.
        method: ``"fista"`` or ``"lbfgs"``.
        tol: FISTA: composite gradient-mapping norm; L-BFGS: max-norm of the gradient.
        max_iter: Iteration cap per fold.
        warm_start: Start from :math:`\hat\theta` (else from zero).
        reduce_fn: Sums a flat tensor over ranks.
        num_examples: Global training-set size for the pass count (default: counted).

    Returns:
        The exact CV estimate, per-fold refits with their certificates, and the cost.

    Raises:
        ConfigurationError: For ``method="lbfgs"`` with a non-smooth regulariser, or bad arguments.

    Example::

        >>> from lightning_influence.cv import kfold_indices, make_fold_batches
        >>> from lightning_influence.tasks import Regression
        >>> model = torch.nn.Linear(2, 1).double()
        >>> g = torch.Generator().manual_seed(0)
        >>> data = [(torch.randn(2, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64))
        ...         for _ in range(12)]
        >>> exact_cv(model, Regression(), make_fold_batches(data, kfold_indices(12, 3))).method
        'exact-fista'
    """
    start = time.perf_counter()
    params, reg = _validate_common(model, folds, regularizer, fold_objective)
    _check_method(method, reg)
    theta_hat = flatten(params).detach().clone()
    k = len(folds)
    counter = PassCount()
    ev = Evaluator(model, task, reduce_fn=reduce_fn)
    _, units_t = ev.global_loss_sums(folds)
    units = [float(u) for u in units_t]
    total_units = sum(units)
    if total_units <= 0:
        raise ConfigurationError("the folds contain no counted units (empty data, or every target ignored).")
    if num_examples is None:
        (ex,) = reduce_packed([torch.tensor(float(sum(_local_examples(task, b) for b in folds)),
                                            dtype=torch.float64)], reduce_fn)
        num_examples = round(float(ex))
    counter.num_examples = num_examples
    results: list[FoldResult] = []
    for j in range(k):
        batches = [b for i in range(k) if i != j for b in folds[i]]
        remaining = total_units - units[j]
        scale = 1.0 / remaining if fold_objective == "mean" else 1.0 / total_units
        x0 = theta_hat if warm_start else torch.zeros_like(theta_hat)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            theta, cert = _refit(method, ev, batches, reg, x0, scale, tol, max_iter, counter)
        if not cert["converged"]:
            warnings.warn(
                f"exact refit of fold {j} stopped at residual {cert['residual']:.3g} > tol={tol} after "
                f"{cert['iterations']} iterations; raise max_iter.",
                RuntimeWarning,
                stacklevel=2,
            )
        sums, cnt = ev.global_loss_sums([folds[j]], theta)
        n = float(cnt[0])
        results.append(FoldResult(
            fold=j,
            held_out_loss=float(sums[0] / cnt[0]) if n > 0 else math.nan,
            held_out_units=n,
            train_units=remaining,
            theta=theta,
            step_norm=float((theta - theta_hat).norm()),
            num_nonzero=int(torch.count_nonzero(theta)),
            certificate=cert,
        ))
    config = {"method": method, "fold_objective": fold_objective, "tol": tol, "warm_start": warm_start,
              "regularizer": reg.to_dict(), "folds": k, "num_params": theta_hat.numel()}
    _sync_counter(counter, ev)
    return _finish(results, f"exact-{method}", counter, reduce_fn, theta_hat.device, start, config)

