"""The CPU backend: Numba ``@njit`` kernels behind three entry points.

:func:`exact_batch`, :func:`fmm` (with a tree) and :func:`fastformer_batch` take validated
inputs (:class:`fmm_attention._validate.Batch`), allocate outputs and run the kernels;
exact and FMA return ``(out, lse)`` of shapes ``(B, n, dv)`` and ``(B, n)``. (The entry
points are not named after the kernel modules ``exact`` and ``fastformer``, which they
would hide as attributes of this package.)
"""

import numba
import numpy as np

from .. import _config
from . import cluster as _cluster
from ._launch import launch_guard as _launch_guard
from .exact import exact_kernel
from .fastformer import fastformer_batch  # noqa: F401  (the backend's Fastformer entry point)
from .blocks import block_attention
from .query_coarsening import coarse_queries, downward_pass, far_partials
from .refine import refine_plans
from .upward import box_counts_bias, learned_upward_level, mean_upward


def _key_bias(batch):
    """``(B, n)`` additive key bias (0 or ``-inf``) and whether any key is masked."""
    if batch.valid is None:
        return np.zeros((1, 1), dtype=batch.dtype), np.zeros((1, 1), dtype=np.bool_), False
    bias = np.where(batch.valid, 0.0, -np.inf).astype(batch.dtype)
    return bias, batch.valid, True


def _outputs(batch):
    B, n = batch.q.shape[:2]
    return np.empty((B, n, batch.dv), dtype=batch.dtype), np.empty((B, n), dtype=batch.dtype)


def _masked_rows_zeroed(x, valid):
    """``x`` (B, n, f), or a copy with the rows of masked tokens set to 0 if any of them is
    not finite: a masked row enters a weighted sum with weight 0, and ``0 * nan`` is NaN.
    """
    from .finite import all_finite

    if valid is None or all_finite(x):
        return x
    return np.where(valid[:, :, None], x, x.dtype.type(0))


def exact_batch(batch, *, causal):
    """Exact softmax attention of a validated batch."""
    out, lse = _outputs(batch)
    key_bias, _, has_mask = _key_bias(batch)
    # masked keys are selected out inside the kernel; masked values must be made finite here
    v = _masked_rows_zeroed(batch.v, batch.valid)
    with _launch_guard(calls_blas=True):
        exact_kernel(batch.q, batch.k, v, key_bias, has_mask, batch.dtype.type(batch.scale), causal, out, lse)
    return out, lse


def coarse_buffers(batch, tree, coarsening, count_scaling, *, cluster_iters=0, coarse_valid=None):
    """Run the upward pass: coarse keys, values and biases of every level, ``(B, C, .)``.

    ``coarse_valid`` (B, n) marks the tokens that may enter coarsening (valid keys minus
    global tokens); ``None`` takes the batch's key validity.
    """
    B = batch.q.shape[0]
    dtype = batch.dtype
    kc = np.zeros((B, tree.n_coarse, batch.d), dtype=dtype)
    vc = np.zeros((B, tree.n_coarse, batch.dv), dtype=dtype)
    cbias = np.full((B, tree.n_coarse), -np.inf, dtype=dtype)
    if coarse_valid is None:
        _, valid, has_mask = _key_bias(batch)
    else:
        valid, has_mask = coarse_valid, True
    with _launch_guard():
        if isinstance(coarsening, str) and coarsening == "mean":
            sub_sizes = np.array([lv.sub_box_size for lv in tree.levels], dtype=np.int64)
            offsets = np.array([lv.offset for lv in tree.levels], dtype=np.int64)
            n_rows = np.array([lv.n_boxes * lv.rank for lv in tree.levels], dtype=np.int64)
            counts = np.zeros((B, tree.n_coarse), dtype=dtype)
            mean_upward(batch.k, batch.v, valid, has_mask, sub_sizes, offsets, n_rows, count_scaling, kc, vc, cbias, counts)
        elif isinstance(coarsening, str) and coarsening == "cluster":
            levels = tree.levels
            box_sizes, ranks, offsets = (np.array([getattr(lv, a) for lv in levels], dtype=np.int64)
                                         for a in ("box_size", "rank", "offset"))
            _cluster.cluster_upward(batch.k, batch.v, valid, has_mask, box_sizes, ranks, offsets, cluster_iters,
                                    count_scaling, int(_config.CLUSTER_FLAT_SIZE),
                                    max(1, int(_config.CLUSTER_CHUNKS)), kc, vc, cbias)
        else:
            kw, vw, kb, vb = coarsening.level_arrays(dtype)
            for i, level in enumerate(tree.levels):
                args = (level.box_size, level.rank, level.offset)
                learned_upward_level(batch.k, valid, has_mask, kw[i], kb[i], *args, kc)
                learned_upward_level(batch.v, valid, has_mask, vw[i], vb[i], *args, vc)
                box_counts_bias(valid, has_mask, batch.n, *args, count_scaling, kc, vc, cbias)
    return kc, vc, cbias


def _coarse_validity(batch, global_tokens):
    """Tokens allowed into coarsening: valid keys that are not global tokens (or None)."""
    if not global_tokens:
        return None
    valid = np.ones((batch.q.shape[0], batch.n), dtype=np.bool_) if batch.valid is None else batch.valid.copy()
    valid[:, list(global_tokens)] = False
    return valid


def refine_capacity(tree, base, budget, n_globals):
    """``(capacity, room)`` of a refined plan: segments per block, and candidates a block
    may add beyond its base segments (the same for a padded and an unpadded sequence).
    """
    ptr = base[0]
    per_block = int(np.diff(ptr).max())
    # each split adds at most one segment per run of tokens between globals
    room = 2 * budget + n_globals + min(tree.block_size, tree.n) + 2
    return per_block + room, room


def _refined_plan(batch, tree, base, kc, vc, cbias, key_bias, has_mask, scale, budget, global_tokens):
    """Per-entry plans with ``budget`` extra keys per block spent on the heaviest far boxes."""
    ptr, segments, _ = base
    B = batch.q.shape[0]
    capacity, room = refine_capacity(tree, base, budget, len(global_tokens))
    is_global = np.zeros(batch.n, dtype=np.bool_)
    is_global[list(global_tokens)] = True
    token_bias = key_bias if has_mask else np.zeros((B, batch.n), dtype=batch.dtype)
    seg_lo = np.empty((B, tree.n_blocks), dtype=np.int64)
    seg_hi = np.empty((B, tree.n_blocks), dtype=np.int64)
    out = np.zeros((B, tree.n_blocks * capacity, 3), dtype=np.int64)
    lv = tree.levels
    with _launch_guard():
        refine_plans(
            batch.q, batch.k, batch.v, kc, vc, cbias, token_bias, is_global, ptr, segments,
            np.array([x.offset for x in lv], dtype=np.int64), np.array([x.rank for x in lv], dtype=np.int64),
            np.array([x.box_size for x in lv], dtype=np.int64), tree.block_size, scale, tree.causal,
            budget, capacity, room, seg_lo, seg_hi, out,
        )
    # the kernels' key buffers: the most keys any emitted block plan names (unused rows are 0)
    max_keys = int(out[:, :, 2].reshape(B, tree.n_blocks, capacity).sum(axis=2).max(initial=1))
    return seg_lo, seg_hi, out, max_keys


def fmm(batch, tree, *, coarsening, count_scaling, query_coarsening, cluster_iters=0, refine=0, global_tokens=()):
    """Fast Multipole Attention of a validated batch along ``tree``.

    Returns
    -------
    out, lse : ndarray
    plan : tuple ``(seg_lo, seg_hi, segments, live_coarse)``
        The key plan executed (shared ``(1, ...)`` or per entry ``(B, ...)``) and which
        coarse rows ``(B, C)`` hold a valid token, for statistics.
    """
    out, lse = _outputs(batch)
    B = batch.q.shape[0]
    dtype = batch.dtype
    scale = dtype.type(batch.scale)
    key_bias, _, has_mask = _key_bias(batch)
    kc, vc, cbias = coarse_buffers(batch, tree, coarsening, count_scaling, cluster_iters=cluster_iters,
                                   coarse_valid=_coarse_validity(batch, global_tokens))
    base = tree.plan(with_far=not query_coarsening, global_tokens=global_tokens)
    if refine > 0:
        seg_lo, seg_hi, segments, max_keys = _refined_plan(
            batch, tree, base, kc, vc, cbias, key_bias, has_mask, scale, refine, global_tokens
        )
    else:
        ptr, shared_segments, max_keys = base
        seg_lo, seg_hi, segments = ptr[None, :-1], ptr[None, 1:], shared_segments[None]
    with _launch_guard():
        if query_coarsening:
            box_offset, interactions = tree.box_tables
            box_sizes = np.array([lv.box_size for lv in tree.levels], dtype=np.int64)
            box_ranks = np.array([lv.rank for lv in tree.levels], dtype=np.int64)
            total = interactions.shape[0]
            qc = np.empty((B, total, batch.d), dtype=dtype)
            q_count = np.empty((B, total), dtype=np.int64)
            # a coarse query is the mean of its box's valid queries (the key mask marks tokens)
            _, valid, _ = _key_bias(batch)
            coarse_queries(batch.q, valid, has_mask, box_sizes, box_offset, qc, q_count)
            part_max = np.empty((B, total), dtype=dtype)
            part_sum = np.empty((B, total), dtype=dtype)
            part_num = np.empty((B, total, batch.dv), dtype=dtype)
            far_partials(qc, q_count, kc, vc, cbias, box_offset, box_ranks, interactions, scale, part_max, part_sum,
                         part_num)
            downward_pass(box_offset, part_max, part_sum, part_num)
            level1 = slice(0, tree.levels[0].n_boxes)  # level-1 boxes are the query blocks
            inherit = (True, part_max[:, level1].copy(), part_sum[:, level1].copy(), part_num[:, level1].copy())
        else:
            inherit = (False, np.zeros((1, 1), dtype), np.zeros((1, 1), dtype), np.zeros((1, 1, 1), dtype))
        block_attention(
            batch.q, batch.k, batch.v, key_bias, has_mask, kc, vc, cbias, seg_lo, seg_hi, segments, max_keys,
            tree.block_size, scale, tree.causal, *inherit, _config.FMA_CHUNKS_PER_THREAD * numba.get_num_threads(),
            out, lse,
        )
    return out, lse, (seg_lo, seg_hi, segments, cbias > -np.inf)
