"""Small real data sets for tests."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor


@lru_cache(maxsize=1)
def _digits_numpy() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)  # constant pixels stay 0
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def digits_tensors(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """sklearn's 8x8 digits, standardised per feature: ``X`` of shape ``(1797, 64)`` in ``dtype``, ``y`` int64."""
    x, y = _digits_numpy()
    return torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=torch.int64)
