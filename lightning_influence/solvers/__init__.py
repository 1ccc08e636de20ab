r"""Solvers for damped curvature systems :math:`(A + \lambda I) x = b`.

* :mod:`~lightning_influence.solvers.cg`: :func:`conjugate_gradient` on a fixed sample (Fisher-CG), to a relative
  residual tolerance, with several right-hand sides at once (one independent CG per column, products batched per
  iteration).
* :mod:`~lightning_influence.solvers.dense`: :func:`dense_solve`, exact Cholesky/eigen solve of the dense matrix,
  for tiny models and tests.
* :mod:`~lightning_influence.solvers.lissa`: :func:`lissa` (paper 1) with fresh sampled batches
  (:class:`SampledCurvature` in :mod:`~lightning_influence.solvers.sampling`), settings from the measured spectrum,
  a divergence guard and a residual certificate on a held-out sample.

Every solver returns a :class:`SolveResult` carrying its certificate (iterations, relative residual,
convergence flag) so that the logs and the report can show how far the answer can be trusted.
"""

from __future__ import annotations

from lightning_influence.operators.curvature import local_curvature_matmat
from lightning_influence.solvers.cg import conjugate_gradient
from lightning_influence.solvers.dense import dense_solve
from lightning_influence.solvers.lissa import lissa
from lightning_influence.solvers.result import SolveResult
from lightning_influence.solvers.sampling import BatchProduct, SampledCurvature, measure_batch_constant

__all__ = [
    "BatchProduct",
    "SampledCurvature",
    "SolveResult",
    "conjugate_gradient",
    "dense_solve",
    "lissa",
    "local_curvature_matmat",
    "measure_batch_constant",
]
