"""lightning_influence: curvature monitoring and influence functions for PyTorch Lightning.

The numerical layers (:mod:`~lightning_influence.losses`, :mod:`~lightning_influence.tasks`,
:mod:`~lightning_influence.params`, :mod:`~lightning_influence.operators`, :mod:`~lightning_influence.spectrum`,
:mod:`~lightning_influence.solvers`, ...) are plain PyTorch and are imported from their modules. The Lightning
callbacks will be re-exported here once they exist.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lightning-influence")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
