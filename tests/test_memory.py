"""One fresh block for a pullback's large arrays (cpu/_memory.py): the arrays it hands out,
and gradients that do not depend on it."""

import numpy as np
import pytest

from fmm_attention import _config
from fmm_attention.cpu._memory import zeroed_arrays
from fmm_attention.grad import fmm_attention_vjp

SPECS = [((3, 5, 7), np.float32), ((2, 9), np.float64), ((4,), np.int64), ((0, 3), np.float32)]


def _check(arrays):
    for a, (shape, dtype) in zip(arrays, SPECS):
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
        assert not a.any()
    for i, a in enumerate(arrays):  # writing one leaves the others zero: no overlap
        a[...] = 1
        assert all(not b.any() for b in arrays[i + 1 :])


def test_small_arrays_are_separate_zeros(monkeypatch):
    monkeypatch.setattr(_config, "FRESH_BLOCK_MIN_BYTES", 1 << 30)
    arrays = zeroed_arrays(SPECS)
    assert all(a.base is None for a in arrays)
    _check(arrays)


@pytest.mark.parametrize("least", [1, 0])
def test_large_arrays_share_one_huge_page_aligned_block(least, monkeypatch):
    monkeypatch.setattr(_config, "FRESH_BLOCK_MIN_BYTES", least)
    monkeypatch.setattr(_config, "FRESH_BLOCK_BYTES", 1 << 16)
    arrays = zeroed_arrays(SPECS)
    if least == 0:  # 0 turns the block off
        assert all(a.base is None for a in arrays)
    else:
        blocks = {id(a.base.base if a.base.base is not None else a.base) for a in arrays}
        assert len(blocks) == 1
        assert arrays[0].ctypes.data % (2 << 20) == 0  # the first array opens a huge page
        assert all(a.ctypes.data % 4096 == 0 for a in arrays if a.size)
    _check(arrays)


@pytest.mark.parametrize("options", [dict(), dict(causal=True, global_tokens=(3,))])
def test_fma_gradients_do_not_depend_on_the_block(options, monkeypatch):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 200, 8)).astype(np.float32) for _ in range(3))
    out, pullback = fmm_attention_vjp(q, k, v, block_size=8, rank=2, **options)
    g = rng.standard_normal(out.shape).astype(np.float32)
    results = []
    for least in (0, 1):  # separate arrays, then every buffer from a block
        monkeypatch.setattr(_config, "FRESH_BLOCK_MIN_BYTES", least)
        results.append(pullback(g))
    for a, b in zip(results[0][:3], results[1][:3]):
        np.testing.assert_array_equal(a, b)
    assert results[1][0].base is not None  # the block was used
