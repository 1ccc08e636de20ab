r"""Non-smooth regularisers and their proximal operators in a non-diagonal metric.

The approximate-Fisher influence / approximate cross-validation step of AFIF needs, for a penalty
:math:`\lambda\pi`, the proximal operator in the metric of a curvature matrix :math:`D` (a Fisher,
Gauss-Newton or Hessian approximation):

.. math::

    \operatorname{prox}^{D}_{\lambda\pi}(v)
    = \arg\min_\theta \tfrac12 (\theta - v)^\top D (\theta - v) + \lambda \pi(\theta),

which is the paper's :math:`\arg\min_\theta (v-\theta)^\top D (v-\theta) + 2\lambda\pi(\theta)`
divided by two. For diagonal :math:`D` it is closed form; otherwise it is solved on the quadratic model by
FISTA with adaptive (gradient) restart and backtracking, and, for a dense :math:`D` and separable
penalties (L1, elastic net), by an exact active-set solve once FISTA has identified the support.

Everything acts on a FLAT parameter vector :math:`\theta \in \mathbb{R}^P`; an optional boolean ``mask``
marks the penalised coordinates (``False`` = unpenalised, e.g. biases). Regularisers are dataclasses with
plain arguments so that they can be configured from YAML (``class_path`` + ``init_args``).

This package is plain PyTorch (no Lightning import) and works in any floating dtype (float64 for tests). Its
modules, each importing only the ones before it:

* ``prox``: the metric forms (:data:`Metric`), :class:`ProxResult`, and the solver (FISTA with restart,
  backtracking and active-set polish; the step constant from ``eigvalsh`` or
  :func:`~lightning_influence.spectrum.lanczos_lambda_max`);
* ``base``: the :class:`Regularizer` contract (penalty, closed-form and metric prox) and its argument checks;
* ``penalties``: :class:`L1`, :class:`ElasticNet`, :class:`GroupLasso`, :class:`NoRegularizer`;
* ``masks``: :func:`mask_from_named_parameters`, :func:`mask_from_module`.

Import the public names from the package, not from the modules.

Example::

    >>> import torch
    >>> from lightning_influence.regularizers import L1
    >>> D = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    >>> v = torch.tensor([1.0, -0.1], dtype=torch.float64)
    >>> res = L1(0.3).prox(v, D, tol=1e-12)
    >>> res.converged, res.x[1].item()
    (True, 0.0)
"""

from __future__ import annotations

from lightning_influence.regularizers import prox as _prox
from lightning_influence.regularizers.base import Regularizer
from lightning_influence.regularizers.masks import mask_from_module, mask_from_named_parameters
from lightning_influence.regularizers.penalties import L1, ElasticNet, GroupLasso, NoRegularizer
from lightning_influence.regularizers.prox import ProxResult, SupportsMatvec

__all__ = [
    "L1",
    "ElasticNet",
    "GroupLasso",
    "MatVec",
    "Metric",
    "NoRegularizer",
    "ProxResult",
    "Regularizer",
    "SupportsMatvec",
    "mask_from_module",
    "mask_from_named_parameters",
]

# The type aliases are bound again here, with their docstrings, so that the API reference documents them under
# this package like the classes above (autodoc reads an alias's docstring from the module that assigns it).
MatVec = _prox.MatVec
"""A symmetric positive-(semi)definite linear operator given as ``x -> D @ x``."""

Metric = _prox.Metric
"""A metric: a dense ``(P, P)`` tensor, a matrix-vector product callable, or an object with ``matvec``."""
