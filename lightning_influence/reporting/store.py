"""``report.json`` + ``report.html``: the on-disk report that every post-training callback writes into.

One :class:`ReportStore` per report directory (``<log_dir>/influence/`` by default). Each callback merges its
own *section* (``"curvature"``, ``"influence"``, ``"cv"``, ``"pbrf"``; see :mod:`lightning_influence.reporting.sections`
for the schema of each) and the store re-renders a self-contained HTML page from the JSON alone, so
``lightning-influence report <run_dir>`` can rebuild it later with :meth:`ReportStore.rebuild`.

The store keeps no state in memory: every :meth:`~ReportStore.update` reads the file, merges, and replaces it
atomically (write to a temporary file, then :func:`os.replace`), so several callbacks (each with their own
store object) can share one directory without losing each other's sections. Call it on rank 0 only.

Example::

    >>> import tempfile
    >>> store = ReportStore(tempfile.mkdtemp())
    >>> store.update("cv", {"estimate": {"approx": 0.31}, "config": {"folds": 5}})
    >>> store.update("cv", {"estimate": {"exact": 0.30}})
    >>> store.load()["cv"]["estimate"]
    {'approx': 0.31, 'exact': 0.3}
    >>> (store.directory / "report.html").exists()
    True
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import json
import math
import os
import platform
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_influence._io import atomic_write

__all__ = ["KNOWN_SECTIONS", "ReportStore", "find_reports", "rebuild_reports", "to_jsonable"]

#: Sections with a dedicated renderer, in display order. Any other name is rendered generically.
KNOWN_SECTIONS: tuple[str, ...] = ("curvature", "influence", "cv", "pbrf")
_RESERVED = ("meta",)

JSON_NAME = "report.json"
HTML_NAME = "report.html"


def to_jsonable(obj: Any, notes: list[str] | None = None, path: str = "") -> Any:
    """Convert ``obj`` into plain JSON types (the one helper every report value goes through).

    * tensors and NumPy arrays → (nested) lists, 0-d ones and NumPy scalars → Python numbers;
    * NaN / ±inf → ``None`` (JSON has no such numbers), with a note ``"<path>: NaN stored as null"``
      appended to ``notes`` when given;
    * objects with a ``to_dict()`` method (``SolveResult``, ``SpectrumSummary``, configs) and dataclasses
      → dicts; mappings → dicts with string keys; tuples/sets → lists; paths and enums → strings/values;
    * anything else → ``str(obj)``.

    Args:
        obj: The value.
        notes: Optional list collecting one note per non-finite number.
        path: Dotted location of ``obj`` (used in the notes).

    Returns:
        A value :func:`json.dumps` accepts with ``allow_nan=False``.

    Example::

        >>> notes = []
        >>> to_jsonable({"a": torch.tensor([1.0, float("nan")]), "b": (1, 2)}, notes, "sec")
        {'a': [1.0, None], 'b': [1, 2]}
        >>> notes
        ['sec.a[1]: NaN stored as null']
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int) and not isinstance(obj, enum.Enum):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        if notes is not None:
            notes.append(f"{path or '<value>'}: {'NaN' if math.isnan(obj) else repr(obj)} stored as null")
        return None
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.is_complex():
            t = t.abs()
        if t.dtype == torch.bool:
            return to_jsonable(t.tolist(), notes, path)
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return to_jsonable(t.item() if t.ndim == 0 else t.tolist(), notes, path)
    if type(obj).__module__ == "numpy" or type(obj).__module__.startswith("numpy."):
        if hasattr(obj, "tolist"):
            return to_jsonable(obj.tolist(), notes, path)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value, notes, path)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict) and not isinstance(obj, type):
        return to_jsonable(obj.to_dict(), notes, path)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, notes, path)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, notes, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v, notes, f"{path}[{i}]") for i, v in enumerate(items)]
    return str(obj)


def _merge(old: Any, new: Any) -> Any:
    """Recursive dict merge: keys of ``new`` win, nested dicts merge, everything else (lists too) is replaced."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = dict(old)
        for k, v in new.items():
            out[k] = _merge(old[k], v) if k in old else v
        return out
    return new


def _versions() -> dict[str, Any]:
    def dist_version(name: str) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(name)
        except PackageNotFoundError:
            return None

    from lightning_influence import __version__

    return {
        "lightning_influence": __version__,
        "torch": torch.__version__,
        "lightning": dist_version("lightning") or dist_version("pytorch-lightning"),
        "numpy": dist_version("numpy"),
        "python": sys.version.split()[0],
        "platform": platform.platform(terse=True),  # OS/arch only; no hostname or user
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(text), binary=False)


class ReportStore:
    """Merge report sections into ``<directory>/report.json`` and re-render ``<directory>/report.html``.

    Args:
        directory: Report directory (created on first write).
        render: Re-render the HTML after every :meth:`update` / :meth:`save_tensor` (default ``True``).
        title: Page title written into ``meta.title`` (kept if already set).

    Raises:
        ValueError: From :meth:`update` when the section name is empty, reserved (``"meta"``), or ``data`` is
            not a mapping.

    The JSON has one key per section plus ``"meta"`` (filled by the store): ``created``/``updated`` (UTC ISO
    timestamps), ``versions`` (lightning_influence, torch, lightning, numpy, python, platform; no hostname),
    ``files`` (name → ``{"path", "shape", "dtype", "section"}`` for every :meth:`save_tensor`), ``null_values``
    (section → notes about NaN/inf stored as null), ``title``.

    Example::

        >>> import tempfile
        >>> store = ReportStore(tempfile.mkdtemp(), render=False)
        >>> store.update("pbrf", {"correlations": [{"estimator": "cg", "pearson": float("nan")}]})
        >>> store.load()["meta"]["null_values"]["pbrf"]
        ['pbrf.correlations[0].pearson: NaN stored as null']
    """

    def __init__(self, directory: str | os.PathLike[str], render: bool = True, title: str | None = None) -> None:
        self.directory = Path(directory)
        self.render = render
        self.title = title

    @property
    def json_path(self) -> Path:
        """``<directory>/report.json``."""
        return self.directory / JSON_NAME

    @property
    def html_path(self) -> Path:
        """``<directory>/report.html``."""
        return self.directory / HTML_NAME

    def load(self) -> dict[str, Any]:
        """The current report (``{}`` if nothing was written yet)."""
        if not self.json_path.exists():
            return {}
        with open(self.json_path, encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            raise ValueError(f"{self.json_path} does not hold a JSON object; it is not a lightning_influence report.")
        return data

    def _meta(self, report: dict[str, Any]) -> dict[str, Any]:
        meta = report.setdefault("meta", {})
        meta.setdefault("created", _now())
        meta["updated"] = _now()
        meta["versions"] = _versions()
        meta.setdefault("files", {})
        meta.setdefault("null_values", {})
        if self.title is not None:
            meta["title"] = self.title
        return meta

    def _write(self, report: dict[str, Any], render: bool | None) -> None:
        text = json.dumps(report, indent=1, allow_nan=False)
        _atomic_write_text(self.json_path, text)
        if self.render if render is None else render:
            self._render(report)

    def _render(self, report: dict[str, Any]) -> None:
        from lightning_influence.reporting.html import render_report

        try:
            page = render_report(report, base_dir=self.directory)
        except Exception as exc:  # the JSON is safe on disk; a rendering bug must not kill a training run
            warnings.warn(
                f"lightning_influence could not render {self.html_path} ({type(exc).__name__}: {exc}); "
                f"{self.json_path} is complete, rebuild with `lightning-influence report {self.directory}`.",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        _atomic_write_text(self.html_path, page)

    def update(self, section: str, data: Mapping[str, Any], render: bool | None = None) -> None:
        """Merge ``data`` into ``section`` of the report and rewrite the JSON (and the HTML).

        Nested dicts are merged key by key; lists and scalars are replaced, so pass the whole history each time
        (e.g. the curvature history list). Values go through :func:`to_jsonable`.

        Args:
            section: Section name (``"curvature"``, ``"influence"``, ``"cv"``, ``"pbrf"``, or your own).
            data: Section content (see the schema in :mod:`lightning_influence.reporting.sections`).
            render: Override the store's ``render`` flag for this call.

        Raises:
            ValueError: If ``section`` is empty or ``"meta"``, or ``data`` is not a mapping.
        """
        if not isinstance(section, str) or not section or section in _RESERVED:
            raise ValueError(f"`section` must be a non-empty name other than {_RESERVED}, got {section!r}.")
        if not isinstance(data, Mapping):
            raise ValueError(f"`data` for section {section!r} must be a mapping, got {type(data).__name__}.")
        notes: list[str] = []
        clean = to_jsonable(dict(data), notes, section)
        report = self.load()
        meta = self._meta(report)
        report[section] = _merge(report.get(section, {}), clean)
        still_null = set(_null_paths(report[section], section))
        old_notes = [n for n in meta["null_values"].get(section, []) if n.split(": ", 1)[0] in still_null]
        merged_notes = list(dict.fromkeys(old_notes + notes))
        if merged_notes:
            meta["null_values"][section] = merged_notes
        else:
            meta["null_values"].pop(section, None)
        self._write(report, render)

    def save_tensor(self, name: str, tensor: Any, section: str | None = None, render: bool | None = None) -> Path:
        """Save ``tensor`` (or any ``torch.save``-able object) to ``<directory>/<name>.pt`` and record it.

        Args:
            name: File stem (letters, digits, ``-``, ``_``, ``.``).
            tensor: The object to save (tensors are detached and moved to CPU first).
            section: Optional section the file belongs to (also listed under ``<section>.files``).
            render: Override the store's ``render`` flag for this call.

        Returns:
            The path written.

        Raises:
            ValueError: If ``name`` contains a path separator or is empty.
        """
        if not name or any(sep in name for sep in ("/", "\\", os.sep)) or name in (".", ".."):
            raise ValueError(f"`name` must be a plain file stem without path separators, got {name!r}.")
        self.directory.mkdir(parents=True, exist_ok=True)
        obj = tensor.detach().cpu() if isinstance(tensor, torch.Tensor) else tensor
        path = self.directory / f"{name}.pt"
        atomic_write(path, lambda f: torch.save(obj, f))
        entry: dict[str, Any] = {"path": path.name, "section": section}
        if isinstance(obj, torch.Tensor):
            entry.update(shape=list(obj.shape), dtype=str(obj.dtype).replace("torch.", ""))
        report = self.load()
        meta = self._meta(report)
        meta["files"][name] = entry
        if section is not None:
            if section in _RESERVED:
                raise ValueError(f"`section` must not be {section!r}.")
            sec = report.setdefault(section, {})
            files = sec.get("files") if isinstance(sec.get("files"), dict) else {}
            files[name] = path.name
            sec["files"] = files
        self._write(report, render)
        return path

    def rebuild(self) -> Path:
        """Re-render ``report.html`` from ``report.json`` alone (no training state needed).

        Returns:
            The HTML path.

        Raises:
            FileNotFoundError: If ``report.json`` does not exist in the directory.
        """
        if not self.json_path.exists():
            raise FileNotFoundError(
                f"No {JSON_NAME} in {self.directory}; pass the report directory (usually <log_dir>/influence)."
            )
        from lightning_influence.reporting.html import render_report

        report = self.load()
        _atomic_write_text(self.html_path, render_report(report, base_dir=self.directory))
        return self.html_path


def find_reports(path: str | os.PathLike[str]) -> list[Path]:
    """Report directories under ``path``: ``path`` itself if it holds ``report.json``, else its subdirectories that do.

    Args:
        path: A report directory or a run's log directory (e.g. ``lightning_logs/version_0``).

    Returns:
        Sorted report directories (empty if none).

    Example::

        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> ReportStore(run / "influence", render=False).update("cv", {"estimate": {"approx": 0.2}})
        >>> [p.name for p in find_reports(run)]
        ['influence']
    """
    root = Path(path)
    if (root / JSON_NAME).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(JSON_NAME) if p.is_file())


def rebuild_reports(path: str | os.PathLike[str]) -> list[Path]:
    """Re-render ``report.html`` for every report under ``path`` (what ``lightning-influence report`` runs).

    Args:
        path: A report directory or a run's log directory.

    Returns:
        The HTML files written.

    Raises:
        FileNotFoundError: If ``path`` does not exist or holds no ``report.json``.

    Example::

        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> ReportStore(run / "influence", render=False).update("cv", {"estimate": {"approx": 0.2}})
        >>> [p.relative_to(run).as_posix() for p in rebuild_reports(run)]
        ['influence/report.html']
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; pass a run's log directory or its influence/ directory.")
    dirs = find_reports(root)
    if not dirs:
        raise FileNotFoundError(
            f"No {JSON_NAME} under {root}; reports are written by the lightning_influence callbacks "
            "(InfluenceReport, ApproximateCV, PBRFValidation, CurvatureMonitor) to <log_dir>/influence/."
        )
    return [ReportStore(d).rebuild() for d in dirs]


def _null_paths(obj: Any, prefix: str) -> list[str]:
    """Every dotted/indexed path in ``obj`` whose value is ``None`` (to prune stale null-value notes)."""
    if obj is None:
        return [prefix]
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_null_paths(v, f"{prefix}.{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(_null_paths(v, f"{prefix}[{i}]"))
    return out
