r"""Typed settings of every estimator, one dataclass per algorithm.

Each config is a plain dataclass (picklable for ``ddp_spawn``, buildable from a LightningCLI YAML with
``class_path: lightning_influence.config.LissaConfig``), with ``Literal`` choices, one :meth:`Config.validate` that
raises :class:`~lightning_influence.exceptions.ConfigurationError` naming the field and the fix, and
:meth:`Config.to_dict` for the ``config`` entry written beside every result in ``report.json``.

The functions take ``config=`` plus keyword overrides of single fields (``conjugate_gradient(op, b, rtol=1e-8)``
is ``conjugate_gradient(op, b, config=CGConfig(rtol=1e-8))``); :meth:`Config.resolve` merges the two.

* :class:`SpectrumConfig`: :func:`~lightning_influence.spectrum.estimate_spectrum` (``CurvatureMonitor``);
* :class:`CGConfig`: :func:`~lightning_influence.solvers.conjugate_gradient`;
* :class:`LissaConfig`: :func:`~lightning_influence.solvers.lissa`;
* :class:`SketchConfig`: :func:`~lightning_influence.solvers.compute_sketch` (low-rank GNH sketch: ``"pcg"``,
  ``"lowrank"``);
* :class:`InfluenceConfig`: :func:`~lightning_influence.influence.influence_scores` (``InfluenceReport``);
* :class:`CVConfig`: :func:`~lightning_influence.cv.approximate_cv` (``ApproximateCV``);
* :class:`PBRFConfig`: :class:`~lightning_influence.pbrf.PBRF` (``PBRFValidation``).

Example::

    >>> cfg = CGConfig.resolve(None, rtol=1e-8)
    >>> cfg.rtol, cfg.to_dict()["max_iter"]
    (1e-08, None)
    >>> try:
    ...     CGConfig(rtol=-1.0).validate()
    ... except ConfigurationError as e:
    ...     print(e)
    CGConfig.rtol must be > 0, got -1.0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from lightning_influence.exceptions import ConfigurationError

__all__ = [
    "AUTO_EXACT_MAX_PARAMS",
    "DEFAULT_LINEARIZATION_BUDGET",
    "DEFAULT_LISSA_CONSTANT",
    "DEFAULT_LISSA_STEPS_FACTOR",
    "CGConfig",
    "CVConfig",
    "Config",
    "InfluenceConfig",
    "LissaConfig",
    "PBRFConfig",
    "SketchConfig",
    "SpectrumConfig",
]

#: Default :math:`C` of the LiSSA batch rule :math:`|B| \ge C\,\mathrm{Tr}/\lambda_{\max}` used by the library's
#: estimators and callbacks. Paper 1 suggests :math:`C = 2`; on the digits MLPs of our tests and benchmarks LiSSA
#: with :math:`C = 2` diverged and condition C.1's constant measured on the model was 4.5 to 7, so the library
#: default is 4 (:func:`~lightning_influence.spectrum.lissa_settings` keeps the paper's 2 as its argument default).
DEFAULT_LISSA_CONSTANT = 4.0

#: Default :math:`c` of the LiSSA step rule :math:`T = \lceil c/(\lambda\eta) \rceil` per chain. The slowest direction
#: contracts by :math:`1-\lambda\eta` per step; paper 1's :math:`c = 2` leaves :math:`e^{-2} \approx 14\,\%` of the
#: start in it at the last step and about 31 % in an average over the last 75 % of the steps, which is what made the
#: scores of our digits MLPs reach only Pearson 0.92-0.99 against the exact ones. With :math:`c = 6` and averaging
#: over the second half, that bias is :math:`e^{-3}(1-e^{-3})/3 \approx 1.6\,\%`.
DEFAULT_LISSA_STEPS_FACTOR = 6.0

#: ``solver="auto"`` uses the exact dense solve up to this many trainable parameters and ``"pcg"`` above. Measured
#: by ``benchmarks/bench_solver_thresholds.py`` (500 training examples, 20 queries, 10 outputs, one thread):
#: exact/pcg time 0.59 at 160 parameters, 0.95 at 385, 1.44 at 760, 3.1 at 1,510, 15.7 at 3,010. The exact
#: solve's cost grows like ``N * outputs * P + P^3``, so the crossover moves down for larger training sets.
AUTO_EXACT_MAX_PARAMS = 500

#: Default byte budget of cached linearisations (:mod:`lightning_influence.operators.linearized`): 1 GiB.
DEFAULT_LINEARIZATION_BUDGET = 2**30

CurvatureKind = Literal["gnh", "expected_fisher", "sampled_fisher", "finite_difference_gnh", "hessian"]
SolverName = Literal["cg", "lissa", "exact", "pcg", "lowrank", "auto"]
Normalization = Literal["sum", "mean"]
DtypeName = Literal["float64", "float32", "float16", "bfloat16"]

C = TypeVar("C", bound="Config")


def _is_number(value: Any, lower: float) -> bool:
    """A finite real (not a bool) ``>= lower``."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value >= lower)


@dataclass
class Config:
    """Base of the settings dataclasses: validation, plain-dict dump and merging of overrides.

    Example::

        >>> SpectrumConfig().replace(trace_probes=8).trace_probes
        8
    """

    def validate(self) -> None:
        """Check every field (subclasses); raises :class:`ConfigurationError` naming the field and the fix."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON-able: what ``report.json`` records).

        Returns:
            ``field -> value``.
        """
        return dataclasses.asdict(self)

    def replace(self: C, **overrides: Any) -> C:
        """A validated copy with some fields replaced.

        Returns:
            The new config.

        Raises:
            ConfigurationError: For a field this config does not have, or a value that fails :meth:`validate`.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigurationError(
                f"{type(self).__name__} has no field(s) {unknown}; the fields are {sorted(names)}."
            )
        new = dataclasses.replace(self, **overrides)
        new.validate()
        return new

    @classmethod
    def resolve(cls: type[C], config: C | None = None, **overrides: Any) -> C:
        """``config`` (default: all defaults) with ``overrides`` applied, validated.

        Returns:
            The config to use.

        Raises:
            ConfigurationError: If ``config`` is of another type, or as :meth:`replace`.
        """
        base = cls() if config is None else config
        if not isinstance(base, cls):
            raise ConfigurationError(f"config must be a {cls.__name__}, got {type(base).__name__}.")
        return base.replace(**overrides)

    # --------------------------------------------------------------------------------------- checks
    def _fail(self, name: str, rule: str, value: Any) -> None:
        raise ConfigurationError(f"{type(self).__name__}.{name} {rule}, got {value!r}.")

    def _positive(self, *names: str, allow_none: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if value is None and allow_none:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                self._fail(name, "must be > 0" + (" (or None)" if allow_none else ""), value)

    def _at_least(self, value_min: int, *names: str, allow_none: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if value is None and allow_none:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < value_min:
                self._fail(name, f"must be an integer >= {value_min}" + (" (or None)" if allow_none else ""), value)

    def _choice(self, name: str, choices: tuple[Any, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            self._fail(name, f"must be one of {list(choices)}", value)

    def _non_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                self._fail(name, "must be >= 0", value)


# ================================================================================================ spectrum
@dataclass
class SpectrumConfig(Config):
    r"""Trace, :math:`\lambda_{\max}` and the LiSSA settings they imply (:func:`~.spectrum.estimate_spectrum`).

    Attributes:
        trace_probes: Hutchinson probes (the minimum when ``trace_rtol`` is set; at least 2).
        trace_rtol: Stop adding probes once the relative standard error is at most this (``None``: fixed count).
        trace_max_probes: With ``trace_rtol``: the most probes (default ``10 * trace_probes``).
        trace_block_size: Probes per vectorised forward-mode pass.
        probe_kind: ``"rademacher"`` (lowest variance) or ``"gaussian"``.
        trace_deflation: Deflate the Hutchinson probes by the Lanczos basis (default ``True``): the trace is the
            basis' exact share plus Hutchinson on the rest, unbiased and of much lower variance when the spectrum
            decays (:func:`~.spectrum.hutchinson_trace`); no extra product. Ignored for ``lambda_method="sketch"``.
        lambda_method: ``"lanczos"`` (default) or ``"sketch"`` (paper 1's :math:`\Phi H \Phi^\top`).
        lanczos_iter: Most Lanczos products.
        lanczos_tol: Relative Ritz-residual tolerance of Lanczos.
        lanczos_start: Start of a Lanczos run that is not warm-started: ``"random"`` (default, a seeded Gaussian)
            or ``"gradient"``, the mean loss gradient over the sample (one gradient pass; operators with a
            ``loss_gradient()`` method, e.g. every curvature operator). A random vector lies almost wholly in the
            null space of a GNH of rank at most units × outputs; the gradient :math:`J^\top r` lies in its range
            and, during stochastic training, largely in its top eigenspace (measured: fewer wrong early stops at a
            3 % residual, about the same product count; ``docs/guide.md``). A zero or non-finite gradient falls back
            to the random start.
        sketch_dim: Sketch dimension ``d`` for ``lambda_method="sketch"``.
        seed: Seed of the probes and start vectors.
        constant: :math:`C` of the LiSSA batch rule the summary recommends.
        steps_factor: :math:`c` of the LiSSA step rule the summary recommends.
        linearization: ``"auto"``, ``"always"`` or ``"never"``: cached linearisations of the sample's batches for
            the monitor's operator (:mod:`lightning_influence.operators.linearized`).
        linearization_budget: Bytes the cached linearisations may hold (default 1 GiB); batches past it stream.

    Example::

        >>> SpectrumConfig(trace_probes=8, lanczos_iter=8).to_dict()["lambda_method"]
        'lanczos'
    """

    trace_probes: int = 30
    trace_rtol: float | None = None
    trace_max_probes: int | None = None
    trace_block_size: int = 16
    probe_kind: Literal["rademacher", "gaussian"] = "rademacher"
    trace_deflation: bool = True
    lambda_method: Literal["lanczos", "sketch"] = "lanczos"
    lanczos_iter: int = 30
    lanczos_tol: float = 1e-3
    lanczos_start: Literal["random", "gradient"] = "random"
    sketch_dim: int = 50
    seed: int = 0
    constant: float = DEFAULT_LISSA_CONSTANT
    steps_factor: float = DEFAULT_LISSA_STEPS_FACTOR
    linearization: Literal["auto", "always", "never"] = "auto"
    linearization_budget: int = DEFAULT_LINEARIZATION_BUDGET

    def validate(self) -> None:
        """Check every field.

        Raises:
            ConfigurationError: Naming the bad field.
        """
        self._positive("steps_factor")
        self._choice("linearization", ("auto", "always", "never"))
        self._at_least(0, "linearization_budget")
        self._at_least(2, "trace_probes", "sketch_dim")
        self._at_least(1, "trace_block_size", "lanczos_iter")
        self._at_least(2, "trace_max_probes", allow_none=True)
        self._positive("trace_rtol", allow_none=True)
        self._positive("lanczos_tol", "constant")
        self._choice("probe_kind", ("rademacher", "gaussian"))
        self._choice("trace_deflation", (True, False))
        self._choice("lambda_method", ("lanczos", "sketch"))
        self._choice("lanczos_start", ("random", "gradient"))


# ================================================================================================= solvers
@dataclass
class CGConfig(Config):
    r"""Conjugate gradient on :math:`(G + \lambda I)` (:func:`~lightning_influence.solvers.conjugate_gradient`).

    Attributes:
        rtol: Stop when every column's relative residual is at most this (raised to 10 machine epsilons of the
            solve's dtype, :func:`~lightning_influence.solvers.cg.effective_rtol`: 1.2e-6 in float32).
        max_iter: Most iterations (default ``min(P, 1000)``).
        warn: Warn when the tolerance is not met.

    Example::

        >>> CGConfig(rtol=1e-8).rtol
        1e-08
    """

    rtol: float = 1e-6
    max_iter: int | None = None
    warn: bool = True

    def validate(self) -> None:
        """Check every field.

        Raises:
            ConfigurationError: Naming the bad field.
        """
        self._positive("rtol")
        self._at_least(1, "max_iter", allow_none=True)


@dataclass
class LissaConfig(Config):
    r"""LiSSA (:func:`~lightning_influence.solvers.lissa`); ``None`` fields are derived from the spectrum.

    Attributes:
        eta: Step size (default :math:`1/(\lambda_{\max}+\lambda)`).
        steps: Steps (default :math:`\lceil 2(\lambda_{\max}+\lambda)/\lambda\rceil`).
        batch_size: Examples per step (default :math:`\lceil C\,\mathrm{Tr}/\lambda_{\max}\rceil`).
        constant: :math:`C` of the batch rule (paper 1: 2).
        max_steps: Cap on the derived steps.
        average: Fraction of the final iterates averaged (``0``: the last iterate).
        on_divergence: ``"raise"`` or ``"warn"``.
        divergence_slack: Slack of the divergence guard's norm bound.
        max_restarts: Restarts with a doubled :math:`C` after a detected divergence.
        certificate_size: Examples of the certificate sample: the whole pool when it is at most this large (the
            exact residual of the solved system), else a seeded subsample (``None``: no residual).
        certificate_rtol: Residual tolerance for ``converged`` when the certificate is a residual (a given
            operator, or a single chain).
        measure_constant: Measure condition C.1's constant on the model and use it when larger.
        steps_factor: :math:`c` of the step rule :math:`T = \lceil c/(\lambda\eta)\rceil` (paper 1: 2).
        chains: Independent chains (disjoint batch streams) whose tail averages are averaged; with two or more,
            the agreement of their scores certifies the result.
        probes: Pool examples whose per-example gradients the chains' scores are compared on.
        certificate_correlation: ``converged`` needs the estimated correlation of the scores with their noise-free
            values (Spearman-Brown over the chains) to reach this.

    Example::

        >>> LissaConfig(average=0.5).replace(steps=100).steps
        100
    """

    eta: float | None = None
    steps: int | None = None
    batch_size: int | None = None
    constant: float = 2.0
    max_steps: int = 20_000
    average: float = 0.0
    on_divergence: Literal["raise", "warn"] = "raise"
    divergence_slack: float = 1.0
    max_restarts: int = 2
    certificate_size: int | None = 512
    certificate_rtol: float = 0.1
    measure_constant: bool = False
    steps_factor: float = 2.0
    chains: int = 1
    probes: int = 128
    certificate_correlation: float = 0.99

    def validate(self) -> None:
        """Check every field.

        Raises:
            ConfigurationError: Naming the bad field.
        """
        self._positive("eta", allow_none=True)
        self._at_least(1, "steps", "batch_size", "certificate_size", allow_none=True)
        self._at_least(1, "max_steps")
        self._at_least(0, "max_restarts")
        self._positive("constant", "certificate_rtol", "steps_factor")
        self._at_least(1, "chains")
        self._at_least(0, "probes")
        self._non_negative("divergence_slack")
        if not (isinstance(self.certificate_correlation, (int, float)) and 0 < self.certificate_correlation <= 1):
            self._fail("certificate_correlation", "must lie in (0, 1]", self.certificate_correlation)
        if not (isinstance(self.average, (int, float)) and 0.0 <= self.average < 1.0):
            self._fail("average", "must lie in [0, 1)", self.average)
        self._choice("on_divergence", ("raise", "warn"))


@dataclass
class SketchConfig(Config):
    r"""Low-rank sketch of the curvature, its top-``rank`` eigenpairs (:func:`~.solvers.compute_sketch`).

    Attributes:
        rank: Eigenpairs kept (``r``); must not exceed the number of parameters.
        method: ``"lanczos"`` (block Krylov with Rayleigh-Ritz, default: measured more accurate per product) or
            ``"nystrom"`` (randomized Nyström with power iterations).
        oversample: Extra probe columns beyond ``rank`` (block size ``rank + oversample``).
        iterations: Krylov depth (``"lanczos"``: blocks of products) or power iterations plus one
            (``"nystrom"``); the sketch costs ``iterations * (rank + oversample)`` products.
        trace_probes: Hutchinson probes for the captured trace fraction (``0``: not measured).
        seed: Seed of the random start block and the probes.

    Example::

        >>> SketchConfig(rank=8).block_size, SketchConfig(rank=8).num_products
        (18, 54)
        >>> try:
        ...     SketchConfig(rank=0).validate()
        ... except ConfigurationError as e:
        ...     print(e)
        SketchConfig.rank must be an integer >= 1, got 0.
    """

    rank: int = 32
    method: Literal["lanczos", "nystrom"] = "lanczos"
    oversample: int = 10
    iterations: int = 3
    trace_probes: int = 16
    seed: int = 0

    def validate(self) -> None:
        """Check every field.

        Raises:
            ConfigurationError: Naming the bad field.
        """
        self._at_least(1, "rank", "iterations")
        self._at_least(0, "oversample", "trace_probes")
        self._choice("method", ("lanczos", "nystrom"))

    @property
    def block_size(self) -> int:
        """Columns per product block, ``rank + oversample``."""
        return self.rank + self.oversample

    @property
    def num_products(self) -> int:
        """Products of the eigen-sketch (without the trace probes), ``iterations * block_size``."""
        return self.iterations * self.block_size

    def check_rank(self, num_params: int) -> None:
        """Raise if ``rank`` exceeds the number of parameters.

        Raises:
            ConfigurationError: If ``rank > num_params``.
        """
        if self.rank > num_params:
            raise ConfigurationError(
                f"SketchConfig.rank={self.rank} exceeds the model's {num_params} trainable parameters; "
                f"use rank <= {num_params}."
            )


# =============================================================================================== influence
@dataclass
class InfluenceConfig(Config):
    r"""Every setting of an influence computation (:func:`~lightning_influence.influence.influence_scores`).

    Attributes:
        damping: :math:`\lambda > 0` added to the GNH (for L2-regularised training, the L2 coefficient), or
            ``"auto"`` (default): ``damping_fraction`` times :math:`\lambda_{\max}` of the curvature (from a
            ``CurvatureMonitor``'s last spectrum when there is one, else a short Lanczos run). An absolute default
            does not fit real models (a BatchNorm CNN had :math:`\lambda_{\max} \approx 830`, where 1e-3 made CG
            run for many minutes). The :math:`\lambda` used is in ``result.diagnostics["damping"]`` and logged.
        damping_fraction: :math:`\lambda / \lambda_{\max}` under ``damping="auto"`` (default 1e-3: CG then
            needs at most about :math:`\sqrt{1000} \approx 32` times :math:`\log(1/\text{rtol})` iterations).
        solver: ``"cg"``, ``"lissa"``, ``"exact"``, ``"pcg"`` (CG preconditioned by the low-rank sketch: the exact
            answer, certified), ``"lowrank"`` (the sketch's approximate inverse: no products per query) or
            ``"auto"`` (default: ``"exact"`` up to :data:`AUTO_EXACT_MAX_PARAMS` parameters, ``"pcg"`` past
            ``DENSE_MAX_PARAMS``, in between whichever of the two a FLOP count projects to be cheaper for this model,
            curvature sample and number of queries; the choice is in ``result.diagnostics["solver_choice"]``).
        curvature: ``"gnh"`` (default), ``"expected_fisher"``, ``"sampled_fisher"``, ``"finite_difference_gnh"``
            or ``"hessian"`` (may be indefinite; for comparison).
        batch_size: Examples per batch of the fixed-sample curvature operator (CG, certificate, spectrum).
        chunk_size: Examples per vectorised per-example gradient chunk (bounds memory at ``chunk_size * P``).
        normalization: ``"sum"`` (default: per-example gradient of the summed unit losses) or ``"mean"``.
        self_influence: Also compute the self-influence of every scored training example (default ``False``: it
            costs ``n_train / n_query`` times the query solve for the iterative solvers; cheap for ``"exact"``; for
            ``"lowrank"`` one gradient per example and no product, with an error bound).
        top_k: Proponents/opponents kept per query in :meth:`InfluenceResult.to_dict`.
        cg_rtol: CG relative residual tolerance.
        cg_max_iter: CG iteration cap (default ``min(P, 1000)``).
        lissa_constant: :math:`C` of the batch rule :math:`|B| \ge C\,\mathrm{Tr}/\lambda_{\max}` (default 4:
            paper 1 takes 2, but its own App. C check needs 4 for GPT-2, our digits MLPs diverge at 2, and the
            sampling error falls like :math:`1/|B|`; LiSSA still doubles it after a detected divergence).
        lissa_average: Fraction of final LiSSA iterates averaged per chain (default 0.5: the first half is the
            burn-in after which the slowest direction's bias is :math:`e^{-c/2}`).
        lissa_steps_factor: :math:`c` of the step rule :math:`T = \lceil c/(\lambda\eta)\rceil` per chain (default
            :data:`DEFAULT_LISSA_STEPS_FACTOR`; paper 1: 2).
        lissa_chains: Independent LiSSA chains (default 2: their agreement is the certificate).
        lissa_certificate_correlation: Estimated score correlation the certificate needs for ``converged``.
        lissa_max_steps: Cap on LiSSA steps.
        lissa_max_restarts: Restarts with doubled :math:`C` after a detected divergence.
        lissa_on_divergence: ``"raise"`` or ``"warn"``.
        lissa_certificate_size: Examples in the held-out certificate sample (``0``: no certificate).
        lissa_batch_size: Override of the derived LiSSA batch size.
        lissa_steps: Override of the derived number of steps.
        lissa_eta: Override of the derived step size.
        lissa_measure_constant: Measure condition C.1's constant on the model
            (:func:`~lightning_influence.solvers.measure_batch_constant`) and use it when it exceeds
            ``lissa_constant``.
        sketch_rank: Eigenpairs of the low-rank sketch (``"pcg"``, ``"lowrank"``; see :class:`SketchConfig`).
        sketch_method: ``"lanczos"`` or ``"nystrom"``.
        sketch_oversample: Extra sketch columns beyond ``sketch_rank``.
        sketch_iterations: Krylov depth / power iterations of the sketch.
        sketch_trace_probes: Hutchinson probes for the sketch's captured trace fraction.
        lowrank_tail: ``"lowrank"``'s weight on the directions the sketch leaves out: ``"ritz"``
            :math:`1/(\mu_{r+1}+\lambda)` (default) or ``"damping"`` :math:`1/\lambda` (``solvers.lowrank_solve``).
        projection_dim: Project training and query gradients to this many dimensions with a seeded random
            matrix before the dot products of the scores (``None``: no projection; see
            :class:`~lightning_influence.influence.RandomProjection`).
        projection_kind: ``"rademacher"`` or ``"gaussian"`` entries of the projection.
        seed: Seed of every random draw (LiSSA batches, probes, sampled labels).
        dtype: ``"float64"``/``"float32"`` to cast floating inputs (the model's dtype is used for products).

    Example::

        >>> InfluenceConfig(solver="pcg", sketch_rank=16).sketch_config().rank
        16
        >>> cfg = InfluenceConfig(solver="lissa", damping=1e-2)
        >>> cfg.lissa_config().average, cfg.lissa_config().chains, cfg.cg_config().rtol
        (0.5, 2, 1e-06)
    """

    damping: float | Literal["auto"] = "auto"
    damping_fraction: float = 1e-3
    solver: SolverName = "auto"
    curvature: CurvatureKind = "gnh"
    batch_size: int = 256
    chunk_size: int = 64
    normalization: Normalization = "sum"
    self_influence: bool = False
    top_k: int = 10
    cg_rtol: float = 1e-6
    cg_max_iter: int | None = None
    lissa_constant: float = DEFAULT_LISSA_CONSTANT
    lissa_average: float = 0.5
    lissa_steps_factor: float = DEFAULT_LISSA_STEPS_FACTOR
    lissa_chains: int = 2
    lissa_certificate_correlation: float = 0.99
    lissa_max_steps: int = 20_000
    lissa_max_restarts: int = 2
    lissa_on_divergence: Literal["raise", "warn"] = "raise"
    lissa_certificate_size: int = 512
    lissa_batch_size: int | None = None
    lissa_steps: int | None = None
    lissa_eta: float | None = None
    lissa_measure_constant: bool = True
    sketch_rank: int = 32
    sketch_method: Literal["lanczos", "nystrom"] = "lanczos"
    sketch_oversample: int = 10
    sketch_iterations: int = 3
    sketch_trace_probes: int = 16
    lowrank_tail: Literal["damping", "ritz"] = "ritz"
    projection_dim: int | None = None
    projection_kind: Literal["rademacher", "gaussian"] = "rademacher"
    seed: int = 0
    dtype: DtypeName | None = None

    #: The solver names :meth:`validate` accepts.
    SOLVERS = ("cg", "lissa", "exact", "pcg", "lowrank", "auto")

    def validate(self) -> None:
        """Check the values; raises :class:`ConfigurationError` naming the argument and the fix.

        Raises:
            ConfigurationError: For an unknown solver/curvature/normalization or a non-positive size.
        """
        if self.solver not in self.SOLVERS:
            raise ConfigurationError(f"solver must be one of {self.SOLVERS}, got {self.solver!r}.")
        if self.curvature not in ("gnh", "expected_fisher", "sampled_fisher", "finite_difference_gnh", "hessian"):
            raise ConfigurationError(
                "curvature must be one of ['expected_fisher', 'finite_difference_gnh', 'gnh', 'hessian', "
                f"'sampled_fisher'], got {self.curvature!r}."
            )
        if self.normalization not in ("sum", "mean"):
            raise ConfigurationError(f"normalization must be 'sum' or 'mean', got {self.normalization!r}.")
        for name in ("batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.top_k < 0:
            raise ConfigurationError(f"top_k must be >= 0, got {self.top_k}.")
        if self.damping != "auto" and not _is_number(self.damping, 0.0):
            raise ConfigurationError(
                f"damping must be a number >= 0 or 'auto' (damping_fraction * lambda_max), got {self.damping!r}."
            )
        if not (_is_number(self.damping_fraction, 0.0) and self.damping_fraction > 0):
            raise ConfigurationError(f"damping_fraction must be a number > 0, got {self.damping_fraction!r}.")
        if self.solver == "lissa" and self.damping != "auto" and not self.damping > 0:
            raise ConfigurationError(f"solver='lissa' needs damping > 0, got {self.damping}.")
        if self.dtype not in (None, "float64", "float32", "float16", "bfloat16"):
            raise ConfigurationError(f"dtype must be None or a floating dtype name, got {self.dtype!r}.")
        if self.solver in ("pcg", "lowrank", "auto") and self.damping != "auto" and not self.damping > 0:
            raise ConfigurationError(f"solver={self.solver!r} needs damping > 0, got {self.damping}.")
        if self.projection_dim is not None and (isinstance(self.projection_dim, bool) or self.projection_dim < 1):
            raise ConfigurationError(f"projection_dim must be a positive number of dimensions (or None for no "
                                     f"projection), got {self.projection_dim!r}.")
        for name, choices in (("projection_kind", ("rademacher", "gaussian")), ("lowrank_tail", ("damping", "ritz"))):
            if getattr(self, name) not in choices:
                raise ConfigurationError(f"{name} must be one of {choices}, got {getattr(self, name)!r}.")
        self.cg_config().validate()
        self.lissa_config().validate()
        self.sketch_config().validate()

    def torch_dtype(self) -> torch.dtype | None:
        """``dtype`` as a ``torch.dtype``.

        Returns:
            The dtype, or ``None``.
        """
        return None if self.dtype is None else getattr(torch, self.dtype)

    def cg_config(self) -> CGConfig:
        """The CG settings these fields describe.

        Returns:
            A :class:`CGConfig`.
        """
        return CGConfig(rtol=self.cg_rtol, max_iter=self.cg_max_iter)

    def sketch_config(self) -> SketchConfig:
        """The sketch settings these fields describe.

        Returns:
            A :class:`SketchConfig`.
        """
        return SketchConfig(rank=self.sketch_rank, method=self.sketch_method, oversample=self.sketch_oversample,
                            iterations=self.sketch_iterations, trace_probes=self.sketch_trace_probes, seed=self.seed)

    def lissa_config(self) -> LissaConfig:
        """The LiSSA settings these fields describe.

        Returns:
            A :class:`LissaConfig`.
        """
        return LissaConfig(
            eta=self.lissa_eta, steps=self.lissa_steps, batch_size=self.lissa_batch_size,
            constant=self.lissa_constant, max_steps=self.lissa_max_steps, average=self.lissa_average,
            on_divergence=self.lissa_on_divergence, max_restarts=self.lissa_max_restarts,
            certificate_size=self.lissa_certificate_size or None, measure_constant=self.lissa_measure_constant,
            steps_factor=self.lissa_steps_factor, chains=self.lissa_chains,
            certificate_correlation=self.lissa_certificate_correlation,
        )


# ===================================================================================================== cv
@dataclass
class CVConfig(Config):
    r"""AFIF approximate k-fold CV (:func:`~lightning_influence.cv.approximate_cv`).

    Attributes:
        curvature: ``"fisher"`` (default), ``"gnh"`` or ``"hessian"`` (Hessian-based approximate CV).
        downdate: Use the fold-downdated curvature :math:`A_k` (default) or the paper's single full-data one.
        fold_objective: ``"mean"`` (default) or ``"weighted"``.
        solver: ``"dense"``, ``"cg"``, ``"pcg"`` (CG preconditioned by one sketch of the full-data curvature,
            ``sketch_rank`` 64 by default, 222 products once, shared by every fold; same answer and true-residual
            certificate as CG) or
            ``"auto"`` (dense up to ``dense_max_params`` parameters, ``"pcg"`` above: past the dense limit the
            fixed sketch cost is repaid by the folds' shorter solves, see ``tests/test_cv_pcg.py``; ``"cg"`` above
            for a fixed ``damping=0``, which the preconditioner cannot take).
        damping: :math:`\delta \ge 0` added as :math:`\delta I` to :math:`A_k`, or ``"auto"`` (default): per fold, no
            damping when :math:`A_k` is positive definite, else the least damping that makes it so (dense solver:
            :math:`\max(0, -\lambda_{\min}) + 10^{-8}\lambda_{\max}`; CG: none if undamped CG converges within 50
            iterations, else :math:`10^{-4}\lambda_{\max}`, raised tenfold while CG fails; PCG: always
            :math:`10^{-4}\lambda_{\max}` with one :math:`\lambda_{\max}` for all folds, the sketch's top
            eigenvalue, raised tenfold while PCG fails). The :math:`\delta` used
            is in each fold's certificate (``"damping"``).
        cg_rtol: CG relative residual tolerance.
        cg_max_iter: CG iteration cap (default ``min(P, 1000)``).
        prox_tol: Relative residual tolerance of the metric prox.
        prox_max_iter: FISTA iteration cap of the prox.
        dense_max_params: Largest ``P`` for which ``"auto"`` forms dense matrices.
        center: Subtract the step the full data would still take (for weights that are not a minimiser).
        sketch_rank: Eigenpairs of ``"pcg"``'s one full-data sketch (clamped to ``P``). Default 64, measured on the
            HF GPT-2 example (28,896 parameters, 5 folds, float32): rank 32 left PCG 193-206 iterations per fold
            (1,234 passes in all), rank 64 65-82 (676 passes with its 222-product sketch), rank 128 with 2 blocks
            59-76 (716 passes).
        sketch_iterations: Krylov blocks of that sketch: it costs ``sketch_iterations * (sketch_rank + 10)``
            curvature products, once (:meth:`sketch_config`).

    Example::

        >>> CVConfig(solver="cg").replace(damping=1e-3).damping
        0.001
        >>> CVConfig().sketch_config().num_products
        222
    """

    curvature: Literal["fisher", "gnh", "hessian"] = "fisher"
    downdate: bool = True
    fold_objective: Literal["mean", "weighted"] = "mean"
    solver: Literal["auto", "dense", "cg", "pcg"] = "auto"
    damping: float | Literal["auto"] = "auto"
    cg_rtol: float = 1e-10
    cg_max_iter: int | None = None
    prox_tol: float = 1e-12
    prox_max_iter: int = 10_000
    dense_max_params: int = 2000
    center: bool = False
    sketch_rank: int = 64
    sketch_iterations: int = 3

    def cg_limit(self, num_params: int) -> int:
        """Most CG/PCG iterations of one fold's solve: ``cg_max_iter``, or CG's own default ``min(P, 1000)``.

        Returns:
            The iteration cap.
        """
        return self.cg_max_iter if self.cg_max_iter is not None else min(num_params, 1000)

    def sketch_config(self, num_params: int | None = None) -> SketchConfig:
        """The ``"pcg"`` sketch these fields describe (oversample 10, no trace probes; rank clamped to ``num_params``).

        Returns:
            A :class:`SketchConfig`.
        """
        rank = self.sketch_rank if num_params is None else min(self.sketch_rank, num_params)
        return SketchConfig(rank=rank, oversample=10, iterations=self.sketch_iterations, trace_probes=0)

    def validate(self) -> None:
        """Check every field.

        Raises:
            ConfigurationError: Naming the bad field.
        """
        if self.curvature not in ("fisher", "gnh", "hessian"):
            raise ConfigurationError(f"curvature must be one of ['fisher', 'gnh', 'hessian'], got {self.curvature!r}.")
        if self.fold_objective not in ("mean", "weighted"):
            raise ConfigurationError(
                f"fold_objective must be 'mean' (refit the mean loss on the remaining data) or 'weighted' (the "
                f"paper's (1/N) sum_i w_i l_i), got {self.fold_objective!r}."
            )
        if self.solver not in ("auto", "dense", "cg", "pcg"):
            raise ConfigurationError(f"solver must be 'auto', 'dense', 'cg' or 'pcg', got {self.solver!r}.")
        if self.solver == "pcg" and self.damping != "auto" and not self.damping > 0:
            raise ConfigurationError(f"solver='pcg' needs damping > 0 or 'auto', got {self.damping}.")
        if self.damping != "auto" and not _is_number(self.damping, 0.0):
            raise ConfigurationError(
                f"damping must be a number >= 0 or 'auto' (the least damping that makes each fold's curvature "
                f"positive definite), got {self.damping!r}."
            )
        self._positive("cg_rtol", "prox_tol")
        self._at_least(1, "cg_max_iter", allow_none=True)
        self._at_least(1, "prox_max_iter")
        self._at_least(0, "dense_max_params")
        self._at_least(1, "sketch_rank", "sketch_iterations")


# =================================================================================================== pbrf
@dataclass
class PBRFConfig(Config):
    r"""The proximal Bregman response (:class:`~lightning_influence.pbrf.PBRF`).

    Attributes:
        damping: :math:`\lambda > 0` of the proximity term (``None``: the damping of the influence being validated).
        epsilon: :math:`\epsilon > 0` (``None``: :math:`1/N` with :math:`N` the global number of units).
        dtype: Floating dtype of the model copy the PBO is solved in.
        optimizer: ``"newton_cg"`` (default) or ``"lbfgs"``.
        tol: Relative gradient-norm tolerance of each solve.
        max_iter: Most optimiser iterations per solve.
        history_size: L-BFGS memory.
        cg_rtol: Relative residual of the inner CG solves (``newton_cg``).
        preconditioner: Of those inner solves, built once at :math:`\hat\theta` and reused by every Newton step of
            every solve: ``"dense"`` (the Cholesky factor of the dense damped data GNH, assembled in float32 and
            factored in the solve's dtype, updated per example by its own rank-``D`` term), ``"sketch"`` (the
            Nyström preconditioner of a low-rank sketch, as ``solver="pcg"``), ``"none"`` (plain CG) or ``"auto"``
            (default: dense up to ``DENSE_MAX_PARAMS`` parameters, the sketch above). The Newton steps are CG's own
            answer either way (same tolerance, true residual); only the iteration count changes.
        sketch_rank: Eigenpairs of the ``"sketch"`` preconditioner (clamped to ``P``).
        normalization: ``"sum"`` (default) or ``"mean"`` (match the influence scores being validated).
        warn: Warn (with the residual) when a solve does not converge.

    Example::

        >>> PBRFConfig(damping=1e-2).torch_dtype()
        torch.float64
    """

    damping: float | None = None
    epsilon: float | None = None
    dtype: DtypeName = "float64"
    optimizer: Literal["newton_cg", "lbfgs"] = "newton_cg"
    tol: float = 1e-5
    max_iter: int = 500
    history_size: int = 50
    cg_rtol: float = 1e-8
    preconditioner: Literal["auto", "dense", "sketch", "none"] = "auto"
    sketch_rank: int = 64
    normalization: Normalization = "sum"
    warn: bool = True

    def validate(self) -> None:
        """Check every field.

        Raises:
            ConfigurationError: Naming the bad field.
        """
        if self.epsilon is not None and not (
            isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0
        ):
            raise ConfigurationError(
                f"epsilon must be a finite number > 0 (the up/down-weighting of the training example), got "
                f"{self.epsilon}; the PBRF uses a central difference over +epsilon and -epsilon, so its sign is "
                "already covered. Typical values: 1/N (one example of N) or smaller."
            )
        if self.damping is not None and not self.damping > 0:
            raise ConfigurationError(
                f"damping must be > 0 for the PBRF (the proximity term makes the objective strongly convex), got "
                f"{self.damping}; use the damping of the influence scores you validate."
            )
        if self.optimizer not in ("lbfgs", "newton_cg"):
            raise ConfigurationError(f"optimizer must be 'lbfgs' or 'newton_cg', got {self.optimizer!r}.")
        if not self.tol > 0:
            raise ConfigurationError(f"tol must be positive, got {self.tol}.")
        if self.max_iter < 1:
            raise ConfigurationError(f"max_iter must be >= 1, got {self.max_iter}.")
        if self.normalization not in ("sum", "mean"):
            raise ConfigurationError(f"normalization must be 'sum' or 'mean', got {self.normalization!r}.")
        self._at_least(1, "history_size", "sketch_rank")
        self._positive("cg_rtol")
        self._choice("preconditioner", ("auto", "dense", "sketch", "none"))
        self._choice("dtype", ("float64", "float32", "float16", "bfloat16"))

    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype``.

        Returns:
            The dtype.
        """
        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype
