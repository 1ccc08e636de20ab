"""configs/*.yaml run through LightningCLI (issue 8): callbacks, tasks and regularisers by class_path."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
README_CONFIG = ROOT / "configs" / "digits_all_callbacks.yaml"

yaml = pytest.importorskip("yaml")
pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures] (the cli extra)")


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def test_there_are_configs_and_they_register_callbacks_by_class_path() -> None:
    assert README_CONFIG in CONFIGS
    for path in CONFIGS:
        cfg = _load(path)
        callbacks = cfg["trainer"]["callbacks"]
        assert callbacks, path
        for cb in callbacks:
            assert set(cb) == {"class_path", "init_args"}, cb
            assert cb["class_path"].startswith("lightning_influence."), cb
            assert cb["init_args"]["task"]["class_path"].startswith("lightning_influence.tasks."), cb


def test_readme_example_is_the_config_file() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    assert any(yaml.safe_load(b) == _load(README_CONFIG) for b in blocks), "README's yaml differs from the config"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_lightning_cli_fits_with_the_config(path: Path, tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="the digits data module needs scikit-learn")
    from lightning_influence.cli import main

    cfg = _load(path)
    cfg["trainer"].update(max_epochs=None, max_steps=6, enable_progress_bar=False, limit_val_batches=1)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    for cb in cfg["trainer"]["callbacks"]:  # tiny settings so the test stays fast; same classes and wiring
        args = cb["init_args"]
        name = cb["class_path"].rsplit(".", 1)[-1]
        if name == "CurvatureMonitor":
            args.update(sample_size=64, every_n_epochs=None, every_n_steps=3)
        elif name == "InfluenceReport":
            args.update(max_train=32, max_queries=4)
        elif name == "ApproximateCV":
            args.update(folds=2)
        elif name == "PBRFValidation":  # one pair, a short Newton-CG, no exact baseline: the wiring, not the numbers
            args.update(num_train=1, num_queries=2, max_iter=3, tol=1e-3, exact_max_params=0)
    small = tmp_path / "config.yaml"
    small.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(small)]) == 0

    reports = list((tmp_path / "logs").rglob("influence/report.json"))
    assert len(reports) == 1
    sections = json.loads(reports[0].read_text())
    wanted = {cb["class_path"].rsplit(".", 1)[-1] for cb in cfg["trainer"]["callbacks"]}
    expected = {"CurvatureMonitor": "curvature", "InfluenceReport": "influence", "ApproximateCV": "cv",
                "PBRFValidation": "pbrf"}
    for name in wanted:
        assert expected[name] in sections, (name, sorted(sections))
    assert (reports[0].parent / "report.html").is_file()


@pytest.mark.timeout(120)
def test_typed_callback_configs_from_yaml_by_class_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``config: {class_path: lightning_influence.config.SpectrumConfig, init_args: ...}`` builds the typed config,
    and explicit arguments left out of the YAML do not override the config's values."""
    from lightning.pytorch.cli import LightningCLI

    from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
    from lightning_influence.callbacks.influence_report import InfluenceReport
    from lightning_influence.config import InfluenceConfig, SpectrumConfig

    cfg = _load(README_CONFIG)
    cfg["trainer"]["logger"] = False
    task = {"class_path": "lightning_influence.tasks.Classification"}
    cfg["trainer"]["callbacks"] = [
        {"class_path": "lightning_influence.CurvatureMonitor",
         "init_args": {"task": task, "every_n_epochs": 1, "seed": 5,
                       "config": {"class_path": "lightning_influence.config.SpectrumConfig",
                                  "init_args": {"trace_probes": 6, "lanczos_iter": 12, "lambda_method": "lanczos"}}}},
        {"class_path": "lightning_influence.InfluenceReport",
         "init_args": {"task": task, "top_k": 4,
                       "config": {"class_path": "lightning_influence.config.InfluenceConfig",
                                  "init_args": {"solver": "lissa", "damping": 0.01}}}},
    ]
    path = tmp_path / "typed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr("sys.argv", ["lightning-influence"])  # LightningCLI warns about pytest's own arguments
    cli = LightningCLI(args=["--config", str(path)], run=False, subclass_mode_model=True, subclass_mode_data=True,
                       save_config_callback=None)
    monitor = next(cb for cb in cli.trainer.callbacks if isinstance(cb, CurvatureMonitor))
    assert isinstance(monitor.config, SpectrumConfig)
    assert (monitor.config.trace_probes, monitor.config.lanczos_iter, monitor.config.seed) == (6, 12, 5)
    assert monitor.config.lanczos_tol == SpectrumConfig().lanczos_tol  # the given config's own default
    report = next(cb for cb in cli.trainer.callbacks if isinstance(cb, InfluenceReport))
    assert isinstance(report.config, InfluenceConfig)
    assert (report.config.solver, report.config.damping, report.config.top_k) == ("lissa", 0.01, 4)
