"""The architecture's rules, checked on the source tree (issue 11): small functions and modules, numerics free of
Lightning, one cross-rank reduction path.

These are structural checks on the package's own code (parsed with :mod:`ast`, nothing imported), so they fail the
moment a change breaks a rule, naming the offending file, function and size.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_influence"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))

#: Longest function body, in code lines (no blank lines, comments or docstrings).
MAX_FUNCTION_LINES = 80
#: Longest module, in physical lines.
MAX_MODULE_LINES = 800
#: Modules allowed to import Lightning: the callbacks, the entry points around them and the logger media writer.
LIGHTNING_ALLOWED = ("callbacks/", "cli.py", "demo.py", "__init__.py", "reporting/media.py")
#: Modules allowed to call a ``reduce_fn`` directly (everything else goes through ``distributed.reduce_packed``).
REDUCE_ALLOWED = ("distributed.py", "callbacks/")


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _docstring_lines(node: ast.AST) -> set[int]:
    lines: set[int] = set()
    for child in ast.walk(node):
        body = getattr(child, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
            getattr(body[0], "value", None), ast.Constant
        ) and isinstance(body[0].value.value, str):
            lines.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    return lines


def _code_lines(source: list[str], node: ast.AST, docstrings: set[int]) -> int:
    start, end = node.lineno, node.end_lineno or node.lineno  # type: ignore[attr-defined]
    count = 0
    for n in range(start, end + 1):
        text = source[n - 1].strip()
        if text and not text.startswith("#") and n not in docstrings:
            count += 1
    return count


def test_the_rules_see_the_package() -> None:
    assert len(SOURCES) > 40, SOURCES
    assert any(_rel(p) == "operators/curvature.py" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_functions_and_modules_are_small(path: Path) -> None:
    text = path.read_text()
    source = text.splitlines()
    assert len(source) <= MAX_MODULE_LINES, f"{_rel(path)} has {len(source)} lines (limit {MAX_MODULE_LINES}): split it"
    tree = ast.parse(text)
    docstrings = _docstring_lines(tree)
    long = {
        node.name: size
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (size := _code_lines(source, node, docstrings)) > MAX_FUNCTION_LINES
    }
    assert not long, f"{_rel(path)}: functions over {MAX_FUNCTION_LINES} code lines: {long}"


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_numerics_do_not_import_lightning(path: Path) -> None:
    rel = _rel(path)
    if rel.startswith(LIGHTNING_ALLOWED) or rel in LIGHTNING_ALLOWED:
        pytest.skip(f"{rel} is Lightning-facing")
    imported = _imports(ast.parse(path.read_text()))
    bad = sorted(m for m in imported if m.split(".")[0] in ("lightning", "pytorch_lightning"))
    assert not bad, f"{rel} is numerics and imports {bad}: move the Lightning part into callbacks/"


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_cross_rank_reductions_go_through_reduce_packed(path: Path) -> None:
    rel = _rel(path)
    if rel.startswith(REDUCE_ALLOWED):
        pytest.skip(f"{rel} owns the reduction or builds reduce_fn")
    calls = [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute)
        and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr) == "reduce_fn"
    ]
    assert not calls, f"{rel} calls reduce_fn directly at lines {calls}: use distributed.reduce_packed"
