r"""Spectral statistics of a curvature operator and the LiSSA settings they imply.

* :func:`hutchinson_trace`: :math:`\mathrm{Tr}(A) = \mathbb{E}[v^\top A v]` for Rademacher (or Gaussian) probes,
  reported with its standard error, optionally stopping once the relative standard error is below a target.
* :func:`frobenius_norm`: :math:`\|A\|_F^2 = \mathrm{Tr}(A^2) = \mathbb{E}[(A v)^\top (B v)]` with ``B`` an
  independent copy of ``A`` (two products per probe; paper 1, App. D).
* :func:`lanczos_lambda_max`: the largest eigenvalue by Lanczos with full re-orthogonalisation (default).
* :func:`sketch_lambda_max`: the paper's sketch :math:`\lambda_{\max}(\Phi A \Phi^\top)` with
  :math:`\Phi_{ij} \sim N(0, 1/d)`, whose expectation :math:`\mathbb{E}\,\Phi A \Phi^\top = \mathrm{Tr}(A)/d \cdot I`
  biases it upward by about :math:`\mathrm{Tr}(A)/d`; the correction
  :math:`\lambda_{\max}(\hat A) - \mathrm{Tr}(\hat A)/d` (Swartworth & Woodruff, 2023) is applied by default.
* :func:`lissa_settings`: paper 1, §3: :math:`\eta = 1/(\lambda_{\max} + \lambda)`,
  :math:`|B| \ge C\,\mathrm{Tr}(H)/\lambda_{\max}` with :math:`C = 2`, :math:`T \approx 2/(\lambda\eta)`.

Operators are anything with ``num_params``, ``matvec`` and ``matmat`` (see
:mod:`lightning_influence.operators`); a dense symmetric tensor works too through :class:`DenseOperator`.
Probes come from a dedicated seeded generator; the global RNG is never touched.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from lightning_influence.config import DEFAULT_LISSA_CONSTANT, SpectrumConfig
from lightning_influence.exceptions import ConfigurationError, NonFiniteError
from lightning_influence.metrics import (
    CURVATURE_CRITICAL_BATCH_SIZE,
    CURVATURE_LAMBDA_MAX,
    CURVATURE_PRODUCTS,
    CURVATURE_SECONDS,
    CURVATURE_TRACE,
    CURVATURE_TRACE_STDERR,
    LISSA_BATCH_SIZE,
    LISSA_ETA,
    LISSA_STEPS,
    regroup,
)
from lightning_influence.operators.base import DenseOperator, LinearOperator
from lightning_influence.params import ProbeKind, derive_seed, make_generator, probe

__all__ = [
    "DEFAULT_LISSA_CONSTANT",
    "DenseOperator",
    "EigenEstimate",
    "LinearOperatorLike",
    "LissaSettings",
    "SpectrumSummary",
    "TraceEstimate",
    "critical_batch_size",
    "estimate_spectrum",
    "frobenius_norm",
    "hutchinson_trace",
    "lanczos_lambda_max",
    "lissa_settings",
    "sketch_lambda_max",
]

#: Anything with ``num_params``, ``matvec`` and ``matmat`` (see :class:`~lightning_influence.operators.LinearOperator`).
LinearOperatorLike = LinearOperator


def _dtype(op: Any) -> torch.dtype:
    return getattr(op, "param_dtype", torch.float32)


def _device(op: Any) -> torch.device:
    return getattr(op, "device", torch.device("cpu"))


# --------------------------------------------------------------------------------------------------- trace
@dataclass
class TraceEstimate:
    """Hutchinson estimate of a trace.

    Attributes:
        value: Mean of the probe quadratic forms.
        stderr: Standard error of the mean (sample standard deviation / sqrt(num_probes)).
        num_probes: Probes used.
        samples: The individual quadratic forms.

    Example::

        >>> est = hutchinson_trace(DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0]))), num_probes=3)
        >>> est.value, est.num_probes, len(est.samples)
        (6.0, 3, 3)
        >>> TraceEstimate(value=4.0, stderr=0.2, num_probes=10).relative_stderr
        0.05
    """

    value: float
    stderr: float
    num_probes: int
    samples: list[float] = field(default_factory=list, repr=False)

    @property
    def relative_stderr(self) -> float:
        """``stderr / |value|`` (inf for a zero estimate)."""
        return self.stderr / abs(self.value) if self.value != 0 else math.inf


def hutchinson_trace(
    op: LinearOperatorLike,
    num_probes: int = 30,
    *,
    max_probes: int | None = None,
    rtol: float | None = None,
    seed: int = 0,
    kind: ProbeKind = "rademacher",
    block_size: int = 16,
    deflate: Tensor | None = None,
    deflated_trace: float = 0.0,
) -> TraceEstimate:
    r"""Hutchinson's estimator :math:`\widehat{\mathrm{Tr}} = \frac1m \sum_i v_i^\top A v_i`, optionally deflated.

    Uses the operator's ``quadratic_forms`` (a block of probes in one vectorised forward-mode pass) when it has
    one, else :meth:`quadratic_form`; for the GNH both need forward-mode products only.

    Deflation (the idea of Hutch++, Meyer et al. 2021, with a basis that costs nothing extra): given an
    orthonormal basis :math:`Q` (rows) whose :math:`\mathrm{Tr}(Q^\top A Q)` is known (``deflated_trace``; e.g.
    the Lanczos basis of :func:`lanczos_lambda_max` and the sum of its :math:`\alpha_i`), every probe is
    projected, :math:`v' = (I - Q^\top Q) v`, and each sample is
    :math:`\mathrm{Tr}(Q^\top A Q) + v'^\top A v'`. Since :math:`\mathrm{Tr}(A) = \mathrm{Tr}(Q^\top A Q) +
    \mathrm{Tr}((I-Q^\top Q) A (I-Q^\top Q))` for symmetric :math:`A`, the estimate stays unbiased for any
    :math:`Q` drawn independently of the probes, and its variance is that of Hutchinson on the deflated operator:
    when :math:`Q` spans the dominant eigenvectors (the GNH's spectrum decays fast) that is far smaller, so fewer
    probes reach the same standard error.

    Args:
        op: The operator.
        num_probes: Probes to draw (the minimum when ``rtol`` is set; at least 2 for a standard error).
        max_probes: With ``rtol``: the most probes to draw (default ``10 * num_probes``).
        rtol: Stop once ``stderr / |estimate|`` is at or below this (adaptive rule); ``None`` for a fixed count.
        seed: Probe seed.
        kind: ``"rademacher"`` or ``"gaussian"``.
        block_size: Probes per vectorised pass (memory grows with it; results do not depend on it).
        deflate: Orthonormal rows ``(k, P)`` to deflate (``None``: plain Hutchinson).
        deflated_trace: :math:`\mathrm{Tr}(Q^\top A Q)` of ``deflate``'s rows, added to every sample.

    Returns:
        The estimate with its standard error.

    Raises:
        ConfigurationError: If ``num_probes < 2`` or ``rtol <= 0``.
        NonFiniteError: If a quadratic form is not finite.

    Example::

        >>> est = hutchinson_trace(DenseOperator(torch.eye(4)), num_probes=5)
        >>> est.value, est.stderr
        (4.0, 0.0)
        >>> a = torch.diag(torch.tensor([100.0, 1.0, 1.0, 1.0], dtype=torch.float64))
        >>> q = torch.eye(4, dtype=torch.float64)[:1]  # deflate the top eigenvector, Tr(q A q^T) = 100
        >>> est = hutchinson_trace(DenseOperator(a), num_probes=4, deflate=q, deflated_trace=100.0)
        >>> est.value, est.stderr  # exact: the rest of the spectrum is flat and Rademacher probes are exact on it
        (103.0, 0.0)
    """
    if num_probes < 2:
        raise ConfigurationError(f"num_probes must be >= 2 to report a standard error, got {num_probes}.")
    if rtol is not None and rtol <= 0:
        raise ConfigurationError(f"rtol must be positive, got {rtol}.")
    limit = num_probes if rtol is None else (max_probes if max_probes is not None else 10 * num_probes)
    gen = make_generator(seed)
    samples: list[float] = []
    batched = getattr(op, "quadratic_forms", None)
    while len(samples) < limit:
        # Probes are drawn one at a time from the generator either way, so results do not depend on blocking.
        block = min(limit - len(samples), block_size if batched is not None else 1,
                    max(num_probes - len(samples), 1) if rtol is not None else limit)
        rows = torch.empty(block, op.num_params, dtype=_dtype(op))
        for j in range(block):  # each probe written into its row: no strided (P, block) stack
            rows[j] = probe(op.num_params, gen, kind=kind, dtype=rows.dtype)
        rows = rows.to(_device(op))
        if deflate is not None and deflate.numel():
            # in the probes' row layout: (k, P) @ (P, block), then one fused rows - coeffs^T Q; a (P, block)
            # row-major result would make every probe strided (measured 3x slower on a 1.2M-parameter CNN)
            q = deflate.to(device=rows.device, dtype=rows.dtype)
            rows = torch.addmm(rows, (q @ rows.T).T, q, alpha=-1.0)
        vs = rows.T  # (P, block) with contiguous columns
        if batched is not None:
            qs = [float(q) for q in batched(vs)]
        else:
            single = getattr(op, "quadratic_form", None)
            v0 = vs[:, 0]
            qs = [float(single(v0) if single is not None else torch.dot(v0, op.matvec(v0).to(v0.dtype)))]
        for value in qs:
            if not math.isfinite(value):
                raise NonFiniteError(f"Hutchinson probe {len(samples)} gave a non-finite quadratic form ({value}).")
            samples.append(value + deflated_trace)
        if rtol is not None and len(samples) >= num_probes:
            mean, se = _mean_se(samples)
            if mean != 0 and se / abs(mean) <= rtol:
                break
    mean, se = _mean_se(samples)
    return TraceEstimate(value=mean, stderr=se, num_probes=len(samples), samples=samples)


def _mean_se(samples: list[float]) -> tuple[float, float]:
    t = torch.tensor(samples, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True) / math.sqrt(len(samples))) if len(samples) > 1 else math.inf


def frobenius_norm(
    op: LinearOperatorLike, other: LinearOperatorLike | None = None, num_probes: int = 20, *, seed: int = 0
) -> TraceEstimate:
    r"""Estimate :math:`\|A\|_F^2 = \mathrm{Tr}(A^2)` as the mean of :math:`(A v)^\top (B v)`.

    With ``other`` an operator on an independent sample of the same population, the estimate is unbiased for the
    population :math:`\|H\|_F^2` (paper 1, App. D); with ``other=None`` it is :math:`\|A\|_F^2` of ``op`` itself.

    Returns:
        A :class:`TraceEstimate` of :math:`\|A\|_F^2` (take the square root for the norm).

    Raises:
        ConfigurationError: If ``num_probes < 2``.

    Example::

        >>> round(frobenius_norm(DenseOperator(2 * torch.eye(3)), num_probes=4).value, 6)
        12.0
    """
    if num_probes < 2:
        raise ConfigurationError(f"num_probes must be >= 2, got {num_probes}.")
    gen = make_generator(seed)
    samples = []
    for _ in range(num_probes):
        v = probe(op.num_params, gen, dtype=_dtype(op)).to(_device(op))
        a = op.matvec(v)
        b = a if other is None else other.matvec(v)
        samples.append(float(torch.dot(a, b)))
    mean, se = _mean_se(samples)
    return TraceEstimate(value=mean, stderr=se, num_probes=num_probes, samples=samples)


# ------------------------------------------------------------------------------------------- eigenvalue
@dataclass
class EigenEstimate:
    r"""Estimate of the largest eigenvalue.

    Attributes:
        value: The estimate.
        method: ``"lanczos"`` or ``"sketch"``.
        num_products: Operator products used.
        residual: Lanczos: Ritz residual norm :math:`\|A u - \theta u\|`; sketch: the bias correction applied.
        converged: Lanczos: residual below ``tol * value``; sketch: always ``True``.
        vector: Lanczos: the unit top Ritz vector (a warm start for the next call); sketch: ``None``.
        basis: Lanczos: the orthonormal Krylov basis, one row per product (``(k, P)``, in the operator's
            dtype; float32 for half-precision operators); sketch: ``None``. It spans the top of the spectrum,
            which :func:`hutchinson_trace` deflates.
        basis_trace: Lanczos: :math:`\mathrm{Tr}(Q^\top A Q) = \sum_i q_i^\top A q_i` over that basis (the
            Lanczos :math:`\alpha_i`, exact, no extra product); sketch: ``nan``.

    Example::

        >>> est = lanczos_lambda_max(DenseOperator(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))))
        >>> round(est.value, 8), est.method, est.converged, est.num_products <= 2
        (3.0, 'lanczos', True, True)
    """

    value: float
    method: str
    num_products: int
    residual: float
    converged: bool
    vector: Tensor | None = field(default=None, repr=False, compare=False)
    basis: Tensor | None = field(default=None, repr=False, compare=False)
    basis_trace: float = math.nan


def lanczos_lambda_max(
    op: LinearOperatorLike, max_iter: int = 30, *, tol: float = 1e-3, seed: int = 0, start: Tensor | None = None
) -> EigenEstimate:
    r"""Largest eigenvalue by Lanczos with full re-orthogonalisation, optionally warm-started.

    Stops when the Ritz residual :math:`|\beta_k s_k|` of the top Ritz pair is at most ``tol`` times the Ritz
    value, or after ``max_iter`` products. Ritz values are lower bounds of :math:`\lambda_{\max}` that converge
    fast when the top of the spectrum is separated (the usual case for the GNH, whose spectrum decays quickly).
    The Krylov basis is one preallocated ``(max_iter + 1, P)`` block; each step re-orthogonalises against it
    (classical Gram-Schmidt, repeated once when a running estimate of the basis' loss of orthogonality would
    pass :math:`\sqrt{\epsilon}`: semi-orthogonality, which keeps the Ritz values as accurate as full
    orthogonality, Simon 1984; "twice is enough"), so the work outside the operator products is
    :math:`O(P k)` per step in BLAS calls, and finiteness is checked on the step's scalars (a NaN or Inf anywhere in
    a product reaches its norm), not by another pass over the vector. ``start`` (e.g. the previous measurement's
    :attr:`EigenEstimate.vector`) replaces the random start: when the top eigenvector moves slowly, a warm start needs
    far fewer products.

    Args:
        op: A symmetric operator.
        max_iter: Most products (the Krylov dimension).
        tol: Relative residual tolerance.
        seed: Seed of the random start vector (used when ``start`` is ``None``, zero or of the wrong length).
        start: Start vector of length ``P`` (any scale).

    Returns:
        The estimate, with products used, the residual and the top Ritz vector.

    Raises:
        ConfigurationError: If ``max_iter < 1``.
        NonFiniteError: If a product is not finite.

    Example::

        >>> a = DenseOperator(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)))
        >>> est = lanczos_lambda_max(a)
        >>> round(est.value, 8), est.vector.abs().argmax().item()
        (5.0, 4)
        >>> lanczos_lambda_max(a, start=est.vector).num_products  # warm start at the eigenvector: one product
        1
    """
    if max_iter < 1:
        raise ConfigurationError(f"max_iter must be >= 1, got {max_iter}.")
    n = op.num_params
    dtype, device = _dtype(op), _device(op)
    # The basis lives in the operator's dtype (float32 for half-precision operators): with full
    # re-orthogonalisation float32 keeps the basis orthogonal to ~1e-6, far below the tolerance, and halves
    # the memory traffic of every step (the part of a step that is not the product), while float64
    # operators stay float64 and exact. The tridiagonal recurrence itself is always float64.
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    m = min(max_iter, n)
    basis = torch.empty(m + 1, n, dtype=work, device=device)
    basis[0] = _start_vector(n, work, device, seed, start)
    alphas = torch.zeros(m, dtype=torch.float64)
    betas = torch.zeros(m, dtype=torch.float64)
    theta, resid, s = 0.0, math.inf, torch.ones(1, dtype=torch.float64)
    eps = torch.finfo(work).eps
    loss = eps  # running estimate of the basis' loss of orthogonality, max |q_i . q_j|
    for k in range(m):
        w = op.matvec(basis[k].to(dtype)).to(work)
        q = basis[: k + 1]
        coeffs = torch.mv(q, w)  # one pass gives alpha_k (= q_k . w) and every Gram-Schmidt coefficient
        alphas[k] = float(coeffs[k])
        norm = float(w.norm())
        if not (math.isfinite(alphas[k].item()) and math.isfinite(norm)):  # NaN/Inf anywhere reaches both
            raise NonFiniteError(f"Lanczos product {k} is not finite.")
        w = torch.addmv(w, q.T, coeffs, alpha=-1.0)  # one fused pass over the basis (w - Q^T Q w)
        beta = float(w.norm())
        # One pass leaves q_{k+1} about (eps + loss) sqrt(k) norm / beta off orthogonal; a second pass (twice is
        # enough) only when that would break semi-orthogonality (sqrt(eps)), which keeps T's eigenvalues as
        # accurate as full orthogonality would (Simon 1984). Rare in float32 at a 1e-3 residual, never in float64.
        drift = (eps + loss) * math.sqrt(k + 1) * norm / max(beta, 1e-300)
        if drift > math.sqrt(eps):
            w = torch.addmv(w, q.T, torch.mv(q, w), alpha=-1.0)
            beta, drift = float(w.norm()), eps
        loss = drift
        evals, evecs = torch.linalg.eigh(_tridiagonal(alphas[: k + 1], betas[:k]))
        theta, s = float(evals[-1]), evecs[:, -1]
        resid = abs(beta * float(s[-1]))
        if resid <= tol * abs(theta) or beta <= 1e-12 * max(abs(theta), 1e-300) or k == m - 1:
            break
        torch.div(w, beta, out=basis[k + 1])
        betas[k] = beta
    k = s.numel()
    vector = basis[:k].T @ s.to(work)
    converged = resid <= tol * abs(theta) or beta <= 1e-12 * max(abs(theta), 1e-300)
    return EigenEstimate(theta, "lanczos", k, resid, converged, vector=vector / vector.norm(), basis=basis[:k],
                         basis_trace=float(alphas[:k].sum()))


def _tridiagonal(alphas: Tensor, betas: Tensor) -> Tensor:
    """The symmetric tridiagonal matrix with diagonal ``alphas`` and off-diagonal ``betas``."""
    t = torch.diag(alphas)
    if betas.numel():
        t = t + torch.diag(betas, 1) + torch.diag(betas, -1)
    return t


def _usable_start(start: Tensor | None, n: int) -> bool:
    """Whether ``start`` can start Lanczos: length ``n``, finite (NaN/Inf anywhere reaches the norm), non-zero."""
    if start is None or start.numel() != n:
        return False
    norm = float(start.norm())
    return math.isfinite(norm) and norm > 0


def _start_vector(n: int, dtype: torch.dtype, device: torch.device, seed: int, start: Tensor | None) -> Tensor:
    """Unit start vector: ``start`` when usable (:func:`_usable_start`), else a seeded Gaussian."""
    q = None if start is None else start.detach().reshape(-1).to(device=device, dtype=dtype)
    if q is not None and _usable_start(q, n):
        return q / q.norm()
    q = probe(n, make_generator(seed), kind="gaussian", dtype=dtype).to(device)
    return q / q.norm()


def sketch_lambda_max(
    op: LinearOperatorLike, dim: int = 50, *, seed: int = 0, bias_correction: bool = True
) -> EigenEstimate:
    r"""Paper 1's sketch: :math:`\lambda_{\max}(\Phi A \Phi^\top)` with :math:`\Phi \in \mathbb{R}^{d \times P}`.

    The entries are :math:`\Phi_{ij} \sim N(0, 1/d)`. Costs ``dim`` products. Uncorrected, the estimate is
    biased upward by about :math:`\mathrm{Tr}(A)/d` (since
    :math:`\mathbb{E}[\Phi A \Phi^\top] = \mathrm{Tr}(A)/d \cdot I`); with ``bias_correction`` the returned value
    is :math:`\lambda_{\max}(\hat A) - \mathrm{Tr}(\hat A)/d`, whose error is of order :math:`\|A\|_F/\sqrt d`.
    Lanczos is cheaper and more accurate for the same budget; the sketch is kept for
    comparison with the paper. ``residual`` holds the correction that was (or would be) subtracted.

    Returns:
        An :class:`EigenEstimate` of :math:`\lambda_{\max}(A)`.

    Raises:
        ConfigurationError: If ``dim < 2``.

    Example::

        >>> a = torch.diag(torch.tensor([10.0] + [0.01] * 99, dtype=torch.float64))
        >>> 8.0 < sketch_lambda_max(DenseOperator(a), dim=80).value < 12.0
        True
    """
    if dim < 2:
        raise ConfigurationError(f"sketch dim must be >= 2, got {dim}.")
    n = op.num_params
    dtype, device = _dtype(op), _device(op)
    gen = make_generator(seed)
    phi = probe((dim, n), gen, kind="gaussian", dtype=torch.float64).to(device) / math.sqrt(dim)
    cols = [op.matvec(phi[i].to(dtype)).to(torch.float64) for i in range(dim)]
    sketch = phi @ torch.stack(cols, 1)  # (d, d) = Phi A Phi^T
    sketch = 0.5 * (sketch + sketch.T)
    top = float(torch.linalg.eigvalsh(sketch)[-1])
    correction = float(torch.trace(sketch)) / dim
    value = top - correction if bias_correction else top
    return EigenEstimate(value, "sketch", dim, correction, True)


# ------------------------------------------------------------------------------------------------ LiSSA
@dataclass
class LissaSettings:
    r"""LiSSA hyperparameters from the spectrum (paper 1, §3, Table 1).

    Attributes:
        eta: Step size :math:`1/(\lambda_{\max} + \lambda)`.
        batch_size: :math:`\lceil C\,\mathrm{Tr}/\lambda_{\max} \rceil` units per step (examples or tokens).
        steps: :math:`\lceil 2 / (\lambda \eta) \rceil = \lceil 2 (\lambda_{\max} + \lambda)/\lambda \rceil`.
        damping: :math:`\lambda`.
        constant: :math:`C`.
        batch_size_capped: ``True`` if the recommended batch was larger than the data and was cut to it.

    Example::

        >>> s = lissa_settings(trace=30.0, lambda_max=3.0, damping=1.0, dataset_size=8)
        >>> s.eta == 1 / (3.0 + 1.0), s.steps  # steps = 2 (3 + 1) / 1
        (True, 8)
        >>> s.batch_size, s.batch_size_capped  # 2 * 30 / 3 = 20 units wanted, only 8 available
        (8, True)
    """

    eta: float
    batch_size: int
    steps: int
    damping: float
    constant: float = 2.0
    batch_size_capped: bool = False


def critical_batch_size(trace: float, lambda_max: float) -> float:
    r""":math:`\mathrm{Tr}(H)/\lambda_{\max}(H)`, the effective rank that sets LiSSA's minimum batch size.

    Returns:
        The critical batch size ``trace / lambda_max``.

    Raises:
        NonFiniteError: For a non-finite or non-positive ``lambda_max``.

    Example::

        >>> critical_batch_size(12.0, 3.0)
        4.0
    """
    if not math.isfinite(trace) or not math.isfinite(lambda_max) or lambda_max <= 0:
        raise NonFiniteError(
            f"critical batch size needs a finite trace and positive lambda_max; got trace={trace}, "
            f"lambda_max={lambda_max}. A zero or negative lambda_max means the curvature sample is degenerate."
        )
    return trace / lambda_max


def lissa_settings(
    trace: float,
    lambda_max: float,
    damping: float,
    *,
    constant: float = 2.0,
    dataset_size: int | None = None,
    max_steps: int | None = None,
    steps_factor: float = 2.0,
) -> LissaSettings:
    r"""LiSSA settings from :math:`\mathrm{Tr}(H)`, :math:`\lambda_{\max}(H)` and the damping (paper 1, §3).

    Args:
        trace: :math:`\mathrm{Tr}(H)` of the undamped, unit-averaged GNH.
        lambda_max: :math:`\lambda_{\max}(H)`.
        damping: :math:`\lambda > 0` (LiSSA needs it: ``T`` grows as :math:`1/\lambda`).
        constant: :math:`C` in :math:`|B| \ge C\,\mathrm{Tr}/\lambda_{\max}` (paper: 2).
        dataset_size: Cap the batch at the number of available units.
        max_steps: Optional cap on ``steps``.
        steps_factor: :math:`c` in :math:`T = \lceil c / (\lambda\eta) \rceil` (paper: 2). The slowest direction
            of the recursion contracts by :math:`1 - \lambda\eta` per step, so after :math:`T/2` steps its
            remaining bias is :math:`e^{-c/2}`; the library's default
            (:data:`~lightning_influence.config.DEFAULT_LISSA_STEPS_FACTOR`) is larger than the paper's.

    Returns:
        The settings.

    Raises:
        ConfigurationError: For damping <= 0 or constant <= 0.

    Example::

        >>> s = lissa_settings(trace=100.0, lambda_max=10.0, damping=0.1)
        >>> round(s.eta, 6), s.batch_size, s.steps
        (0.09901, 20, 202)
    """
    if not damping > 0:
        raise ConfigurationError(
            f"LiSSA needs damping > 0 (got {damping}): the number of steps grows like (lambda_max + damping)/damping."
        )
    if not constant > 0:
        raise ConfigurationError(f"constant must be positive, got {constant}.")
    cbs = critical_batch_size(trace, lambda_max)
    batch = max(1, math.ceil(constant * cbs - 1e-9))
    capped = dataset_size is not None and batch > dataset_size
    if capped and dataset_size is not None:
        batch = dataset_size
    eta = 1.0 / (lambda_max + damping)
    if not steps_factor > 0:
        raise ConfigurationError(f"steps_factor must be positive, got {steps_factor}.")
    # a relative slack of 1e-6: lambda_max from float32 products carries ~1e-7 relative rounding, which must not
    # add a step to an exact integer
    steps = math.ceil(steps_factor * (lambda_max + damping) / damping * (1 - 1e-6))
    if max_steps is not None:
        steps = min(steps, max_steps)
    return LissaSettings(eta=eta, batch_size=batch, steps=steps, damping=damping, constant=constant,
                         batch_size_capped=capped)


@dataclass
class SpectrumSummary:
    """Everything :func:`estimate_spectrum` measured, ready to log.

    Attributes:
        trace: Hutchinson trace of the (undamped) operator.
        trace_stderr: Its standard error.
        lambda_max: Largest eigenvalue.
        critical_batch_size: ``trace / lambda_max``.
        lissa: Settings implied for the given damping.
        num_products: Products spent (trace probes count as one each).
        seconds: Wall time.
        trace_probes: Number of trace probes.
        lambda_method: ``"lanczos"`` or ``"sketch"``.
        lambda_converged: Whether Lanczos met its tolerance.
        num_units: Units (examples or tokens) in the sample.
        lanczos_start: How Lanczos started: ``"warm"`` (the ``start`` given), ``"gradient"`` (the sample's loss
            gradient, :attr:`~lightning_influence.config.SpectrumConfig.lanczos_start`), ``"random"`` (including a
            gradient that was zero or not finite), or ``""`` for the sketch.
        start_gradients: Gradient passes over the sample spent on the start (1 whenever ``lanczos_start="gradient"``
            computed one, also when it fell back to ``"random"``; else 0; not in ``num_products``).
        ritz_vector: Lanczos's unit top Ritz vector (warm start of the next measurement; not in :meth:`to_dict`).

    Example::

        >>> s = estimate_spectrum(DenseOperator(torch.diag(torch.tensor([2.0, 1.0]))), damping=0.5)
        >>> m = s.metrics()  # P = 2: the Lanczos basis spans the space, so the deflated trace is exact
        >>> round(m["curvature/trace"], 6), round(m["curvature/lambda_max"], 6), m["lissa/steps"]
        (3.0, 2.0, 30.0)
        >>> s.to_dict()["lissa"]["batch_size"] == s.lissa.batch_size
        True
    """

    trace: float
    trace_stderr: float
    lambda_max: float
    critical_batch_size: float
    lissa: LissaSettings
    num_products: int
    seconds: float
    trace_probes: int
    lambda_method: str
    lambda_converged: bool
    num_units: float
    lanczos_start: str = ""
    start_gradients: int = 0
    ritz_vector: Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Flat-ish plain dict (for JSON, checkpoints and logs); the Ritz vector is left out."""
        out = asdict(replace(self, ritz_vector=None))
        out.pop("ritz_vector")
        return out

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The scalar metrics under their documented names (:mod:`lightning_influence.metrics`), ``prefix`` first."""
        values = {
            CURVATURE_TRACE: self.trace,
            CURVATURE_TRACE_STDERR: self.trace_stderr,
            CURVATURE_LAMBDA_MAX: self.lambda_max,
            CURVATURE_CRITICAL_BATCH_SIZE: self.critical_batch_size,
            LISSA_ETA: self.lissa.eta,
            LISSA_BATCH_SIZE: float(self.lissa.batch_size),
            LISSA_STEPS: float(self.lissa.steps),
            CURVATURE_PRODUCTS: float(self.num_products),
            CURVATURE_SECONDS: self.seconds,
        }
        return regroup(values, "", prefix)


def estimate_spectrum(
    op: LinearOperatorLike,
    *,
    damping: float = 1e-3,
    config: SpectrumConfig | None = None,
    dataset_size: int | None = None,
    start: Tensor | None = None,
    **overrides: Any,
) -> SpectrumSummary:
    """Trace, largest eigenvalue, critical batch size and LiSSA settings in one call.

    ``op`` should be undamped; ``damping`` only enters the LiSSA settings. ``dataset_size`` (units in the
    training set LiSSA will sample from) caps the recommended LiSSA batch. The estimators' settings come from
    ``config`` (:class:`~lightning_influence.config.SpectrumConfig`), with keyword ``overrides`` of single fields
    (``trace_probes=8``, ``lanczos_iter=8``, ``seed=...``). ``start`` warm-starts Lanczos (e.g. the previous
    summary's :attr:`~SpectrumSummary.ritz_vector`); without it Lanczos starts as ``lanczos_start`` says (a seeded
    random vector, or the operator's ``loss_gradient()``).

    Returns:
        A :class:`SpectrumSummary` with the estimates, the recommended LiSSA settings and the cost.

    Raises:
        ConfigurationError: For an unknown setting, a damped operator, or ``lanczos_start="gradient"`` on an
            operator without ``loss_gradient()``.
        NonFiniteError: If the curvature is not finite or ``lambda_max <= 0``.

    Example::

        >>> s = estimate_spectrum(DenseOperator(torch.diag(torch.tensor([4.0, 2.0]))), damping=0.1)
        >>> round(s.trace, 6), round(s.lambda_max, 6), round(s.critical_batch_size, 6)
        (6.0, 4.0, 1.5)
    """
    cfg = SpectrumConfig.resolve(config, **overrides)
    if getattr(op, "damping", 0.0):
        raise ConfigurationError("estimate_spectrum expects an undamped operator; pass damping here instead.")
    gradient = getattr(op, "loss_gradient", None)
    use_gradient = cfg.lambda_method == "lanczos" and cfg.lanczos_start == "gradient" and start is None
    if use_gradient and not callable(gradient):
        raise ConfigurationError(
            f"lanczos_start='gradient' needs an operator with a loss_gradient() method (every CurvatureOperator has "
            f"one); {type(op).__name__} has none. Use lanczos_start='random' or pass start=..."
        )
    expect_reuse = getattr(getattr(op, "linearization", None), "expect_reuse", None)
    if callable(expect_reuse):  # Lanczos and the probes multiply the same batches again and again
        expect_reuse()
    clock = time.perf_counter()
    how = "warm" if start is not None else "random"
    if cfg.lambda_method == "lanczos":
        if use_gradient and callable(gradient):
            start = gradient()
            how = "gradient" if _usable_start(start, op.num_params) else "random"  # lanczos falls back the same way
        eig = lanczos_lambda_max(op, cfg.lanczos_iter, tol=cfg.lanczos_tol, seed=derive_seed(cfg.seed, "lanczos"),
                                 start=start)
    else:
        how = ""
        eig = sketch_lambda_max(op, cfg.sketch_dim, seed=derive_seed(cfg.seed, "sketch"))
    deflate = eig.basis if cfg.trace_deflation else None
    tr = hutchinson_trace(op, cfg.trace_probes, max_probes=cfg.trace_max_probes, rtol=cfg.trace_rtol, seed=cfg.seed,
                          kind=cfg.probe_kind, block_size=cfg.trace_block_size, deflate=deflate,
                          deflated_trace=eig.basis_trace if deflate is not None else 0.0)
    cbs = critical_batch_size(tr.value, eig.value)
    units = getattr(op, "_count", None)
    settings = lissa_settings(tr.value, eig.value, damping, constant=cfg.constant, dataset_size=dataset_size,
                              steps_factor=cfg.steps_factor)
    return SpectrumSummary(
        trace=tr.value,
        trace_stderr=tr.stderr,
        lambda_max=eig.value,
        critical_batch_size=cbs,
        lissa=settings,
        num_products=tr.num_probes + eig.num_products,
        seconds=time.perf_counter() - clock,
        trace_probes=tr.num_probes,
        lambda_method=eig.method,
        lambda_converged=eig.converged,
        num_units=float(units) if units else float("nan"),
        lanczos_start=how,
        start_gradients=int(use_gradient),
        ritz_vector=eig.vector,
    )
