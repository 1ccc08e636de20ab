r"""Solvers for damped curvature systems :math:`(A + \lambda I) x = b`.

* :mod:`~lightning_influence.solvers.cg`: :func:`conjugate_gradient` on a fixed sample (Fisher-CG), to a relative
  residual tolerance, with several right-hand sides at once (one independent CG per column, products batched per
  iteration).
* :mod:`~lightning_influence.solvers.dense`: :func:`dense_solve`, exact Cholesky/eigen solve of the dense matrix,
  for tiny models and tests.
* :mod:`~lightning_influence.solvers.lissa`: :func:`lissa` (paper 1) with fresh sampled batches
  (:class:`SampledCurvature` in :mod:`~lightning_influence.solvers.sampling`), settings from the measured spectrum,
  a divergence guard and a residual certificate on a held-out sample.

* :mod:`~lightning_influence.solvers.sketch`: :func:`compute_sketch`, the top-``r`` eigenpairs of the curvature
  (:class:`LowRankSketch`, saved as ``sketch.pt``), computed once from a fixed number of products.
* :mod:`~lightning_influence.solvers.pcg`: :func:`preconditioned_cg` (CG with the sketch's Nyström
  preconditioner, same certificate), :func:`lowrank_solve` (the sketch's approximate inverse, no products) and
  :func:`lowrank_self_influence` (with its error bound from the discarded spectrum).

Every solver returns a :class:`SolveResult` carrying its certificate (iterations, relative residual,
convergence flag) so that the logs and the report can show how far the answer can be trusted.
"""

from __future__ import annotations

from lightning_influence.operators.curvature import local_curvature_matmat
from lightning_influence.solvers.cg import conjugate_gradient
from lightning_influence.solvers.dense import dense_solve, positive_definite_factor
from lightning_influence.solvers.lissa import lissa
from lightning_influence.solvers.pcg import (
    lowrank_self_influence,
    lowrank_self_influence_from_coefficients,
    lowrank_solve,
    nystrom_preconditioner,
    preconditioned_cg,
)
from lightning_influence.solvers.result import SolveResult
from lightning_influence.solvers.sampling import BatchProduct, SampledCurvature, measure_batch_constant
from lightning_influence.solvers.sketch import SKETCH_FILENAME, LowRankSketch, compute_sketch

__all__ = [
    "SKETCH_FILENAME",
    "BatchProduct",
    "LowRankSketch",
    "SampledCurvature",
    "SolveResult",
    "compute_sketch",
    "conjugate_gradient",
    "dense_solve",
    "lissa",
    "local_curvature_matmat",
    "lowrank_self_influence",
    "lowrank_self_influence_from_coefficients",
    "lowrank_solve",
    "measure_batch_constant",
    "nystrom_preconditioner",
    "positive_definite_factor",
    "preconditioned_cg",
]
