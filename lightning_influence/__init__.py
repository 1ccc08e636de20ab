"""lightning_influence: curvature monitoring and influence functions for PyTorch Lightning.

The numerical layers (:mod:`~lightning_influence.losses`, :mod:`~lightning_influence.tasks`,
:mod:`~lightning_influence.params`, :mod:`~lightning_influence.operators`, :mod:`~lightning_influence.spectrum`,
:mod:`~lightning_influence.solvers`, ...) are plain PyTorch and are imported from their modules.

The Lightning callbacks are importable from the package itself (``from lightning_influence import
CurvatureMonitor``). They are loaded lazily on first access, so ``import lightning_influence`` and the numerics
never import Lightning.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("lightning-influence")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

#: Public callbacks: name -> module that defines it (loaded on first attribute access, PEP 562).
_LAZY_CALLBACKS = {
    "CurvatureMonitor": "lightning_influence.callbacks.curvature_monitor",
    "InfluenceReport": "lightning_influence.callbacks.influence_report",
    "ApproximateCV": "lightning_influence.callbacks.approximate_cv",
    "PBRFValidation": "lightning_influence.callbacks.pbrf_validation",
    "AttributionBenchmark": "lightning_influence.callbacks.attribution_benchmark",
}

if TYPE_CHECKING:
    from lightning_influence.callbacks.approximate_cv import ApproximateCV
    from lightning_influence.callbacks.attribution_benchmark import AttributionBenchmark
    from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
    from lightning_influence.callbacks.influence_report import InfluenceReport
    from lightning_influence.callbacks.pbrf_validation import PBRFValidation

__all__ = [
    "ApproximateCV",
    "AttributionBenchmark",
    "CurvatureMonitor",
    "InfluenceReport",
    "PBRFValidation",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Load a callback class on first access.

    Returns:
        The callback class ``name``.

    Raises:
        AttributeError: For a name that is not a public callback, or whose module is not in this version.
        ModuleNotFoundError: If the callback's module needs a package that is not installed.
    """
    module_name = _LAZY_CALLBACKS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lightning_influence' has no attribute {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:  # a missing dependency of the module: report it as it is
            raise
        raise AttributeError(f"lightning_influence.{name} is not available in this version ({module_name}).") from err
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_CALLBACKS))
