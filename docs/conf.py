"""Sphinx configuration for lightning_influence (built with ``make docs``: ``sphinx-build -W``)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document the source tree even when the package is not installed

project = "lightning_influence"
author = "lightning_influence developers"
copyright = "lightning_influence developers"

try:
    from lightning_influence import __version__ as release
except Exception:  # pragma: no cover - docs must still build when the package cannot be imported
    release = "unknown"
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Google-style docstrings (style guide, rule 16). ``Attributes:`` sections become ``:ivar:`` fields so that they
# do not collide with the attribute entries autodoc generates for dataclass fields (duplicate-object warnings).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# ``:members:`` is given per module in api.rst, not here: the packages (``lightning_influence``,
# ``.callbacks``, ``.reporting``) re-export classes through ``__all__``, and documenting them there as well as in
# their defining module would be a duplicate object description.
autodoc_default_options = {"show-inheritance": True}

# MyST: $...$ / $$...$$ maths in the Markdown pages, and heading anchors for cross-page links.
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# Intersphinx to Python, PyTorch and Lightning is wanted, but the inventories would be fetched over the network at
# build time, which the build machines do not have. Add entries here together with a local copy of each
# objects.inv, e.g. {"torch": ("https://pytorch.org/docs/stable/", "_inventories/torch.inv")}.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

html_theme = "alabaster"
html_title = f"lightning_influence {release}"
html_static_path: list[str] = []
