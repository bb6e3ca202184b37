"""The CPU backend's backward entry points: residuals in, gradients out.

:func:`exact_backward` and :func:`fmm_backward` take the validated batch
(:class:`fmm_attention._validate.Batch`), the output cotangent ``g`` (B, n, dv), the forward's
``lse`` (B, n) and ``delta = g . out - g_lse`` (B, n), run the kernels of
:mod:`.backward` and return gradients of shapes ``(B, n, .)``. :class:`FMMResiduals` is
what FMA's backward keeps besides ``out`` and ``lse``: the coarse buffers (O(n d / m) per
level), the executed plan and its transposition (data-free, cached when shared).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _config
from ..coarsening import ClusterCoarsening, MeanCoarsening, as_coarsening
from ._launch import launch_guard
from ._memory import zeroed_arrays
from .backward import (
    block_backward,
    cluster_downward,
    exact_backward_prepare,
    exact_backward_reduce,
    exact_backward_tiles,
    learned_downward_level,
    learned_weight_grad,
    mean_downward,
    reduce_columns,
)
from .backward_plan import query_runs, shared_transpose, transpose_plan


def _key_bias(batch):
    if batch.valid is None:
        return np.zeros((1, 1), dtype=batch.dtype), False
    return np.where(batch.valid, 0.0, -np.inf).astype(batch.dtype), True


def _grid(n_batch, n):
    """Rectangles per side of exact attention's backward grid: enough jobs to spread one
    long sequence over the cores, from the shapes alone (never the thread count, which
    would change the order of the sums).
    """
    sides = 1
    max_grid, min_span = int(_config.BACKWARD_MAX_GRID), int(_config.BACKWARD_MIN_SPAN)
    while sides < max_grid and n_batch * sides * sides < 16 and n >= 2 * sides * min_span:
        sides *= 2
    return sides


def _padded(x, width):
    """``x`` (B, n, e) with its last dim zero-padded to a multiple of ``width`` (``x`` itself
    when it already is one and C-contiguous)."""
    e = x.shape[2]
    e_pad = -(-e // width) * width
    if e == e_pad:
        return np.ascontiguousarray(x)
    out = np.zeros(x.shape[:2] + (e_pad,), dtype=x.dtype)
    out[:, :, :e] = x
    return out


def exact_backward(batch, causal, g, lse, delta):
    """Gradients ``(dq, dk, dv)`` of exact attention, each ``(B, n, .)``."""
    dtype = batch.dtype
    scale = dtype.type(batch.scale)
    q = np.ascontiguousarray(batch.q)
    k, v = np.ascontiguousarray(batch.k), np.ascontiguousarray(batch.v)
    g = np.ascontiguousarray(g)
    B, n, d = q.shape
    dv = v.shape[2]
    panel = 64 // dtype.itemsize  # the micro-kernel's panel width (_tiles.panel_width)
    tile = -(-max(1, int(_config.BACKWARD_QUERY_TILE)) // panel) * panel
    key_tile = max(1, int(_config.BACKWARD_KEY_TILE))
    sides = _grid(B, n)
    per_side = -(-n // sides)
    span = -(-per_side // tile) * tile  # whole query tiles: no tile spans two jobs
    n_pad = -(-n // tile) * tile
    if batch.valid is None:
        key_bias = np.zeros((1, n), dtype=dtype)
    else:
        key_bias = np.where(batch.valid, 0.0, -np.inf).astype(dtype)
    n_tiles = n_pad // tile
    q_rows, g_rows = _padded(q, panel), _padded(g, panel)
    # the scratch in one fresh block, the gradients in another (cpu/_memory.py: page
    # faults); the partials' entries are also zeroed by the job that owns them
    q_t, g_t, shift, offset, dq_t_part, dk_part, dv_part = zeroed_arrays([
        ((B, n_tiles, d, tile), dtype), ((B, n_tiles, dv, tile), dtype), ((B, n_pad), dtype), ((B, n_pad), dtype),
        ((sides, B, n_tiles, d, tile), dtype), ((sides, B, n, q_rows.shape[2]), dtype),
        ((sides, B, n, g_rows.shape[2]), dtype),
    ])
    dq, dk, dv_out = zeroed_arrays([((B, n, d), dtype), ((B, n, d), dtype), ((B, n, dv), dtype)])
    with launch_guard():
        exact_backward_prepare(q, g, lse.astype(dtype, copy=False), delta.astype(dtype, copy=False), scale,
                               q_t, g_t, shift, offset)
        exact_backward_tiles(k, v, key_bias, causal, q_t, g_t, q_rows, g_rows, shift, offset,
                             np.arange(n, dtype=np.int64), span, key_tile, dq_t_part, dk_part, dv_part)
        exact_backward_reduce(dq_t_part, dk_part, dv_part, scale, dq, dk, dv_out)
    return dq, dk, dv_out


@dataclass(frozen=True, eq=False)
class FMMResiduals:
    """What FMA's pullback keeps besides ``out`` and ``lse`` (all O(n d) or data-free)."""

    batch: object
    tree: object
    coarsening: object
    query_coarsening: bool
    coarse_valid: np.ndarray | None  # tokens that entered coarsening (None: the key mask)
    kc: np.ndarray
    vc: np.ndarray
    cbias: np.ndarray
    plan: tuple  # seg_lo, seg_hi, segments, max_keys, run_starts, col_ptr, seg_col, t_ptr, t_cols, n_columns
    groups: tuple | None = None  # cluster coarsening: (labels, parents, counts), held fixed

    @classmethod
    def build(cls, batch, tree, refined_plan, *, coarsening, count_scaling, query_coarsening, global_tokens,
              cluster_iters=0):
        """Residuals of one forward call; ``refined_plan`` is the per-entry plan the forward
        executed with ``refine > 0`` (held fixed), ``None`` for the shared plan. With
        ``coarsening="cluster"`` the upward pass is rerun (it is deterministic, so it makes
        the forward's groups) recording each token's group at every level.
        """
        from . import _coarse_validity, coarse_buffers  # the forward's own upward pass

        coarsening = as_coarsening(coarsening)
        coarse_valid = _coarse_validity(batch, global_tokens)
        groups = None
        if isinstance(coarsening, ClusterCoarsening):
            kc, vc, cbias, groups = _cluster_buffers(batch, tree, count_scaling, coarsening.iters, coarse_valid)
        else:
            kc, vc, cbias = coarse_buffers(batch, tree, coarsening, count_scaling, coarse_valid=coarse_valid)
        layout = batch.layout
        m = tree.block_size
        first, end = layout.query_offset // m, (layout.query_offset + layout.n_q - 1) // m + 1  # blocks with queries
        run_size = int(_config.BACKWARD_RUN_BLOCKS)
        if refined_plan is None:
            plan = shared_transpose(tree, not query_coarsening, tuple(global_tokens), first, end, run_size)
        else:
            seg_lo, seg_hi, segments = (np.ascontiguousarray(x, dtype=np.int64) for x in refined_plan[:3])
            for arr in (seg_lo, seg_hi, segments):
                arr.setflags(write=False)
            csum = np.zeros((segments.shape[0], segments.shape[1] + 1), dtype=np.int64)
            np.cumsum(segments[:, :, 2], axis=1, out=csum[:, 1:])
            keys = np.take_along_axis(csum, seg_hi, 1) - np.take_along_axis(csum, seg_lo, 1)
            run_starts = query_runs(first, end, run_size)
            plan = (seg_lo, seg_hi, segments, int(keys.max()), run_starts) + transpose_plan(
                seg_lo, seg_hi, segments, tree.n, tree.n_coarse, tree.block_size, run_starts
            )
        return cls(batch, tree, coarsening, query_coarsening, coarse_valid, kc, vc, cbias, plan, groups)

    def coarsening_mask(self):
        """``(valid, has_mask)`` of the tokens that entered coarsening."""
        if self.coarse_valid is not None:
            return self.coarse_valid, True
        if self.batch.valid is not None:
            return self.batch.valid, True
        return np.zeros((1, 1), dtype=np.bool_), False


def fmm_backward(res, g, lse, delta):
    """Gradients of FMA: ``(dq, dk, dv, learned)``, ``learned`` the per-level weight and
    bias gradients of a learned coarsening (``(kw, vw, kb, vb)`` tuples) or ``None``.

    ``dq`` has one row set per output entry ``(B, n_q, d)``; ``dk``, ``dv`` one per key/value
    set ``(Bk, n_k, .)``, summed over the output entries reading it (a group of query
    heads, a broadcast batch) in entry order.
    """
    from .._shapes import as_shaped

    batch, tree = as_shaped(res.batch), res.tree
    layout = batch.layout
    B, n, d, dv_dim = layout.size, tree.n, batch.d, batch.dv
    dtype = batch.dtype
    scale = dtype.type(batch.scale)
    key_bias, has_mask = _key_bias(batch)
    seg_lo, seg_hi, segments, max_keys, run_starts, col_ptr, seg_col, t_ptr, t_cols, n_columns = res.plan
    # the gradients in one fresh block, the scratch in others (cpu/_memory.py: page faults)
    dq, dk, dv = zeroed_arrays([((B, layout.n_q, d), dtype), (batch.k.shape, batch.k.dtype),
                                (batch.v.shape, batch.v.dtype)])
    m = tree.block_size
    slabs = _slabs(col_ptr, B * (d + dv_dim) * dtype.itemsize)
    width = max(int(np.max(col_ptr[:, hi] - col_ptr[:, lo])) for lo, hi in slabs)
    dkc, dvc = zeroed_arrays([(res.kc.shape, res.kc.dtype), (res.vc.shape, res.vc.dtype)])
    # one partial buffer for every slab: its pages are touched once, and a slab's partials
    # are read back while they are still in the cache; a block of their own, freed once the
    # slabs are reduced
    dk_cols, dv_cols = zeroed_arrays([((B, max(width, 1), d), dtype), ((B, max(width, 1), dv_dim), dtype)])
    cursor = np.array(np.broadcast_to(t_ptr[:, :-1], (B, t_ptr.shape[1] - 1)))
    order = np.argsort(layout.kv_index, kind="stable").astype(np.int64)  # each key set's entries, ascending
    set_ptr = np.searchsorted(layout.kv_index[order], np.arange(batch.k.shape[0] + 1)).astype(np.int64)
    # token rows with partial columns (global tokens, refined boxes) sum them apart from the
    # near-field shares, so that both sums run in orders the slabs do not change
    far_tokens = bool(np.any(t_ptr[:, n] > 0))
    dk_far = np.zeros(dk.shape, dk.dtype) if far_tokens else dk
    dv_far = np.zeros(dv.shape, dv.dtype) if far_tokens else dv
    for lo, hi in slabs:  # in block order: each target's partials are added left to right
        for parity in (0, 1):  # even runs, then odd runs: concurrent jobs never share a row of dk, dv
            with launch_guard():
                block_backward(
                    batch.q, batch.k, batch.v, layout.q_index, layout.kv_index, layout.query_offset, key_bias,
                    has_mask, res.kc, res.vc, res.cbias, seg_lo, seg_hi, segments, col_ptr, seg_col, max_keys, m, scale,
                    tree.causal, g, lse, delta, run_starts, lo, hi, parity, set_ptr, order, dq, dk, dv,
                    dk_cols, dv_cols,
                )
        if width == 0:  # no partial columns anywhere (coarse queries, no global tokens)
            continue
        with launch_guard():
            reduce_columns(dk_cols, dv_cols, t_ptr, t_cols, np.ascontiguousarray(col_ptr[:, lo]),
                           np.ascontiguousarray(col_ptr[:, hi]), cursor, n, set_ptr, order, dk_far,
                           dv_far, dkc, dvc, 0 if far_tokens else n)
    if far_tokens:
        dk += dk_far
        dv += dv_far
        del dk_far, dv_far
    del dk_cols, dv_cols, cursor
    if res.query_coarsening:
        _far_backward(res, g, lse, delta, dq, dkc, dvc)
    empty = np.isneginf(res.cbias)  # rows with no token: the forward zeroed them
    dkc[empty] = 0
    dvc[empty] = 0
    valid, has = res.coarsening_mask()
    levels = tree.levels
    learned = None
    with launch_guard():
        if res.groups is not None:
            labels, parents, counts = res.groups
            box_sizes, ranks, offsets = _level_table(levels)
            cluster_downward(valid, has, box_sizes, ranks, offsets, labels, parents, counts, dkc, dvc, dk, dv)
        elif isinstance(res.coarsening, MeanCoarsening):  # else learned: the others have no backward
            sub_sizes = np.array([lv.sub_box_size for lv in levels], dtype=np.int64)
            offsets = np.array([lv.offset for lv in levels], dtype=np.int64)
            counts = _mean_counts(valid, has, batch.k.shape[0], tree)
            mean_downward(valid, has, sub_sizes, offsets, counts, dkc, dvc, dk, dv)
        else:
            kw, vw, _, _ = res.coarsening.level_arrays(dtype)
            grads = ([], [], [], [])
            per_job = max(1, int(_config.BACKWARD_LEARNED_TOKENS))
            k_t, v_t = (np.ascontiguousarray(x.transpose(0, 2, 1)) for x in (batch.k, batch.v))
            for i, lv in enumerate(levels):
                args = (lv.box_size, lv.rank, lv.offset)
                learned_downward_level(np.ascontiguousarray(kw[i].T), valid, has, *args, per_job, dkc, dk)
                learned_downward_level(np.ascontiguousarray(vw[i].T), valid, has, *args, per_job, dvc, dv)
                for x, dx, target_w, target_b in ((k_t, dkc, grads[0], grads[2]), (v_t, dvc, grads[1], grads[3])):
                    gw = np.empty((lv.rank * x.shape[1], lv.box_size), dtype=dtype)
                    gb = np.empty(lv.rank * x.shape[1], dtype=dtype)
                    learned_weight_grad(x, valid, has, *args, dx, gw, gb)
                    target_w.append(gw[:, None, :])
                    target_b.append(gb)
            learned = tuple(tuple(x) for x in grads)
    return dq, dk, dv, learned


def _slabs(col_ptr, bytes_per_column):
    """``[(lo, hi), ...]``: consecutive ranges of runs whose partial rows (``col_ptr``, per
    run, the most over the plans) fit ``_config.BACKWARD_PARTIAL_BYTES``.
    A slab ends only before an odd run (or at the end), so that it holds whole pairs of an
    even run and the odd run after it: within a slab even runs go before odd ones, so every
    row of ``dk``, ``dv`` adds its shares in the same order whatever the slabs (the slabs
    change no result).
    """
    budget = int(_config.BACKWARD_PARTIAL_BYTES)
    most = max(1, int(budget // bytes_per_column))  # columns per slab
    n_runs = col_ptr.shape[1] - 1
    ends = col_ptr.max(axis=0)  # a slab's columns are at most ends[hi] - starts[lo] over the plans
    starts = col_ptr.min(axis=0)
    slabs, lo = [], 0
    while lo < n_runs:
        hi = int(np.searchsorted(ends, starts[lo] + most, side="right")) - 1
        hi = min(n_runs, max(hi, lo + 1))
        if hi < n_runs and hi % 2 == 0:  # end before an odd run: one more run, or one less
            hi = hi - 1 if hi - 1 > lo else hi + 1
        slabs.append((lo, hi))
        lo = hi
    return slabs


def _level_table(levels):
    return tuple(np.array([getattr(lv, a) for lv in levels], dtype=np.int64) for a in ("box_size", "rank", "offset"))


def _cluster_buffers(batch, tree, count_scaling, iters, coarse_valid):
    """Cluster coarsening's upward pass with its group assignments recorded:
    ``(kc, vc, cbias, (labels, parents, counts))`` (see :func:`.cluster.cluster_groups`).
    """
    from .cluster import cluster_groups, flat_levels

    B, C, n = batch.k.shape[0], tree.n_coarse, tree.n  # one upward pass per key/value set
    dtype = batch.dtype
    if coarse_valid is not None:
        valid, has_mask = coarse_valid, True
    elif batch.valid is not None:
        valid, has_mask = batch.valid, True
    else:
        valid, has_mask = np.zeros((1, 1), dtype=np.bool_), False
    box_sizes, ranks, offsets = _level_table(tree.levels)
    flat_size = int(_config.CLUSTER_FLAT_SIZE)
    kc = np.zeros((B, C, batch.d), dtype=dtype)
    vc = np.zeros((B, C, batch.dv), dtype=dtype)
    cbias = np.full((B, C), -np.inf, dtype=dtype)
    counts = np.zeros((B, C), dtype=np.float64)
    labels = np.zeros((B, flat_levels(box_sizes, flat_size), n), dtype=np.int64)
    parents = np.zeros((B, C), dtype=np.int64)
    with launch_guard():
        cluster_groups(batch.k, batch.v, valid, has_mask, box_sizes, ranks, offsets, iters, count_scaling, flat_size,
                       kc, vc, cbias, counts, True, labels, parents)
    return kc, vc, cbias, (labels, parents, counts)


def _mean_counts(valid, has_mask, B, tree):
    """Tokens entering each coarse row's mean, ``(B, n_coarse)`` (the forward's counts)."""
    N, n = tree.padded_length, tree.n
    ok = np.zeros((B, N), dtype=np.float64)
    ok[:, :n] = valid if has_mask else 1.0
    counts = np.empty((B, tree.n_coarse), dtype=np.float64)
    for lv in tree.levels:
        rows = lv.n_boxes * lv.rank
        counts[:, lv.offset : lv.offset + rows] = ok.reshape(B, rows, lv.sub_box_size).sum(axis=2)
    return counts


def _far_backward(res, g, lse, delta, dq, dkc, dvc):
    """Far field of coarse queries (``query_coarsening=True``), adjoint of the box partials.

    At level ``l`` every query of box ``c`` shares the logits ``x_j = s qc_c . kc_j + bias_j``
    of the box's far list, ``qc_c`` the mean of the box's valid queries (real positions that
    ``key_padding_mask`` marks; a box with none has an empty partial and no gradient). With ``M`` the box's
    largest far logit (``M <= lse_i`` for each of its queries, so the weights below are at
    most 1): ``A = sum_i exp(M - lse_i) g_i``, ``D = sum_i exp(M - lse_i) delta_i`` and
    ``dx_j = exp(x_j - M) (A . vc_j - D)``; then ``dvc_j += exp(x_j - M) A``,
    ``dkc_j += s dx_j qc_c`` and each valid query gains ``s sum_j dx_j kc_j / count(c)``.
    """
    batch, tree = res.batch, res.tree
    B, n, N = batch.q.shape[0], batch.n, tree.padded_length
    scale = batch.scale
    box_offset, interactions = tree.box_tables
    dtype = batch.dtype
    q_pad = np.zeros((B, N, batch.d), dtype=dtype)
    q_pad[:, :n] = batch.q
    g_pad = np.zeros((B, N, batch.dv), dtype=dtype)
    g_pad[:, :n] = g
    lse_pad = np.full((B, N), -np.inf, dtype=dtype)
    lse_pad[:, :n] = lse
    delta_pad = np.zeros((B, N), dtype=dtype)
    delta_pad[:, :n] = delta
    dq_far = np.zeros((B, N, batch.d), dtype=dtype)
    q_ok = np.zeros((B, N), dtype=dtype)  # 1 where a query enters its boxes' coarse queries
    q_ok[:, :n] = 1 if batch.valid is None else batch.valid
    q_pad *= q_ok[:, :, None]
    bidx = np.arange(B)[:, None, None, None]
    for li, lv in enumerate(tree.levels):
        w, nb, r = lv.box_size, lv.n_boxes, lv.rank
        count = q_ok.reshape(B, nb, w).sum(axis=2)  # valid queries per box
        qc = np.einsum("bcwd->bcd", q_pad.reshape(B, nb, w, batch.d)) / np.maximum(count, 1)[:, :, None]
        starts = interactions[box_offset[li] : box_offset[li + 1]]  # (nb, 3)
        ok = starts >= 0
        rows = np.where(ok, starts, 0)[:, :, None] + np.arange(r)  # (nb, 3, r)
        kc_g = res.kc[:, rows]  # (B, nb, 3, r, d)
        vc_g = res.vc[:, rows]
        with np.errstate(invalid="ignore"):
            x = scale * np.einsum("bcd,bcstd->bcst", qc, kc_g) + res.cbias[:, rows]
        x = np.where(ok[None, :, :, None] & (count > 0)[:, :, None, None], x, -np.inf)
        top = x.max(axis=(2, 3))  # (B, nb)
        live = np.isfinite(top)
        top_safe = np.where(live, top, 0)
        lse_box = lse_pad.reshape(B, nb, w)
        with np.errstate(over="ignore", invalid="ignore"):
            weights = np.where(np.isfinite(lse_box) & live[:, :, None], np.exp(top_safe[:, :, None] - lse_box), 0)
        A = np.einsum("bcw,bcwe->bce", weights, g_pad.reshape(B, nb, w, batch.dv))
        D = np.einsum("bcw,bcw->bc", weights, delta_pad.reshape(B, nb, w))
        E = np.where(np.isfinite(x), np.exp(x - top_safe[:, :, None, None]), 0)
        dx = E * (np.einsum("bce,bcste->bcst", A, vc_g) - D[:, :, None, None])
        dqc = scale * np.einsum("bcst,bcstd->bcd", dx, kc_g)
        dq_far += np.repeat(dqc / np.maximum(count, 1)[:, :, None], w, axis=1) * q_ok[:, :, None]
        # scatter to the coarse rows; np.add.at applies the terms in index order (deterministic)
        sel = np.broadcast_to(ok[None, :, :, None], dx.shape)
        b_ix = np.broadcast_to(bidx, dx.shape)[sel]
        r_ix = np.broadcast_to(rows[None], dx.shape)[sel]
        np.add.at(dkc, (b_ix, r_ix), (scale * dx[..., None] * qc[:, :, None, None, :])[sel])
        np.add.at(dvc, (b_ix, r_ix), (E[..., None] * A[:, :, None, None, :])[sel])
    dq += dq_far[:, :n]
