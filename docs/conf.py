"""Sphinx configuration of the API reference (`.ci/run` builds it with warnings as errors).

Build: `python -m sphinx -W --keep-going -b html docs docs/_build/html`.
"""

import os
import sys

# The checkout's package, also when it is not installed (CI installs it editable anyway).
sys.path.insert(0, os.path.abspath(".."))

project = "sona_jax"
author = "the sona_jax authors"
copyright = "2026, the sona_jax authors"

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "*.png"]

# Docstrings are Google style (STYLE.md): `Args:`, `Returns:`, `Attributes:`, `Examples:`.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# `Attributes:` as fields of the class: NamedTuple fields are already documented by autodoc, and
# `.. attribute::` entries would describe them twice.
napoleon_use_ivar = True
# The docstrings' `Returns:` (and `Yields:`) are prose that often opens with a shaped tuple
# (`(state, report)`, `f32[n]: ...`); napoleon would split its first line at the first colon into
# a return type and a description. Rendered as a plain section (like `Examples:`), it stays whole.
napoleon_custom_sections = [("Returns", "Examples"), ("Yields", "Examples")]

autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": False}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# docs/*.md link to their own sections (`[Loop A](#loop-a)`).
myst_heading_anchors = 4
# docs/guarantees.md and docs/scale.md open at H2: they read as sections after the README's.
suppress_warnings = ["myst.header"]

html_theme = "alabaster"
html_static_path: list[str] = []
