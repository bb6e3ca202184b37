"""Online-softmax building blocks shared by the CPU kernels: exponentials, maxima, softmax.

The exponential is the hot spot of every attention kernel: numba's ``math.exp`` compiles
to a scalar libm call (about 2.7 ns per element here), NumPy's SIMD ``exp`` cannot be
called from compiled code, and SVML is usually absent. :func:`exp_shift_sum` (and its
shift-free form :func:`exp_inplace`) is a Cody-Waite range reduction plus a Taylor
polynomial, written so LLVM vectorises it
(about 0.4 ns per element in float32) with a relative error of a few ulp. It is only ever
applied to shifted logits ``x - max <= 0``, where underflow is the only edge case: inputs
below the smallest normal exponent (and ``-inf``, a masked key) give exactly 0.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload, register_jitable

from .. import _config

# float32 constants: ln 2 split so that k * LN2_HI is exact for |k| < 2**11.
_F32_LOG2E = np.float32(1.4426950408889634)
_F32_LN2_HI = np.float32(0.693145751953125)
_F32_LN2_LO = np.float32(1.428606765330187e-06)
_F32_FLOOR = np.float32(-87.0)  # 2**-125: the bit trick below stays in normal range
_F32_HALF = np.float32(0.5)
_F32_ONE = np.float32(1.0)
_F32_ZERO = np.float32(0.0)
_F32_C = tuple(np.float32(1.0 / f) for f in (5040.0, 720.0, 120.0, 24.0, 6.0, 2.0))

_F64_LOG2E = 1.4426950408889634
_F64_LN2_HI = 0.6931471803691238
_F64_LN2_LO = 1.9082149292705877e-10
_F64_FLOOR = -708.0  # 2**-1021
# 1.5 * 2**52: for an integral |k| < 2**51, the low bits of k + this float64 are k as a
# two's-complement integer (see _exp64_parts)
_F64_SHIFTER = 6755399441055744.0
_F64_C = (
    1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
    1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5,
)


def exp_shift_sum(x, shift):
    """``x[:] = exp(x - shift)`` in place for a 1-D contiguous float array with ``x <= shift``
    (``-inf`` allowed); returns the sum of the results. One vectorised pass."""
    x[:] = np.exp(x - shift)
    return x.sum()


def exp_columns(x, rows, shift, sums):
    """``x[:rows] = exp(x[:rows] - shift)`` in place, one ``shift`` per column, for a 2-D
    C-contiguous float array with ``x <= shift`` (``-inf`` allowed); adds each column's
    sum of the results to ``sums``. Vectorised along the rows' contiguous columns."""
    x[:rows] = np.exp(x[:rows] - shift)
    sums += x[:rows].sum(axis=0)


def exp_inplace(x):
    """``x[:] = exp(x)`` for a 1-D contiguous float array with ``x <= 0`` (``-inf`` allowed)."""
    exp_shift_sum(x, 0.0)


@register_jitable(inline="always")
def _exp32_parts(xi):
    """``exp(xi)`` for ``xi <= 0`` as ``(mantissa part, exponent bits to add)``; 0 below
    the floor (``-inf`` included)."""
    c0, c1, c2, c3, c4, c5 = _F32_C
    keep = xi > _F32_FLOOR
    xc = xi if keep else _F32_FLOOR
    kf = np.floor(xc * _F32_LOG2E + _F32_HALF)
    r = xc - kf * _F32_LN2_HI - kf * _F32_LN2_LO
    p = c0
    p = p * r + c1
    p = p * r + c2
    p = p * r + c3
    p = p * r + c4
    p = p * r + c5
    p = p * r + _F32_ONE
    p = p * r + _F32_ONE
    return (p if keep else _F32_ZERO), ((np.int32(kf) << np.int32(23)) if keep else np.int32(0))


@register_jitable(inline="always")
def _exp64_parts(xi):
    """float64 form of :func:`_exp32_parts`."""
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10 = _F64_C
    keep = xi > _F64_FLOOR
    xc = xi if keep else _F64_FLOOR
    kf = np.floor(xc * _F64_LOG2E + 0.5)
    r = xc - kf * _F64_LN2_HI - kf * _F64_LN2_LO
    p = c0
    p = p * r + c1
    p = p * r + c2
    p = p * r + c3
    p = p * r + c4
    p = p * r + c5
    p = p * r + c6
    p = p * r + c7
    p = p * r + c8
    p = p * r + c9
    p = p * r + c10
    p = p * r + 1.0
    p = p * r + 1.0
    # the exponent bits of 2**kf without a float64 -> int64 conversion, which AVX2 lacks (it
    # kept this loop scalar: 2.2-3.0 ns per element against 0.6 in float32): the shifter's
    # low 12 bits become kf's, and the shift drops the rest
    return (p if keep else 0.0), ((_float_bits(kf + _F64_SHIFTER) << np.int64(52)) if keep else np.int64(0))


def _float_bits(x):
    """The bits of the float64 ``x`` as an int64 (compiled: a bitcast, which vectorises).
    This Python version serves ``NUMBA_DISABLE_JIT=1``."""
    return np.float64(x).view(np.int64)


@intrinsic
def _float_bits_intrinsic(typingctx, x):
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(x), codegen


@overload(_float_bits)
def _float_bits_overload(x):
    if x == types.float64:
        return lambda x: _float_bits_intrinsic(x)
    return None


def _exp_loops(parts, bits_type):
    """The 1-D (shift, total) and 2-D (per-column shift, column sums) exponential loops on
    one dtype's ``parts`` (see :func:`_exp32_parts`); ``bits_type`` is the integer type of
    the same width, through which the exponent bits are added."""

    def shift_sum(x, shift):
        bits = x.view(bits_type)
        shift = x.dtype.type(shift)
        total = x.dtype.type(0)
        for i in range(x.size):
            x[i], exponent = parts(x[i] - shift)
            bits[i] += exponent
            total += x[i]
        return total

    def columns(x, rows, shift, sums):
        bits = x.view(bits_type)
        for j in range(rows):
            for i in range(x.shape[1]):
                x[j, i], exponent = parts(x[j, i] - shift[i])
                bits[j, i] += exponent
                sums[i] += x[j, i]

    return shift_sum, columns


_exp32, _exp32_columns = _exp_loops(_exp32_parts, np.int32)
_exp64, _exp64_columns = _exp_loops(_exp64_parts, np.int64)


@overload(exp_shift_sum, jit_options={"fastmath": _config.FASTMATH})
def _exp_shift_sum_overload(x, shift):
    if isinstance(x, types.Array) and x.dtype == types.float32:
        return _exp32
    if isinstance(x, types.Array) and x.dtype == types.float64:
        return _exp64
    return None


@overload(exp_columns, jit_options={"fastmath": _config.FASTMATH})
def _exp_columns_overload(x, rows, shift, sums):
    if isinstance(x, types.Array) and x.ndim == 2 and x.dtype == types.float32:
        return _exp32_columns
    if isinstance(x, types.Array) and x.ndim == 2 and x.dtype == types.float64:
        return _exp64_columns
    return None


@overload(exp_inplace, jit_options={"fastmath": _config.FASTMATH})
def _exp_inplace_overload(x):
    if isinstance(x, types.Array) and x.dtype in (types.float32, types.float64):
        def impl(x):
            exp_shift_sum(x, 0.0)

        return impl
    return None


def _maxnum(a, b):
    """``max(a, b)`` for floats, in the type of ``a``; compiled, LLVM's ``maxnum``.

    Numba's builtin ``max`` compiles to compares LLVM does not turn into vector maxima;
    ``maxnum`` with the ``nnan`` flag becomes ``vmaxps`` in a vectorised loop. This Python
    version serves ``NUMBA_DISABLE_JIT=1``.
    """
    return type(a)(max(a, b))


@intrinsic
def _maxnum_intrinsic(typingctx, a, b):
    if not (isinstance(a, types.Float) and isinstance(b, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        x = args[0]
        y = context.cast(builder, args[1], b, a)
        name = "llvm.maxnum.f32" if a == types.float32 else "llvm.maxnum.f64"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(x.type, [x.type, x.type]), name)
        return builder.call(fn, [x, y])

    return a(a, b), codegen


@overload(_maxnum)
def _maxnum_overload(a, b):
    if isinstance(a, types.Float) and isinstance(b, types.Float):
        return lambda a, b: _maxnum_intrinsic(a, b)
    return None


@njit(cache=_config.CACHE, fastmath=_config.FASTMATH | {"nnan"})
def row_max(row):
    """Maximum of a 1-D float array with no NaN (``-inf`` for an empty or all ``-inf`` row)."""
    mx = row.dtype.type(-np.inf)
    for j in range(row.size):
        mx = _maxnum(mx, row[j])
    return mx


@njit(cache=_config.CACHE, fastmath=_config.FASTMATH | {"nnan"})
def softmax_columns(scores, n_keys, bias, positions, first_query, causal, floor_max, col_max, shift, col_sum):
    """Key-major softmax: turn ``scores[:n_keys]`` (one row per key, one column per query)
    into unnormalised weights, in place.

    For a whole block of queries at once: adds ``bias[key]`` (``-inf`` masks a key; masked
    keys' scores are finite because the kernels zero their keys), masks keys with
    ``positions[key] > first_query + column`` when ``causal``, shifts each column by its
    maximum (at least ``floor_max``, the maximum of an already accumulated partial) and
    exponentiates. Every pass runs along contiguous rows, so it vectorises across queries
    with no remainder loop (the width is a multiple of the vector length); the maximum is
    LLVM's ``maxnum``, which ``nnan`` lets it vectorise (builtin ``max`` does not, 3x slower
    here), and ``-inf`` keeps IEEE semantics.

    Writes ``col_max`` (the shift: ``-inf`` for a column whose logits and ``floor_max`` are
    all ``-inf``, its weights then all 0), ``col_sum`` (the sum of each column's weights)
    and uses ``shift`` as scratch; all three have one entry per column.
    """
    width = scores.shape[1]
    col_max[:] = floor_max
    for j in range(n_keys):
        key_bias = bias[j]
        if causal:
            position = positions[j]
            for i in range(width):
                x = scores[j, i] + key_bias
                x = x if position <= first_query + i else -np.inf
                scores[j, i] = x
                col_max[i] = _maxnum(col_max[i], x)
        else:
            for i in range(width):
                x = scores[j, i] + key_bias
                scores[j, i] = x
                col_max[i] = _maxnum(col_max[i], x)
    for i in range(width):
        shift[i] = col_max[i] if col_max[i] > -np.inf else 0  # all masked: exp(-inf) = 0
        col_sum[i] = 0
    exp_columns(scores, n_keys, shift, col_sum)
