r"""Matrix-free curvature operators over a model and a fixed data sample.

Every operator represents a symmetric matrix :math:`A \in \mathbb{R}^{P \times P}` over the model's trainable
parameters, averaged over the *units* of a fixed sample (examples, or tokens for language models), plus an
optional damping :math:`\lambda I`:

.. math:: A v = \frac{1}{N} \sum_{n=1}^{N} M_n v + \lambda v,

where :math:`N` is the number of counted units in the whole sample (all ranks together) and :math:`M_n` is

* :class:`GNHOperator`: the Gauss-Newton Hessian :math:`J_n^\top S_n J_n` (``S_n`` the loss Hessian in output
  space), computed as one forward-mode product :math:`J_n v`, a closed-form product with :math:`S_n` and one
  reverse-mode product;
* :class:`ExpectedFisherOperator`: :math:`J_n^\top (\sum_y p(y) g_y g_y^\top) J_n`, equal to the GNH for the
  canonical exponential families in :mod:`lightning_influence.losses`;
* :class:`SampledFisherOperator`: :math:`J_n^\top \hat g \hat g^\top J_n` with labels drawn from the model
  (an unbiased estimate of the GNH);
* :class:`FiniteDifferenceGNHOperator`: the GNH with :math:`J_n v` replaced by a central difference of the
  outputs (paper 1, App. D);
* :class:`HessianOperator`: the true loss Hessian (forward-over-reverse), for comparison.

**One product path.** Every product (``matvec``, ``matmat``, ``dense``) goes through
:meth:`CurvatureOperator.local_matmat`, the one loop over this rank's batches, then one
:func:`~lightning_influence.distributed.reduce_packed` of ``(local sum, local unit count)``; ``quadratic_forms``
(forward mode only, for trace probes) is the same loop with the reverse pass left out. The data are a
:class:`~lightning_influence.data.DataSource` (or a list of collated batches: this rank's shard), the model is seen
through an :class:`~lightning_influence.evaluator.Evaluator`.

While computing, the model is put in eval mode (dropout off, BatchNorm on running statistics, which are not
updated), autograd is forced on (also under ``torch.inference_mode``), parameters are used through
``torch.func.functional_call`` so ``.grad`` fields are never written, and the global RNG is never used. The
model's per-module training flags are restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad as fwad
from torch.func import grad, jvp, vjp, vmap

from lightning_influence.data import DataSource
from lightning_influence.distributed import ReduceFn, reduce_packed
from lightning_influence.evaluator import Evaluator, curvature_mode
from lightning_influence.exceptions import ConfigurationError, NonFiniteError
from lightning_influence.operators.base import DENSE_MAX_PARAMS, OperatorBase, symmetric_gram
from lightning_influence.operators.linearized import LinearizedProducts
from lightning_influence.params import (
    ParamTree,
    all_finite,
    derive_seed,
    flatten,
    make_generator,
    unflatten,
)
from lightning_influence.tasks import Task

__all__ = [
    "CURVATURE_KINDS",
    "CurvatureOperator",
    "ExpectedFisherOperator",
    "FiniteDifferenceGNHOperator",
    "GNHOperator",
    "HessianOperator",
    "SampledFisherOperator",
    "local_curvature_matmat",
    "loss_gradient",
    "make_operator",
    "operator_class",
]

PerBatch = Callable[[int, Any], tuple[Tensor, Tensor]]


class CurvatureOperator(OperatorBase):
    r"""Base class: a symmetric, matrix-free operator averaged over a fixed sample.

    Subclasses implement :meth:`_batch_product` (the unnormalised sum of per-unit products of one batch with one
    direction) and, when they can vectorise over directions, :meth:`_batch_matmat`.

    Args:
        model: The module; only its trainable parameters are differentiated.
        task: Turns batches into ``(outputs, targets)`` and names the loss family.
        data: A :class:`~lightning_influence.data.DataSource`, or collated batches (this rank's shard under data
            parallelism; see :func:`~lightning_influence.data.make_batches`).
        damping: :math:`\lambda \ge 0` added as :math:`\lambda I`.
        reduce_fn: Sums a flat tensor over ranks (``None`` on a single process).
        dtype: Cast floating inputs in the batches to this dtype (``None`` keeps them; the model's parameter
            dtype is always used for the products).
        check_finite: Raise :class:`NonFiniteError` naming the batch when a product is not finite.
        params: Evaluate at these parameters instead of the model's (see also :meth:`at`).

    Raises:
        ConfigurationError: For negative damping or a model with no trainable parameter.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> op = GNHOperator(torch.nn.Linear(2, 1, bias=False).double(), Regression(),
        ...                  [(x, torch.zeros(2, 1, dtype=torch.float64))], damping=0.5)
        >>> isinstance(op, CurvatureOperator), op.shape
        (True, (2, 2))
        >>> op.matvec(torch.ones(2, dtype=torch.float64)).tolist()  # (X^T X / N + 0.5 I) 1
        [1.0, 2.5]
        >>> op.with_damping(0.0).dense().diagonal().tolist()
        [0.5, 2.0]
    """

    #: Short name for logs and reports.
    kind = "curvature"
    #: Whether :meth:`_batch_matmat` is implemented (directions vectorised with ``torch.func.vmap``).
    _vectorized = False

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        data: DataSource | Sequence[Any],
        *,
        damping: float = 0.0,
        reduce_fn: ReduceFn | None = None,
        dtype: torch.dtype | None = None,
        check_finite: bool = True,
        params: ParamTree | None = None,
    ) -> None:
        if damping < 0:
            raise ConfigurationError(f"damping must be >= 0, got {damping}; use 0 for no damping.")
        self.evaluator = Evaluator(model, task, params=params, input_dtype=dtype)
        self.source = DataSource.coerce(data)
        self.data = self.source.prepared(self.evaluator.device, dtype)
        self.damping = float(damping)
        self.reduce_fn = reduce_fn
        self.check_finite = check_finite
        #: Examples this process has pushed through the model, one per batch row per pass (sharding checks).
        self._examples_processed = 0
        #: Examples times directions (cost accounting: one per-example curvature product each).
        self.example_products = 0
        #: Directions multiplied (multi-vector products count each column).
        self.num_products = 0
        self._count: float | None = None

    # ------------------------------------------------------------------------------------------ basics
    @property
    def model(self) -> nn.Module:
        """The module."""
        return self.evaluator.model

    @property
    def task(self) -> Task:
        """The task."""
        return self.evaluator.task

    @property
    def params(self) -> ParamTree:
        """The parameter tree the operator is evaluated at."""
        return self.evaluator.params

    @property
    def num_params(self) -> int:
        """Dimension :math:`P` of the parameter space."""
        return self.evaluator.num_params

    @property
    def param_dtype(self) -> torch.dtype:
        """Dtype of the parameters (and of every product)."""
        return self.evaluator.dtype

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.evaluator.device

    @property
    def examples_processed(self) -> int:
        """Examples this process pushed through the model (one per batch row per pass)."""
        return self._examples_processed

    def with_damping(self, damping: float) -> CurvatureOperator:
        """A shallow copy of this operator with another damping.

        Returns:
            The copy.
        """
        new = super().with_damping(damping)
        assert isinstance(new, CurvatureOperator)
        return new

    def at(self, theta: Tensor) -> CurvatureOperator:
        """The same operator (data, damping, reduction) at the flat parameter vector ``theta``.

        Returns:
            A shallow copy evaluating at ``theta``.
        """
        new = copy.copy(self)
        new.evaluator = self.evaluator.at(theta)
        return new

    def loss_gradient(self) -> Tensor:
        r"""One gradient pass over the sample (all ranks): Lanczos's start under ``lanczos_start="gradient"``.

        Returns:
            The mean loss's flat gradient ``(P,)``, :math:`J^\top r`: in the GNH's range.
        """
        self._examples_processed += sum(self.task.batch_size(b) for b in self.data)
        return self.evaluator.mean_gradient(self.data, self.reduce_fn)

    # --------------------------------------------------------------------------------------- the loop
    def _units(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The batch's counted units."""
        return self.task.loss.unit_mask(outputs, targets).sum().to(outputs.dtype)

    def _accumulate(self, per_batch: PerBatch, size: int) -> tuple[Tensor, Tensor]:
        """Local sum over this rank's batches of ``per_batch(i, batch)`` (``size`` numbers) and the unit count.

        Returns:
            The flat local sum and the local unit count (zeros for an empty shard).
        """
        sums: list[Tensor] = []  # the running (sum, count): the first batch's own tensors, no zeros added to them
        with self._product_mode():
            for i, batch in enumerate(self.data):
                local, n = per_batch(i, batch)
                local = local.detach().reshape(-1).to(self.param_dtype)
                sums = [local, n] if not sums else [sums[0] + local, sums[1] + n]
                self._examples_processed += self.task.batch_size(batch)
        if not sums:  # an empty shard
            return (torch.zeros(size, dtype=self.param_dtype, device=self.device),
                    torch.zeros((), dtype=self.param_dtype, device=self.device))
        return sums[0], torch.as_tensor(sums[1], dtype=self.param_dtype, device=self.device)

    def _product_mode(self) -> contextlib.AbstractContextManager[None]:
        """The modes one pass over the batches runs in (:func:`curvature_mode`: eval mode, math attention)."""
        return curvature_mode(self.model)

    def _global_mean(self, total: Tensor, count: Tensor, directions: int) -> Tensor:
        """One reduction of ``(sum, count)``, then the mean over every counted unit of every rank.

        Returns:
            The flat mean.

        Raises:
            ConfigurationError: If the whole sample has no counted unit.
        """
        total, n = reduce_packed([total, count], self.reduce_fn)
        self.num_products += directions
        self.example_products += directions * sum(self.task.batch_size(b) for b in self.data)
        self._count = float(n)
        if self._count <= 0:
            raise ConfigurationError(
                f"{type(self).__name__}: the sample has no counted units (empty data, or every target ignored)."
            )
        return total / self._count

    def _columns(self, matrix: Tensor) -> ParamTree:
        """``(P, k)`` as a tree whose leaves carry the column dimension first."""
        return {name: leaf.movedim(-1, 0) for name, leaf in unflatten(matrix, self.params).items()}

    def _batch_columns(self, i: int, batch: Any, matrix: Tensor) -> tuple[Tensor, Tensor]:
        """Unnormalised ``(P, k)`` product of one batch: fused single-direction path, vmap, or column loop."""
        k = matrix.shape[1]
        if k == 1:
            prod, n = self._batch_product(i, batch, unflatten(matrix[:, 0], self.params))
            return flatten(prod).unsqueeze(1), n
        if self._vectorized:
            prods, n = self._batch_matmat(i, batch, self._columns(matrix))
            return torch.cat([leaf.reshape(k, -1) for leaf in prods.values()], dim=1).T, n
        cols, n = [], torch.zeros(())
        for j in range(k):
            prod, n = self._batch_product(i, batch, unflatten(matrix[:, j], self.params))
            cols.append(flatten(prod))
        return torch.stack(cols, 1), n

    def local_matmat(self, matrix: Tensor) -> tuple[Tensor, Tensor]:
        r"""This rank's unnormalised :math:`\sum_{\text{local units}} M_n V` and its unit count (no reduction).

        Returns:
            ``(S, n)`` with ``S`` of shape ``(P, k)`` and ``n`` a 0-d tensor.

        Raises:
            ConfigurationError: If ``matrix`` is not ``(P, k)``.
        """
        matrix = self._check_matrix(matrix)
        k = matrix.shape[1]
        total, count = self._accumulate(lambda i, b: self._batch_columns(i, b, matrix), self.num_params * k)
        return total.reshape(self.num_params, k), count

    # --------------------------------------------------------------------------------------- products
    def matmat(self, matrix: Tensor) -> Tensor:
        """:math:`A V` for ``V`` of shape ``(P, k)``: one pass over the sample and one reduction for all columns.

        Returns:
            The product :math:`A V` of shape ``(P, k)``.

        Raises:
            ConfigurationError: If ``matrix`` is not ``(P, k)``.
            NonFiniteError: If the product is not finite.
        """
        matrix = self._check_matrix(matrix)
        total, count = self.local_matmat(matrix)
        result = self._global_mean(total.reshape(-1), count, matrix.shape[1]).reshape(total.shape)
        if self.damping:
            result = result + self.damping * matrix
        if self.check_finite and not all_finite(result):
            self._raise_non_finite(matrix[:, :1])
        return result

    def quadratic_forms(self, matrix: Tensor) -> Tensor:
        r""":math:`v_j^\top A v_j` for every column of ``matrix`` ``(P, k)`` (damping included).

        Operators with a forward-only form (the GNH and Fisher family) skip the reverse pass.

        Returns:
            A length-``k`` vector.

        Raises:
            ConfigurationError: If the sample has no counted units.
            NonFiniteError: If a value is not finite.
        """
        matrix = self._check_matrix(matrix)
        k = matrix.shape[1]
        if not self._forward_only:
            return (matrix * self.matmat(matrix)).sum(0)
        total, count = self._accumulate(lambda i, b: self._batch_quadratic_forms(i, b, matrix), k)
        values = self._global_mean(total, count, k) + (self.damping * (matrix * matrix).sum(0) if self.damping else 0.0)
        if self.check_finite and not all_finite(values):
            self._raise_non_finite(matrix[:, :1])
        return values

    #: Whether :meth:`_batch_quadratic_forms` computes quadratic forms with forward mode only.
    _forward_only = False

    def _batch_quadratic_forms(self, i: int, batch: Any, matrix: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # pragma: no cover

    def _batch_product(self, batch_index: int, batch: Any, v: ParamTree) -> tuple[ParamTree, Tensor]:
        """Return (sum over the batch's units of M_n v, number of counted units)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _batch_product")  # pragma: no cover

    def _batch_matmat(self, batch_index: int, batch: Any, vs: ParamTree) -> tuple[ParamTree, Tensor]:
        """Vectorised :meth:`_batch_product` over a leading column dimension of every leaf of ``vs``."""
        raise NotImplementedError(f"{type(self).__name__} has no vectorised product")  # pragma: no cover

    def _raise_non_finite(self, matrix: Tensor) -> None:
        with curvature_mode(self.model):
            for i, batch in enumerate(self.data):
                prod, _ = self._batch_columns(i, batch, matrix)
                if not bool(torch.isfinite(prod).all()):
                    raise NonFiniteError(
                        f"{type(self).__name__} product is not finite on batch {i} of this process's sample. Check "
                        "that batch's inputs and the model's outputs on it (overflowing logits, NaN weights)."
                    )
        raise NonFiniteError(
            f"{type(self).__name__} product is not finite after reduction (the probe vector or another rank's "
            "contribution contains NaN/Inf)."
        )

    def dense(self) -> Tensor:
        """The full ``(P, P)`` matrix (damping included), for tiny models and tests.

        Returns:
            The dense ``(P, P)`` matrix :math:`A`.

        Raises:
            ConfigurationError: If ``P`` exceeds ``DENSE_MAX_PARAMS`` (12,000; use the matrix-free products instead).
        """
        if self.num_params > DENSE_MAX_PARAMS:
            raise ConfigurationError(f"dense() on {self.num_params} parameters would be too large; use matvec().")
        return self.matmat(torch.eye(self.num_params, dtype=self.param_dtype, device=self.device))

    @property
    def num_units(self) -> float:
        """Global number of counted units in the sample (known after the first product)."""
        if self._count is None:
            self.matvec(torch.zeros(self.num_params, dtype=self.param_dtype, device=self.device))
        assert self._count is not None
        return self._count

    def to_dict(self) -> dict[str, object]:
        """Plain description for reports.

        Returns:
            Kind, dimension, batches, damping, dtype and task.
        """
        return {
            "kind": self.kind,
            "num_params": self.num_params,
            "num_batches": len(self.data),
            "damping": self.damping,
            "dtype": str(self.param_dtype),
            "task": self.task.to_dict(),
        }


class _OutputSpaceOperator(CurvatureOperator):
    r""":math:`J^\top C J` operators: forward-mode ``Jv``, an output-space map ``C``, one reverse-mode product.

    The forward-mode tangent rides on the primal forward pass (dual tensors), so one product costs one forward
    pass with tangents and one backward pass: about 1.3 gradients. Quadratic forms need the forward pass only,
    and :meth:`dense` assembles :math:`\sum_n J_n^\top C_n J_n` from per-batch output Jacobians.
    """

    _vectorized = True
    _forward_only = True

    def _output_map(self, batch_index: int, outputs: Tensor, targets: Tensor, jv: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def _before_map(self, batch_index: int, outputs: Tensor, targets: Tensor) -> None:
        """Hook run before the output map is vectorised over Jacobian columns (random draws must happen here)."""

    def _jvp_outputs(self, f: Callable[[ParamTree], Tensor], v: ParamTree) -> tuple[Tensor, Tensor, ParamTree]:
        """Primal outputs (with a graph to the returned leaf parameters) and their tangent ``J v``."""
        leaves = {k: p.detach().requires_grad_(True) for k, p in self.params.items()}
        with fwad.dual_level():
            dual = {k: fwad.make_dual(leaves[k], v[k]) for k in leaves}
            out = f(dual)
            unpacked = fwad.unpack_dual(out)
            primal, tangent = unpacked.primal, unpacked.tangent
        if tangent is None:  # outputs do not depend on the parameters
            tangent = torch.zeros_like(primal)
        return primal, tangent.detach(), leaves

    def _batch_product(self, batch_index: int, batch: Any, v: ParamTree) -> tuple[ParamTree, Tensor]:
        f, targets = self.evaluator.output_fn(batch)
        outputs, jv, leaves = self._jvp_outputs(f, v)
        self.task.loss.validate(outputs.detach(), targets)
        c = self._output_map(batch_index, outputs.detach(), targets, jv)
        names = list(leaves)
        grads = torch.autograd.grad(outputs, [leaves[k] for k in names], grad_outputs=c, allow_unused=True)
        prod = {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(names, grads, strict=True)}
        return prod, self._units(outputs, targets)

    def _batch_matmat(self, batch_index: int, batch: Any, vs: ParamTree) -> tuple[ParamTree, Tensor]:
        f, targets = self.evaluator.output_fn(batch)
        outputs, pullback = vjp(f, self.params)  # type: ignore[misc]
        self.task.loss.validate(outputs.detach(), targets)
        jvs = vmap(lambda v: jvp(f, (self.params,), (v,))[1])(vs)  # (k, *outputs.shape)
        c = self._output_map(batch_index, outputs.detach(), targets, jvs.detach())
        (prod,) = vmap(pullback)(c)
        return prod, self._units(outputs, targets)

    def _batch_quadratic_forms(self, i: int, batch: Any, matrix: Tensor) -> tuple[Tensor, Tensor]:
        f, targets = self.evaluator.output_fn(batch)
        k = matrix.shape[1]
        if k == 1:
            outputs, jv = jvp(f, (self.params,), (unflatten(matrix[:, 0], self.params),))  # type: ignore[misc]
            jvs = jv.unsqueeze(0)
        else:
            outputs, jvs = vmap(lambda v: jvp(f, (self.params,), (v,)), out_dims=(None, 0))(  # type: ignore[misc, arg-type]
                self._columns(matrix))
        self.task.loss.validate(outputs.detach(), targets)
        c = self._output_map(i, outputs.detach(), targets, jvs.detach() if k > 1 else jvs[0].detach())
        qs = (jvs.detach() * c.reshape(jvs.shape)).reshape(k, -1).sum(1)
        return qs, self._units(outputs, targets)

    def dense(self) -> Tensor:
        r"""Dense :math:`\frac1N\sum_n J_n^\top C_n J_n` (+ damping) from per-batch output Jacobians.

        Far cheaper than ``P`` products; one reduction for the whole matrix.

        Returns:
            The symmetric ``(P, P)`` matrix.

        Raises:
            ConfigurationError: If ``P`` exceeds ``DENSE_MAX_PARAMS`` (12,000) or the sample has no counted unit.
        """
        p = self.num_params
        if p > DENSE_MAX_PARAMS:
            raise ConfigurationError(f"dense() on {p} parameters would be too large; use matvec() or solver='cg'.")

        def per_batch(i: int, batch: Any) -> tuple[Tensor, Tensor]:
            outputs, targets, J = self.evaluator.output_jacobian(batch)  # J: (*out, P), one jacrev per example
            self.task.loss.validate(outputs, targets)
            self._before_map(i, outputs, targets)
            CJ = vmap(lambda j: self._output_map(i, outputs, targets, j), in_dims=-1, out_dims=-1)(J)
            return symmetric_gram(J.reshape(-1, p), CJ.reshape(-1, p)), self._units(outputs, targets)

        total, count = self._accumulate(per_batch, p * p)
        G = self._global_mean(total, count, p).reshape(p, p)
        return 0.5 * (G + G.T) + self.damping * torch.eye(p, dtype=G.dtype, device=G.device)


class GNHOperator(LinearizedProducts, _OutputSpaceOperator):
    r"""Gauss-Newton Hessian :math:`G = \frac1N \sum_n J_n^\top S_n J_n` (+ damping).

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> op = GNHOperator(model, Regression(), [(x, torch.zeros(2, 1, dtype=torch.float64))])
        >>> op.dense()  # X^T X / N
        tensor([[0.5000, 0.0000],
                [0.0000, 2.0000]], dtype=torch.float64)
    """

    kind = "gnh"

    def _output_map(self, batch_index: int, outputs: Tensor, targets: Tensor, jv: Tensor) -> Tensor:
        return self.task.loss.output_hvp(outputs, targets, jv)

    def _output_map_fn(self, i: int, outputs: Tensor, targets: Tensor) -> Callable[[Tensor], Tensor]:
        return self.task.loss.output_hvp_map(outputs, targets)


class ExpectedFisherOperator(LinearizedProducts, _OutputSpaceOperator):
    """Fisher with labels integrated out under the model's predictive distribution (equals the GNH here).

    Example::

        >>> from lightning_influence.tasks import Classification
        >>> model = torch.nn.Linear(3, 2).double()
        >>> x = torch.randn(4, 3, generator=make_generator(0), dtype=torch.float64)
        >>> data = [(x, torch.tensor([0, 1, 1, 0]))]
        >>> fisher = ExpectedFisherOperator(model, Classification(), data).dense()
        >>> fisher.shape, torch.allclose(fisher, GNHOperator(model, Classification(), data).dense())
        (torch.Size([8, 8]), True)
    """

    kind = "expected_fisher"

    def _output_map(self, batch_index: int, outputs: Tensor, targets: Tensor, jv: Tensor) -> Tensor:
        return self.task.loss.expected_fisher_output_vp(outputs, targets, jv)


class SampledFisherOperator(LinearizedProducts, _OutputSpaceOperator):
    r"""Monte-Carlo Fisher :math:`\frac{1}{Nm}\sum_n\sum_{s=1}^m J_n^\top \hat g_{ns} \hat g_{ns}^\top J_n`.

    Labels :math:`\hat y_{ns} \sim p(\cdot \mid x_n, \theta)` are drawn once, at the first product, from a
    generator seeded with ``seed``, so the operator is a fixed (symmetric PSD) matrix; its expectation is the GNH.

    Args:
        mc_samples: Number of label draws ``m`` per unit.
        seed: Seed of the label generator.
        **kwargs: As :class:`CurvatureOperator`.

    Example::

        >>> from lightning_influence.tasks import Classification
        >>> model = torch.nn.Linear(3, 2).double()
        >>> with torch.no_grad():  # fixed weights: the check below is statistical, so it must not depend on the RNG
        ...     _ = model.weight.copy_(torch.randn(2, 3, generator=make_generator(1), dtype=torch.float64))
        ...     _ = model.bias.zero_()
        >>> x = torch.randn(4, 3, generator=make_generator(0), dtype=torch.float64)
        >>> data = [(x, torch.tensor([0, 1, 1, 0]))]
        >>> fisher = SampledFisherOperator(model, Classification(), data, mc_samples=2000, seed=0).dense()
        >>> torch.allclose(fisher, fisher.T), bool(torch.linalg.eigvalsh(fisher).min() > -1e-12)
        (True, True)
        >>> gnh = GNHOperator(model, Classification(), data).dense()
        >>> bool((fisher - gnh).norm() < 0.05 * gnh.norm())  # Monte-Carlo estimate of the GNH
        True
    """

    kind = "sampled_fisher"

    def __init__(self, model: nn.Module, task: Task, data: DataSource | Sequence[Any], *, mc_samples: int = 1,
                 seed: int = 0, **kwargs: Any) -> None:
        super().__init__(model, task, data, **kwargs)
        if mc_samples < 1:
            raise ConfigurationError(f"mc_samples must be >= 1, got {mc_samples}.")
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        self._grads: dict[int, Tensor] = {}

    def _before_map(self, batch_index: int, outputs: Tensor, targets: Tensor) -> None:
        if batch_index not in self._grads:
            gen = make_generator(derive_seed(self.seed, "sampled-labels", batch_index))
            draws = self.task.loss.sample_targets(outputs, targets, gen, num_samples=self.mc_samples)
            grads = self.task.loss.output_grad(outputs, draws)
            self._grads[batch_index] = grads.reshape(self.mc_samples, *outputs.shape)

    def _output_map(self, batch_index: int, outputs: Tensor, targets: Tensor, jv: Tensor) -> Tensor:
        self._before_map(batch_index, outputs, targets)
        g = self._grads[batch_index]  # (m, *outputs.shape)
        extra = jv.ndim - outputs.ndim  # 1 when a column dimension leads (vectorised products)
        g = g.reshape(g.shape[0], *([1] * extra), *g.shape[1:])
        event_dims = outputs.ndim - self.task.loss.unit_mask(outputs, targets).ndim
        prod = g * jv  # (m, [k], *outputs.shape)
        coef = prod.sum(dim=tuple(range(-event_dims, 0)), keepdim=True) if event_dims else prod  # g^T J v per unit
        return (g * coef).mean(0)


class FiniteDifferenceGNHOperator(_OutputSpaceOperator):
    r"""GNH with :math:`J v \approx (h(\theta + \epsilon v) - h(\theta - \epsilon v)) / (2\epsilon)` (paper 1, App. D).

    Args:
        step: Relative step; the absolute step is ``step * (1 + ||θ||) / ||v||``. Default: the cube root of the
            dtype's machine epsilon (optimal for central differences).
        **kwargs: As :class:`CurvatureOperator`.

    Example::

        >>> from lightning_influence.tasks import Classification
        >>> model = torch.nn.Linear(3, 2).double()
        >>> x = torch.randn(4, 3, generator=make_generator(0), dtype=torch.float64)
        >>> data = [(x, torch.tensor([0, 1, 1, 0]))]
        >>> fd = FiniteDifferenceGNHOperator(model, Classification(), data).dense()
        >>> torch.allclose(fd, GNHOperator(model, Classification(), data).dense(), atol=1e-8)
        True
    """

    kind = "finite_difference_gnh"
    _vectorized = False  # the central difference is taken per direction
    _forward_only = False  # no cheaper forward-only form: quadratic forms use the full product
    dense = CurvatureOperator.dense  # the matrix of the finite-difference products themselves, column by column

    def __init__(self, model: nn.Module, task: Task, data: DataSource | Sequence[Any], *, step: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(model, task, data, **kwargs)
        self.step = float(step) if step is not None else float(torch.finfo(self.param_dtype).eps) ** (1 / 3)

    def _jvp_outputs(self, f: Callable[[ParamTree], Tensor], v: ParamTree) -> tuple[Tensor, Tensor, ParamTree]:
        vnorm = float(flatten(v).norm())
        if vnorm == 0.0:
            leaves = {k: p.detach().requires_grad_(True) for k, p in self.params.items()}
            out = f(leaves)
            return out, torch.zeros_like(out), leaves
        eps = self.step * (1.0 + float(flatten(self.params).norm())) / vnorm
        with torch.no_grad():
            plus = f({k: p + eps * v[k] for k, p in self.params.items()})
            minus = f({k: p - eps * v[k] for k, p in self.params.items()})
        leaves = {k: p.detach().requires_grad_(True) for k, p in self.params.items()}
        return f(leaves), (plus - minus) / (2 * eps), leaves

    def _output_map(self, batch_index: int, outputs: Tensor, targets: Tensor, jv: Tensor) -> Tensor:
        return self.task.loss.output_hvp(outputs, targets, jv)


class _StreamedHessian(CurvatureOperator):
    """Forward-over-reverse Hessian products, streamed (the primal pass repeated per product)."""

    def _loss_and_outputs(self, batch: Any) -> tuple[Callable[[ParamTree], tuple[Tensor, Tensor]], Tensor, Tensor]:
        """The batch's summed loss and outputs as a function of the parameters, its outputs and its unit count.

        The batch is validated first (one forward pass without a graph).

        Returns:
            ``(loss_and_outputs, outputs, units)``: ``loss_and_outputs(params)`` is ``(summed loss, outputs)``.
        """
        f, targets = self.evaluator.output_fn(batch)
        with torch.no_grad():
            out = f(self.params)
        self.task.loss.validate(out, targets)
        unit_losses = self.task.loss.unit_losses

        def loss_and_outputs(p: ParamTree) -> tuple[Tensor, Tensor]:
            outputs = f(p)
            return unit_losses(outputs, targets).sum(), outputs

        return loss_and_outputs, out, self._units(out, targets)

    def _batch_product(self, batch_index: int, batch: Any, v: ParamTree) -> tuple[ParamTree, Tensor]:
        loss_and_outputs, _, units = self._loss_and_outputs(batch)
        return jvp(grad(loss_and_outputs, has_aux=True), (self.params,), (v,))[1][0], units

    _vectorized = True

    def _batch_matmat(self, batch_index: int, batch: Any, vs: ParamTree) -> tuple[ParamTree, Tensor]:
        loss_and_outputs, _, units = self._loss_and_outputs(batch)
        gradient = grad(loss_and_outputs, has_aux=True)
        return vmap(lambda v: jvp(gradient, (self.params,), (v,))[1][0])(vs), units


class HessianOperator(LinearizedProducts, _StreamedHessian):
    r"""True Hessian of the mean loss, :math:`\nabla^2 \frac1N \sum_n \ell_n`, by forward-over-reverse.

    It may be indefinite; use it for comparison with the GNH, not as the default curvature.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
        >>> y = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
        >>> op = HessianOperator(torch.nn.Linear(2, 1, bias=False).double(), Regression(), [(x, y)])
        >>> op.dense()  # linear model, squared loss: X^T X / N
        tensor([[ 5.0000, -0.5000],
                [-0.5000,  2.5000]], dtype=torch.float64)
    """

    kind = "hessian"
    _linearized_kind = "hessian"


def loss_gradient(model: nn.Module, task: Task, data: DataSource | Sequence[Any],
                  reduce_fn: ReduceFn | None = None) -> Tensor:
    """Flat gradient of the mean loss over ``data`` (one forward and one backward per batch, one reduction).

    Returns:
        The flat gradient (length ``P``) of the loss averaged over all counted units.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> m = torch.nn.Linear(1, 1, bias=False)
        >>> _ = torch.nn.init.ones_(m.weight)
        >>> loss_gradient(m, Regression(), [(torch.ones(1, 1), torch.zeros(1, 1))])
        tensor([1.])
    """
    return Evaluator(model, task).mean_gradient(DataSource.coerce(data).batches(), reduce_fn)


#: Curvature kinds by name (``"fisher"`` is the expected Fisher, AFIF's name for it).
CURVATURE_KINDS: dict[str, type[CurvatureOperator]] = {
    "gnh": GNHOperator,
    "expected_fisher": ExpectedFisherOperator,
    "fisher": ExpectedFisherOperator,
    "sampled_fisher": SampledFisherOperator,
    "finite_difference_gnh": FiniteDifferenceGNHOperator,
    "hessian": HessianOperator,
}


def operator_class(kind: str) -> type[CurvatureOperator]:
    """The operator class of a curvature kind (``"gnh"``, ``"expected_fisher"``/``"fisher"``, ...).

    Returns:
        The class.

    Raises:
        ConfigurationError: For an unknown kind (the message lists the known ones).

    Example::

        >>> operator_class("gnh").__name__, operator_class("fisher").__name__
        ('GNHOperator', 'ExpectedFisherOperator')
    """
    if kind not in CURVATURE_KINDS:
        raise ConfigurationError(f"curvature must be one of {sorted(CURVATURE_KINDS)}, got {kind!r}.")
    return CURVATURE_KINDS[kind]


def make_operator(
    kind: str, model: nn.Module, task: Task, data: DataSource | Sequence[Any], *, seed: int = 0, **kwargs: Any
) -> CurvatureOperator:
    """Build the curvature operator of ``kind`` over ``data`` (``seed`` reaches the sampled Fisher only).

    Returns:
        The operator.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> op = make_operator("hessian", torch.nn.Linear(2, 1), Regression(), [(torch.ones(3, 2), torch.ones(3, 1))])
        >>> op.kind, op.num_params
        ('hessian', 3)
    """
    cls = operator_class(kind)
    extra: dict[str, Any] = {"seed": seed} if cls is SampledFisherOperator else {}
    return cls(model, task, data, **extra, **kwargs)


def local_curvature_matmat(
    model: nn.Module, task: Task, batches: Sequence[Any], matrix: Tensor, *, curvature: str = "gnh", seed: int = 0
) -> tuple[Tensor, Tensor]:
    r"""Unnormalised curvature products of several vectors on this process's batches, without any reduction.

    A shortcut for ``make_operator(curvature, model, task, batches, seed=seed).local_matmat(matrix)``.

    Returns:
        ``(S, n)``: :math:`S = \sum_{\text{units}} M_u V` of shape ``(P, k)`` and the number of counted units ``n``
        (a 0-d tensor), so that the caller can reduce ``(S, n)`` over ranks and divide.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(5, 2, generator=g, dtype=torch.float64)
        >>> y = torch.randn(5, 1, generator=g, dtype=torch.float64)
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> batches = [(x[:3], y[:3]), (x[3:], y[3:])]
        >>> s, n = local_curvature_matmat(model, Regression(), batches, torch.eye(2, dtype=torch.float64))
        >>> torch.allclose(s, x.T @ x), n   # linear model + squared loss: the summed GNH is X^T X
        (True, tensor(5., dtype=torch.float64))
    """
    return make_operator(curvature, model, task, batches, seed=seed).local_matmat(matrix)
