"""The documentation stays written for users: no private paths or development log on user
pages, ``__all__`` in every public module, a docstring on every public name.

The examples themselves run as doctests (``pytest --doctest-modules fmm_attention`` and
``pytest --doctest-glob='*.rst' docs``); these checks are the cheap part that needs no
kernel compiled.
"""

import importlib
import inspect
import re
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
#: Engineering notes may keep commit hashes and private names; every other page is for users.
DEVELOPER_PAGES = {"architecture.rst", "development.rst"}
PUBLIC_MODULES = [
    "fmm_attention",
    "fmm_attention.api",
    "fmm_attention.tree",
    "fmm_attention.coarsening",
    "fmm_attention.analysis",
    "fmm_attention.analysis.figures",
    "fmm_attention.accuracy",
    "fmm_attention.backends",
    "fmm_attention.cli",
    "fmm_attention.cuda",
    "fmm_attention.perf",
]

USER_PAGES = sorted(p for p in DOCS.glob("*.rst") if p.name not in DEVELOPER_PAGES)

FORBIDDEN = {
    "a path only the project's machines have": re.compile(r"shared/(spec|data)"),
    "a commit hash": re.compile(r"``[0-9a-f]{7,40}``"),
    "an issue number": re.compile(r"\bissue\s+#?\d+", re.IGNORECASE),
    "a private module": re.compile(r"\b(cpu|cuda)/_\w+\.py|fmm_attention\.(cpu\.)?_[a-z]\w*"),
}


@pytest.mark.skipif(not DOCS.is_dir(), reason="docs/ is not part of this installation")
@pytest.mark.parametrize("page", USER_PAGES, ids=lambda p: p.name)
def test_user_pages_hold_no_development_log(page):
    text = page.read_text(encoding="utf-8")
    for what, pattern in FORBIDDEN.items():
        match = pattern.search(text)
        assert match is None, f"{page.name} names {what}: {match.group(0)!r}"


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_modules_declare_all_and_document_it(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.__all__ names {attr!r}, which does not exist"
        obj = getattr(module, attr)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            doc = inspect.getdoc(obj) or ""
            assert doc.strip(), f"{name}.{attr} has no docstring"
            if inspect.isfunction(obj) and inspect.signature(obj).parameters:
                assert "Parameters\n----------" in doc, f"{name}.{attr} documents no parameters"


def test_docstrings_point_to_the_semantics_page_not_to_the_spec():
    for name in PUBLIC_MODULES + ["fmm_attention.cpu.fastformer", "fmm_attention.cuda.fastformer"]:
        module = importlib.import_module(name)
        texts = [module.__doc__ or ""] + [
            inspect.getdoc(getattr(module, attr)) or "" for attr in getattr(module, "__all__", ())
        ]
        assert not any("shared/" in t for t in texts), f"{name} points to a path users do not have"


def test_the_sample_the_examples_load_is_shipped():
    # docs/tutorial.rst, accuracy.rst and analysis.rst load it exactly this way
    with (files("fmm_attention") / "data" / "minilm_sample.npz").open("rb") as fh:
        sample = dict(np.load(fh))
    assert sample["q"].shape == sample["k"].shape == sample["v"].shape == (3, 512, 32)
    assert sample["layer_head"].shape == (3, 2)
