"""Test-wide fixtures: environment isolation and process-group teardown. Nothing is seeded globally."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _isolate_environment() -> Iterator[None]:
    """Restore ``os.environ`` after each test, default W&B to offline-disabled, tear down process groups."""
    saved = dict(os.environ)
    os.environ.setdefault("WANDB_MODE", "disabled")
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
