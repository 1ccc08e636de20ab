"""Packaging: lazy callback exports, py.typed, entry points."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata, resources

import pytest

import lightning_influence


def test_import_does_not_import_lightning() -> None:
    code = (
        "import sys, lightning_influence, lightning_influence.operators, lightning_influence.spectrum; "
        "print('lightning' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "False"


def test_callbacks_are_exported_lazily() -> None:
    from lightning_influence import CurvatureMonitor
    from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor as Direct

    assert CurvatureMonitor is Direct
    assert "CurvatureMonitor" in dir(lightning_influence)


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        lightning_influence.NoSuchThing  # noqa: B018


def test_version_and_py_typed() -> None:
    assert isinstance(lightning_influence.__version__, str)
    assert resources.files("lightning_influence").joinpath("py.typed").is_file()


def test_entry_points() -> None:
    try:
        dist = metadata.distribution("lightning-influence")
    except metadata.PackageNotFoundError:
        pytest.skip("lightning-influence is not installed (pip install -e .)")
    groups = {ep.group: ep for ep in dist.entry_points}
    assert groups["console_scripts"].value == "lightning_influence.cli:main"
    # An auto-registered callback factory would attach an expensive callback to every Trainer (style rule 19).
    assert "lightning.pytorch.callbacks_factory" not in groups
