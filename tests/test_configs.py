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
        elif name == "PBRFValidation":
            args.update(num_train=1, num_queries=2)
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
