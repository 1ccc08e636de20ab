"""Progress bars with an ETA for the train-end stages (per chunk, per fold, per PBRF pair).

One tiny helper on ``tqdm`` (a Lightning dependency): :func:`stage_progress` returns a bar on global rank 0 when the
Trainer shows its own progress bar, else a no-op with the same methods, so the stages call it unconditionally.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StageProgress", "stage_progress"]


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
