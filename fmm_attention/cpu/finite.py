"""The finiteness check: the ``check_finite`` pass over ``q``, ``k`` and ``v``.

``np.isfinite(x).all()`` is single-threaded and writes a boolean temporary; on the FMA
path at n = 65536 it took 4.4 ms of a 40 ms call. A float is NaN or infinite exactly when
its exponent bits are all ones, so the check is an integer maximum over the exponent
fields: associative, so LLVM vectorises it with no fastmath.

Two kernels share one serial loop (:func:`_max_exponent_range`). Small arrays run it on
the calling thread: a parallel launch costs tens of microseconds, more than reading a few
hundred kilobytes. Large ones run it on chunks in parallel, each chunk one call of the
serial loop. The earlier kernel (a ``max`` over ``bits[i]`` inline in the ``prange`` body)
read 8.8 GB/s on two threads: LLVM loaded the elements one at a time (see the loop's
docstring). docs/development.rst has the measurements.
"""

import numpy as np
from numba import njit, prange

from .. import _config
from ._launch import launch_guard


@njit(cache=_config.CACHE)
def _max_exponent_range(bits, exponent_mask, lo, hi):
    """The largest ``bits[i] & exponent_mask`` for ``lo <= i < hi`` (0 if empty).

    Written for the vectoriser: indexing a slice from 0 proves the index non-negative (with
    ``bits[i]``, ``i`` from ``lo``, Numba's negative-index wraparound made LLVM gather the
    elements one by one), and the cast keeps 32-bit words in 32-bit lanes (Numba widens
    integer arithmetic to 64 bits, which halves the elements per vector).
    """
    word = bits.dtype.type
    part = bits[lo:hi]
    top = word(0)
    for i in range(part.size):
        field = word(part[i] & exponent_mask)
        if field > top:
            top = field
    return top


@njit(cache=_config.CACHE)
def _max_exponent_serial(bits, exponent_mask):
    """The largest ``bits & exponent_mask`` over a 1-D unsigned-integer array, on this thread."""
    return _max_exponent_range(bits, exponent_mask, np.int64(0), bits.size)


@njit(cache=_config.CACHE, parallel=True)
def _max_exponent(bits, exponent_mask, chunk):
    """The largest ``bits & exponent_mask`` over a 1-D unsigned-integer array, in parallel.

    ``chunk`` elements per parallel job, each one serial pass.
    """
    n_chunks = -(-bits.size // chunk)
    worst = np.zeros(max(n_chunks, 1), dtype=bits.dtype)
    for c in prange(n_chunks):
        worst[c] = _max_exponent_range(bits, exponent_mask, c * chunk, min(bits.size, (c + 1) * chunk))
    return worst.max()


_FLOAT32 = (np.dtype(np.float32), np.uint32, np.uint32(0x7F800000))
_FLOAT64 = (np.dtype(np.float64), np.uint64, np.uint64(0x7FF0000000000000))


def exponent_bits(arr):
    """``(bits, exponent_mask)``: the C-contiguous float32/float64 array ``arr`` viewed as
    unsigned integers of its width (no copy) and the mask of their exponent field, for the
    kernels that check finiteness as they read (an element is NaN or infinite exactly when
    ``bits & exponent_mask == exponent_mask``)."""
    _, word, mask = _FLOAT32 if arr.dtype == _FLOAT32[0] else _FLOAT64
    return arr.view(word), mask


def all_finite(arr):
    """``True`` if the C-contiguous float32/float64 array ``arr`` holds no NaN or infinity.

    Other arrays (non-contiguous, other dtypes) fall back to ``np.isfinite``. Arrays of
    fewer than ``_config.FINITE_PARALLEL_MIN_BYTES`` bytes are checked on the calling thread.
    """
    if arr.dtype not in (_FLOAT32[0], _FLOAT64[0]) or not arr.flags.c_contiguous:
        return bool(np.isfinite(arr).all())
    if arr.size == 0:
        return True
    flat, mask = exponent_bits(arr.reshape(-1))
    if arr.nbytes < _config.FINITE_PARALLEL_MIN_BYTES:
        return bool(_max_exponent_serial(flat, mask) != mask)
    with launch_guard():
        return bool(_max_exponent(flat, mask, max(1, int(_config.FINITE_CHUNK))) != mask)
