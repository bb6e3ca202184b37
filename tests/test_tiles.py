"""The register-blocked micro-kernel (cpu/_tiles.py) against NumPy products."""

import numpy as np
import pytest
from numba import njit

from fmm_attention.cpu._tiles import gemm_tiles, panel_width


@njit(cache=False)
def compiled(m, n, depth, a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, accumulate):
    gemm_tiles(m, n, depth, a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, accumulate)


@njit(cache=False)
def compiled_panel_width(x):
    return panel_width(x)


TOL = {np.float32: 2e-5, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_panel_width_is_two_avx2_vectors(dtype):
    x = np.zeros(1, dtype)
    assert panel_width(x) == compiled_panel_width(x) == 64 // np.dtype(dtype).itemsize


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 13, 32, 150])  # every tile height and remainder
@pytest.mark.parametrize("transposed_a", [False, True])
def test_product_with_offsets_and_strides(dtype, m, transposed_a):
    rng = np.random.default_rng(m)
    panel = panel_width(np.zeros(1, dtype))
    n, depth = 2 * panel, 37
    # operands embedded in larger buffers at offsets, with padded leading dimensions
    if transposed_a:  # A[i, t] = big[t, i]: rows of stride 1, columns of stride lda
        big_a = rng.standard_normal((depth + 2, m + 3)).astype(dtype)
        a_off, a_rs, a_cs = 1 * (m + 3) + 2, 1, m + 3
        lhs = big_a[1 : 1 + depth, 2 : 2 + m].T
    else:
        big_a = rng.standard_normal((m + 2, depth + 5)).astype(dtype)
        a_off, a_rs, a_cs = 2 * (depth + 5) + 1, depth + 5, 1
        lhs = big_a[2 : 2 + m, 1 : 1 + depth]
    big_b = rng.standard_normal((depth + 1, n + panel)).astype(dtype)
    b_off, ldb = (n + panel) + 3, n + panel
    rhs = big_b[1 : 1 + depth, 3 : 3 + n]
    expected = lhs.astype(np.float64) @ rhs.astype(np.float64)
    for accumulate in (False, True):
        big_c = np.full((m + 2, n + panel), np.nan if not accumulate else 0.5, dtype=dtype)
        before = big_c.copy()
        c_off, ldc = (n + panel) + 5, n + panel
        compiled(m, n, depth, big_a, a_off, a_rs, a_cs, big_b, b_off, ldb, big_c, c_off, ldc, accumulate)
        target = expected + (0.5 if accumulate else 0.0)
        np.testing.assert_allclose(big_c[1 : 1 + m, 5 : 5 + n], target, rtol=TOL[dtype], atol=TOL[dtype] * 10)
        # nothing outside the target block is touched (NaN compares unequal: use array_equal's equal_nan)
        outside = np.ones(big_c.shape, bool)
        outside[1 : 1 + m, 5 : 5 + n] = False
        assert np.array_equal(big_c[outside], before[outside], equal_nan=True)
        # the Python form (NUMBA_DISABLE_JIT=1) agrees
        py_c = before.copy()
        gemm_tiles(m, n, depth, big_a, a_off, a_rs, a_cs, big_b, b_off, ldb, py_c, c_off, ldc, accumulate)
        np.testing.assert_allclose(py_c[1 : 1 + m, 5 : 5 + n], target, rtol=TOL[dtype], atol=TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_depth_writes_zeros_or_keeps_the_target(dtype):
    panel = panel_width(np.zeros(1, dtype))
    a = np.ones((4, 3), dtype)
    b = np.ones((3, panel), dtype)
    c = np.full((4, panel), np.nan, dtype)
    compiled(4, panel, 0, a, 0, 3, 1, b, 0, panel, c, 0, panel, False)
    assert not c.any()
    c[:] = 2
    compiled(4, panel, 0, a, 0, 3, 1, b, 0, panel, c, 0, panel, True)
    assert (c == 2).all()
    compiled(0, panel, 3, a, 0, 3, 1, b, 0, panel, c, 0, panel, False)  # no rows: no-op
    assert (c == 2).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_width_not_a_panel_multiple_is_refused(dtype):
    panel = panel_width(np.zeros(1, dtype))
    a, b, c = np.ones((2, 2), dtype), np.ones((2, panel + 1), dtype), np.zeros((2, panel + 1), dtype)
    for fn in (compiled, gemm_tiles):
        with pytest.raises(ValueError, match="multiple of the panel width"):
            fn(2, panel + 1, 2, a, 0, 2, 1, b, 0, panel + 1, c, 0, panel + 1, False)
