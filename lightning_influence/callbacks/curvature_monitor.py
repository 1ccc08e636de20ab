r"""CurvatureMonitor: track the Gauss-Newton curvature of the training loss while a model trains.

At every checkpoint the Trainer saves (and optionally every ``n`` steps or epochs) the monitor measures, on a
fixed seeded sample of the training data,

* :math:`\mathrm{Tr}(G)` by Hutchinson's estimator, with its standard error,
* :math:`\lambda_{\max}(G)` by Lanczos,
* the critical batch size :math:`\mathrm{Tr}(G)/\lambda_{\max}(G)`,
* the LiSSA settings they imply (paper 1, §3: :math:`\eta = 1/(\lambda_{\max}+\lambda)`,
  :math:`|B| = \lceil C\,\mathrm{Tr}/\lambda_{\max} \rceil`, :math:`T = \lceil 2/(\lambda\eta) \rceil`),

of the unit-averaged GNH :math:`G = \frac1N\sum_n J_n^\top S_n J_n` (see :mod:`lightning_influence.operators` and
:mod:`lightning_influence.spectrum`). Under DDP every rank draws the same sample, works on its own unpadded slice
through the unwrapped LightningModule and one sum-reduction completes each product
(:mod:`lightning_influence.distributed`).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_influence.callbacks._common import (
    MisconfigurationError,
    ResolvedData,
    RunContext,
    check_before_training,
    check_data_available,
    check_dataset,
    check_int,
    check_number,
    check_same_parameters,
    check_strategy,
    check_task,
    config_field,
    isolated_rng,
    log_scalars,
    publish,
    resolve_config,
    resolve_data,
    warn_no_logger,
)
from lightning_influence.callbacks._loss import check_loss_matches
from lightning_influence.config import SpectrumConfig
from lightning_influence.data import DataSource, prepare_batch
from lightning_influence.distributed import ShardSpec, make_shard
from lightning_influence.evaluator import curvature_mode
from lightning_influence.exceptions import BatchFormatError, ConfigurationError
from lightning_influence.metrics import CURVATURE_OVERHEAD, MEDIA_CURVATURE_HISTORY
from lightning_influence.operators import GNHOperator
from lightning_influence.spectrum import LissaSettings, SpectrumSummary, estimate_spectrum
from lightning_influence.tasks import LanguageModeling, Task

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["CurvatureMonitor"]

_WHO = "CurvatureMonitor"
#: ``sample_size="auto"``: this many examples, or the whole dataset when it is smaller.
DEFAULT_SAMPLE_SIZE = 64


def _no_autocast(module: torch.nn.Module) -> torch.autocast:
    """Autocast off on the module's device, so curvature is measured in the parameters' dtype.

    That is float32 under ``precision="bf16-mixed"`` / ``"16-mixed"`` and float64 for float64 models, never the
    autocast dtype.

    Returns:
        The disabled autocast context.
    """
    param = next(module.parameters(), None)
    device = param.device.type if param is not None else "cpu"
    return torch.autocast(device_type=device if device in ("cpu", "cuda", "xpu", "mps") else "cpu", enabled=False)


def _default_config() -> SpectrumConfig:
    """The estimator settings when no config is given.

    4 deflated trace probes, at most 8 Lanczos products stopping at a 3 % Ritz residual, streamed products.
    The first measurement (no Ritz vector to warm-start from) starts Lanczos at the sample's loss gradient
    (``lanczos_start="gradient"``: one gradient pass; a random start spends its first product reaching the GNH's
    range and misconverged more often at this tolerance). The process's one-time forward-mode AD set-up is paid at
    train start on two examples (:meth:`CurvatureMonitor._warm_up`), not in the first measurement.
    Cheaper than ``SpectrumConfig()``'s, since the monitor measures during training. Cached linearisations
    (``"auto"``): the first measurement of a process traces the model on the sample, later ones reuse that trace
    (:class:`~lightning_influence.operators.linearized.TangentProgram`: one forward pass for the new weights) and
    their products skip the primal pass. Measured with ``benchmarks/bench_monitor_overhead.py`` (12 epochs,
    measurements every 200 steps, two runs): on the 1.2M-parameter CNN warm measurements took 6.5 training steps
    (7.5-9.8 streamed), the first 17.0-17.2, 9.2 per measurement over the run and 4.5-4.6 % of its wall time; on the
    9k-parameter example 4.0-4.1, 14.0-14.4, 6.5-6.7 and 3.7-3.8 %. ``linearization="never"`` streams.

    Returns:
        The default config.
    """
    return SpectrumConfig(trace_probes=4, lanczos_iter=8, lanczos_tol=3e-2, lanczos_start="gradient",
                          linearization="auto")


class CurvatureMonitor(Callback):
    r"""Measure Tr(GNH), λ_max, the critical batch size and the implied LiSSA settings during training.

    Measurements happen

    * whenever the Trainer saves a checkpoint (``on_checkpoint=True``): the values are stored in the checkpoint
      next to the weights they describe (``checkpoint["lightning_influence/curvature"]``, and the callback state);
    * every ``every_n_steps`` optimizer steps and/or at the end of every ``every_n_epochs`` training epochs.

    A global step is measured at most once (a checkpoint saved right after a cadence measurement reuses it, and a
    resumed run never re-measures a step already in its history). Every measurement uses the same fixed sample
    (``sample_size`` examples drawn once with ``seed``) and the same probe seed, so the curves show how the
    curvature changes, not probe noise.

    The monitor never changes training: the model is evaluated in eval mode (restored afterwards) through
    ``torch.func`` so no ``.grad`` is written and BatchNorm statistics are untouched, the global RNGs are never
    used (dataset access is RNG-isolated), and autograd is forced on when Lightning runs hooks under
    ``torch.inference_mode``. Supported strategies: single device and DDP (``ddp``, ``ddp_spawn``, ``ddp_fork``,
    ``ddp_notebook``).

    At the end of training a figure of all curves is logged to TensorBoard / W&B (``curvature/history``) and the
    history is written to the ``"curvature"`` section of ``<log_dir>/influence/report.json`` / ``report.html``
    (with the resolved config).

    Logged metrics (to every attached logger at ``trainer.global_step``, and as float64 tensors into
    ``trainer.callback_metrics`` so ``ModelCheckpoint``/``EarlyStopping`` can monitor them):

    * ``curvature/trace``: Hutchinson estimate of :math:`\mathrm{Tr}(G)` (``trace_probes`` Rademacher probes).
    * ``curvature/trace_stderr``: its standard error (sample std of the probes / sqrt(probes)).
    * ``curvature/lambda_max``: largest eigenvalue of :math:`G` by Lanczos (at most ``lanczos_iter`` products).
    * ``curvature/critical_batch_size``: ``trace / lambda_max`` (the effective rank; paper 1, §3).
    * ``lissa/eta``: recommended LiSSA step size :math:`1/(\lambda_{\max} + \text{damping})`.
    * ``lissa/batch_size``: recommended LiSSA batch, :math:`\lceil C\,\mathrm{Tr}/\lambda_{\max} \rceil` units with
      ``C = DEFAULT_LISSA_CONSTANT`` (4, the value :class:`InfluenceReport` uses; paper 1 suggests 2)
      (capped at the dataset size for per-example tasks).
    * ``lissa/steps``: recommended LiSSA steps, :math:`\lceil 2(\lambda_{\max}+\text{damping})/\text{damping} \rceil`.
    * ``curvature/products``: curvature products the measurement spent; ``curvature/seconds``: its wall time;
      ``curvature/overhead``: the share of the fit's wall time spent measuring so far.

    Mixed precision: under ``precision="bf16-mixed"`` or ``"16-mixed"`` the weights stay float32 and measurements
    run with autocast disabled, so the curvature is computed in float32 (float64 models stay exact).

    Lanczos is warm-started from the previous measurement's top Ritz vector (:attr:`ritz_vector`, saved in the
    callback state so a resumed run continues from the checkpoint's vector) and stops on its Ritz residual, so
    between slowly moving checkpoints it needs a few products instead of ``lanczos_iter``.

    Cost: with the defaults a measurement is 4 deflated trace probes (forward mode) and the Lanczos products it
    needs (at most 8, typically 4-5 when warm-started) on the 64-example sample, whatever the dataset size: about
    8-12 gradient evaluations over the sample. Measured with ``benchmarks/bench_monitor_overhead.py`` (one thread,
    shared machine): 4-6 training steps of 64 images per measurement on ``examples/mnist_cnn_monitor.py``'s 9k-parameter
    CNN (7 % overhead with its per-epoch checkpoints of 71 steps), 15-18 steps on its 1.2M-parameter variant
    (8 % at ``every_n_steps=200``); ``every_n_steps="auto"`` held 3.3-3.5 % against its 5 % budget on both. Raise
    ``sample_size`` / ``trace_probes`` for sharper estimates when measurements are rare; lower them, or checkpoint
    less often, when checkpoints are frequent.

    Args:
        task: How a batch becomes ``(outputs, targets)`` and which loss family (e.g. ``Classification()``);
            a loss name (``"cross_entropy"``, ``"mse"``, ...) builds a plain :class:`~lightning_influence.tasks.Task`.
        config: The estimators' settings (:class:`~lightning_influence.config.SpectrumConfig`: probes, Lanczos,
            ``lambda_method``, the LiSSA constant, seed, ...). Default: ``SpectrumConfig(trace_probes=4,
            lanczos_iter=8, lanczos_tol=3e-2, lanczos_start="gradient", linearization="auto")``; a config you
            pass is used as it is (its own defaults for the fields you leave out). ``monitor.config`` is the
            resolved one, written to the report.
        dataset: ``"train"`` (default: the dataset behind the Trainer's train dataloader, with its collate
            function), ``"val"``, or a map-style dataset.
        sample_size: Examples in the fixed curvature sample (default ``"auto"``: 64, or the whole dataset when it is
            smaller); ``None`` uses the whole dataset; an integer larger than the dataset is an error.
        batch_size: Examples per forward pass inside a measurement (default 128).
        trace_probes: Hutchinson probes per measurement (``None``: the config's, 4 by default; at least 2), deflated
            by the Lanczos basis; each costs about one gradient over the sample (forward-mode only).
        lanczos_iter: Most Lanczos products per measurement (``None``: the config's, 8 by default).
        lanczos_tol: Lanczos stops once the Ritz residual is below ``lanczos_tol * lambda_max`` (``None``: the
            config's, 3e-2 by default).
        damping: The damping :math:`\lambda` the LiSSA settings are computed for (default 1e-3; must be > 0).
        seed: Seed of the sample draw and of the probes (``None``: the config's, 0 by default).
        every_n_steps: Also measure when ``trainer.global_step`` is a positive multiple of this (default ``None``);
            ``"auto"`` schedules measurements so that they take about ``overhead_budget`` of the fit's wall time:
            after each measurement the next one is placed enough training steps later (at the measured step time)
            that the measured share, :attr:`overhead`, returns to the budget (the first one is at the first step).
            Every measurement logs the share so far (``curvature/overhead``).
        overhead_budget: The share of wall time ``every_n_steps="auto"`` aims at (default 0.05; in (0, 1)).
        every_n_epochs: Also measure at the end of every ``every_n_epochs``-th training epoch (default ``None``).
        on_checkpoint: Measure whenever a checkpoint is saved (default ``True``).
        log_figure: Log the figure of all curves at the end of training (default ``True``).
        write_report: Write the history to ``<log_dir>/<subdir>/report.json`` at the end of training (default
            ``True``).
        subdir: Report directory under the log dir (default ``"influence"``).

    Raises:
        MisconfigurationError: In ``__init__`` for invalid values (non-positive sizes, fewer than 2 probes,
            ``damping <= 0``, nothing that would ever trigger a measurement); in ``setup`` for an unsupported
            strategy; at the start of training for a ``sample_size`` larger than the dataset, a dataset that is not
            map-style, or a ``task`` that cannot turn the dataset's batches into ``(outputs, targets)``.

    Example::

        >>> from lightning_influence.tasks import Classification
        >>> monitor = CurvatureMonitor(Classification(), every_n_steps=100)
        >>> monitor.latest is None, monitor.history, monitor.config.trace_probes
        (True, [], 4)
        >>> from lightning_influence.config import SpectrumConfig
        >>> CurvatureMonitor(Classification(), config=SpectrumConfig(lanczos_iter=20), seed=3).config.seed
        3
        >>> # trainer = L.Trainer(callbacks=[monitor], logger=TensorBoardLogger("runs")); trainer.fit(model)
    """

    #: Key under which each checkpoint stores the measurement made for it.
    CHECKPOINT_KEY = "lightning_influence/curvature"

    trace_probes: int = config_field()
    lanczos_iter: int = config_field()
    lanczos_tol: float = config_field()
    seed: int = config_field()

    def __init__(
        self,
        task: Task | str,
        *,
        config: SpectrumConfig | None = None,
        dataset: Literal["train", "val"] | Any = "train",
        sample_size: int | Literal["auto"] | None = "auto",
        batch_size: int = 128,
        trace_probes: int | None = None,
        lanczos_iter: int | None = None,
        lanczos_tol: float | None = None,
        damping: float = 1e-3,
        seed: int | None = None,
        every_n_steps: int | Literal["auto"] | None = None,
        overhead_budget: float = 0.05,
        every_n_epochs: int | None = None,
        on_checkpoint: bool = True,
        log_figure: bool = True,
        write_report: bool = True,
        subdir: str = "influence",
    ) -> None:
        super().__init__()
        self.task = check_task(task, _WHO, allow_loss_name=True)
        self.dataset = check_dataset(_WHO, "dataset", dataset)
        self._auto_sample = sample_size == "auto"
        self.sample_size = DEFAULT_SAMPLE_SIZE if sample_size == "auto" else check_int(
            _WHO, "sample_size", sample_size, allow_none=True, fix='None uses every example, "auto" 64 at most')
        self.batch_size = check_int(_WHO, "batch_size", batch_size)
        check_int(_WHO, "trace_probes", trace_probes, 2, allow_none=True, fix="a standard error needs two probes")
        check_int(_WHO, "lanczos_iter", lanczos_iter, allow_none=True)
        check_number(_WHO, "lanczos_tol", lanczos_tol, allow_none=True)
        self.damping = check_number(_WHO, "damping", damping, fix="the LiSSA step count grows like 1/damping")
        #: ``every_n_steps="auto"``: the cadence adapts so measurements take about ``overhead_budget`` of wall time.
        self.auto_cadence = every_n_steps == "auto"
        self.every_n_steps = None if self.auto_cadence else check_int(_WHO, "every_n_steps", every_n_steps,
                                                                      allow_none=True, fix='or pass "auto"')
        self.overhead_budget = check_number(_WHO, "overhead_budget", overhead_budget, fix="e.g. 0.05 for 5 %")
        if self.overhead_budget >= 1:
            raise MisconfigurationError(f"{_WHO}: overhead_budget must be < 1 (a fraction of wall time), got "
                                        f"{overhead_budget}; pass e.g. 0.05 for 5 %.")
        self.every_n_epochs = check_int(_WHO, "every_n_epochs", every_n_epochs, allow_none=True)
        if not on_checkpoint and every_n_steps is None and every_n_epochs is None:
            raise MisconfigurationError(
                f"{_WHO} would never measure: set every_n_steps or every_n_epochs, or keep on_checkpoint=True."
            )
        #: The resolved estimator settings (:class:`~lightning_influence.config.SpectrumConfig`).
        self.config = resolve_config(_WHO, SpectrumConfig, config, _default_config(), trace_probes=trace_probes,
                                     lanczos_iter=lanczos_iter, lanczos_tol=lanczos_tol, seed=seed)
        self.on_checkpoint = on_checkpoint
        self.log_figure = log_figure
        self.write_report = write_report
        self.subdir = subdir

        #: One plain dict per measurement, oldest first: ``step``, ``epoch``, ``trigger`` and
        #: :meth:`SpectrumSummary.to_dict` fields (``trace``, ``lambda_max``, ``lissa`` {...}, ...).
        self.history: list[dict[str, Any]] = []
        #: This rank's shard of the sample (set at the start of training).
        self.shard: ShardSpec | None = None
        #: Examples this rank pushed through the model in the last measurement (sharding check).
        self.last_examples_processed = 0
        self._source: DataSource | None = None
        self._data: ResolvedData | None = None
        self._dataset_len: int | None = None
        #: The last measurement's unit top Ritz vector (CPU): the warm start of the next Lanczos run, kept in the
        #: callback state so a resumed run warm-starts from the checkpoint's vector.
        self.ritz_vector: torch.Tensor | None = None
        #: The start vector the last measurement's Lanczos run used (``None``: a random start).
        self.last_start: torch.Tensor | None = None
        #: Wall seconds spent measuring since the start of this fit (cadence probes included).
        self.measure_seconds = 0.0
        self._clock: tuple[float, float | None] | None = None  # (train start, train end) perf_counter times
        self._start_step = 0
        self._next_auto_step: int | None = None
        self._cheapest = math.inf

    # ------------------------------------------------------------------------------------------ state
    @property
    @override
    def state_key(self) -> str:
        dataset = self.dataset if isinstance(self.dataset, str) else type(self.dataset).__name__
        return self._generate_state_key(task=type(self.task).__name__, dataset=dataset, seed=self.seed,
                                        sample_size=self.sample_size)

    @property
    def latest(self) -> SpectrumSummary | None:
        """The most recent measurement (``None`` before the first), e.g. to tune LiSSA in another callback."""
        return self._summary_from_row(self.history[-1]) if self.history else None

    @property
    def measured_steps(self) -> list[int]:
        """Global steps measured so far (strictly increasing)."""
        return [int(r["step"]) for r in self.history]

    @staticmethod
    def _summary_from_row(row: dict[str, Any]) -> SpectrumSummary:
        fields = {k: row[k] for k in SpectrumSummary.__dataclass_fields__ if k in row and k != "lissa"}
        return SpectrumSummary(lissa=LissaSettings(**row["lissa"]), **fields)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "seed": self.seed, "sample_size": self.sample_size,
                "ritz_vector": self.ritz_vector}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
        vector = state_dict.get("ritz_vector")
        self.ritz_vector = vector.detach().cpu().clone() if isinstance(vector, torch.Tensor) else None

    # ------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, _WHO)
        warn_no_logger(trainer, _WHO)
        check_data_available(trainer, self.dataset, _WHO)
        if not isinstance(self.dataset, str):  # a user dataset can be checked before anything runs
            data = resolve_data(trainer, self.dataset, _WHO)
            self._check_sample_size(len(data.dataset))

    @property
    def overhead(self) -> float:
        """Measured share of this fit's wall time spent in measurements (``nan`` before training starts)."""
        if self._clock is None:
            return math.nan
        start, end = self._clock
        elapsed = (end if end is not None else time.perf_counter()) - start
        return self.measure_seconds / elapsed if elapsed > 0 else math.nan

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_loss_matches(trainer, pl_module, self.task, _WHO)
        self._clock, self._start_step, self.measure_seconds = (time.perf_counter(), None), trainer.global_step, 0.0
        self._next_auto_step, self._cheapest = None, math.inf
        check_before_training(trainer, pl_module, self, self.task, [], _WHO)  # _prepare probes (and casts) the data
        self._prepare(RunContext.from_trainer(trainer, pl_module, _WHO))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0:
            self._measure(trainer, pl_module, "step")
        if self.auto_cadence and step > self._start_step and step >= (self._next_auto_step or 0):
            self._measure(trainer, pl_module, "auto")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._measure(trainer, pl_module, "epoch")

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Runs on every rank inside trainer.save_checkpoint, so the collectives of a measurement line up.
        if not self.on_checkpoint or self._source is None:
            return
        row = self._measure(trainer, pl_module, "checkpoint")
        if row is not None:
            checkpoint[self.CHECKPOINT_KEY] = dict(row)
        callbacks = checkpoint.get("callbacks")
        if isinstance(callbacks, dict) and self.state_key in callbacks:  # state_dict() was taken before this hook
            callbacks[self.state_key] = self.state_dict()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._clock is not None:
            self._clock = (self._clock[0], time.perf_counter())
        if not (self.log_figure or self.write_report):  # the same decision on every rank
            return
        publish(trainer, who=_WHO, step=int(trainer.global_step), subdir=self.subdir,
                section="curvature" if self.write_report else None, content=lambda _: self._publish(trainer))

    def _publish(self, trainer: pl.Trainer) -> dict[str, Any] | None:
        """Rank 0: log the figure of all curves; return the report section (``None``: nothing to write)."""
        if not self.history:
            return None
        if self.log_figure and trainer.loggers:
            from lightning_influence.reporting.blocks import rendered_png
            from lightning_influence.reporting.media import log_png
            from lightning_influence.reporting.sections import curvature_history_figure

            make = curvature_history_figure(self.history)  # the report's figure: one render serves both
            if make is not None:
                log_png(trainer.loggers, MEDIA_CURVATURE_HISTORY, rendered_png(make), step=trainer.global_step)
        return self.report_section(trainer) if self.write_report else None

    # ------------------------------------------------------------------------------------------ work
    def report_section(self, trainer: pl.Trainer | None = None) -> dict[str, Any]:
        """The ``"curvature"`` report section: history, configuration and a summary of the last measurement.

        Returns:
            A JSON-friendly dict (see :mod:`lightning_influence.reporting.html` for the schema).
        """
        config = self.settings()
        if self.shard is not None:
            config.update({"world_size": self.shard.world_size, "dataset_size": self.shard.dataset_size})
        last = self.history[-1] if self.history else {}
        keys = ("step", "trace", "trace_stderr", "lambda_max", "critical_batch_size")
        summary = {k: last[k] for k in keys if k in last}
        return {"history": [dict(r) for r in self.history], "config": config, "summary": summary}

    def settings(self) -> dict[str, Any]:
        """The monitor's settings as plain values: the resolved config's fields plus the callback's own.

        Returns:
            ``name -> value`` (the dataset object by its type name).
        """
        return {
            **self.config.to_dict(),
            "task": self.task.to_dict(),
            "dataset": self.dataset if isinstance(self.dataset, str) else type(self.dataset).__name__,
            "sample_size": self.sample_size,
            "batch_size": self.batch_size,
            "damping": self.damping,
            "every_n_steps": self.every_n_steps,
            "every_n_epochs": self.every_n_epochs,
            "on_checkpoint": self.on_checkpoint,
        }

    def _check_sample_size(self, n: int) -> None:
        if self._auto_sample and self.sample_size is not None and self.sample_size > n:
            self.sample_size = n  # the default on a dataset smaller than it: every example
        if self.sample_size is not None and self.sample_size > n:
            raise MisconfigurationError(
                f"{_WHO}: sample_size={self.sample_size} is larger than the dataset ({n} examples); pass "
                f"sample_size <= {n} (or sample_size=None to use every example)."
            )

    def _prepare(self, ctx: RunContext) -> None:
        """Draw the sample, take this rank's shard, collate it once, and check that the task fits (all ranks)."""
        data = ctx.resolve(self.dataset)
        n = len(data.dataset)
        if n < 1:
            raise MisconfigurationError(f"{_WHO}: the {data.source} dataset is empty; pass dataset=... with examples.")
        self._check_sample_size(n)
        shard = make_shard(n, self.sample_size, self.seed, ctx.rank, ctx.world_size)
        source = ctx.source(data, shard.global_indices, batch_size=self.batch_size)
        source.batches()  # collated once, RNG-isolated (a dataset's augmentations must not advance training's RNG)
        probe_batch = source.collate(shard.global_indices[: min(2, shard.global_size)], batch_size=2)
        self._check_task(ctx.module, probe_batch[0], data.source)
        self._warm_up(ctx.module, probe_batch[0])
        self._data, self._dataset_len, self.shard, self._source = data, n, shard, source

    def _warm_up(self, module: torch.nn.Module, batch: Any) -> None:
        """Pay the process's one-time set-up of forward-mode AD and ``vmap`` on the 2-example probe batch.

        The first dual-tensor product of a process costs about two more training steps than the next ones on the
        1.2M-parameter CNN of ``benchmarks/bench_monitor_overhead.py``, whatever the batch size; one product and
        one 2-probe block on two examples pay it at train start instead of inside the first measurement. Local
        (no collective), RNG-isolated, no ``.grad`` written; its seconds count in :attr:`overhead`.
        """
        clock = time.perf_counter()
        with isolated_rng(), torch.inference_mode(False), torch.enable_grad(), _no_autocast(module):
            op = GNHOperator(module, self.task, [batch], dtype=self._input_dtype(module), linearization="never")
            directions = torch.ones(op.num_params, 2, dtype=op.param_dtype, device=op.device)
            op.matmat(directions[:, :1])
            op.quadratic_forms(directions)
        self.measure_seconds += time.perf_counter() - clock

    def _check_task(self, module: torch.nn.Module, batch: Any, source: str) -> None:
        param = next((p for p in module.parameters() if p.requires_grad), None)
        if param is None:
            raise MisconfigurationError(f"{_WHO}: the LightningModule has no trainable parameter to measure.")
        try:
            with isolated_rng(), curvature_mode(module), torch.no_grad():
                self.task(module, prepare_batch(batch, param.device, self._input_dtype(module)))
        except BatchFormatError as err:
            raise MisconfigurationError(
                f"{_WHO}: task={self.task!r} does not fit the {source} batches: {err} Pass a task whose split()/"
                "outputs() match this data (subclass the task for custom batch formats)."
            ) from err
        except (ConfigurationError, ValueError, RuntimeError, TypeError) as err:
            raise MisconfigurationError(
                f"{_WHO}: task={self.task!r} failed on a {source} batch ({type(err).__name__}: {err}). Check that the "
                "task's loss matches the model's outputs and the targets (e.g. class indices for Classification)."
            ) from err

    @staticmethod
    def _input_dtype(module: torch.nn.Module) -> torch.dtype | None:
        """Floating inputs are cast to the parameters' dtype (as Lightning's precision plugin does for steps)."""
        param = next((p for p in module.parameters() if p.requires_grad), None)
        return param.dtype if param is not None and param.is_floating_point() else None

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, trigger: str) -> dict[str, Any] | None:
        """Measure at ``trainer.global_step`` unless already done; same decision and collectives on every rank.

        Returns:
            The history row for this step (new or existing), or ``None`` if the sample is not prepared.
        """
        if self._source is None:
            return None
        step = int(trainer.global_step)
        for old in reversed(self.history):
            if int(old["step"]) == step:
                return old
        ctx = RunContext.from_trainer(trainer, pl_module, _WHO)
        check_same_parameters(self, ctx.module, _WHO)
        clock = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad(), _no_autocast(ctx.module):
            op = GNHOperator(ctx.module, self.task, self._source, reduce_fn=ctx.reduce_fn,
                             dtype=self._input_dtype(ctx.module), linearization=self.config.linearization,
                             linearization_budget=self.config.linearization_budget)
            self.last_start = self.ritz_vector
            summary = estimate_spectrum(
                op, damping=self.damping, config=self.config, start=self.ritz_vector,
                dataset_size=None if isinstance(self.task, LanguageModeling) else self._dataset_len,
            )
        if summary.ritz_vector is not None:
            self.ritz_vector = summary.ritz_vector.detach().to("cpu", torch.float32).clone()
        self.last_examples_processed = op.examples_processed
        took = time.perf_counter() - clock
        self.measure_seconds += took
        self._cheapest = min(self._cheapest, took)  # the next cost: the first run pays one-time warm-up
        self._schedule(ctx, step, self._cheapest)
        row: dict[str, Any] = {"step": step, "epoch": int(trainer.current_epoch), "trigger": trigger,
                               **summary.to_dict(), "overhead": self.overhead}
        self.history.append(row)
        values = {**summary.metrics(), CURVATURE_OVERHEAD: row["overhead"]}
        log_scalars(trainer, {k: v for k, v in values.items() if math.isfinite(v)}, step, _WHO)
        return row

    # ------------------------------------------------------------------------------------- auto cadence
    def _schedule(self, ctx: RunContext, step: int, cost: float) -> None:
        """Next ``"auto"`` step: enough training that a measurement costing ``cost`` keeps the share at the budget.

        ``cost`` is the cheapest measurement so far (the first pays a one-time warm-up).

        With ``M`` seconds measured and ``W`` trained so far, the next measurement ends at ``M + cost`` measured out
        of ``W + gap + M + cost``; the gap (in steps of the measured training step time) makes that ratio the
        budget. Ranks average their gaps (one reduction), so they all measure at the same step.
        """
        if not self.auto_cadence or self._clock is None:
            return
        elapsed = time.perf_counter() - self._clock[0]
        trained = max(elapsed - self.measure_seconds, 1e-9)
        step_time = trained / max(step - self._start_step, 1)
        spent = self.measure_seconds + cost
        gap = max(0.0, spent / self.overhead_budget - spent - trained) / step_time
        if ctx.reduce_fn is not None:
            gap = float(ctx.reduce_fn(torch.tensor([gap], dtype=torch.float64))[0]) / ctx.world_size
        self._next_auto_step = step + max(1, math.ceil(gap))
