r"""The report's sections: one renderer per section of ``report.json``, and the registry that orders them.

A renderer takes the section's JSON and returns the :mod:`~lightning_influence.reporting.blocks` of its own
content. :func:`section_blocks` frames it the same way for every section: the notes and summary first, the
renderer's blocks, the configuration and files, then every key the renderer does not claim in a generic table.
A new section plugs in with one :func:`register_section` call.

Rendering is tolerant: optional keys that are missing render nothing, malformed values are skipped or shown
generically, and NaN/inf (stored as ``null`` by :func:`~lightning_influence.reporting.store.to_jsonable`) are
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
      "verdict": str                        # optional; otherwise lightning_influence.stats.verdict of the table
    }

Example::

    >>> [b["title"] for b in section_blocks("cv", {"estimate": {"approx": 0.25}, "seed": 3})]
    ['Cross-validation estimate', 'Other values']
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from lightning_influence import stats
from lightning_influence.reporting.blocks import (
    COMMON_KEYS,
    Block,
    columns,
    figure,
    fmt,
    generic,
    kv,
    paragraph,
    section_head,
    section_tail,
    table,
    table_rows,
)
from lightning_influence.reporting.figures import (
    convergence_figure,
    curvature_figure,
    histogram_figure,
    image_to_png_base64,
    line_figure,
    scatter_figure,
)
from lightning_influence.stats import as_finite

__all__ = ["SectionSpec", "curvature_history_figure", "register_section", "registered_sections", "section_blocks",
           "section_title"]

Renderer = Callable[[Mapping[str, Any]], list[Block]]
ImageCache = dict[str, str | None]

_MAX_QUERIES = 50
_MAX_TOPK = 20
_MAX_SELF = 20
_MAX_SCATTERS = 6


# --------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class SectionSpec:
    """How one section of ``report.json`` is shown (see :func:`register_section`).

    Attributes:
        title: Heading and navigation label.
        render: Section JSON → its own blocks (without the common head and tail).
        keys: Keys ``render`` shows; every other key is shown generically.
        not_run: Notice shown when the section is absent (``None``: an absent section is not shown).

    Example::

        >>> registered_sections()["pbrf"].title
        'PBRF validation'
    """

    title: str
    render: Renderer
    keys: tuple[str, ...] = ()
    not_run: str | None = None


_REGISTRY: dict[str, SectionSpec] = {}


def register_section(
    name: str,
    render: Renderer,
    *,
    title: str | None = None,
    keys: Sequence[str] = (),
    not_run: str | None = None,
) -> None:
    """Add (or replace) a report section; registered sections appear in registration order, then unknown ones.

    Args:
        name: The section's key in ``report.json`` (also its HTML id).
        render: Section JSON (a mapping) → list of :mod:`~lightning_influence.reporting.blocks`. Exceptions are
            caught by the page, which shows an error box and the raw JSON instead.
        title: Heading; default ``name`` with ``_`` as spaces, capitalised.
        keys: The keys ``render`` shows; the others (beyond ``config``/``notes``/``summary``/``files``, which every
            section shows) are listed generically after it.
        not_run: Notice shown when the report has no such section; ``None`` hides an absent section.

    Example::

        >>> from lightning_influence.reporting.blocks import paragraph
        >>> register_section("demo_note", lambda d: [paragraph(str(d.get("text", "")))], keys=["text"])
        >>> [b["text"] for b in section_blocks("demo_note", {"text": "hello"})]
        ['hello']
    """
    _REGISTRY[name] = SectionSpec(title or _default_title(name), render, tuple(keys), not_run)


def registered_sections() -> dict[str, SectionSpec]:
    """The registered sections by name, in page order.

    Returns:
        A copy of the registry.

    Example::

        >>> list(registered_sections())[:4]
        ['curvature', 'influence', 'cv', 'pbrf']
    """
    return dict(_REGISTRY)


def section_title(name: str) -> str:
    """The heading of section ``name``: its registered title, else ``name`` with ``_`` as spaces, capitalised.

    Args:
        name: Section name.

    Returns:
        The title.

    Example::

        >>> section_title("cv"), section_title("my_extra")
        ('Approximate cross-validation', 'My extra')
    """
    spec = _REGISTRY.get(name)
    return spec.title if spec is not None else _default_title(name)


def _default_title(name: str) -> str:
    return name.replace("_", " ").capitalize()


def section_blocks(name: str, data: Any) -> list[Block]:
    """All blocks of one section: notes and summary, the registered renderer's blocks, config and files, the rest.

    Args:
        name: Section name (an unregistered one is shown generically).
        data: The section's JSON (a non-mapping is shown as a single value).

    Returns:
        The blocks.

    Raises:
        Exception: Whatever the section's renderer raises on malformed data (the page catches it).

    Example::

        >>> [b["kind"] for b in section_blocks("my_extra", {"answer": 42, "rows": [{"a": 1}]})]
        ['kv', 'table']
    """
    if not isinstance(data, Mapping):
        return kv("Value", data)
    spec = _REGISTRY.get(name)
    body = spec.render(data) if spec is not None else []
    keys = spec.keys if spec is not None else ()
    return section_head(data) + body + section_tail(data) + generic(data, (*COMMON_KEYS, *keys))


# --------------------------------------------------------------------------------------------- curvature
_CURV_ORDER = (
    "step", "epoch", "trace", "trace_stderr", "lambda_max", "critical_batch_size",
    "lissa_eta", "lissa_batch_size", "lissa_steps", "lissa_damping", "num_products", "seconds",
)  # fmt: skip


def _norm_key(key: str) -> str:
    if key.startswith("curvature/"):
        key = key[len("curvature/") :]
    return key.replace("/", "_")


def _flat_row(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A history row with nested dicts joined by ``_`` and metric-style keys (``curvature/trace``) normalised."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        key = _norm_key(f"{prefix}{k}")
        if isinstance(v, Mapping):
            out.update(_flat_row(v, f"{key}_"))
        else:
            out[key] = v
    return out


def curvature_history_figure(raw: Any) -> Callable[[], Any] | None:
    """The curvature section's figure builder for a ``CurvatureMonitor`` history (``None``: nothing finite to draw).

    The monitor logs the same builder's PNG to its loggers, so the two share one render (:func:`rendered_png`).

    Returns:
        A ``functools.partial`` of :func:`~lightning_influence.reporting.figures.curvature_figure`, or ``None``.

    Example::

        >>> curvature_history_figure([{"step": 0, "trace": float("nan")}]) is None
        True
    """
    history = [_flat_row(r) for r in raw if isinstance(r, Mapping)] if isinstance(raw, list) else []
    keys = ("trace", "lambda_max", "critical_batch_size")
    if not any(as_finite(r.get(k)) is not None for r in history for k in keys):
        return None
    return partial(curvature_figure, history)


def _curvature(data: Mapping[str, Any]) -> list[Block]:
    raw = data.get("history")
    history = [_flat_row(r) for r in raw if isinstance(r, Mapping)] if isinstance(raw, list) else []
    if not history:
        return [paragraph("No curvature measurements were recorded.", "muted")]
    last = history[-1]
    blocks = kv(f"Latest measurement ({len(history)} in total)", {k: last[k] for k in _CURV_ORDER if k in last})
    make = curvature_history_figure(raw)
    if make is not None:
        blocks.append(figure(
            make, "Trace (±2 standard errors), λ_max and the critical batch size Tr/λ_max against the training step."))
    blocks.append(table("History", history, columns(history, _CURV_ORDER)))
    return blocks


# --------------------------------------------------------------------------------------------- influence
def _image_b64(image: Any, cache: ImageCache) -> str | None:
    """PNG (base64) of a JSON image, memoised in ``cache`` (the same training image recurs across queries)."""
    if image is None:
        return None
    key = hashlib.sha1(json.dumps(image, default=str).encode()).hexdigest()
    if key not in cache:
        try:
            cache[key] = image_to_png_base64(image)
        except (ImportError, ValueError, TypeError):
            cache[key] = None
    return cache[key]


def _lookup_image(images: Any, index: Any) -> Any:
    """The image of training ``index`` in ``train_images`` (a dict with str keys, or a list by index)."""
    if images is None or index is None:
        return None
    if isinstance(images, Mapping):
        return images.get(str(index))
    if isinstance(images, list) and isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(images):
        return images[index]
    return None


def _solver_status(solver: Mapping[str, Any]) -> tuple[str, str]:
    """``(status text, CSS class)`` of a solve from its ``diverged`` / ``converged`` flags."""
    diverged, converged = solver.get("diverged"), solver.get("converged")
    if diverged:
        return "diverged: the scores are not trustworthy; increase the batch size or the damping", "bad"
    if converged:
        return "converged", "good"
    if converged is False:
        return "did not reach its tolerance: treat the scores with caution", "warn"
    return "", ""


_SOLVER_HEAD = ("method", "iterations", "relative_residual", "converged", "diverged", "num_products", "seconds")
_SOLVER_DETAILS = ("settings", "info", "certificate")


def _solver_blocks(solver: Any, title: str) -> list[Block]:
    if not isinstance(solver, Mapping):
        return kv(title, solver)
    head = {k: solver[k] for k in _SOLVER_HEAD if k in solver}
    blocks = kv(title, head)
    status, cls = _solver_status(solver)
    if status:
        blocks.append(paragraph(f"Solver {fmt(solver.get('method', ''))} {status}.", cls))
    for key in _SOLVER_DETAILS:
        blocks.extend(kv(f"{title}: {key}", solver.get(key)))
    hist = solver.get("history")
    if isinstance(hist, list) and any(as_finite(h) is not None for h in hist):
        blocks.append(
            figure(
                partial(convergence_figure, hist, f"{fmt(solver.get('method', 'solver'))} convergence"),
                "Relative residual per iteration.",
            )
        )
    rest = {k: v for k, v in solver.items() if k not in (*head, *_SOLVER_DETAILS, "history")}
    return blocks + kv(f"{title}: other", rest)


def _entry(rank: int, item: Any, train_images: Any, cache: ImageCache) -> dict[str, Any]:
    """One proponent/opponent card (image, caption, score)."""
    it = item if isinstance(item, Mapping) else {"index": item}
    img = it.get("image") if "image" in it else _lookup_image(train_images, it.get("index"))
    label = f" · y={fmt(it.get('label'))}" if "label" in it else ""
    return {
        "img": _image_b64(img, cache),
        "caption": f"#{fmt(it.get('index'))}{label}",
        "rank": rank + 1,
        "index": fmt(it.get("index")),
        "label": fmt(it.get("label")) if "label" in it else "",
        "score": fmt(it.get("score")),
        "text": str(it.get("text", "")),
    }


def _query_block(q: Mapping[str, Any], qi: int, query_images: Any, train_images: Any, cache: ImageCache) -> Block:
    """The card of one query: its image and description, then its proponents and opponents."""
    if "image" in q:
        q_img = q.get("image")
    else:
        q_img = query_images[qi] if isinstance(query_images, list) and qi < len(query_images) else None
    q_b64 = _image_b64(q_img, cache)
    desc = ", ".join(f"{k} {fmt(q[k])}" for k in ("label", "prediction", "loss") if k in q)
    title = f"Query {fmt(q.get('index', qi))}" + (f" ({desc})" if desc else "")
    groups: list[dict[str, Any]] = []
    for name in ("proponents", "opponents"):
        items = q.get(name)
        if isinstance(items, list):
            entries = [_entry(rank, it, train_images, cache) for rank, it in enumerate(items[:_MAX_TOPK])]
            groups.append({"name": name.capitalize(), "items": entries})
    any_img = q_b64 is not None or any(e["img"] is not None for g in groups for e in g["items"])
    text = str(q.get("text", ""))
    return {"kind": "query", "title": title, "img": q_b64, "text": text, "groups": groups, "images": any_img}


def _query_blocks(data: Mapping[str, Any], cache: ImageCache) -> list[Block]:
    queries = data.get("queries")
    if not (isinstance(queries, list) and queries):
        return []
    blocks: list[Block] = [{"kind": "heading", "text": f"Top proponents and opponents ({len(queries)} queries)"}]
    if len(queries) > _MAX_QUERIES:
        blocks.append(paragraph(f"Showing the first {_MAX_QUERIES} of {len(queries)} queries.", "muted"))
    for qi, q in enumerate(queries[:_MAX_QUERIES]):
        if isinstance(q, Mapping):
            blocks.append(_query_block(q, qi, data.get("query_images"), data.get("train_images"), cache))
    return blocks


def _self_influence_rows(
    order: list[int], values: list[Any], indices: list[Any], labels: list[Any] | None, flagged: set[str]
) -> list[dict[str, Any]]:
    """The ranking table's rows: the ``_MAX_SELF`` largest self-influences, optionally labelled and flagged."""
    rows = []
    for rank, i in enumerate(order[:_MAX_SELF]):
        row: dict[str, Any] = {"rank": rank + 1, "index": indices[i], "self-influence": values[i]}
        if labels is not None:
            row["label"] = labels[i]
        if flagged:
            row["flagged"] = "⚑" if str(indices[i]) in flagged else ""
        rows.append(row)
    return rows


def _flag_recall(order: list[int], indices: list[Any], flagged: set[str]) -> list[Block]:
    """How many known-suspicious examples the self-influence ranking puts on top."""
    if not (flagged and order):
        return []
    k = min(len(order), max(1, len(flagged)))
    hits = sum(str(indices[i]) in flagged for i in order[:k])
    return [
        paragraph(
            f"{hits} of the top {k} examples by self-influence are flagged "
            f"(recall {hits / max(1, len(flagged)):.0%} of {len(flagged)} flagged)."
        )
    ]


def _self_influence(si: Mapping[str, Any], train_images: Any, cache: ImageCache) -> list[Block]:
    values = si.get("values")
    if not isinstance(values, list):
        return kv("Self-influence", si)
    n = len(values)
    raw_idx, raw_lab, raw_flag = si.get("indices"), si.get("labels"), si.get("flagged")
    indices: list[Any] = raw_idx if isinstance(raw_idx, list) and len(raw_idx) == n else list(range(n))
    labels: list[Any] | None = raw_lab if isinstance(raw_lab, list) and len(raw_lab) == n else None
    flagged = {str(i) for i in raw_flag} if isinstance(raw_flag, list) else set()
    order = sorted((i for i in range(n) if as_finite(values[i]) is not None), key=lambda i: -float(values[i]))
    blocks: list[Block] = [
        {"kind": "heading", "text": f"Self-influence ranking (top {min(_MAX_SELF, n)} of {n})"},
        paragraph(
            "Training examples with the largest self-influence are the ones the model had to bend most to "
            "fit: check them first for wrong labels or outliers.",
            "muted",
        ),
        *_flag_recall(order, indices, flagged),
    ]
    thumbs = [_image_b64(_lookup_image(train_images, indices[i]), cache) for i in order[:_MAX_SELF]]
    blocks.append(table("", _self_influence_rows(order, values, indices, labels, flagged), images=thumbs))
    if order:
        blocks.append(
            figure(
                partial(histogram_figure, values, "Self-influence", "self-influence"),
                f"Distribution of self-influence over {len(order)} training examples.",
            )
        )
    return blocks + generic(si, ("values", "indices", "labels", "flagged"))


def _influence(data: Mapping[str, Any]) -> list[Block]:
    cache: ImageCache = {}
    solver = data.get("solver")
    blocks: list[Block] = []
    if isinstance(solver, list):
        for i, s in enumerate(solver):
            blocks.extend(_solver_blocks(s, f"Solver {i}"))
    elif solver is not None:
        blocks.extend(_solver_blocks(solver, "Solver"))
    blocks.extend(_query_blocks(data, cache))
    si = data.get("self_influence")
    if isinstance(si, list):
        si = {"values": si}
    if isinstance(si, Mapping):
        blocks.extend(_self_influence(si, data.get("train_images"), cache))
    return blocks


# --------------------------------------------------------------------------------------------- cv
def _curve_blocks(curve: Any) -> list[Block]:
    """A line figure and a value table per curve (``{"x": [...], "series": {name: [...]}}`` or a list of them)."""
    blocks: list[Block] = []
    for c in curve if isinstance(curve, list) else [curve]:
        if not isinstance(c, Mapping) or not isinstance(c.get("x"), list):
            continue
        series = c.get("series")
        if not isinstance(series, Mapping):
            series = {k: v for k, v in c.items() if isinstance(v, list) and k != "x"}
        series = {str(k): v for k, v in series.items() if isinstance(v, list)}
        if not series:
            continue
        xlabel = str(c.get("xlabel", "x"))
        title, ylabel = str(c.get("title", "Cross-validation curve")), str(c.get("ylabel", "CV loss"))
        blocks.append(
            figure(partial(line_figure, c["x"], series, title=title, xlabel=xlabel, ylabel=ylabel, logx=c.get("logx")))
        )
        rows = [
            {xlabel: x, **{k: (v[i] if i < len(v) else None) for k, v in series.items()}} for i, x in enumerate(c["x"])
        ]
        blocks.append(table(str(c.get("title", "Curve values")), rows))
    return blocks


def _fold_rows(folds: list[Any]) -> list[dict[str, Any]]:
    """The per-fold rows, with the relative error ``|approx - exact| / |exact|`` added where both are known."""
    rows = []
    for f in folds:
        if not isinstance(f, Mapping):
            continue
        row = dict(f)
        a, e = as_finite(f.get("approx")), as_finite(f.get("exact"))
        if a is not None and e is not None and "rel_error" not in row:
            row["rel_error"] = abs(a - e) / max(abs(e), 1e-300)
        rows.append(row)
    return rows


def _cv_history_blocks(hist: list[Mapping[str, Any]]) -> list[Block]:
    """The CV estimate against the epoch (or step): a line figure of every numeric key, and the table."""
    xkey = "epoch" if any("epoch" in r for r in hist) else "step"
    keys = [
        k for k in columns(hist) if k not in ("epoch", "step") and any(as_finite(r.get(k)) is not None for r in hist)
    ]
    blocks: list[Block] = []
    if keys:
        xs: list[Any] = [r.get(xkey, i) for i, r in enumerate(hist)]
        ys: dict[str, list[Any]] = {k: [r.get(k) for r in hist] for k in keys}
        blocks.append(figure(partial(line_figure, xs, ys, title=f"CV estimate vs {xkey}", xlabel=xkey)))
    return [*blocks, table("History", hist)]


def _cv(data: Mapping[str, Any]) -> list[Block]:
    blocks = kv("Cross-validation estimate", data.get("estimate"))
    folds = data.get("folds")
    if isinstance(folds, list) and folds:
        blocks.append(table("Per-fold values", _fold_rows(folds)))
    blocks.extend(_curve_blocks(data.get("curve")))
    hist = table_rows(data.get("history"))
    if hist is not None:
        blocks.extend(_cv_history_blocks(hist))
    return blocks


# --------------------------------------------------------------------------------------------- pbrf
def _as_named_list(obj: Any, name_key: str = "estimator") -> list[dict[str, Any]]:
    """Rows of a list of dicts, or of a ``{name: {...}}`` mapping (the name goes into ``name_key``)."""
    if isinstance(obj, Mapping):
        return [{name_key: k, **(v if isinstance(v, Mapping) else {"value": v})} for k, v in obj.items()]
    if isinstance(obj, list):
        return [dict(r) for r in obj if isinstance(r, Mapping)]
    return []


def _scatter_title(name: str, x: list[Any], y: list[Any]) -> str:
    """``"<name> vs PBRF (r = …)"``; r over the finite pairs, shown from three pairs on (two always give ±1)."""
    pairs = [
        (a, b) for a, b in zip(map(as_finite, x), map(as_finite, y), strict=False) if a is not None and b is not None
    ]
    r = stats.pearson([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= 3 else None
    return f"{name} vs PBRF" + (f" (r = {r:.3f})" if as_finite(r) is not None else "")


def _pbrf(data: Mapping[str, Any]) -> list[Block]:
    corr = _as_named_list(data.get("correlations"))
    stored = data.get("verdict")
    text = stored if isinstance(stored, str) else stats.verdict(corr)
    blocks = [paragraph(text, "verdict")] if text else []
    if corr:
        first = ("pearson", "spearman", "kendall", "n")
        cols = ["estimator", *(c for c in columns(corr, first) if c != "estimator")]
        blocks.append(table("Correlation with the PBRF", corr, cols))
    figs = []
    for s in _as_named_list(data.get("scatter"))[:_MAX_SCATTERS]:
        x, y = s.get("pbrf"), s.get("estimate")
        if isinstance(x, list) and isinstance(y, list) and x:
            name = str(s.get("estimator", "estimate"))
            figs.append(figure(partial(scatter_figure, x, y, _scatter_title(name, x, y), "PBRF response", name)))
    if figs:
        blocks.append({"kind": "figrow", "figures": figs})
    return blocks


def _attribution(data: Mapping[str, Any]) -> list[Block]:
    """The ``"attribution"`` section (AttributionBenchmark): verdict, LDS table with intervals, scatter."""
    stored = data.get("verdict")
    blocks = [paragraph(stored, "verdict")] if isinstance(stored, str) else []
    rows = _as_named_list(data.get("lds"))
    if rows:
        cols = ["estimator", *(c for c in columns(rows, ("lds", "ci_low", "ci_high")) if c != "estimator")]
        blocks.append(table("Linear datamodeling score (Spearman across retrained subsets, mean over queries)", rows,
                            cols))
    figs = []
    sc = data.get("scatter")
    if isinstance(sc, Mapping) and isinstance(sc.get("predicted"), list) and isinstance(sc.get("actual"), list):
        name = str(sc.get("estimator", "scores"))
        figs.append(figure(partial(scatter_figure, sc["actual"], sc["predicted"], f"{name}: predicted vs retrained",
                                   "actual output (z-score per query)", "predicted (z-score per query)"),
                           "Each point is one (subset, query) pair, standardised per query across subsets."))
    per_query = data.get("per_query")
    if isinstance(per_query, Mapping):
        for name, values in list(per_query.items())[:2]:
            finite = [f for f in map(as_finite, values) if f is not None] if isinstance(values, list) else []
            if finite:
                figs.append(figure(partial(histogram_figure, finite, f"per-query LDS ({name})",
                                           "Spearman correlation", 20)))
    if figs:
        blocks.append({"kind": "figrow", "figures": figs})
    blocks.extend(kv("Interval", data.get("interval")))
    return blocks


# --------------------------------------------------------------------------------------------- built-ins
register_section(
    "curvature",
    _curvature,
    title="Curvature",
    keys=["history"],
    not_run="Add CurvatureMonitor to the Trainer's callbacks to track Tr(GNH), λ_max and the LiSSA settings.",
)
register_section(
    "influence",
    _influence,
    title="Influence",
    keys=["solver", "queries", "query_images", "train_images", "self_influence"],
    not_run="Add InfluenceReport to the Trainer's callbacks to attribute predictions to training examples.",
)
register_section(
    "cv",
    _cv,
    title="Approximate cross-validation",
    keys=["estimate", "folds", "curve", "history"],
    not_run="Add ApproximateCV to the Trainer's callbacks to estimate k-fold cross-validation without refits.",
)
register_section(
    "pbrf",
    _pbrf,
    title="PBRF validation",
    keys=["correlations", "scatter", "verdict"],
    not_run="Add PBRFValidation to the Trainer's callbacks to check influence scores against the PBRF.",
)
register_section(
    "attribution",
    _attribution,
    title="Attribution quality (LDS)",
    keys=["verdict", "lds", "scatter", "per_query", "interval"],
)
