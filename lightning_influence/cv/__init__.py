r"""Approximate k-fold cross-validation through the (approximate) Fisher, with a proximal step (AFIF).

Given parameters :math:`\hat\theta` trained on :math:`N` units (examples; tokens for language models) with the
objective

.. math:: L(\theta) = \frac{1}{N} \sum_{i=1}^{N} \ell_i(\theta) + \lambda\pi(\theta)

(``regularizer`` holds :math:`\lambda\pi`; the same object must be added to the training loss, see
:func:`regularization_penalty`), the refit without fold :math:`k` minimises the **fold objective**

.. math::

    L_{-k}(\theta) = f_{-k}(\theta) + \lambda\pi(\theta), \qquad
    f_{-k}(\theta) = c_k \sum_{i \notin k} \ell_i(\theta), \qquad
    c_k = \begin{cases} 1/(N - n_k) & \texttt{fold\_objective="mean"} \text{ (default)} \\
                        1/N & \texttt{fold\_objective="weighted"} \text{ (the paper's } w = 1 - 1_k\text{)}
          \end{cases}

"mean" is ordinary k-fold CV: the same training recipe (mean loss + the same :math:`\lambda\pi`) re-run on the
remaining data, which is also what ``sklearn``'s ``LassoCV`` refits. "weighted" is the paper's weighted objective
:math:`\frac1N \sum_i w_i \ell_i + \lambda\pi` (eq. 1), equivalent to "mean" with the penalty scaled by
:math:`N/(N-n_k)`. Replacing :math:`f_{-k}` by its quadratic model at :math:`\hat\theta` with curvature
:math:`A_k` gives the AFIF update (paper, eq. 9, adapted to leave-fold-out):

.. math::

    \tilde\theta_k = \operatorname{prox}^{A_k}_{\lambda\pi}\big(\hat\theta - A_k^{-1} \nabla f_{-k}(\hat\theta)\big),
    \qquad
    \operatorname{prox}^{D}_{\lambda\pi}(v) = \arg\min_\theta \tfrac12 (\theta - v)^\top D (\theta - v)
    + \lambda\pi(\theta),

with :math:`\nabla f_{-k}(\hat\theta) = c_k \sum_{i\notin k} \nabla\ell_i(\hat\theta)` the smooth-part gradient of
the remaining data (not zero at :math:`\hat\theta` when :math:`\pi` is non-smooth) and, by default, the
**downdated** Fisher

.. math:: A_k = c_k \sum_{i \notin k} F_i = c_k \big(N \bar F - n_k \bar F_k\big) \quad (\texttt{downdate=True}),

computed as the sum of the other folds' Fisher sums (no subtraction, so no cancellation). The paper's choice,
one full-data :math:`A_k = \bar F = \frac1N\sum_i F_i` for every fold (``downdate=False``), over-counts the
held-out fold's curvature: for "mean" its relative curvature error is :math:`O(n_k/N)` per fold plus the
difference between :math:`\bar F_k` and :math:`\bar F`; for "weighted" :math:`\bar F` is
:math:`N/(N - n_k)` times too large. Both bias :math:`\tilde\theta_k` towards :math:`\hat\theta` and the CV
estimate downwards (see ``benchmarks/repro_afif_fig1.py`` for measured numbers).

Exactness: for a model linear in :math:`\theta` with the Gaussian (squared) loss the quadratic model is exact and
:math:`\tilde\theta_k` is the exact fold refit for any :math:`\hat\theta` (tests check it to 1e-8 against
scikit-learn's Lasso / ElasticNet refits). For an empty fold :math:`\tilde\theta = \hat\theta` whenever
:math:`\hat\theta` minimises :math:`L` (its optimality condition is the prox fixed point).

Curvature choices (``curvature=``): ``"fisher"`` (:class:`~lightning_influence.operators.ExpectedFisherOperator`,
the AFIF default), ``"gnh"`` (:class:`~lightning_influence.operators.GNHOperator`, identical for these losses)
and ``"hessian"`` (:class:`~lightning_influence.operators.HessianOperator`, the Hessian-based approximate CV of
Wilson et al. 2020 / the paper's comparison; may be indefinite away from a minimum: add ``damping``).

Linear solves and prox: ``solver="dense"`` forms each :math:`A_k` (``P`` products per fold, tiny models) and
uses :func:`~lightning_influence.solvers.dense_solve` (Cholesky) and a dense-metric prox (FISTA + exact
active-set polish); ``solver="cg"`` stays matrix-free: :func:`~lightning_influence.solvers.conjugate_gradient`
on the complement's operator and a matvec-metric prox (each FISTA step is one operator product).
``"auto"`` picks dense up to ``dense_max_params`` parameters.

Cost accounting: every result carries :class:`PassCount`, the number of *gradient-equivalent passes* over the
training set: a gradient over :math:`n` examples counts :math:`n/N`, a forward-only evaluation
:math:`n/(3N)`, a Fisher/GNH product :math:`\tfrac43 n/N` (one forward with tangents + one backward) and a
Hessian product :math:`2n/N` (forward-over-reverse).

Everything here is plain PyTorch (no Lightning). The trained weights are never modified: every evaluation at a
new :math:`\theta` goes through ``torch.func.functional_call`` with the flat vector unflattened.

Example::

    >>> import torch
    >>> from lightning_influence.tasks import Regression
    >>> from lightning_influence.regularizers import L1
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    >>> y = x @ torch.tensor([[1.0], [0.0], [-2.0]], dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1).double()
    >>> folds = make_fold_batches(list(zip(x, y)), kfold_indices(40, 4, seed=0), batch_size=16)
    >>> res = approximate_cv(model, Regression(), folds, L1(0.1))
    >>> len(res.fold_losses), res.estimate > 0
    (4, True)
"""

from __future__ import annotations

from lightning_influence.cv.afif import approximate_cv
from lightning_influence.cv.exact import exact_cv, fit_regularized
from lightning_influence.cv.folds import (
    check_curvature_for_loss,
    kfold_indices,
    make_fold_batches,
    regularization_penalty,
)
from lightning_influence.cv.results import CVResult, FoldResult, PassCount

__all__ = [
    "CVResult",
    "FoldResult",
    "PassCount",
    "approximate_cv",
    "check_curvature_for_loss",
    "exact_cv",
    "fit_regularized",
    "kfold_indices",
    "make_fold_batches",
    "regularization_penalty",
]
