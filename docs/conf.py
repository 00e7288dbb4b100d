"""Sphinx configuration: `sphinx-build -W -b html docs docs/_build/html` (what CI runs)."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Importing ddp_jax imports jax; the API pages need no devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ddp_jax  # noqa: E402

project = "ddp_jax"
author = "ddp_jax developers"
release = version = ddp_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 4

autodoc_default_options = {"members": False, "undoc-members": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "sphinx_book_theme"
html_title = "ddp_jax"
html_theme_options = {"show_toc_level": 2}
