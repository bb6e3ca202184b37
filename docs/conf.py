"""Sphinx configuration of the fmm_attention documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import fmm_attention  # noqa: E402

project = "fmm_attention"
author = "fmm_attention developers"
release = version = fmm_attention.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
    "numpydoc",
]
autosummary_generate = True
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = ["_static"]
nitpicky = False
