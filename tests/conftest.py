"""Shared test fixtures.

Real attention inputs come from ``../shared/data`` (beside the checkout, see its README):
queries, keys and values of the sentence encoder all-MiniLM-L6-v2, shape
(layer, head, token, dim) = (6, 12, 512, 32), float32, before the 1/sqrt(32) scaling.
Tests that use them are skipped when the directory is absent.
"""

# CUDA backend: tests/test_cuda.py runs the kernels in numba's CUDA simulator unless
# FMM_ATTENTION_REAL_GPU=1. Set before anything imports numba (it reads the variable then).
import os

if os.environ.get("FMM_ATTENTION_REAL_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from pathlib import Path

import numpy as np
import pytest

DATA_DIR = Path(__file__).parents[1].parent / "shared" / "data"

#: (file, layer, head) of the real heads the tests use: a sharp early head, a middle head
#: and a late head, from two different texts.
REAL_HEADS = (
    ("minilm_Apache-2_0.npz", 1, 0),
    ("minilm_Apache-2_0.npz", 3, 5),
    ("minilm_MPL-2_0.npz", 5, 2),
)


@pytest.fixture(scope="session")
def real_qkv():
    """``(q, k, v)`` of the heads in :data:`REAL_HEADS`, each (3, 512, 32) float32.

    Slice ``[..., :n, :]`` for a shorter sequence; the scale is ``1/sqrt(32)``, the default.
    The arrays are read-only: a test that needs to change them must copy.
    """
    heads = {name: [] for name in "qkv"}
    for file, layer, head in REAL_HEADS:
        path = DATA_DIR / file
        if not path.is_file():
            pytest.skip(f"real attention data not found: {path}")
        with np.load(path) as data:
            for name in "qkv":
                heads[name].append(np.array(data[name][layer, head]))
    out = tuple(np.stack(heads[name]) for name in "qkv")
    for arr in out:
        arr.setflags(write=False)
    return out
