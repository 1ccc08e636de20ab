r"""Render ``report.json`` into one self-contained ``report.html`` (inline CSS, inline PNG figures, no scripts).

The page has a header (run title, versions, timestamps), a navigation bar, and one section per known key in
the order curvature → influence → cv → pbrf, then any other section. A known section that is absent shows a
"not run" notice. All text is HTML-escaped by Jinja2's autoescaping; every figure is a ``data:image/png``
URI, so the file opens offline and can be mailed around.

Rendering is tolerant: optional keys that are missing render nothing, malformed values never raise (a section
that fails shows an error box and its raw JSON), and keys a renderer does not know are shown in a generic
key/value table. NaN/inf are stored as ``null`` by :func:`~lightning_influence.reporting.store.to_jsonable` and
shown as "—".

Section schemas (the contract with the callbacks)
-------------------------------------------------

Every section may also contain ``"config"`` (dict, shown as a key/value table), ``"notes"`` (list of str, shown
as warnings), ``"summary"`` (dict of headline numbers) and ``"files"`` (name → file name, filled by
:meth:`~lightning_influence.reporting.store.ReportStore.save_tensor`).

``"curvature"`` (CurvatureMonitor)::

    {
      "history": [                          # one row per measurement, oldest first (list is replaced on update)
        {"step": int, "epoch": int,         # x axis = "step"
         "trace": float, "trace_stderr": float, "lambda_max": float, "critical_batch_size": float,
         "lissa_eta": float, "lissa_batch_size": int, "lissa_steps": int,
         "num_products": int, "seconds": float, "trigger": str, ...},   # any extra keys become columns
      ],
      "config": {...}, "summary": {...}
    }

  A row may be ``{"step": s, **SpectrumSummary.to_dict()}`` (nested dicts are flattened with ``_``, so
  ``"lissa": {"eta": ...}`` becomes ``lissa_eta``) or ``{"step": s, **SpectrumSummary.metrics()}`` (a prefix
  ``curvature/`` is dropped and other ``/`` become ``_``).

``"influence"`` (InfluenceReport)::

    {
      "config": {...},                      # solver, damping, top_k, dataset sizes, world size, ...
      "solver": {                           # SolveResult.to_dict() plus extras; or a list of such dicts
        "method": str, "iterations": int, "relative_residual": float, "converged": bool, "diverged": bool,
        "num_products": int, "history": [float, ...],    # residual per iteration (convergence plot)
        "settings": {...}, "info": {...}, "seconds": float, "certificate": {...}},
      "queries": [                          # one per query, in order
        {"index": int | str, "label": any, "prediction": any, "loss": float, "text": str,
         "proponents": [{"index": int, "score": float, "label": any, "text": str}, ...],  # most helpful first
         "opponents":  [{"index": int, "score": float, "label": any, "text": str}, ...]}, # most harmful first
      ],
      "query_images": [image, ...],         # optional, aligned with "queries"
      "train_images": {"<train index>": image, ...} | [image, ...],   # optional; dict (str keys) or list by index
      "self_influence": {"values": [float, ...],        # all scored training examples (histogram)
                         "indices": [int, ...],         # optional, dataset index of each value (default 0..N-1)
                         "labels": [any, ...],          # optional, per value
                         "flagged": [int, ...]},        # optional, indices known to be suspicious (marked ⚑)
      "summary": {...}                      # e.g. {"recall@5%": 0.8}
    }

  An ``image`` is a nested list (or tensor/array) shaped ``HxW`` (grey), ``HxWxC`` or ``CxHxW`` (C = 1, 3, 4),
  any range (min-max scaled per image). Score sign convention: see :mod:`lightning_influence.influence`;
  the renderer shows the lists as given. Rendering caps: 50 queries, 20 self-influence rows.

``"cv"`` (ApproximateCV)::

    {
      "config": {...},
      "estimate": {"approx": float, "exact": float, "stderr": float, ...},   # headline CV numbers
      "folds": [{"fold": int, "size": int, "approx": float, "exact": float, ...}, ...],  # rel. error added
      "curve": {"x": [float, ...], "xlabel": str, "title": str, "ylabel": str, "logx": bool,
                "series": {"approx": [float, ...], "exact": [float, ...]}},         # or a list of such dicts
      "history": [{"epoch": int, "approx": float, "exact": float, ...}, ...]     # CV estimate vs epoch
    }

``"pbrf"`` (PBRFValidation)::

    {
      "config": {...},                      # epsilon, damping, num_train, num_queries, ...
      "correlations": [{"estimator": str, "pearson": float, "spearman": float, "kendall": float, "n": int,
                        ...}, ...],         # or {estimator: {"pearson": ..., ...}}
      "scatter": [{"estimator": str, "pbrf": [float, ...], "estimate": [float, ...]}, ...],
                                            # or {estimator: {"pbrf": [...], "estimate": [...]}}
      "verdict": str                        # optional; otherwise written from the best Pearson correlation
    }

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
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

__all__ = ["SECTION_TITLES", "render_report"]

SECTION_TITLES: dict[str, str] = {
    "curvature": "Curvature",
    "influence": "Influence",
    "cv": "Approximate cross-validation",
    "pbrf": "PBRF validation",
}
_NOT_RUN = {
    "curvature": "Add CurvatureMonitor to the Trainer's callbacks to track Tr(GNH), λ_max and the LiSSA settings.",
    "influence": "Add InfluenceReport to the Trainer's callbacks to attribute predictions to training examples.",
    "cv": "Add ApproximateCV to the Trainer's callbacks to estimate k-fold cross-validation without refits.",
    "pbrf": "Add PBRFValidation to the Trainer's callbacks to check influence scores against the PBRF.",
}
_MAX_QUERIES = 50
_MAX_TOPK = 20
_MAX_SELF = 20
_MAX_TABLE_ROWS = 200
_MAX_SCATTERS = 6

Block = dict[str, Any]


# --------------------------------------------------------------------------------------------- formatting
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
        shown = ", ".join(fmt(v) for v in value[:12])
        return f"[{shown}{', …' if len(value) > 12 else ''}]" + (f" ({len(value)} values)" if len(value) > 12 else "")
    text = json.dumps(value, default=str)
    return text if len(text) <= 300 else text[:300] + " …"


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and len(v) <= 40:
            items.extend(_flatten(v, f"{key}."))
        else:
            items.append((key, fmt(v)))
    return items


# --------------------------------------------------------------------------------------------- blocks
def _kv(title: str, data: Any) -> list[Block]:
    if isinstance(data, Mapping) and data:
        return [{"kind": "kv", "title": title, "items": _flatten(data)}]
    if data not in (None, {}, [], ""):
        return [{"kind": "kv", "title": title, "items": [("value", fmt(data))]}]
    return []


def _table(
    title: str,
    rows: Sequence[Any],
    columns: Sequence[str] | None = None,
    cap: int = _MAX_TABLE_ROWS,
    images: Sequence[str | None] | None = None,
) -> Block:
    dict_rows = [r for r in rows if isinstance(r, Mapping)]
    if columns is None:
        columns = list(OrderedDict.fromkeys(k for r in dict_rows for k in r))
    body = [[fmt(r.get(c)) for c in columns] for r in dict_rows[-cap:]]
    note = f"showing the last {cap} of {len(dict_rows)} rows" if len(dict_rows) > cap else ""
    imgs = list(images)[-cap:] if images is not None and any(images) and len(images) == len(dict_rows) else None
    return {"kind": "table", "title": title, "columns": list(columns), "rows": body, "note": note, "images": imgs}


def _paragraph(text: str, cls: str = "") -> Block:
    return {"kind": "paragraph", "text": text, "cls": cls}


def _figure(make: Callable[[], Any], caption: str = "") -> Block:
    from lightning_influence.reporting.figures import figure_to_png_base64

    try:
        fig = make()
    except ImportError as exc:
        return _paragraph(f"Figure unavailable: {exc}", "warn")
    return {"kind": "figure", "png": figure_to_png_base64(fig), "caption": caption}


def _generic(data: Mapping[str, Any], skip: Sequence[str] = ()) -> list[Block]:
    """Blocks for keys no renderer claims: scalars in one key/value table, lists of dicts as tables."""
    blocks: list[Block] = []
    scalars: dict[str, Any] = {}
    for k, v in data.items():
        if k in skip:
            continue
        if isinstance(v, list) and v and all(isinstance(r, Mapping) for r in v):
            blocks.append(_table(str(k), v))
        elif isinstance(v, Mapping) and v:
            blocks.extend(_kv(str(k), v))
        else:
            scalars[str(k)] = v
    if scalars:
        blocks.insert(0, {"kind": "kv", "title": "Other values", "items": [(k, fmt(v)) for k, v in scalars.items()]})
    return blocks


def _common_head(data: Mapping[str, Any]) -> list[Block]:
    blocks: list[Block] = []
    notes = data.get("notes")
    if isinstance(notes, str):
        notes = [notes]
    if isinstance(notes, list):
        blocks.extend(_paragraph(str(n), "warn") for n in notes)
    blocks.extend(_kv("Summary", data.get("summary")))
    return blocks


def _common_tail(data: Mapping[str, Any]) -> list[Block]:
    blocks = _kv("Configuration", data.get("config"))
    files = data.get("files")
    if isinstance(files, Mapping) and files:
        blocks.append({"kind": "kv", "title": "Files", "items": [(str(k), fmt(v)) for k, v in files.items()]})
    return blocks


_COMMON = ("config", "notes", "summary", "files")


# --------------------------------------------------------------------------------------------- curvature
_CURV_ORDER = [
    "step", "epoch", "trace", "trace_stderr", "lambda_max", "critical_batch_size",
    "lissa_eta", "lissa_batch_size", "lissa_steps", "lissa_damping", "num_products", "seconds",
]  # fmt: skip


def _norm_key(key: str) -> str:
    if key.startswith("curvature/"):
        key = key[len("curvature/") :]
    return key.replace("/", "_")


def _flat_row(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        key = _norm_key(f"{prefix}{k}")
        if isinstance(v, Mapping):
            out.update(_flat_row(v, f"{key}_"))
        else:
            out[key] = v
    return out


def _curvature(data: Mapping[str, Any]) -> list[Block]:
    blocks = _common_head(data)
    raw = data.get("history")
    history = [_flat_row(r) for r in raw if isinstance(r, Mapping)] if isinstance(raw, list) else []
    if history:
        last = history[-1]
        latest = {k: last[k] for k in _CURV_ORDER if k in last}
        blocks.extend(_kv(f"Latest measurement ({len(history)} in total)", latest))
        if any(_num(r.get(k)) is not None for r in history for k in ("trace", "lambda_max", "critical_batch_size")):
            from lightning_influence.reporting.figures import curvature_figure

            blocks.append(
                _figure(
                    lambda: curvature_figure(history),
                    "Trace (±2 standard errors), λ_max and the critical batch size Tr/λ_max against the training step.",
                )
            )
        cols = [k for k in _CURV_ORDER if any(k in r for r in history)]
        cols += [k for k in OrderedDict.fromkeys(k for r in history for k in r) if k not in cols]
        blocks.append(_table("History", history, cols))
    else:
        blocks.append(_paragraph("No curvature measurements were recorded.", "muted"))
    blocks.extend(_common_tail(data))
    blocks.extend(_generic(data, (*_COMMON, "history")))
    return blocks


# --------------------------------------------------------------------------------------------- influence
def _image_b64(image: Any, cache: dict[str, str | None]) -> str | None:
    if image is None:
        return None
    key = hashlib.sha1(json.dumps(image, default=str).encode()).hexdigest()
    if key not in cache:
        from lightning_influence.reporting.figures import image_to_png_base64

        try:
            cache[key] = image_to_png_base64(image)
        except (ImportError, ValueError, TypeError):
            cache[key] = None
    return cache[key]


def _lookup_image(images: Any, index: Any) -> Any:
    if images is None or index is None:
        return None
    if isinstance(images, Mapping):
        return images.get(str(index))
    if isinstance(images, list) and isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(images):
        return images[index]
    return None


def _solver_blocks(solver: Any, title: str) -> list[Block]:
    if not isinstance(solver, Mapping):
        return _kv(title, solver)
    blocks: list[Block] = []
    diverged, converged = solver.get("diverged"), solver.get("converged")
    if diverged:
        status, cls = "diverged: the scores are not trustworthy; increase the batch size or the damping", "bad"
    elif converged:
        status, cls = "converged", "good"
    elif converged is False:
        status, cls = "did not reach its tolerance: treat the scores with caution", "warn"
    else:
        status, cls = "", ""
    head = {
        k: solver[k]
        for k in ("method", "iterations", "relative_residual", "converged", "diverged", "num_products", "seconds")
        if k in solver
    }
    blocks.extend(_kv(title, head))
    if status:
        blocks.append(_paragraph(f"Solver {fmt(solver.get('method', ''))} {status}.", cls))
    for key in ("settings", "info", "certificate"):
        blocks.extend(_kv(f"{title}: {key}", solver.get(key)))
    hist = solver.get("history")
    if isinstance(hist, list) and any(_num(h) is not None for h in hist):
        from lightning_influence.reporting.figures import convergence_figure

        blocks.append(
            _figure(
                lambda: convergence_figure(hist, f"{fmt(solver.get('method', 'solver'))} convergence"),
                "Relative residual per iteration.",
            )
        )
    rest = {k: v for k, v in solver.items() if k not in (*head, "settings", "info", "certificate", "history")}
    blocks.extend(_kv(f"{title}: other", rest))
    return blocks


def _influence(data: Mapping[str, Any]) -> list[Block]:
    blocks = _common_head(data)
    cache: dict[str, str | None] = {}
    solver = data.get("solver")
    if isinstance(solver, list):
        for i, s in enumerate(solver):
            blocks.extend(_solver_blocks(s, f"Solver {i}"))
    elif solver is not None:
        blocks.extend(_solver_blocks(solver, "Solver"))

    queries = data.get("queries")
    q_images = data.get("query_images")
    t_images = data.get("train_images")
    if isinstance(queries, list) and queries:
        blocks.append({"kind": "heading", "text": f"Top proponents and opponents ({len(queries)} queries)"})
        if len(queries) > _MAX_QUERIES:
            blocks.append(_paragraph(f"Showing the first {_MAX_QUERIES} of {len(queries)} queries.", "muted"))
        for qi, q in enumerate(queries[:_MAX_QUERIES]):
            if not isinstance(q, Mapping):
                continue
            q_img = (
                q.get("image")
                if "image" in q
                else (q_images[qi] if isinstance(q_images, list) and qi < len(q_images) else None)
            )
            q_b64 = _image_b64(q_img, cache)
            desc = {k: q[k] for k in ("label", "prediction", "loss") if k in q}
            title = f"Query {fmt(q.get('index', qi))}" + (
                " (" + ", ".join(f"{k} {fmt(v)}" for k, v in desc.items()) + ")" if desc else ""
            )
            groups = []
            any_img = q_b64 is not None
            for name in ("proponents", "opponents"):
                items = q.get(name)
                if not isinstance(items, list):
                    continue
                entries = []
                for rank, it in enumerate(items[:_MAX_TOPK]):
                    it = it if isinstance(it, Mapping) else {"index": it}
                    img = it.get("image") if "image" in it else _lookup_image(t_images, it.get("index"))
                    b64 = _image_b64(img, cache)
                    any_img = any_img or b64 is not None
                    entries.append(
                        {
                            "img": b64,
                            "caption": f"#{fmt(it.get('index'))}"
                            + (f" · y={fmt(it.get('label'))}" if "label" in it else ""),
                            "rank": rank + 1,
                            "index": fmt(it.get("index")),
                            "label": fmt(it.get("label")) if "label" in it else "",
                            "score": fmt(it.get("score")),
                            "text": str(it.get("text", "")),
                        }
                    )
                groups.append({"name": name.capitalize(), "items": entries})
            blocks.append(
                {
                    "kind": "query",
                    "title": title,
                    "img": q_b64,
                    "text": str(q.get("text", "")),
                    "groups": groups,
                    "images": any_img,
                }
            )

    si = data.get("self_influence")
    if isinstance(si, list):
        si = {"values": si}
    if isinstance(si, Mapping):
        blocks.extend(_self_influence(si, t_images, cache))
    blocks.extend(_common_tail(data))
    blocks.extend(_generic(data, (*_COMMON, "solver", "queries", "query_images", "train_images", "self_influence")))
    return blocks


def _self_influence(
    si: Mapping[str, Any], train_images: Any = None, cache: dict[str, str | None] | None = None
) -> list[Block]:
    values = si.get("values")
    if not isinstance(values, list):
        return _kv("Self-influence", si)
    n = len(values)
    raw_idx, raw_lab = si.get("indices"), si.get("labels")
    indices: list[Any] = raw_idx if isinstance(raw_idx, list) and len(raw_idx) == n else list(range(n))
    labels: list[Any] | None = raw_lab if isinstance(raw_lab, list) and len(raw_lab) == n else None
    flagged = {str(i) for i in si.get("flagged", [])} if isinstance(si.get("flagged"), list) else set()
    order = sorted((i for i in range(n) if _num(values[i]) is not None), key=lambda i: -float(values[i]))
    rows = []
    for rank, i in enumerate(order[:_MAX_SELF]):
        row: dict[str, Any] = {"rank": rank + 1, "index": indices[i], "self-influence": values[i]}
        if labels is not None:
            row["label"] = labels[i]
        if flagged:
            row["flagged"] = "⚑" if str(indices[i]) in flagged else ""
        rows.append(row)
    blocks: list[Block] = [{"kind": "heading", "text": f"Self-influence ranking (top {min(_MAX_SELF, n)} of {n})"}]
    blocks.append(
        _paragraph(
            "Training examples with the largest self-influence are the ones the model had to bend "
            "most to fit: check them first for wrong labels or outliers.",
            "muted",
        )
    )
    if flagged and order:
        k = min(len(order), max(1, len(flagged)))
        hits = sum(str(indices[i]) in flagged for i in order[:k])
        blocks.append(
            _paragraph(
                f"{hits} of the top {k} examples by self-influence are flagged "
                f"(recall {hits / max(1, len(flagged)):.0%} of {len(flagged)} flagged).",
                "",
            )
        )
    cache = {} if cache is None else cache
    thumbs = [_image_b64(_lookup_image(train_images, indices[i]), cache) for i in order[:_MAX_SELF]]
    blocks.append(_table("", rows, images=thumbs))
    if order:
        from lightning_influence.reporting.figures import histogram_figure

        blocks.append(
            _figure(
                lambda: histogram_figure(values, "Self-influence", "self-influence"),
                f"Distribution of self-influence over {len(order)} training examples.",
            )
        )
    blocks.extend(_generic(si, ("values", "indices", "labels", "flagged")))
    return blocks


# --------------------------------------------------------------------------------------------- cv
def _curve_blocks(curve: Any) -> list[Block]:
    curves = curve if isinstance(curve, list) else [curve]
    blocks: list[Block] = []
    for c in curves:
        if not isinstance(c, Mapping) or not isinstance(c.get("x"), list):
            continue
        series = c.get("series")
        if not isinstance(series, Mapping):
            series = {k: v for k, v in c.items() if isinstance(v, list) and k != "x"}
        series = {str(k): v for k, v in series.items() if isinstance(v, list)}
        if not series:
            continue
        from lightning_influence.reporting.figures import line_figure

        xlabel = str(c.get("xlabel", "x"))
        blocks.append(
            _figure(
                partial(
                    line_figure,
                    c["x"],
                    series,
                    title=str(c.get("title", "Cross-validation curve")),
                    xlabel=xlabel,
                    ylabel=str(c.get("ylabel", "CV loss")),
                    logx=c.get("logx"),
                ),
                "",
            )
        )
        rows = [
            {xlabel: x, **{k: (v[i] if i < len(v) else None) for k, v in series.items()}} for i, x in enumerate(c["x"])
        ]
        blocks.append(_table(str(c.get("title", "Curve values")), rows))
    return blocks


def _cv(data: Mapping[str, Any]) -> list[Block]:
    blocks = _common_head(data)
    blocks.extend(_kv("Cross-validation estimate", data.get("estimate")))
    folds = data.get("folds")
    if isinstance(folds, list) and folds:
        rows = []
        for f in folds:
            if not isinstance(f, Mapping):
                continue
            row = dict(f)
            a, e = _num(f.get("approx")), _num(f.get("exact"))
            if a is not None and e is not None and "rel_error" not in row:
                row["rel_error"] = abs(a - e) / max(abs(e), 1e-300)
            rows.append(row)
        blocks.append(_table("Per-fold values", rows))
    blocks.extend(_curve_blocks(data.get("curve")))
    hist = data.get("history")
    if isinstance(hist, list) and hist and all(isinstance(r, Mapping) for r in hist):
        xkey = "epoch" if any("epoch" in r for r in hist) else "step"
        keys = [
            k
            for k in OrderedDict.fromkeys(k for r in hist for k in r)
            if k not in ("epoch", "step") and any(_num(r.get(k)) is not None for r in hist)
        ]
        if keys:
            from lightning_influence.reporting.figures import line_figure

            xs: list[Any] = [r.get(xkey, i) for i, r in enumerate(hist)]
            ys: dict[str, list[Any]] = {k: [r.get(k) for r in hist] for k in keys}
            blocks.append(_figure(lambda: line_figure(xs, ys, title=f"CV estimate vs {xkey}", xlabel=xkey), ""))
        blocks.append(_table("History", hist))
    blocks.extend(_common_tail(data))
    blocks.extend(_generic(data, (*_COMMON, "estimate", "folds", "curve", "history")))
    return blocks


# --------------------------------------------------------------------------------------------- pbrf
def _as_named_list(obj: Any, name_key: str = "estimator") -> list[dict[str, Any]]:
    if isinstance(obj, Mapping):
        return [{name_key: k, **(v if isinstance(v, Mapping) else {"value": v})} for k, v in obj.items()]
    if isinstance(obj, list):
        return [dict(r) for r in obj if isinstance(r, Mapping)]
    return []


def _pearson(x: Sequence[Any], y: Sequence[Any]) -> float | None:
    pairs = [(a, b) for a, b in zip(map(_num, x), map(_num, y), strict=False) if a is not None and b is not None]
    if len(pairs) < 3:
        return None
    n = len(pairs)
    mx, my = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
    sxy = sum((a - mx) * (b - my) for a, b in pairs)
    sxx, syy = sum((a - mx) ** 2 for a, _ in pairs), sum((b - my) ** 2 for _, b in pairs)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def verdict(correlations: Sequence[Mapping[str, Any]]) -> str:
    """A plain-language sentence on how well the best estimator agrees with the PBRF.

    Args:
        correlations: Rows with ``"estimator"`` and ``"pearson"`` (optionally ``"spearman"``, ``"n"``).

    Returns:
        The sentence (empty if no Pearson value is available).

    Example::

        >>> verdict([{"estimator": "cg", "pearson": 0.97, "spearman": 0.95, "n": 200}])[:60]
        'The cg influence scores agree closely with the PBRF (Pearson'
    """
    rows = [r for r in correlations if _num(r.get("pearson")) is not None]
    if not rows:
        return ""
    best = max(rows, key=lambda r: float(r["pearson"]))
    p = float(best["pearson"])
    extra = f", Spearman {fmt(best.get('spearman'))}" if _num(best.get("spearman")) is not None else ""
    n = f" over {best['n']} pairs" if isinstance(best.get("n"), int) else ""
    name = str(best.get("estimator", "influence"))
    stats = f"(Pearson {p:.3f}{extra}{n})"
    if p >= 0.9:
        return (
            f"The {name} influence scores agree closely with the PBRF {stats}: "
            "they can be trusted to rank training examples."
        )
    if p >= 0.7:
        return (
            f"The {name} influence scores agree moderately with the PBRF {stats}: the strongest "
            "proponents/opponents are meaningful, fine-grained rankings less so."
        )
    return (
        f"The {name} influence scores disagree with the PBRF {stats}: do not rely on them; increase the "
        "damping, the LiSSA batch size, or the solver iterations and check the solver diagnostics."
    )


def _pbrf(data: Mapping[str, Any]) -> list[Block]:
    blocks = _common_head(data)
    corr = _as_named_list(data.get("correlations"))
    text = data.get("verdict") if isinstance(data.get("verdict"), str) else verdict(corr)
    if text:
        blocks.append(_paragraph(text, "verdict"))
    if corr:
        cols = ["estimator", *[c for c in ("pearson", "spearman", "kendall", "n") if any(c in r for r in corr)]]
        cols += [k for k in OrderedDict.fromkeys(k for r in corr for k in r) if k not in cols]
        blocks.append(_table("Correlation with the PBRF", corr, cols))
    scatters = _as_named_list(data.get("scatter"))
    figs = []
    from lightning_influence.reporting.figures import scatter_figure

    for s in scatters[:_MAX_SCATTERS]:
        x, y = s.get("pbrf"), s.get("estimate")
        if isinstance(x, list) and isinstance(y, list) and x:
            name = str(s.get("estimator", "estimate"))
            r = _pearson(x, y)
            title = f"{name} vs PBRF" + (f" (r = {r:.3f})" if r is not None else "")
            figs.append(_figure(partial(scatter_figure, x, y, title, "PBRF response", name), ""))
    if figs:
        blocks.append({"kind": "figrow", "figures": figs})
    blocks.extend(_common_tail(data))
    blocks.extend(_generic(data, (*_COMMON, "correlations", "scatter", "verdict")))
    return blocks


def _attribution(data: Mapping[str, Any]) -> list[Block]:
    """The ``"attribution"`` section (AttributionBenchmark): verdict, LDS table with intervals, scatter.

    Schema::

        {"verdict": str,
         "lds": [{"estimator": str, "lds": float, "ci_low": float, "ci_high": float, ...}, ...],
         "scatter": {"estimator": str, "predicted": [float, ...], "actual": [float, ...]},   # standardised per query
         "per_query": {estimator: [float, ...]}, "interval": {...}, "config": {...}, "summary": {...}}

    Returns:
        The section's blocks.
    """
    from lightning_influence.reporting.figures import histogram_figure, scatter_figure

    blocks = _common_head(data)
    if isinstance(data.get("verdict"), str):
        blocks.append(_paragraph(str(data["verdict"]), "verdict"))
    rows = _as_named_list(data.get("lds"))
    if rows:
        cols = ["estimator", *[c for c in ("lds", "ci_low", "ci_high") if any(c in r for r in rows)]]
        cols += [k for k in OrderedDict.fromkeys(k for r in rows for k in r) if k not in cols]
        blocks.append(_table("Linear datamodeling score (Spearman across retrained subsets, mean over queries)", rows,
                             cols))
    figs = []
    sc = data.get("scatter")
    if isinstance(sc, Mapping) and isinstance(sc.get("predicted"), list) and isinstance(sc.get("actual"), list):
        name = str(sc.get("estimator", "scores"))
        figs.append(_figure(partial(scatter_figure, sc["actual"], sc["predicted"], f"{name}: predicted vs retrained",
                                    "actual output (z-score per query)", "predicted (z-score per query)"),
                            "Each point is one (subset, query) pair, standardised per query across subsets."))
    per_query = data.get("per_query")
    if isinstance(per_query, Mapping):
        for name, values in list(per_query.items())[:2]:
            if isinstance(values, list) and values:
                figs.append(_figure(partial(histogram_figure, [v for v in values if _num(v) is not None],
                                            f"per-query LDS ({name})", "Spearman correlation", 20), ""))
    if figs:
        blocks.append({"kind": "figrow", "figures": figs})
    blocks.extend(_kv("Interval", data.get("interval")))
    blocks.extend(_common_tail(data))
    blocks.extend(_generic(data, (*_COMMON, "verdict", "lds", "scatter", "per_query", "interval")))
    return blocks


_RENDERERS: dict[str, Callable[[Mapping[str, Any]], list[Block]]] = {
    "curvature": _curvature,
    "influence": _influence,
    "cv": _cv,
    "pbrf": _pbrf,
    "attribution": _attribution,
}


# --------------------------------------------------------------------------------------------- page
_SECTION_CACHE: OrderedDict[str, dict[str, Any]] = OrderedDict()
_CACHE_SIZE = 32


def _render_section(name: str, data: Any) -> dict[str, Any]:
    title = SECTION_TITLES.get(name, name.replace("_", " ").capitalize())
    try:
        key = hashlib.sha1(f"{name}\0{json.dumps(data, sort_keys=True, default=str)}".encode()).hexdigest()
    except (TypeError, ValueError):
        key = ""
    if key and key in _SECTION_CACHE:
        _SECTION_CACHE.move_to_end(key)
        return _SECTION_CACHE[key]
    section: dict[str, Any] = {"id": name, "title": title, "present": True, "blocks": [], "error": None, "raw": ""}
    try:
        if not isinstance(data, Mapping):
            section["blocks"] = _kv("Value", data)
        else:
            renderer = _RENDERERS.get(name)
            section["blocks"] = (
                renderer(data) if renderer else (_common_head(data) + _common_tail(data) + _generic(data, _COMMON))
            )
    except Exception as exc:  # never let one malformed section take down the page
        section["error"] = f"This section could not be rendered ({type(exc).__name__}: {exc})."
        section["raw"] = json.dumps(data, indent=1, default=str)[:20000]
    if key:
        _SECTION_CACHE[key] = section
        while len(_SECTION_CACHE) > _CACHE_SIZE:
            _SECTION_CACHE.popitem(last=False)
    return section


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
    meta = report.get("meta") if isinstance(report.get("meta"), Mapping) else {}
    assert isinstance(meta, Mapping)
    run = report.get("run") if isinstance(report.get("run"), Mapping) else {}
    assert isinstance(run, Mapping)
    names = [*SECTION_TITLES, *(k for k in report if k not in SECTION_TITLES and k not in ("meta", "run"))]
    sections = []
    for name in names:
        if name in report:
            sections.append(_render_section(name, report[name]))
        else:
            sections.append(
                {
                    "id": name,
                    "title": SECTION_TITLES[name],
                    "present": False,
                    "message": _NOT_RUN.get(name, ""),
                    "blocks": [],
                    "error": None,
                    "raw": "",
                }
            )
    versions = meta.get("versions") if isinstance(meta.get("versions"), Mapping) else {}
    assert isinstance(versions, Mapping)
    null_notes = meta.get("null_values") if isinstance(meta.get("null_values"), Mapping) else {}
    assert isinstance(null_notes, Mapping)
    header = {
        "title": str(meta.get("title") or run.get("name") or "lightning_influence report"),
        "run": _flatten(run) if run else [],
        "versions": [(str(k), fmt(v)) for k, v in versions.items()],
        "created": fmt(meta.get("created")),
        "updated": fmt(meta.get("updated")),
        "directory": str(base_dir) if base_dir is not None else "",
        "null_notes": [str(n) for notes in null_notes.values() if isinstance(notes, list) for n in notes][:50],
    }
    return str(_environment().get_template("report.html.j2").render(header=header, sections=sections))
