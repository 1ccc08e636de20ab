"""Exceptions raised by lightning_influence.

The numerical layers stay free of Lightning, so these are plain Python exceptions. The callbacks raise
:class:`lightning_influence.callbacks.MisconfigurationError`, which additionally subclasses Lightning's
``MisconfigurationException``.
"""

from __future__ import annotations


class LightningInfluenceError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigurationError(LightningInfluenceError, ValueError):
    """An argument, model or data set does not fit what the estimator needs. The message names the fix."""


class BatchFormatError(ConfigurationError):
    """A batch could not be turned into ``(outputs, targets)`` by the task."""


class NonFiniteError(LightningInfluenceError, FloatingPointError):
    """A curvature product, gradient or estimate contains NaN or Inf."""


class DivergenceError(LightningInfluenceError, RuntimeError):
    """An iterative solver diverged; the message says which setting to change."""
