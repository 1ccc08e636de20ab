r"""ApproximateCV: AFIF approximate k-fold cross-validation at the end of training (and optionally per epoch).

For a model trained on :math:`\frac1N\sum_i \ell_i(\theta) + \lambda\pi(\theta)` the callback splits the training
set into ``folds`` seeded folds and, for each fold :math:`k`, replaces the refit without the fold by one proximal
natural-gradient step (paper: *Approximate Fisher Influence Function*, eq. 9, adapted to leave-fold-out):

.. math::

    \tilde\theta_k
    = \operatorname{prox}^{F_{-k}}_{\lambda\pi}\big(\hat\theta - F_{-k}^{-1}\nabla f_{-k}(\hat\theta)\big),

with :math:`F_{-k}` the Fisher of the remaining data (downdated by the fold) and :math:`\nabla f_{-k}` their mean
loss gradient. The CV estimate is the mean over folds of the held-out loss of :math:`\tilde\theta_k`. The maths,
the fold-objective convention and the exact-refit baseline are in :mod:`lightning_influence.cv`.

**The regulariser must be the one used in training.** Put the same object on the module and add its penalty to the
loss; the callback checks that the module's regulariser (any attribute that is a
:class:`~lightning_influence.regularizers.Regularizer`) agrees with its own::

    class Lasso(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(10, 1)
            self.regularizer = L1(1e-2, mask=mask_from_module(self))   # biases unpenalised

        def training_step(self, batch, batch_idx):
            out, y = task(self, batch)
            return task.loss.mean(out, y) + regularization_penalty(self, self.regularizer)

    trainer = L.Trainer(callbacks=[ApproximateCV(task, folds=5)])   # regulariser taken from the module

Data parallelism: every rank builds the same folds; each fold's examples are split into unpadded per-rank
slices, every gradient and curvature product runs on the unwrapped module over the local slice and is completed by
one sum-reduction, so all ranks compute the same (global) refits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_influence.callbacks._common import (
    MisconfigurationError,
    RunContext,
    check_before_training,
    check_choice,
    check_damping,
    check_data_available,
    check_dataset,
    check_int,
    check_number,
    check_picklable_datasets,
    check_same_parameters,
    check_strategy,
    check_task,
    config_field,
    publish,
    resolve_config,
    unwrap_module,
)
from lightning_influence.callbacks._loss import check_loss_matches
from lightning_influence.config import CVConfig
from lightning_influence.cv import CVResult, approximate_cv, check_curvature_for_loss, exact_cv, kfold_indices
from lightning_influence.cv.afif import AUTO_DAMPING_CG_TRIAL, matrix_free_solver
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.metrics import CV_REL_ERROR
from lightning_influence.params import num_parameters, trainable_parameters
from lightning_influence.progress import cost_budget, stage_progress, warn_projected_cost
from lightning_influence.regularizers import NoRegularizer, Regularizer
from lightning_influence.tasks import Task

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

__all__ = ["ApproximateCV", "find_module_regularizer"]

_WHO = "ApproximateCV"


def _default_config() -> CVConfig:
    """The CV settings when no config is given: CG and prox tolerances looser than ``CVConfig()``'s.

    Returns:
        ``CVConfig(cg_rtol=1e-8, prox_tol=1e-10)``.
    """
    return CVConfig(cg_rtol=1e-8, prox_tol=1e-10)


def _rel_error(approx: CVResult, exact: CVResult) -> float:
    return abs(approx.estimate - exact.estimate) / max(abs(exact.estimate), 1e-300)


def find_module_regularizer(module: nn.Module) -> Regularizer | None:
    """The :class:`~lightning_influence.regularizers.Regularizer` the module declares, if any.

    Looks at the module's plain attributes (e.g. ``self.regularizer = L1(...)``).

    Args:
        module: The LightningModule.

    Returns:
        The regulariser, or ``None`` if the module has none.

    Raises:
        MisconfigurationError: If the module holds several different regularisers.

    Example::

        >>> import torch
        >>> from lightning_influence.regularizers import L1
        >>> m = torch.nn.Linear(2, 1)
        >>> m.regularizer = L1(0.1)
        >>> find_module_regularizer(m).strength
        0.1
    """
    found = {id(v): v for v in vars(module).values() if isinstance(v, Regularizer)}
    if len(found) > 1:
        names = sorted(k for k, v in vars(module).items() if isinstance(v, Regularizer))
        raise MisconfigurationError(
            f"{_WHO}: the module holds several regularisers ({', '.join(names)}); pass the one added to the "
            "training loss as ApproximateCV(regularizer=...) and keep only that one on the module."
        )
    return next(iter(found.values()), None)


def _same_regularizer(a: Regularizer, b: Regularizer) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) or a.to_dict() != b.to_dict():
        return False
    ma, mb = getattr(a, "mask", None), getattr(b, "mask", None)
    if (ma is None) != (mb is None):
        return False
    return ma is None or bool(torch.equal(torch.as_tensor(ma), torch.as_tensor(mb)))


class ApproximateCV(Callback):
    r"""Estimate k-fold cross-validation without refits (AFIF: downdated Fisher + proximal step).

    Runs at ``on_train_end`` and, if ``every_n_epochs`` is set, at the end of every ``n``-th training epoch (to
    draw the CV curve against epochs). Each run splits the training set into the same seeded folds, computes the
    approximate refits :math:`\tilde\theta_k` and their held-out losses with
    :func:`lightning_influence.cv.approximate_cv`, optionally checks them against exact refits
    (:func:`lightning_influence.cv.exact_cv`, small models only), logs the scalars and writes the ``"cv"`` section
    of ``<log_dir>/influence/report.json`` / ``report.html``. The trained weights are never modified.

    Args:
        task: Turns a batch into ``(outputs, targets)`` and names the loss family.
        folds: Number of folds ``K >= 2`` (default 5).
        regularizer: The penalty :math:`\lambda\pi` added to the training loss. ``None`` (default): use the
            module's own regulariser attribute, or no penalty if it has none (with a warning).
        seed: Seed of the fold split.
        every_n_epochs: Also run every ``n`` training epochs (``None``: only at the end of training).
        exact_check: Also compute exact k-fold CV by warm-started refits (FISTA; small models only) and log the
            relative error.
        curvature: ``"fisher"``, ``"gnh"`` or ``"hessian"`` (Hessian-based approximate CV).
        downdate: Use the fold-downdated curvature :math:`F_{-k}` or one full-data :math:`F` (paper).
        fold_objective: ``"mean"`` (refit the mean loss on the remaining data) or ``"weighted"`` (the paper's
            :math:`\frac1N\sum_i w_i\ell_i`); see :mod:`lightning_influence.cv`.
        solver: ``"auto"`` (dense up to ``dense_max_params`` parameters, else ``"pcg"``), ``"dense"``, ``"cg"`` or
            ``"pcg"`` (CG preconditioned by one full-data sketch shared by the folds).
        damping: :math:`\delta \ge 0` added to the curvature, or ``"auto"`` (the config's default): per fold, none
            when the curvature is positive definite, else the least damping that makes it so (over-parametrised
            networks, a feature constant on the remaining data); the value used is in each fold's certificate.
        dataset: ``"train"`` (default), ``"val"`` or a map-style dataset to cross-validate on.
        batch_size: Examples per batch for the curvature and gradient passes.
        cg_rtol: CG relative residual tolerance.
        prox_tol: Relative residual tolerance of the metric prox.
        dense_max_params: Largest model handled with dense matrices under ``solver="auto"``.
        exact_tol: Tolerance of the exact refits (gradient-mapping norm).
        exact_max_iter: Iteration cap of each exact refit.
        center: Subtract the step the full data would still take (see :func:`lightning_influence.cv.approximate_cv`);
            use it for per-epoch curves or when training stops before convergence. No effect at a minimiser.
        report: Write the report section (``<log_dir>/<subdir>``).
        subdir: Report directory under the log dir (default ``"influence"``).
        config: The estimator's settings (:class:`~lightning_influence.config.CVConfig`). Default:
            ``CVConfig(cg_rtol=1e-8, prox_tol=1e-10)`` (fisher, downdated, mean objective, auto solver,
            ``damping="auto"``, dense up to 2000 parameters, not centred). ``curvature`` ... ``center`` above default to
            ``None``, meaning the config's value; the ones given replace it. ``cb.config`` is the resolved config,
            written to the report.

    Raises:
        MisconfigurationError: For ``folds < 2``, a bad ``every_n_epochs``/``curvature``/``solver``/
            ``fold_objective``/``damping``/``batch_size``, a Fisher requested for a loss that is not an
            exponential-family NLL (use ``curvature="hessian"``), a regulariser that differs from the module's or
            does not fit its parameters, an unsupported strategy, or more folds than examples.

    Logged metrics (``step = trainer.global_step``; also mirrored into ``trainer.callback_metrics``):
        * ``cv/approx_loss``: approximate K-fold CV estimate (mean over folds of the held-out mean loss).
        * ``cv/approx_fold_<k>``: held-out loss of fold ``k`` under its approximate refit.
        * ``cv/approx_passes``: cost in gradient-equivalent passes over the training set.
        * ``cv/approx_seconds``: wall-clock seconds.
        * ``cv/exact_loss``, ``cv/exact_fold_<k>``, ``cv/exact_passes``, ``cv/exact_seconds``,
          ``cv/rel_error`` (:math:`|\text{approx} - \text{exact}| / \text{exact}`): only with ``exact_check=True``.

    Example::

        >>> from lightning_influence.tasks import Regression
        >>> from lightning_influence.regularizers import L1
        >>> cb = ApproximateCV(Regression(), folds=5, regularizer=L1(1e-3), every_n_epochs=1)
        >>> cb.folds, cb.config.cg_rtol, cb.solver
        (5, 1e-08, 'auto')
        >>> from lightning_influence.config import CVConfig
        >>> ApproximateCV(Regression(), config=CVConfig(solver="cg"), damping=1e-3).config.solver
        'cg'
    """

    curvature: Literal["fisher", "gnh", "hessian"] = config_field()
    downdate: bool = config_field()
    fold_objective: Literal["mean", "weighted"] = config_field()
    solver: Literal["auto", "dense", "cg", "pcg"] = config_field()
    damping: float | Literal["auto"] = config_field()
    cg_rtol: float = config_field()
    prox_tol: float = config_field()
    dense_max_params: int = config_field()
    center: bool = config_field()

    def __init__(
        self,
        task: Task,
        folds: int = 5,
        regularizer: Regularizer | None = None,
        seed: int = 0,
        every_n_epochs: int | None = None,
        exact_check: bool = False,
        curvature: Literal["fisher", "gnh", "hessian"] | None = None,
        downdate: bool | None = None,
        fold_objective: Literal["mean", "weighted"] | None = None,
        solver: Literal["auto", "dense", "cg", "pcg"] | None = None,
        damping: float | Literal["auto"] | None = None,
        dataset: Any = "train",
        batch_size: int = 256,
        cg_rtol: float | None = None,
        prox_tol: float | None = None,
        dense_max_params: int | None = None,
        exact_tol: float = 1e-8,
        exact_max_iter: int = 20_000,
        center: bool | None = None,
        report: bool = True,
        subdir: str = "influence",
        config: CVConfig | None = None,
    ) -> None:
        super().__init__()
        self.task = check_task(task, _WHO)
        self.folds = check_int(_WHO, "folds", folds, 2, rule="an integer >= 2", fix="K-fold CV needs two folds")
        self.every_n_epochs = check_int(_WHO, "every_n_epochs", every_n_epochs, allow_none=True)
        if regularizer is not None and not isinstance(regularizer, Regularizer):
            raise MisconfigurationError(
                f"{_WHO}: regularizer must be a lightning_influence.regularizers.Regularizer (L1, ElasticNet, "
                f"GroupLasso, NoRegularizer) or None, got {type(regularizer).__name__}."
            )
        if solver is not None:
            check_choice(_WHO, "solver", solver, ("auto", "dense", "cg", "pcg"))
        if fold_objective is not None:
            check_choice(_WHO, "fold_objective", fold_objective, ("mean", "weighted"))
        check_damping(_WHO, "damping", damping, strict=False)
        self.dataset = check_dataset(_WHO, "dataset", dataset)
        self.batch_size = check_int(_WHO, "batch_size", batch_size)
        self.exact_tol = check_number(_WHO, "exact_tol", exact_tol)
        self.exact_max_iter = check_int(_WHO, "exact_max_iter", exact_max_iter)
        #: The resolved estimator settings (:class:`~lightning_influence.config.CVConfig`).
        self.config = resolve_config(
            _WHO, CVConfig, config, _default_config(), curvature=curvature, downdate=downdate,
            fold_objective=fold_objective, solver=solver, damping=damping, cg_rtol=cg_rtol, prox_tol=prox_tol,
            dense_max_params=dense_max_params, center=center,
        )
        try:
            check_curvature_for_loss(self.task, self.config.curvature)
        except ConfigurationError as err:
            raise MisconfigurationError(f"{_WHO}: {err}") from err
        self.regularizer = regularizer
        self.seed = int(seed)
        self.exact_check = exact_check
        self.report = report
        self.subdir = subdir
        #: One row per run: epoch, step, approx (and exact) estimates.
        self.history: list[dict[str, Any]] = []
        self.last_result: CVResult | None = None
        self.last_exact: CVResult | None = None
        self._reg: Regularizer = regularizer if regularizer is not None else NoRegularizer()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (``ddp_spawn`` starts its workers): a dataset that cannot travel is a clear error here, first."""
        return check_picklable_datasets(_WHO, self.__dict__.copy(), ("dataset",))

    @property
    @override
    def state_key(self) -> str:
        dataset = self.dataset if isinstance(self.dataset, str) else type(self.dataset).__name__
        return self._generate_state_key(task=type(self.task).__name__, dataset=dataset, folds=self.folds,
                                        seed=self.seed, curvature=self.curvature)

    # ------------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, _WHO)
        check_data_available(trainer, self.dataset, _WHO)
        module = unwrap_module(pl_module)
        declared = find_module_regularizer(module)
        if self.regularizer is None:
            if declared is None:
                rank_zero_warn(
                    f"{_WHO}: no regularizer given and the module declares none, so the CV assumes an unpenalised "
                    "training loss. If training adds a penalty, set `self.regularizer = L1(...)` on the module (and "
                    "add `regularization_penalty(self, self.regularizer)` to the loss) or pass regularizer=...",
                    category=UserWarning,
                )
                self._reg = NoRegularizer()
            else:
                self._reg = declared
        else:
            if declared is not None and not _same_regularizer(declared, self.regularizer):
                raise MisconfigurationError(
                    f"{_WHO}: regularizer={self.regularizer.to_dict()} differs from the module's regulariser "
                    f"{declared.to_dict()}; the CV must use the penalty that training uses. Pass the module's own "
                    "object (ApproximateCV(regularizer=module.regularizer)) or leave regularizer=None."
                )
            self._reg = self.regularizer
        p = num_parameters(trainable_parameters(module))
        try:
            self._reg._check_size(p)
        except ValueError as err:
            raise MisconfigurationError(f"{_WHO}: {err}") from err

    # ------------------------------------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_loss_matches(trainer, pl_module, self.task, _WHO)
        check_before_training(trainer, pl_module, self, self.task, [self.dataset], _WHO)
        p = num_parameters(trainable_parameters(unwrap_module(pl_module)))
        passes = self._projected_passes(p)
        if passes is not None and trainer.is_global_zero:
            warn_projected_cost(
            f"{_WHO}: {self.folds} folds of {matrix_free_solver(self.config).upper()} on the "
            f"{self.config.curvature} curvature of {p} parameters "
            f"(up to {self._cg_iterations(p)} products per fold)",
            "pass a fixed positive damping (e.g. damping=1e-3 x lambda_max; fewer CG iterations), "
            "config=CVConfig(cg_max_iter=...), fewer folds, or solver='dense' on a model of a few thousand "
            "parameters.", passes=passes, budget=cost_budget(trainer),
            )

    def _cg_iterations(self, p: int) -> int:
        """Most curvature products of one fold's solve (CG under "auto": plus the undamped trial and Lanczos)."""
        cfg = self.config
        limit = cfg.cg_limit(p)
        if matrix_free_solver(self.config) == "pcg":
            return limit  # one lambda_max for all folds, from the shared sketch: no trial, no Lanczos
        return limit + (AUTO_DAMPING_CG_TRIAL + 20 if cfg.damping == "auto" else 0)

    def _projected_passes(self, p: int) -> float | None:
        """Projected gradient passes over the data of the approximate CV (``None`` on the dense path).

        Worst case: every fold's solve at its iteration cap over the remaining ``(k-1)/k`` of the data, plus (pcg)
        the one full-data sketch of ``config.sketch_config(P).num_products`` products.

        Returns:
            The passes, Fisher products weighted 4/3 as in the CV's own count.
        """
        cfg = self.config
        if cfg.solver == "dense" or (cfg.solver == "auto" and p <= cfg.dense_max_params):
            return None
        weight = 4.0 / 3.0 if cfg.curvature == "fisher" else 1.0  # the CV's own count weighs a Fisher product 4/3
        pcg = matrix_free_solver(self.config) == "pcg"
        sketch = cfg.sketch_config(p).num_products if pcg else 0
        return (self.folds * self._cg_iterations(p) * (self.folds - 1) / self.folds + sketch) * weight

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is None or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self._run(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last = self.history[-1] if self.history else None
        if last is not None and last.get("step") == trainer.global_step:
            return  # the last epoch-end run already measured these weights
        self._run(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "seed": self.seed, "folds": self.folds}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]

    # ------------------------------------------------------------------------------------------------ work
    def _fold_batches(self, ctx: RunContext) -> tuple[list[list[Any]], int]:
        """This rank's collated slice of every fold (the same seeded folds on every rank) and the dataset size."""
        data = ctx.resolve(self.dataset)
        n = len(data.dataset)
        if self.folds > n:
            raise MisconfigurationError(
                f"{_WHO}: folds={self.folds} is larger than the number of examples ({n}) in the {data.source} data; "
                f"use at most {n} folds."
            )
        fold_idx = kfold_indices(n, self.folds, seed=self.seed)
        return [ctx.source(data, f, batch_size=self.batch_size).batches() for f in fold_idx], n

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctx = RunContext.from_trainer(trainer, pl_module, _WHO)
        check_same_parameters(self, ctx.module, _WHO)
        fold_batches, n = self._fold_batches(ctx)
        bar = stage_progress(trainer, len(fold_batches), "ApproximateCV: folds")
        try:
            result = approximate_cv(ctx.module, self.task, fold_batches, self._reg, config=self.config,
                                    reduce_fn=ctx.reduce_fn, num_examples=n, progress=lambda done, _: bar.set(done))
        finally:
            bar.close()
        exact = None
        if self.exact_check:
            exact = exact_cv(
                ctx.module, self.task, fold_batches, self._reg, fold_objective=self.fold_objective, method="fista",
                tol=self.exact_tol, max_iter=self.exact_max_iter, reduce_fn=ctx.reduce_fn, num_examples=n,
            )
        self.last_result, self.last_exact = result, exact
        metrics = result.metrics()
        row: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step, "approx": result.estimate}
        if exact is not None:
            metrics.update({**exact.metrics(), CV_REL_ERROR: _rel_error(result, exact)})
            row.update({"exact": exact.estimate, "rel_error": _rel_error(result, exact)})
        self.history.append(row)
        publish(trainer, who=_WHO, step=ctx.step, metrics=metrics, subdir=self.subdir,
                section="cv" if self.report else None, content=lambda _: self._section(ctx.world_size, result, exact))

    def _section(self, world_size: int, result: CVResult, exact: CVResult | None) -> dict[str, Any]:
        """The ``"cv"`` report section (rank 0): resolved config, estimates, per-fold values, history."""
        folds = []
        for i, f in enumerate(result.folds):
            row: dict[str, Any] = {"fold": f.fold, "size": f.held_out_units, "approx": f.held_out_loss,
                                   "step_norm": f.step_norm, "nonzero": f.num_nonzero}
            if exact is not None:
                row["exact"] = exact.folds[i].held_out_loss
            folds.append(row)
        estimate: dict[str, Any] = {"approx": result.estimate, "approx_pooled": result.pooled,
                                    "approx_passes": result.cost.passes, "approx_seconds": result.seconds}
        if exact is not None:
            estimate.update({"exact": exact.estimate, "exact_passes": exact.cost.passes,
                             "exact_seconds": exact.seconds, "rel_error": _rel_error(result, exact),
                             "speedup_passes": exact.cost.passes / max(result.cost.passes, 1e-300)})
        dataset = self.dataset if isinstance(self.dataset, str) else type(self.dataset).__name__
        config = {**self.config.to_dict(), **result.config, "seed": self.seed, "every_n_epochs": self.every_n_epochs,
                  "exact_check": self.exact_check, "world_size": world_size, "dataset": dataset,
                  "batch_size": self.batch_size}
        return {"config": config, "estimate": estimate, "folds": folds, "history": [dict(r) for r in self.history]}
