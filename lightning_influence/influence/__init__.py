r"""Influence of training examples on query losses through the damped Gauss-Newton Hessian.

**Sign convention (the only one in this package).** For a training example :math:`z` and a query :math:`q`

.. math:: \mathcal I(z, q) = -\nabla\ell(q)^\top (G + \lambda I)^{-1} \nabla\ell(z),

where :math:`G` is the (undamped) GNH of the *mean* training loss, averaged over units (examples, or tokens for
language models; see :mod:`lightning_influence.operators`), :math:`\lambda` the damping and :math:`\ell` the
loss. :math:`\mathcal I(z, q)` is the derivative of the query loss with respect to *upweighting* :math:`z`:
with :math:`\theta(\epsilon) = \arg\min \frac1N\sum_n \ell_n + \epsilon\,\ell(z) + \frac\lambda2\|\theta-\hat\theta\|^2`
(the PBRF of paper 1, eq. 5, to first order), :math:`d\ell(q)/d\epsilon = \mathcal I(z, q)`. Hence

* :math:`\mathcal I(z, q) < 0`: upweighting :math:`z` *lowers* the query loss, :math:`z` is a **proponent**
  (helpful); the most negative scores are the top proponents;
* :math:`\mathcal I(z, q) > 0`: upweighting :math:`z` *raises* the query loss, :math:`z` is an **opponent**
  (harmful); the most positive scores are the top opponents;
* removing :math:`z` from an :math:`N`-example training set (:math:`\epsilon = -1/N`) changes the query loss
  by about :math:`-\mathcal I(z, q)/N`.

(Paper 1 writes :math:`-\nabla f(q)^\top H^{-1}\nabla\ell(z)` with :math:`f = \log p = -\ell`, the opposite sign.)
The **self-influence** is :math:`s(z) = \nabla\ell(z)^\top (G+\lambda I)^{-1}\nabla\ell(z) = -\mathcal I(z, z) \ge 0`;
large values flag examples the model bends for (e.g. mislabelled ones). The **gradient-dot** and **cosine**
baselines keep the same sign and meaning with the curvature replaced by the identity:
:math:`-\nabla\ell(q)^\top\nabla\ell(z)` and :math:`-\cos(\nabla\ell(q), \nabla\ell(z))`.

**Per-example gradients** :math:`\nabla\ell(z)` are gradients of the example's *summed* unit losses (one unit for
classification/regression; for a language-model sequence, the sum over its non-ignored tokens), matching
upweighting the whole example in the unit-averaged objective. ``normalization="mean"`` uses the per-example
mean over units instead. They are computed with ``torch.func.vmap(grad(...))`` over ``functional_call`` in
chunks of ``chunk_size`` examples and streamed into dot products, so the ``(n_train, P)`` matrix is never
stored.

**Solvers** for :math:`(G+\lambda I)^{-1}` applied to the *query* gradients (``k`` solves rather than
``n_train``): ``"cg"`` (Fisher-CG on the whole training set, :func:`~lightning_influence.solvers.conjugate_gradient`),
``"lissa"`` (:func:`~lightning_influence.solvers.lissa` with fresh batches and settings from the spectrum) and
``"exact"`` (dense matrix from per-example Jacobians and a Cholesky factorisation; tiny models), ``"pcg"`` (CG
preconditioned by a low-rank sketch of the curvature: CG's answer in fewer iterations), ``"lowrank"`` (the sketch's
approximate inverse: no products per query or per training example) and ``"auto"`` (exact for small models, else
pcg); see :doc:`scale`. ``projection_dim`` optionally projects the gradients of the scores to a few dimensions
(:class:`~lightning_influence.influence.projection.RandomProjection`).

Everything here is plain PyTorch. For data parallelism pass ``rank``, ``world_size`` and ``reduce_fn`` (sums a
flat tensor over ranks): curvature products and training examples are sharded, every rank runs the same
reductions in the same order, and every rank returns the same full result.
"""

from __future__ import annotations

from lightning_influence.config import InfluenceConfig
from lightning_influence.influence.gradients import iter_per_example_gradients, per_example_gradients
from lightning_influence.influence.projection import RandomProjection
from lightning_influence.influence.result import InfluenceResult, TopK, top_k
from lightning_influence.influence.scores import (
    cosine_scores,
    dense_curvature,
    gradient_dot_scores,
    influence_scores,
    projected_cost,
    self_influence,
)

__all__ = [
    "InfluenceConfig",
    "InfluenceResult",
    "RandomProjection",
    "TopK",
    "cosine_scores",
    "dense_curvature",
    "gradient_dot_scores",
    "influence_scores",
    "iter_per_example_gradients",
    "per_example_gradients",
    "projected_cost",
    "self_influence",
    "top_k",
]
