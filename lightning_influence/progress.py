"""Progress bars with an ETA for the train-end stages (per chunk, per fold, per PBRF pair).

One tiny helper on ``tqdm`` (a Lightning dependency): :func:`stage_progress` returns a bar on global rank 0 when the
Trainer shows its own progress bar, else a no-op with the same methods, so the stages call it unconditionally.
:func:`warn_projected_cost` is the one place a stage warns *before* it starts that its projected cost is large.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["COST_WARN_EPOCHS", "StageProgress", "cost_budget", "stage_progress", "warn_projected_cost"]

#: A train-end stage projected above this many training epochs (one epoch = one gradient pass over the training
#: data) warns before it starts (:func:`cost_budget`).
COST_WARN_EPOCHS = 10.0


def cost_budget(trainer: Any) -> float:
    """The gradient passes a train-end stage may take without a warning: :data:`COST_WARN_EPOCHS` × epochs trained.

    Args:
        trainer: The Trainer (``max_epochs`` read; ``None``/``-1``/missing count as one epoch).

    Returns:
        The budget in gradient-equivalent passes over the training data.

    Example::

        >>> from types import SimpleNamespace
        >>> cost_budget(SimpleNamespace(max_epochs=3)), cost_budget(SimpleNamespace(max_epochs=-1))
        (30.0, 10.0)
    """
    epochs = getattr(trainer, "max_epochs", None)
    return COST_WARN_EPOCHS * float(epochs if isinstance(epochs, int) and epochs > 0 else 1)


def warn_projected_cost(what: str, fix: str, passes: float | None = None, budget: float | None = None,
                        stacklevel: int = 3) -> bool:
    """Warn (``UserWarning``) before a costly stage starts, with its projected cost and the setting that changes it.

    Args:
        what: The stage and setting, e.g. ``"ApproximateCV: 5 folds of CG"``.
        fix: The setting that makes it cheaper (appended after the cost).
        passes: Projected gradient-equivalent passes over the training data (``None``: ``what`` states the cost).
        budget: Warn only when ``passes`` exceeds it (``None``: always warn).
        stacklevel: Passed to :func:`warnings.warn`.

    Returns:
        Whether it warned.

    Example::

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     warn_projected_cost("demo stage", "lower n.", passes=500, budget=100), warn_projected_cost(
        ...         "demo stage", "lower n.", passes=50, budget=100)
        (True, False)
        >>> str(w[0].message).startswith("demo stage: projected about 500 gradient passes"), len(w)
        (True, 1)
    """
    if passes is not None and budget is not None and passes <= budget:
        return False
    cost = "" if passes is None else f": projected about {passes:,.0f} gradient passes over the training data"
    if passes is not None and budget is not None:
        cost += f" (the budget without a warning is {budget:,.0f}: {COST_WARN_EPOCHS:g}x the epochs trained)"
    warnings.warn(f"{what}{cost}; {fix}", UserWarning, stacklevel=stacklevel)
    return True


class StageProgress:
    """A tqdm bar (or nothing) counting the units of one stage.

    Args:
        total: Units in the stage (folds, pairs, examples).
        desc: Label, e.g. ``"ApproximateCV: folds"``.
        enabled: Draw the bar (``False``: every method is a no-op).

    Example::

        >>> bar = StageProgress(3, "demo", enabled=False)
        >>> bar.update(1); bar.set(3); bar("resumed", 2, 3); bar.close()
        >>> bar.enabled
        False
    """

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.enabled = bool(enabled)
        self._bar: Any = None
        if self.enabled:
            from tqdm.auto import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` units."""
        if self._bar is not None:
            self._bar.update(n)

    def set(self, done: int) -> None:
        """Set the count of finished units."""
        if self._bar is not None:
            self._bar.n = done
            self._bar.refresh()

    def resumed(self, done: int) -> None:
        """Set the count of units read back from a store (they count towards the start, not the rate or ETA)."""
        if self._bar is not None:
            self._bar.initial = self._bar.n = done
            self._bar.refresh()

    def __call__(self, stage: str, done: int, total: int) -> None:
        """The ``progress(stage, done, total)`` callback of ``influence_scores`` (stage ``"resumed"`` or a name)."""
        (self.resumed if stage == "resumed" else self.set)(done)

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def stage_progress(trainer: Any, total: int, desc: str, enabled: bool = True) -> StageProgress:
    """A :class:`StageProgress` shown only on global rank 0 and only when the Trainer has a progress bar.

    Returns:
        The bar (a no-op one when hidden).

    Example::

        >>> from types import SimpleNamespace
        >>> quiet = SimpleNamespace(is_global_zero=True, progress_bar_callback=None)
        >>> stage_progress(quiet, 5, "ApproximateCV: folds").enabled
        False
    """
    shown = (enabled and bool(getattr(trainer, "is_global_zero", True))
             and getattr(trainer, "progress_bar_callback", None) is not None)
    return StageProgress(total, desc, enabled=shown)
