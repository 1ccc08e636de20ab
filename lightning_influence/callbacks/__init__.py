"""Lightning callbacks: thin layers that pick data, call the numerics, reduce over ranks, log and write reports.

Each callback lives in its own module; what they share is in :mod:`lightning_influence.callbacks._common`: argument
checks and typed-config resolution for ``__init__``, the run context (unwrapped module, rank, world size,
``reduce_fn``, strategy) and the data it shards, companion-callback lookup, and ``publish`` (scalars, output
directory, rank-0 report section, barrier).
"""

from __future__ import annotations

from lightning_influence.callbacks._common import SUPPORTED_STRATEGIES, MisconfigurationError
from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor

__all__ = ["SUPPORTED_STRATEGIES", "CurvatureMonitor", "MisconfigurationError"]
