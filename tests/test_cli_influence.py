"""``lightning-influence influence --ckpt ... --config ...``: the callback's scores again, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_influence.callbacks.influence_report import InfluenceReport
from lightning_influence.cli import main

yaml = pytest.importorskip("yaml")
pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures] (the cli extra)")


def _config(root: Path, callbacks: list[dict[str, Any]]) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
                    "default_root_dir": str(root / "fit"), "enable_progress_bar": False,
                    "enable_model_summary": False, "callbacks": callbacks},
        "model": {"class_path": "tests.helpers.lightning_models.TinyClassifier",
                  "init_args": {"n": 21, "batch_size": 8, "lr": 0.1}},
    }
    path = root / f"config{len(callbacks)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


_REPORT = {"class_path": "lightning_influence.InfluenceReport",
           "init_args": {"task": {"class_path": "lightning_influence.tasks.Classification"}, "query_data": "val",
                         "max_queries": 4, "progress_bar": False,
                         "config": {"class_path": "lightning_influence.config.InfluenceConfig",
                                    "init_args": {"solver": "cg", "damping": 0.01, "cg_rtol": 1e-12,
                                                  "chunk_size": 4, "self_influence": True}}}}


@pytest.mark.timeout(120)
def test_influence_command_reproduces_the_callback_scores_from_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.argv", ["lightning-influence"])  # LightningCLI warns about pytest's own arguments
    config = _config(tmp_path, [_REPORT])
    assert main(["fit", "--config", str(config)]) == 0
    (ckpt,) = (tmp_path / "fit").rglob("*.ckpt")
    trained = InfluenceReport.load_result(tmp_path / "fit" / "influence")

    out = tmp_path / "rerun"
    assert main(["influence", "--ckpt", str(ckpt), "--config", str(config), "--out", str(out),
                 "--no-progress-bar"]) == 0
    rerun = InfluenceReport.load_result(out / "influence")
    assert torch.equal(rerun.scores, trained.scores) and torch.equal(rerun.self_influence, trained.self_influence)
    assert torch.equal(rerun.train_indices, trained.train_indices) and rerun.solve == trained.solve
    assert rerun.diagnostics["store"]["status"] == "new" and (out / "influence" / "store" / "scores.npy").exists()
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3  # a real fit (lr=0.1): scores equal = same weights
    assert main(["influence", "--ckpt", str(ckpt), "--config", str(config), "--out", str(out),
                 "--no-progress-bar"]) == 0
    again = InfluenceReport.load_result(out / "influence")
    assert again.diagnostics["store"]["status"] == "resumed" and torch.equal(again.scores, trained.scores)


def test_influence_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["lightning-influence"])
    config = _config(tmp_path, [])
    assert main(["influence", "--ckpt", str(tmp_path / "missing.ckpt"), "--config", str(config)]) == 2
    assert "is not a file" in capsys.readouterr().err
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    assert main(["influence", "--ckpt", str(ckpt), "--config", str(config)]) == 2
    assert "has no lightning_influence.InfluenceReport" in capsys.readouterr().err
