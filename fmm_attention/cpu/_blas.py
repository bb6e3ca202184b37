"""Row-major GEMM on strided views, callable from compiled kernels.

``np.dot`` in Numba allocates its result and needs contiguous operands, so a kernel that
scores a query block against a slice of ``k`` must first copy the slice, and then copy
the product again to place it. These two functions call the same BLAS ``?gemm`` that
``np.dot`` uses (SciPy's, through Numba's ``numba_xxgemm`` helper) with explicit leading
dimensions, ``alpha`` and ``beta``: they read any view whose rows are contiguous and
write into (or accumulate onto) a slice of a preallocated buffer.

``numba.np.linalg._BLAS`` is private to Numba (stable since long before the oldest Numba
this package supports); ``tests/test_blas.py`` fails first if it ever changes.
"""

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload, register_jitable
from numba.np.linalg import _BLAS, get_blas_kind


def gemm_nt(alpha, a, b, beta, c):
    """``c[:] = alpha * a @ b.T + beta * c`` for 2-D views with contiguous rows.

    As in BLAS, ``beta == 0`` ignores the old contents of ``c`` (NaN included).
    """
    c[:] = alpha * (a @ b.T) + (beta * c if beta else 0)


def gemm_nn(alpha, a, b, beta, c):
    """``c[:] = alpha * a @ b + beta * c`` for 2-D views with contiguous rows (see :func:`gemm_nt`)."""
    c[:] = alpha * (a @ b) + (beta * c if beta else 0)


@intrinsic
def _scalar_slot(typingctx, value):
    """A pointer to a stack slot (in the function's entry block) holding ``value``."""
    sig = types.CPointer(value)(value)

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once_value(builder, args[0])

    return sig, codegen


@register_jitable
def _leading_dim(x, width):
    """BLAS leading dimension of a row-major view: its row stride in elements (at least
    ``width``, as BLAS demands even where a single row makes the stride meaningless)."""
    if x.shape[1] > 1 and x.strides[1] != x.itemsize:
        raise ValueError("gemm: rows of an operand must be contiguous")
    if x.shape[0] > 1:
        return max(x.strides[0] // x.itemsize, width, 1)
    return max(width, 1)


def _gemm_overload(transpose_b):
    def typer(alpha, a, b, beta, c):
        if not all(isinstance(x, types.Array) and x.ndim == 2 for x in (a, b, c)):
            return None
        if not (a.dtype == b.dtype == c.dtype) or a.dtype not in (types.float32, types.float64):
            return None
        xxgemm = _BLAS().numba_xxgemm(a.dtype)
        kind = ord(get_blas_kind(a.dtype))
        scalar = a.dtype
        # Fortran BLAS is column-major: a row-major (r x s) view is the column-major
        # (s x r) transpose, so row-major C = A op(B) is column-major C^T = op(B)^T A^T.
        trans_b = ord("T") if transpose_b else ord("N")
        trans_a = ord("N")

        def impl(alpha, a, b, beta, c):
            rows, inner = a.shape
            cols = c.shape[1]
            if rows == 0 or cols == 0:
                return
            if c.shape[0] != rows or (b.shape[0] if transpose_b else b.shape[1]) != cols or \
                    (b.shape[1] if transpose_b else b.shape[0]) != inner:
                raise ValueError("gemm: operand shapes do not match")
            lda = _leading_dim(a, inner)
            ldb = _leading_dim(b, inner if transpose_b else cols)
            ldc = _leading_dim(c, cols)
            status = xxgemm(
                kind, trans_b, trans_a, cols, rows, inner,
                _scalar_slot(scalar(alpha)), b.ctypes, ldb, a.ctypes, lda,
                _scalar_slot(scalar(beta)), c.ctypes, ldc,
            )
            if status != 0:
                raise RuntimeError("gemm: BLAS call failed")

        return impl

    return typer


overload(gemm_nt)(_gemm_overload(True))
overload(gemm_nn)(_gemm_overload(False))
