"""Curvature operators: the linear-operator protocol and algebra, and the model-based curvature matrices.

* :mod:`~lightning_influence.operators.base`: :class:`LinearOperator` (what every estimator needs),
  :class:`OperatorBase` (damping, scaling, sums), :class:`DenseOperator`, :class:`ScaledOperator`,
  :class:`SumOperator`.
* :mod:`~lightning_influence.operators.curvature`: the GNH, Fisher (expected and sampled), finite-difference GNH
  and Hessian of a model's loss over a :class:`~lightning_influence.data.DataSource`, with one product path.

The data helpers (:func:`make_batches`, :func:`prepare_batch`) and :func:`curvature_mode` are re-exported here for
convenience; they live in :mod:`lightning_influence.data` and :mod:`lightning_influence.evaluator`.
"""

from __future__ import annotations

from lightning_influence.data import DataSource, make_batches, prepare_batch
from lightning_influence.distributed import ReduceFn
from lightning_influence.evaluator import curvature_mode
from lightning_influence.operators.base import (
    DenseOperator,
    FunctionOperator,
    LinearOperator,
    OperatorBase,
    ScaledOperator,
    SumOperator,
    as_matrix,
)
from lightning_influence.operators.curvature import (
    CURVATURE_KINDS,
    CurvatureOperator,
    ExpectedFisherOperator,
    FiniteDifferenceGNHOperator,
    GNHOperator,
    HessianOperator,
    SampledFisherOperator,
    local_curvature_matmat,
    loss_gradient,
    make_operator,
    operator_class,
)
from lightning_influence.operators.reference import gnh_product_reference

__all__ = [
    "CURVATURE_KINDS",
    "CurvatureOperator",
    "DataSource",
    "DenseOperator",
    "ExpectedFisherOperator",
    "FiniteDifferenceGNHOperator",
    "FunctionOperator",
    "GNHOperator",
    "HessianOperator",
    "LinearOperator",
    "OperatorBase",
    "ReduceFn",
    "SampledFisherOperator",
    "ScaledOperator",
    "SumOperator",
    "as_matrix",
    "curvature_mode",
    "gnh_product_reference",
    "local_curvature_matmat",
    "loss_gradient",
    "make_batches",
    "make_operator",
    "operator_class",
    "prepare_batch",
]
