r"""LiSSA (paper 1): inverse curvature products from fresh sampled batches, auto-tuned from the spectrum.

:func:`lissa` runs the scaled recursion :math:`u_t = u_{t-1} - \eta[(\tilde H_t + \lambda)u_{t-1} - g]` with
settings derived from :math:`\mathrm{Tr}(H)` and :math:`\lambda_{\max}`, a divergence guard that names the fix, and
a residual certificate on a held-out sample. The pieces: :func:`_resolve_settings` (where :math:`\eta, |B|, T` come
from), :func:`_iterate` (the recursion and its guard), :func:`_certify` (the residual on held-out curvature).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_influence.config import LissaConfig
from lightning_influence.exceptions import ConfigurationError, DivergenceError
from lightning_influence.operators.base import LinearOperator, as_matrix
from lightning_influence.solvers.result import SolveResult
from lightning_influence.solvers.sampling import BatchProduct, SampledCurvature, measure_batch_constant
from lightning_influence.spectrum import LissaSettings, SpectrumSummary, estimate_spectrum, lissa_settings

__all__ = ["lissa"]


@dataclass
class _Plan:
    """Where LiSSA's settings came from and what they are."""

    eta: float
    steps: int
    batch_size: int | None
    constant: float
    source: str
    summary: dict[str, float] = field(default_factory=dict)
    measured: dict[str, Any] | None = None


@dataclass
class _Run:
    """One pass of the recursion (restarts make several)."""

    X: Tensor
    t: int = 0
    history: list[float] = field(default_factory=list)
    norm_history: list[float] = field(default_factory=list)
    diverged: bool = False
    message: str = ""


def _divergence_message(step: int, norm: float, bound: float, damping: float, eta: float, batch_size: int | None,
                        summary: dict[str, float], constant: float) -> str:
    msg = (f"LiSSA diverged at step {step}: ||u_t|| = {norm:.3g} exceeds the bound ||g||/lambda (times 1+slack) = "
           f"{bound:.3g} that every convergent iterate respects (damping lambda={damping:.3g}, eta={eta:.3g}, "
           f"|B|={batch_size}). ")
    trace, lmax = summary.get("trace"), summary.get("lambda_max")
    if trace is not None and lmax is not None and lmax > 0:
        need = math.ceil(constant * trace / lmax)
        msg += (f"Paper 1 (Thm. 1, Lemma 3) needs |B| >= C*Tr/lambda_max = {constant:g}*{trace:.3g}/{lmax:.3g} = "
                f"{need} (C = {constant:g} in use; condition C.1's constant is model-dependent) and "
                f"eta <= 1/(lambda_max + lambda) = {1.0 / (lmax + damping):.3g}. ")
    msg += (f"Fix: use a larger batch (at least C*Tr(H)/lambda_max with a larger C than {constant:g}: raise "
            "lissa_constant, or let lissa_settings() choose it), a larger damping, or a smaller eta; or use "
            "solver='cg'.")
    return msg


def _spectrum_settings(
    sampled: SampledCurvature | None, cfg: LissaConfig, damping: float,
    settings: LissaSettings | SpectrumSummary | None, spectrum_operator: LinearOperator | None,
    spectrum_kwargs: dict[str, Any] | None,
) -> tuple[LissaSettings | None, str, dict[str, float]]:
    """LiSSA settings from ``settings``, a measured spectrum, or nothing (explicit eta and steps).

    Returns:
        ``(settings or None, source, spectrum summary)``.

    Raises:
        ConfigurationError: For settings of a wrong type, or no way to obtain them.
    """
    dataset_size = sampled.pool_size if sampled is not None and not sampled.replacement else None
    if isinstance(settings, LissaSettings):
        if abs(settings.damping - damping) > 1e-12 * max(1.0, damping):
            warnings.warn(f"LissaSettings were made for damping={settings.damping} but LiSSA runs with damping="
                          f"{damping}; eta and steps may be off. Pass a SpectrumSummary to re-derive them.",
                          RuntimeWarning, stacklevel=3)
        return settings, "settings", {}
    if isinstance(settings, SpectrumSummary):
        summary = {"trace": settings.trace, "lambda_max": settings.lambda_max}
        chosen = lissa_settings(settings.trace, settings.lambda_max, damping, constant=cfg.constant,
                                dataset_size=dataset_size, steps_factor=cfg.steps_factor)
        return chosen, "spectrum_summary", summary
    if settings is not None:
        raise ConfigurationError(f"settings must be a SpectrumSummary or LissaSettings, got {type(settings).__name__}.")
    if cfg.eta is not None and cfg.steps is not None:
        return None, "explicit", {}
    op = spectrum_operator
    if op is None:
        if sampled is None:
            raise ConfigurationError(
                "lissa() needs settings (a SpectrumSummary or LissaSettings), a spectrum_operator to measure "
                "them on, or explicit eta and steps when the sampler is a plain callable."
            )
        op = sampled.operator()
    spec = estimate_spectrum(op, damping=damping, constant=cfg.constant, dataset_size=dataset_size,
                             steps_factor=cfg.steps_factor, **(spectrum_kwargs or {}))
    summary = {"trace": spec.trace, "lambda_max": spec.lambda_max, "trace_stderr": spec.trace_stderr,
               "num_products": float(spec.num_products)}
    return spec.lissa, "measured", summary


def _resolve_settings(
    sampler: BatchProduct | SampledCurvature, cfg: LissaConfig, damping: float,
    settings: LissaSettings | SpectrumSummary | None, spectrum_operator: LinearOperator | None,
    spectrum_kwargs: dict[str, Any] | None,
) -> tuple[_Plan, BatchProduct | SampledCurvature]:
    """Step size, steps and batch from the sources in order, C.1's constant if asked; the sampler resized.

    Returns:
        The plan and the (possibly resized) sampler.

    Raises:
        ConfigurationError: For non-positive eta/steps, or ``batch_size`` with a plain callable.
    """
    sampled = sampler if isinstance(sampler, SampledCurvature) else None
    chosen, source, summary = _spectrum_settings(sampled, cfg, damping, settings, spectrum_operator, spectrum_kwargs)
    constant = cfg.constant
    measured: dict[str, Any] | None = None
    if cfg.measure_constant and sampled is not None and "trace" in summary:
        measured = measure_batch_constant(sampled, summary["trace"], seed=sampled.seed)
        if measured["constant"] > constant:
            constant = measured["constant"]
            chosen = lissa_settings(summary["trace"], summary["lambda_max"], damping, constant=constant,
                                    dataset_size=sampled.pool_size if not sampled.replacement else None,
                                    steps_factor=cfg.steps_factor)
    eta = float(cfg.eta) if cfg.eta is not None else (chosen.eta if chosen is not None else float("nan"))
    if chosen is not None and cfg.steps is None and chosen.steps > cfg.max_steps:
        warnings.warn(f"LiSSA would need {chosen.steps} steps (2(lambda_max+lambda)/lambda); capped at max_steps="
                      f"{cfg.max_steps}. Increase damping or max_steps for a converged answer.", RuntimeWarning,
                      stacklevel=3)
    steps = int(cfg.steps) if cfg.steps is not None else min(chosen.steps if chosen is not None else 0, cfg.max_steps)
    if not (eta > 0 and math.isfinite(eta)) or steps < 1:
        raise ConfigurationError(f"LiSSA needs eta > 0 and steps >= 1, got eta={eta}, steps={steps}.")
    if sampled is not None:
        target = cfg.batch_size if cfg.batch_size is not None else (chosen.batch_size if chosen else None)
        if target is not None and target != sampled.batch_size:
            sampler = sampled = sampled.with_batch_size(int(target))
        batch: int | None = sampled.batch_size
    else:
        if cfg.batch_size is not None:
            raise ConfigurationError("batch_size can only be set for a SampledCurvature sampler.")
        batch = getattr(sampler, "batch_size", None)
    return _Plan(eta, steps, batch, constant, source, summary, measured), sampler


def _iterate(
    sampler: BatchProduct | SampledCurvature, B: Tensor, X0: Tensor, plan: _Plan, damping: float, cfg: LissaConfig,
    callback: Callable[[int, Tensor], None] | None, offset: int = 0,
) -> tuple[_Run, int]:
    """One chain of the recursion with tail averaging and the divergence guard.

    Chain ``c`` draws the batches of steps ``offset + 1 .. offset + T`` (``offset = c T``), so chains are independent.

    Returns:
        The run and the number of column products it made.
    """
    bnorm = B.norm(dim=0)
    safe_bnorm = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    bound = (1.0 + cfg.divergence_slack) * (bnorm / damping + X0.norm(dim=0))
    bound = torch.where(bound > 0, bound, torch.full_like(bound, math.inf))
    steps = plan.steps
    start_avg = min(steps - 1, math.floor((1.0 - cfg.average) * steps)) if cfg.average > 0 else steps
    run = _Run(X=X0.clone())
    avg, n_avg, products = torch.zeros_like(X0), 0, 0
    for t in range(1, steps + 1):
        run.t = t
        grad_q = sampler(offset + t, run.X) + damping * run.X - B
        products += run.X.shape[1]
        run.history.append(float((grad_q.norm(dim=0) / safe_bnorm).max()))
        run.X = run.X - plan.eta * grad_q
        norms = run.X.norm(dim=0)
        run.norm_history.append(float(norms.max()))
        if not bool(torch.isfinite(norms).all()) or bool((norms > bound).any()):
            j = int(torch.nan_to_num(norms / bound, nan=math.inf).argmax())
            run.diverged = True
            run.message = _divergence_message(t, float(norms[j]), float(bound[j]), damping, plan.eta,
                                              plan.batch_size, plan.summary, plan.constant)
            return run, products
        if t > start_avg:
            avg += run.X
            n_avg += 1
        if callback is not None:
            callback(t, run.X)
    if n_avg > 0:
        run.X = avg / n_avg
    return run, products


def _restart(
    sampler: SampledCurvature, plan: _Plan, restarts: list[dict[str, Any]], run: _Run, max_restarts: int
) -> SampledCurvature | None:
    """The sampler of the next restart (``C`` doubled, a larger batch), or ``None`` if no restart applies.

    Returns:
        The resized sampler, or ``None``.
    """
    restarts.append({"step": run.t, "batch_size": sampler.batch_size, "constant": plan.constant})
    plan.constant *= 2.0
    needed = math.ceil(plan.constant * plan.summary["trace"] / plan.summary["lambda_max"])
    new_batch = max(sampler.batch_size + 1, needed)
    if not sampler.replacement:
        new_batch = min(new_batch, sampler.pool_size)
    if new_batch <= sampler.batch_size:
        return None
    warnings.warn(f"{run.message} Restarting with C={plan.constant:g}, |B|={new_batch} (restart {len(restarts)} of "
                  f"{max_restarts}).", RuntimeWarning, stacklevel=4)
    plan.batch_size = new_batch
    return sampler.with_batch_size(new_batch)


def _certificate_operator(
    sampler: BatchProduct | SampledCurvature, cfg: LissaConfig, given: LinearOperator | None
) -> tuple[LinearOperator | None, str]:
    """The operator the residual is measured on, and a truthful label of what it is."""
    if given is not None:
        return given, "given operator"
    if not isinstance(sampler, SampledCurvature) or cfg.certificate_size is None:
        return None, "none"
    if sampler.holdout_indices.numel():
        return sampler.certificate_operator(cfg.certificate_size), (
            f"held-out: {sampler.holdout_indices.numel()} examples the steps never draw")
    if sampler.pool_size <= cfg.certificate_size:
        return sampler.operator(), f"whole pool ({sampler.pool_size} examples): the exact residual of the solved system"
    return sampler.certificate_operator(cfg.certificate_size), (
        f"subsample of {cfg.certificate_size} of {sampler.pool_size} pool examples (the steps draw from the whole "
        "pool; the residual includes the subsample's own sampling error)")


def _reliability(runs: list[_Run], probes: Tensor | None) -> float:
    r"""Estimated correlation of the averaged chains' scores with the noise-free scores (Spearman-Brown).

    With chain scores :math:`s_c = P^\top X_c = s^\star + e_c` (independent errors of equal variance) the
    correlation :math:`r` between two chains is :math:`V/(V+\sigma^2)`, and the mean of :math:`m` chains
    correlates with :math:`s^\star` as :math:`\sqrt{m r / (1 + (m - 1) r)}`. The chains' antithetic starts give
    their remaining biases opposite signs, which lowers :math:`r`: the estimate is then conservative.

    Returns:
        The estimate, or ``nan`` without probes or with a single chain.
    """
    if probes is None or len(runs) < 2:
        return math.nan
    scores = [(probes.T @ r.X).flatten() for r in runs]
    stacked = torch.stack(scores)
    if stacked.shape[1] < 3 or bool((stacked.std(dim=1) == 0).any()):
        return math.nan
    corr = torch.corrcoef(stacked)
    m = len(runs)
    r = float((corr.sum() - m) / (m * (m - 1)))  # mean off-diagonal correlation
    if r <= 0:
        return 0.0
    return math.sqrt(m * r / (1.0 + (m - 1) * r))


def _certify(
    sampler: BatchProduct | SampledCurvature, runs: list[_Run], X: Tensor, B: Tensor, damping: float,
    cfg: LissaConfig, certificate_operator: LinearOperator | None,
) -> tuple[float, bool, dict[str, Any] | None]:
    """Residual on the certificate operator and the chains' score reliability; ``converged`` from them.

    ``converged`` means: not diverged and, with two or more chains and probes, an estimated score correlation of at
    least ``certificate_correlation``; with a given ``certificate_operator`` (an exact target) or a single chain, a
    residual of at most ``certificate_rtol``.

    Returns:
        ``(residual, converged, certificate info or None)``.
    """
    probes = _probes(sampler, B, cfg)
    reliability = _reliability(runs, probes)
    cert_op, sample = _certificate_operator(sampler, cfg, certificate_operator)
    residual = math.nan
    if cert_op is not None:
        bnorm = B.norm(dim=0)
        R = cert_op.matmat(X) + damping * X - B
        residual = float((R.norm(dim=0) / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))).max())
    if cert_op is None and math.isnan(reliability):
        return math.nan, True, None
    by_reliability = certificate_operator is None and not math.isnan(reliability)
    converged = reliability >= cfg.certificate_correlation if by_reliability else residual <= cfg.certificate_rtol
    info = {"relative_residual": residual, "num_products": X.shape[1] if cert_op is not None else 0,
            "sample": sample, "reliability": reliability, "chains": len(runs),
            "probes": 0 if probes is None else int(probes.shape[1]),
            "criterion": (f"score reliability >= {cfg.certificate_correlation}" if by_reliability
                          else f"relative residual <= {cfg.certificate_rtol}")}
    return residual, converged, info


def _probes(sampler: BatchProduct | SampledCurvature, B: Tensor, cfg: LissaConfig) -> Tensor | None:
    """Directions the chains' scores are compared along: per-example gradients of pool examples, else ``B``."""
    if isinstance(sampler, SampledCurvature) and cfg.probes > 0:
        return sampler.probe_gradients(cfg.probes).to(B)
    return B if B.shape[1] >= 3 else None


def lissa(
    sampler: BatchProduct | SampledCurvature,
    b: Tensor,
    *,
    damping: float,
    settings: LissaSettings | SpectrumSummary | None = None,
    spectrum_operator: LinearOperator | None = None,
    config: LissaConfig | None = None,
    x0: Tensor | None = None,
    certificate_operator: LinearOperator | None = None,
    spectrum_kwargs: dict[str, Any] | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
    **overrides: Any,
) -> SolveResult:
    r"""LiSSA for :math:`(H + \lambda I)^{-1} g` with fresh sampled batches, auto-tuned from the spectrum.

    **Recursion.** Paper 1, eq. (6), is :math:`u_t = g + (I - \eta(\tilde H_t + \lambda)) u_{t-1}`, whose fixed
    point is :math:`(H+\lambda)^{-1} g / \eta`. We run the same recursion on :math:`\eta g`, i.e. the scaled
    form (paper 1, §3: SGD with step :math:`\eta` on :math:`\tfrac12 u^\top (H+\lambda) u - u^\top g`)

    .. math:: u_t = u_{t-1} - \eta\,\big[(\tilde H_t + \lambda) u_{t-1} - g\big], \qquad t = 1, \dots, T,

    with :math:`u_0 = 0` (or ``x0``), so the returned ``x`` *is* the iHVP :math:`(H+\lambda)^{-1} g` (no division
    by :math:`\eta` needed). :math:`\tilde H_t` is the undamped in-batch curvature of a fresh batch drawn by
    ``sampler`` at step ``t``. All columns of ``b`` share each step's batch (one product per column).

    **Settings** (paper 1, Thm. 1): :math:`\eta = 1/(\lambda_{\max}+\lambda)`,
    :math:`|B| \ge C\,\mathrm{Tr}(H)/\lambda_{\max}` (:math:`C=2`), :math:`T = \lceil 2/(\lambda\eta) \rceil`, via
    :func:`~lightning_influence.spectrum.lissa_settings`. Source, in order: ``settings`` (a
    :class:`~lightning_influence.spectrum.SpectrumSummary`, e.g. a :class:`CurvatureMonitor`'s ``latest``, whose
    trace and :math:`\lambda_{\max}` are re-used with *this* damping; or ready :class:`LissaSettings`), else the
    spectrum measured on the spot with :func:`~lightning_influence.spectrum.estimate_spectrum` on
    ``spectrum_operator`` (default ``sampler.operator()``, the whole pool). Explicit ``eta``, ``steps`` and
    ``batch_size`` override the derived values. A :class:`SampledCurvature` sampler is re-sized to the batch.

    **Divergence guard.** The solution obeys :math:`\|u^\star\| \le \|g\|/\lambda`; a convergent iterate stays
    below :math:`(1+\text{slack})(\|g\|/\lambda + \|u_0\|)`. When a column crosses that bound or turns non-finite,
    LiSSA stops, sets ``diverged=True`` and raises :class:`DivergenceError` (``on_divergence="raise"``) or warns
    (``"warn"``), naming the fix (a batch of at least :math:`C\,\mathrm{Tr}/\lambda_{\max}`, larger damping,
    smaller :math:`\eta`). Lemma 3 of paper 1 shows that a batch below :math:`\mathrm{Tr}/(\lambda_{\max}+\lambda)`
    makes :math:`\mathbb{E}\|u_t\|^2` grow geometrically; the guard catches it. With derived settings LiSSA
    first restarts with a doubled :math:`C` (``max_restarts``), since C.1's constant depends on the model.

    **Chains and certificate.** With ``chains`` :math:`m \ge 2` the recursion runs :math:`m` times on disjoint batch
    streams (chain :math:`c` takes the batches of steps :math:`cT+1..(c+1)T`) and returns the mean of their tail
    averages. Odd chains start at :math:`g/\lambda` instead of :math:`u_0`: along every eigendirection the solution
    lies between the two starts, so the chains' remaining biases have opposite signs and their difference bounds twice
    the bias of their mean. Their agreement is the certificate: the scores of every chain along ``probes``
    per-example gradients of pool examples (:meth:`SampledCurvature.probe_gradients`; the right-hand sides
    themselves for a plain callable)
    correlate with each other as :math:`r = V/(V + \sigma^2)`, so the mean's scores correlate with the noise-free
    ones as :math:`\sqrt{m r/(1 + (m-1) r)}` (``info["certificate"]["reliability"]``; opposite biases lower
    :math:`r`, so the estimate errs on the safe side); ``converged`` means "not diverged and reliability at least
    ``certificate_correlation``". ``relative_residual`` is :math:`\max_j \|(H_{\text{cert}}+\lambda)x_j - g_j\|/\|g_j\|`
    on ``certificate_operator`` when given (then ``converged`` means a residual of at most ``certificate_rtol``,
    as it does with a single chain), else on the whole pool when it holds at most ``certificate_size`` examples
    (the exact residual of the solved system) or a seeded subsample of that size (which also carries the
    subsample's own sampling error); ``info["certificate"]["sample"]`` says which. ``history`` holds the free
    in-batch residual :math:`\|(\tilde H_t + \lambda) u_{t-1} - g\|/\|g\|` of every step of the last chain (noisy),
    ``info["norm_history"]`` the largest column norm.

    Args:
        sampler: A :class:`SampledCurvature`, or any ``(step, V) -> H̃_step V`` callable with ``num_params``.
        b: Right-hand side(s) ``g``, shape ``(P,)`` or ``(P, k)``.
        damping: :math:`\lambda > 0`.
        settings: Spectrum summary or LiSSA settings to use instead of measuring.
        spectrum_operator: Operator on which to measure the spectrum when ``settings`` is not given.
        config: :class:`~lightning_influence.config.LissaConfig`: ``eta``, ``steps``, ``batch_size`` (overrides
            of the derived values; ``batch_size`` only for a :class:`SampledCurvature` sampler), ``constant``
            (:math:`C` of the batch rule), ``max_steps`` (cap on the derived steps, with a ``RuntimeWarning``),
            ``average`` (fraction of final iterates averaged, ``0`` = last iterate), ``on_divergence``
            (``"raise"``/``"warn"``), ``divergence_slack``, ``max_restarts`` (when the batch was derived from a
            measured spectrum and the guard fires, restart from ``x0`` with :math:`C` doubled, at most this many
            times, each with a warning recorded in ``info["restarts"]``; condition C.1's constant is
            model-dependent, paper 1's App. C needs :math:`C = 4` for GPT-2), ``certificate_size`` (examples of
            the sampler-built certificate sample, ``None`` skips it), ``certificate_rtol`` and
            ``measure_constant`` (measure condition C.1's constant with :func:`measure_batch_constant` and use
            :math:`\max(C_{\text{measured}}, C)`; recorded in ``info["measured_constant"]``).
        x0: Start iterate (default zero).
        certificate_operator: Held-out operator for the certificate (``None``: ask the sampler, if it can).
        spectrum_kwargs: Extra arguments to :func:`estimate_spectrum` when measuring on the spot.
        callback: Called as ``callback(step, x_t)`` after every step (``x_t`` of shape ``(P, k)``).
        **overrides: Single fields of ``config`` (``eta=...``, ``steps=...``, ``average=0.75``, ...).

    Returns:
        The :class:`SolveResult`; ``info`` holds the settings used, their source, the spectrum and the guard.

    Raises:
        ConfigurationError: For ``damping <= 0``, a bad shape, ``average`` outside ``[0, 1)``, an unknown
            ``on_divergence``, or no way to obtain the settings.
        DivergenceError: If the iterates diverge and ``on_divergence="raise"``.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> x = torch.eye(3, dtype=torch.float64)
        >>> ds = torch.utils.data.TensorDataset(x, torch.zeros(3, 1, dtype=torch.float64))
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> s = SampledCurvature(model, Regression(), ds, batch_size=3, replacement=False)
        >>> res = lissa(s, torch.ones(3, dtype=torch.float64), damping=1.0, certificate_size=None)
        >>> [round(v, 4) for v in res.x.tolist()]  # (I/3 + I)^{-1} 1 = 0.75
        [0.75, 0.75, 0.75]
    """
    if not damping > 0:
        raise ConfigurationError(
            f"LiSSA needs damping > 0 (got {damping}): its number of steps grows like (lambda_max + damping)/damping "
            "and without damping the iteration need not converge. Pass damping > 0 or use solver='cg'."
        )
    cfg = LissaConfig.resolve(config, **overrides)
    B, squeeze = as_matrix(b)
    if B.shape[0] != sampler.num_params:
        raise ConfigurationError(f"right-hand side has {B.shape[0]} rows but the model has {sampler.num_params}.")
    B = B.to(getattr(sampler, "param_dtype", B.dtype))
    plan, sampler = _resolve_settings(sampler, cfg, damping, settings, spectrum_operator, spectrum_kwargs)
    X0 = torch.zeros_like(B) if x0 is None else as_matrix(x0)[0].to(B).clone()
    can_restart = isinstance(sampler, SampledCurvature) and cfg.batch_size is None and "trace" in plan.summary
    restarts: list[dict[str, Any]] = []
    products = 0
    example_products = int(plan.measured["example_products"]) if plan.measured else 0  # global, cost accounting
    while True:
        runs: list[_Run] = []
        for c in range(cfg.chains):
            start = X0 if c % 2 == 0 else B / damping  # antithetic starts: the chains' biases have opposite signs
            run, made = _iterate(sampler, B, start, plan, damping, cfg, callback, offset=c * plan.steps)
            products += made
            example_products += made * (plan.batch_size or 0)
            runs.append(run)
            if run.diverged:
                break
        if not (run.diverged and can_restart and len(restarts) < cfg.max_restarts):
            break
        assert isinstance(sampler, SampledCurvature)
        resized = _restart(sampler, plan, restarts, run, cfg.max_restarts)
        if resized is None:
            break
        sampler = resized
    X_mean = torch.stack([r.X for r in runs]).mean(0) if not run.diverged else run.X
    info: dict[str, Any] = {
        "damping": damping, "eta": plan.eta, "steps": plan.steps, "batch_size": plan.batch_size,
        "constant": plan.constant, "settings_source": plan.source, "spectrum": plan.summary, "average": cfg.average,
        "divergence_slack": cfg.divergence_slack, "norm_history": run.norm_history, "certificate": None,
        "restarts": restarts, "example_products": example_products, "measured_constant": plan.measured,
        "chains": len(runs), "steps_per_chain": plan.steps,
    }
    x = X_mean[:, 0] if squeeze else X_mean
    if run.diverged:
        info["divergence_message"] = run.message
        result = SolveResult(x=x, iterations=run.t, relative_residual=math.inf, converged=False, method="lissa",
                             num_products=products, history=run.history, diverged=True, info=info)
        if cfg.on_divergence == "raise":
            raise DivergenceError(run.message)
        warnings.warn(run.message, RuntimeWarning, stacklevel=2)
        return result
    residual, converged, cert = _certify(sampler, runs, X_mean, B, damping, cfg, certificate_operator)
    if cert is not None:
        products += cert["num_products"]
        info["certificate"] = cert
    return SolveResult(x=x, iterations=sum(r.t for r in runs), relative_residual=residual, converged=converged,
                       method="lissa", num_products=products, history=run.history, diverged=False, info=info)
