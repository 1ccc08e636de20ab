"""InfluenceReport: which training examples drove which predictions, computed when training ends."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_influence.callbacks._common import (
    MisconfigurationError,
    ResolvedData,
    RunContext,
    check_before_training,
    check_choice,
    check_damping,
    check_data_available,
    check_dataset,
    check_int,
    check_picklable_datasets,
    check_strategy,
    check_task,
    config_field,
    find_callback,
    output_dir,
    publish,
    resolve_config,
    resolve_data,
    sample_indices,
    unwrap_module,
)
from lightning_influence.callbacks._loss import check_loss_matches
from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
from lightning_influence.data import prepare_batch
from lightning_influence.evaluator import curvature_mode
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.influence import InfluenceConfig, InfluenceResult, influence_scores, projected_cost
from lightning_influence.metrics import (
    MEDIA_INFLUENCE_SCORES,
    MEDIA_INFLUENCE_SELF_INFLUENCE,
    MEDIA_INFLUENCE_SELF_INFLUENCE_HIST,
    MEDIA_INFLUENCE_SOLVER_CONVERGENCE,
    MEDIA_INFLUENCE_SUMMARY,
    MEDIA_INFLUENCE_TOP_K,
)
from lightning_influence.params import isolated_rng
from lightning_influence.progress import StageProgress, cost_budget, stage_progress, warn_projected_cost
from lightning_influence.spectrum import SpectrumSummary
from lightning_influence.tasks import Task

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["RESULT_FILE", "InfluenceReport"]

_WHO = "InfluenceReport"

#: File (in the report directory) holding the whole :class:`InfluenceResult`; ``scores.pt`` holds the bare
#: ``(n_query, n_train)`` score tensor.
RESULT_FILE = "influence_result.pt"

_DAMPING_FIX = ("the GNH of a network is singular, so the undamped inverse does not exist. Try 1e-3 (or your L2 "
                "coefficient).")


class InfluenceReport(Callback):
    r"""Influence of training examples on query predictions, at the end of training.

    At ``on_train_end`` it computes :math:`\mathcal I(z, q) = -\nabla\ell(q)^\top (G+\lambda I)^{-1}\nabla\ell(z)`
    for every scored training example :math:`z` and query :math:`q` with
    :func:`~lightning_influence.influence.influence_scores` (sign convention there: **negative = proponent**,
    upweighting :math:`z` lowers the query loss; positive = opponent), the self-influence of every scored training
    example (mislabel detection), and the solver's certificate. The iHVP is solved for the ``k`` query gradients
    (Fisher-CG on the whole training set, auto-tuned LiSSA, or an exact dense solve for tiny models); training
    gradients are streamed in chunks.

    **Distributed.** Curvature products and training examples are sharded over the data-parallel ranks
    (``trainer.distributed_sampler_kwargs``) on the unwrapped module, with one sum-reduction per product; every
    rank computes the same result. Rank 0 writes the files and calls the loggers.

    **LiSSA settings** come from a :class:`~lightning_influence.callbacks.curvature_monitor.CurvatureMonitor` in
    ``trainer.callbacks`` (its ``latest`` spectrum, re-derived for this callback's damping) when there is one,
    otherwise the spectrum is measured on the spot.

    **Outputs** in ``<log_dir>/influence/``: ``scores.pt`` (the ``(n_query, n_train)`` score tensor),
    ``influence_result.pt`` (the whole :class:`InfluenceResult` with indices, self-influence, certificate and
    config; read back with :meth:`load_result`; with ``ddp_spawn`` these files and ``trainer.callback_metrics`` are
    how the parent process gets the result), and the ``"influence"`` section of ``report.json`` /
    ``report.html`` (config, versions, solver certificate and convergence history, top proponents/opponents per
    query, drawn as images when the inputs are images, self-influence ranking and histogram). TensorBoard gets a
    Markdown summary, histograms of scores and self-influence, and figures; W&B gets the same plus a top-k table.
    ``self.result`` keeps the :class:`InfluenceResult` in the training process (read by ``PBRFValidation``).

    Args:
        task: The task (how batches become ``(outputs, targets)``).
        query_data: ``"val"`` (default), ``"train"`` or a map-style dataset.
        query_indices: Which queries of ``query_data`` (default: all, capped by ``max_queries``).
        train_data: ``"train"`` (default) or a map-style dataset; its GNH is the curvature.
        solver: ``"auto"``, ``"cg"``, ``"pcg"``, ``"lowrank"``, ``"lissa"`` or ``"exact"`` (``None``: the config's,
            ``"auto"`` by default: the exact dense solve or PCG, whichever a FLOP count projects to be cheaper; see
            :class:`~lightning_influence.influence.InfluenceConfig`).
        damping: :math:`\lambda > 0` or ``"auto"`` (``None``: the config's, ``"auto"`` by default:
            ``damping_fraction = 1e-3`` times :math:`\lambda_{\max}`, taken from the ``CurvatureMonitor``'s last
            spectrum when there is one, else measured by a short Lanczos run). The value used is logged as
            ``influence/damping``.
        top_k: Proponents/opponents per query in the report (``None``: the config's, 10 by default).
        max_train: Score a seeded random subset of this many training examples (default: all).
        curvature_sample: Form the curvature from a seeded random subset of this many training examples (default:
            the whole training set). The setting that makes the solve cheaper on a large training set: the dense
            exact solve and every curvature product cost in proportion to it.
        max_queries: Cap on the number of queries (seeded random subset, default 100).
        self_influence: Compute self-influence (``None``: the config's, ``False`` by default; for iterative solvers
            it costs ``n_train / n_query`` query solves).
        images: Draw inputs as images in the report: ``None`` (default) detects ``HxW``/``CxHxW`` inputs,
            ``True`` also treats flat square vectors (e.g. 8x8 digits as 64 features) as images, ``False`` never.
        progress_bar: Show a tqdm bar with ETA over the chunks of training gradients on rank 0 (default ``True``;
            off when the Trainer has no progress bar).
        store: Where every scored chunk is written as ``.npy`` files
            (:class:`~lightning_influence.influence.store.ScoreStore`): ``True`` (default)
            ``<log_dir>/<subdir>/store``, a directory, or ``False`` (in memory only). A re-run on the same store
            with the same config and weights (e.g. ``lightning-influence influence --ckpt ...`` after a killed run)
            skips the chunks already there; another config starts fresh with a warning.
        config: Every :class:`~lightning_influence.influence.InfluenceConfig` setting (default
            ``InfluenceConfig()``). The explicit arguments above that are not ``None`` replace its fields;
            ``cb.config`` is the resolved config, written beside the result.
        seed: Seed of the subset draws and of LiSSA's batches (``None``: the config's, 0 by default).
        subdir: Output sub-directory of the log dir (default ``"influence"``).

    Raises:
        MisconfigurationError: For a bad argument (here); in ``setup`` for an unsupported strategy or missing
            train/query data (e.g. ``query_data="val"`` without a val dataloader), before training starts (for
            dataloaders passed to ``trainer.fit`` directly, which Lightning attaches later, in ``on_train_start``,
            still before the first step); when training ends for an empty query set, or a damping that leaves the
            curvature singular/indefinite.

    Logged metrics (at ``trainer.global_step`` when training ends, also in ``trainer.callback_metrics``):

    * ``influence/solver_residual``: the solver's relative residual (LiSSA: on a held-out sample).
    * ``influence/solver_iterations``: CG iterations / LiSSA steps / 1 for the exact solve.
    * ``influence/solver_converged``, ``influence/solver_diverged``: 0/1 flags.
    * ``influence/num_products``: curvature products of the query solve.
    * ``influence/gradient_equivalents``: per-example gradients plus per-example curvature products.
    * ``influence/seconds``: wall time.
    * ``influence/num_train``, ``influence/num_queries``: sizes of the score matrix.
    * ``influence/score_abs_mean``: mean :math:`|\mathcal I|`.
    * ``influence/self_influence_mean``, ``influence/self_influence_max``: when self-influence is computed.

    Media: text ``influence/summary``, histograms ``influence/scores`` and ``influence/self_influence``, figures
    ``influence/solver_convergence`` and ``influence/self_influence_hist``, W&B table ``influence/top_k``; report
    section ``"influence"``.

    Example::

        >>> from lightning_influence.tasks import Classification
        >>> cb = InfluenceReport(Classification(), query_data="val", solver="cg", damping=1e-3, top_k=5)
        >>> cb.config.solver, cb.config.top_k
        ('cg', 5)
        >>> InfluenceReport(Classification(), config=InfluenceConfig(solver="lissa")).solver   # the config's
        'lissa'
    """

    solver: str = config_field()
    damping: float | Literal["auto"] = config_field()
    top_k: int = config_field()
    self_influence: bool = config_field()
    seed: int = config_field()

    def __init__(
        self,
        task: Task,
        query_data: str | Any = "val",
        *,
        query_indices: Sequence[int] | None = None,
        train_data: str | Any = "train",
        solver: str | None = None,
        damping: float | Literal["auto"] | None = None,
        top_k: int | None = None,
        max_train: int | None = None,
        max_queries: int | None = 100,
        curvature_sample: int | None = None,
        self_influence: bool | None = None,
        images: bool | None = None,
        progress_bar: bool = True,
        config: InfluenceConfig | None = None,
        seed: int | None = None,
        subdir: str = "influence",
        store: bool | str | Path = True,
    ) -> None:
        super().__init__()
        self.task = check_task(task, _WHO)
        self.query_data = check_dataset(_WHO, "query_data", query_data, ("val", "train"))
        self.train_data = check_dataset(_WHO, "train_data", train_data, ("train",))
        if query_indices is not None and len(query_indices) == 0:
            raise MisconfigurationError(f"{_WHO}: query_indices is empty; pass at least one query index.")
        self.query_indices = None if query_indices is None else [int(i) for i in query_indices]
        self.max_train = check_int(_WHO, "max_train", max_train, allow_none=True)
        self.max_queries = check_int(_WHO, "max_queries", max_queries, allow_none=True)
        self.curvature_sample = check_int(_WHO, "curvature_sample", curvature_sample, allow_none=True)
        if solver is not None:
            check_choice(_WHO, "solver", solver, InfluenceConfig.SOLVERS)
        check_damping(_WHO, "damping", damping, fix=_DAMPING_FIX)
        check_int(_WHO, "top_k", top_k, 0, allow_none=True)
        #: The resolved settings (:class:`~lightning_influence.influence.InfluenceConfig`).
        self.config = resolve_config(_WHO, InfluenceConfig, config, InfluenceConfig(), solver=solver,
                                     damping=damping, top_k=top_k, self_influence=self_influence, seed=seed)
        check_damping(_WHO, "damping", self.config.damping, allow_none=False, fix=_DAMPING_FIX)  # config's may be 0
        self.images = images
        self.progress_bar = progress_bar
        self.subdir = subdir
        if not isinstance(store, (bool, str, Path)):
            raise MisconfigurationError(f"{_WHO}: store must be True, False or a directory, got {store!r}.")
        self.store = store
        #: The last :class:`InfluenceResult` (``None`` until training ends; not returned across ``ddp_spawn``).
        self.result: InfluenceResult | None = None
        #: Where ``scores.pt`` was written (all ranks know it; the full result is beside it).
        self.scores_path: Path | None = None
        self._unchecked: list[Any] = []  # data setup() could not resolve yet (checked again in on_train_start)
        #: The train-start cost projection (:func:`~lightning_influence.influence.projected_cost`; rank 0 only).
        self.projected: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (``ddp_spawn`` starts its workers): a dataset that cannot travel is a clear error here, first."""
        return check_picklable_datasets(_WHO, self.__dict__.copy(), ("query_data", "train_data"))

    # ---------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, _WHO)
        # Loaders passed to trainer.fit() directly are attached only when the fit loop starts: check those then.
        self._unchecked = [w for w in (self.train_data, self.query_data) if not check_data_available(trainer, w, _WHO)]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_loss_matches(trainer, pl_module, self.task, _WHO)
        # data passed to fit() directly (unresolvable in setup) and the model on the data: before the first step
        check_before_training(trainer, pl_module, self, self.task, [self.train_data, self.query_data], _WHO)
        self._unchecked = []
        if trainer.is_global_zero:
            self._warn_projected_cost(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctx = RunContext.from_trainer(trainer, pl_module, _WHO)
        train, query = ctx.resolve(self.train_data), ctx.resolve(self.query_data)
        t_idx, q_idx = self._select(len(train.dataset), len(query.dataset), query.source)
        c_idx = self._curvature_indices(len(train.dataset))
        spectrum = self._monitor_spectrum(trainer)
        store = self._store_dir(trainer)
        bar = self._progress(trainer, len(t_idx))
        try:
            result = influence_scores(
                ctx.module, self.task, train.dataset, query.dataset, config=self.config, train_indices=t_idx,
                query_indices=q_idx, curvature_indices=c_idx, spectrum=spectrum, collate_fn=train.collate_fn,
                query_collate_fn=query.collate_fn, reduce_fn=ctx.reduce_fn, rank=ctx.rank, world_size=ctx.world_size,
                progress=bar, store=store,
            )
        except ConfigurationError as err:
            if isinstance(err, MisconfigurationError):
                raise
            raise MisconfigurationError(f"{_WHO}: {err}") from err
        finally:
            bar.close()
        result.diagnostics.update(train_source=train.source, query_source=query.source,
                                  spectrum_source="CurvatureMonitor" if spectrum is not None else None)
        self.result = result
        directory = publish(trainer, who=_WHO, step=ctx.step, metrics=result.metrics(), subdir=self.subdir,
                            section="influence",
                            content=lambda d: self._publish(trainer, ctx.module, result, d, train, query, ctx.step))
        assert directory is not None
        self.scores_path = directory / "scores.pt"

    def _curvature_indices(self, n_train: int) -> Tensor | None:
        """The seeded curvature sample (``None``: the whole training set)."""
        if self.curvature_sample is None or self.curvature_sample >= n_train:
            return None
        return sample_indices(n_train, self.curvature_sample, self.seed, "curvature")

    def _warn_projected_cost(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the first step: warn when the train-end computation projects above the cost budget."""
        train, query = resolve_data(trainer, self.train_data, _WHO), resolve_data(trainer, self.query_data, _WHO)
        if train is None or query is None or len(query.dataset) == 0:
            return
        t_idx, q_idx = self._select(len(train.dataset), len(query.dataset), query.source)
        c_idx = self._curvature_indices(len(train.dataset))
        try:
            with isolated_rng():
                cost = projected_cost(
                    unwrap_module(pl_module), self.task, train.dataset, query.dataset, config=self.config,
                    train_indices=t_idx, query_indices=q_idx, curvature_indices=c_idx,
                    spectrum=self._monitor_spectrum(trainer), collate_fn=train.collate_fn,
                    query_collate_fn=query.collate_fn,
                )
        except Exception as err:  # pragma: no cover - advisory only: the data were checked just before
            rank_zero_warn(f"{_WHO}: could not project the train-end cost ({type(err).__name__}: {err}); training "
                           "goes on, the report runs at train end as configured.")
            return
        self.projected = cost
        warn_projected_cost(
            f"{_WHO}: solver={cost['solver']!r} for {int(q_idx.numel())} queries, {int(t_idx.numel())} scored "
            f"examples and a curvature of {len(train.dataset) if c_idx is None else int(c_idx.numel())} examples "
            "(a FLOP count)",
            "pass curvature_sample=<n> (a seeded subset of the training set as curvature), fewer queries "
            "(max_queries), max_train, or solver='lowrank' (a fixed sketch, no products per query).",
            passes=cost["passes"], budget=cost_budget(trainer), stacklevel=4,
        )

    def _select(self, n_train: int, n_query: int, query_source: str) -> tuple[Tensor, Tensor]:
        """The scored training examples and the queries (seeded, identical on every rank)."""
        if n_query == 0:
            raise MisconfigurationError(
                f"{_WHO}: the query set ({query_source}) is empty; pass query_data=<dataset> or indices."
            )
        if self.query_indices is not None:
            q_idx = torch.as_tensor(self.query_indices, dtype=torch.long)
            if int(q_idx.min()) < 0 or int(q_idx.max()) >= n_query:
                raise MisconfigurationError(f"{_WHO}: query_indices must lie in [0, {n_query}).")
        else:
            q_idx = sample_indices(n_query, self.max_queries, self.seed, "queries")
        return sample_indices(n_train, self.max_train, self.seed), q_idx

    # -------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def load_result(path: str | Path) -> InfluenceResult:
        """Read the full result (``influence_result.pt``, or the report directory holding it).

        Use it e.g. in the parent process after ``ddp_spawn``, where ``self.result`` stays ``None``.

        Returns:
            The :class:`InfluenceResult`.
        """
        p = Path(path)
        return InfluenceResult.load(p / RESULT_FILE if p.is_dir() else p)

    @staticmethod
    def _monitor_spectrum(trainer: pl.Trainer) -> SpectrumSummary | None:
        """The latest measurement of a :class:`CurvatureMonitor` in the callbacks, if usable (it ran in training)."""
        monitor = find_callback(trainer, CurvatureMonitor)
        latest = monitor.latest if monitor is not None else None
        if isinstance(latest, SpectrumSummary) and math.isfinite(latest.trace) and latest.lambda_max > 0:
            return latest
        return None

    def _progress(self, trainer: pl.Trainer, total: int) -> StageProgress:
        return stage_progress(trainer, total, "InfluenceReport: training gradients", enabled=self.progress_bar)

    def _store_dir(self, trainer: pl.Trainer) -> Path | None:
        """The score store directory (all ranks call it: :func:`output_dir` is a collective), ``None`` if off."""
        if self.store is False:
            return None
        if self.store is True:
            return output_dir(trainer, self.subdir) / "store"
        return Path(self.store)

    @staticmethod
    def _example(dataset: Any, index: int) -> tuple[Any, Any]:
        try:
            ex = dataset[index]
        except Exception:  # pragma: no cover - exotic datasets
            return None, None
        if isinstance(ex, (tuple, list)) and len(ex) == 2:
            return ex[0], ex[1]
        return ex, None

    @staticmethod
    def _plain(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.item() if value.numel() == 1 else None
        return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)

    def _predictions(self, module: torch.nn.Module, query: ResolvedData, indices: Tensor) -> list[Any]:
        """Predicted class (argmax, or ``logit > 0`` for one output) per query; ``None`` where there is none."""
        from lightning_influence.data import DataSource

        first = next(module.parameters())
        preds: list[Any] = []
        try:
            batches = DataSource(query.dataset, indices, batch_size=256, collate_fn=query.collate_fn).batches()
            with torch.no_grad(), curvature_mode(module):
                for batch in batches:
                    out, _ = self.task(module, prepare_batch(batch, first.device), validate=False)
                    if out.ndim == 2 and out.shape[1] > 1:
                        preds += out.argmax(1).tolist()
                    elif out.ndim <= 2 and out.reshape(len(out), -1).shape[1] == 1:
                        preds += (out.reshape(-1) > 0).long().tolist()
                    else:
                        preds += [None] * len(out)
        except Exception:  # pragma: no cover - custom tasks: predictions are optional decoration
            preds = [None] * len(indices)
        return preds

    def _query_entries(
        self, module: torch.nn.Module, result: InfluenceResult, top: Any, train: ResolvedData, query: ResolvedData,
    ) -> tuple[list[dict[str, Any]], list[Any], dict[str, Any]]:
        """Per query: label, prediction, loss, top proponents/opponents; plus the query and training images."""
        from lightning_influence.reporting.figures import image_payload

        preds = self._predictions(module, query, result.query_indices)
        want_images, flat_ok = self.images is not False, bool(self.images)
        queries, query_images, train_images = [], [], {}
        for i, q in enumerate(result.query_indices.tolist()):
            xq, yq = self._example(query.dataset, q)
            entry: dict[str, Any] = {"index": q, "label": self._plain(yq), "prediction": preds[i],
                                     "loss": float(result.query_losses[i])}
            for kind, idx, sc in (("proponents", top.proponents, top.proponent_scores),
                                  ("opponents", top.opponents, top.opponent_scores)):
                rows = []
                for j, s in zip(idx[i].tolist(), sc[i].tolist(), strict=True):
                    xt, yt = self._example(train.dataset, j)
                    rows.append({"index": j, "score": s, "label": self._plain(yt)})
                    if want_images and str(j) not in train_images:
                        img = image_payload(xt, allow_flat_square=flat_ok)
                        if img is not None:
                            train_images[str(j)] = img
                entry[kind] = rows
            queries.append(entry)
            if want_images:
                query_images.append(image_payload(xq, allow_flat_square=flat_ok))
        return queries, query_images, train_images

    def _publish(self, trainer: pl.Trainer, module: torch.nn.Module, result: InfluenceResult, directory: Path | None,
                 train: ResolvedData, query: ResolvedData, step: int) -> dict[str, Any]:
        """Rank 0: save the result and the score tensor, log the media; return the ``"influence"`` section."""
        from lightning_influence.reporting import ReportStore

        assert directory is not None
        result.save(directory / RESULT_FILE)
        ReportStore(directory, render=False).save_tensor("scores", result.scores, section="influence")
        top = result.top_k()
        queries, query_images, train_images = self._query_entries(module, result, top, train, query)
        section: dict[str, Any] = {
            "config": {**result.config, "num_train": int(result.scores.shape[1]),
                       "num_queries": int(result.scores.shape[0]), "world_size": result.diagnostics.get("world_size"),
                       "train_data": train.source, "query_data": query.source,
                       "max_train": self.max_train, "max_queries": self.max_queries,
                       "sign_convention": "I(z,q) = -grad l(q)^T (G + damping I)^-1 grad l(z); negative = proponent"},
            "solver": {**result.solve, "seconds": result.diagnostics.get("seconds")},
            "queries": queries,
            "summary": {k.split("/", 1)[1]: v for k, v in result.metrics().items()},
            "diagnostics": {k: v for k, v in result.diagnostics.items() if k != "curvature_indices"},
        }
        if query_images and all(img is not None for img in query_images):
            section["query_images"] = query_images
        if train_images:
            section["train_images"] = train_images
        if result.self_influence is not None:
            section["self_influence"] = {
                "values": result.self_influence.tolist(),
                "indices": result.train_indices.tolist(),
                "labels": [self._plain(self._example(train.dataset, int(j))[1])
                           for j in result.train_indices.tolist()],
            }
        if not result.solve.get("converged", True):
            section["notes"] = [f"The {result.solve.get('method')} solver did not meet its tolerance (relative "
                                f"residual {result.solve.get('relative_residual')}); treat the scores with care."]
        self._log_media(trainer, result, top, step)
        return section

    @staticmethod
    def _log_media(trainer: pl.Trainer, result: InfluenceResult, top: Any, step: int) -> None:
        if not trainer.loggers:
            return
        try:
            from lightning_influence.reporting import media
            from lightning_influence.reporting.figures import convergence_figure, histogram_figure
        except ImportError as err:  # pragma: no cover
            rank_zero_warn(f"{_WHO}: could not log media ({err}).")
            return
        loggers = trainer.loggers
        s = result.solve
        text = (f"**InfluenceReport** ({s.get('method')}, damping={result.config.get('damping')}): "
                f"{result.scores.shape[0]} queries x {result.scores.shape[1]} training examples; "
                f"{s.get('iterations')} iterations, relative residual {s.get('relative_residual')}, "
                f"converged={s.get('converged')}, diverged={s.get('diverged')}; "
                f"{result.diagnostics.get('gradient_equivalents')} gradient-equivalents in "
                f"{result.diagnostics.get('seconds', 0.0):.2f} s. Sign: negative score = proponent.")
        media.log_text(loggers, MEDIA_INFLUENCE_SUMMARY, text, step=step)
        media.log_histogram(loggers, MEDIA_INFLUENCE_SCORES, result.scores.flatten(), step=step)
        if s.get("history"):
            media.log_figure(loggers, MEDIA_INFLUENCE_SOLVER_CONVERGENCE,
                             convergence_figure(list(s["history"]), f"{s.get('method')} residual"), step=step)
        if result.self_influence is not None and result.self_influence.numel():
            media.log_histogram(loggers, MEDIA_INFLUENCE_SELF_INFLUENCE, result.self_influence, step=step)
            media.log_figure(loggers, MEDIA_INFLUENCE_SELF_INFLUENCE_HIST,
                             histogram_figure(result.self_influence.tolist(), "self-influence", "self-influence"),
                             step=step)
        rows = []
        for i, q in enumerate(result.query_indices.tolist()):
            for r, (j, sc) in enumerate(zip(top.proponents[i].tolist(), top.proponent_scores[i].tolist(),
                                            strict=True)):
                rows.append([q, "proponent", r + 1, j, sc])
            for r, (j, sc) in enumerate(zip(top.opponents[i].tolist(), top.opponent_scores[i].tolist(),
                                            strict=True)):
                rows.append([q, "opponent", r + 1, j, sc])
        media.log_table(loggers, MEDIA_INFLUENCE_TOP_K, ["query", "kind", "rank", "train_index", "score"], rows,
                        step=step)
