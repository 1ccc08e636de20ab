"""Reports of a run: ``report.json`` + self-contained ``report.html``, matplotlib figures, logger media.

* :class:`~lightning_influence.reporting.store.ReportStore`: merge a section into ``report.json`` and re-render
  ``report.html`` (rank 0 only).
* :mod:`~lightning_influence.reporting.html`: the page (header, navigation, one box per section).
* :mod:`~lightning_influence.reporting.sections`: one renderer per section, the schema of every section and
  :func:`~lightning_influence.reporting.sections.register_section` to add one.
* :mod:`~lightning_influence.reporting.blocks`: the blocks a section is made of (tables, key/value lists, figures).
* :mod:`~lightning_influence.reporting.figures`: matplotlib (Agg) figure helpers.
* :mod:`~lightning_influence.reporting.media`: figures, text, histograms and tables to TensorBoard / W&B loggers.

``media`` imports Lightning and is not imported here, so the store and the figures stay usable without it.
"""

from lightning_influence.reporting.html import render_report
from lightning_influence.reporting.sections import register_section
from lightning_influence.reporting.store import ReportStore, find_reports, rebuild_reports, to_jsonable

__all__ = ["ReportStore", "find_reports", "rebuild_reports", "register_section", "render_report", "to_jsonable"]
