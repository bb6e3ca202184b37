"""Small dense products for the block kernels: a register-blocked micro-kernel.

The FMA block kernel multiplies small matrices: a block of 32 queries against about 150
keys of 64 features, then the weights against as many values. OpenBLAS runs those shapes
at about half its large-matrix rate (44-49 GFLOP/s on one core here, against 86), a cost
fixed per call (operand packing, dispatch) that small shapes cannot amortise. These
products need no packing: one operand is read a row at a time from wherever it lies (a
slice of ``k`` or ``v``, a gathered buffer) and the other is a small buffer the kernel lays
out itself, so a micro-kernel that keeps an ``MR x NR`` tile of the result in vector
registers runs them at 70-83 GFLOP/s on the same core (float32).

:func:`gemm_tiles` computes ``C[:m, :n] (+)= A[:m, :depth] @ B[:depth, :n]`` with ``A``
read at any row and column stride (entries are broadcast one at a time), ``B`` and ``C``
row-major with ``n`` a multiple of :func:`panel_width`. The micro-kernel is LLVM IR built
through a Numba intrinsic: ``2 * MR`` accumulator vectors, per step two vector loads of
``B``, ``MR`` broadcasts of ``A`` and ``2 * MR`` fused multiply-adds, ``MR = 6``. Under
``NUMBA_DISABLE_JIT=1`` the same call runs as a NumPy product.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload, register_jitable

#: Vector registers per row of a tile (``NR = 2 * lanes``): two keep the loads per step
#: below the two fused multiply-adds per cycle even at the largest ``MR``.
_VECTORS_PER_ROW = 2
#: Bytes of one vector register (AVX2). LLVM splits wider vectors, so narrower hosts work.
_VECTOR_BYTES = 32
#: Rows of a full tile (``MR``): its ``2 * MR`` accumulators plus two loads and a broadcast
#: fill 15 of the 16 AVX2 vector registers. Edges use tiles of 1 to ``MR - 1`` rows; the
#: dispatch in :func:`_tile` names each height.
_TILE_ROWS = 6


@register_jitable
def panel_width(x):
    """Columns of one micro-kernel tile (``NR``) for the dtype of array ``x``: 16 for
    float32, 8 for float64."""
    return _VECTORS_PER_ROW * _VECTOR_BYTES // x.itemsize


def gemm_tiles(m, n, depth, a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, accumulate):
    """``C[:m, :n] = A @ B`` (``+=`` when ``accumulate``), all operands as flat offsets.

    Parameters
    ----------
    m, n, depth : int
        Result rows, result columns (a multiple of :func:`panel_width`) and inner dimension.
    a : ndarray
        C-contiguous; ``A[i, t] = a.flat[a_off + i * a_rs + t * a_cs]``.
    b : ndarray
        C-contiguous; ``B[t, j] = b.flat[b_off + t * ldb + j]``.
    c : ndarray
        C-contiguous, written in place; ``C[i, j] = c.flat[c_off + i * ldc + j]``.
    accumulate : bool
        Add to ``C`` instead of overwriting it (overwriting ignores its old contents).

    Notes
    -----
    No bounds are checked in compiled code: the caller guarantees every addressed element
    lies inside its array. This Python version is what ``NUMBA_DISABLE_JIT=1`` runs.
    """
    if n % panel_width(a):
        raise ValueError("gemm_tiles: n must be a multiple of the panel width")
    if m == 0 or n == 0:
        return
    item = a.itemsize
    strided = np.lib.stride_tricks.as_strided
    lhs = strided(a.reshape(-1)[a_off:], (m, depth), (a_rs * item, a_cs * item))
    rhs = strided(b.reshape(-1)[b_off:], (depth, n), (ldb * item, item))
    out = strided(c.reshape(-1)[c_off:], (m, n), (ldc * item, item))
    product = lhs @ rhs
    if accumulate:
        out += product
    else:
        out[...] = product


def _micro_kernel(rows):
    """An intrinsic computing one ``rows x NR`` tile: ``(a, a_off, a_rs, a_cs, b, b_off,
    ldb, c, c_off, ldc, depth, accumulate) -> None``; offsets and strides in elements."""

    @intrinsic
    def tile(typingctx, a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, depth, accumulate):
        if not all(isinstance(x, types.Array) for x in (a, b, c)):
            return None
        if not (a.dtype == b.dtype == c.dtype) or a.dtype not in (types.float32, types.float64):
            return None
        intp = types.intp
        sig = types.none(a, intp, intp, intp, b, intp, intp, c, intp, intp, intp, types.boolean)

        def codegen(context, builder, signature, args):
            a_arr, a_off, a_rs, a_cs, b_arr, b_off, ldb, c_arr, c_off, ldc, depth, accumulate = args
            fty = context.get_value_type(a.dtype)
            lanes = _VECTOR_BYTES // (a.dtype.bitwidth // 8)
            vty = ir.VectorType(fty, lanes)
            i64 = ir.IntType(64)
            i32 = ir.IntType(32)

            def base(value, ty, offset):
                data = cgutils.create_struct_proxy(ty)(context, builder, value=value).data
                return builder.gep(data, [offset])

            pa = base(a_arr, signature.args[0], a_off)
            pb = base(b_arr, signature.args[4], b_off)
            pc = base(c_arr, signature.args[7], c_off)
            suffix = f"v{lanes}f{a.dtype.bitwidth}"
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3), f"llvm.fma.{suffix}")
            zero = ir.Constant(vty, [ir.Constant(fty, 0.0)] * lanes)
            undef = ir.Constant(vty, ir.Undefined)
            splat = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)

            def vector_at(row_ptr, v):
                return builder.bitcast(builder.gep(row_ptr, [ir.Constant(i64, v * lanes)]), vty.as_pointer())

            # loop over the inner dimension; the accumulators are loop-carried SSA values,
            # so they live in registers for the whole loop
            entry = builder.basic_block
            header = builder.append_basic_block("tile.header")
            body = builder.append_basic_block("tile.body")
            done = builder.append_basic_block("tile.done")
            builder.branch(header)
            builder.position_at_end(header)
            step = builder.phi(i64)
            step.add_incoming(ir.Constant(i64, 0), entry)
            accs = [[builder.phi(vty) for _ in range(_VECTORS_PER_ROW)] for _ in range(rows)]
            for row in accs:
                for acc in row:
                    acc.add_incoming(zero, entry)
            builder.cbranch(builder.icmp_signed("<", step, depth), body, done)

            builder.position_at_end(body)
            b_row = builder.gep(pb, [builder.mul(step, ldb)])
            b_vecs = [builder.load(vector_at(b_row, v), align=a.dtype.bitwidth // 8) for v in range(_VECTORS_PER_ROW)]
            a_col = builder.gep(pa, [builder.mul(step, a_cs)])
            updated = []
            for r in range(rows):
                scalar = builder.load(builder.gep(a_col, [builder.mul(ir.Constant(i64, r), a_rs)]))
                broadcast = builder.shuffle_vector(builder.insert_element(undef, scalar, ir.Constant(i32, 0)), undef, splat)
                updated.append([builder.call(fma, [broadcast, b_vecs[v], accs[r][v]]) for v in range(_VECTORS_PER_ROW)])
            body_end = builder.basic_block
            step.add_incoming(builder.add(step, ir.Constant(i64, 1)), body_end)
            for r in range(rows):
                for v in range(_VECTORS_PER_ROW):
                    accs[r][v].add_incoming(updated[r][v], body_end)
            builder.branch(header)

            builder.position_at_end(done)
            for r in range(rows):
                c_row = builder.gep(pc, [builder.mul(ir.Constant(i64, r), ldc)])
                for v in range(_VECTORS_PER_ROW):
                    ptr = vector_at(c_row, v)
                    old = builder.load(ptr, align=a.dtype.bitwidth // 8)
                    value = builder.select(accumulate, builder.fadd(accs[r][v], old), accs[r][v])
                    builder.store(value, ptr, align=a.dtype.bitwidth // 8)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_TILE1, _TILE2, _TILE3, _TILE4, _TILE5, _TILE6 = (_micro_kernel(rows) for rows in range(1, _TILE_ROWS + 1))


@register_jitable(inline="always")
def _tile(rows, a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, depth, accumulate):
    if rows == 6:
        _TILE6(a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, depth, accumulate)
    elif rows == 5:
        _TILE5(a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, depth, accumulate)
    elif rows == 4:
        _TILE4(a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, depth, accumulate)
    elif rows == 3:
        _TILE3(a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, depth, accumulate)
    elif rows == 2:
        _TILE2(a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, depth, accumulate)
    else:
        _TILE1(a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, depth, accumulate)


@overload(gemm_tiles)
def _gemm_tiles_overload(m, n, depth, a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, accumulate):
    if not all(isinstance(x, types.Array) for x in (a, b, c)):
        return None
    if not (a.dtype == b.dtype == c.dtype) or a.dtype not in (types.float32, types.float64):
        return None

    def impl(m, n, depth, a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, accumulate):
        width = panel_width(a)
        if n % width:
            raise ValueError("gemm_tiles: n must be a multiple of the panel width")
        # one panel of B (depth x NR) stays in L1 while every row tile of A passes over it
        for j0 in range(0, n, width):
            for i0 in range(0, m, _TILE_ROWS):
                _tile(min(_TILE_ROWS, m - i0), a, a_off + i0 * a_rs, a_rs, a_cs, b, b_off + j0, ldb,
                      c, c_off + i0 * ldc + j0, ldc, depth, accumulate)

    return impl
