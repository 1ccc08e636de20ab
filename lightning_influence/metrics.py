r"""Every name lightning_influence logs, as data: one constant per scalar and per media tag.

From a name in TensorBoard / W&B to the code that computes it is one grep: ``grep -rn "pbrf/pearson_lissa"`` finds
the constant here (``PBRF_PEARSON_LISSA``), and grepping the constant finds the place that fills it in (the table
below). Names that depend on a value (the fold index, the estimator) come from a function here, and their
documented pattern (``cv/approx_fold_<k>``) is a constant too; ``docs/metrics.md`` documents every name of this
module (``tests/test_metric_names.py`` checks it).

======================================  ======================================================================
who computes it                         names
======================================  ======================================================================
``SpectrumSummary.metrics``             ``CURVATURE_*``, ``LISSA_*`` (logged by ``CurvatureMonitor``)
``InfluenceResult.metrics``             ``INFLUENCE_*`` (``InfluenceReport``)
``CVResult.metrics``                    ``CV_APPROX_*``, ``CV_EXACT_*``; ``CV_REL_ERROR`` (``ApproximateCV``)
``PBRFValidationResult.metrics``        ``PBRF_*`` (``PBRFValidation``)
``AttributionBenchmark`` (callback)     ``ATTRIBUTION_*`` (``AttributionBenchmark``)
======================================  ======================================================================

Plain Python, no Lightning or torch import.

Example::

    >>> PBRF_PEARSON_LISSA, pbrf_pearson("lissa") is PBRF_PEARSON_LISSA, pbrf_pearson("my_estimator")
    ('pbrf/pearson_lissa', True, 'pbrf/pearson_my_estimator')
    >>> cv_approx_fold(3), CV_APPROX_FOLD_PATTERN
    ('cv/approx_fold_3', 'cv/approx_fold_<k>')
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "ATTRIBUTION_CACHED_SUBSETS",
    "ATTRIBUTION_LDS",
    "ATTRIBUTION_LDS_CI_HIGH",
    "ATTRIBUTION_LDS_CI_LOW",
    "ATTRIBUTION_LDS_GRADIENT_DOT",
    "ATTRIBUTION_LDS_PATTERN",
    "ATTRIBUTION_NUM_SUBSETS",
    "ATTRIBUTION_SECONDS",
    "CURVATURE_CRITICAL_BATCH_SIZE",
    "CURVATURE_LAMBDA_MAX",
    "CURVATURE_OVERHEAD",
    "CURVATURE_PRODUCTS",
    "CURVATURE_SECONDS",
    "CURVATURE_TRACE",
    "CURVATURE_TRACE_STDERR",
    "CV_APPROX_FOLD_PATTERN",
    "CV_APPROX_LOSS",
    "CV_APPROX_PASSES",
    "CV_APPROX_SECONDS",
    "CV_EXACT_FOLD_PATTERN",
    "CV_EXACT_LOSS",
    "CV_EXACT_PASSES",
    "CV_EXACT_SECONDS",
    "CV_REL_ERROR",
    "INFLUENCE_DAMPING",
    "INFLUENCE_GRADIENT_EQUIVALENTS",
    "INFLUENCE_NUM_PRODUCTS",
    "INFLUENCE_NUM_QUERIES",
    "INFLUENCE_NUM_TRAIN",
    "INFLUENCE_SCORE_ABS_MEAN",
    "INFLUENCE_SECONDS",
    "INFLUENCE_SELF_INFLUENCE_MAX",
    "INFLUENCE_SELF_INFLUENCE_MEAN",
    "INFLUENCE_SOLVER_CONVERGED",
    "INFLUENCE_SOLVER_DIVERGED",
    "INFLUENCE_SOLVER_ITERATIONS",
    "INFLUENCE_SOLVER_RESIDUAL",
    "LISSA_BATCH_SIZE",
    "LISSA_ETA",
    "LISSA_STEPS",
    "MEDIA_ATTRIBUTION_SCATTER",
    "MEDIA_ATTRIBUTION_VERDICT",
    "MEDIA_CURVATURE_HISTORY",
    "MEDIA_INFLUENCE_SCORES",
    "MEDIA_INFLUENCE_SELF_INFLUENCE",
    "MEDIA_INFLUENCE_SELF_INFLUENCE_HIST",
    "MEDIA_INFLUENCE_SOLVER_CONVERGENCE",
    "MEDIA_INFLUENCE_SUMMARY",
    "MEDIA_INFLUENCE_TOP_K",
    "MEDIA_PBRF_CORRELATIONS",
    "MEDIA_PBRF_SCATTER_PATTERN",
    "MEDIA_PBRF_VERDICT",
    "PBRF_CONVERGED_FRACTION",
    "PBRF_MAX_RELATIVE_GRAD_NORM",
    "PBRF_PEARSON_CG",
    "PBRF_PEARSON_EXACT",
    "PBRF_PEARSON_GRADIENT_DOT",
    "PBRF_PEARSON_LISSA",
    "PBRF_PEARSON_PATTERN",
    "PBRF_SPEARMAN_CG",
    "PBRF_SPEARMAN_EXACT",
    "PBRF_SPEARMAN_GRADIENT_DOT",
    "PBRF_SPEARMAN_LISSA",
    "PBRF_SPEARMAN_PATTERN",
    "SCALAR_NAMES",
    "attribution_lds",
    "cv_approx_fold",
    "cv_exact_fold",
    "media_pbrf_scatter",
    "pbrf_pearson",
    "pbrf_spearman",
    "regroup",
]

# ------------------------------------------------------------------------------- CurvatureMonitor (spectrum)
CURVATURE_TRACE = "curvature/trace"
CURVATURE_TRACE_STDERR = "curvature/trace_stderr"
CURVATURE_LAMBDA_MAX = "curvature/lambda_max"
CURVATURE_CRITICAL_BATCH_SIZE = "curvature/critical_batch_size"
CURVATURE_PRODUCTS = "curvature/products"
CURVATURE_SECONDS = "curvature/seconds"
CURVATURE_OVERHEAD = "curvature/overhead"
LISSA_ETA = "lissa/eta"
LISSA_BATCH_SIZE = "lissa/batch_size"
LISSA_STEPS = "lissa/steps"

# ------------------------------------------------------------------------------- InfluenceReport
INFLUENCE_SOLVER_RESIDUAL = "influence/solver_residual"
INFLUENCE_DAMPING = "influence/damping"
INFLUENCE_SOLVER_ITERATIONS = "influence/solver_iterations"
INFLUENCE_SOLVER_CONVERGED = "influence/solver_converged"
INFLUENCE_SOLVER_DIVERGED = "influence/solver_diverged"
INFLUENCE_NUM_PRODUCTS = "influence/num_products"
INFLUENCE_GRADIENT_EQUIVALENTS = "influence/gradient_equivalents"
INFLUENCE_SECONDS = "influence/seconds"
INFLUENCE_NUM_TRAIN = "influence/num_train"
INFLUENCE_NUM_QUERIES = "influence/num_queries"
INFLUENCE_SCORE_ABS_MEAN = "influence/score_abs_mean"
INFLUENCE_SELF_INFLUENCE_MEAN = "influence/self_influence_mean"
INFLUENCE_SELF_INFLUENCE_MAX = "influence/self_influence_max"

# ------------------------------------------------------------------------------- ApproximateCV
CV_APPROX_LOSS = "cv/approx_loss"
CV_APPROX_PASSES = "cv/approx_passes"
CV_APPROX_SECONDS = "cv/approx_seconds"
#: Pattern of :func:`cv_approx_fold` (as documented).
CV_APPROX_FOLD_PATTERN = "cv/approx_fold_<k>"
CV_EXACT_LOSS = "cv/exact_loss"
CV_EXACT_PASSES = "cv/exact_passes"
CV_EXACT_SECONDS = "cv/exact_seconds"
#: Pattern of :func:`cv_exact_fold` (as documented).
CV_EXACT_FOLD_PATTERN = "cv/exact_fold_<k>"
CV_REL_ERROR = "cv/rel_error"

# ------------------------------------------------------------------------------- PBRFValidation
PBRF_PEARSON_LISSA = "pbrf/pearson_lissa"
PBRF_PEARSON_CG = "pbrf/pearson_cg"
PBRF_PEARSON_EXACT = "pbrf/pearson_exact"
PBRF_PEARSON_GRADIENT_DOT = "pbrf/pearson_gradient_dot"
#: Pattern of :func:`pbrf_pearson` (as documented).
PBRF_PEARSON_PATTERN = "pbrf/pearson_<estimator>"
PBRF_SPEARMAN_LISSA = "pbrf/spearman_lissa"
PBRF_SPEARMAN_CG = "pbrf/spearman_cg"
PBRF_SPEARMAN_EXACT = "pbrf/spearman_exact"
PBRF_SPEARMAN_GRADIENT_DOT = "pbrf/spearman_gradient_dot"
#: Pattern of :func:`pbrf_spearman` (as documented).
PBRF_SPEARMAN_PATTERN = "pbrf/spearman_<estimator>"
PBRF_CONVERGED_FRACTION = "pbrf/converged_fraction"
PBRF_MAX_RELATIVE_GRAD_NORM = "pbrf/max_relative_grad_norm"

# ---------------------------------------------------------------------------------------------- attribution
ATTRIBUTION_LDS = "attribution/lds"
ATTRIBUTION_LDS_CI_LOW = "attribution/lds_ci_low"
ATTRIBUTION_LDS_CI_HIGH = "attribution/lds_ci_high"
ATTRIBUTION_LDS_GRADIENT_DOT = "attribution/lds_gradient_dot"
#: Pattern of :func:`attribution_lds` (as documented).
ATTRIBUTION_LDS_PATTERN = "attribution/lds_<baseline>"
ATTRIBUTION_NUM_SUBSETS = "attribution/num_subsets"
ATTRIBUTION_CACHED_SUBSETS = "attribution/cached_subsets"
ATTRIBUTION_SECONDS = "attribution/seconds"

# ------------------------------------------------------------------------------- media (figures, text, tables)
MEDIA_CURVATURE_HISTORY = "curvature/history"
MEDIA_INFLUENCE_SUMMARY = "influence/summary"
MEDIA_INFLUENCE_SCORES = "influence/scores"
MEDIA_INFLUENCE_SOLVER_CONVERGENCE = "influence/solver_convergence"
MEDIA_INFLUENCE_SELF_INFLUENCE = "influence/self_influence"
MEDIA_INFLUENCE_SELF_INFLUENCE_HIST = "influence/self_influence_hist"
MEDIA_INFLUENCE_TOP_K = "influence/top_k"
MEDIA_PBRF_CORRELATIONS = "pbrf/correlations"
MEDIA_PBRF_VERDICT = "pbrf/verdict"
#: Pattern of :func:`media_pbrf_scatter` (as documented).
MEDIA_PBRF_SCATTER_PATTERN = "pbrf/scatter_<estimator>"
MEDIA_ATTRIBUTION_VERDICT = "attribution/verdict"
MEDIA_ATTRIBUTION_SCATTER = "attribution/scatter"

_PEARSON = {"lissa": PBRF_PEARSON_LISSA, "cg": PBRF_PEARSON_CG, "exact": PBRF_PEARSON_EXACT,
            "gradient_dot": PBRF_PEARSON_GRADIENT_DOT}
_SPEARMAN = {"lissa": PBRF_SPEARMAN_LISSA, "cg": PBRF_SPEARMAN_CG, "exact": PBRF_SPEARMAN_EXACT,
             "gradient_dot": PBRF_SPEARMAN_GRADIENT_DOT}

#: Every fixed scalar name (the value-dependent ones come from the functions below).
SCALAR_NAMES: tuple[str, ...] = (
    CURVATURE_TRACE, CURVATURE_TRACE_STDERR, CURVATURE_LAMBDA_MAX, CURVATURE_CRITICAL_BATCH_SIZE,
    CURVATURE_PRODUCTS, CURVATURE_SECONDS, CURVATURE_OVERHEAD,
    LISSA_ETA, LISSA_BATCH_SIZE, LISSA_STEPS,
    INFLUENCE_SOLVER_RESIDUAL, INFLUENCE_SOLVER_ITERATIONS, INFLUENCE_SOLVER_CONVERGED, INFLUENCE_SOLVER_DIVERGED,
    INFLUENCE_NUM_PRODUCTS, INFLUENCE_GRADIENT_EQUIVALENTS, INFLUENCE_SECONDS, INFLUENCE_NUM_TRAIN,
    INFLUENCE_NUM_QUERIES, INFLUENCE_SCORE_ABS_MEAN, INFLUENCE_SELF_INFLUENCE_MEAN, INFLUENCE_SELF_INFLUENCE_MAX,
    CV_APPROX_LOSS, CV_APPROX_PASSES, CV_APPROX_SECONDS, CV_EXACT_LOSS, CV_EXACT_PASSES, CV_EXACT_SECONDS,
    CV_REL_ERROR,
    *_PEARSON.values(), *_SPEARMAN.values(), PBRF_CONVERGED_FRACTION, PBRF_MAX_RELATIVE_GRAD_NORM,
    ATTRIBUTION_LDS, ATTRIBUTION_LDS_CI_LOW, ATTRIBUTION_LDS_CI_HIGH, ATTRIBUTION_LDS_GRADIENT_DOT,
    ATTRIBUTION_NUM_SUBSETS, ATTRIBUTION_CACHED_SUBSETS, ATTRIBUTION_SECONDS,
)


def _fill(pattern: str, placeholder: str, value: object) -> str:
    return pattern.replace(placeholder, str(value))


def cv_approx_fold(k: int) -> str:
    """``cv/approx_fold_<k>``: held-out loss of fold ``k`` under its approximate refit.

    Returns:
        The name.

    Example::

        >>> cv_approx_fold(0)
        'cv/approx_fold_0'
    """
    return _fill(CV_APPROX_FOLD_PATTERN, "<k>", int(k))


def cv_exact_fold(k: int) -> str:
    """``cv/exact_fold_<k>``: held-out loss of fold ``k`` under its exact refit.

    Returns:
        The name.

    Example::

        >>> cv_exact_fold(4)
        'cv/exact_fold_4'
    """
    return _fill(CV_EXACT_FOLD_PATTERN, "<k>", int(k))


def pbrf_pearson(estimator: str) -> str:
    """``pbrf/pearson_<estimator>``: the constant for a known estimator (lissa, cg, exact, gradient_dot), else built.

    Returns:
        The name.

    Example::

        >>> pbrf_pearson("cg") == PBRF_PEARSON_CG
        True
    """
    return _PEARSON.get(estimator) or _fill(PBRF_PEARSON_PATTERN, "<estimator>", estimator)


def pbrf_spearman(estimator: str) -> str:
    """``pbrf/spearman_<estimator>``: the constant for a known estimator, else built from the pattern.

    Returns:
        The name.

    Example::

        >>> pbrf_spearman("gradient_dot") == PBRF_SPEARMAN_GRADIENT_DOT
        True
    """
    return _SPEARMAN.get(estimator) or _fill(PBRF_SPEARMAN_PATTERN, "<estimator>", estimator)


def attribution_lds(baseline: str) -> str:
    """``attribution/lds_<baseline>``: the constant for ``gradient_dot``, else built from the pattern.

    Returns:
        The name.

    Example::

        >>> attribution_lds("gradient_dot") == ATTRIBUTION_LDS_GRADIENT_DOT
        True
    """
    if baseline == "gradient_dot":
        return ATTRIBUTION_LDS_GRADIENT_DOT
    return _fill(ATTRIBUTION_LDS_PATTERN, "<baseline>", baseline)


def media_pbrf_scatter(estimator: str) -> str:
    """``pbrf/scatter_<estimator>``: the tag of the scatter figure of one estimator against the PBRF.

    Returns:
        The tag.

    Example::

        >>> media_pbrf_scatter("exact")
        'pbrf/scatter_exact'
    """
    return _fill(MEDIA_PBRF_SCATTER_PATTERN, "<estimator>", estimator)


def regroup(values: Mapping[str, float], group: str, prefix: str) -> dict[str, float]:
    """``values`` with the leading ``group`` of every name replaced by ``prefix`` (the result types' ``prefix=``).

    Returns:
        A new dict (the same names when ``prefix == group``).

    Example::

        >>> regroup({PBRF_CONVERGED_FRACTION: 1.0}, "pbrf/", "val/pbrf/")
        {'val/pbrf/converged_fraction': 1.0}
        >>> regroup({CURVATURE_TRACE: 2.0}, "", "val/")
        {'val/curvature/trace': 2.0}
    """
    if prefix == group:
        return dict(values)
    return {prefix + (k[len(group):] if k.startswith(group) else k): v for k, v in values.items()}
