"""The parallel finiteness check behind ``check_finite=True`` (cpu/finite.py)."""

import numpy as np
import pytest

from fmm_attention import _config
from fmm_attention.cpu import finite
from fmm_attention.cpu.finite import all_finite


@pytest.fixture(params=["parallel", "serial"])
def path(request, monkeypatch):
    """Run a test through the parallel kernel (threshold 0) and the serial one (no limit)."""
    monkeypatch.setattr(_config, "FINITE_PARALLEL_MIN_BYTES", 0 if request.param == "parallel" else 1 << 62)
    return request.param


@pytest.mark.parametrize("chunk", [None, 5], ids=["chunk_default", "chunk5"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "payload"])
def test_every_position_of_a_bad_value_is_found(dtype, bad, chunk, path, monkeypatch):
    if bad == "payload":  # a NaN with other mantissa bits and the sign set
        word = np.uint32 if dtype == np.float32 else np.uint64
        bad = np.array(np.iinfo(word).max, dtype=word).view(dtype)[()]
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
def test_extreme_finite_values_pass(dtype, path):
    info = np.finfo(dtype)
    x = np.array([info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0, 0.0], dtype=dtype)
    assert all_finite(x)


def test_empty_and_non_contiguous_arrays(path):
    assert all_finite(np.zeros(0, np.float32))
    x = np.ones((4, 6))
    x[1, 1] = np.nan
    assert not all_finite(x[:, 1::2])  # a strided view falls back to np.isfinite
    assert all_finite(x[:, ::2])
    assert not all_finite(np.array([np.inf], np.float16))


def test_changed_chunk_reaches_the_kernel(monkeypatch):
    """FINITE_CHUNK is read at call time, not frozen into the disk-cached kernel."""
    monkeypatch.setattr(_config, "FINITE_PARALLEL_MIN_BYTES", 0)
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_arrays_skip_the_parallel_launch(dtype, monkeypatch):
    """Below FINITE_PARALLEL_MIN_BYTES (read at call time) no parallel kernel is launched.

    A launch costs more than reading a small array (the fixed cost of ``check_finite``).
    """
    launches = []
    kernel = finite._max_exponent

    def spy(*args):
        launches.append(args[0].size)
        return kernel(*args)

    monkeypatch.setattr(finite, "_max_exponent", spy)
    x = np.ones((16, 64), dtype)
    monkeypatch.setattr(_config, "FINITE_PARALLEL_MIN_BYTES", x.nbytes + 1)
    assert all_finite(x)
    x[15, 63] = np.nan
    assert not all_finite(x)
    assert launches == []
    monkeypatch.setattr(_config, "FINITE_PARALLEL_MIN_BYTES", x.nbytes)
    assert not all_finite(x)
    assert launches == [x.size]


def test_default_threshold_keeps_small_inputs_serial():
    """The default keeps an n = 16 call (and a few hundred kilobytes) off the thread pool."""
    assert _config.FINITE_PARALLEL_MIN_BYTES >= 1 << 18


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_serial_and_parallel_kernels_agree_on_every_range(dtype):
    """The serial loop over any sub-range (a parallel chunk) finds exactly its bad values."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(97).astype(dtype)
    bits = np.uint32 if dtype == np.float32 else np.uint64
    mask = finite._FLOAT32[2] if dtype == np.float32 else finite._FLOAT64[2]
    x[[10, 50]] = [np.inf, np.nan]
    flat = x.view(bits)
    for lo in range(0, 97, 7):
        for hi in range(lo, 98, 11):
            expect = not np.isfinite(x[lo:hi]).all()
            assert (finite._max_exponent_range(flat, mask, lo, hi) == mask) == expect, (lo, hi)
