"""The CPU backend: Numba ``@njit`` kernels behind three entry points.

:func:`exact_batch`, :func:`fmm` (with a tree) and :func:`fastformer_batch` take validated
inputs (:class:`fmm_attention._validate.Batch`), allocate outputs and run the kernels;
exact and FMA return ``(out, lse)`` of shapes ``(B, n, dv)`` and ``(B, n)``. (The entry
points are not named after the kernel modules ``exact`` and ``fastformer``, which they
would hide as attributes of this package.)
"""

import numpy as np

from ..coarsening import as_coarsening
from ._launch import launch_guard as _launch_guard
from .exact import calls_blas as _exact_calls_blas, exact_kernel
from .blocks import block_attention
from .fastformer import fastformer_batch
from .query_coarsening import coarse_queries, downward_pass, far_partials
from .refine import refine_plans

#: The entry points the CPU backend (:mod:`fmm_attention.backends`) and the VJPs call.
__all__ = ["coarse_buffers", "exact_batch", "fastformer_batch", "fmm", "refine_capacity"]


#: The padding placeholder of exact attention's kernel (never written; writeable like a
#: real mask, so that both compile to one kernel variant).
_NO_PADDING = np.ones((1, 1), dtype=np.bool_)


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


def exact_batch(batch, *, causal, attn_mask=None, attn_bias=None, window=None):
    """Exact softmax attention of a validated batch (a :class:`~fmm_attention._shapes.ShapedBatch`,
    or a plain ``Batch``).

    ``attn_mask``, ``attn_bias``: :class:`~fmm_attention._shapes.PairTerm` or ``None``;
    ``window``: ``(left, right)`` with ``None`` for an unbounded side, or ``None``.
    """
    from .._shapes import PairTerm, as_shaped

    batch = as_shaped(batch)
    layout = batch.layout
    B, n_q, n_k = layout.size, layout.n_q, layout.n_k
    out = np.empty((B, n_q, batch.dv), dtype=batch.dtype)
    lse = np.empty((B, n_q), dtype=batch.dtype)
    # masked keys are selected out inside the kernel; masked values must be made finite here
    v = _masked_rows_zeroed(batch.v, batch.valid)
    has_pad = batch.pad is not None
    pad = batch.pad if has_pad else _NO_PADDING
    mask = attn_mask if attn_mask is not None else PairTerm.empty(np.bool_, B)
    bias = attn_bias if attn_bias is not None else PairTerm.empty(batch.dtype, B)
    unbounded = n_q + n_k + abs(layout.query_offset) + 1  # farther than any key
    left, right = (unbounded, unbounded) if window is None else (
        unbounded if x is None else x for x in window)
    with _launch_guard(calls_blas=_exact_calls_blas(batch.dtype)):
        exact_kernel(batch.q, batch.k, v, layout.q_index, layout.kv_index, pad, has_pad,
                     mask.flat, mask.offset, mask.si, mask.sj, attn_mask is not None,
                     bias.flat, bias.offset, bias.si, bias.sj, attn_bias is not None,
                     batch.dtype.type(batch.scale), causal, layout.query_offset, left, right, out, lse)
    return out, lse


def coarse_buffers(batch, tree, coarsening, count_scaling, *, cluster_iters=0, coarse_valid=None):
    """Run the upward pass: coarse keys, values and biases of every level, ``(B, C, .)``.

    ``coarsening`` is a :class:`~fmm_attention.coarsening.Coarsening` or its name
    (``"cluster"`` with ``cluster_iters``); its ``"cpu"`` kernel fills the buffers.
    ``coarse_valid`` (B, n) marks the tokens that may enter coarsening (valid keys minus
    global tokens); ``None`` takes the batch's key validity.
    """
    coarsening = as_coarsening(coarsening, cluster_iters)
    B = batch.k.shape[0]  # one upward pass per key/value set (grouped heads share it)
    dtype = batch.dtype
    kc = np.zeros((B, tree.n_coarse, batch.d), dtype=dtype)
    vc = np.zeros((B, tree.n_coarse, batch.dv), dtype=dtype)
    cbias = np.full((B, tree.n_coarse), -np.inf, dtype=dtype)
    if coarse_valid is None:
        _, valid, has_mask = _key_bias(batch)
    else:
        valid, has_mask = coarse_valid, True
    upward = coarsening.kernel("cpu")
    with _launch_guard():
        upward(coarsening, batch, tree, valid=valid, has_mask=has_mask, count_scaling=count_scaling, kc=kc, vc=vc,
               cbias=cbias)
    return kc, vc, cbias


def _coarse_validity(batch, global_tokens, key_globals=None):
    """Tokens allowed into coarsening: valid keys that are not global tokens (or None).

    ``key_globals``: per-sequence global tokens, one tuple per key/value set (or None).
    """
    if not global_tokens and not (key_globals and any(key_globals)):
        return None
    valid = np.ones(batch.k.shape[:2], dtype=np.bool_) if batch.valid is None else batch.valid.copy()
    if key_globals is None:
        valid[:, list(global_tokens)] = False
    else:
        for b, tokens in enumerate(key_globals):
            valid[b, list(tokens)] = False
    return valid


def _freeze(*plans):
    # Read-only like the tree's cached plans: Numba compiles one kernel variant per
    # (dtype, layout, writeable), so a writeable plan would compile the block kernel and
    # its backward a second time (about 2.6 s each per dtype).
    for arr in plans:
        arr.setflags(write=False)


def _stacked_plans(tree, with_far, entry_globals):
    """Per-entry key plans ``(seg_lo, seg_hi, segments, max_keys)`` for per-sequence global
    tokens: one plan per distinct token set, laid out per output entry."""
    plans = {tokens: tree.plan(with_far=with_far, global_tokens=tokens) for tokens in set(entry_globals)}
    width = max(p[1].shape[0] for p in plans.values())
    B = len(entry_globals)
    segments = np.zeros((B, width, 3), dtype=np.int64)
    seg_lo = np.empty((B, tree.n_blocks), dtype=np.int64)
    seg_hi = np.empty((B, tree.n_blocks), dtype=np.int64)
    for b, tokens in enumerate(entry_globals):
        ptr, segs, _ = plans[tokens]
        segments[b, : segs.shape[0]] = segs
        seg_lo[b], seg_hi[b] = ptr[:-1], ptr[1:]
    _freeze(seg_lo, seg_hi, segments)
    return seg_lo, seg_hi, segments, max(p[2] for p in plans.values())


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
    _freeze(seg_lo, seg_hi, out)
    return seg_lo, seg_hi, out, max_keys


def _auto_global_fmm(batch, tree, options):
    """FMA with ``global_tokens="auto"``: each entry's tokens chosen from its own inputs,
    entries with the same choice computed together, the per-entry plans stacked.
    """
    import dataclasses

    from ..sinks import auto_global_tokens

    chosen = auto_global_tokens(batch.q, batch.k, batch.valid, block_size=tree.block_size, scale=batch.scale,
                                causal=tree.causal)
    out, lse = _outputs(batch)
    groups = {}
    for b, tokens in enumerate(chosen):
        groups.setdefault(tokens, []).append(b)
    B = batch.q.shape[0]
    seg_lo = np.zeros((B, tree.n_blocks), dtype=np.int64)
    seg_hi = np.zeros((B, tree.n_blocks), dtype=np.int64)
    live = np.zeros((B, tree.n_coarse), dtype=np.bool_)
    parts = []
    for tokens, members in groups.items():
        rows = np.array(members)
        sub = dataclasses.replace(batch, q=batch.q[rows], k=batch.k[rows], v=batch.v[rows],
                                  valid=None if batch.valid is None else batch.valid[rows], lead_shape=(rows.size,))
        o, s, (lo, hi, segments, sub_live) = fmm(sub, tree, options.replace(global_tokens=tokens))
        out[rows], lse[rows], live[rows] = o, s, sub_live
        seg_lo[rows], seg_hi[rows] = lo, hi  # a shared plan (1, ...) broadcasts to the group
        parts.append((rows, segments))
    width = max(segments.shape[1] for _, segments in parts)
    stacked = np.zeros((B, width, 3), dtype=np.int64)
    for rows, segments in parts:
        stacked[rows, : segments.shape[1]] = segments
    return out, lse, (seg_lo, seg_hi, stacked, live)


def fmm(batch, tree, options, *, entry_globals=None):
    """Fast Multipole Attention of a validated batch along ``tree`` (the tree of the keys)
    with ``options`` (:class:`~fmm_attention.options.FMMOptions`, fitted by ``api.plan``).

    ``batch`` may be a :class:`~fmm_attention._shapes.ShapedBatch`: grouped heads and
    broadcast leading dims share one upward pass per key/value set and index it; queries
    at positions ``query_offset + i`` get those rows of the self-attention over the keys.
    ``entry_globals``: per-sequence global tokens, one tuple per output entry (or None).

    ``global_tokens="auto"`` chooses each entry's tokens from its inputs
    (:func:`fmm_attention.sinks.auto_global_tokens`).

    Returns
    -------
    out, lse : ndarray
    plan : tuple ``(seg_lo, seg_hi, segments, live_coarse)``
        The key plan executed (shared ``(1, ...)`` or per entry ``(B, ...)``) and which
        coarse rows ``(B, C)`` hold a valid token, for statistics.
    """
    query_coarsening, refine, global_tokens = options.query_coarsening, options.refine, options.global_tokens
    if isinstance(global_tokens, str):  # "auto", validated by the options; one row set per entry
        from .._shapes import as_shaped, materialise

        return _auto_global_fmm(materialise(as_shaped(batch)), tree, options)
    from .._shapes import as_shaped, key_sets, materialise

    batch = as_shaped(batch)
    if (refine > 0 or query_coarsening) and (batch.layout.broadcasts or batch.layout.groups > 1):
        # refinement and coarse queries read one key set per query set: copy the shared ones
        batch = as_shaped(materialise(batch))
    layout = batch.layout
    key_globals = None if entry_globals is None else key_sets(entry_globals, layout, "global_tokens")
    if batch.pad is not None:
        key_sets(batch.pad, layout, "key_padding_mask")  # one mask per key set: coarse keys are shared
    B = layout.size
    out = np.empty((B, layout.n_q, batch.dv), dtype=batch.dtype)
    lse = np.empty((B, layout.n_q), dtype=batch.dtype)
    dtype = batch.dtype
    scale = dtype.type(batch.scale)
    key_bias, _, has_mask = _key_bias(batch)
    kc, vc, cbias = coarse_buffers(batch, tree, options.coarsening, options.count_scaling,
                                   coarse_valid=_coarse_validity(batch, global_tokens, key_globals))
    if entry_globals is not None:
        seg_lo, seg_hi, segments, max_keys = _stacked_plans(tree, not query_coarsening, entry_globals)
    elif refine > 0:
        base = tree.plan_of(options)
        seg_lo, seg_hi, segments, max_keys = _refined_plan(
            batch, tree, base, kc, vc, cbias, key_bias, has_mask, scale, refine, global_tokens
        )
    else:
        ptr, shared_segments, max_keys = tree.plan_of(options)
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
            batch.q, batch.k, batch.v, layout.q_index, layout.kv_index, layout.query_offset, key_bias, has_mask, kc, vc, cbias, seg_lo, seg_hi, segments, max_keys,
            tree.block_size, scale, tree.causal, *inherit, out, lse,
        )
    return out, lse, (seg_lo, seg_hi, segments, cbias > -np.inf)
