"""InfluenceReport: which training examples drove which predictions, computed when training ends."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
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
from lightning_influence.distributed import global_sample_indices
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.influence import InfluenceConfig, InfluenceResult, influence_scores
from lightning_influence.spectrum import SpectrumSummary
from lightning_influence.tasks import Task

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["RESULT_FILE", "InfluenceReport"]

#: File (in the report directory) holding the whole :class:`InfluenceResult`; ``scores.pt`` holds the bare
#: ``(n_query, n_train)`` score tensor.
RESULT_FILE = "influence_result.pt"


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
        solver: ``"cg"`` (default), ``"lissa"`` or ``"exact"``.
        damping: :math:`\lambda > 0` (default ``1e-3``).
        top_k: Proponents/opponents per query in the report (default 10).
        max_train: Score a seeded random subset of this many training examples (default: all). The curvature
            always uses the whole training set.
        max_queries: Cap on the number of queries (seeded random subset, default 100).
        self_influence: Compute self-influence (default ``True``; for iterative solvers it costs
            ``n_train / n_query`` query solves).
        images: Draw inputs as images in the report: ``None`` (default) detects ``HxW``/``CxHxW`` inputs,
            ``True`` also treats flat square vectors (e.g. 8x8 digits as 64 features) as images, ``False`` never.
        progress_bar: Show a tqdm bar on rank 0 while training gradients stream (default ``True``; off when the
            Trainer has no progress bar).
        config: Any further :class:`~lightning_influence.influence.InfluenceConfig` settings (explicit arguments
            above take precedence).
        seed: Seed of the subset draws and of LiSSA's batches (default 0).
        subdir: Output sub-directory of the log dir (default ``"influence"``).

    Raises:
        MisconfigurationError: For a bad argument (here), an unsupported strategy or missing data (in ``setup``),
            an empty query set, or a damping that leaves the curvature singular/indefinite.

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

    Example::

        >>> from lightning_influence.tasks import Classification
        >>> cb = InfluenceReport(Classification(), query_data="val", solver="cg", damping=1e-3, top_k=5)
        >>> cb.config.solver, cb.config.top_k
        ('cg', 5)
    """

    def __init__(
        self,
        task: Task,
        query_data: str | Any = "val",
        *,
        query_indices: Sequence[int] | None = None,
        train_data: str | Any = "train",
        solver: str = "cg",
        damping: float = 1e-3,
        top_k: int = 10,
        max_train: int | None = None,
        max_queries: int | None = 100,
        self_influence: bool = True,
        images: bool | None = None,
        progress_bar: bool = True,
        config: InfluenceConfig | None = None,
        seed: int = 0,
        subdir: str = "influence",
    ) -> None:
        if not isinstance(task, Task):
            raise MisconfigurationError(f"InfluenceReport: task must be a lightning_influence Task, got {task!r}.")
        if isinstance(query_data, str) and query_data not in ("val", "train"):
            raise MisconfigurationError(f"InfluenceReport: query_data must be 'val', 'train' or a dataset, got "
                                        f"{query_data!r}.")
        if isinstance(train_data, str) and train_data != "train":
            raise MisconfigurationError(
                f"InfluenceReport: train_data must be 'train' or a dataset, got {train_data!r}."
            )
        if query_indices is not None and len(query_indices) == 0:
            raise MisconfigurationError("InfluenceReport: query_indices is empty; pass at least one query index.")
        for name, value in (("max_train", max_train), ("max_queries", max_queries)):
            if value is not None and value < 1:
                raise MisconfigurationError(f"InfluenceReport: {name} must be >= 1 or None, got {value}.")
        if not damping > 0:
            raise MisconfigurationError(
                f"InfluenceReport: damping must be > 0 (got {damping}); the GNH of a network is singular, so the "
                "undamped inverse does not exist. Try 1e-3 (or your L2 coefficient)."
            )
        try:
            cfg = InfluenceConfig(**{**(config.to_dict() if config else {}), "solver": solver, "damping": damping,
                                     "top_k": top_k, "self_influence": self_influence, "seed": seed})
            cfg.validate()
        except ConfigurationError as err:
            raise MisconfigurationError(f"InfluenceReport: {err}") from err
        self.task = task
        self.query_data = query_data
        self.query_indices = None if query_indices is None else [int(i) for i in query_indices]
        self.train_data = train_data
        self.solver = solver
        self.max_train = max_train
        self.max_queries = max_queries
        self.images = images
        self.progress_bar = progress_bar
        self.config = cfg
        self.seed = int(seed)
        self.subdir = subdir
        #: The last :class:`InfluenceResult` (``None`` until training ends; not returned across ``ddp_spawn``).
        self.result: InfluenceResult | None = None
        #: Where ``scores.pt`` was written (all ranks know it; the full result is beside it).
        self.scores_path: Path | None = None

    # ---------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "InfluenceReport")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = unwrap_module(pl_module)
        rank, world = rank_world(trainer)
        reduce_fn = make_reduce_fn(trainer)
        train = resolve_data(trainer, self.train_data, "InfluenceReport")
        query = resolve_data(trainer, self.query_data, "InfluenceReport")
        n_train, n_query = len(train.dataset), len(query.dataset)
        if n_query == 0 or (self.query_indices is not None and not self.query_indices):
            raise MisconfigurationError(
                f"InfluenceReport: the query set ({query.source}) is empty; pass query_data=<dataset> or indices."
            )
        if self.query_indices is not None:
            q_idx = torch.as_tensor(self.query_indices, dtype=torch.long)
            if int(q_idx.min()) < 0 or int(q_idx.max()) >= n_query:
                raise MisconfigurationError(f"InfluenceReport: query_indices must lie in [0, {n_query}).")
        else:
            size = None if self.max_queries is None or self.max_queries >= n_query else self.max_queries
            q_idx = global_sample_indices(n_query, size, seed=self.seed + 1)
        size_t = None if self.max_train is None or self.max_train >= n_train else self.max_train
        t_idx = global_sample_indices(n_train, size_t, seed=self.seed)
        spectrum = self._monitor_spectrum(trainer)
        bar = self._progress(trainer, len(t_idx))
        try:
            result = influence_scores(
                module, self.task, train.dataset, query.dataset, config=self.config, train_indices=t_idx,
                query_indices=q_idx, spectrum=spectrum, collate_fn=train.collate_fn,
                query_collate_fn=query.collate_fn, reduce_fn=reduce_fn, rank=rank, world_size=world,
                progress=bar.update if bar is not None else None,
            )
        except ConfigurationError as err:
            if isinstance(err, MisconfigurationError):
                raise
            raise MisconfigurationError(f"InfluenceReport: {err}") from err
        finally:
            if bar is not None:
                bar.close()
        result.diagnostics.update(train_source=train.source, query_source=query.source,
                                  spectrum_source="CurvatureMonitor" if spectrum is not None else None)
        self.result = result
        step = int(trainer.global_step)
        log_scalars(trainer, result.metrics(), step)
        directory = output_dir(trainer, self.subdir)  # all ranks: broadcast + barrier
        self.scores_path = directory / "scores.pt"
        if trainer.is_global_zero:
            result.save(directory / RESULT_FILE)
            self._write_report(trainer, module, result, directory, train, query, step)
        trainer.strategy.barrier("lightning_influence.influence_report")

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
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if type(cb).__name__ == "CurvatureMonitor":
                latest = getattr(cb, "latest", None)
                if isinstance(latest, SpectrumSummary) and math.isfinite(latest.trace) and latest.lambda_max > 0:
                    return latest
        return None

    def _progress(self, trainer: pl.Trainer, total: int) -> Any:
        if not (self.progress_bar and trainer.is_global_zero and trainer.progress_bar_callback is not None):
            return None
        try:
            from tqdm.auto import tqdm  # type: ignore[import-untyped]
        except ImportError:  # pragma: no cover - tqdm ships with lightning
            return None

        class _Bar:
            def __init__(self) -> None:
                self.bar = tqdm(total=total, desc="InfluenceReport: training gradients", leave=False)

            def update(self, stage: str, done: int, total_: int) -> None:
                self.bar.n = done
                self.bar.refresh()

            def close(self) -> None:
                self.bar.close()

        return _Bar()

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

    def _predictions(self, module: torch.nn.Module, dataset: Any, indices: Tensor, collate_fn: Any) -> list[Any]:
        from lightning_influence.operators import curvature_mode, make_batches, prepare_batch

        first = next(module.parameters())
        preds: list[Any] = []
        try:
            with torch.no_grad(), curvature_mode(module):
                for batch in make_batches(dataset, indices.tolist(), 256, collate_fn):
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

    def _write_report(self, trainer: pl.Trainer, module: torch.nn.Module, result: InfluenceResult,
                      directory: Path, train: Any, query: Any, step: int) -> None:
        from lightning_influence.reporting import ReportStore
        from lightning_influence.reporting.figures import image_payload

        top = result.top_k()
        preds = self._predictions(module, query.dataset, result.query_indices, query.collate_fn)
        want_images = self.images is not False
        flat_ok = bool(self.images)
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
        if want_images and any(img is not None for img in query_images) and all(
            img is not None for img in query_images
        ):
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
        store = ReportStore(directory)
        store.update("influence", section, render=False)
        store.save_tensor("scores", result.scores, section="influence")
        self._log_media(trainer, result, top, step)

    @staticmethod
    def _log_media(trainer: pl.Trainer, result: InfluenceResult, top: Any, step: int) -> None:
        if not trainer.loggers:
            return
        try:
            from lightning_influence.reporting import media
            from lightning_influence.reporting.figures import convergence_figure, histogram_figure
        except ImportError as err:  # pragma: no cover
            rank_zero_warn(f"InfluenceReport: could not log media ({err}).")
            return
        loggers = trainer.loggers
        s = result.solve
        text = (f"**InfluenceReport** ({s.get('method')}, damping={result.config.get('damping')}): "
                f"{result.scores.shape[0]} queries x {result.scores.shape[1]} training examples; "
                f"{s.get('iterations')} iterations, relative residual {s.get('relative_residual')}, "
                f"converged={s.get('converged')}, diverged={s.get('diverged')}; "
                f"{result.diagnostics.get('gradient_equivalents')} gradient-equivalents in "
                f"{result.diagnostics.get('seconds', 0.0):.2f} s. Sign: negative score = proponent.")
        media.log_text(loggers, "influence/summary", text, step=step)
        media.log_histogram(loggers, "influence/scores", result.scores.flatten(), step=step)
        if s.get("history"):
            media.log_figure(loggers, "influence/solver_convergence",
                             convergence_figure(list(s["history"]), f"{s.get('method')} residual"), step=step)
        if result.self_influence is not None and result.self_influence.numel():
            media.log_histogram(loggers, "influence/self_influence", result.self_influence, step=step)
            media.log_figure(loggers, "influence/self_influence_hist",
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
        media.log_table(loggers, "influence/top_k", ["query", "kind", "rank", "train_index", "score"], rows,
                        step=step)
