"""Seeded global draws, per-rank shards, sum-reducers, and the Trainer plumbing in callbacks/_common.py.

Sharded operator products are checked against the serial dense GNH with an in-process "world" of threads that
sum through a barrier (exact, and fast); the gloo reductions (``torch_distributed_reducer`` and the Lightning
strategy's ``reduce(sum)`` behind ``make_reduce_fn``) are exercised by the ddp_spawn test in
``test_curvature_monitor.py``, which already pays for the worker processes.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_influence.callbacks._common import (
    MisconfigurationError,
    check_strategy,
    log_scalars,
    make_reduce_fn,
    output_dir,
    rank_world,
    resolve_data,
    unwrap_module,
)
from lightning_influence.distributed import (
    CountingReducer,
    global_sample_indices,
    make_shard,
    reduce_sum_and_count,
    shard_indices,
    shard_sizes,
    sum_reducer,
    torch_distributed_reducer,
)
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.operators import GNHOperator, make_batches
from lightning_influence.spectrum import estimate_spectrum
from lightning_influence.tasks import Classification
from tests.helpers.models import tiny_mlp

DT = torch.float64


# ------------------------------------------------------------------------------------------ draws, shards
def test_global_sample_indices_is_seeded_without_replacement_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a = global_sample_indices(100, 30, seed=3)
    b = global_sample_indices(100, 30, seed=3)
    c = global_sample_indices(100, 30, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.int64 and len(a) == 30 and len(set(a.tolist())) == 30
    assert int(a.min()) >= 0 and int(a.max()) < 100
    assert torch.equal(a, torch.sort(a).values)
    assert torch.equal(global_sample_indices(5), torch.arange(5))
    assert torch.equal(global_sample_indices(5, 5, seed=9), torch.arange(5))  # the whole set, sorted


@pytest.mark.parametrize(
    ("n", "size", "match"), [(10, 11, "larger than the dataset"), (10, 0, ">= 1"), (0, 1, "empty")]
)
def test_global_sample_indices_errors(n: int, size: int, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        global_sample_indices(n, size, seed=0)


@pytest.mark.parametrize("mode", ["contiguous", "strided"])
@pytest.mark.parametrize(("total", "world"), [(7, 2), (8, 2), (1, 3), (0, 2), (10, 4), (5, 1)])
def test_shards_partition_the_sample_without_padding(total: int, world: int, mode: str) -> None:
    idx = global_sample_indices(50, total, seed=1) if total else torch.zeros(0, dtype=torch.int64)
    shards = [shard_indices(idx, r, world, mode) for r in range(world)]  # type: ignore[arg-type]
    assert sum(len(s) for s in shards) == total
    assert sorted(torch.cat(shards).tolist()) == sorted(idx.tolist())  # a partition: no duplicates, nothing lost
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    if mode == "contiguous":
        assert sizes == shard_sizes(total, world)


def test_uneven_and_empty_shards() -> None:
    idx = torch.arange(7)
    assert shard_indices(idx, 0, 2).tolist() == [0, 1, 2, 3]
    assert shard_indices(idx, 1, 2).tolist() == [4, 5, 6]
    assert shard_indices(idx, 1, 2, "strided").tolist() == [1, 3, 5]
    assert shard_indices(torch.arange(1), 1, 2).numel() == 0
    spec = make_shard(20, 7, seed=0, rank=1, world_size=2)
    assert (spec.global_size, spec.local_size, spec.to_dict()["world_size"]) == (7, 3, 2)
    assert torch.equal(spec.indices, spec.global_indices[4:])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rank": 2, "world_size": 2}, "rank must be"), ({"rank": 0, "world_size": 0}, "world_size"),
     ({"rank": 0, "world_size": 2, "mode": "blocks"}, "mode")],
)
def test_shard_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        shard_indices(torch.arange(4), **kwargs)


# ------------------------------------------------------------------------------------------------ reducers
def test_sum_reducer_clones_and_checks_shape() -> None:
    def in_place(t: Tensor) -> Tensor:
        return t.mul_(2)

    local = torch.ones(3)
    out = sum_reducer(in_place)(local)
    assert torch.equal(local, torch.ones(3)) and torch.equal(out, 2 * torch.ones(3))
    with pytest.raises(RuntimeError, match="expected a tensor of shape"):
        sum_reducer(lambda t: t[:1])(torch.ones(3))
    counter = CountingReducer()
    s, n = reduce_sum_and_count(torch.tensor([[1.0, 2.0]]), 3, counter)
    assert torch.equal(s, torch.tensor([[1.0, 2.0]])) and n == 3.0 and counter.calls == 1
    assert torch_distributed_reducer() is None  # no process group


class ThreadWorld:
    """A sum all-reduce between threads: each rank deposits its tensor, all wait, each gets the sum.

    Local computation is serialised by ``compute`` (forward-mode AD levels are process-global, so two threads must
    not compute at once); a rank releases it only while it waits inside a collective.
    """

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.compute = threading.Lock()
        self.slots: list[Tensor | None] = [None] * world

    def reducer(self, rank: int) -> CountingReducer:
        def reduce(t: Tensor) -> Tensor:
            self.slots[rank] = t.clone()
            self.compute.release()
            try:
                self.barrier.wait(timeout=60)
                total = torch.stack([s for s in self.slots if s is not None]).sum(0)
                self.barrier.wait(timeout=60)
            finally:
                self.compute.acquire()
            return total

        return CountingReducer(reduce)


def _sample(n: int = 7) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (n,), generator=g))


def _run_world(world: int, n_sample: int, fn: Any) -> list[Any]:
    tw = ThreadWorld(world)
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        tw.compute.acquire()
        try:
            results[rank] = fn(rank, tw.reducer(rank))
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)
            tw.barrier.abort()
        finally:
            tw.compute.release()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize(("world", "n_sample"), [(2, 7), (3, 2)])  # uneven; and 3 ranks for 2 examples: one empty
def test_sharded_gnh_products_equal_the_serial_dense_gnh(world: int, n_sample: int) -> None:
    ds = _sample(10)
    model = tiny_mlp(dtype=DT)
    task = Classification()
    idx = global_sample_indices(len(ds), n_sample, seed=2)
    dense = GNHOperator(model, task, make_batches(ds, idx, batch_size=3)).dense()
    v = torch.linspace(-1, 1, dense.shape[0], dtype=DT)

    def fn(rank: int, reducer: CountingReducer) -> tuple[Tensor, Tensor, int, int, int]:
        local = shard_indices(idx, rank, world)
        op = GNHOperator(copy.deepcopy(model), task, make_batches(ds, local, batch_size=3), reduce_fn=reducer)
        mv = op.matvec(v)
        qf = op.quadratic_form(v)
        return mv, qf, reducer.calls, op.examples_processed, len(local)

    results = _run_world(world, n_sample, fn)
    for mv, qf, calls, seen, local in results:
        torch.testing.assert_close(mv, dense @ v, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(qf, v @ dense @ v, rtol=1e-12, atol=1e-12)
        assert calls == 2  # exactly one reduction per product, also on an empty shard
        assert seen == 2 * local  # each rank touched only its shard (twice: two products)
    assert sorted(r[4] for r in results) == sorted(shard_sizes(n_sample, world))
    if world == 3:
        assert results[2][4] == 0


def test_sharded_spectrum_equals_serial_spectrum() -> None:
    ds = _sample(12)
    model = tiny_mlp(dtype=DT)
    task = Classification()
    idx = global_sample_indices(len(ds), 7, seed=0)
    serial = estimate_spectrum(GNHOperator(model, task, make_batches(ds, idx, 4)), trace_probes=6, lanczos_iter=10)

    def fn(rank: int, reducer: CountingReducer) -> tuple[Any, int]:
        batches = make_batches(ds, shard_indices(idx, rank, 2), 4)
        op = GNHOperator(copy.deepcopy(model), task, batches, reduce_fn=reducer)
        return estimate_spectrum(op, trace_probes=6, lanczos_iter=10), reducer.calls

    (s0, c0), (s1, c1) = _run_world(2, 7, fn)
    assert c0 == c1  # the same sequence of collectives on both ranks (blocks of probes may share one reduction)
    assert 1 <= c0 <= serial.num_products
    for s in (s0, s1):
        assert s.trace == pytest.approx(serial.trace, rel=1e-10)
        assert s.lambda_max == pytest.approx(serial.lambda_max, rel=1e-10)
        assert s.critical_batch_size == pytest.approx(serial.critical_batch_size, rel=1e-10)


# -------------------------------------------------------------------------------------- _common helpers
def test_check_strategy_accepts_single_device_and_ddp_family_and_rejects_others() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    for strategy in (SingleDeviceStrategy("cpu"), DDPStrategy(), DDPStrategy(start_method="spawn")):
        check_strategy(SimpleNamespace(strategy=strategy), "CurvatureMonitor")  # type: ignore[arg-type]

    class DeepSpeedStrategy(DDPStrategy):  # stands in for the real one (deepspeed is not installed)
        pass

    for strategy in (FSDPStrategy(), ModelParallelStrategy(), DeepSpeedStrategy()):
        with pytest.raises(MisconfigurationError, match=r"does not support .*Supported: single_device, ddp, ddp_spawn"):
            check_strategy(SimpleNamespace(strategy=strategy), "CurvatureMonitor")  # type: ignore[arg-type]
    err = MisconfigurationError("x")
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    assert isinstance(err, MisconfigurationException) and isinstance(err, ValueError)
    assert isinstance(err, ConfigurationError)


def test_rank_world_and_reduce_fn_for_single_process() -> None:
    assert rank_world(SimpleNamespace(distributed_sampler_kwargs=None)) == (0, 1)  # type: ignore[arg-type]
    fake = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 4, "rank": 3})
    assert rank_world(fake) == (3, 4)  # type: ignore[arg-type]
    assert make_reduce_fn(SimpleNamespace(distributed_sampler_kwargs=None)) is None  # type: ignore[arg-type]


def test_unwrap_module_strips_wrappers() -> None:
    inner = torch.nn.Linear(2, 2)
    assert unwrap_module(torch.nn.DataParallel(inner)) is inner
    wrapper = torch.nn.Module()
    wrapper._forward_module = inner  # like Lightning's _LightningModuleWrapperBase
    assert unwrap_module(wrapper) is inner
    assert unwrap_module(inner) is inner


def test_resolve_data_from_trainer_loaders_and_errors() -> None:
    ds = _sample(6)

    def collate(items: list[Any]) -> Any:
        return torch.utils.data.default_collate(items)

    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    trainer = SimpleNamespace(train_dataloader=loader, val_dataloaders=[loader, loader], datamodule=None,
                              lightning_module=None)
    got = resolve_data(trainer, "train", "Mon")  # type: ignore[arg-type]
    assert got.dataset is ds and got.collate_fn is collate and got.source == "train"
    assert resolve_data(trainer, ds, "Mon").source == "user"  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationError, match="2 val dataloaders"):
        resolve_data(trainer, "val", "Mon")  # type: ignore[arg-type]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self) -> Any:
            return iter([])

    stream_trainer = SimpleNamespace(train_dataloader=torch.utils.data.DataLoader(Stream()), datamodule=None)
    with pytest.raises(MisconfigurationError, match=r"map-style .*pass dataset=\.\.\."):
        resolve_data(stream_trainer, "train", "Mon")  # type: ignore[arg-type]
    empty = SimpleNamespace(train_dataloader=None, val_dataloaders=None, datamodule=None, lightning_module=None)
    with pytest.raises(MisconfigurationError, match=r"no val dataloader; pass dataset=\.\.\."):
        resolve_data(empty, "val", "Mon")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationError, match="map-style"):
        resolve_data(empty, Stream(), "Mon")  # type: ignore[arg-type]


def test_log_scalars_logs_on_rank_zero_mirrors_and_warns_once_without_logger(tmp_path: Any) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    class Recorder(CSVLogger):
        def __init__(self) -> None:
            super().__init__(tmp_path)
            self.calls: list[tuple[dict[str, float], int | None]] = []

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.calls.append((dict(metrics), step))

    rec = Recorder()
    trainer = pl.Trainer(logger=rec, default_root_dir=tmp_path, enable_progress_bar=False)
    log_scalars(trainer, {"curvature/trace": 2.5}, step=7)
    assert rec.calls == [({"curvature/trace": 2.5}, 7)]
    assert float(trainer.callback_metrics["curvature/trace"]) == 2.5

    bare = pl.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    with pytest.warns(UserWarning, match="no logger is attached"):
        log_scalars(bare, {"a": 1.0}, step=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_scalars(bare, {"a": 2.0}, step=1)  # once per trainer
    assert float(bare.callback_metrics["a"]) == 2.0
    d = output_dir(bare, "influence")
    assert d == tmp_path / "influence" and d.is_dir()
    assert os.fspath(output_dir(trainer, "x")).startswith(os.fspath(tmp_path))
