"""The ``lightning-influence`` console script."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_influence.cli import build_parser, main


def _console_script() -> str:
    """The installed entry point next to the running interpreter (the venv's bin/), else on PATH."""
    candidate = Path(sys.executable).with_name("lightning-influence")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("lightning-influence")
    if found is None:
        pytest.skip("the lightning-influence console script is not installed (pip install -e .)")
    return found


def test_console_script_help() -> None:
    proc = subprocess.run([_console_script(), "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "usage: lightning-influence" in proc.stdout
    assert "demo" in proc.stdout
    assert "report" in proc.stdout


def test_subcommand_help_lists_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--max-epochs", "--seed"):
        assert option in out


def test_missing_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_demo_rejects_bad_max_epochs(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["demo", "--max-epochs", value])
    assert exc.value.code == 2
    assert "--max-epochs" in capsys.readouterr().err


def test_report_without_report_json_fails_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "report.json" in err
    assert str(tmp_path) in err


def test_report_rebuilds_html_from_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_influence.reporting import ReportStore

    run = tmp_path / "run"
    ReportStore(run / "lightning_logs" / "version_0" / "influence", render=False).update(
        "cv", {"estimate": {"approx": 0.25}}
    )
    html = run / "lightning_logs" / "version_0" / "influence" / "report.html"
    assert not html.exists()
    assert main(["report", str(run)]) == 0
    assert html.is_file() and "0.25" in html.read_text(encoding="utf-8")
    assert str(html) in capsys.readouterr().out


def test_run_demo_rejects_zero_epochs(tmp_path: Path) -> None:
    from lightning_influence.demo import run_demo

    with pytest.raises(ValueError, match="max_epochs must be at least 1"):
        run_demo(tmp_path, max_epochs=0)


@pytest.mark.slow
def test_demo_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn", reason="the demo trains on scikit-learn's digits")
    out_dir = tmp_path / "demo"
    # 4 epochs, not 1: an undertrained net makes the CV prox and the PBRF solves slow (about 25 s vs 70 s)
    assert main(["demo", "--out", str(out_dir), "--max-epochs", "4", "--seed", "0", "--quick"]) == 0
    printed = capsys.readouterr().out

    match = re.search(r"trace Tr\(G\)\s*=\s*([0-9.eE+-]+) ± ([0-9.eE+-]+)", printed)
    assert match, printed
    trace, stderr = float(match.group(1)), float(match.group(2))
    assert trace > 0
    assert stderr >= 0
    assert "TensorBoard logs:" in printed
    assert f"tensorboard --logdir {out_dir}" in printed
    reports = list(out_dir.rglob("influence/report.html"))
    assert len(reports) == 1 and f"HTML report:      {reports[0]}" in printed
    sections = json.loads((reports[0].parent / "report.json").read_text())
    for section in ("curvature", "influence", "cv", "pbrf"):  # all four callbacks wrote their section
        assert section in sections, sorted(sections)
    assert (reports[0].parents[1] / "curvature.png").is_file()

    # the console script rebuilds the report from report.json
    reports[0].unlink()
    assert main(["report", str(out_dir)]) == 0
    assert reports[0].is_file()

    events = list(out_dir.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {out_dir}"

    summaries = list(out_dir.rglob("curvature.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary["trace"] > 0
    assert math.isclose(summary["trace"], trace, rel_tol=1e-3)
    assert summary["lambda_max"] > 0
    assert summary["lambda_max"] <= summary["trace"] * (1 + 1e-6)  # a PSD operator's top eigenvalue ≤ its trace
    assert summary["critical_batch_size"] == pytest.approx(summary["trace"] / summary["lambda_max"])
    assert summary["lissa"]["eta"] > 0
    assert summary["num_examples"] == 512

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "curvature/trace" in tags
    assert acc.Scalars("curvature/trace")[-1].value == pytest.approx(summary["trace"], rel=1e-5)
