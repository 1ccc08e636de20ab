r"""Render ``report.json`` into one self-contained ``report.html`` (inline CSS, inline PNG figures, no scripts).

The page has a header (run title, versions, timestamps), a navigation bar, and one section per registered
section in registration order (curvature → influence → cv → pbrf, see
:func:`~lightning_influence.reporting.sections.register_section`), then any other section. A registered
section that is absent shows a "not run" notice. All text is HTML-escaped by Jinja2's autoescaping; every figure
is a ``data:image/png`` URI, so the file opens offline and can be mailed around.

Rendering is tolerant: a section that fails shows an error box and its raw JSON instead of taking down the page.
What each section contains, and the schema of every section's JSON (the contract with the callbacks), is in
:mod:`~lightning_influence.reporting.sections`; the block helpers are in
:mod:`~lightning_influence.reporting.blocks`.

``"meta"`` is written by the store (versions, timestamps, files, null-value notes, optional ``title``). A
top-level ``"run"`` section (``{"name": str, "log_dir": str, "world_size": int, ...}``) is shown in the header.

Example::

    >>> page = render_report({"cv": {"estimate": {"approx": 0.25}}})
    >>> "Approximate cross-validation" in page and "not run" in page
    True
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_influence.reporting.blocks import flatten, fmt
from lightning_influence.reporting.sections import registered_sections, section_blocks, section_title
from lightning_influence.stats import verdict

__all__ = ["render_report", "verdict"]  # verdict: re-exported from lightning_influence.stats

_RESERVED = ("meta", "run")  # top-level keys that are not sections
_SECTION_CACHE: OrderedDict[str, dict[str, Any]] = OrderedDict()
_CACHE_SIZE = 32
_MAX_RAW = 20000  # characters of raw JSON shown for a section that failed
_MAX_NULL_NOTES = 50


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _cache_key(name: str, data: Any) -> str:
    """A content hash of one section ("" if it cannot be serialised, which disables caching)."""
    try:
        return hashlib.sha1(f"{name}\0{json.dumps(data, sort_keys=True, default=str)}".encode()).hexdigest()
    except (TypeError, ValueError):
        return ""


def _view(name: str, title: str, **fields: Any) -> dict[str, Any]:
    """What the template reads of one section (``fields`` override the defaults of a present, empty section)."""
    return {"id": name, "title": title, "present": True, "blocks": [], "error": None, "raw": "", **fields}


def _render_section(name: str, data: Any) -> dict[str, Any]:
    """The template's view of one present section, memoised by content (a re-render redraws only what changed)."""
    key = _cache_key(name, data)
    if key and key in _SECTION_CACHE:
        _SECTION_CACHE.move_to_end(key)
        return _SECTION_CACHE[key]
    section = _view(name, section_title(name))
    try:
        section["blocks"] = section_blocks(name, data)
    except Exception as exc:  # never let one malformed section take down the page
        section["error"] = f"This section could not be rendered ({type(exc).__name__}: {exc})."
        section["raw"] = json.dumps(data, indent=1, default=str)[:_MAX_RAW]
    if key:
        _SECTION_CACHE[key] = section
        while len(_SECTION_CACHE) > _CACHE_SIZE:
            _SECTION_CACHE.popitem(last=False)
    return section


def _sections(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Registered sections in order (absent ones as "not run" notices, or left out), then the report's others."""
    specs = registered_sections()
    out = []
    for name, spec in specs.items():
        if name in report:
            out.append(_render_section(name, report[name]))
        elif spec.not_run is not None:
            out.append(_view(name, spec.title, present=False, message=spec.not_run))
    out.extend(_render_section(k, v) for k, v in report.items() if k not in specs and k not in _RESERVED)
    return out


def _header(report: Mapping[str, Any], base_dir: str | Path | None) -> dict[str, Any]:
    """The page header: title, run facts, versions, timestamps, directory and the null-value notes."""
    meta, run = _mapping(report.get("meta")), _mapping(report.get("run"))
    null_notes = [
        str(n) for notes in _mapping(meta.get("null_values")).values() if isinstance(notes, list) for n in notes
    ]
    return {
        "title": str(meta.get("title") or run.get("name") or "lightning_influence report"),
        "run": flatten(run),
        "versions": flatten(_mapping(meta.get("versions"))),
        "created": fmt(meta.get("created")),
        "updated": fmt(meta.get("updated")),
        "directory": str(base_dir) if base_dir is not None else "",
        "null_notes": null_notes[:_MAX_NULL_NOTES],
    }


def _environment() -> Any:
    from jinja2 import Environment, PackageLoader, select_autoescape

    return Environment(
        loader=PackageLoader("lightning_influence.reporting", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_report(report: Mapping[str, Any], base_dir: str | Path | None = None) -> str:
    """Render a report dict (the content of ``report.json``) to a self-contained HTML page.

    Args:
        report: Sections by name plus optional ``"meta"`` and ``"run"``.
        base_dir: The report directory (shown in the header; files are linked relative to it).

    Returns:
        The HTML text.

    Example::

        >>> html = render_report({"pbrf": {"correlations": [{"estimator": "cg", "pearson": 0.99}]}})
        >>> "agree closely" in html
        True
    """
    page = (
        _environment()
        .get_template("report.html.j2")
        .render(header=_header(report, base_dir), sections=_sections(report))
    )
    return str(page)
