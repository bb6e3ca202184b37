"""The transposed key plan of FMA's backward: for every key, the block columns that list it.

The forward plan is query-major: block ``I`` lists its segments of token rows and coarse
rows. A token segment inside the rows of blocks ``I-1 .. I+1`` (the near field,
:func:`is_direct`) is added by the block kernel straight into ``dk``/``dv`` (runs of
blocks two apart never share such rows). Every other column (coarse rows, global tokens,
refined boxes) gets one row of key-side partials; this module numbers those columns
(block by block, segment by segment, as the forward gathers them) and, for each target
(token row ``t``, or coarse row ``r`` as target ``n + r``), lists its columns in block
order. Summing along that list is the key-major reduction that makes the key-side
gradients deterministic without atomics.
Data-free like the plan itself: shared plans are transposed once and cached.
"""

import functools

import numpy as np
from numba.extending import register_jitable

from ..tree import TOKEN


@register_jitable
def is_direct(kind, start, count, block, block_size):
    """Whether a segment of block ``block``'s plan is written straight into ``dk``/``dv``:
    token rows inside blocks ``block - 1 .. block + 1``. The block kernel and
    :func:`transpose_plan` both decide with this one test (vectorised over arrays here).
    """
    return (kind == TOKEN) & (start >= (block - 1) * block_size) & (start + count <= (block + 2) * block_size)


def transpose_plan(seg_lo, seg_hi, segments, n, n_coarse, block_size):
    """Column numbering and transposed plan of a (shared or per-entry) key plan, over the
    columns of the segments that are not :func:`is_direct` (those have no partial row).

    Parameters
    ----------
    seg_lo, seg_hi : ndarray of int64, shape (P, n_blocks)
        Segments of block ``I`` in plan ``p`` are ``segments[p, seg_lo[p, I]:seg_hi[p, I]]``.
    segments : ndarray of int64, shape (P, S, 3)
        ``(kind, start, count)`` rows.
    n, n_coarse : int
        Token rows and coarse rows (the targets are ``n + n_coarse``).
    block_size : int
        Tokens per query block (what :func:`is_direct` tests against).

    Returns
    -------
    col_ptr : ndarray of int64, shape (P, n_blocks + 1)
        Block ``I``'s partial columns are ``col_ptr[p, I] : col_ptr[p, I + 1]``.
    t_ptr : ndarray of int64, shape (P, n + n_coarse + 1)
        Target ``t``'s columns are ``t_cols[p, t_ptr[p, t] : t_ptr[p, t + 1]]``.
    t_cols : ndarray of int64, shape (P, max_columns)
        Column numbers, ascending (so in block order) within each target.
    n_columns : int
        The most columns of any plan (rows of the partial buffers).
    """
    P, n_blocks = seg_lo.shape
    n_targets = n + n_coarse
    col_ptrs, t_ptrs, t_cols_list = [], [], []
    for p in range(P):
        lo, hi = seg_lo[p].astype(np.int64), seg_hi[p].astype(np.int64)
        n_seg = hi - lo
        first = np.cumsum(n_seg) - n_seg  # position of each block's first segment in the list
        index = np.repeat(lo - first, n_seg) + np.arange(n_seg.sum())
        segs = segments[p, index]
        block = np.repeat(np.arange(n_blocks), n_seg)
        direct = is_direct(segs[:, 0], segs[:, 1], segs[:, 2], block, block_size)
        counts = np.where(direct, 0, segs[:, 2])  # direct segments have no partial rows
        col_ptr = np.zeros(n_blocks + 1, dtype=np.int64)
        np.cumsum(np.bincount(block, weights=counts, minlength=n_blocks).astype(np.int64), out=col_ptr[1:])
        total = int(col_ptr[-1])
        seg_col = np.cumsum(counts) - counts  # first column of each segment
        target0 = segs[:, 1] + np.where(segs[:, 0] == TOKEN, 0, n)
        targets = np.repeat(target0 - seg_col, counts) + np.arange(total)
        order = np.argsort(targets, kind="stable")
        t_ptr = np.zeros(n_targets + 1, dtype=np.int64)
        np.cumsum(np.bincount(targets, minlength=n_targets), out=t_ptr[1:])
        col_ptrs.append(col_ptr)
        t_ptrs.append(t_ptr)
        t_cols_list.append(order.astype(np.int64))
    n_columns = max(1, max(c.size for c in t_cols_list))
    t_cols = np.zeros((P, n_columns), dtype=np.int64)
    for p, cols in enumerate(t_cols_list):
        t_cols[p, : cols.size] = cols
    out = (np.stack(col_ptrs), np.stack(t_ptrs), t_cols)
    for arr in out:  # read-only like the forward's plans: one compiled kernel variant
        arr.setflags(write=False)
    return out + (n_columns,)


@functools.lru_cache(maxsize=8)
def shared_transpose(tree, with_far, global_tokens):
    """:func:`transpose_plan` of ``tree.plan(with_far=..., global_tokens=...)``, cached.

    Returns ``(seg_lo, seg_hi, segments, max_keys, col_ptr, t_ptr, t_cols, n_columns)``.
    """
    ptr, segments, max_keys = tree.plan(with_far=with_far, global_tokens=global_tokens)
    seg_lo, seg_hi, segs = ptr[None, :-1], ptr[None, 1:], segments[None]
    transposed = transpose_plan(seg_lo, seg_hi, segs, tree.n, tree.n_coarse, tree.block_size)
    return (seg_lo, seg_hi, segs, max_keys) + transposed
