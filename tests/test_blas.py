"""The strided GEMM helpers of the CPU kernels against NumPy."""

import numpy as np
import pytest
from numba import njit

from fmm_attention.cpu._blas import gemm_nn, gemm_nt


@njit(cache=False)
def _call(transpose_b, alpha, a, b, beta, c):
    if transpose_b:
        gemm_nt(alpha, a, b, beta, c)
    else:
        gemm_nn(alpha, a, b, beta, c)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_nt_on_views_writes_only_its_slice(dtype):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((40, 70)).astype(dtype)
    k = rng.standard_normal((50, 70)).astype(dtype)
    scores = rng.standard_normal((40, 90)).astype(dtype)
    before = scores.copy()
    _call(True, 0.5, q[3:13, 5:21], k[2:30, 5:21], 2.0, scores[:10, 7:35])
    expected = before.copy()
    expected[:10, 7:35] = 0.5 * q[3:13, 5:21] @ k[2:30, 5:21].T + 2.0 * before[:10, 7:35]
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(scores, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_nn_beta_zero_ignores_nan_in_the_target(dtype):
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((10, 28)).astype(dtype)
    values = rng.standard_normal((40, 33)).astype(dtype)
    out = np.full((12, 40), np.nan, dtype=dtype)
    _call(False, 1.0, weights, values[5:33], 0.0, out[1:11, 3:36])
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out[1:11, 3:36], weights @ values[5:33], rtol=tol, atol=tol)
    assert np.isnan(out[0]).all() and np.isnan(out[:, :3]).all() and np.isnan(out[:, 36:]).all()


def test_gemm_accumulates_and_handles_single_rows_and_empty_shapes():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((1, 8))
    b = rng.standard_normal((8, 5))
    c = np.ones((1, 5))
    _call(False, 2.0, a, b, 1.0, c)
    np.testing.assert_allclose(c, 1.0 + 2.0 * a @ b, rtol=1e-12)
    empty = np.ones((0, 5))
    _call(False, 1.0, np.ones((0, 8)), b, 0.0, empty)  # nothing to do, no BLAS error
    assert empty.shape == (0, 5)


def test_gemm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        _call(True, 1.0, np.ones((3, 4)), np.ones((5, 3)), 0.0, np.ones((3, 5)))
