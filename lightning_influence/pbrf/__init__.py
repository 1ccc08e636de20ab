r"""Proximal Bregman response function (PBRF): the retraining ground truth that GNH influence approximates.

For a training example :math:`z_m` the *proximal Bregman objective* (PBO; Bae et al., 2022; paper 1, eq. 5) is

.. math::

    F_{\pm\epsilon}(\theta) = \frac{1}{N} \sum_{n=1}^{N} D\big(h(x_n;\theta), h(x_n;\hat\theta), y_n\big)
        \pm \epsilon\,\big(\ell(z_m;\theta) - \ell(z_m;\hat\theta)\big)
        + \frac{\lambda}{2} \|\theta - \hat\theta\|^2,

where :math:`D` is the Bregman divergence of the loss in output space (:meth:`LossFamily.bregman`, evaluated by
:func:`stable_bregman`;
:math:`\mathrm{KL}(p_{\hat h} \| p_h)` for softmax cross-entropy), the average runs over the *units* of the
training sample exactly like :class:`~lightning_influence.operators.GNHOperator` (examples, or tokens for
language models), :math:`\ell(z_m;\theta)` is the loss of :math:`z_m` summed over its units (``normalization=
"sum"``, the convention of :mod:`lightning_influence.influence`; one unit for classification, so this is just its
loss) or averaged over them (``"mean"``), and the constant :math:`\ell(z_m;\hat\theta)` only keeps
objective values small (it changes neither the minimiser nor the gradient). At :math:`\hat\theta` the data term
has zero gradient and Hessian :math:`G` (the GNH), so to first order
:math:`\theta_{\pm\epsilon} - \hat\theta = \mp\epsilon (G + \lambda I)^{-1} \nabla\ell(z_m)`.

The PBRF response of a measurement :math:`m` (default: the loss of each query) is the central difference

.. math:: R(z_m, m) = \frac{m(\theta_{+\epsilon}) - m(\theta_{-\epsilon})}{2\epsilon}
    \;\xrightarrow{\epsilon \to 0}\; -\nabla m^\top (G + \lambda I)^{-1} \nabla \ell(z_m),

which is the sign convention of :func:`lightning_influence.influence.influence_scores`:
:math:`I(z, q) = -\nabla\ell(q)^\top (G + \lambda I)^{-1} \nabla\ell(z)` is the change of the query loss per unit
*upweighting* of :math:`z` (negative = :math:`z` helps :math:`q`). The central difference cancels the
even-order terms, so its error is :math:`O(\epsilon^2)`; a small :math:`\epsilon` therefore checks the iHVP
solvers, and :math:`\epsilon \approx 1/N` (removing or adding one example) checks the quadratic model itself.

Everything runs in float64 (by default) on a **copy** of the model (``copy.deepcopy`` then ``.to(dtype)``); the
trained weights are never touched. Both optimisers use only the objective's value/gradient and, for
``"newton_cg"``, Gauss-Newton products:

* ``"newton_cg"`` (default): Gauss-Newton steps :math:`\theta \leftarrow \theta - (G(\theta) \pm \epsilon G_m(\theta) +
  \lambda I)^{-1}\nabla F(\theta)` solved by conjugate gradient with our GNH operator (the Bregman divergence of
  a canonical family has output Hessian :math:`S_h`, so :math:`G(\theta)` is exactly the data term's
  Gauss-Newton matrix), accepted when the gradient norm decreases. The Gauss-Newton matrix only steers the
  steps: the fixed point is wherever the true PBO gradient vanishes, and convergence is judged on that gradient.
  It reaches relative gradient norms of 1e-8 in two or three steps;
* ``"lbfgs"``: full-batch :class:`torch.optim.LBFGS` with a strong-Wolfe line search (restarted when its line
  search stalls); it never sees the GNH, so agreement with GNH influence is a fully independent check. Its line
  search needs objective *values*, whose float64 resolution limits it to relative gradient norms of about
  1e-5..1e-6 (less when the example's gradient is tiny); non-convergence is then reported, not hidden.

Convergence is judged on the gradient: a solve has converged when
:math:`\|\nabla F(\theta)\| \le \text{tol} \cdot \|\nabla F(\hat\theta)\| = \text{tol}\cdot\epsilon\|\nabla\ell(z_m)\|`.
A solve that stops above the tolerance is *reported* (``RuntimeWarning`` with the residual, and
``converged=False`` in the :class:`PBRFResult`), never hidden.

Data parallelism: the data term is a sum over training units, so each rank passes its shard as ``data`` and a
``reduce_fn`` that sums a flat tensor over ranks. Every objective/gradient evaluation makes exactly one
reduction of ``(gradient sum, divergence sum, unit count)``; the example term, the proximity term and the
measurement are computed identically on every rank (pass the same ``example`` and ``queries`` everywhere), so
every rank takes the same optimiser steps.

Example::

    >>> import torch
    >>> from lightning_influence.tasks import Regression
    >>> model = torch.nn.Linear(2, 1, bias=False).double()
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> y = torch.zeros(2, 1, dtype=torch.float64)
    >>> pbrf = PBRF(model, Regression(), [(x, y)], damping=0.5, epsilon=1e-3)
    >>> res = pbrf.response((x[:1], torch.ones(1, 1, dtype=torch.float64)), queries=[(x, y)])
    >>> res.converged, tuple(res.response.shape)
    (True, (2,))
"""

from lightning_influence.pbrf.objective import Measurement, copy_model, query_loss_measurement, stable_bregman
from lightning_influence.pbrf.results import PBRFResult, SolveRecord
from lightning_influence.pbrf.solver import PBRF, pbrf_response

__all__ = [
    "PBRF",
    "Measurement",
    "PBRFResult",
    "SolveRecord",
    "copy_model",
    "pbrf_response",
    "query_loss_measurement",
    "stable_bregman",
]
