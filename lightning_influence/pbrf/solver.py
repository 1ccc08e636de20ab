"""The proximal Bregman response solver (:class:`PBRF`) and its one-shot form (:func:`pbrf_response`)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_influence.config import PBRFConfig
from lightning_influence.data import DataSource, prepare_batch
from lightning_influence.distributed import ReduceFn, reduce_packed
from lightning_influence.evaluator import Evaluator, curvature_mode
from lightning_influence.exceptions import ConfigurationError, DivergenceError, NonFiniteError
from lightning_influence.operators import GNHOperator, HessianOperator, SumOperator
from lightning_influence.operators.base import DENSE_MAX_PARAMS, FunctionOperator, OperatorBase
from lightning_influence.params import ParamTree, flatten, trainable_parameters
from lightning_influence.pbrf.objective import Measurement, copy_model, query_loss_measurement, stable_bregman
from lightning_influence.pbrf.results import PBRFResult, SolveRecord
from lightning_influence.solvers import conjugate_gradient
from lightning_influence.solvers.dense import positive_definite_factor
from lightning_influence.solvers.pcg import nystrom_preconditioner
from lightning_influence.solvers.sketch import compute_sketch
from lightning_influence.tasks import Task

__all__ = ["PBRF", "pbrf_response"]

#: Most outputs of one training example for which the dense preconditioner takes its term in (Woodbury).
WOODBURY_MAX_OUTPUTS = 256
#: A chord step (the dense factor at theta_hat as the Newton matrix) is kept while it cuts the gradient norm at
#: least this much; the first one that does not hands over to Newton-CG steps.
CHORD_MIN_DECREASE = 0.5
#: Most Gauss-Newton steps of a solve once its objective is found not convex (the exact Newton matrix indefinite):
#: descent steps that converge linearly at best, so their cost is capped; the solve is then reported unconverged.
#: A step whose Armijo-accepted point has a larger gradient norm ends them sooner (descent away from any stationary
#: point: on the GPT-2 example 25 such steps had taken the relative gradient norm to 95).
NONCONVEX_MAX_STEPS = 25
#: Most inner CG iterations of such a step over the data (each a data product).
NONCONVEX_DATA_CG_ITER = 50
#: A Newton step over the data (convex case) that leaves the gradient norm above this fraction of the previous one
#: is a stall; :data:`STALL_STEPS` stalls in a row end the solve (unconverged, counted in ``PBRF.stalled``). Newton
#: steps on a smooth objective contract far faster; on a ReLU/max-pool network the gradient jumps across activation
#: kinks, and the MNIST CNN's example 297 had taken 11 more steps and 100 more evaluations to gain a factor 3.
STALL_DECREASE = 0.5
STALL_STEPS = 2

OptimizerName = Literal["lbfgs", "newton_cg"]


class PBRF:
    r"""Minimise the proximal Bregman objective around a trained model and difference a measurement.

    The reference outputs :math:`h(x_n;\hat\theta)` are computed once at construction; one object then serves
    any number of training examples (:meth:`response`, :meth:`responses`), each costing two PBO solves.

    Args:
        model: The trained module (never modified: a ``dtype`` copy is made). Pass the unwrapped module.
        task: Turns batches into ``(outputs, targets)``; its loss family supplies the Bregman divergence.
        data: This rank's shard of the training sample, as collated batches
            (:func:`~lightning_influence.operators.make_batches`). Empty on a rank with no shard is fine.
        damping: :math:`\lambda > 0` of the proximity term; use the damping of the influence estimate being
            validated (or set it in ``config``).
        config: :class:`~lightning_influence.config.PBRFConfig`: ``epsilon`` (default :math:`1/N` with :math:`N`
            the global number of units), ``dtype`` of the copy (default float64), ``optimizer``
            (``"newton_cg"``/``"lbfgs"``), ``tol`` (relative gradient norm of each solve), ``max_iter``,
            ``history_size`` (L-BFGS memory), ``cg_rtol`` (inner CG of ``newton_cg``), ``normalization``
            (``"sum"``/``"mean"``: how the example term and the default query-loss measurement treat an example's
            units; match the influence scores being validated) and ``warn`` (a ``RuntimeWarning`` with the
            residual when a solve does not converge).
        reduce_fn: Sums a flat tensor over ranks (``None`` on one process).
        **overrides: Single fields of ``config`` (``epsilon=1e-3``, ``optimizer="lbfgs"``, ``dtype=torch.float64``).

    Raises:
        ConfigurationError: For :math:`\epsilon \le 0`, :math:`\lambda \le 0`, an unknown optimiser or
            normalization, non-positive ``tol``/``max_iter``, or a model without trainable parameters.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> _ = torch.nn.init.zeros_(model.weight)  # theta_hat = 0
        >>> x = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
        >>> pbrf = PBRF(model, Regression(), [(x, y)], damping=0.5, epsilon=1e-4)
        >>> pbrf.num_units, pbrf.num_params
        (2.0, 2)
        >>> res = pbrf.response((x[:1], y[:1]), queries=[(x, y)])
        >>> # closed form: -grad_q^T (G + lambda I)^{-1} grad_z with G = X^T X / N, grad = (h - y) x at theta_hat
        >>> grads = -y * x
        >>> closed = -(grads @ torch.linalg.solve(x.T @ x / 2 + 0.5 * torch.eye(2, dtype=torch.float64), grads[0]))
        >>> res.converged, torch.allclose(res.response, closed, atol=1e-6), [round(v, 4) for v in closed.tolist()]
        (True, True, [-1.0909, 0.3636])
        >>> matrix, _ = pbrf.responses([(x[:1], y[:1]), (x[1:], y[1:])], queries=[(x, y)])
        >>> tuple(matrix.shape)
        (2, 2)
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        data: DataSource | Sequence[Any],
        *,
        damping: float | None = None,
        config: PBRFConfig | None = None,
        reduce_fn: ReduceFn | None = None,
        **overrides: Any,
    ) -> None:
        if isinstance(overrides.get("dtype"), torch.dtype):
            overrides["dtype"] = str(overrides["dtype"]).replace("torch.", "")
        if damping is not None:
            overrides["damping"] = damping
        cfg = PBRFConfig.resolve(config, **overrides)
        if cfg.damping is None:
            raise ConfigurationError(
                "damping must be > 0 for the PBRF (the proximity term makes the objective strongly convex), got "
                "None; use the damping of the influence scores you validate."
            )
        self.config = cfg
        self.task = task
        self.damping = float(cfg.damping)
        self.reduce_fn = reduce_fn
        self.dtype = cfg.torch_dtype()
        self.optimizer: OptimizerName = cfg.optimizer
        self.tol, self.max_iter, self.history_size = float(cfg.tol), int(cfg.max_iter), int(cfg.history_size)
        self.cg_rtol, self.normalization, self.warn = float(cfg.cg_rtol), cfg.normalization, cfg.warn
        names = list(trainable_parameters(model))  # raises for a model with no trainable parameter
        self.model = copy_model(model, self.dtype)
        own = dict(self.model.named_parameters())
        self._names = names
        self._leaves: ParamTree = {k: own[k] for k in names}
        self.evaluator = Evaluator(self.model, task, params={k: p.detach() for k, p in self._leaves.items()})
        self.device = self.evaluator.device
        self.theta_hat = flatten(self.evaluator.params).clone()
        self.data = DataSource.coerce(data).prepared(self.device, self.dtype)
        with torch.no_grad(), curvature_mode(self.model):
            self._ref = [self._outputs(b, None)[0].detach() for b in self.data]
        self.num_units = self._global_units()
        if self.num_units <= 0:
            raise ConfigurationError("the PBRF training sample has no counted units (empty data on every rank).")
        self.epsilon = float(cfg.epsilon) if cfg.epsilon is not None else 1.0 / self.num_units
        #: Objective/gradient evaluations so far (each is one data pass and one reduction).
        self.evaluations = 0
        #: ``newton_cg`` solves whose objective was found not convex (its Newton matrix indefinite).
        self.nonconvex = 0
        #: ``newton_cg`` solves ended by :data:`STALL_STEPS` Newton steps that barely cut the gradient (non-smooth).
        self.stalled = 0
        self._precond: Callable[[Tensor], Tensor] | None = None
        self._factor: Tensor | None = None  # the dense preconditioner's Cholesky factor, once built
        #: What the inner-CG preconditioner is and cost (``{}`` until the first ``newton_cg`` step builds it).
        self.preconditioner_info: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def num_params(self) -> int:
        """Number of trainable parameters :math:`P`."""
        return int(self.theta_hat.numel())

    def _tree(self, theta: Tensor) -> ParamTree:
        return self.evaluator.tree(theta)

    def _outputs(self, batch: Any, params: ParamTree | None) -> tuple[Tensor, Tensor]:
        return self.evaluator.outputs(batch, params)

    def _global_units(self) -> float:
        count = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad(), curvature_mode(self.model):
            for b, ref in zip(self.data, self._ref, strict=True):
                _, y = self._outputs(b, None)
                count = count + self.evaluator.unit_count(ref, y)
        (total,) = reduce_packed([count], self.reduce_fn)
        return float(total)

    def _load(self, theta: Tensor) -> None:
        with torch.no_grad():
            for k, t in self._tree(theta).items():
                self._leaves[k].copy_(t)

    def _example_loss(self, example: Any, params: ParamTree) -> Tensor:
        outputs, targets = self._outputs(example, params)
        total, count = self.task.loss.sum_and_count(outputs, targets)
        return total if self.normalization == "sum" else total / count.clamp_min(1.0)

    def objective(self, theta: Tensor, example: Any, signed_epsilon: float) -> tuple[Tensor, Tensor]:
        r"""Value and gradient of :math:`F` at flat parameters ``theta`` (one reduction over ranks).

        Args:
            theta: Flat parameters of length ``P``.
            example: The collated training example(s) :math:`z_m` (already on the device, in ``dtype``).
            signed_epsilon: :math:`\pm\epsilon`.

        Returns:
            ``(value, gradient)`` as detached tensors.

        Raises:
            NonFiniteError: If the value or gradient is not finite.
        """
        theta = theta.detach().requires_grad_(True)
        with curvature_mode(self.model):
            params = self._tree(theta)
            local = torch.zeros((), dtype=self.dtype, device=self.device)
            count = torch.zeros((), dtype=self.dtype, device=self.device)
            for b, ref in zip(self.data, self._ref, strict=True):
                out, y = self._outputs(b, params)
                local = local + stable_bregman(self.task.loss, out, ref, y).sum()
                count = count + self.task.loss.unit_mask(out, y).sum().to(self.dtype)
            grad_local = (
                torch.autograd.grad(local, theta)[0] if local.requires_grad else torch.zeros_like(theta)
            )
            grad_sum, div_sum, units = reduce_packed([grad_local.detach(), local.detach(), count], self.reduce_fn)
            n = units.clamp_min(1.0)
            ex = self._example_loss(example, params) - self._example_loss(example, self._tree(self.theta_hat)).detach()
            diff = theta - self.theta_hat
            extra = signed_epsilon * ex + 0.5 * self.damping * (diff * diff).sum()
            grad_extra = torch.autograd.grad(extra, theta)[0]
        self.evaluations += 1
        value = div_sum / n + extra.detach()
        grad = grad_sum / n + grad_extra.detach()
        if not (bool(torch.isfinite(value)) and bool(torch.isfinite(grad).all())):
            raise NonFiniteError(
                f"the proximal Bregman objective is not finite (epsilon={abs(signed_epsilon)}, damping="
                f"{self.damping}); the step left the region where the model is finite. Reduce epsilon."
            )
        return value, grad

    def objective_at_theta_hat(self, example: Any, signed_epsilon: float) -> tuple[Tensor, Tensor]:
        r"""The objective's value and gradient at :math:`\hat\theta`, from the example alone (no data pass).

        There the Bregman term and its gradient vanish (the divergence of the outputs from themselves) as do the
        proximity and the example's loss difference, so :math:`F = 0` and :math:`\nabla F = \pm\epsilon\,
        \nabla\ell_m(\hat\theta)`. Equal to :meth:`objective` at ``theta_hat`` (a test checks it) without its data
        pass or reduction; every rank holds the example, so every rank gets the same answer.

        Returns:
            ``(value, gradient)`` as detached tensors.

        Raises:
            NonFiniteError: If the example's loss gradient is not finite.
        """
        theta = self.theta_hat.detach().requires_grad_(True)
        with curvature_mode(self.model):
            grad = torch.autograd.grad(signed_epsilon * self._example_loss(example, self._tree(theta)), theta)[0]
        if not bool(torch.isfinite(grad).all()):
            raise NonFiniteError("the training example's loss gradient at the trained weights is not finite.")
        return torch.zeros((), dtype=self.dtype, device=self.device), grad.detach()

    # ------------------------------------------------------------------------------------------ solves
    def _lbfgs(self, example: Any, signed_eps: float, g0norm: float) -> tuple[Tensor, int, int, int]:
        theta = self.theta_hat.clone().requires_grad_(True)
        evals, iters = 0, 0
        last_gnorm = math.inf

        def closure() -> Tensor:
            nonlocal evals, last_gnorm
            value, grad = self.objective(theta, example, signed_eps)
            evals += 1
            last_gnorm = float(grad.norm())
            theta.grad = grad
            return value

        # L-BFGS stops early when its line search can no longer resolve the objective's decrease; a fresh
        # restart (new memory) from the current point usually makes further progress, so allow a few.
        for _ in range(4):
            remaining = self.max_iter - iters
            if remaining <= 0:
                break
            opt = torch.optim.LBFGS(
                [theta],
                lr=1.0,
                max_iter=remaining,
                max_eval=remaining * 2,
                tolerance_grad=self.tol * g0norm / math.sqrt(self.num_params) * 0.5,
                tolerance_change=1e-300,
                history_size=self.history_size,
                line_search_fn="strong_wolfe",
            )
            opt.step(closure)
            done = int(opt.state[theta].get("n_iter", 0))
            iters += done
            if last_gnorm <= self.tol * g0norm or done == 0:
                break
        return theta.detach().clone(), iters, evals, 0

    def _preconditioner(self) -> Callable[[Tensor], Tensor] | None:
        r"""The inner-CG preconditioner, built once at :math:`\hat\theta` on the data (``config.preconditioner``).

        The data part :math:`G(\theta) + \lambda I` of every Newton matrix of every solve stays within
        :math:`O(\epsilon)` of :math:`G(\hat\theta) + \lambda I` (the PBO's minimiser moves by :math:`O(\epsilon)`),
        so one factor of the latter serves them all: measured on the MNIST CNN and the HF GPT-2 example in
        ``docs/performance.md``. ``"dense"`` costs one Jacobian per example and output (:meth:`GNHOperator.dense`, in
        float32) plus a Cholesky factor; ``"sketch"`` ``iterations * (sketch_rank + 10)`` products; both counted in
        :attr:`preconditioner_info` (``products``, in data products as a ``SolveRecord`` counts them).

        Returns:
            :math:`R \mapsto M^{-1} R` on ``(P, k)`` blocks, or ``None`` (``preconditioner="none"``).
        """
        kind = self.config.preconditioner
        if self._precond is not None or kind == "none":
            return self._precond
        if kind == "auto":
            kind = "dense" if self.num_params <= DENSE_MAX_PARAMS else "sketch"
        start = time.perf_counter()
        op = GNHOperator(self.model, self.task, self.data, reduce_fn=self.reduce_fn,
                         params=self._tree(self.theta_hat))
        info: dict[str, Any] = {}
        if kind == "dense":
            # The GNH is assembled in float32 (half the Jacobian and GEMM time of float64) and factored in the solve's
            # dtype: a preconditioner and a frozen Newton matrix, whose rounding the outer steps' exact gradient
            # corrects; the float64 GNH is the fallback should the factorisation fail.
            low = torch.float32 if self.dtype == torch.float64 else self.dtype
            L, dt = None, low
            for dt in dict.fromkeys([low, self.dtype]):
                build = op if dt == self.dtype else GNHOperator(copy_model(self.model, dt), self.task, self.data,
                                                                reduce_fn=self.reduce_fn, dtype=dt)
                A = build.dense().to(self.dtype)
                A.diagonal().add_(self.damping)
                L = positive_definite_factor(A)
                del A, build
                if L is not None:
                    break
            if L is not None:
                factor = self._factor = L
                self._precond = lambda R: torch.cholesky_solve(R.to(factor.dtype), factor)
                info = {"kind": "dense", "built_in": str(dt).replace("torch.", ""),
                        "products": self._ref[0][0].numel() if self._ref and len(self._ref[0]) else 1}
            else:  # rounding made it fail (low precision): the sketch needs no factorisation
                kind, info = "sketch", {"dense_failed": True}
        if kind == "sketch":
            sketch = compute_sketch(op, rank=min(self.config.sketch_rank, self.num_params), trace_probes=0)
            self._precond = nystrom_preconditioner(sketch, self.damping)
            info = {**info, "kind": "sketch", "rank": sketch.rank, "products": sketch.num_products}
        self.preconditioner_info = {**info, "seconds": time.perf_counter() - start}
        return self._precond

    def _example_weight(self, example: Any, signed_eps: float) -> float:
        r"""The weight of the example's mean-loss curvature in the objective's Hessian.

        The objective's example term is :math:`\pm\epsilon` times the example's summed loss (``normalization="sum"``)
        or its mean over units (``"mean"``); the curvature operators average over the example's units, so the
        weight is :math:`\pm\epsilon\,T_m` (``T_m`` counted units) or :math:`\pm\epsilon`.

        Returns:
            The weight.
        """
        if self.normalization != "sum":
            return signed_eps
        with torch.no_grad(), curvature_mode(self.model):
            out, y = self._outputs(example, None)
            units = float(self.task.loss.unit_mask(out, y).sum())
        return signed_eps * units

    def _with_example(self, base: Callable[[Tensor], Tensor], example: Any, weight: float
                      ) -> Callable[[Tensor], Tensor]:
        r"""The dense preconditioner updated by the example's Gauss-Newton term, :math:`(A + w G_m)^{-1}` (Woodbury).

        :math:`G_m = Q C Q^\top` lives in the span of the example's output Jacobian (:math:`D` columns, orthonormal
        ``Q``, ``C`` from :math:`D` one-example products), so with :math:`A^{-1}` the data factor
        :math:`(A + QC'Q^\top)^{-1} = A^{-1} - A^{-1}Q\,C'(I + Q^\top A^{-1} Q C')^{-1}Q^\top A^{-1}`,
        :math:`C' = w C` (singular ``C`` is fine). ``base`` is returned as is for an example with more than
        :data:`WOODBURY_MAX_OUTPUTS` outputs, or when the update would not keep the preconditioner positive definite
        (a downweighted example whose term is larger than the damped data curvature in its span).

        Returns:
            The updated preconditioner.
        """
        at = self._tree(self.theta_hat)
        ex_op = GNHOperator(self.model, self.task, [example], params=at)
        _, _, J = ex_op.evaluator.output_jacobian(example)
        W = J.reshape(-1, self.num_params).T.to(self.theta_hat)
        if W.shape[1] == 0 or W.shape[1] > WOODBURY_MAX_OUTPUTS:
            return base
        Q, _ = torch.linalg.qr(W)
        C = Q.T @ ex_op.matmat(Q)
        Cp = weight * 0.5 * (C + C.T)
        AQ = base(Q)
        S = 0.5 * (Q.T @ AQ + AQ.T @ Q)  # Q^T A^-1 Q, positive definite
        R, info = torch.linalg.cholesky_ex(S)
        # A + Q C' Q^T is positive definite iff I + R^T C' R is (R R^T = S)
        if int(info) != 0 or float(torch.linalg.eigvalsh(R.T @ Cp @ R).min()) <= -0.5:
            return base
        core = torch.eye(Q.shape[1], dtype=Q.dtype, device=Q.device) + Cp @ (Q.T @ AQ)
        inner = torch.linalg.solve(core, Cp)  # (I + C' Q^T A^-1 Q)^-1 C' = C' (I + Q^T A^-1 Q C')^-1

        def apply(R: Tensor) -> Tensor:
            X = base(R)
            return X - AQ @ (inner @ (AQ.T @ R.to(AQ.dtype)))

        return apply

    def _newton_cg(self, example: Any, signed_eps: float, value0: Tensor, grad0: Tensor
                   ) -> tuple[Tensor, int, int, int, int, Tensor]:
        r"""Newton steps from theta_hat (``value0``, ``grad0``: the objective and its gradient there).

        The Newton matrix is the objective's Hessian but for the data term's residual curvature (zero at
        :math:`\hat\theta`): the damped data GNH plus the example's *exact* loss Hessian, weighted as the objective
        weighs the example (:meth:`_example_weight`); an example that is badly fit has most of its curvature outside
        its Gauss-Newton part. When that matrix is not positive definite (the PBO is not convex there: a large
        weight, a small damping) the example's Gauss-Newton term replaces its Hessian: descent steps, at most
        :data:`NONCONVEX_MAX_STEPS`, each CG over the data capped at :data:`NONCONVEX_DATA_CG_ITER` products,
        ended by the first step that would raise the gradient norm (so the returned point is never worse than
        :math:`\hat\theta` by that measure); counted in :attr:`nonconvex`, named by the warning of an
        unconverged solve. Newton steps over the data that stop contracting (:data:`STALL_STEPS` in a row above
        :data:`STALL_DECREASE`) end the solve too, counted in :attr:`stalled`.
        Steps are accepted by an Armijo decrease of the objective
        (halving up to 20 times). With the dense factor the data GNH is first frozen at :math:`\hat\theta` (steps
        that cost one-example products and one gradient, no data product) while each halves the gradient norm;
        then Newton-CG over the data. Each inner CG stops at the residual the step needs (an inexact-Newton forcing
        term, :math:`\max(\text{cg\_rtol}, \text{tol}\,\|g_0\|/(2\|g_k\|))`).

        Returns:
            ``(theta, iterations, evaluations, data products, example products, gradient at theta)``.
        """
        precond = self._preconditioner()
        factor = self._factor
        weight = self._example_weight(example, signed_eps)
        if factor is not None and precond is not None:
            precond = self._with_example(precond, example, weight)
        frozen, gn_steps = factor is not None, 0
        frozen_data = None if factor is None else FunctionOperator(
            lambda v: factor @ (factor.T @ v.to(factor.dtype)), self.num_params, self.dtype, self.device)
        theta, value, grad = self.theta_hat.clone(), value0, grad0
        g0norm = gnorm = float(grad.norm())
        evals, products, ex_products, it, stalls = 0, 0, 0, 0, 0
        while it < self.max_iter and gnorm > self.tol * g0norm:
            rtol = max(self.cg_rtol, 0.5 * self.tol * g0norm / gnorm)
            newton = not frozen and gn_steps == 0  # a Newton step over the data: it must contract (STALL_DECREASE)
            at = self._tree(theta)
            data: OperatorBase
            if frozen:
                assert frozen_data is not None
                data, damping = frozen_data, 0.0  # the damping is in the factor
            else:
                data = GNHOperator(self.model, self.task, self.data, reduce_fn=self.reduce_fn, params=at)
                damping = self.damping
            sol = None
            if gn_steps == 0:
                try:
                    sol = conjugate_gradient(SumOperator([data, HessianOperator(self.model, self.task, [example],
                                                                                params=at)], [1.0, weight]),
                                             -grad, damping=damping, rtol=rtol, warn=False, preconditioner=precond)
                except ConfigurationError:  # not convex here: Gauss-Newton terms (descent steps) from now on
                    self.nonconvex += 1
            if sol is None:
                if gn_steps >= NONCONVEX_MAX_STEPS:
                    break
                gn_steps += 1
                cap = None if frozen else NONCONVEX_DATA_CG_ITER  # over the data: a bounded CG
                ex_gnh = GNHOperator(self.model, self.task, [example], params=at)
                try:
                    sol = conjugate_gradient(SumOperator([data, ex_gnh], [1.0, weight]), -grad, damping=damping,
                                             rtol=rtol, warn=False, preconditioner=precond, max_iter=cap)
                except ConfigurationError:  # a downweighted example's term alone made it indefinite
                    sol = conjugate_gradient(data, -grad, damping=damping, rtol=rtol, warn=False,
                                             preconditioner=precond, max_iter=cap)
            ex_products += sol.num_products
            products += 0 if frozen else sol.num_products
            step, accepted = sol.x, False
            for _ in range(20):
                candidate = theta + step
                v_new, g_new = self.objective(candidate, example, signed_eps)
                evals += 1
                if float(v_new) <= float(value) + 1e-4 * float(grad @ step):  # Armijo: a sufficient decrease
                    new_norm = float(g_new.norm())
                    if gn_steps and new_norm > gnorm:  # descent away from a stationary point: none near, stop
                        break
                    frozen = frozen and new_norm <= CHORD_MIN_DECREASE * gnorm
                    if newton:
                        stalls = stalls + 1 if new_norm > STALL_DECREASE * gnorm else 0
                    theta, value, grad, gnorm, accepted = candidate, v_new, g_new, new_norm, True
                    break
                if frozen:  # the frozen data curvature is too far off here: Newton-CG over the data from here
                    break
                step = 0.5 * step
            it += 1
            if stalls >= STALL_STEPS:
                self.stalled += 1
                break
            if not accepted:
                if not frozen:
                    break
                frozen = False
        return theta, it, evals, products, ex_products, grad

    def solve(self, example: Any, sign: int, epsilon: float | None = None) -> tuple[Tensor, SolveRecord]:
        r"""Minimise :math:`F_{\pm\epsilon}` from :math:`\hat\theta`.

        Args:
            example: Collated batch holding :math:`z_m` (its mean loss over units is up/down-weighted).
            sign: ``+1`` (upweight) or ``-1`` (downweight).
            epsilon: Override of the object's :math:`\epsilon`.

        Returns:
            The flat minimiser and its :class:`SolveRecord`.

        Raises:
            ConfigurationError: For :math:`\epsilon \le 0` or a sign other than :math:`\pm 1`.
            NonFiniteError: If the objective becomes non-finite.
        """
        eps = self.epsilon if epsilon is None else float(epsilon)
        _check_epsilon(eps)
        if sign not in (1, -1):
            raise ConfigurationError(f"sign must be +1 or -1, got {sign}.")
        example = prepare_batch(example, self.device, self.dtype)
        f0, g0 = self.objective_at_theta_hat(example, sign * eps)
        g0norm = float(g0.norm())
        if g0norm == 0.0:
            rec = SolveRecord(sign, 0, 0, 0.0, 0.0, 0.0, True, 0.0)
            return self.theta_hat.clone(), rec
        if self.optimizer == "lbfgs":
            theta, iters, evals, products = self._lbfgs(example, sign * eps, g0norm)
            ex_products = 0
            _, g = self.objective(theta, example, sign * eps)
            evals += 1
        else:  # the gradient at the end is the method's own
            theta, iters, evals, products, ex_products, g = self._newton_cg(example, sign * eps, f0, g0)
        gnorm = float(g.norm())
        rel = gnorm / g0norm
        rec = SolveRecord(
            sign=sign,
            iterations=iters,
            evaluations=evals,
            initial_grad_norm=g0norm,
            grad_norm=gnorm,
            relative_grad_norm=rel,
            converged=rel <= self.tol,
            shift_norm=float((theta - self.theta_hat).norm()),
            products=products,
            example_products=ex_products,
        )
        return theta, rec

    def measure(self, theta: Tensor, measurement: Measurement) -> Tensor:
        """Evaluate ``measurement`` on the copy with flat parameters ``theta`` loaded (restored afterwards)."""
        self._load(theta)
        try:
            with torch.no_grad(), curvature_mode(self.model):
                value = measurement(self.model).detach().clone()
        finally:
            self._load(self.theta_hat)
        return value

    # -------------------------------------------------------------------------------------- responses
    def response(
        self,
        example: Any,
        *,
        queries: Sequence[Any] | Any | None = None,
        measurement: Measurement | None = None,
        epsilon: float | None = None,
    ) -> PBRFResult:
        r"""PBRF response of a measurement to upweighting ``example``: two PBO solves and a central difference.

        Args:
            example: Collated batch holding the training example :math:`z_m` (a one-example batch).
            queries: Query batches; the default measurement is their per-example losses (one solve pair serves
                every query).
            measurement: Any :data:`Measurement` instead of the query losses.
            epsilon: Override of the object's :math:`\epsilon`.

        Returns:
            The response and its certificate.

        Raises:
            ConfigurationError: For :math:`\epsilon \le 0` or neither/both of ``queries`` and ``measurement``.
            DivergenceError: If the measurement is not finite at a perturbed solution.
        """
        eps = self.epsilon if epsilon is None else float(epsilon)
        _check_epsilon(eps)
        if (queries is None) == (measurement is None):
            raise ConfigurationError("pass exactly one of queries (default query-loss measurement) or measurement.")
        meas = measurement if measurement is not None else query_loss_measurement(
            self.task, queries, self.normalization
        )
        start = time.perf_counter()
        theta_p, rec_p = self.solve(example, +1, eps)
        theta_m, rec_m = self.solve(example, -1, eps)
        base = self.measure(self.theta_hat, meas)
        plus, minus = self.measure(theta_p, meas), self.measure(theta_m, meas)
        response = (plus - minus) / (2.0 * eps)
        if not bool(torch.isfinite(response).all()):
            raise DivergenceError(
                f"the PBRF measurement is not finite at the perturbed parameters (epsilon={eps}); reduce epsilon."
            )
        converged = rec_p.converged and rec_m.converged
        result = PBRFResult(
            response=response,
            epsilon=eps,
            damping=self.damping,
            optimizer=self.optimizer,
            dtype=str(self.dtype).replace("torch.", ""),
            tol=self.tol,
            converged=converged,
            iterations=rec_p.iterations + rec_m.iterations,
            grad_norm=max(rec_p.grad_norm, rec_m.grad_norm),
            relative_grad_norm=max(rec_p.relative_grad_norm, rec_m.relative_grad_norm),
            measurement_base=base,
            measurement_plus=plus,
            measurement_minus=minus,
            solves=[rec_p, rec_m],
            seconds=time.perf_counter() - start,
        )
        if not converged and self.warn:
            why = "" if not self.nonconvex else (
                f" {self.nonconvex} solve(s) so far met an objective that is not convex (the example's loss "
                "Hessian, weighted by epsilon, outweighs the damped data curvature): raise damping or lower epsilon."
            )
            why += "" if not self.stalled else (
                f" {self.stalled} solve(s) so far stalled: Newton steps stopped cutting the gradient norm, as on a "
                "network whose gradient jumps across ReLU/max-pool kinks at this scale; that relative gradient is "
                "the objective's non-smooth floor, so a larger max_iter will not help (a larger epsilon moves further)."
            )
            warnings.warn(
                f"PBRF ({self.optimizer}) did not converge: relative gradient norm {result.relative_grad_norm:.3g} "
                f"(gradient norm {result.grad_norm:.3g}) > tol={self.tol} after {result.iterations} iterations "
                f"(epsilon={eps}, damping={self.damping}). Raise max_iter or damping, or switch the "
                "optimizer ('newton_cg' / 'lbfgs'); the response is reported but less trustworthy." + why,
                RuntimeWarning,
                stacklevel=2,
            )
        return result

    def responses(
        self,
        examples: Sequence[Any],
        *,
        queries: Sequence[Any] | Any | None = None,
        measurement: Measurement | None = None,
        epsilon: float | None = None,
    ) -> tuple[Tensor, list[PBRFResult]]:
        """:meth:`response` for several training examples.

        Returns:
            ``(matrix, results)``: the responses stacked to shape ``(M, *measurement_shape)`` (``(M, Q)`` for
            query losses) and the per-example results.

        Raises:
            ConfigurationError: If ``examples`` is empty (and as :meth:`response`).
        """
        results = [self.response(e, queries=queries, measurement=measurement, epsilon=epsilon) for e in examples]
        if not results:
            raise ConfigurationError("examples is empty: pass at least one training example batch.")
        return torch.stack([r.response for r in results]), results

    def to_dict(self) -> dict[str, Any]:
        """Configuration for reports."""
        return {
            "epsilon": self.epsilon,
            "damping": self.damping,
            "optimizer": self.optimizer,
            "dtype": str(self.dtype).replace("torch.", ""),
            "tol": self.tol,
            "max_iter": self.max_iter,
            "num_units": self.num_units,
            "normalization": self.normalization,
            "num_params": self.num_params,
            "preconditioner": dict(self.preconditioner_info) or self.config.preconditioner,
            "nonconvex_solves": self.nonconvex,
            "stalled_solves": self.stalled,
        }


def _check_epsilon(epsilon: float) -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ConfigurationError(
            f"epsilon must be a finite number > 0 (the up/down-weighting of the training example), got {epsilon}; "
            "the PBRF uses a central difference over +epsilon and -epsilon, so its sign is already covered. "
            "Typical values: 1/N (one example of N) or smaller."
        )


def pbrf_response(
    model: nn.Module,
    task: Task,
    data: DataSource | Sequence[Any],
    example: Any,
    *,
    damping: float,
    queries: Sequence[Any] | Any | None = None,
    measurement: Measurement | None = None,
    epsilon: float | None = None,
    reduce_fn: ReduceFn | None = None,
    **kwargs: Any,
) -> PBRFResult:
    """One-shot :class:`PBRF` response of one training example (see :class:`PBRF` for every argument).

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> model = torch.nn.Linear(1, 1, bias=False).double()
        >>> x = torch.ones(4, 1, dtype=torch.float64)
        >>> r = pbrf_response(model, Regression(), [(x, 0 * x)], (x[:1], 1 + x[:1]), damping=1.0,
        ...                   queries=[(x[:1], 0 * x[:1])], epsilon=1e-3)
        >>> bool(r.converged)
        True

    Returns:
        The response and its certificate.
    """
    pbrf = PBRF(model, task, data, damping=damping, epsilon=epsilon, reduce_fn=reduce_fn, **kwargs)
    return pbrf.response(example, queries=queries, measurement=measurement)
