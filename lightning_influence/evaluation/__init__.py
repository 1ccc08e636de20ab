r"""How good are the scores? Retraining-based ground truths for attribution quality (plain PyTorch, no Lightning).

The solvers' certificates and the PBRF check (:mod:`lightning_influence.pbrf`) say that the scores are the damped
Gauss-Newton influence they claim to be. These measures say how well they predict what *retraining* does, the way
the field compares attribution methods (dattri, kronfluence, TRAK):

* :func:`~lightning_influence.evaluation.lds.lds`: the linear datamodeling score against models retrained on
  random :math:`\alpha`-subsets (:class:`~lightning_influence.evaluation.retrain.SubsetRetrainer`, cached on disk,
  resumable, sharded over data-parallel ranks);
* :func:`~lightning_influence.evaluation.loo.loo_correlation`: against exact leave-one-out refits
  (:meth:`SubsetRetrainer.leave_one_out <lightning_influence.evaluation.retrain.SubsetRetrainer.leave_one_out>`);
* :func:`~lightning_influence.evaluation.mislabel.mislabel_detection`: AUC and recall@k of self-influence for
  finding seeded flipped labels (:func:`~lightning_influence.evaluation.mislabel.flip_labels`), against the loss
  and a random ranking.

Each returns a typed result with a seeded percentile-bootstrap interval (:class:`ConfidenceInterval`; over queries
for LDS and LOO, over training examples for mislabel detection). Sign convention: scores are this package's
:math:`\mathcal I(z, q) = -\nabla\ell(q)^\top (G+\lambda I)^{-1}\nabla\ell(z)` (negative = proponent); say what the
retrained outputs measure with ``measurement="loss"`` or ``"margin"`` and the alignment is done for you.

Example::

    >>> import torch
    >>> from lightning_influence.evaluation import SubsetRetrainer, lds
    >>> w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0], dtype=torch.float64)   # each example's pull on 2 queries
    >>> effect = torch.stack([w, w.flip(0)])                                      # (n_query, n_train)
    >>> run = SubsetRetrainer(lambda idx, seed: effect[:, idx].sum(1), n_train=6, num_subsets=20).run()
    >>> round(lds(effect, run.subsets, run.outputs).lds, 6)   # a loss that is exactly additive: LDS = 1
    1.0
"""

from lightning_influence.evaluation.lds import LDSResult, lds, predicted_subset_effects
from lightning_influence.evaluation.loo import LOOResult, loo_correlation
from lightning_influence.evaluation.mislabel import (
    DetectionScore,
    MislabelResult,
    detection_auc,
    flip_labels,
    mislabel_detection,
    recall_at_k,
)
from lightning_influence.evaluation.results import ConfidenceInterval, bootstrap_mean_ci, pearson, rankdata, spearman
from lightning_influence.evaluation.retrain import (
    RetrainResult,
    SubsetRetrainer,
    callable_fingerprint,
    random_subsets,
    tensor_fingerprint,
)

__all__ = [
    "ConfidenceInterval",
    "DetectionScore",
    "LDSResult",
    "LOOResult",
    "MislabelResult",
    "RetrainResult",
    "SubsetRetrainer",
    "bootstrap_mean_ci",
    "callable_fingerprint",
    "detection_auc",
    "flip_labels",
    "lds",
    "loo_correlation",
    "mislabel_detection",
    "pearson",
    "predicted_subset_effects",
    "random_subsets",
    "rankdata",
    "recall_at_k",
    "spearman",
    "tensor_fingerprint",
]
