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

import contextlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_influence.callbacks._common import (
    MisconfigurationError,
    check_strategy,
    log_scalars,
    make_reduce_fn,
    output_dir,
    rank_world,
    resolve_data,
    unwrap_module,
)
from lightning_influence.cv import (
    CVResult,
    approximate_cv,
    check_curvature_for_loss,
    exact_cv,
    kfold_indices,
    make_fold_batches,
)
from lightning_influence.distributed import shard_indices
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.params import num_parameters, trainable_parameters
from lightning_influence.regularizers import NoRegularizer, Regularizer
from lightning_influence.tasks import Task

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

__all__ = ["ApproximateCV", "find_module_regularizer"]

_WHO = "ApproximateCV"


@contextlib.contextmanager
def _isolated_rng() -> Iterator[None]:
    """Restore torch's CPU RNG, Python's ``random`` and NumPy's global RNG (``__getitem__`` may use them)."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


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
        curvature: ``"fisher"`` (default), ``"gnh"`` or ``"hessian"`` (Hessian-based approximate CV).
        downdate: Use the fold-downdated curvature :math:`F_{-k}` (default) or one full-data :math:`F` (paper).
        fold_objective: ``"mean"`` (default: refit the mean loss on the remaining data) or ``"weighted"``
            (the paper's :math:`\frac1N\sum_i w_i\ell_i`); see :mod:`lightning_influence.cv`.
        solver: ``"auto"`` (dense up to ``dense_max_params`` parameters, else CG), ``"dense"`` or ``"cg"``.
        damping: :math:`\delta \ge 0` added to the curvature (needed when it is singular, e.g. over-parametrised
            networks).
        dataset: ``"train"`` (default), ``"val"`` or a map-style dataset to cross-validate on.
        batch_size: Examples per batch for the curvature and gradient passes.
        cg_rtol: CG relative residual tolerance.
        prox_tol: Relative residual tolerance of the metric prox.
        dense_max_params: Largest model handled with dense matrices under ``solver="auto"``.
        exact_tol: Tolerance of the exact refits (gradient-mapping norm).
        exact_max_iter: Iteration cap of each exact refit.
        center: Subtract the step the full data would still take (see :func:`lightning_influence.cv.approximate_cv`);
            use it for per-epoch curves or when training stops before convergence. No effect at a minimiser.
        report: Write the report section (``<log_dir>/influence``).

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
        >>> cb.folds
        5
    """

    def __init__(
        self,
        task: Task,
        folds: int = 5,
        regularizer: Regularizer | None = None,
        seed: int = 0,
        every_n_epochs: int | None = None,
        exact_check: bool = False,
        curvature: Literal["fisher", "gnh", "hessian"] = "fisher",
        downdate: bool = True,
        fold_objective: Literal["mean", "weighted"] = "mean",
        solver: Literal["auto", "dense", "cg"] = "auto",
        damping: float = 0.0,
        dataset: Any = "train",
        batch_size: int = 256,
        cg_rtol: float = 1e-8,
        prox_tol: float = 1e-10,
        dense_max_params: int = 2000,
        exact_tol: float = 1e-8,
        exact_max_iter: int = 20_000,
        center: bool = False,
        report: bool = True,
    ) -> None:
        if not isinstance(task, Task):
            raise MisconfigurationError(f"{_WHO}: task must be a lightning_influence Task, got {type(task).__name__}.")
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise MisconfigurationError(f"{_WHO}: folds must be an integer >= 2, got {folds!r}.")
        if every_n_epochs is not None and (
            isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1
        ):
            raise MisconfigurationError(
                f"{_WHO}: every_n_epochs must be None or an integer >= 1, got {every_n_epochs!r}."
            )
        if regularizer is not None and not isinstance(regularizer, Regularizer):
            raise MisconfigurationError(
                f"{_WHO}: regularizer must be a lightning_influence.regularizers.Regularizer (L1, ElasticNet, "
                f"GroupLasso, NoRegularizer) or None, got {type(regularizer).__name__}."
            )
        if solver not in ("auto", "dense", "cg"):
            raise MisconfigurationError(f"{_WHO}: solver must be 'auto', 'dense' or 'cg', got {solver!r}.")
        if fold_objective not in ("mean", "weighted"):
            raise MisconfigurationError(f"{_WHO}: fold_objective must be 'mean' or 'weighted', got {fold_objective!r}.")
        if damping < 0:
            raise MisconfigurationError(f"{_WHO}: damping must be >= 0, got {damping}.")
        if batch_size < 1:
            raise MisconfigurationError(f"{_WHO}: batch_size must be >= 1, got {batch_size}.")
        try:
            check_curvature_for_loss(task, curvature)
        except ConfigurationError as err:
            raise MisconfigurationError(f"{_WHO}: {err}") from err
        self.task = task
        self.folds = folds
        self.regularizer = regularizer
        self.seed = seed
        self.every_n_epochs = every_n_epochs
        self.exact_check = exact_check
        self.curvature = curvature
        self.downdate = downdate
        self.fold_objective = fold_objective
        self.solver = solver
        self.damping = float(damping)
        self.dataset = dataset
        self.batch_size = batch_size
        self.cg_rtol = cg_rtol
        self.prox_tol = prox_tol
        self.dense_max_params = dense_max_params
        self.exact_tol = exact_tol
        self.exact_max_iter = exact_max_iter
        self.center = center
        self.report = report
        #: One row per run: epoch, step, approx (and exact) estimates.
        self.history: list[dict[str, Any]] = []
        self.last_result: CVResult | None = None
        self.last_exact: CVResult | None = None
        self._reg: Regularizer = regularizer if regularizer is not None else NoRegularizer()

    # ------------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, _WHO)
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
    def _fold_batches(self, trainer: pl.Trainer) -> tuple[list[list[Any]], int]:
        data = resolve_data(trainer, self.dataset, _WHO)
        n = len(data.dataset)
        if self.folds > n:
            raise MisconfigurationError(
                f"{_WHO}: folds={self.folds} is larger than the number of examples ({n}) in the {data.source} data; "
                f"use at most {n} folds."
            )
        rank, world = rank_world(trainer)
        fold_idx = kfold_indices(n, self.folds, seed=self.seed)
        local = [shard_indices(torch.tensor(f, dtype=torch.long), rank, world).tolist() for f in fold_idx]
        with _isolated_rng():
            batches = make_fold_batches(data.dataset, local, self.batch_size, data.collate_fn)
        return batches, n

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = unwrap_module(pl_module)
        reduce_fn = make_reduce_fn(trainer)
        fold_batches, n = self._fold_batches(trainer)
        result = approximate_cv(
            module, self.task, fold_batches, self._reg, curvature=self.curvature, downdate=self.downdate,
            fold_objective=self.fold_objective, solver=self.solver, damping=self.damping, cg_rtol=self.cg_rtol,
            prox_tol=self.prox_tol, dense_max_params=self.dense_max_params, center=self.center, reduce_fn=reduce_fn,
            num_examples=n,
        )
        exact = None
        if self.exact_check:
            exact = exact_cv(
                module, self.task, fold_batches, self._reg, fold_objective=self.fold_objective, method="fista",
                tol=self.exact_tol, max_iter=self.exact_max_iter, reduce_fn=reduce_fn, num_examples=n,
            )
        self.last_result, self.last_exact = result, exact
        metrics: dict[str, float] = {
            "cv/approx_loss": result.estimate,
            "cv/approx_passes": result.cost.passes,
            "cv/approx_seconds": result.seconds,
        }
        metrics.update({f"cv/approx_fold_{f.fold}": f.held_out_loss for f in result.folds})
        row: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step, "approx": result.estimate}
        if exact is not None:
            rel = abs(result.estimate - exact.estimate) / max(abs(exact.estimate), 1e-300)
            metrics.update({
                "cv/exact_loss": exact.estimate,
                "cv/exact_passes": exact.cost.passes,
                "cv/exact_seconds": exact.seconds,
                "cv/rel_error": rel,
            })
            metrics.update({f"cv/exact_fold_{f.fold}": f.held_out_loss for f in exact.folds})
            row.update({"exact": exact.estimate, "rel_error": rel})
        self.history.append(row)
        log_scalars(trainer, metrics, step=trainer.global_step)
        if self.report:
            self._write_report(trainer, result, exact)

    def _write_report(self, trainer: pl.Trainer, result: CVResult, exact: CVResult | None) -> None:
        directory = output_dir(trainer, "influence")  # collective: all ranks
        if trainer.is_global_zero:
            from lightning_influence.reporting import ReportStore

            _, world = rank_world(trainer)
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
                                 "exact_seconds": exact.seconds,
                                 "rel_error": abs(result.estimate - exact.estimate) / max(abs(exact.estimate), 1e-300),
                                 "speedup_passes": exact.cost.passes / max(result.cost.passes, 1e-300)})
            config = {**result.config, "seed": self.seed, "every_n_epochs": self.every_n_epochs,
                      "exact_check": self.exact_check, "world_size": world, "dataset": str(self.dataset)
                      if isinstance(self.dataset, str) else type(self.dataset).__name__}
            data: dict[str, Any] = {"config": config, "estimate": estimate, "folds": folds,
                                    "history": [dict(r) for r in self.history]}
            ReportStore(directory).update("cv", data)
        trainer.strategy.barrier("lightning_influence.approximate_cv.report")
