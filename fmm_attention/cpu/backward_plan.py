"""The transposed key plan of FMA's backward: for every key, the partial rows that list it.

The forward plan is query-major: block ``I`` lists its segments of token rows and coarse
rows. A token segment inside the rows of blocks ``I-1 .. I+1`` (the near field,
:func:`is_direct`) is added by the block kernel straight into ``dk``/``dv`` (runs of
blocks two apart never share such rows). Every other column (coarse rows, global tokens,
refined boxes) is a share of a target row that the backward sums key-major. The blocks of
one *run* (:func:`query_runs`, the unit of work of the block kernel) list mostly the same
coarse rows, so the run adds its blocks' shares of one target into one partial row: this
module numbers those rows, run by run and, within a run, by target, and lists, for each
target (token row ``t``, or coarse row ``r`` as target ``n + r``), its partial rows in run
order. Summing along that list is the key-major reduction that makes the key-side
gradients deterministic without atomics.
Data-free like the plan itself: shared plans are transposed once per run grid and cached.
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


def query_runs(first, end, size):
    """Starts of the runs of query blocks ``first <= I < end`` (and ``end``): runs of ``size``
    blocks (at least 2), the last one taking the remainder, so every run but a lone one holds
    at least two blocks (what keeps runs of one parity apart, see
    :func:`.backward.block_backward`). Set by the shapes only.
    """
    size = max(2, int(size))
    n_runs = max(1, (end - first) // size)
    starts = first + size * np.arange(n_runs + 1, dtype=np.int64)
    starts[-1] = end
    return starts


def transpose_plan(seg_lo, seg_hi, segments, n, n_coarse, block_size, run_starts):
    """Partial-row numbering and transposed plan of a (shared or per-entry) key plan, over
    the segments that are not :func:`is_direct` (those have no partial row).

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
    run_starts : ndarray of int64
        The runs of query blocks (:func:`query_runs`); blocks outside them get no rows.

    Returns
    -------
    col_ptr : ndarray of int64, shape (P, n_runs + 1)
        Run ``r``'s partial rows are ``col_ptr[p, r] : col_ptr[p, r + 1]``, one per target
        its blocks list outside their near field, ascending by target.
    seg_col : ndarray of int64, shape (P, S)
        The partial row of the first target of each such segment (a segment's targets are
        consecutive rows, so its rows are consecutive too); -1 for the others.
    t_ptr : ndarray of int64, shape (P, n + n_coarse + 1)
        Target ``t``'s partial rows are ``t_cols[p, t_ptr[p, t] : t_ptr[p, t + 1]]``.
    t_cols : ndarray of int64, shape (P, max_rows)
        Partial rows, ascending (so in run order) within each target.
    n_columns : int
        The most partial rows of any plan (rows of the partial buffers).
    """
    P, n_blocks = seg_lo.shape
    n_targets = n + n_coarse
    n_runs = run_starts.size - 1
    col_ptrs, seg_cols, t_ptrs, t_cols_list = [], [], [], []
    for p in range(P):
        lo, hi = seg_lo[p].astype(np.int64), seg_hi[p].astype(np.int64)
        n_seg = hi - lo
        first = np.cumsum(n_seg) - n_seg  # position of each block's first segment in the list
        index = np.repeat(lo - first, n_seg) + np.arange(n_seg.sum())
        segs = segments[p, index]
        block = np.repeat(np.arange(n_blocks), n_seg)
        run = np.searchsorted(run_starts, block, side="right") - 1
        in_runs = (block >= run_starts[0]) & (block < run_starts[-1])
        shared = ~is_direct(segs[:, 0], segs[:, 1], segs[:, 2], block, block_size) & in_runs
        counts = np.where(shared, segs[:, 2], 0)
        target0 = segs[:, 1] + np.where(segs[:, 0] == TOKEN, 0, n)
        # one key per (run, target) share, then one partial row per distinct key
        seg_first = np.cumsum(counts) - counts
        keys = run.repeat(counts) * n_targets + np.repeat(target0 - seg_first, counts) + np.arange(counts.sum())
        rows = np.unique(keys)
        col_ptr = np.searchsorted(rows, np.arange(n_runs + 1, dtype=np.int64) * n_targets).astype(np.int64)
        seg_col = np.full(segments.shape[1], -1, dtype=np.int64)
        seg_col[index[shared]] = np.searchsorted(rows, run[shared] * n_targets + target0[shared])
        targets = rows % n_targets
        order = np.argsort(targets, kind="stable")
        t_ptr = np.zeros(n_targets + 1, dtype=np.int64)
        np.cumsum(np.bincount(targets, minlength=n_targets), out=t_ptr[1:])
        col_ptrs.append(col_ptr)
        seg_cols.append(seg_col)
        t_ptrs.append(t_ptr)
        t_cols_list.append(order.astype(np.int64))
    n_columns = max(1, max(c.size for c in t_cols_list))
    t_cols = np.zeros((P, n_columns), dtype=np.int64)
    for p, cols in enumerate(t_cols_list):
        t_cols[p, : cols.size] = cols
    out = (np.stack(col_ptrs), np.stack(seg_cols), np.stack(t_ptrs), t_cols)
    for arr in out:  # read-only like the forward's plans: one compiled kernel variant
        arr.setflags(write=False)
    return out + (n_columns,)


@functools.lru_cache(maxsize=8)
def shared_transpose(tree, with_far, global_tokens, first, end, run_size):
    """:func:`transpose_plan` of ``tree.plan(with_far=..., global_tokens=...)`` over the
    runs ``query_runs(first, end, run_size)``, cached.

    Returns ``(seg_lo, seg_hi, segments, max_keys, run_starts, col_ptr, seg_col, t_ptr,
    t_cols, n_columns)``.
    """
    ptr, segments, max_keys = tree.plan(with_far=with_far, global_tokens=global_tokens)
    seg_lo, seg_hi, segs = ptr[None, :-1], ptr[None, 1:], segments[None]
    run_starts = query_runs(first, end, run_size)
    run_starts.setflags(write=False)
    transposed = transpose_plan(seg_lo, seg_hi, segs, tree.n, tree.n_coarse, tree.block_size, run_starts)
    return (seg_lo, seg_hi, segs, max_keys, run_starts) + transposed
