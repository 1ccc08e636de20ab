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

The data are a list of already collated batches (see :func:`make_batches`). For data-parallel use, each rank
holds its shard of the sample and passes ``reduce_fn``, a function that sums a flat tensor over ranks: every
product then costs exactly one reduction of ``(local sum, local unit count)``.

While computing, the model is put in eval mode (dropout off, BatchNorm on running statistics, which are not
updated), autograd is forced on (also under ``torch.inference_mode``), parameters are used through
``torch.func.functional_call`` so ``.grad`` fields are never written, and the global RNG is never used. The
model's per-module training flags are restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad as fwad
from torch.func import grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from lightning_influence.exceptions import ConfigurationError, NonFiniteError
from lightning_influence.params import (
    ParamTree,
    flatten,
    make_generator,
    num_parameters,
    trainable_parameters,
    unflatten,
)
from lightning_influence.tasks import Task

ReduceFn = Callable[[Tensor], Tensor]


@contextlib.contextmanager
def curvature_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode with autograd forced on and math attention; restores every submodule's training flag on exit.

    Example::

        >>> m = torch.nn.Dropout().train()
        >>> with torch.no_grad(), curvature_mode(m):
        ...     (m.training, torch.is_grad_enabled())
        (False, True)
        >>> m.training
        True
    """
    modes = [(m, m.training) for m in model.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    # nn.MultiheadAttention / TransformerEncoderLayer take a fused eval-mode "fast path" without forward-mode AD.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        # Fused attention kernels (flash / memory-efficient) have no forward-mode derivative; the math backend
        # computes the same attention and supports jvp, vmap and double backward.
        with torch.inference_mode(False), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, mode in modes:
            module.training = mode


def prepare_batch(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor of a batch to ``device``; clone inference-mode tensors so autograd can use them.

    Floating tensors are cast to ``dtype`` when given (e.g. float64 for exact checks).

    Returns:
        The batch with the same structure, its tensors on ``device``.

    Example::

        >>> with torch.inference_mode():
        ...     x = torch.ones(2)
        >>> b = prepare_batch({"x": x, "y": torch.tensor([1, 2])}, torch.device("cpu"), torch.float64)
        >>> b["x"].dtype, b["y"].dtype  # only floating tensors are cast
        (torch.float64, torch.int64)
        >>> x.is_inference(), b["x"].is_inference()
        (True, False)
    """

    def move(x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        if dtype is not None and torch.is_floating_point(x):
            x = x.to(device=device, dtype=dtype)
        else:
            x = x.to(device=device)
        return x.clone() if x.is_inference() else x

    with torch.inference_mode(False):
        return tree_map(move, batch)


def make_batches(
    dataset: Any,
    indices: Sequence[int] | Tensor | None = None,
    batch_size: int = 128,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> list[Any]:
    """Collate ``dataset[i]`` for ``i`` in ``indices`` into a list of batches (the operators' data format).

    Args:
        dataset: Anything indexable returning one example (a map-style ``Dataset``, a list of tuples...).
        indices: Which examples, in order (default: all of ``range(len(dataset))``).
        batch_size: Examples per batch; the last batch may be smaller.
        collate_fn: How to collate a list of examples (default ``torch.utils.data.default_collate``).

    Returns:
        The list of collated batches (possibly empty, e.g. for a rank with no shard).

    Raises:
        ConfigurationError: For a non-positive ``batch_size`` or an index out of range.

    Example::

        >>> ds = torch.utils.data.TensorDataset(torch.arange(5.0), torch.arange(5))
        >>> [len(b[0]) for b in make_batches(ds, batch_size=2)]
        [2, 2, 1]
    """
    from torch.utils.data import default_collate

    if batch_size <= 0:
        raise ConfigurationError(f"batch_size must be positive, got {batch_size}.")
    n = len(dataset)
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ConfigurationError(f"indices {bad[:5]} are out of range for a dataset of {n} examples.")
    collate = collate_fn or default_collate
    return [collate([dataset[i] for i in idx[s : s + batch_size]]) for s in range(0, len(idx), batch_size)]


class CurvatureOperator:
    r"""Base class: a symmetric, matrix-free operator averaged over a fixed sample.

    Subclasses implement :meth:`_batch_product` (the unnormalised sum of per-unit products over one batch).

    Args:
        model: The module; only its trainable parameters are differentiated.
        task: Turns batches into ``(outputs, targets)`` and names the loss family.
        data: Collated batches (this rank's shard under data parallelism); see :func:`make_batches`.
        damping: :math:`\lambda \ge 0` added as :math:`\lambda I`.
        reduce_fn: Sums a flat tensor over ranks (``None`` on a single process).
        dtype: Cast floating inputs in the batches to this dtype (``None`` keeps them; the model's parameter
            dtype is always used for the products).
        check_finite: Raise :class:`NonFiniteError` naming the batch when a product is not finite.

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

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        data: Sequence[Any],
        *,
        damping: float = 0.0,
        reduce_fn: ReduceFn | None = None,
        dtype: torch.dtype | None = None,
        check_finite: bool = True,
    ) -> None:
        if damping < 0:
            raise ConfigurationError(f"damping must be >= 0, got {damping}; use 0 for no damping.")
        self.model = model
        self.task = task
        self.params: ParamTree = trainable_parameters(model)
        first = next(iter(self.params.values()))
        self.device, self.param_dtype = first.device, first.dtype
        self.data = [prepare_batch(b, self.device, dtype) for b in data]
        self.damping = float(damping)
        self.reduce_fn = reduce_fn
        self.check_finite = check_finite
        #: Number of examples this process has pushed through the model (for sharding checks).
        self.examples_processed = 0
        #: Number of operator products computed (multi-vector products count each column).
        self.num_products = 0
        self._count: float | None = None

    # ------------------------------------------------------------------------------------------ basics
    @property
    def num_params(self) -> int:
        """Dimension :math:`P` of the parameter space."""
        return num_parameters(self.params)

    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)``."""
        return (self.num_params, self.num_params)

    def with_damping(self, damping: float) -> CurvatureOperator:
        """A shallow copy of this operator with another damping."""
        if damping < 0:
            raise ConfigurationError(f"damping must be >= 0, got {damping}.")
        new = copy.copy(self)
        new.damping = float(damping)
        return new

    def _outputs_fn(self, batch: Any) -> tuple[Callable[[ParamTree], Tensor], Tensor]:
        inputs, targets = self.task.split(batch)

        def f(p: ParamTree) -> Tensor:
            out, _ = self.task.targets(self.task.outputs(self.task.forward(self.model, p, inputs)), targets)
            return out

        _, targets = self.task.targets(torch.empty(0), targets)
        return f, targets

    # --------------------------------------------------------------------------------------- products
    def _batch_product(self, batch_index: int, batch: Any, v: ParamTree) -> tuple[ParamTree, Tensor]:
        """Return (sum over the batch's units of M_n v, number of counted units)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _batch_product")  # pragma: no cover

    def _reduce(self, local: Tensor) -> Tensor:
        return self.reduce_fn(local) if self.reduce_fn is not None else local

    def _sample_mean(
        self, per_batch: Callable[[int, Any], tuple[Tensor, Tensor]], size: int, products: int
    ) -> Tensor:
        """Mean over the whole sample of a per-batch sum: the one accumulation every product shares.

        ``per_batch(i, batch)`` returns this rank's unnormalised sum for the batch (``size`` numbers in any shape)
        and its number of counted units. The sums are accumulated over this rank's batches (none on an empty
        shard), reduced once together with the count, and divided by the global unit count.

        Returns:
            The flat mean (length ``size``) over all counted units of all ranks.

        Raises:
            ConfigurationError: If the whole sample has no counted unit.
        """
        total = torch.zeros(size, dtype=self.param_dtype, device=self.device)
        count = torch.zeros((), dtype=self.param_dtype, device=self.device)
        with curvature_mode(self.model):
            for i, batch in enumerate(self.data):
                local, n = per_batch(i, batch)
                total = total + local.detach().reshape(-1)
                count = count + n
                self.examples_processed += self.task.batch_size(batch)
        reduced = self._reduce(torch.cat([total, count.reshape(1)]))
        self.num_products += products
        self._count = float(reduced[-1])
        if self._count <= 0:
            raise ConfigurationError(
                f"{type(self).__name__}: the sample has no counted units (empty data, or every target ignored)."
            )
        return reduced[:-1] / self._count

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`A v` for a flat vector ``v`` of length ``P``.

        Returns:
            The flat product :math:`A v` (length ``P``).

        Raises:
            ConfigurationError: If ``v`` has the wrong shape.
            NonFiniteError: If the product is not finite (names the first offending batch).
        """
        if v.ndim != 1 or v.shape[0] != self.num_params:
            raise ConfigurationError(f"expected a vector of length {self.num_params}, got shape {tuple(v.shape)}.")
        v = v.to(device=self.device, dtype=self.param_dtype)
        vtree = unflatten(v, self.params)

        def per_batch(i: int, batch: Any) -> tuple[Tensor, Tensor]:
            prod, n = self._batch_product(i, batch, vtree)
            return flatten(prod), n

        result = self._sample_mean(per_batch, self.num_params, 1) + self.damping * v
        if self.check_finite and not bool(torch.isfinite(result).all()):
            self._raise_non_finite(vtree)
        return result

    def _raise_non_finite(self, vtree: ParamTree) -> None:
        with curvature_mode(self.model):
            for i, batch in enumerate(self.data):
                prod, _ = self._batch_product(i, batch, vtree)
                if not bool(torch.isfinite(flatten(prod)).all()):
                    raise NonFiniteError(
                        f"{type(self).__name__} product is not finite on batch {i} of this process's sample. Check "
                        "that batch's inputs and the model's outputs on it (overflowing logits, NaN weights)."
                    )
        raise NonFiniteError(
            f"{type(self).__name__} product is not finite after reduction (the probe vector or another rank's "
            "contribution contains NaN/Inf)."
        )

    def matmat(self, matrix: Tensor) -> Tensor:
        """:math:`A V` for ``V`` of shape ``(P, k)``.

        Operators with a vectorised batch product (``torch.func.vmap`` over the columns) use it, with one
        reduction for all columns; otherwise the columns go through :meth:`matvec` one by one.

        Returns:
            The product :math:`A V` of shape ``(P, k)``.

        Raises:
            ConfigurationError: If ``matrix`` is not ``(P, k)``.
            NonFiniteError: If the product is not finite.
        """
        if matrix.ndim != 2 or matrix.shape[0] != self.num_params:
            raise ConfigurationError(f"matmat expects a ({self.num_params}, k) matrix, got {tuple(matrix.shape)}.")
        if not self._vectorized:
            return torch.stack([self.matvec(matrix[:, j]) for j in range(matrix.shape[1])], dim=1)
        matrix = matrix.to(device=self.device, dtype=self.param_dtype)
        k = matrix.shape[1]
        vtree = {name: leaf.movedim(-1, 0) for name, leaf in unflatten(matrix, self.params).items()}

        def per_batch(i: int, batch: Any) -> tuple[Tensor, Tensor]:
            prod, n = self._batch_matmat(i, batch, vtree)
            return torch.cat([leaf.reshape(k, -1) for leaf in prod.values()], dim=1), n

        mean = self._sample_mean(per_batch, k * self.num_params, k)
        result = mean.reshape(k, -1).T + self.damping * matrix
        if self.check_finite and not bool(torch.isfinite(result).all()):
            self._raise_non_finite(unflatten(matrix[:, 0], self.params))
        return result

    #: Whether :meth:`_batch_matmat` is implemented.
    _vectorized = False

    def _batch_matmat(self, batch_index: int, batch: Any, vs: ParamTree) -> tuple[ParamTree, Tensor]:
        """Vectorised :meth:`_batch_product` over a leading column dimension of every leaf of ``vs``."""
        raise NotImplementedError(f"{type(self).__name__} has no vectorised product")  # pragma: no cover

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.ndim == 1 else self.matmat(other)

    def quadratic_form(self, v: Tensor) -> Tensor:
        r""":math:`v^\top A v` (subclasses may do this more cheaply than a full product)."""
        return torch.dot(v.to(self.param_dtype), self.matvec(v))

    def dense(self) -> Tensor:
        """The full ``(P, P)`` matrix, for tiny models and tests.

        Returns:
            The dense ``(P, P)`` matrix :math:`A`.

        Raises:
            ConfigurationError: If ``P`` exceeds 5,000 (use the matrix-free products instead).
        """
        if self.num_params > 5000:
            raise ConfigurationError(f"dense() on {self.num_params} parameters would be too large; use matvec().")
        eye = torch.eye(self.num_params, dtype=self.param_dtype, device=self.device)
        return self.matmat(eye)

    @property
    def num_units(self) -> float:
        """Global number of counted units in the sample (known after the first product)."""
        if self._count is None:
            self.matvec(torch.zeros(self.num_params, dtype=self.param_dtype, device=self.device))
        assert self._count is not None
        return self._count

    def to_dict(self) -> dict[str, object]:
        """Plain description for reports."""
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
    pass with tangents and one backward pass: about 1.3 gradients.
    """

    def _output_map(self, batch_index: int, outputs: Tensor, targets: Tensor, jv: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover

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
        f, targets = self._outputs_fn(batch)
        outputs, jv, leaves = self._jvp_outputs(f, v)
        self.task.loss.validate(outputs.detach(), targets)
        c = self._output_map(batch_index, outputs.detach(), targets, jv)
        names = list(leaves)
        grads = torch.autograd.grad(outputs, [leaves[k] for k in names], grad_outputs=c, allow_unused=True)
        prod = {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(names, grads, strict=True)}
        return prod, self.task.loss.unit_mask(outputs, targets).sum().to(outputs.dtype)

    _vectorized = True

    def _batch_matmat(self, batch_index: int, batch: Any, vs: ParamTree) -> tuple[ParamTree, Tensor]:
        f, targets = self._outputs_fn(batch)
        outputs, pullback = vjp(f, self.params)  # type: ignore[misc]
        self.task.loss.validate(outputs.detach(), targets)
        jvs = vmap(lambda v: jvp(f, (self.params,), (v,))[1])(vs)  # (k, *outputs.shape)
        c = self._output_map(batch_index, outputs.detach(), targets, jvs.detach())
        (prod,) = vmap(pullback)(c)
        return prod, self.task.loss.unit_mask(outputs, targets).sum().to(outputs.dtype)

    def quadratic_form(self, v: Tensor) -> Tensor:
        r""":math:`v^\top A v = \frac1N\sum_n (J_n v)^\top C_n (J_n v) + \lambda\|v\|^2` with forward mode only."""
        v = v.to(device=self.device, dtype=self.param_dtype)
        vtree = unflatten(v, self.params)

        def per_batch(i: int, batch: Any) -> tuple[Tensor, Tensor]:
            f, targets = self._outputs_fn(batch)
            outputs, jv = jvp(f, (self.params,), (vtree,))  # type: ignore[misc]
            c = self._output_map(i, outputs.detach(), targets, jv.detach())
            return (jv.detach() * c).sum(), self.task.loss.unit_mask(outputs, targets).sum().to(v.dtype)

        value = self._sample_mean(per_batch, 1, 1)[0] + self.damping * torch.dot(v, v)
        if self.check_finite and not bool(torch.isfinite(value)):
            self._raise_non_finite(vtree)
        return value


    def quadratic_forms(self, matrix: Tensor) -> Tensor:
        r""":math:`v_j^\top A v_j` for every column of ``matrix`` ``(P, k)``: one vectorised forward-mode pass.

        Returns:
            A length-``k`` vector of the quadratic forms, damping included.

        Raises:
            ConfigurationError: If the sample has no counted units.

        Example::

            >>> from lightning_influence.tasks import Regression
            >>> m = torch.nn.Linear(2, 1, bias=False).double()
            >>> op = GNHOperator(m, Regression(), [(torch.eye(2, dtype=torch.float64), torch.zeros(2, 1).double())])
            >>> op.quadratic_forms(torch.eye(2, dtype=torch.float64))
            tensor([0.5000, 0.5000], dtype=torch.float64)
        """
        matrix = matrix.to(device=self.device, dtype=self.param_dtype)
        k = matrix.shape[1]
        vs = {name: leaf.movedim(-1, 0) for name, leaf in unflatten(matrix, self.params).items()}

        def per_batch(i: int, batch: Any) -> tuple[Tensor, Tensor]:
            f, targets = self._outputs_fn(batch)
            outputs, jvs = vmap(lambda v: jvp(f, (self.params,), (v,)), out_dims=(None, 0))(vs)  # type: ignore[misc, arg-type]
            self.task.loss.validate(outputs.detach(), targets)
            c = self._output_map(i, outputs.detach(), targets, jvs.detach())
            qs = (jvs.detach() * c).reshape(k, -1).sum(1)
            return qs, self.task.loss.unit_mask(outputs, targets).sum().to(matrix.dtype)

        values = self._sample_mean(per_batch, k, k) + self.damping * (matrix * matrix).sum(0)
        if self.check_finite and not bool(torch.isfinite(values).all()):
            self._raise_non_finite(unflatten(matrix[:, 0], self.params))
        return values


class GNHOperator(_OutputSpaceOperator):
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


class ExpectedFisherOperator(_OutputSpaceOperator):
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


class SampledFisherOperator(_OutputSpaceOperator):
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

    def __init__(self, model: nn.Module, task: Task, data: Sequence[Any], *, mc_samples: int = 1, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(model, task, data, **kwargs)
        if mc_samples < 1:
            raise ConfigurationError(f"mc_samples must be >= 1, got {mc_samples}.")
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        self._grads: dict[int, Tensor] = {}

    def _output_map(self, batch_index: int, outputs: Tensor, targets: Tensor, jv: Tensor) -> Tensor:
        if batch_index not in self._grads:
            gen = make_generator(self.seed + 7919 * batch_index)
            draws = self.task.loss.sample_targets(outputs, targets, gen, num_samples=self.mc_samples)
            grads = self.task.loss.output_grad(outputs, draws)
            self._grads[batch_index] = grads.reshape(self.mc_samples, *outputs.shape)
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

    def __init__(self, model: nn.Module, task: Task, data: Sequence[Any], *, step: float | None = None,
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

    def quadratic_form(self, v: Tensor) -> Tensor:
        """Uses the full product (finite differences have no cheaper forward-only form here)."""
        return CurvatureOperator.quadratic_form(self, v)


class HessianOperator(CurvatureOperator):
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

    def _batch_product(self, batch_index: int, batch: Any, v: ParamTree) -> tuple[ParamTree, Tensor]:
        f, targets = self._outputs_fn(batch)

        def loss_sum(p: ParamTree) -> Tensor:
            return self.task.loss.unit_losses(f(p), targets).sum()

        _, hv = jvp(grad(loss_sum), (self.params,), (v,))  # type: ignore[misc]
        with torch.no_grad():
            out = f(self.params)
        self.task.loss.validate(out, targets)
        return hv, self.task.loss.unit_mask(out, targets).sum().to(out.dtype)

    _vectorized = True

    def _batch_matmat(self, batch_index: int, batch: Any, vs: ParamTree) -> tuple[ParamTree, Tensor]:
        f, targets = self._outputs_fn(batch)

        def loss_sum(p: ParamTree) -> Tensor:
            return self.task.loss.unit_losses(f(p), targets).sum()

        hvs = vmap(lambda v: jvp(grad(loss_sum), (self.params,), (v,))[1])(vs)
        with torch.no_grad():
            out = f(self.params)
        self.task.loss.validate(out, targets)
        return hvs, self.task.loss.unit_mask(out, targets).sum().to(out.dtype)


def gnh_product_reference(model: nn.Module, task: Task, batch: Any, v: Tensor) -> Tensor:
    """Unnormalised GNH product of one batch by ``torch.func.jvp`` then ``torch.func.vjp`` (two forward passes).

    A second, independent implementation kept for tests and benchmarks.

    Returns:
        The flat, unnormalised GNH product for ``batch`` (length ``P``).

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
        >>> batch = (x, torch.zeros(2, 1, dtype=torch.float64))
        >>> m = torch.nn.Linear(2, 1, bias=False).double()
        >>> gnh_product_reference(m, Regression(), batch, torch.ones(2, dtype=torch.float64))  # X^T X 1
        tensor([9., 4.], dtype=torch.float64)
    """
    params = trainable_parameters(model)
    inputs, targets = task.split(batch)

    def f(p: ParamTree) -> Tensor:
        out, _ = task.targets(task.outputs(task.forward(model, p, inputs)), targets)
        return out

    with curvature_mode(model):
        outputs, jv = jvp(f, (params,), (unflatten(v, params),))  # type: ignore[misc]
        c = task.loss.output_hvp(outputs, targets, jv)
        _, pullback = vjp(f, params)  # type: ignore[misc]
        (prod,) = pullback(c)
    return flatten(prod)


def loss_gradient(model: nn.Module, task: Task, data: Sequence[Any], reduce_fn: ReduceFn | None = None) -> Tensor:
    """Flat gradient of the mean loss over ``data`` (one forward and one backward per batch), via ``torch.func``.

    Returns:
        The flat gradient (length ``P``) of the loss averaged over all counted units.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> m = torch.nn.Linear(1, 1, bias=False)
        >>> torch.nn.init.ones_(m.weight)
        Parameter containing:
        tensor([[1.]], requires_grad=True)
        >>> loss_gradient(m, Regression(), [(torch.ones(1, 1), torch.zeros(1, 1))])
        tensor([1.])
    """
    params = trainable_parameters(model)
    first = next(iter(params.values()))
    total = torch.zeros(num_parameters(params), dtype=first.dtype, device=first.device)
    count = torch.zeros((), dtype=first.dtype, device=first.device)
    with curvature_mode(model):
        for batch in data:
            batch = prepare_batch(batch, first.device)
            inputs, targets = task.split(batch)

            def loss_sum(
                p: ParamTree, inputs: tuple[Any, ...] = inputs, targets: Tensor = targets
            ) -> tuple[Tensor, Tensor]:
                out, y = task.targets(task.outputs(task.forward(model, p, inputs)), targets)
                task.loss.validate(out.detach(), y)
                return task.loss.unit_losses(out, y).sum(), task.loss.unit_mask(out, y).sum()

            g, n = grad(loss_sum, has_aux=True)(params)
            total = total + flatten(g).detach()
            count = count + n.to(first.dtype)
    reduced = reduce_fn(torch.cat([total, count.reshape(1)])) if reduce_fn is not None else torch.cat(
        [total, count.reshape(1)]
    )
    return reduced[:-1] / reduced[-1].clamp_min(1.0)
