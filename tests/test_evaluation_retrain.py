"""SubsetRetrainer (issue 13): resumable on-disk cache, invalidation, atomic files, rank sharding; edge cases."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from lightning_influence.evaluation import (
    SubsetRetrainer,
    lds,
    loo_correlation,
    mislabel_detection,
    rankdata,
    spearman,
)
from lightning_influence.evaluation.retrain import MANIFEST_NAME, callable_fingerprint, random_subsets
from lightning_influence.exceptions import ConfigurationError

DT = torch.float64
N = 12
WEIGHTS = torch.linspace(-1.0, 2.0, N, dtype=DT)


class Boom(RuntimeError):
    pass


class CountingTrainer:
    """A deterministic 'training' whose calls are recorded; it can be told to die after ``fail_after`` calls."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple[int, ...]] = []
        self.fail_after = fail_after

    def __call__(self, indices: Tensor, seed: int) -> Tensor:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise Boom("killed")
        self.calls.append(tuple(indices.tolist()))  # identifies the subset
        w = WEIGHTS[indices]
        return torch.stack([w.sum(), (w**2).sum().sqrt(), torch.sin(w).sum() + seed])


def measure(model: Tensor) -> Tensor:
    return model * 1.5


def train_alternative(indices: Tensor, seed: int) -> Tensor:
    return WEIGHTS[indices].sum().reshape(1)


def _retrainer(cache: Path | None, train: Any, **kw: Any) -> SubsetRetrainer:
    base: dict[str, Any] = {"n_train": N, "num_subsets": 8, "alpha": 0.5, "seed": 3, "cache_dir": cache,
                            "fingerprint": None}
    base.update(kw)
    return SubsetRetrainer(train, measure, **base)


def test_a_killed_run_resumes_reusing_finished_files_equals_an_uninterrupted_run_bit_for_bit(tmp_path: Path) -> None:
    reference = _retrainer(tmp_path / "ref", CountingTrainer()).run()
    dying = CountingTrainer(fail_after=3)
    with pytest.raises(Boom):
        _retrainer(tmp_path / "cache", dying).run()
    assert sorted(p.name for p in (tmp_path / "cache").glob("run_*.npz")) == [f"run_{i:05d}.npz" for i in range(3)]
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # no temporary file left behind
    finished = list(dying.calls)
    resumed_trainer = CountingTrainer()
    resumed = _retrainer(tmp_path / "cache", resumed_trainer).run()
    assert resumed.reused == [0, 1, 2] and resumed.trained == [3, 4, 5, 6, 7]
    subsets = [tuple(m.nonzero().reshape(-1).tolist()) for m in reference.subsets]
    assert finished == subsets[:3]
    assert resumed_trainer.calls == subsets[3:]  # train_fn was not called for the finished subsets
    assert resumed.outputs.dtype == reference.outputs.dtype
    assert torch.equal(resumed.outputs, reference.outputs)  # bit for bit
    assert torch.equal(resumed.subsets, reference.subsets)
    # A third run trains nothing.
    again_trainer = CountingTrainer()
    again = _retrainer(tmp_path / "cache", again_trainer).run()
    assert again_trainer.calls == [] and again.reused == list(range(8))
    assert torch.equal(again.outputs, reference.outputs)


def test_the_cache_is_plain_numpy_and_json(tmp_path: Path) -> None:
    result = _retrainer(tmp_path, CountingTrainer()).run()
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    cfg = manifest["config"]
    assert cfg["alpha"] == 0.5 and cfg["num_subsets"] == 8 and cfg["seed"] == 3 and cfg["n_train"] == N
    assert cfg["train_fn"]["name"].endswith("CountingTrainer") and len(cfg["train_fn"]["source_sha256"]) == 64
    assert len(manifest["config_hash"]) == 64
    masks = np.load(tmp_path / "subsets.npy")
    assert masks.shape == (8, N) and masks.dtype == bool and (masks.sum(1) == 6).all()
    with np.load(tmp_path / "run_00005.npz", allow_pickle=False) as f:
        assert np.array_equal(f["outputs"], result.outputs[5].numpy())
        assert np.array_equal(f["indices"], np.flatnonzero(masks[5]))
        assert str(f["config_hash"]) == manifest["config_hash"]


def test_a_changed_train_fn_or_alpha_invalidates_the_cache_with_a_clear_message(tmp_path: Path) -> None:
    _retrainer(tmp_path, CountingTrainer()).run()
    with pytest.raises(ConfigurationError, match=r"another configuration \(train_fn is a different function"):
        _retrainer(tmp_path, train_alternative).run()
    with pytest.raises(ConfigurationError, match=r"alpha: 0.5 in the cache, 0.75 now.*on_mismatch='overwrite'"):
        _retrainer(tmp_path, CountingTrainer(), alpha=0.75).run()
    with pytest.raises(ConfigurationError, match="query_fingerprint"):
        _retrainer(tmp_path, CountingTrainer(), query_fingerprint="other queries").run()
    # A changed source of the same function (simulated through the fingerprint string) is named too.
    _retrainer(tmp_path / "fp", CountingTrainer(), fingerprint="v1").run()
    with pytest.raises(ConfigurationError, match=r"train_fn's fingerprint changed \('v1' -> 'v2'\)"):
        _retrainer(tmp_path / "fp", CountingTrainer(), fingerprint="v2").run()
    # overwrite: warns, discards, recomputes everything.
    trainer = CountingTrainer()
    with pytest.warns(RuntimeWarning, match="discarding the retraining cache.*alpha"):
        fresh = _retrainer(tmp_path, trainer, alpha=0.75, on_mismatch="overwrite").run()
    assert len(trainer.calls) == 8 and fresh.reused == [] and int(fresh.subsets[0].sum()) == 9


def test_source_fingerprint_sees_a_code_change(tmp_path: Path) -> None:
    ns: dict[str, Any] = {}
    src = tmp_path / "mod_a.py"
    src.write_text("def train(indices, seed):\n    return indices.sum().reshape(1) * 1.0\n")
    exec(compile(src.read_text(), str(src), "exec"), ns)
    first = callable_fingerprint(ns["train"])
    src.write_text("def train(indices, seed):\n    return indices.sum().reshape(1) * 2.0\n")
    ns2: dict[str, Any] = {}
    exec(compile(src.read_text(), str(src), "exec"), ns2)
    second = callable_fingerprint(ns2["train"])
    assert first["name"] == second["name"] and first["source_sha256"] != second["source_sha256"]


def test_partial_files_do_not_count_as_done(tmp_path: Path) -> None:
    reference = _retrainer(tmp_path / "ref", CountingTrainer()).run()
    with pytest.raises(Boom):
        _retrainer(tmp_path / "c", CountingTrainer(fail_after=2)).run()
    (tmp_path / "c" / ".run_00002.npz.abc.tmp").write_bytes(b"half a file")  # what a kill during a write leaves
    (tmp_path / "c" / "run_00001.npz").write_bytes(b"corrupt")  # a damaged result is recomputed, with a warning
    trainer = CountingTrainer()
    with pytest.warns(RuntimeWarning, match="unreadable cached result"):
        resumed = _retrainer(tmp_path / "c", trainer).run()
    assert resumed.reused == [0] and resumed.trained == list(range(1, 8))
    assert torch.equal(resumed.outputs, reference.outputs)


def _thread_world(world: int, fn: Any) -> list[Any]:
    barrier = threading.Barrier(world)
    slots: list[Tensor | None] = [None] * world
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def reducer(rank: int) -> Any:
        def reduce(t: Tensor) -> Tensor:
            slots[rank] = t.clone()
            barrier.wait(timeout=30)
            total = torch.stack([s for s in slots if s is not None]).sum(0)
            barrier.wait(timeout=30)
            return total

        return reduce

    def worker(rank: int) -> None:
        try:
            results[rank] = fn(rank, lambda: barrier.wait(timeout=30), reducer(rank))
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("gather", ["files", "reduce"])
def test_ranks_train_their_own_shard_and_all_get_the_serial_result(tmp_path: Path, world: int, gather: str) -> None:
    serial = _retrainer(None, CountingTrainer(), num_subsets=7).run()
    trainers = [CountingTrainer() for _ in range(world)]

    def fn(rank: int, barrier: Any, reduce: Any) -> Any:
        cache = tmp_path / "shared" if gather == "files" else None
        return _retrainer(cache, trainers[rank], num_subsets=7, rank=rank, world_size=world, barrier=barrier,
                          reduce_fn=reduce if gather == "reduce" else None).run()

    results = _thread_world(world, fn)
    for rank, res in enumerate(results):
        assert res.trained == list(range(rank, 7, world))  # subsets r::world
        assert len(trainers[rank].calls) == len(res.trained)
        assert torch.equal(res.outputs, serial.outputs)


def test_retrainer_argument_errors(tmp_path: Path) -> None:
    t = CountingTrainer()
    with pytest.raises(ConfigurationError, match=r"alpha .* must lie in \(0, 1\)"):
        _retrainer(None, t, alpha=1.0)
    with pytest.raises(ConfigurationError, match="keeps 0 of 12"):
        _retrainer(None, t, alpha=0.01)
    with pytest.raises(ConfigurationError, match="needs barrier="):
        _retrainer(tmp_path, t, rank=0, world_size=2)
    with pytest.raises(ConfigurationError, match="cache_dir on a file system all ranks share, or reduce_fn"):
        _retrainer(None, t, rank=0, world_size=2, barrier=lambda: None)
    with pytest.raises(ConfigurationError, match="on_mismatch"):
        _retrainer(None, t, on_mismatch="ignore")
    with pytest.raises(ConfigurationError, match="distinct"):
        SubsetRetrainer.leave_one_out(t, measure, n_train=N, indices=[1, 1])
    with pytest.raises(ConfigurationError, match=r"does not take \['alpha'\]"):
        SubsetRetrainer.leave_one_out(t, measure, n_train=N, indices=[1, 2], alpha=0.5)
    with pytest.raises(ConfigurationError, match="one number per query"):
        SubsetRetrainer(lambda idx, seed: "model", lambda m: [], n_train=N, num_subsets=2).run()


def test_candidates_keep_the_other_examples_in_every_subset() -> None:
    masks = random_subsets(10, 6, alpha=0.5, seed=0, candidates=[0, 1, 2, 3])
    assert bool(masks[:, 4:].all()) and (masks[:, :4].sum(1) == 2).all()


# -------------------------------------------------------------------------------------- LDS edge cases
def test_lds_uses_train_indices_and_survives_constant_queries() -> None:
    g = torch.Generator().manual_seed(0)
    scores_full = torch.randn(3, 10, generator=g, dtype=DT)
    masks = random_subsets(10, 20, alpha=0.5, seed=1)
    outputs = masks.double() @ scores_full.T
    outputs[:, 2] = 1.0  # a query whose output never changes: its correlation is undefined, not 0
    cols = torch.tensor([1, 3, 5, 7, 9])
    res = lds(scores_full[:, cols], masks, outputs, train_indices=cols)
    assert res.num_undefined == 1 and torch.isnan(res.per_query[2]) and 0 < res.lds < 1
    full = lds(scores_full, masks, outputs)
    assert full.lds == pytest.approx(1.0) and full.metrics()["lds_num_subsets"] == 20.0
    assert len(full.scatter()["predicted"]) == 40  # 2 defined queries x 20 subsets
    with pytest.raises(ConfigurationError, match="measurement must be 'loss'"):
        lds(scores_full, masks, outputs, measurement="logit")
    with pytest.raises(ConfigurationError, match=r"outputs must be \(num_subsets, n_query\)"):
        lds(scores_full, masks, outputs[:, :2])
    with pytest.raises(ConfigurationError, match=r"subsets cover n_train=5 examples; pass train_indices="):
        lds(scores_full, masks[:, :5], outputs)
    with pytest.raises(ConfigurationError, match="at least 3 subsets"):
        lds(scores_full, masks[:2], outputs[:2])


def test_rank_statistics_match_scipy() -> None:
    from scipy.stats import rankdata as sp_rank
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (40, 5), generator=g).double()  # many ties
    y = torch.randn(40, 5, generator=g, dtype=DT)
    assert torch.allclose(rankdata(x, dim=0), torch.tensor(sp_rank(x.numpy(), axis=0)))
    want = torch.tensor([spearmanr(x[:, j], y[:, j]).statistic for j in range(5)])
    assert torch.allclose(spearman(x, y), want)


def test_loo_and_mislabel_errors() -> None:
    scores = torch.zeros(2, 5)
    with pytest.raises(ConfigurationError, match="have no score column"):
        loo_correlation(scores, [0, 1, 7], torch.zeros(3, 2), torch.zeros(2), train_indices=[0, 1, 2, 3, 4])
    with pytest.raises(ConfigurationError, match="mislabel detection needs both flipped and clean"):
        mislabel_detection(torch.rand(5), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ConfigurationError, match="non-finite"):
        mislabel_detection(torch.tensor([1.0, float("nan"), 0.0]), [0])


def test_evaluation_is_plain_pytorch_and_its_report_section_renders() -> None:
    import subprocess
    import sys

    code = "import sys, lightning_influence.evaluation; print('lightning' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "False"

    from lightning_influence.reporting.html import render_report

    section = {"verdict": "LDS of the cg scores: 0.850", "lds": [{"estimator": "cg", "lds": 0.85, "ci_low": 0.8,
                                                                 "ci_high": 0.9}],
               "scatter": {"estimator": "cg", "predicted": [0.0, 1.0, -1.0], "actual": [0.1, 0.9, -1.2]},
               "per_query": {"cg": [0.8, 0.9, None]}}
    page = render_report({"pbrf": {"verdict": "fine"}, "attribution": section})
    assert "LDS of the cg scores: 0.850" in page and "Linear datamodeling score" in page
    assert page.index('id="pbrf"') < page.index('id="attribution"') and page.count("data:image/png") == 2
    broken = render_report({"attribution": {"lds": "not a table", "scatter": {"predicted": 3}}})
    assert 'id="attribution"' in broken  # tolerant: a malformed section never takes the page down
