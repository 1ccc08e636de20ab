r"""Fresh-batch curvature for LiSSA: seeded draws from a pool of examples, sharded over ranks, and condition C.1.

* :class:`SampledCurvature`: step ``t``'s batch is a seeded draw of pool examples that every rank makes
  identically; each rank multiplies on its slice and one reduction finishes the product.
* :func:`measure_batch_constant`: condition C.1's constant :math:`C` of paper 1 measured on the model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap
from torch.utils._pytree import tree_map

from lightning_influence.data import CollateFn, DataSource
from lightning_influence.distributed import ReduceFn, reduce_packed, shard_indices
from lightning_influence.evaluator import Evaluator, curvature_mode
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.operators.curvature import CurvatureOperator, make_operator, operator_class
from lightning_influence.params import ParamTree, derive_seed, make_generator, trainable_parameters, unflatten
from lightning_influence.tasks import Task

__all__ = ["BatchProduct", "SampledCurvature", "measure_batch_constant"]


class BatchProduct(Protocol):
    r"""What LiSSA needs: a *fresh* in-batch curvature product for every step.

    ``product(step, V)`` returns :math:`\tilde H_{\text{step}} V` (undamped, ``V`` of shape ``(P, k)``) on a batch
    that depends only on ``step`` and the sampler's seed, so that every data-parallel rank draws the same global
    batch, computes the product on its slice, and finishes it with one sum-reduction.

    Example::

        >>> class Halves:  # step t uses rows 2(t % 2), 2(t % 2) + 1; both halves have curvature I / 2
        ...     rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
        ...     num_params = 2
        ...     def __call__(self, step, matrix):
        ...         batch = self.rows[2 * (step % 2): 2 * (step % 2) + 2]
        ...         return batch.T @ (batch @ matrix) / 2
        >>> from lightning_influence.solvers import lissa
        >>> res = lissa(Halves(), torch.ones(2, dtype=torch.float64), damping=0.5, eta=0.5, steps=100,
        ...             certificate_size=None)
        >>> [round(v, 6) for v in res.x.tolist()], res.diverged  # (I / 2 + 0.5 I)^{-1} 1 = 1
        ([1.0, 1.0], False)
    """

    @property
    def num_params(self) -> int:
        """Dimension ``P``."""

    def __call__(self, step: int, matrix: Tensor) -> Tensor:
        r""":math:`\tilde H_{\text{step}} V` for ``V`` of shape ``(P, k)``."""


class SampledCurvature:
    r"""Fresh-batch curvature products for LiSSA, drawn from a seeded generator over a pool of examples.

    Step ``t`` draws ``batch_size`` *global* pool positions from a generator seeded with ``(seed, t)`` (with
    replacement by default, as in paper 1's analysis: independent draws :math:`x \sim \mathcal U(D)`). Every
    rank draws the same positions, keeps the slice ``positions[rank::world_size]``, computes the unnormalised
    product on it with :func:`local_curvature_matmat`, and one ``reduce_fn`` call sums ``(products, unit count)``
    over ranks. A step's batch therefore does not depend on the number of ranks, and ranks with an empty slice
    still join the reduction.

    Args:
        model: The module (unwrapped).
        task: The task.
        dataset: Map-style data set (anything with ``__len__`` and ``__getitem__``).
        batch_size: Examples per step, :math:`|B|` (for language models each example is a sequence; the
            curvature is still averaged per token).
        indices: Pool of data-set indices to sample from (default: all).
        seed: Seed of the step draws.
        replacement: Draw with replacement (default) or without replacement within a step.
        curvature: See :func:`local_curvature_matmat`.
        collate_fn: Collation of examples (default ``torch.utils.data.default_collate``).
        reduce_fn: Sums a flat tensor over ranks (``None`` on one process).
        rank: This process's rank.
        world_size: Number of ranks.
        dtype: Cast floating inputs to this dtype (e.g. float64 for exact checks).
        holdout: Pool examples reserved for :meth:`certificate_operator` and never drawn by a step (default 0: the
            certificate uses an independent draw instead).

    Raises:
        ConfigurationError: For an empty pool, a non-positive batch size or a bad rank.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> x = torch.eye(3, dtype=torch.float64)
        >>> ds = torch.utils.data.TensorDataset(x, torch.zeros(3, 1, dtype=torch.float64))
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> s = SampledCurvature(model, Regression(), ds, batch_size=3, replacement=False)
        >>> s(0, torch.eye(3, dtype=torch.float64)).diagonal()  # X^T X / 3 on the whole pool
        tensor([0.3333, 0.3333, 0.3333], dtype=torch.float64)
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        dataset: Any,
        *,
        batch_size: int,
        indices: Sequence[int] | Tensor | None = None,
        seed: int = 0,
        replacement: bool = True,
        curvature: str = "gnh",
        collate_fn: CollateFn | None = None,
        reduce_fn: ReduceFn | None = None,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype | None = None,
        holdout: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise ConfigurationError(f"rank={rank} must lie in [0, world_size={world_size}).")
        operator_class(curvature)
        source = DataSource(dataset, indices, batch_size=256, collate_fn=collate_fn, rank=rank,
                            world_size=world_size, shard_mode="strided")
        pool = source.indices
        if pool.numel() == 0:
            raise ConfigurationError("SampledCurvature: the pool of training examples is empty.")
        if not 0 <= holdout < pool.numel():
            raise ConfigurationError(f"holdout={holdout} must lie in [0, {pool.numel()}) (the pool size).")
        self.model, self.task, self.dataset = model, task, source.dataset
        self.batch_size = int(batch_size)
        self.seed, self.replacement, self.curvature = int(seed), bool(replacement), curvature
        self.collate_fn, self.reduce_fn = collate_fn, reduce_fn
        self.rank, self.world_size, self.dtype = int(rank), int(world_size), dtype
        if holdout:
            perm = torch.randperm(pool.numel(), generator=make_generator(derive_seed(self.seed, "holdout")))
            self.holdout_indices = pool[perm[:holdout]].sort().values
            keep = torch.ones(pool.numel(), dtype=torch.bool)
            keep[perm[:holdout]] = False
            pool = pool[keep]
        else:
            self.holdout_indices = pool[:0]
        self.pool = pool
        self._source = source.subset(pool)
        params = trainable_parameters(model)
        first = next(iter(params.values()))
        self._num_params = sum(p.numel() for p in params.values())
        self.param_dtype, self.device = first.dtype, first.device
        #: Curvature products computed (one per column per step).
        self.num_products = 0
        #: Examples pushed through the model by this process, summed over products (cost accounting).
        self.example_products = 0

    @property
    def num_params(self) -> int:
        """Dimension ``P``."""
        return self._num_params

    @property
    def pool_size(self) -> int:
        """Number of examples the steps draw from."""
        return int(self.pool.numel())

    def with_batch_size(self, batch_size: int) -> SampledCurvature:
        """A copy drawing ``batch_size`` examples per step (same seed, pool and sharding).

        Returns:
            The copy.

        Raises:
            ConfigurationError: For ``batch_size < 1``.
        """
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}.")
        new = copy.copy(self)
        new.batch_size = int(batch_size)
        return new

    def with_seed(self, seed: int) -> SampledCurvature:
        """A copy whose steps draw from another seed.

        Returns:
            The copy.
        """
        new = copy.copy(self)
        new.seed = int(seed)
        return new

    def draw(self, step: int) -> Tensor:
        """The global data-set indices of step ``step`` (identical on every rank).

        Returns:
            ``batch_size`` data-set indices.
        """
        gen = make_generator(derive_seed(self.seed, "lissa-step", int(step)))
        n = self.pool.numel()
        if self.replacement:
            pos = torch.randint(0, n, (self.batch_size,), generator=gen)
        else:
            pos = torch.randperm(n, generator=gen)[: self.batch_size]
        return self.pool[pos]

    def _step_operator(self, step: int) -> CurvatureOperator:
        """The fixed-sample operator on this rank's slice of step ``step``'s draw (one batch, no damping)."""
        idx = self.draw(step)
        mine = shard_indices(idx, self.rank, self.world_size, "strided")
        # One batch per step: a step's products are one vectorised pass.
        batches = self._source.collate(mine, batch_size=mine.numel()) if mine.numel() else []
        return make_operator(self.curvature, self.model, self.task, batches, dtype=self.dtype,
                             seed=derive_seed(self.seed, "sampled-labels-step", int(step)))

    def __call__(self, step: int, matrix: Tensor) -> Tensor:
        r""":math:`\tilde H_{\text{step}} V`, averaged over the counted units of step ``step``'s batch.

        Returns:
            The ``(P, k)`` product, identical on every rank.

        Raises:
            ConfigurationError: If the batch has no counted unit.
        """
        op = self._step_operator(step)
        total, count = op.local_matmat(matrix)
        total, n = reduce_packed([total, count], self.reduce_fn)
        if float(n) <= 0:
            raise ConfigurationError(
                f"LiSSA step {step}: the sampled batch has no counted units (all targets ignored?)."
            )
        self.num_products += matrix.shape[1]
        self.example_products += matrix.shape[1] * op.source.local_size
        return total / n

    def operator(self, indices: Sequence[int] | Tensor | None = None, *, batch_size: int = 256) -> CurvatureOperator:
        r"""A fixed-sample operator over ``indices`` (default: the whole pool), sharded like the steps.

        Used for the on-the-spot spectrum (trace, :math:`\lambda_{\max}`) and the residual certificate.

        Returns:
            The operator (this rank's shard, reduced with the sampler's ``reduce_fn``).
        """
        idx = self.pool if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        return make_operator(self.curvature, self.model, self.task, self._source.subset(idx, batch_size=batch_size),
                             reduce_fn=self.reduce_fn, dtype=self.dtype, seed=self.seed)

    def probe_gradients(self, size: int = 64, *, seed: int | None = None) -> Tensor:
        """Per-example gradients ``(P, m)`` of a seeded sample of ``m = min(size, pool)`` pool examples.

        Every rank computes the same ones (no collective); LiSSA compares its chains' scores along them.

        Returns:
            The gradients as columns.
        """
        gen = make_generator(derive_seed(self.seed if seed is None else seed, "probes"))
        n = min(int(size), self.pool.numel())
        idx = self.pool[torch.randperm(self.pool.numel(), generator=gen)[:n]].sort().values
        ev = Evaluator(self.model, self.task, input_dtype=self.dtype)
        (batch,) = self._source.collate(idx, batch_size=max(1, n))
        grads, _ = ev.per_example(ev.prepare(batch))
        return grads.T

    def certificate_operator(self, size: int = 512, *, seed: int | None = None) -> CurvatureOperator:
        """Operator for the residual certificate.

        Returns:
            An operator on the held-out examples if ``holdout > 0``, else on an independent seeded draw of
            ``min(size, pool)`` pool examples without replacement (none of the steps' batches).
        """
        if self.holdout_indices.numel():
            return self.operator(self.holdout_indices)
        gen = make_generator(derive_seed(self.seed if seed is None else seed, "certificate"))
        n = min(int(size), self.pool.numel())
        return self.operator(self.pool[torch.randperm(self.pool.numel(), generator=gen)[:n]].sort().values)


def _per_example_gnh_sums(model: nn.Module, task: Task, batch: Any, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-column sums over the batch's examples of ``H_n v`` and ``||H_n v||^2`` (``H_n``: one example's GNH).

    Returns:
        ``(sum_n H_n V (P, m), sum_n ||H_n v_j||^2 (m,), unit count)``.
    """
    params = trainable_parameters(model)
    names = list(params)
    inputs, targets = task.split(batch)

    def one(p: ParamTree, x: Any, y: Tensor, v: ParamTree) -> Tensor:
        x1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)
        y1 = y.unsqueeze(0)

        def f(pp: ParamTree) -> Tensor:
            out, _ = task.targets(task.outputs(task.forward(model, pp, x1)), y1)
            return out

        _, yy = task.targets(torch.empty(0), y1)
        out, jv = jvp(f, (p,), (v,))  # type: ignore[misc]
        c = task.loss.output_hvp(out, yy, jv)
        _, pull = vjp(f, p)  # type: ignore[misc]
        (g,) = pull(c)
        return torch.cat([g[k].reshape(-1) for k in names])

    with torch.no_grad():
        out, y = task.targets(task.outputs(task.forward(model, params, inputs)), targets)
        count = task.loss.unit_mask(out, y).sum().to(V.dtype)
    s1 = torch.zeros_like(V)
    s2 = torch.zeros(V.shape[1], dtype=V.dtype, device=V.device)
    for j in range(V.shape[1]):
        vtree = unflatten(V[:, j], params)
        hn = vmap(one, in_dims=(None, 0, 0, None))(params, inputs, targets, vtree).detach()  # (B, P)
        s1[:, j] = hn.sum(0)
        s2[j] = hn.pow(2).sum()
    return s1, s2, count


def measure_batch_constant(
    sampler: SampledCurvature,
    trace: float,
    *,
    directions: int | Tensor = 4,
    sample_size: int = 512,
    power_iter: int = 15,
    seed: int = 0,
) -> dict[str, Any]:
    r"""Condition C.1's constant :math:`C` measured along the top curvature directions (paper 1, §3 and App. C).

    LiSSA's batch rule :math:`|B| \ge C\,\mathrm{Tr}(H)/\lambda_{\max}` rests on
    :math:`\mathbb{E}\tilde H_t^2 - H^2 \preceq \frac{C}{|B|}\mathrm{Tr}(H) H`. For a batch of one example
    the excess second moment along a unit direction :math:`v` is
    :math:`\overline{\|H_n v\|^2} - \|H v\|^2`, so

    .. math:: C(v) = \frac{\overline{\|H_n v\|^2} - \|H v\|^2}{\mathrm{Tr}(H)\, v^\top H v},

    with :math:`H_n` the GNH of example :math:`n`. Lemma 3's divergence happens along the top eigenvectors, so
    :math:`C` is the maximum of :math:`C(v)` over the top ``directions`` (found by subspace iteration on a fixed
    sample of ``sample_size`` pool examples). The paper assumes :math:`C = 2`; its App. C finds 4 for GPT-2.
    Costs ``power_iter + 1`` block products (subspace iteration, then a Rayleigh-Ritz rotation) plus one
    per-example product per direction and example.

    Args:
        sampler: The LiSSA sampler (pool, sharding and reduction are reused).
        trace: :math:`\mathrm{Tr}(H)` of the unit-averaged GNH.
        directions: Number of top directions, or the directions themselves as a ``(P, m)`` tensor.
        sample_size: Examples in the fixed sample.
        power_iter: Subspace iterations.
        seed: Seed of the sample and start block.

    Returns:
        ``{"constant": max C(v), "per_direction": [...], "rayleigh": [v^T H v ...], "sample_size": n,
        "example_products": examples pushed through the model (all ranks)}``.

    Raises:
        ConfigurationError: For a non-positive trace or an empty sample.
    """
    if not trace > 0:
        raise ConfigurationError(f"measure_batch_constant needs a positive trace, got {trace}.")
    gen = make_generator(derive_seed(seed, "batch-constant"))
    n = min(int(sample_size), sampler.pool_size)
    idx = sampler.pool[torch.randperm(sampler.pool_size, generator=gen)[:n]].sort().values
    op = sampler.operator(idx, batch_size=64)
    if isinstance(directions, Tensor):
        V = directions.to(device=sampler.device, dtype=sampler.param_dtype)
        V = V / V.norm(dim=0, keepdim=True)
    else:
        V = torch.randn(sampler.num_params, int(directions), generator=gen, dtype=sampler.param_dtype).to(
            sampler.device)
        V, _ = torch.linalg.qr(V)
        for _ in range(power_iter):
            V, _ = torch.linalg.qr(op.matmat(V))
        # Rayleigh-Ritz: rotate the subspace onto its Ritz vectors (the top one is the best estimate it holds).
        _, ritz = torch.linalg.eigh(V.T @ op.matmat(V))
        V = V @ ritz.flip(1)
    m = V.shape[1]
    s1 = torch.zeros_like(V)
    s2 = torch.zeros(m, dtype=V.dtype, device=V.device)
    count = torch.zeros((), dtype=V.dtype, device=V.device)
    with curvature_mode(sampler.model):
        for batch in op.data:
            a, b2, c = _per_example_gnh_sums(sampler.model, sampler.task, batch, V)
            s1, s2, count = s1 + a, s2 + b2, count + c
    s1, s2, units_t = reduce_packed([s1, s2, count], sampler.reduce_fn)
    units = float(units_t)
    if units <= 0:
        raise ConfigurationError("measure_batch_constant: the sample has no counted units.")
    hv = s1 / units
    second = s2 / units
    rayleigh = (V * hv).sum(0)
    per_dir = (second - hv.pow(2).sum(0)) / (trace * rayleigh.clamp_min(1e-300))
    iters = 0 if isinstance(directions, Tensor) else power_iter + 1
    return {"constant": float(per_dir.max()), "per_direction": per_dir.tolist(), "rayleigh": rayleigh.tolist(),
            "sample_size": n, "example_products": (iters + 1) * m * n}
