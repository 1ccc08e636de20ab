"""Docstring examples (issue 8): every public class/function has one, and every ``>>>`` example runs.

``KNOWN_WITHOUT_EXAMPLE`` is empty: every public class and function has an ``Example::`` section, and a new
one without it fails the test.
"""

from __future__ import annotations

import ast
import doctest
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_influence"
MODULES = sorted(
    ".".join(("lightning_influence", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
)

KNOWN_WITHOUT_EXAMPLE: set[str] = set()  # every public name has an example; keep it that way


def _public_definitions() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                assert isinstance(node.value, (ast.List, ast.Tuple))
                names = {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
        rel = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and not node.name.startswith("_"):
                if names is not None and node.name not in names:
                    continue
                found[f"{rel}.{node.name}"] = ast.get_docstring(node) or ""
    return found


def test_every_public_class_and_function_has_a_docstring_with_an_example() -> None:
    defs = _public_definitions()
    assert len(defs) > 50
    undocumented = sorted(name for name, doc in defs.items() if not doc.strip())
    assert not undocumented, f"public names without a docstring: {undocumented}"
    without = {name for name, doc in defs.items() if "Example" not in doc and ">>>" not in doc}
    new = sorted(without - KNOWN_WITHOUT_EXAMPLE)
    assert not new, f"add an Example:: section to {new}"


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module: str) -> None:
    mod = importlib.import_module(module)
    failures, _ = doctest.testmod(mod, verbose=False, report=True)
    assert failures == 0, f"{failures} doctest example(s) failed in {module} (run pytest --doctest-modules {module})"
