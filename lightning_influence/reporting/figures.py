"""Matplotlib figures for the report, TensorBoard and W&B.

Every helper returns a :class:`matplotlib.figure.Figure` built on the non-interactive Agg canvas (no
``pyplot`` state machine, so nothing leaks between calls or threads and no display is needed). Matplotlib is
imported lazily inside the helpers; a missing installation raises an :class:`ImportError` naming the fix.

Example::

    >>> from lightning_influence.reporting.figures import line_figure, figure_to_png_base64
    >>> fig = line_figure([0, 1, 2], {"trace": [3.0, 2.0, 1.5]}, title="Trace", xlabel="step")
    >>> figure_to_png_base64(fig)[:8]  # base64 of the PNG signature
    'iVBORw0K'
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.imports import RequirementCache

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_MATPLOTLIB_AVAILABLE = RequirementCache("matplotlib")

__all__ = [
    "convergence_figure",
    "curvature_figure",
    "figure_to_png_base64",
    "histogram_figure",
    "image_figure",
    "image_payload",
    "image_to_png_base64",
    "line_figure",
    "scatter_figure",
]

_DEFAULT_SIZE = (6.4, 3.6)


def _new_figure(figsize: tuple[float, float] = _DEFAULT_SIZE, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    """A fresh Agg-backed figure (no pyplot registry) with ``ncols`` axes side by side.

    Returns:
        The figure and its axes.

    Raises:
        ImportError: If matplotlib is not installed.
    """
    if not _MATPLOTLIB_AVAILABLE:
        raise ImportError(
            "lightning_influence needs matplotlib to draw figures for the report and the loggers: "
            f"`pip install matplotlib` ({_MATPLOTLIB_AVAILABLE.message})."
        )
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _floats(values: Any) -> list[float]:
    """Coerce a sequence/tensor/array of numbers (``None`` allowed) to a list of floats (``None`` → NaN)."""
    if values is None:
        return []
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().reshape(-1).tolist()
    elif hasattr(values, "tolist"):  # numpy array
        values = values.reshape(-1).tolist() if hasattr(values, "reshape") else values.tolist()
    out = []
    for v in values:
        try:
            out.append(float("nan") if v is None else float(v))
        except (TypeError, ValueError):
            out.append(float("nan"))
    return out


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _positive_spread(values: Sequence[float]) -> bool:
    """Whether a log scale helps: all positive and spanning more than two decades."""
    vals = _finite(values)
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 100.0


def curvature_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    """Curvature history: trace (with a ±2 stderr band), λ_max and the critical batch size vs step.

    Args:
        history: One dict per measurement with ``"step"`` and any of ``"trace"``, ``"trace_stderr"``,
            ``"lambda_max"``, ``"critical_batch_size"`` (``None``/NaN values are skipped).

    Returns:
        A figure with three panels side by side.

    Example::

        >>> fig = curvature_figure([{"step": 0, "trace": 4.0, "trace_stderr": 0.2, "lambda_max": 1.0,
        ...                          "critical_batch_size": 4.0}, {"step": 10, "trace": 3.0, "lambda_max": 0.8}])
        >>> [ax.get_title() for ax in fig.axes]
        ['Trace of the GNH', 'Largest eigenvalue λ_max', 'Critical batch size Tr/λ_max']
    """
    fig, (ax_tr, ax_lm, ax_cb) = _new_figure((12.0, 3.4), ncols=3)
    steps = _floats([row.get("step", i) for i, row in enumerate(history)])

    def series(key: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for s, row in zip(steps, history, strict=False):
            vals = _floats([row.get(key)])
            if vals and math.isfinite(vals[0]):
                xs.append(s)
                ys.append(vals[0])
        return xs, ys

    xs, tr = series("trace")
    if xs:
        ax_tr.plot(xs, tr, marker="o", ms=3, color="C0", label="Hutchinson trace")
        band = [(s, t, _floats([row.get("trace_stderr")])[0]) for s, t, row in zip(steps, tr, history, strict=False)]
        bx = [s for s, t, e in band if math.isfinite(e)]
        if bx and len(bx) == len(xs):
            lo = [t - 2 * e for _, t, e in band]
            hi = [t + 2 * e for _, t, e in band]
            ax_tr.fill_between(xs, lo, hi, color="C0", alpha=0.2, label="±2 stderr")
        ax_tr.legend(fontsize=8)
    ax_tr.set_title("Trace of the GNH")
    for ax, key, title, color in (
        (ax_lm, "lambda_max", "Largest eigenvalue λ_max", "C1"),
        (ax_cb, "critical_batch_size", "Critical batch size Tr/λ_max", "C2"),
    ):
        xs_k, ys_k = series(key)
        if xs_k:
            ax.plot(xs_k, ys_k, marker="o", ms=3, color=color)
            if _positive_spread(ys_k):
                ax.set_yscale("log")
        ax.set_title(title)
    for ax in (ax_tr, ax_lm, ax_cb):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return fig


def line_figure(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    title: str,
    xlabel: str,
    ylabel: str = "",
    logx: bool | None = None,
    logy: bool | None = None,
) -> Figure:
    """Several named series against a common x axis.

    Args:
        xs: x values.
        series: Name → y values (same length as ``xs``; ``None``/NaN points are skipped).
        title: Axes title.
        xlabel: x-axis label.
        ylabel: y-axis label.
        logx: Log-scale x; ``None`` decides from the data (all positive, > 2 decades).
        logy: Log-scale y; ``None`` decides from the data.

    Returns:
        The figure.

    Example::

        >>> fig = line_figure([1e-3, 1e-2, 1e-1], {"approx": [0.5, 0.4, 0.6], "exact": [0.5, 0.41, 0.62]},
        ...                   title="CV", xlabel="λ")
        >>> len(fig.axes[0].lines)
        2
    """
    fig, (ax,) = _new_figure()
    x = _floats(xs)
    all_y: list[float] = []
    for i, (name, ys) in enumerate(series.items()):
        y = _floats(ys)
        pts = [(a, b) for a, b in zip(x, y, strict=False) if math.isfinite(a) and math.isfinite(b)]
        if not pts:
            continue
        all_y.extend(b for _, b in pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=str(name), color=f"C{i % 10}")
    if logx if logx is not None else _positive_spread(x):
        ax.set_xscale("log")
    if logy if logy is not None else _positive_spread(all_y):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return fig


def scatter_figure(x: Sequence[float], y: Sequence[float], title: str, xlabel: str, ylabel: str) -> Figure:
    """Scatter of ``y`` against ``x`` with the identity line (for estimator-vs-reference plots).

    Args:
        x: Reference values (e.g. PBRF responses).
        y: Estimates (e.g. influence scores), same length.
        title: Axes title.
        xlabel: x-axis label.
        ylabel: y-axis label.

    Returns:
        The figure.

    Example::

        >>> fig = scatter_figure([0.0, 1.0, 2.0], [0.1, 0.9, 2.2], "PBRF vs LiSSA", "PBRF", "LiSSA")
        >>> fig.axes[0].get_xlabel()
        'PBRF'
    """
    fig, (ax,) = _new_figure((4.2, 4.0))
    pts = [(a, b) for a, b in zip(_floats(x), _floats(y), strict=False) if math.isfinite(a) and math.isfinite(b)]
    if pts:
        xa, ya = [p[0] for p in pts], [p[1] for p in pts]
        ax.scatter(xa, ya, s=14, alpha=0.75, color="C0")
        lo, hi = min(min(xa), min(ya)), max(max(xa), max(ya))
        if hi > lo:
            ax.plot([lo, hi], [lo, hi], ls="--", lw=1, color="0.4", label="y = x")
            ax.legend(fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig


def histogram_figure(values: Sequence[float], title: str, xlabel: str = "value", bins: int = 40) -> Figure:
    """Histogram of the finite entries of ``values`` (log-count axis when the tail is heavy).

    Args:
        values: Values (tensor, array or list; NaN/inf are dropped).
        title: Axes title.
        xlabel: x-axis label.
        bins: Number of bins.

    Returns:
        The figure.

    Example::

        >>> fig = histogram_figure([0.1, 0.2, 0.2, 5.0], "Self-influence")
        >>> fig.axes[0].get_title()
        'Self-influence'
    """
    fig, (ax,) = _new_figure((6.0, 3.4))
    vals = _finite(_floats(values))
    if vals:
        ax.hist(vals, bins=max(1, min(bins, len(vals))), color="C0", alpha=0.85)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    return fig


def convergence_figure(history: Sequence[float] | Mapping[str, Sequence[float]], title: str) -> Figure:
    """Solver convergence: relative residual (or any error) per iteration, log-scale y.

    Args:
        history: Residual per iteration, or name → residual list for several runs.
        title: Axes title.

    Returns:
        The figure.

    Example::

        >>> fig = convergence_figure([1.0, 0.1, 0.01, 1e-4], "CG")
        >>> fig.axes[0].get_yscale()
        'log'
    """
    fig, (ax,) = _new_figure((6.0, 3.4))
    runs = dict(history) if isinstance(history, Mapping) else {"residual": history}
    for i, (name, hist) in enumerate(runs.items()):
        ys = _floats(hist)
        pts = [(k + 1, v) for k, v in enumerate(ys) if math.isfinite(v) and v > 0]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}", label=str(name))
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel("relative residual")
    ax.grid(alpha=0.3, which="both")
    if len(runs) > 1:
        ax.legend(fontsize=8)
    return fig


def image_figure(images: Sequence[Any], titles: Sequence[str] | None = None, title: str = "") -> Figure:
    """A row of small images (``HxW`` grey, ``HxWxC`` or ``CxHxW`` with C in {1, 3, 4}).

    Args:
        images: Arrays/tensors/nested lists.
        titles: Optional caption per image.
        title: Figure title.

    Returns:
        The figure.

    Example::

        >>> fig = image_figure([[[0.0, 1.0], [1.0, 0.0]]], titles=["q0"])
        >>> len(fig.axes)
        1
    """
    n = max(1, len(images))
    fig, axes = _new_figure((1.4 * n, 1.7), ncols=n)
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < len(images):
            arr = to_image_array(images[i])
            if arr is not None:
                ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, interpolation="nearest")
            if titles is not None and i < len(titles):
                ax.set_title(str(titles[i]), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _float_array(x: Any) -> Any:
    """``x`` (tensor, array or nested lists) as a float64 numpy array, or ``None`` if it is not numeric."""
    import numpy as np

    try:
        if hasattr(x, "detach"):  # torch tensor, any dtype (bfloat16 has no numpy equivalent)
            x = x.detach().cpu().double().numpy()
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def to_image_array(image: Any) -> Any:
    """Normalise an image to a NumPy ``HxW`` or ``HxWxC`` float array in [0, 1], or ``None`` if unusable.

    Accepts tensors, arrays or nested lists shaped ``HxW``, ``HxWxC`` or ``CxHxW`` (C in {1, 3, 4}); a flat
    vector whose length is a perfect square is reshaped to a square grey image. Values are min-max scaled.

    Args:
        image: The image.

    Returns:
        A float array or ``None``.

    Example::

        >>> to_image_array([[0.0, 2.0], [4.0, 8.0]]).tolist()
        [[0.0, 0.25], [0.5, 1.0]]
        >>> import torch
        >>> to_image_array(torch.zeros(3, 5, 4)).shape  # CxHxW → HxWxC
        (5, 4, 3)
    """
    import numpy as np

    arr = _float_array(image)
    if arr is None:
        return None
    if arr.ndim == 1:
        side = math.isqrt(arr.size)
        if side * side != arr.size or side == 0:
            return None
        arr = arr.reshape(side, side)
    if arr.ndim == 3:
        chw_ok, hwc_ok = arr.shape[0] in (1, 3, 4), arr.shape[-1] in (1, 3, 4)
        if chw_ok and (not hwc_ok or min(arr.shape[1:]) >= min(arr.shape[:2])):  # ambiguous: larger spatial size
            arr = np.moveaxis(arr, 0, -1)
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.shape[-1] not in (3, 4):
            return None
    if arr.ndim not in (2, 3) or arr.size == 0:
        return None
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return arr


def image_payload(x: Any, allow_flat_square: bool = False, decimals: int = 4) -> list[Any] | None:
    """A compact JSON payload for the report's ``query_images`` / ``train_images``, or ``None`` if ``x`` is no image.

    An image is a tensor/array shaped ``HxW``, ``HxWxC`` or ``CxHxW`` with C in {1, 3, 4} and H, W ≥ 4. With
    ``allow_flat_square=True`` a flat vector of perfect-square length ≥ 16 (sklearn digits: 64 → 8x8) counts too;
    it is off by default because tabular features must not be drawn as pictures. Values are min-max scaled
    to [0, 1] and rounded to ``decimals`` digits to keep ``report.json`` small.

    Args:
        x: One input example (e.g. ``dataset[i][0]``).
        allow_flat_square: Treat flat perfect-square vectors as square grey images.
        decimals: Rounding of the stored values.

    Returns:
        Nested lists ``HxW`` or ``HxWxC``, or ``None``.

    Example::

        >>> import torch
        >>> image_payload(torch.zeros(1, 4, 4)) == [[0.0] * 4] * 4
        True
        >>> image_payload(torch.arange(64.0)) is None, len(image_payload(torch.arange(64.0), allow_flat_square=True))
        (True, 8)
    """
    import numpy as np

    arr = _float_array(x)
    if arr is None:
        return None
    if arr.ndim == 1:
        side = math.isqrt(arr.size)
        if not (allow_flat_square and side >= 4 and side * side == arr.size):
            return None
    elif arr.ndim == 2:
        if min(arr.shape) < 4:
            return None
    elif arr.ndim == 3:
        chw = arr.shape[0] in (1, 3, 4) and min(arr.shape[1:]) >= 4
        hwc = arr.shape[-1] in (1, 3, 4) and min(arr.shape[:2]) >= 4
        if not (chw or hwc):
            return None
    else:
        return None
    img = to_image_array(arr)
    if img is None:
        return None
    out: list[Any] = np.round(img, decimals).tolist()
    return out


def image_to_png_base64(image: Any) -> str | None:
    """Encode one image (see :func:`to_image_array`) as base64 PNG at its native resolution, or ``None``.

    Args:
        image: ``HxW``, ``HxWxC`` or ``CxHxW`` tensor/array/list.

    Returns:
        ASCII base64 of the PNG bytes, or ``None`` if the input is not an image.

    Raises:
        ImportError: If matplotlib is not installed.

    Example::

        >>> image_to_png_base64([[0.0, 1.0], [1.0, 0.0]])[:8]
        'iVBORw0K'
        >>> image_to_png_base64([1.0, 2.0, 3.0]) is None
        True
    """
    if not _MATPLOTLIB_AVAILABLE:
        raise ImportError(
            f"Encoding images needs matplotlib: `pip install matplotlib` ({_MATPLOTLIB_AVAILABLE.message})."
        )
    from matplotlib.image import imsave

    arr = to_image_array(image)
    if arr is None:
        return None
    buf = io.BytesIO()
    imsave(buf, arr, format="png", cmap="gray", vmin=0.0, vmax=1.0)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figure_to_png_base64(fig: Figure, dpi: int = 100) -> str:
    """Render ``fig`` to PNG, close it, and return the base64 text (for ``data:image/png;base64,`` URIs).

    Args:
        fig: The figure (closed afterwards, also when it was created through pyplot).
        dpi: Resolution.

    Returns:
        ASCII base64 of the PNG bytes.

    Example::

        >>> fig = histogram_figure([1.0, 2.0], "h")
        >>> figure_to_png_base64(fig).startswith("iVBORw0K"), fig.axes
        (True, [])
    """
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        close_figure(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def close_figure(fig: Figure) -> None:
    """Release a figure, whether or not it is registered with pyplot.

    Args:
        fig: The figure.

    Example::

        >>> fig = histogram_figure([1.0], "h")
        >>> close_figure(fig)
        >>> fig.axes
        []
    """
    import sys

    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        plt.close(fig)
    fig.clf()
