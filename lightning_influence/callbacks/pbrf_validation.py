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
    check_strategy,
    log_scalars,
    make_reduce_fn,
    output_dir,
    rank_world,
    resolve_data,
    unwrap_module,
)
from lightning_influence.distributed import global_sample_indices, shard_indices
from lightning_influence.operators import make_batches
from lightning_influence.params import num_parameters, trainable_parameters
from lightning_influence.pbrf import PBRF, PBRFResult
from lightning_influence.stats import correlation_table
from lightning_influence.stats import verdict as _verdict
from lightning_influence.tasks import Task

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["PBRFValidation", "PBRFValidationResult", "correlation_table"]

_ADD_REPORT = "add InfluenceReport(...) before PBRFValidation in callbacks"


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
        """``pbrf/pearson_<estimator>``, ``pbrf/spearman_<estimator>``, convergence summaries."""
        out: dict[str, float] = {}
        for row in self.correlations:
            out[f"{prefix}pearson_{row['estimator']}"] = float(row["pearson"])
            out[f"{prefix}spearman_{row['estimator']}"] = float(row["spearman"])
        conv = [bool(c["converged"]) for c in self.certificates]
        out[f"{prefix}converged_fraction"] = float(sum(conv)) / max(len(conv), 1)
        out[f"{prefix}max_relative_grad_norm"] = max((float(c["relative_grad_norm"]) for c in self.certificates),
                                                     default=0.0)
        return out


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
    full passes over the training set (typically 20-100 passes per solve); keep ``num_train`` small on large data.

    Args:
        task: The task (same as InfluenceReport's).
        num_train: Training examples validated (two PBO solves each); clipped to those the report scored.
        num_queries: Queries per training example; clipped to the report's queries.
        epsilon: :math:`\epsilon > 0` of the PBO; default :math:`1/N` (upweighting by one example).
        damping: :math:`\lambda` of the proximity term and of the exact influence; default: InfluenceReport's.
        seed: Seed of the example/query draw.
        optimizer: PBO optimiser, ``"newton_cg"`` (default, Gauss-Newton-CG) or ``"lbfgs"``.
        tol: Relative gradient-norm tolerance of each PBO solve.
        max_iter: Optimiser iterations per solve.
        exact_max_params: Compute the exact damped-GNH influence when the model has at most this many
            parameters (``0`` disables it; the dense GNH costs about :math:`N K P^2` flops for :math:`N` training
            examples with :math:`K` outputs).
        batch_size: Examples per batch of the PBO data term.
        subdir: Report directory under the log dir (InfluenceReport's report, ``"influence"``).

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
        >>> cb.num_train, cb.epsilon
        (5, None)
    """

    def __init__(
        self,
        task: Task,
        num_train: int = 20,
        num_queries: int = 10,
        epsilon: float | None = None,
        damping: float | None = None,
        seed: int = 0,
        optimizer: str = "newton_cg",
        tol: float = 1e-5,
        max_iter: int = 500,
        exact_max_params: int = 1000,
        batch_size: int = 512,
        subdir: str = "influence",
    ) -> None:
        super().__init__()
        for name, value in (("num_train", num_train), ("num_queries", num_queries), ("max_iter", max_iter),
                            ("batch_size", batch_size)):
            if int(value) < 1:
                raise MisconfigurationError(f"PBRFValidation: {name} must be >= 1, got {value}.")
        if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
            raise MisconfigurationError(
                f"PBRFValidation: epsilon must be > 0 (the PBRF up/down-weights by ±epsilon), got {epsilon}; "
                "leave it None for 1/N."
            )
        if damping is not None and not damping > 0:
            raise MisconfigurationError(f"PBRFValidation: damping must be > 0, got {damping}; None uses the report's.")
        if not tol > 0:
            raise MisconfigurationError(f"PBRFValidation: tol must be > 0, got {tol}.")
        if optimizer not in ("lbfgs", "newton_cg"):
            raise MisconfigurationError(f"PBRFValidation: optimizer must be 'lbfgs' or 'newton_cg', got {optimizer!r}.")
        if exact_max_params < 0:
            raise MisconfigurationError(f"PBRFValidation: exact_max_params must be >= 0, got {exact_max_params}.")
        self.task = task
        self.num_train = int(num_train)
        self.num_queries = int(num_queries)
        self.epsilon = epsilon
        self.damping = damping
        self.seed = int(seed)
        self.optimizer = optimizer
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.exact_max_params = int(exact_max_params)
        self.batch_size = int(batch_size)
        self.subdir = subdir
        #: The last validation (``None`` before ``on_train_end``; not returned to the parent under ``ddp_spawn``).
        self.result: PBRFValidationResult | None = None

    # ------------------------------------------------------------------------------------------- setup
    def _influence_report(self, trainer: pl.Trainer) -> Any:
        callbacks = list(getattr(trainer, "callbacks", []))
        try:
            from lightning_influence.callbacks.influence_report import (  # type: ignore[import-not-found,unused-ignore]
                InfluenceReport,
            )

            found = [i for i, cb in enumerate(callbacks) if isinstance(cb, InfluenceReport)]
        except ImportError:  # pragma: no cover - the influence callback is part of the package
            found = [i for i, cb in enumerate(callbacks) if type(cb).__name__ == "InfluenceReport"]
        if not found:
            raise MisconfigurationError(
                f"PBRFValidation validates InfluenceReport's scores but the Trainer has no InfluenceReport: "
                f"{_ADD_REPORT}."
            )
        me = next((i for i, cb in enumerate(callbacks) if cb is self), None)
        if me is not None and found[0] > me:
            raise MisconfigurationError(
                "PBRFValidation comes before InfluenceReport in callbacks, so the scores would not exist yet when it "
                f"runs (both use on_train_end): {_ADD_REPORT}."
            )
        return callbacks[found[0]]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "PBRFValidation")
        self._influence_report(trainer)

    # -------------------------------------------------------------------------------------- validation
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = self._influence_report(trainer)
        inf = getattr(report, "result", None)
        if inf is None:
            raise MisconfigurationError(
                "PBRFValidation found no influence scores to validate: InfluenceReport.result is None (it did not "
                f"run, or failed). {_ADD_REPORT[0].upper()}{_ADD_REPORT[1:]} and make sure it runs at train end."
            )
        start = time.perf_counter()
        result = self.validate(trainer, pl_module, report, inf)
        result.config["seconds"] = time.perf_counter() - start
        self.result = result
        step = int(trainer.global_step)
        log_scalars(trainer, result.metrics(), step)
        directory = output_dir(trainer, self.subdir)  # all ranks (broadcast + barrier)
        if trainer.is_global_zero:
            self._publish(trainer, result, directory, step)
        trainer.strategy.barrier("lightning_influence.pbrf_validation")

    def validate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: Any, inf: Any
    ) -> PBRFValidationResult:
        """Compute the PBRF table for the report's scores ``inf`` (an ``InfluenceResult``); all ranks call this.

        Returns:
            The :class:`PBRFValidationResult` (identical on every rank).

        Raises:
            MisconfigurationError: If the report's result has no scores or no usable damping.
        """
        from lightning_influence.influence import InfluenceConfig, gradient_dot_scores, influence_scores

        scores: Tensor = inf.scores.detach().cpu()
        if scores.ndim != 2 or scores.numel() == 0:
            raise MisconfigurationError(
                f"PBRFValidation found no influence scores to validate (shape {tuple(scores.shape)}): {_ADD_REPORT}."
            )
        cfg = dict(getattr(inf, "config", {}) or {})
        report_solver = str(cfg.get("solver", getattr(report, "solver", "influence")))
        damping = float(self.damping if self.damping is not None else cfg.get("damping", math.nan))
        if not (math.isfinite(damping) and damping > 0):
            raise MisconfigurationError(
                f"PBRFValidation needs damping > 0 for the PBRF proximity term; InfluenceReport used {damping}. Pass "
                "damping=... to PBRFValidation."
            )
        normalization = str(cfg.get("normalization", "sum"))
        rank, world = rank_world(trainer)
        reduce_fn = make_reduce_fn(trainer)
        module = unwrap_module(pl_module)

        train = resolve_data(trainer, getattr(report, "train_data", "train"), "PBRFValidation")
        query = resolve_data(trainer, getattr(report, "query_data", "val"), "PBRFValidation")
        collate = train.collate_fn
        # Columns / rows of the report's score matrix to validate (seeded: identical on every rank).
        n_cols, n_rows = scores.shape[1], scores.shape[0]
        cols = global_sample_indices(n_cols, min(self.num_train, n_cols), seed=self.seed)
        rows = global_sample_indices(n_rows, min(self.num_queries, n_rows), seed=self.seed + 1)
        train_idx = torch.as_tensor(inf.train_indices).cpu()[cols]
        query_idx = torch.as_tensor(inf.query_indices).cpu()[rows]
        report_scores = scores[rows][:, cols].T.contiguous().double()  # (num_train, num_queries)

        # The PBO's data term: the same sample as the report's GNH (default: the whole training set), sharded.
        curv = getattr(inf, "diagnostics", {}).get("curvature_indices") if hasattr(inf, "diagnostics") else None
        curv_idx = torch.as_tensor(curv) if curv is not None else torch.arange(len(train.dataset))
        local = shard_indices(curv_idx, rank, world)
        data = make_batches(train.dataset, local, self.batch_size, collate) if len(local) else []
        pbrf = PBRF(module, self.task, data, damping=damping, epsilon=self.epsilon, reduce_fn=reduce_fn,
                    optimizer=self.optimizer, tol=self.tol, max_iter=self.max_iter,
                    normalization=normalization)
        query_batches = make_batches(query.dataset, query_idx, self.batch_size, query.collate_fn)
        responses: list[Tensor] = []
        certificates: list[dict[str, Any]] = []
        for i in train_idx.tolist():
            example = make_batches(train.dataset, [i], 1, collate)[0]
            res: PBRFResult = pbrf.response(example, queries=query_batches)
            responses.append(res.response.cpu())
            cert = res.to_dict()
            cert.pop("response")
            cert["train_index"] = int(i)
            certificates.append(cert)
        pbrf_matrix = torch.stack(responses)

        estimates: dict[str, Tensor] = {report_solver: report_scores}
        model64 = pbrf.model  # float64 copy at the trained weights (restored after every PBO measurement)
        common: dict[str, Any] = {"train_indices": train_idx, "query_indices": query_idx, "collate_fn": collate}
        p = num_parameters(trainable_parameters(module))
        if report_solver != "exact" and p <= self.exact_max_params:
            base = {k: v for k, v in cfg.items() if k in InfluenceConfig.__dataclass_fields__}
            base.update(solver="exact", damping=damping, self_influence=False, dtype="float64")
            exact = influence_scores(
                model64, self.task, train.dataset, query.dataset, config=InfluenceConfig(**base),
                curvature_indices=curv_idx if curv is not None else None, reduce_fn=reduce_fn, rank=rank,
                world_size=world, query_collate_fn=query.collate_fn, **common,
            )
            estimates["exact"] = exact.scores.detach().cpu().T.double()
        gd = gradient_dot_scores(model64, self.task, train.dataset, query.dataset, normalization=normalization,
                                 **common)
        estimates["gradient_dot"] = gd.detach().cpu().T.double()

        table, per_example = correlation_table(pbrf_matrix, estimates)
        converged = all(c["converged"] for c in certificates)
        config = {
            **pbrf.to_dict(),
            "report_solver": report_solver,
            "report_damping": cfg.get("damping"),
            "num_train": len(train_idx),
            "num_queries": len(query_idx),
            "seed": self.seed,
            "world_size": world,
            "num_params": p,
            "exact_computed": "exact" in estimates,
        }
        return PBRFValidationResult(
            train_indices=train_idx,
            query_indices=query_idx,
            pbrf=pbrf_matrix,
            estimates=estimates,
            correlations=table,
            per_example=per_example,
            certificates=certificates,
            verdict=_verdict(table, report_solver, converged),
            config=config,
        )

    # ---------------------------------------------------------------------------------------- outputs
    def _publish(self, trainer: pl.Trainer, result: PBRFValidationResult, directory: Any, step: int) -> None:
        from lightning_influence.reporting import figures, media
        from lightning_influence.reporting.store import ReportStore

        columns = ["estimator", "pearson", "spearman", "pearson_median_per_example", "spearman_median_per_example",
                   "n"]
        media.log_table(trainer.loggers, "pbrf/correlations", columns,
                        [[row[c] for c in columns] for row in result.correlations], step=step)
        media.log_text(trainer.loggers, "pbrf/verdict", result.verdict, step=step)
        x = result.pbrf.flatten().tolist()
        scatter = []
        for name, est in result.estimates.items():
            y = est.flatten().tolist()
            scatter.append({"estimator": name, "pbrf": x, "estimate": y})
            if trainer.loggers:
                fig = figures.scatter_figure(x, y, f"{name} vs PBRF", "PBRF response", name)
                media.log_figure(trainer.loggers, f"pbrf/scatter_{name}", fig, step=step)
        per_example_rows = []
        for j, idx in enumerate(result.train_indices.tolist()):
            row: dict[str, Any] = {"train_index": int(idx)}
            for name, vals in result.per_example.items():
                row[f"pearson_{name}"] = vals["pearson"][j]
                row[f"spearman_{name}"] = vals["spearman"][j]
            row["converged"] = result.certificates[j]["converged"]
            row["relative_grad_norm"] = result.certificates[j]["relative_grad_norm"]
            per_example_rows.append(row)
        ReportStore(directory).update("pbrf", {
            "verdict": result.verdict,
            "correlations": result.correlations,
            "scatter": scatter,
            "per_example": per_example_rows,
            "summary": {k: v for k, v in result.metrics().items()},
            "config": result.config,
            "train_indices": result.train_indices.tolist(),
            "query_indices": result.query_indices.tolist(),
        })
