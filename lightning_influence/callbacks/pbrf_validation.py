r"""PBRFValidation: check the influence report against the proximal Bregman response function.

At the end of training, for ``num_train`` training examples × ``num_queries`` queries drawn (seeded) from the
pairs scored by :class:`~lightning_influence.callbacks.influence_report.InfluenceReport`, this callback computes the
PBRF (paper 1, eq. 5; :mod:`lightning_influence.pbrf`) — the retraining ground truth that damped-GNH influence
approximates — and compares against it:

* the report's own scores (``"lissa"``, ``"cg"`` or ``"exact"``, whichever solver it used);
* the exact damped-GNH influence (dense solve) when the model has at most ``exact_max_params`` parameters;
* the gradient-dot baseline :math:`-\nabla\ell(q)^\top\nabla\ell(z)` (no curvature).

It reports Pearson and Spearman correlations (``torchmetrics``) per training example (across its queries) and
overall (all pairs pooled), a plain-language verdict, scatter plots, and the PBRF solver certificates
(convergence, relative gradient norms).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_influence.callbacks._common import (
    MisconfigurationError,
    ResolvedData,
    RunContext,
    check_choice,
    check_int,
    check_number,
    check_strategy,
    check_task,
    config_field,
    publish,
    require_influence_report,
    resolve_config,
    sample_indices,
)
from lightning_influence.callbacks._loss import check_loss_matches
from lightning_influence.callbacks.influence_report import InfluenceReport
from lightning_influence.config import PBRFConfig
from lightning_influence.metrics import (
    MEDIA_PBRF_CORRELATIONS,
    MEDIA_PBRF_VERDICT,
    PBRF_CONVERGED_FRACTION,
    PBRF_MAX_RELATIVE_GRAD_NORM,
    media_pbrf_scatter,
    pbrf_pearson,
    pbrf_spearman,
    regroup,
)
from lightning_influence.params import num_parameters, trainable_parameters
from lightning_influence.pbrf import PBRF, PBRFResult
from lightning_influence.progress import cost_budget, stage_progress, warn_projected_cost
from lightning_influence.stats import correlation_table
from lightning_influence.stats import verdict as _verdict
from lightning_influence.tasks import Task

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["PBRFValidation", "PBRFValidationResult", "correlation_table"]

_WHO = "PBRFValidation"

_ADD_REPORT = "add InfluenceReport(...) before PBRFValidation in callbacks"


#: ``num_train`` above which PBRFValidation warns of its cost before training starts.
PBRF_WARN_PAIRS = 50
#: Gradient passes over the training data assumed per PBO solve in the projected cost: the wall time of one solve in
#: training epochs, measured at the callback's defaults (docs/performance.md): 31 on the MNIST CNN (40 solves and the
#: dense factor in 1,225 epochs; a float64 pass costs about 3 float32 ones) and 13 on the HF GPT-2 example (512).
PBRF_PASSES_PER_SOLVE = 30


@dataclass

class PBRFValidationResult:
    """What :class:`PBRFValidation` computed (identical on every rank).

    Attributes:
        train_indices: ``(num_train,)`` training data-set indices.
        query_indices: ``(num_queries,)`` query data-set indices.
        pbrf: ``(num_train, num_queries)`` PBRF responses.
        estimates: Estimator name → ``(num_train, num_queries)`` scores (``I(z, q)`` convention).
        correlations: One row per estimator (see :func:`correlation_table`).
        per_example: Per-example Pearson/Spearman lists per estimator.
        certificates: One :meth:`PBRFResult.to_dict` (without responses) per training example.
        verdict: The plain-language sentence.
        config: Settings used (ε, λ, optimiser, ...).

    Example::

        >>> result = PBRFValidationResult(
        ...     train_indices=torch.tensor([3, 7]), query_indices=torch.tensor([0, 1, 2]),
        ...     pbrf=torch.zeros(2, 3), estimates={"cg": torch.zeros(2, 3)},
        ...     correlations=[{"estimator": "cg", "pearson": 0.9, "spearman": 0.8}], per_example={},
        ...     certificates=[{"converged": True, "relative_grad_norm": 1e-4},
        ...                   {"converged": False, "relative_grad_norm": 0.02}],
        ...     verdict="The report's scores track the PBRF closely.")
        >>> for name, value in result.metrics().items():
        ...     print(name, value)
        pbrf/pearson_cg 0.9
        pbrf/spearman_cg 0.8
        pbrf/converged_fraction 0.5
        pbrf/max_relative_grad_norm 0.02
    """

    train_indices: Tensor
    query_indices: Tensor
    pbrf: Tensor
    estimates: dict[str, Tensor]
    correlations: list[dict[str, Any]]
    per_example: dict[str, Any]
    certificates: list[dict[str, Any]]
    verdict: str
    config: dict[str, Any] = field(default_factory=dict)

    def metrics(self, prefix: str = "pbrf/") -> dict[str, float]:
        """``pbrf/pearson_<estimator>``, ``pbrf/spearman_<estimator>``, convergence summaries.

        Names from :mod:`lightning_influence.metrics` (``PBRF_PEARSON_CG``, ...); ``prefix`` replaces ``pbrf/``.

        Returns:
            ``name -> value``.
        """
        out: dict[str, float] = {}
        for row in self.correlations:
            out[pbrf_pearson(row["estimator"])] = float(row["pearson"])
            out[pbrf_spearman(row["estimator"])] = float(row["spearman"])
        conv = [bool(c["converged"]) for c in self.certificates]
        out[PBRF_CONVERGED_FRACTION] = float(sum(conv)) / max(len(conv), 1)
        out[PBRF_MAX_RELATIVE_GRAD_NORM] = max((float(c["relative_grad_norm"]) for c in self.certificates),
                                               default=0.0)
        return regroup(out, "pbrf/", prefix)


class PBRFValidation(Callback):
    r"""Validate :class:`InfluenceReport`'s scores against the proximal Bregman response function (PBRF).

    Runs in ``on_train_end`` after ``InfluenceReport`` (which must come **before** it in ``callbacks``). For a
    seeded draw of ``num_train`` of the report's training examples and ``num_queries`` of its queries it minimises
    the proximal Bregman objective (paper 1, eq. 5)

    .. math:: \frac1N\sum_n D(h(x_n;\theta), h(x_n;\hat\theta), y_n) \pm \epsilon\,\ell(z_m;\theta)
        + \frac\lambda2\|\theta - \hat\theta\|^2

    on a float64 copy of the model (the trained weights are never touched), takes the central difference of the
    query losses, and correlates the report's scores, the exact damped-GNH influence (small models) and the
    gradient-dot baseline with it. Under DDP the data term is sharded across ranks (one reduction per objective
    evaluation); every rank computes the same table, rank 0 logs and writes.

    Cost: two PBO solves per validated training example, each a few Gauss-Newton steps whose CG iterations are
    full passes over the training set (measured: 13-31 training epochs of wall time per solve at the defaults, on
    the MNIST CNN and the HF GPT-2 examples of ``docs/performance.md``); keep ``num_train`` small on large data.

    Args:
        task: The task (same as InfluenceReport's).
        num_train: Training examples validated (two PBO solves each); clipped to those the report scored.
        num_queries: Queries per training example; clipped to the report's queries.
        epsilon: :math:`\epsilon > 0` of the PBO (``None``: the config's, by default :math:`1/N`, upweighting by
            one example).
        damping: :math:`\lambda` of the proximity term and of the exact influence (``None``: the config's, by
            default InfluenceReport's).
        seed: Seed of the example/query draw.
        optimizer: PBO optimiser, ``"newton_cg"`` (Gauss-Newton-CG) or ``"lbfgs"`` (``None``: the config's,
            ``"newton_cg"`` by default).
        tol: Relative gradient-norm tolerance of each PBO solve (``None``: the config's, 1e-5 by default).
        max_iter: Optimiser iterations per solve (``None``: the config's, 500 by default).
        exact_max_params: Compute the exact damped-GNH influence when the model has at most this many
            parameters (``0`` disables it; the dense GNH costs about :math:`N K P^2` flops for :math:`N` training
            examples with :math:`K` outputs).
        batch_size: Examples per batch of the PBO data term.
        subdir: Report directory under the log dir (InfluenceReport's report, ``"influence"``).
        config: The PBRF's settings (:class:`~lightning_influence.config.PBRFConfig`: also the dtype, L-BFGS
            memory, inner CG tolerance, ...; default ``PBRFConfig()``). The explicit arguments above that are not
            ``None`` replace its fields; its ``normalization`` is always the report's. ``cb.config`` is the resolved
            config; the report section holds it with the values the run derived (``epsilon``, ``damping``).

    Raises:
        MisconfigurationError: In ``__init__`` for non-positive ``num_train``/``num_queries``/``epsilon``/
            ``damping``/``tol``/``max_iter``/``batch_size`` or an unknown optimiser; in ``setup`` when no
            ``InfluenceReport`` is in ``callbacks`` ("add InfluenceReport(...) before PBRFValidation in callbacks"),
            when it comes after this callback, or for an unsupported strategy; in ``on_train_end`` when the report
            has no scores.

    Logged metrics (at ``trainer.global_step``, also in ``trainer.callback_metrics``):
        * ``pbrf/pearson_<estimator>``, ``pbrf/spearman_<estimator>``: pooled correlation with the PBRF, for
          ``<estimator>`` in the report's solver (``lissa``/``cg``/``exact``), ``exact`` and ``gradient_dot``;
        * ``pbrf/converged_fraction``: fraction of training examples whose two PBO solves converged;
        * ``pbrf/max_relative_grad_norm``: worst final relative gradient norm of the PBO solves.

    Media: table ``pbrf/correlations`` (TensorBoard text / W&B table), text ``pbrf/verdict``, figures
    ``pbrf/scatter_<estimator>``; report section ``"pbrf"`` (verdict, correlations, scatter data, certificates).

    Example::

        >>> from lightning_influence.tasks import Classification
        >>> cb = PBRFValidation(Classification(), num_train=5, num_queries=4)
        >>> cb.num_train, cb.epsilon, cb.config.optimizer
        (5, None, 'newton_cg')
    """

    epsilon: float | None = config_field()
    damping: float | None = config_field()
    optimizer: str = config_field()
    tol: float = config_field()
    max_iter: int = config_field()

    def __init__(
        self,
        task: Task,
        num_train: int = 20,
        num_queries: int = 10,
        epsilon: float | None = None,
        damping: float | None = None,
        seed: int = 0,
        optimizer: str | None = None,
        tol: float | None = None,
        max_iter: int | None = None,
        exact_max_params: int = 1000,
        batch_size: int = 512,
        subdir: str = "influence",
        config: PBRFConfig | None = None,
    ) -> None:
        super().__init__()
        self.task = check_task(task, _WHO)
        self.num_train = check_int(_WHO, "num_train", num_train)
        self.num_queries = check_int(_WHO, "num_queries", num_queries)
        self.batch_size = check_int(_WHO, "batch_size", batch_size)
        self.exact_max_params = check_int(_WHO, "exact_max_params", exact_max_params, 0, fix="0 disables it")
        check_int(_WHO, "max_iter", max_iter, allow_none=True)
        check_number(_WHO, "epsilon", epsilon, allow_none=True,
                     fix="the PBRF up/down-weights by ±epsilon; leave it None for 1/N")
        check_number(_WHO, "damping", damping, allow_none=True, fix="None uses the report's")
        check_number(_WHO, "tol", tol, allow_none=True)
        if optimizer is not None:
            check_choice(_WHO, "optimizer", optimizer, ("lbfgs", "newton_cg"))
        #: The resolved PBRF settings (:class:`~lightning_influence.config.PBRFConfig`).
        self.config = resolve_config(_WHO, PBRFConfig, config, PBRFConfig(), epsilon=epsilon, damping=damping,
                                     optimizer=optimizer, tol=tol, max_iter=max_iter)
        if num_train > PBRF_WARN_PAIRS:
            self._warn_cost(None)
        self.seed = int(seed)
        self.subdir = subdir
        #: The last validation (``None`` before ``on_train_end``; not returned to the parent under ``ddp_spawn``).
        self.result: PBRFValidationResult | None = None

    # ------------------------------------------------------------------------------------------- setup
    def _influence_report(self, trainer: pl.Trainer) -> InfluenceReport:
        return require_influence_report(trainer, self, _WHO, "validates InfluenceReport's scores")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, _WHO)
        self._influence_report(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_loss_matches(trainer, pl_module, self.task, _WHO)
        if trainer.is_global_zero and self.num_train <= PBRF_WARN_PAIRS:  # above: warned at __init__
            self._warn_cost(cost_budget(trainer))

    def _warn_cost(self, budget: float | None) -> None:
        """Warn before training when the PBRF solves are projected past ``budget`` passes (``None``: always)."""
        warn_projected_cost(
            f"{_WHO}: num_train={self.num_train} solves {2 * self.num_train} proximal Bregman objectives (two per "
            f"training example) at the end of training, each a {self.config.optimizer} run over the training data "
            f"(measured: 13-31 epochs of wall time each; {PBRF_PASSES_PER_SOLVE} assumed)",
            "lower num_train (or loosen tol) for a faster check.",
            passes=2 * self.num_train * PBRF_PASSES_PER_SOLVE, budget=budget, stacklevel=4,
        )

    # -------------------------------------------------------------------------------------- validation
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = self._influence_report(trainer)
        inf = report.result  # the same on every rank, so every rank raises or none does
        if inf is None:
            raise MisconfigurationError(
                f"{_WHO} found no influence scores to validate: InfluenceReport.result is None (it did not "
                f"run, or failed). {_ADD_REPORT[0].upper()}{_ADD_REPORT[1:]} and make sure it runs at train end."
            )
        start = time.perf_counter()
        result = self.validate(trainer, pl_module, report, inf)
        result.config["seconds"] = time.perf_counter() - start
        self.result = result
        step = int(trainer.global_step)
        publish(trainer, who=_WHO, step=step, metrics=result.metrics(), subdir=self.subdir, section="pbrf",
                content=lambda _: self._publish(trainer, result, step))

    def validate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: Any, inf: Any
    ) -> PBRFValidationResult:
        """Compute the PBRF table for the report's scores ``inf`` (an ``InfluenceResult``); all ranks call this.

        Returns:
            The :class:`PBRFValidationResult` (identical on every rank).

        Raises:
            MisconfigurationError: If the report's result has no scores or no usable damping.
        """
        ctx = RunContext.from_trainer(trainer, pl_module, _WHO)
        cfg = dict(getattr(inf, "config", {}) or {})
        report_solver = str(cfg.get("solver", getattr(report, "solver", "influence")))
        damping = float(self.damping if self.damping is not None else cfg.get("damping", math.nan))
        if not (math.isfinite(damping) and damping > 0):
            raise MisconfigurationError(
                f"{_WHO} needs damping > 0 for the PBRF proximity term; InfluenceReport used {damping}. Pass "
                "damping=... to PBRFValidation."
            )
        train = ctx.resolve(getattr(report, "train_data", "train"))
        query = ctx.resolve(getattr(report, "query_data", "val"))
        train_idx, query_idx, report_scores = self._pairs(inf)
        # The PBO's data term: the same sample as the report's GNH (default: the whole training set), sharded.
        curv = getattr(inf, "diagnostics", {}).get("curvature_indices")
        curv_idx = torch.as_tensor(curv) if curv is not None else torch.arange(len(train.dataset))
        pbrf = PBRF(ctx.module, self.task, ctx.source(train, curv_idx, batch_size=self.batch_size),
                    config=self.config, damping=damping, reduce_fn=ctx.reduce_fn,
                    normalization=str(cfg.get("normalization", "sum")))
        query_batches = ctx.source(query, query_idx, batch_size=self.batch_size, shard=False).batches()
        responses: list[Tensor] = []
        certificates: list[dict[str, Any]] = []
        bar = stage_progress(trainer, len(train_idx), "PBRFValidation: PBO solves")
        try:
            for i in train_idx.tolist():
                res: PBRFResult = pbrf.response(ctx.source(train, [i], batch_size=1, shard=False).batches()[0],
                                                queries=query_batches)
                responses.append(res.response.cpu())
                certificates.append({**{k: v for k, v in res.to_dict().items() if k != "response"},
                                     "train_index": int(i)})
                bar.update()
        finally:
            bar.close()
        pbrf_matrix = torch.stack(responses)
        estimates = {report_solver: report_scores,
                     **self._baselines(ctx, pbrf, cfg, report_solver, train, query, train_idx, query_idx,
                                       curv_idx if curv is not None else None)}
        table, per_example = correlation_table(pbrf_matrix, estimates)
        config = {
            **pbrf.config.to_dict(), **pbrf.to_dict(), "report_solver": report_solver,
            "report_damping": cfg.get("damping"), "num_train": len(train_idx), "num_queries": len(query_idx),
            "seed": self.seed, "world_size": ctx.world_size, "num_params": pbrf.num_params,
            "exact_computed": "exact" in estimates, "batch_size": self.batch_size,
            "exact_max_params": self.exact_max_params,
        }
        return PBRFValidationResult(
            train_indices=train_idx, query_indices=query_idx, pbrf=pbrf_matrix, estimates=estimates,
            correlations=table, per_example=per_example, certificates=certificates,
            verdict=_verdict(table, report_solver, all(c["converged"] for c in certificates)), config=config,
        )

    def _pairs(self, inf: Any) -> tuple[Tensor, Tensor, Tensor]:
        """The validated training examples and queries (seeded draws from the report's) and the report's scores.

        Returns:
            ``(train_indices, query_indices, scores)``, the scores as ``(num_train, num_queries)`` float64.

        Raises:
            MisconfigurationError: If the report holds no scores.
        """
        scores: Tensor = inf.scores.detach().cpu()
        if scores.ndim != 2 or scores.numel() == 0:
            raise MisconfigurationError(
                f"{_WHO} found no influence scores to validate (shape {tuple(scores.shape)}): {_ADD_REPORT}."
            )
        cols = sample_indices(scores.shape[1], self.num_train, self.seed)
        rows = sample_indices(scores.shape[0], self.num_queries, self.seed, "queries")
        train_idx = torch.as_tensor(inf.train_indices).cpu()[cols]
        query_idx = torch.as_tensor(inf.query_indices).cpu()[rows]
        return train_idx, query_idx, scores[rows][:, cols].T.contiguous().double()

    def _baselines(
        self, ctx: RunContext, pbrf: PBRF, cfg: dict[str, Any], report_solver: str, train: ResolvedData,
        query: ResolvedData, train_idx: Tensor, query_idx: Tensor, curv_idx: Tensor | None,
    ) -> dict[str, Tensor]:
        """The exact damped-GNH influence (small models) and the gradient-dot baseline, on the float64 copy."""
        from lightning_influence.influence import InfluenceConfig, gradient_dot_scores, influence_scores

        model64 = pbrf.model  # float64 copy at the trained weights (restored after every PBO measurement)
        common: dict[str, Any] = {"train_indices": train_idx, "query_indices": query_idx,
                                  "collate_fn": train.collate_fn}
        out: dict[str, Tensor] = {}
        if report_solver != "exact" and num_parameters(trainable_parameters(ctx.module)) <= self.exact_max_params:
            base = {k: v for k, v in cfg.items() if k in InfluenceConfig.__dataclass_fields__}
            base.update(solver="exact", damping=pbrf.damping, self_influence=False, dtype="float64")
            exact = influence_scores(
                model64, self.task, train.dataset, query.dataset, config=InfluenceConfig(**base),
                curvature_indices=curv_idx, reduce_fn=ctx.reduce_fn, rank=ctx.rank, world_size=ctx.world_size,
                query_collate_fn=query.collate_fn, **common,
            )
            out["exact"] = exact.scores.detach().cpu().T.double()
        gd = gradient_dot_scores(model64, self.task, train.dataset, query.dataset, normalization=pbrf.normalization,
                                 **common)
        out["gradient_dot"] = gd.detach().cpu().T.double()
        return out

    # ---------------------------------------------------------------------------------------- outputs
    def _publish(self, trainer: pl.Trainer, result: PBRFValidationResult, step: int) -> dict[str, Any]:
        """Rank 0: log the table, the verdict and the scatter figures; return the ``"pbrf"`` report section."""
        from lightning_influence.reporting import figures, media

        columns = ["estimator", "pearson", "spearman", "pearson_median_per_example", "spearman_median_per_example",
                   "n"]
        media.log_table(trainer.loggers, MEDIA_PBRF_CORRELATIONS, columns,
                        [[row[c] for c in columns] for row in result.correlations], step=step)
        media.log_text(trainer.loggers, MEDIA_PBRF_VERDICT, result.verdict, step=step)
        x = result.pbrf.flatten().tolist()
        scatter = []
        for name, est in result.estimates.items():
            y = est.flatten().tolist()
            scatter.append({"estimator": name, "pbrf": x, "estimate": y})
            if trainer.loggers:
                fig = figures.scatter_figure(x, y, f"{name} vs PBRF", "PBRF response", name)
                media.log_figure(trainer.loggers, media_pbrf_scatter(name), fig, step=step)
        per_example_rows = []
        for j, idx in enumerate(result.train_indices.tolist()):
            row: dict[str, Any] = {"train_index": int(idx)}
            for name, vals in result.per_example.items():
                row[f"pearson_{name}"] = vals["pearson"][j]
                row[f"spearman_{name}"] = vals["spearman"][j]
            row["converged"] = result.certificates[j]["converged"]
            row["relative_grad_norm"] = result.certificates[j]["relative_grad_norm"]
            per_example_rows.append(row)
        return {
            "verdict": result.verdict,
            "correlations": result.correlations,
            "scatter": scatter,
            "per_example": per_example_rows,
            "summary": result.metrics(),
            "config": result.config,
            "train_indices": result.train_indices.tolist(),
            "query_indices": result.query_indices.tolist(),
        }
