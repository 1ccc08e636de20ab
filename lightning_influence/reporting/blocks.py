"""The building blocks of a report section: plain dicts the template ``report.html.j2`` knows how to draw.

A section renderer (:mod:`~lightning_influence.reporting.sections`) turns its JSON into a list of blocks; the
template dispatches on ``block["kind"]``:

========== ===========================================================================================
kind       fields
========== ===========================================================================================
kv         ``title``, ``items``: list of ``(key, text)``
table      ``title``, ``columns``, ``rows`` (lists of text), ``note``, ``images`` (PNG base64 per row or None)
heading    ``text``
paragraph  ``text``, ``cls`` (``""``, ``"muted"``, ``"warn"``, ``"bad"``, ``"good"``, ``"verdict"``)
figure     ``png`` (base64), ``caption``
figrow     ``figures``: figure (or paragraph) blocks side by side
query      ``title``, ``img``, ``text``, ``groups``, ``images`` (see the influence section)
========== ===========================================================================================

Every text is left unescaped here: Jinja2's autoescaping escapes it in the template.

Example::

    >>> [b["kind"] for b in kv("Config", {"damping": 1e-3}) + [paragraph("Solver converged.", "good")]]
    ['kv', 'paragraph']
"""

from __future__ import annotations

import functools
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "COMMON_KEYS",
    "columns",
    "figure",
    "flatten",
    "fmt",
    "generic",
    "kv",
    "paragraph",
    "rendered_png",
    "section_head",
    "section_tail",
    "table",
    "table_rows",
]

Block = dict[str, Any]

#: Keys every section may have; :func:`section_head` and :func:`section_tail` show them.
COMMON_KEYS = ("config", "notes", "summary", "files")
_MAX_TABLE_ROWS = 200
_MAX_LIST = 12  # list items shown by fmt
_MAX_TEXT = 300  # characters of JSON shown by fmt
_MAX_NESTED = 40  # nested dicts up to this size are flattened into dotted keys


def fmt(value: Any) -> str:
    """Short human-readable text for a JSON value (floats to 4 significant digits, ``None`` → "—").

    Args:
        value: Any JSON value.

    Returns:
        The text (not escaped; the template escapes it).

    Example::

        >>> fmt(0.123456), fmt(1e-7), fmt(None), fmt(True), fmt([1, 2.5])
        ('0.1235', '1.000e-07', '—', 'yes', '[1, 2.5]')
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(not isinstance(v, (list, dict)) for v in value):
        shown = ", ".join(fmt(v) for v in value[:_MAX_LIST])
        if len(value) <= _MAX_LIST:
            return f"[{shown}]"
        return f"[{shown}, …] ({len(value)} values)"
    text = json.dumps(value, default=str)
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + " …"


def flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, text)`` pairs of a mapping; nested non-empty mappings of up to 40 keys are expanded.

    Args:
        d: The mapping.
        prefix: Prepended to every key.

    Returns:
        The pairs, in the mapping's order.

    Example::

        >>> flatten({"lissa": {"eta": 0.5, "steps": 10}, "trace": None})
        [('lissa.eta', '0.5'), ('lissa.steps', '10'), ('trace', '—')]
    """
    items: list[tuple[str, str]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and len(v) <= _MAX_NESTED:
            items.extend(flatten(v, f"{key}."))
        else:
            items.append((key, fmt(v)))
    return items


def columns(rows: Iterable[Mapping[str, Any]], first: Sequence[str] = ()) -> list[str]:
    """Column names of a table: the keys of ``first`` that some row has, then every other key in order of appearance.

    Args:
        rows: Dict rows.
        first: Preferred leading columns.

    Returns:
        The column names.

    Example::

        >>> columns([{"b": 1, "step": 0}, {"c": 2}], first=("step", "trace"))
        ['step', 'b', 'c']
    """
    seen = list(OrderedDict.fromkeys(k for r in rows for k in r))
    lead = [k for k in first if k in seen]
    return lead + [k for k in seen if k not in lead]


def table_rows(value: Any) -> list[Mapping[str, Any]] | None:
    """``value`` if it is a non-empty list of dicts (something :func:`table` can show), else ``None``.

    Args:
        value: Any JSON value.

    Returns:
        The rows or ``None``.

    Example::

        >>> table_rows([{"a": 1}]), table_rows([1, {"a": 1}]), table_rows([])
        ([{'a': 1}], None, None)
    """
    if isinstance(value, list) and value and all(isinstance(r, Mapping) for r in value):
        return value
    return None


def kv(title: str, data: Any) -> list[Block]:
    """A key/value block of a mapping (nested keys dotted) or of a single value; nothing for empty data.

    Args:
        title: Block title.
        data: A mapping or any JSON value.

    Returns:
        Zero or one block.

    Example::

        >>> kv("Solver", {"method": "cg", "info": {"damping": 0.001}})[0]["items"]
        [('method', 'cg'), ('info.damping', '0.001')]
        >>> kv("Solver", {}), kv("Value", 3)[0]["items"]
        ([], [('value', '3')])
    """
    if isinstance(data, Mapping) and data:
        return [{"kind": "kv", "title": title, "items": flatten(data)}]
    if data not in (None, {}, [], ""):
        return [{"kind": "kv", "title": title, "items": [("value", fmt(data))]}]
    return []


def table(
    title: str,
    rows: Sequence[Any],
    names: Sequence[str] | None = None,
    cap: int = _MAX_TABLE_ROWS,
    images: Sequence[str | None] | None = None,
) -> Block:
    """A table block of dict rows (other rows are skipped), keeping the last ``cap`` rows.

    Args:
        title: Block title.
        rows: Dict rows.
        names: Columns; default :func:`columns` of the rows.
        cap: Rows shown at most (the last ones; a note says how many were left out).
        images: One PNG (base64) or ``None`` per row, shown in a first column when any is set.

    Returns:
        The block.

    Example::

        >>> b = table("History", [{"step": 0, "trace": 1.5}, {"step": 1, "trace": None}])
        >>> b["columns"], b["rows"]
        (['step', 'trace'], [['0', '1.5'], ['1', '—']])
    """
    dict_rows = [r for r in rows if isinstance(r, Mapping)]
    cols = columns(dict_rows) if names is None else list(names)
    body = [[fmt(r.get(c)) for c in cols] for r in dict_rows[-cap:]]
    note = f"showing the last {cap} of {len(dict_rows)} rows" if len(dict_rows) > cap else ""
    imgs = list(images)[-cap:] if images is not None and any(images) and len(images) == len(dict_rows) else None
    return {"kind": "table", "title": title, "columns": cols, "rows": body, "note": note, "images": imgs}


def paragraph(text: str, cls: str = "") -> Block:
    """A paragraph block.

    Args:
        text: The text.
        cls: CSS class (``"muted"``, ``"warn"``, ``"bad"``, ``"good"``, ``"verdict"`` or ``""``).

    Returns:
        The block.

    Example::

        >>> paragraph("No curvature measurements were recorded.", "muted")["cls"]
        'muted'
    """
    return {"kind": "paragraph", "text": text, "cls": cls}


def figure(make: Callable[[], Any], caption: str = "") -> Block:
    """A figure block of the matplotlib figure ``make()`` returns (a warning paragraph without matplotlib).

    Args:
        make: Builds the figure (e.g. a ``functools.partial`` of a :mod:`~lightning_influence.reporting.figures`
            helper); called at most once per content (:func:`rendered_png`).
        caption: Caption under the image.

    Returns:
        The block.

    Example::

        >>> from lightning_influence.reporting.figures import line_figure
        >>> figure(lambda: line_figure([0, 1], {"loss": [1.0, 0.5]}, title="Loss", xlabel="epoch"))["png"][:8]
        'iVBORw0K'
    """
    try:
        png = rendered_png(make)
    except ImportError as exc:
        return paragraph(f"Figure unavailable: {exc}", "warn")
    return {"kind": "figure", "png": png, "caption": caption}


def rendered_png(make: Callable[[], Any]) -> str:
    """The base64 PNG of the figure ``make()`` returns, drawn once per content.

    A ``functools.partial`` builder with JSON-able arguments is keyed by its content: the report, re-rendered at
    every callback's publish, and a callback logging the same figure to its loggers share one matplotlib render.

    Returns:
        ASCII base64 of the PNG.

    Raises:
        ImportError: Without matplotlib.

    Example::

        >>> from functools import partial
        >>> from lightning_influence.reporting.figures import histogram_figure
        >>> rendered_png(partial(histogram_figure, [1.0, 2.0], "h")) is rendered_png(
        ...     partial(histogram_figure, [1.0, 2.0], "h"))  # the second is the first's PNG
        True
    """
    from lightning_influence.reporting.figures import figure_to_png_base64

    key = _figure_key(make)
    if key is not None and key in _RENDERED:
        _RENDERED.move_to_end(key)
        return _RENDERED[key]
    png = figure_to_png_base64(make())
    if key is not None:
        _RENDERED[key] = png
        while len(_RENDERED) > _MAX_RENDERED:
            _RENDERED.popitem(last=False)
    return png


# Rendered figures by content: the report is re-rendered whenever a callback publishes its section, and every
# section's figures would otherwise be drawn again (a matplotlib render is a few tenths of a second).
_RENDERED: OrderedDict[str, str] = OrderedDict()
_MAX_RENDERED = 32


def _figure_key(make: Callable[[], Any]) -> str | None:
    """A content key for ``functools.partial`` figure builders with JSON-able arguments (``None``: do not memoize)."""
    if not isinstance(make, functools.partial):
        return None
    try:
        args = json.dumps([make.args, make.keywords], sort_keys=True, allow_nan=True)
    except (TypeError, ValueError):
        return None
    return f"{make.func.__module__}.{make.func.__qualname__}:{args}"


def generic(data: Mapping[str, Any], skip: Sequence[str] = ()) -> list[Block]:
    """Blocks for keys no renderer claims: scalars in one key/value table, lists of dicts as tables.

    Args:
        data: A section.
        skip: Keys already shown.

    Returns:
        The blocks ("Other values" first).

    Example::

        >>> [(b["kind"], b["title"]) for b in generic({"answer": 42, "rows": [{"a": 1}], "seen": 0}, ["seen"])]
        [('kv', 'Other values'), ('table', 'rows')]
    """
    blocks: list[Block] = []
    scalars: dict[str, Any] = {}
    for k, v in data.items():
        if k in skip:
            continue
        rows = table_rows(v)
        if rows is not None:
            blocks.append(table(str(k), rows))
        elif isinstance(v, Mapping) and v:
            blocks.extend(kv(str(k), v))
        else:
            scalars[str(k)] = v
    return kv("Other values", scalars) + blocks


def section_head(data: Mapping[str, Any]) -> list[Block]:
    """The blocks every section starts with: its ``"notes"`` as warnings, then its ``"summary"``.

    Args:
        data: A section.

    Returns:
        The blocks.

    Example::

        >>> [b["kind"] for b in section_head({"notes": "few samples", "summary": {"recall": 0.8}})]
        ['paragraph', 'kv']
    """
    blocks: list[Block] = []
    notes = data.get("notes")
    if isinstance(notes, str):
        notes = [notes]
    if isinstance(notes, list):
        blocks.extend(paragraph(str(n), "warn") for n in notes)
    return blocks + kv("Summary", data.get("summary"))


def section_tail(data: Mapping[str, Any]) -> list[Block]:
    """The blocks every section ends with: its ``"config"`` and its ``"files"``.

    Args:
        data: A section.

    Returns:
        The blocks.

    Example::

        >>> [b["title"] for b in section_tail({"config": {"damping": 0.01}, "files": {"scores": "scores.pt"}})]
        ['Configuration', 'Files']
    """
    files = data.get("files")
    return kv("Configuration", data.get("config")) + (kv("Files", files) if isinstance(files, Mapping) else [])
