"""Sphinx configuration of fastattn's documentation (pip install -e ".[docs]";
python -m sphinx -W -b html docs docs/_build/html)."""
import fastattn

project = "fastattn"
author = "fastattn developers"
release = version = fastattn.__version__
extensions = ["myst_parser", "sphinx.ext.autodoc", "numpydoc"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
numpydoc_show_class_members = False
numpydoc_validation_checks = set()
html_theme = "alabaster"
html_static_path = []
# README.md, which links into this folder, is not a page of the site
suppress_warnings = ["myst.xref_missing"]
