"""Exceptions raised by lightning_influence.

The numerical layers stay free of Lightning, so these are plain Python exceptions. The callbacks raise
:class:`lightning_influence.callbacks.MisconfigurationError`, which additionally subclasses Lightning's
``MisconfigurationException``.
"""

from __future__ import annotations


class LightningInfluenceError(Exception):
    """Base class of every error this package raises on purpose.

    Example::

        >>> try:
        ...     raise DivergenceError("LiSSA diverged; lower lissa_scale")
        ... except LightningInfluenceError as e:
        ...     print(type(e).__name__)
        DivergenceError
    """


class ConfigurationError(LightningInfluenceError, ValueError):
    """An argument, model or data set does not fit what the estimator needs. The message names the fix.

    Example::

        >>> try:
        ...     raise ConfigurationError("damping must be > 0; pass damping=1e-3")
        ... except ValueError as e:
        ...     print(type(e).__name__, isinstance(e, LightningInfluenceError))
        ConfigurationError True
    """


class BatchFormatError(ConfigurationError):
    """A batch could not be turned into ``(outputs, targets)`` by the task.

    Example::

        >>> try:
        ...     raise BatchFormatError("expected an (inputs, targets) pair, got a dict")
        ... except ConfigurationError as e:
        ...     print(type(e).__name__, isinstance(e, ValueError))
        BatchFormatError True
    """


class NonFiniteError(LightningInfluenceError, FloatingPointError):
    """A curvature product, gradient or estimate contains NaN or Inf.

    Example::

        >>> try:
        ...     raise NonFiniteError("the curvature product contains NaN")
        ... except FloatingPointError as e:
        ...     print(type(e).__name__, isinstance(e, LightningInfluenceError))
        NonFiniteError True
    """


class DivergenceError(LightningInfluenceError, RuntimeError):
    """An iterative solver diverged; the message says which setting to change.

    Example::

        >>> try:
        ...     raise DivergenceError("LiSSA diverged; lower lissa_scale")
        ... except RuntimeError as e:
        ...     print(type(e).__name__, isinstance(e, LightningInfluenceError))
        DivergenceError True
    """


class LossMismatchWarning(UserWarning):
    """The module trains on a loss other than the task's (label smoothing, class weights, a custom loss...).

    Curvature, influence and CV all assume the task's loss; the message names the loss assumed and how to declare
    the real one (e.g. ``Classification(label_smoothing=0.1)``).

    Example::

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("trained with label smoothing", LossMismatchWarning)
        >>> issubclass(w[0].category, UserWarning)
        True
    """
