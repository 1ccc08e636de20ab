"""The resumable score store: kill-and-resume is bit-identical, config changes restart, bad inputs fail loudly."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_influence.callbacks.influence_report import InfluenceReport
from lightning_influence.exceptions import ConfigurationError
from lightning_influence.influence import InfluenceConfig, influence_scores
from lightning_influence.influence.store import ScoreStore, StoreError, load_store
from lightning_influence.tasks import Classification, Regression
from tests.helpers.lightning_models import JoiningDDPSpawn, TinyClassifier

F64 = torch.float64
N_TRAIN, CHUNK = 23, 4  # 6 chunks, the last one short


def _problem(seed: int = 0) -> tuple[nn.Module, Any, Any]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    x, y = torch.randn(N_TRAIN, 3, generator=g, dtype=F64), torch.randn(N_TRAIN, 1, generator=g, dtype=F64)
    return model, (x, y), (x[:5], y[:5])


def _run(model: nn.Module, train: Any, query: Any, **kw: Any) -> Any:
    kw = {"solver": "cg", "damping": 0.1, "chunk_size": CHUNK, "cg_rtol": 1e-12, "self_influence": True, **kw}
    return influence_scores(model, Regression(), train, query, **kw)


def _npy_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.npy"))}


def _chunks(root: Path, shard: str = "shard-0-of-1") -> list[int]:
    manifest = json.loads((root / shard / "manifest.json").read_text())
    return sorted(int(c) for c, e in manifest["chunks"].items() if e["complete"])


class _Interrupt(Exception):
    pass


def _kill_after(k: int) -> Any:
    seen: list[str] = []

    def hook(stage: str, done: int, total: int) -> None:
        seen.append(stage)
        if stage == "train" and seen.count("train") == k:
            raise _Interrupt(f"killed after {k} chunks")

    return hook


def _same(a: Any, b: Any) -> None:
    assert torch.equal(a.scores, b.scores) and torch.equal(a.self_influence, b.self_influence)
    assert torch.equal(a.train_losses, b.train_losses) and a.solve == b.solve


def test_kill_and_resume_gives_bit_identical_scores_and_files(tmp_path: Path) -> None:
    model, train, query = _problem()
    memory = _run(model, train, query)
    exact = _run(model, train, query, solver="exact")
    assert torch.allclose(memory.scores, exact.scores, rtol=1e-8, atol=1e-12)  # dense float64 ground truth
    assert torch.allclose(memory.self_influence, exact.self_influence, rtol=1e-8)
    whole = _run(model, train, query, store=tmp_path / "whole")
    _same(whole, memory)

    killed = tmp_path / "killed"
    with pytest.raises(_Interrupt):
        _run(model, train, query, store=killed, progress=_kill_after(3))
    assert _chunks(killed) == [0, 1, 2] and not (killed / "scores.npy").exists()
    partial = load_store(killed)  # a user reads what is done with NumPy alone
    done = partial["positions_done"]
    assert done.tolist() == list(range(3 * CHUNK))
    assert np.array_equal(partial["scores"][:, done], memory.scores.numpy()[:, done])
    assert np.isnan(partial["scores"][:, 3 * CHUNK :]).all()

    stages: list[str] = []
    resumed = _run(model, train, query, store=killed, progress=lambda s, d, t: stages.append(s))
    assert stages == ["resumed"] * 3 + ["train"] * 3
    assert resumed.diagnostics["store"]["status"] == "resumed"
    assert resumed.diagnostics["example_gradients"] < whole.diagnostics["example_gradients"]  # work was skipped
    _same(resumed, memory)
    assert _npy_bytes(killed) == _npy_bytes(tmp_path / "whole")  # every chunk and assembled file, byte for byte
    assert np.array_equal(np.load(killed / "scores.npy"), memory.scores.numpy())
    assert np.array_equal(np.load(killed / "self_influence.npy"), memory.self_influence.numpy())


def test_config_or_weight_change_starts_fresh_and_says_what_changed(tmp_path: Path) -> None:
    model, train, query = _problem()
    _run(model, train, query, store=tmp_path)
    ScoreStore(tmp_path).save_array("sketch", np.arange(3.0))  # an opaque extra of this config
    assert np.array_equal(ScoreStore(tmp_path).load_array("sketch"), np.arange(3.0))
    with pytest.warns(UserWarning, match=r"another config \(changed: config\.damping: 0\.1 -> 0\.2\): starting fresh"):
        changed = _run(model, train, query, damping=0.2, store=tmp_path)
    assert changed.diagnostics["store"]["status"] == "restarted"
    assert changed.diagnostics["store"]["resumed_chunks"] == 0
    assert ScoreStore(tmp_path).load_array("sketch") is None  # discarded with the old config's chunks
    _same(changed, _run(model, train, query, damping=0.2))  # never mixed with the damping=0.1 chunks

    other_weights, _, _ = _problem(seed=1)
    with pytest.warns(UserWarning, match=r"changed: model: "):
        _run(other_weights, train, query, damping=0.2, store=tmp_path)
    with pytest.warns(UserWarning, match=r"changed: train_indices: "):
        _run(other_weights, train, query, damping=0.2, store=tmp_path, train_indices=range(20))

    before = _npy_bytes(tmp_path)
    strict = ScoreStore(tmp_path, on_mismatch="raise")
    with pytest.raises(ConfigurationError, match=r"holds scores of another config \(changed: config\.damping"):
        _run(other_weights, train, query, damping=0.3, store=strict, train_indices=range(20))
    assert _npy_bytes(tmp_path) == before  # raising touched nothing


def test_a_directory_that_is_not_a_store_is_refused_and_left_alone(tmp_path: Path) -> None:
    model, train, query = _problem()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigurationError, match=r"is not a lightning_influence score store \(it holds \['notes"):
        _run(model, train, query, store=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "someone_else/3"}))
    with pytest.raises(ConfigurationError, match=r"its manifest\.json is not a score store's"):
        _run(model, train, query, store=other)
    with pytest.raises(ConfigurationError, match=r"rank=3 must lie in \[0, world_size=2\)"):
        ScoreStore(tmp_path, rank=3, world_size=2)


def test_full_disk_raises_naming_the_directory_and_marks_no_partial_chunk_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, train, query = _problem()
    reference = _run(model, train, query, store=tmp_path / "ref")
    real_write = np.lib.format.write_array
    calls = {"n": 0}

    def write_until_full(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 9:  # 4 arrays per chunk: chunks 0 and 1 fit, chunk 2 fails after its first array
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", write_until_full)
    store = tmp_path / "full"
    with pytest.raises(StoreError, match=rf"chunk 2 of the score store in {store} .*the disk is full") as err:
        _run(model, train, query, store=store)
    assert err.value.errno == errno.ENOSPC
    assert _chunks(store) == [0, 1]  # chunk 2's first file is on disk, but it is not marked complete
    assert (store / "shard-0-of-1" / "chunk-000002.positions.npy").exists()
    assert not list(store.rglob("*.tmp")) and not (store / "scores.npy").exists()

    monkeypatch.setattr(np.lib.format, "write_array", real_write)
    resumed = _run(model, train, query, store=store)
    assert resumed.diagnostics["store"]["resumed_chunks"] == 2
    _same(resumed, reference)
    assert _npy_bytes(store) == _npy_bytes(tmp_path / "ref")


def test_a_complete_chunk_with_a_missing_or_truncated_file_is_recomputed(tmp_path: Path) -> None:
    model, train, query = _problem()
    reference = _run(model, train, query, store=tmp_path)
    shard = tmp_path / "shard-0-of-1"
    (shard / "chunk-000001.scores.npy").unlink()
    np.save(shard / "chunk-000004.self_influence.npy", np.zeros(2))  # wrong shape: a foreign or truncated file
    resumed = _run(model, train, query, store=tmp_path)
    assert resumed.diagnostics["store"]["resumed_chunks"] == 4
    _same(resumed, reference)


# --------------------------------------------------------------------------------------------- callback
def _fit(root: Path, devices: int, **cb_kwargs: Any) -> L.Trainer:
    cb = InfluenceReport(Classification(), solver="cg", damping=1e-2, max_queries=4, progress_bar=False,
                         config=InfluenceConfig(chunk_size=4, cg_rtol=1e-12, self_influence=True), **cb_kwargs)
    kwargs: dict[str, Any] = {"strategy": JoiningDDPSpawn()} if devices == 2 else {}
    trainer = L.Trainer(default_root_dir=root, max_steps=1, accelerator="cpu", devices=devices, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=[cb], **kwargs)
    trainer.fit(TinyClassifier(n=21, lr=0.0, shuffle=False))  # lr=0: every run scores the same weights
    return trainer


@pytest.mark.timeout(240)
def test_ddp_spawn_store_has_one_shard_per_rank_and_equals_one_rank(tmp_path: Path) -> None:
    _fit(tmp_path / "one", 1, query_data="train")
    _fit(tmp_path / "two", 2, query_data="train")
    one, two = (load_store(tmp_path / d / "influence" / "store") for d in ("one", "two"))
    result = InfluenceReport.load_result(tmp_path / "one" / "influence")
    assert np.array_equal(one["scores"], result.scores.numpy())
    assert one["scores"].shape == two["scores"].shape == (4, 21)
    for name in ("scores", "self_influence", "train_losses"):  # CG under DDP differs only in the order of sums
        assert np.allclose(one[name], two[name], rtol=1e-8, atol=1e-12), name
    shards = sorted(p.name for p in (tmp_path / "two" / "influence" / "store").glob("shard-*"))
    assert shards == ["shard-0-of-2", "shard-1-of-2"]
    store = tmp_path / "two" / "influence" / "store"
    rows = [sum(np.load(p).size for p in (store / s).glob("chunk-*.positions.npy")) for s in shards]
    assert rows == [11, 10]  # uneven strided split of 21 examples
    assert [_chunks(store, s) for s in shards] == [list(range(6))] * 2


def test_influence_report_resumes_from_its_store_on_a_rerun(tmp_path: Path) -> None:
    first = InfluenceReport.load_result(_fit(tmp_path, 1, query_data="train").log_dir + "/influence")
    trainer = _fit(tmp_path, 1, query_data="train")
    cb = next(c for c in trainer.callbacks if isinstance(c, InfluenceReport))  # type: ignore[attr-defined]
    assert cb.result is not None and cb.result.diagnostics["store"]["status"] == "resumed"
    assert cb.result.diagnostics["store"]["resumed_chunks"] == 6
    assert torch.equal(cb.result.scores, first.scores) and torch.equal(cb.result.self_influence, first.self_influence)
    assert not (InfluenceReport(Classification(), store=False).store)
    with pytest.raises(Exception, match="store must be True, False or a directory"):
        InfluenceReport(Classification(), store=3)  # type: ignore[arg-type]


def test_a_store_error_on_another_rank_raises_here_too(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from lightning_influence.influence.scores import _all_ranks_fail

    store = ScoreStore(tmp_path)
    other_failed = SimpleNamespace(world_size=2, reduce_fn=lambda t: t + 1.0)  # the other rank reports one failure
    with pytest.raises(StoreError, match=rf"another rank failed to open the score store in {tmp_path}"):
        with _all_ranks_fail(other_failed, store, "open"):  # type: ignore[arg-type]
            pass  # this rank is fine
    all_fine = SimpleNamespace(world_size=2, reduce_fn=lambda t: t + 0.0)
    with _all_ranks_fail(all_fine, store, "open"):  # type: ignore[arg-type]
        pass
    with pytest.raises(ConfigurationError, match="mine"), _all_ranks_fail(all_fine, store, "open"):  # type: ignore[arg-type]
        raise ConfigurationError("mine")  # this rank's own error comes through unchanged
