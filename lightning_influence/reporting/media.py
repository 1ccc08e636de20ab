"""Figures, text, histograms and tables to the Trainer's loggers (TensorBoard and Weights & Biases).

Each helper takes ``loggers`` (``trainer.loggers``, one logger, or a Trainer) and dispatches on the logger type:

* :class:`~lightning.pytorch.loggers.TensorBoardLogger`: ``experiment.add_image`` (the figure rendered once to
  RGB, the same pixels ``add_figure`` would produce), ``add_text``, ``add_histogram``; a table becomes a
  Markdown table in ``add_text``.
* :class:`~lightning.pytorch.loggers.WandbLogger`: ``log_image(key, images=[...], step=...)``,
  ``log_text``, ``log_table(key, columns, data, step=...)``; a histogram goes through ``log_metrics`` as a
  ``wandb.Histogram`` (Lightning's public API, which records ``trainer/global_step`` rather than calling
  ``wandb.log(step=...)`` and so never drops out-of-order steps).
* any other logger: a warning, once per logger class and kind of media.

Figures are closed after logging. Call these on rank 0 only (inside ``if trainer.is_global_zero``).
``wandb`` and ``matplotlib`` are imported lazily.

Example::

    >>> from lightning.pytorch.loggers import TensorBoardLogger
    >>> import tempfile
    >>> logger = TensorBoardLogger(tempfile.mkdtemp())
    >>> log_text([logger], "influence/summary", "CG converged in 12 iterations", step=0)
    >>> log_table([logger], "influence/top", ["query", "train", "score"], [[0, 5, -0.12]], step=0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from lightning.fabric.loggers.tensorboard import TensorBoardLogger as _FabricTensorBoardLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.imports import RequirementCache

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

_WANDB_AVAILABLE = RequirementCache("wandb")

__all__ = ["log_figure", "log_histogram", "log_png", "log_table", "log_text", "markdown_table"]

_WARNED: set[tuple[str, str]] = set()


def _as_list(loggers: Any) -> list[Any]:
    if loggers is None:
        return []
    if hasattr(loggers, "loggers") and not isinstance(loggers, (list, tuple)):  # a Trainer
        return list(loggers.loggers)
    if isinstance(loggers, (list, tuple)):
        return list(loggers)
    return [loggers]


def _is_tensorboard(logger: Any) -> bool:
    return isinstance(logger, _FabricTensorBoardLogger)


def _is_wandb(logger: Any) -> bool:
    return isinstance(logger, WandbLogger)


def _warn_unsupported(logger: Any, kind: str) -> None:
    key = (type(logger).__name__, kind)
    if key in _WARNED:
        return
    _WARNED.add(key)
    rank_zero_warn(
        f"lightning_influence cannot log {kind} to {type(logger).__name__}; only TensorBoardLogger and WandbLogger "
        "receive media. Scalars are still logged, and the HTML report has every figure.",
        category=UserWarning,
    )


def _figure_to_rgb(fig: Figure) -> np.ndarray:
    """Render ``fig`` once on an Agg canvas and return an ``HxWx3`` uint8 array."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _to_numpy(values: Any) -> np.ndarray:
    import numpy as np

    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    return arr[np.isfinite(arr)]


def _cell(value: Any) -> Any:
    if hasattr(value, "detach") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (what TensorBoard's text plugin renders).

    Args:
        columns: Header names.
        rows: Row values.

    Returns:
        The Markdown text.

    Example::

        >>> print(markdown_table(["a", "b"], [[1, 0.5]]))
        | a | b |
        |---|---|
        | 1 | 0.5 |
    """

    def esc(v: Any) -> str:
        v = _cell(v)
        text = "—" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def log_figure(loggers: Any, tag: str, fig: Figure, step: int | None = None) -> None:
    """Log a matplotlib figure as an image to every TensorBoard/W&B logger, then close it.

    Args:
        loggers: ``trainer.loggers``, a single logger, or the Trainer.
        tag: Image tag/key, e.g. ``"influence/self_influence_hist"``.
        fig: The figure (closed afterwards, whatever happens).
        step: Global step.

    Example::

        >>> from lightning_influence.reporting.figures import histogram_figure
        >>> log_figure([], "x", histogram_figure([1.0, 2.0], "h"))  # no loggers: only closes the figure
    """
    from lightning_influence.reporting.figures import close_figure

    try:
        _log_rgb(loggers, tag, lambda: _figure_to_rgb(fig), step)
    finally:
        close_figure(fig)


def log_png(loggers: Any, tag: str, png: str, step: int | None = None) -> None:
    """Log a base64 PNG (a figure already rendered, e.g. for the report) as an image to every TensorBoard/W&B logger.

    Args:
        loggers: ``trainer.loggers``, a single logger, or the Trainer.
        tag: Image tag/key.
        png: ASCII base64 of the PNG bytes (:func:`~lightning_influence.reporting.blocks.rendered_png`).
        step: Global step.

    Example::

        >>> from functools import partial
        >>> from lightning_influence.reporting.blocks import rendered_png
        >>> from lightning_influence.reporting.figures import histogram_figure
        >>> log_png([], "x", rendered_png(partial(histogram_figure, [1.0, 2.0], "h")))  # no loggers: nothing
    """
    _log_rgb(loggers, tag, lambda: _png_to_rgb(png), step)


def _log_rgb(loggers: Any, tag: str, rgb_of: Callable[[], np.ndarray], step: int | None) -> None:
    """Send the image ``rgb_of()`` (made at most once) to every TensorBoard/W&B logger; warn for the others."""
    rgb = None
    for logger in _as_list(loggers):
        if _is_tensorboard(logger) or _is_wandb(logger):
            rgb = rgb_of() if rgb is None else rgb
            if _is_tensorboard(logger):
                logger.experiment.add_image(tag, rgb, global_step=step, dataformats="HWC")
            else:
                logger.log_image(key=tag, images=[rgb], step=step)
        else:
            _warn_unsupported(logger, "figures")


def _png_to_rgb(png: str) -> np.ndarray:
    """An ``HxWx3`` uint8 array of a base64 PNG."""
    import base64
    import io

    import numpy as np
    from matplotlib.image import imread

    image = imread(io.BytesIO(base64.b64decode(png)), format="png")
    return np.asarray(np.round(image[..., :3] * 255), dtype=np.uint8)


def log_text(loggers: Any, tag: str, text: str, step: int | None = None) -> None:
    """Log (Markdown) text to every TensorBoard/W&B logger.

    Args:
        loggers: ``trainer.loggers``, a single logger, or the Trainer.
        tag: Text tag/key.
        text: The text (TensorBoard renders Markdown).
        step: Global step.

    Example::

        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> import tempfile
        >>> log_text(TensorBoardLogger(tempfile.mkdtemp()), "influence/summary", "CG: 12 iterations", step=5)
    """
    for logger in _as_list(loggers):
        if _is_tensorboard(logger):
            logger.experiment.add_text(tag, text, global_step=step)
        elif _is_wandb(logger):
            logger.log_text(key=tag, columns=["text"], data=[[text]], step=step)
        else:
            _warn_unsupported(logger, "text")


def log_histogram(loggers: Any, tag: str, values: Any, step: int | None = None) -> None:
    """Log the distribution of ``values`` (non-finite entries dropped) to every TensorBoard/W&B logger.

    Args:
        loggers: ``trainer.loggers``, a single logger, or the Trainer.
        tag: Histogram tag/key.
        values: Tensor, array or sequence of numbers.
        step: Global step.

    Raises:
        ImportError: If a WandbLogger is present but ``wandb`` is not installed.

    Example::

        >>> import torch, tempfile
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> log_histogram([TensorBoardLogger(tempfile.mkdtemp())], "influence/self", torch.rand(100), step=0)
    """
    arr = None
    for logger in _as_list(loggers):
        if not (_is_tensorboard(logger) or _is_wandb(logger)):
            _warn_unsupported(logger, "histograms")
            continue
        arr = _to_numpy(values) if arr is None else arr
        if arr.size == 0:
            continue
        if _is_tensorboard(logger):
            logger.experiment.add_histogram(tag, arr, global_step=step)
        else:
            if not _WANDB_AVAILABLE:
                raise ImportError(f"Logging histograms to W&B needs `pip install wandb` ({_WANDB_AVAILABLE.message}).")
            import wandb

            logger.log_metrics({tag: wandb.Histogram(arr.tolist())}, step=step)


def log_table(
    loggers: Any, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None
) -> None:
    """Log a table: a W&B table, or a Markdown table in TensorBoard's text tab.

    Args:
        loggers: ``trainer.loggers``, a single logger, or the Trainer.
        key: Table key/tag.
        columns: Column names.
        rows: Rows (same length as ``columns``); tensors and NumPy scalars are converted, NaN becomes empty.
        step: Global step.

    Raises:
        ValueError: If a row's length differs from the number of columns.

    Example::

        >>> import tempfile
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> log_table([TensorBoardLogger(tempfile.mkdtemp())], "pbrf/corr", ["estimator", "pearson"], [["cg", 0.99]])
    """
    clean = [[_cell(v) for v in row] for row in rows]
    for i, row in enumerate(clean):
        if len(row) != len(columns):
            raise ValueError(f"log_table({key!r}): row {i} has {len(row)} values but there are {len(columns)} columns.")
    for logger in _as_list(loggers):
        if _is_tensorboard(logger):
            logger.experiment.add_text(key, markdown_table(columns, clean), global_step=step)
        elif _is_wandb(logger):
            logger.log_table(key=key, columns=list(columns), data=clean, step=step)
        else:
            _warn_unsupported(logger, "tables")
