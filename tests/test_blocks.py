"""The online-softmax building blocks of the CPU kernels (cpu/_softmax.py) against NumPy."""

import numpy as np
import pytest
from numba import njit

from fmm_attention.cpu._softmax import _F64_SHIFTER, _float_bits, exp_shift_sum, row_max, softmax_columns


@njit(cache=False)
def compiled_exp_shift_sum(x, shift):
    # exp_shift_sum is a NumPy function in Python; compiled callers get the polynomial
    return exp_shift_sum(x, shift)


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-7), (np.float64, 2.5e-15)])
@pytest.mark.parametrize("size", [1, 7, 31, 32, 33, 152, 160, 1000])
def test_exp_shift_sum_matches_numpy(dtype, rtol, size):
    rng = np.random.default_rng(size)
    x = (rng.standard_normal(size) * 20).astype(dtype)
    x[:: max(1, size // 5)] = -np.inf  # masked logits
    shift = dtype(np.max(x[np.isfinite(x)], initial=0.0))
    # the argument is rounded to the dtype first, as in any float32 kernel: compare the
    # polynomial on that argument
    argument = (x - shift).astype(np.float64)
    expected = np.exp(argument)
    # the kernel flushes to 0 below exp(-87) (float32) or exp(-708) (float64), just above
    # the subnormal range, so its bit trick never leaves the normal exponents
    expected[argument <= (-87.0 if dtype == np.float32 else -708.0)] = 0
    work = x.copy()
    total = compiled_exp_shift_sum(work, shift)
    np.testing.assert_allclose(work, expected, rtol=4 * rtol, atol=0)
    assert total == pytest.approx(expected.sum(), rel=size * rtol + 1e-12)


@njit(cache=False)
def compiled_exponent_bits(k):
    out = np.empty(k.size, np.int64)
    for i in range(k.size):
        out[i] = _float_bits(k[i] + _F64_SHIFTER) << np.int64(52)
    return out


def test_float64_exponent_bits_without_an_integer_conversion():
    # the float64 exponential builds 2**k from the bits of k + 1.5 * 2**52 (AVX2 has no
    # float64 -> int64 conversion); over every k it meets (and beyond) that is k << 52
    k = np.arange(-1100.0, 1100.0)
    expected = k.astype(np.int64) << np.int64(52)
    np.testing.assert_array_equal(compiled_exponent_bits(k), expected)
    np.testing.assert_array_equal([_float_bits(x + _F64_SHIFTER) << np.int64(52) for x in k[::97]], expected[::97])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_max(dtype):
    rng = np.random.default_rng(0)
    for size in (1, 5, 32, 33, 200):
        x = rng.standard_normal(size).astype(dtype)
        x[0] = -np.inf
        assert row_max(x) == (x.max() if size > 1 else -np.inf)
    assert row_max(np.zeros(0, dtype)) == -np.inf
    assert row_max(np.full(40, -np.inf, dtype)) == -np.inf
    spike = np.zeros(97, dtype)
    spike[96] = 3.5  # the last element, in the loop's remainder
    assert row_max(spike) == 3.5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("floor_max", [-np.inf, 0.5, 50.0])
def test_softmax_columns_against_numpy(dtype, causal, floor_max):
    rng = np.random.default_rng(1)
    n_keys, width = 45, 16
    scores = (rng.standard_normal((n_keys + 3, width)) * 4).astype(dtype)  # rows past n_keys are left alone
    bias = rng.standard_normal(n_keys + 3).astype(dtype)
    bias[[3, 17]] = -np.inf
    positions = rng.integers(-1, 60, n_keys + 3)
    first_query = 20
    work = scores.copy()
    col_max, shift, col_sum = (np.full(width, np.nan, dtype) for _ in range(3))
    softmax_columns(work, n_keys, bias, positions, first_query, causal, floor_max, col_max, shift, col_sum)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    for i in range(width):
        logits = scores[:n_keys, i] + bias[:n_keys]  # rounded to the dtype, as in the kernel
        if causal:
            logits[positions[:n_keys] > first_query + i] = -np.inf
        expected_shift = max(dtype(floor_max), logits.max())
        weights = np.exp((logits - expected_shift).astype(np.float64))
        assert col_max[i] == pytest.approx(expected_shift, rel=tol)
        np.testing.assert_allclose(work[:n_keys, i], weights, rtol=tol, atol=1e-30)
        assert col_sum[i] == pytest.approx(weights.sum(), rel=tol)
    np.testing.assert_array_equal(work[n_keys:], scores[n_keys:])


def test_softmax_columns_all_masked_column_gives_zeros_not_nan():
    scores = np.ones((3, 16), np.float32)
    positions = np.array([5, 6, 7])
    col_max, shift, col_sum = (np.empty(16, np.float32) for _ in range(3))
    # causal: queries 0..4 see none of the keys, queries 5.. see some
    softmax_columns(scores, 3, np.zeros(3, np.float32), positions, 0, True, -np.inf, col_max, shift, col_sum)
    assert np.all(col_max[:5] == -np.inf) and not col_sum[:5].any() and not scores[:, :5].any()
    assert np.all(np.isfinite(scores)) and col_sum[5] == pytest.approx(1.0) and col_sum[7] == pytest.approx(3.0)
    # every key masked by its bias: all columns zero, no NaN
    scores = np.array([[1.0] * 16, [2.0] * 16, [3.0] * 16], np.float32)
    softmax_columns(scores, 3, np.full(3, -np.inf, np.float32), positions, 0, False, -np.inf, col_max, shift, col_sum)
    assert np.all(col_max == -np.inf) and not col_sum.any() and not scores.any()
