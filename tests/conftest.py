"""Test-wide fixtures: environment isolation and process-group teardown. Nothing is seeded globally."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the test problems are tiny and overhead-bound, and two threads per process on a shared
    2-core machine (or beside ddp_spawn workers) are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
