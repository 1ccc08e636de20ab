r"""AttributionBenchmark: the linear datamodeling score (LDS) of the report's own scores, by retraining.

When training ends, after :class:`~lightning_influence.callbacks.influence_report.InfluenceReport`, this callback
retrains the model on ``num_subsets`` seeded random :math:`\alpha`-subsets of the training examples the report
scored (:class:`~lightning_influence.evaluation.retrain.SubsetRetrainer`), measures the report's queries on every
retrained model, and scores the report's influence matrix with the LDS
(:func:`~lightning_influence.evaluation.lds.lds`), beside the gradient-dot baseline on the same retrained models.
The LDS says how well the scores predict what retraining does; ``PBRFValidation`` says whether the solver computed
the damped Gauss-Newton influence it claims. The two sit next to each other in ``report.html``.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from typing_extensions import override

from lightning_influence import metrics as M
from lightning_influence.callbacks._common import (
    MisconfigurationError,
    ResolvedData,
    RunContext,
    check_strategy,
    output_dir,
    publish,
    require_influence_report,
)
from lightning_influence.callbacks._loss import check_loss_matches
from lightning_influence.evaluation.lds import MEASUREMENTS, LDSResult, lds
from lightning_influence.evaluation.retrain import RetrainResult, SubsetRetrainer, tensor_fingerprint
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.operators import curvature_mode, make_batches, prepare_batch
from lightning_influence.params import ParamTree, make_generator, trainable_parameters
from lightning_influence.tasks import Task

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["AttributionBenchmark"]

_WHO = "AttributionBenchmark"

_ADD_REPORT = "add InfluenceReport(...) before AttributionBenchmark in callbacks"


def _margin(outputs: Tensor, targets: Tensor) -> Tensor:
    """Correct-class logit minus the largest other logit (binary: the signed logit)."""
    if outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1):
        z = outputs.reshape(-1)
        return torch.where(targets.reshape(-1) > 0, z, -z)
    correct = outputs.gather(1, targets.reshape(-1, 1).long()).reshape(-1)
    others = outputs.scatter(1, targets.reshape(-1, 1).long(), float("-inf"))
    return correct - others.amax(1)


class AttributionBenchmark(Callback):
    r"""Linear datamodeling score (LDS) of InfluenceReport's scores against models retrained on random subsets.

    Runs in ``on_train_end`` after ``InfluenceReport`` (which must come **before** it in ``callbacks``). For
    :math:`m = 1..M` it keeps a seeded random fraction :math:`\alpha` of the training examples the report scored
    (examples it did not score stay in every subset), retrains, and measures every query of the report; then for
    each query it correlates (Spearman, across the :math:`M` subsets) the measured output with the summed scores of
    the subset's members, sign-aligned (this package's scores are negative for proponents and are derivatives of
    the query *loss*; see :mod:`lightning_influence.evaluation.lds`). The LDS is the mean over queries, with a
    seeded percentile-bootstrap interval over queries. The gradient-dot baseline is scored on the same retrained
    models at the cost of one gradient pass.

    **Retraining** (:meth:`retrain`): a warm start from the trained weights, ``epochs`` epochs of minibatch
    ``optimizer`` (``"adam"``, ``"sgd"`` with momentum 0.9, or full-batch ``"lbfgs"`` with ``epochs`` outer steps of
    at most 20 iterations) on the subset's task loss (mean over the batch) plus ``weight_decay / 2 * ||θ||²``, with
    the batch order drawn from ``seed`` (the same for every subset, so subsets differ by their data only). Retrain
    close to convergence on the subset, as the training run itself would: influence predicts the converged
    response, while a few small steps only move along the first gradients (which gradient-dot predicts as well).
    It runs on a copy of the parameters through ``torch.func.functional_call``: the trained weights are never
    touched, and modules stay in eval mode (dropout off, BatchNorm statistics frozen). dattri and TRAK retrain from
    scratch, which on non-convex models adds seed noise and gives lower LDS values; the warm start measures the
    local response the influence approximates, at a fraction of the cost. Override :meth:`retrain` for another
    protocol.

    **Cost**: ``num_subsets * epochs`` passes over about :math:`\alpha` of the training set, plus one gradient
    pass (baseline). Keep ``num_subsets`` small in a training run (the default 20 gives intervals of about ±0.05 on
    100 queries); benchmarks use 50 or more.

    **Cache and resume**: results go to ``<log_dir>/<subdir>/<cache_subdir>/`` (one ``.npz`` per subset and a
    ``manifest.json`` with the configuration's hash, written atomically), so a rerun of the same training resumes
    where it stopped; different trained weights, queries or settings start fresh (``on_mismatch="overwrite"``).

    **Distributed**: rank :math:`r` retrains subsets :math:`r, r + W, \dots`; after a barrier every rank reads all
    results from the shared log directory, computes the same LDS, and rank 0 logs and writes the report.

    Args:
        task: The task (same as InfluenceReport's).
        num_subsets: :math:`M`, retrained subsets (at least 3).
        alpha: Fraction of the scored training examples kept in each subset, in ``(0, 1)``.
        measurement: ``"loss"`` (default: each query's loss) or ``"margin"`` (correct-class logit minus the largest
            other logit; classification only).
        epochs: Retraining epochs per subset.
        lr: Retraining learning rate.
        optimizer: ``"adam"`` (default), ``"sgd"`` (with momentum 0.9) or ``"lbfgs"`` (full batch).
        batch_size: Retraining minibatch size.
        weight_decay: L2 coefficient of the retraining objective (use the training run's own).
        baselines: Also score these estimators on the same retrained models: ``("gradient_dot",)`` (default) or
            ``()``.
        seed: Seed of the subset draw and the batch order.
        num_resamples: Bootstrap resamples over queries.
        level: Interval coverage.
        subdir: Report directory under the log dir (InfluenceReport's report, ``"influence"``).
        cache_subdir: Cache directory inside it.
        on_mismatch: ``"overwrite"`` (default: a cache from other trained weights or settings is discarded, with a
            warning) or ``"raise"``.

    Raises:
        MisconfigurationError: In ``__init__`` for ``num_subsets < 3``, ``alpha`` outside ``(0, 1)``, an unknown
            measurement, optimizer or baseline, or a non-positive ``epochs``/``lr``/``batch_size``/
            ``num_resamples``; in ``setup`` when no ``InfluenceReport`` is in ``callbacks`` ("add InfluenceReport(...)
            before AttributionBenchmark in callbacks") or it comes after this callback, or for an unsupported
            strategy; in ``on_train_end`` when the report has no scores, or the cache holds another configuration.

    Logged metrics (at ``trainer.global_step`` when training ends, also in ``trainer.callback_metrics``):
        * ``attribution/lds``: LDS of the report's scores (mean over queries of the Spearman correlation);
        * ``attribution/lds_ci_low``, ``attribution/lds_ci_high``: its bootstrap interval over queries;
        * ``attribution/lds_<baseline>``: LDS of each baseline (``gradient_dot``) on the same retrained models;
        * ``attribution/num_subsets``: :math:`M`;
        * ``attribution/cached_subsets``: subsets read from the cache instead of retrained (on rank 0);
        * ``attribution/seconds``: wall time of the benchmark (retraining included).

    Media: text ``attribution/verdict``, figure ``attribution/scatter`` (standardised predicted vs actual); report
    section ``"attribution"`` (verdict, LDS table with intervals, scatter data, per-query LDS, config).

    Example::

        >>> from lightning_influence.tasks import Classification
        >>> cb = AttributionBenchmark(Classification(), num_subsets=10, alpha=0.5, epochs=3)
        >>> cb.num_subsets, cb.measurement, cb.baselines
        (10, 'loss', ('gradient_dot',))
    """

    def __init__(
        self,
        task: Task,
        num_subsets: int = 20,
        alpha: float = 0.5,
        measurement: str = "loss",
        epochs: int = 10,
        lr: float = 1e-3,
        optimizer: str = "adam",
        batch_size: int = 64,
        weight_decay: float = 0.0,
        baselines: tuple[str, ...] | list[str] = ("gradient_dot",),
        seed: int = 0,
        num_resamples: int = 1000,
        level: float = 0.95,
        subdir: str = "influence",
        cache_subdir: str = "attribution_cache",
        on_mismatch: str = "overwrite",
    ) -> None:
        super().__init__()
        if not isinstance(task, Task):
            raise MisconfigurationError(f"{_WHO}: task must be a lightning_influence Task, got {task!r}.")
        if int(num_subsets) < 3:
            raise MisconfigurationError(f"{_WHO}: num_subsets must be >= 3 (a rank correlation), got {num_subsets}.")
        if not 0.0 < float(alpha) < 1.0:
            raise MisconfigurationError(f"{_WHO}: alpha (kept fraction per subset) must lie in (0, 1), got {alpha}.")
        if measurement not in MEASUREMENTS:
            raise MisconfigurationError(f"{_WHO}: measurement must be 'loss' or 'margin', got {measurement!r}.")
        if optimizer not in ("adam", "sgd", "lbfgs"):
            raise MisconfigurationError(f"{_WHO}: optimizer must be 'adam', 'sgd' or 'lbfgs', got {optimizer!r}.")
        for name, value in (("epochs", epochs), ("batch_size", batch_size), ("num_resamples", num_resamples)):
            if int(value) < 1:
                raise MisconfigurationError(f"{_WHO}: {name} must be >= 1, got {value}.")
        if not (math.isfinite(lr) and lr > 0):
            raise MisconfigurationError(f"{_WHO}: lr must be > 0, got {lr}.")
        if weight_decay < 0:
            raise MisconfigurationError(f"{_WHO}: weight_decay must be >= 0, got {weight_decay}.")
        unknown = sorted(set(baselines) - {"gradient_dot"})
        if unknown:
            raise MisconfigurationError(f"{_WHO}: baselines may contain 'gradient_dot' only, got {unknown}.")
        if on_mismatch not in ("raise", "overwrite"):
            raise MisconfigurationError(f"{_WHO}: on_mismatch must be 'raise' or 'overwrite', got {on_mismatch!r}.")
        self.task = task
        self.num_subsets = int(num_subsets)
        self.alpha = float(alpha)
        self.measurement = measurement
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.optimizer = optimizer
        self.batch_size = int(batch_size)
        self.weight_decay = float(weight_decay)
        self.baselines = tuple(baselines)
        self.seed = int(seed)
        self.num_resamples = int(num_resamples)
        self.level = float(level)
        self.subdir = subdir
        self.cache_subdir = cache_subdir
        self.on_mismatch = on_mismatch
        #: LDS of the report's scores from the last run (``None`` before ``on_train_end``).
        self.result: LDSResult | None = None
        #: LDS of each baseline from the last run.
        self.baseline_results: dict[str, LDSResult] = {}
        #: The retraining results of the last run.
        self.retrained: RetrainResult | None = None
        self._last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- state
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(measurement=self.measurement, num_subsets=self.num_subsets, alpha=self.alpha,
                                        seed=self.seed)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"metrics": dict(self._last_metrics), "seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_metrics = dict(state_dict.get("metrics", {}))

    # ------------------------------------------------------------------------------------------- setup
    def _influence_report(self, trainer: pl.Trainer) -> Any:
        return require_influence_report(trainer, self, _WHO, "scores InfluenceReport's influence scores")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, _WHO)
        self._influence_report(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_loss_matches(trainer, pl_module, self.task, _WHO)

    # ----------------------------------------------------------------------------------------- retrain
    def retrain(self, module: nn.Module, params: ParamTree, dataset: Any, collate_fn: Any, indices: Tensor,
                seed: int) -> ParamTree:
        """Fine-tune a copy of ``params`` on ``dataset[indices]`` (override for another retraining protocol).

        Args:
            module: The unwrapped module (in eval mode; called through ``functional_call`` with the copy).
            params: The trained parameters (do not modify them).
            dataset: The training dataset.
            collate_fn: Its collate function (``None``: default collation).
            indices: Sorted data-set indices of the subset.
            seed: Seed of the batch order.

        Returns:
            The retrained parameters.
        """
        device = next(iter(params.values())).device
        theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        n = int(indices.numel())
        # Collate the subset once; minibatches are slices of it (every tensor whose leading dimension is n).
        (full,) = make_batches(dataset, indices.tolist(), n, collate_fn)
        full = prepare_batch(full, device)

        def take(rows: Tensor) -> Any:
            return tree_map(lambda t: t[rows] if isinstance(t, Tensor) and t.ndim and t.shape[0] == n else t, full)

        def objective(batch: Any) -> Tensor:
            out, y = self.task(module, batch, theta, validate=False)
            loss = self.task.loss.mean(out, y)
            if self.weight_decay:
                loss = loss + 0.5 * self.weight_decay * sum((p**2).sum() for p in theta.values())
            return loss

        opt: torch.optim.Optimizer
        if self.optimizer == "lbfgs":
            opt = torch.optim.LBFGS(list(theta.values()), lr=self.lr, max_iter=20, history_size=20,
                                    line_search_fn="strong_wolfe")

            def closure() -> Tensor:
                opt.zero_grad(set_to_none=True)
                loss = objective(full)
                loss.backward()
                return loss

            for _ in range(self.epochs):
                opt.step(closure)
            return {k: v.detach() for k, v in theta.items()}
        if self.optimizer == "adam":
            opt = torch.optim.Adam(list(theta.values()), lr=self.lr)
        else:
            opt = torch.optim.SGD(list(theta.values()), lr=self.lr, momentum=0.9)
        gen = make_generator(seed)
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=gen).to(device)
            for s in range(0, n, self.batch_size):
                loss = objective(take(order[s : s + self.batch_size]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return {k: v.detach() for k, v in theta.items()}

    def _measure(self, module: nn.Module, params: ParamTree, query_batches: list[Any]) -> Tensor:
        device = next(iter(params.values())).device
        values = []
        with torch.no_grad():
            for batch in query_batches:
                out, y = self.task(module, prepare_batch(batch, device), params, validate=False)
                if self.measurement == "loss":
                    total, count = self.task.loss.per_example(out, y)
                    values.append(total / count.clamp_min(1))
                else:
                    values.append(_margin(out, y))
        return torch.cat(values).double().cpu()

    # ------------------------------------------------------------------------------------------- hooks
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = self._influence_report(trainer)
        inf = getattr(report, "result", None)
        scores = getattr(inf, "scores", None)
        if inf is None or scores is None or scores.ndim != 2 or scores.numel() == 0:
            raise MisconfigurationError(
                f"{_WHO} found no influence scores: InfluenceReport.result is None or empty (it did not run, or "
                f"failed). {_ADD_REPORT[0].upper()}{_ADD_REPORT[1:]} and make sure it runs at train end."
            )
        start = time.perf_counter()
        ctx = RunContext.from_trainer(trainer, pl_module, _WHO)
        directory = output_dir(trainer, self.subdir)  # all ranks (broadcast + barrier)
        train = ctx.resolve(getattr(report, "train_data", "train"))
        query = ctx.resolve(getattr(report, "query_data", "val"))
        train_idx = torch.as_tensor(inf.train_indices).long().cpu()
        query_idx = torch.as_tensor(inf.query_indices).long().cpu()
        retrained = self._retrain_subsets(ctx, train, query, train_idx, query_idx, directory)
        solver = str(getattr(inf, "config", {}).get("solver", "influence"))
        result, baselines = self._scores_lds(ctx, inf, train, query, train_idx, query_idx, retrained)
        seconds = time.perf_counter() - start
        for r in (result, *baselines.values()):
            r.info.update(alpha=self.alpha, seconds=seconds)
        result.info["estimator"] = solver
        self.result, self.baseline_results, self.retrained = result, baselines, retrained
        metrics = {
            M.ATTRIBUTION_LDS: result.lds,
            M.ATTRIBUTION_LDS_CI_LOW: result.ci.low,
            M.ATTRIBUTION_LDS_CI_HIGH: result.ci.high,
            **{M.attribution_lds(name): r.lds for name, r in baselines.items()},
            M.ATTRIBUTION_NUM_SUBSETS: float(self.num_subsets),
            M.ATTRIBUTION_CACHED_SUBSETS: float(len(retrained.reused)),
            M.ATTRIBUTION_SECONDS: seconds,
        }
        self._last_metrics = dict(metrics)
        publish(trainer, step=ctx.step, metrics=metrics, subdir=self.subdir, section="attribution", who=_WHO,
                content=lambda d: self._section(trainer, solver, result, baselines, retrained, directory, ctx.step))

    def _retrain_subsets(
        self, ctx: RunContext, train: ResolvedData, query: ResolvedData, train_idx: Tensor, query_idx: Tensor,
        directory: Any,
    ) -> RetrainResult:
        """Retrain (or read from the cache) the seeded subsets, sharded over the ranks; every rank gets them all."""
        module = ctx.module
        params = {k: v.detach().clone() for k, v in trainable_parameters(module).items()}
        query_batches = ctx.source(query, query_idx, batch_size=256, shard=False).batches()
        fingerprint = "|".join([
            "builtin-finetune", type(module).__qualname__, self.optimizer, f"epochs={self.epochs}", f"lr={self.lr}",
            f"batch={self.batch_size}", f"wd={self.weight_decay}", self.measurement, type(self.task).__name__,
            tensor_fingerprint(*params.values()), type(self).__qualname__,
        ])

        def train_fn(indices: Tensor, seed: int) -> ParamTree:
            with curvature_mode(module):
                return self.retrain(module, params, train.dataset, train.collate_fn, indices, seed)

        def measure_fn(theta: ParamTree) -> Tensor:
            with curvature_mode(module):
                return self._measure(module, theta, query_batches)

        try:
            retrainer = SubsetRetrainer(
                train_fn, measure_fn, n_train=len(train.dataset), num_subsets=self.num_subsets, alpha=self.alpha,
                seed=self.seed, candidates=train_idx, cache_dir=directory / self.cache_subdir, fingerprint=fingerprint,
                query_fingerprint=f"{query.source}:{len(query.dataset)}:{tensor_fingerprint(query_idx)}",
                on_mismatch=self.on_mismatch, rank=ctx.rank, world_size=ctx.world_size,
                barrier=lambda: ctx.strategy.barrier("lightning_influence.attribution_benchmark.retrain"),
            )
            return retrainer.run()
        except ConfigurationError as err:
            if isinstance(err, MisconfigurationError):
                raise
            raise MisconfigurationError(f"{_WHO}: {err}") from err

    def _scores_lds(
        self, ctx: RunContext, inf: Any, train: ResolvedData, query: ResolvedData, train_idx: Tensor,
        query_idx: Tensor, retrained: RetrainResult,
    ) -> tuple[LDSResult, dict[str, LDSResult]]:
        """LDS of the report's scores and of the baselines on the same retrained models."""
        common: dict[str, Any] = {"measurement": self.measurement, "train_indices": train_idx,
                                  "num_resamples": self.num_resamples, "level": self.level, "seed": self.seed}
        result = lds(inf.scores.detach().cpu(), retrained.subsets, retrained.outputs, **common)
        baselines: dict[str, LDSResult] = {}
        if "gradient_dot" in self.baselines:
            from lightning_influence.influence import gradient_dot_scores

            normalization = str(getattr(inf, "config", {}).get("normalization", "sum"))
            gd = gradient_dot_scores(ctx.module, self.task, train.dataset, query.dataset, train_indices=train_idx,
                                     query_indices=query_idx, normalization=normalization,
                                     collate_fn=train.collate_fn)
            baselines["gradient_dot"] = lds(gd.detach().cpu(), retrained.subsets, retrained.outputs, **common)
        return result, baselines

    # ------------------------------------------------------------------------------------------ output
    def verdict(self, solver: str, result: LDSResult, baselines: dict[str, LDSResult]) -> str:
        """A plain-language sentence on the LDS and how it compares with the baselines.

        Returns:
            The sentence.
        """
        ci = result.ci
        text = (f"LDS of the {solver} scores: {result.lds:.3f} (95 % interval {ci.low:.3f} to {ci.high:.3f}, "
                f"bootstrap over {result.num_queries} queries; {result.num_subsets} subsets keeping "
                f"{self.alpha:.0%} of the scored training examples, each retrained for {self.epochs} epoch(s) of "
                f"{self.optimizer} from the trained weights).")
        if not math.isfinite(result.lds):
            return text + " The LDS is undefined: the retrained outputs did not change; retrain longer (epochs, lr)."
        for name, b in baselines.items():
            if math.isfinite(b.lds):
                better = "above" if ci.low > b.lds else ("below" if ci.high < b.lds else "not distinguishable from")
                text += f" The {name} baseline reaches {b.lds:.3f}: the scores are {better} it."
        if result.lds < 0.2:
            text += (" The scores barely predict retraining here: check the solver certificate and the PBRF check, "
                     "and consider a larger damping.")
        return text

    def _section(self, trainer: pl.Trainer, solver: str, result: LDSResult, baselines: dict[str, LDSResult],
                 retrained: RetrainResult, directory: Any, step: int) -> dict[str, Any]:
        """Rank 0: log the verdict and the scatter, and return the report's ``"attribution"`` section."""
        from lightning_influence.reporting import figures, media

        text = self.verdict(solver, result, baselines)
        media.log_text(trainer.loggers, M.MEDIA_ATTRIBUTION_VERDICT, text, step=step)
        scatter = result.scatter()
        if trainer.loggers:
            fig = figures.scatter_figure(scatter["actual"], scatter["predicted"], f"LDS {result.lds:.3f} ({solver})",
                                         "actual output (standardised per query)", "predicted (standardised)")
            media.log_figure(trainer.loggers, M.MEDIA_ATTRIBUTION_SCATTER, fig, step=step)
        rows = []
        for name, r in {solver: result, **baselines}.items():
            rows.append({"estimator": name, "lds": r.lds, "ci_low": r.ci.low, "ci_high": r.ci.high,
                         "num_queries": r.num_queries, "num_subsets": r.num_subsets,
                         "undefined_queries": r.num_undefined})
        return {
            "verdict": text,
            "lds": rows,
            "scatter": {"estimator": solver, **scatter},
            "per_query": {name: r.per_query.tolist() for name, r in {solver: result, **baselines}.items()},
            "interval": result.ci.to_dict(),
            "summary": {k.split("/", 1)[1]: v for k, v in self._last_metrics.items()},
            "config": {"num_subsets": self.num_subsets, "alpha": self.alpha, "measurement": self.measurement,
                       "epochs": self.epochs, "lr": self.lr, "optimizer": self.optimizer,
                       "batch_size": self.batch_size, "weight_decay": self.weight_decay, "seed": self.seed,
                       "retraining": "warm start from the trained weights (see AttributionBenchmark.retrain)",
                       "cache": str(directory / self.cache_subdir), "config_hash": retrained.config.get("config_hash"),
                       "sign": "predicted = sum of I(z, q) over the subset, times +1 for a loss, -1 for a margin"},
        }
