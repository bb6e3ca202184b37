"""Sphinx configuration of the fmm_attention documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import fmm_attention  # noqa: E402

project = "fmm_attention"
author = "fmm_attention developers"
copyright = "fmm_attention developers, BSD-3-Clause"
release = version = fmm_attention.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    # MathJax from the `docs` extra, copied into _build/html/_static: math renders offline
    # (sphinx.ext.mathjax alone loads it from a CDN).
    "sphinx-mathjax-offline",
    "sphinx.ext.doctest",
    "numpydoc",
]
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = ["_static"]
nitpicky = False
