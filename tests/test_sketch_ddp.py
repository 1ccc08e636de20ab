"""DDP (2 CPU ranks, ddp_spawn, uneven shards) gives the single-process sketch, pcg and lowrank scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_influence.callbacks._common import make_reduce_fn, rank_world
from lightning_influence.influence import influence_scores
from lightning_influence.tasks import Classification
from tests.helpers.lightning_models import JoiningDDPSpawn, TinyClassifier

#: 15 training examples over 2 ranks: shards of 8 and 7.
KW: dict[str, Any] = {"damping": 1e-2, "sketch_rank": 6, "sketch_oversample": 4, "sketch_iterations": 3,
                      "sketch_trace_probes": 4, "cg_rtol": 1e-10, "chunk_size": 4, "batch_size": 4,
                      "self_influence": True}


def _run(model: torch.nn.Module, data: Any, **dist: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for solver in ("pcg", "lowrank"):
        res = influence_scores(model, Classification(), data, data, solver=solver, query_indices=[0, 3, 9],
                               **KW, **dist)
        out[solver] = {"scores": res.scores, "self_influence": res.self_influence, "sketch": res.diagnostics["sketch"],
                       "iterations": res.solve["iterations"]}
    return out


class _InfluenceAtFitStart(pl.Callback):
    """Runs influence_scores on every rank with the strategy's reduction and writes rank r's answer to a file."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank, world = rank_world(trainer)
        data = pl_module.train_set.tensors  # type: ignore[attr-defined]
        res = _run(pl_module.net, (data[0][:15], data[1][:15]), reduce_fn=make_reduce_fn(trainer), rank=rank,
                   world_size=world)
        torch.save(res, f"{self.out}/rank{rank}.pt")


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_ddp_spawn_sketch_pcg_lowrank_equal_single_process(tmp_path: Path) -> None:
    model = TinyClassifier(lr=0.0, n=16)
    data = model.train_set.tensors
    single = _run(model.net, (data[0][:15], data[1][:15]))
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=2, strategy=JoiningDDPSpawn(),
                         max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[_InfluenceAtFitStart(str(tmp_path))])
    trainer.fit(TinyClassifier(lr=0.0, n=16))
    for r in range(2):
        ddp = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        for solver in ("pcg", "lowrank"):
            a, b = single[solver], ddp[solver]
            assert torch.allclose(b["scores"], a["scores"], rtol=1e-8, atol=1e-12), (r, solver)
            assert torch.allclose(b["self_influence"], a["self_influence"], rtol=1e-8), (r, solver)
            for key in ("trace", "tail_eigenvalue", "trace_fraction"):  # the sketch itself
                assert b["sketch"][key] == pytest.approx(a["sketch"][key], rel=1e-8), (r, solver, key)
            assert b["sketch"]["num_products"] == a["sketch"]["num_products"]
        assert ddp["pcg"]["iterations"] == single["pcg"]["iterations"]
