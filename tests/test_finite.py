"""The parallel finiteness check behind ``check_finite=True`` (cpu/finite.py)."""

import numpy as np
import pytest

from fmm_attention import _config
from fmm_attention.cpu import finite
from fmm_attention.cpu.finite import all_finite


@pytest.mark.parametrize("chunk", [None, 5], ids=["chunk_default", "chunk5"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_every_position_of_a_bad_value_is_found(dtype, bad, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(_config, "FINITE_CHUNK", chunk)
    chunk = _config.FINITE_CHUNK
    size = 2 * chunk + 3  # three chunks, the last one short
    x = np.ones(size, dtype)
    assert all_finite(x)
    for where in (0, chunk - 1, chunk, size - 1):
        y = x.copy()
        y[where] = bad
        assert not all_finite(y)
        assert not all_finite(y.reshape(-1, 1))  # any shape, same memory


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_finite_values_pass(dtype):
    info = np.finfo(dtype)
    x = np.array([info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0, 0.0], dtype=dtype)
    assert all_finite(x)


def test_empty_and_non_contiguous_arrays():
    assert all_finite(np.zeros(0, np.float32))
    x = np.ones((4, 6))
    x[1, 1] = np.nan
    assert not all_finite(x[:, 1::2])  # a strided view falls back to np.isfinite
    assert all_finite(x[:, ::2])
    assert not all_finite(np.array([np.inf], np.float16))


def test_changed_chunk_reaches_the_kernel(monkeypatch):
    """FINITE_CHUNK is read at call time, not frozen into the disk-cached kernel."""
    seen = []
    kernel = finite._max_exponent

    def spy(bits, mask, chunk):
        seen.append(chunk)
        return kernel(bits, mask, chunk)

    monkeypatch.setattr(finite, "_max_exponent", spy)
    monkeypatch.setattr(_config, "FINITE_CHUNK", 7)
    x = np.ones(50)
    assert all_finite(x)
    x[49] = np.nan
    assert not all_finite(x)
    assert seen == [7, 7]
