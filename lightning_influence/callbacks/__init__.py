"""Lightning callbacks: thin layers that pick data, call the numerics, reduce over ranks, log and write reports.

Each callback lives in its own module; shared Trainer plumbing (strategy checks, rank/world, reductions, dataset
resolution, output directories, scalar logging) is in :mod:`lightning_influence.callbacks._common`.
"""

from __future__ import annotations

from lightning_influence.callbacks._common import SUPPORTED_STRATEGIES, MisconfigurationError
from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor

__all__ = ["SUPPORTED_STRATEGIES", "CurvatureMonitor", "MisconfigurationError"]
