"""Backward kernels of exact attention and FMA's joint softmax (FlashAttention's scheme).

Nothing of the forward's probabilities is kept: with the forward's ``lse`` every weight is
``P_ij = exp(s_ij - lse_i)``, independent of the other keys, so each pass recomputes the
logits of the pairs it owns. With ``delta_i = sum_e g_ie out_ie - g_lse_i`` the logit
cotangent is ``dS_ij = P_ij (g_i . v_j - delta_i)``, and

``dq_i = scale sum_j dS_ij k_j``,  ``dk_j = scale sum_i dS_ij q_i``,  ``dv_j = sum_i P_ij g_i``.

Determinism (bitwise equal across calls and thread counts): no float atomics. Every
parallel job writes its own rows, and every sum runs in an order fixed by the shapes and
the plan, never by the thread count:

- exact attention: a fixed grid of (query range, key range) rectangles, each writing its
  own partial sums of ``dq`` (per key range) and ``dk``, ``dv`` (per query range), summed
  in index order;
- FMA: each query block writes ``dq`` for its queries, adds its near-field key gradients
  straight into ``dk``, ``dv`` (runs of blocks in two passes, even runs then odd, so that
  no two concurrent jobs share a row), and writes one row of key-side partials per other
  column of its plan (``dk_cols``, ``dv_cols``: coarse rows, global tokens, refined
  boxes); :func:`reduce_columns` then sums, for each key or coarse row, the partials of
  the blocks that list it, in block order (the transposed plan of
  :mod:`fmm_attention.cpu.backward_plan`).
"""

import numpy as np
from numba import types
from numba.extending import overload

from .. import _config
from ..tree import TOKEN
from ._jit import jit
from ._launch import Threaded
from ._softmax import _exp32_parts, _exp64_parts
from ._tiles import gemm_tiles, panel_width
from .backward_plan import is_direct


@jit()
def _shift_of(lse, out):
    """Per-query exponent shift: ``lse`` itself, ``+inf`` where ``lse = -inf`` (no valid key),
    which turns every weight of that query into ``exp(-inf) = 0`` instead of NaN.
    """
    for i in range(lse.size):
        out[i] = lse[i] if lse[i] > -np.inf else np.inf


def weights_and_logit_grads(scores, grads, rows, bias, positions, first_query, causal, shift, offset):
    """One pass over a key-major block: ``scores[j, i] <- P = exp(scores + bias_j - shift_i)``
    (``-inf`` where ``causal`` masks key ``j`` for query ``first_query + i``) and
    ``grads[j, i] <- P (grads - offset_i)``, the logit cotangent ``dS``, for ``j < rows``.

    The forward's polynomial exponential (:mod:`._softmax`), fused with the bias, the causal
    mask and ``dS`` so the block is read once, vectorised along the contiguous query axis.
    """
    for j in range(rows):
        for i in range(scores.shape[1]):
            x = scores[j, i] + bias[j]
            if causal and positions[j] > first_query + i:
                x = -np.inf
            w = np.exp(x - shift[i])
            scores[j, i] = w
            grads[j, i] = w * (grads[j, i] - offset[i])


def _fused_loop(parts, bits_type):
    def impl(scores, grads, rows, bias, positions, first_query, causal, shift, offset):
        bits = scores.view(bits_type)
        minus_inf = scores.dtype.type(-np.inf)
        for j in range(rows):
            key_bias = bias[j]
            position = positions[j]
            for i in range(scores.shape[1]):
                x = scores[j, i] + key_bias
                if causal:
                    x = x if position <= first_query + i else minus_inf
                scores[j, i], exponent = parts(x - shift[i])
                bits[j, i] += exponent
                grads[j, i] = scores[j, i] * (grads[j, i] - offset[i])

    return impl


@overload(weights_and_logit_grads, jit_options={"fastmath": _config.FASTMATH})
def _weights_and_logit_grads_overload(scores, grads, rows, bias, positions, first_query, causal, shift, offset):
    if isinstance(scores, types.Array) and scores.ndim == 2 and scores.dtype == types.float32:
        return _fused_loop(_exp32_parts, np.int32)
    if isinstance(scores, types.Array) and scores.ndim == 2 and scores.dtype == types.float64:
        return _fused_loop(_exp64_parts, np.int64)
    return None


@jit(nogil=True)
def _cotangent_delta_rows(row_lo, row_hi, g, out, delta):
    """``delta[r] = g[r] . out[r]`` for the rows ``row_lo <= r < row_hi`` of ``g``, ``out``
    (rows, e): the jobs of :data:`cotangent_delta`.

    One pass over the cotangent that is also its finiteness check: a NaN or infinite entry
    of row ``r`` makes ``delta[r]`` non-finite (``out`` is the forward's output, finite), so
    the caller scans ``g`` itself only when some ``delta`` is not finite. No fastmath flag
    assumes finite values (``_config.FASTMATH`` has no ``nnan``/``ninf``); each row is one
    sum in a fixed order, so the result does not depend on the thread count.
    """
    for r in range(row_lo, row_hi):
        total = g.dtype.type(0)
        for e in range(g.shape[1]):
            total += g[r, e] * out[r, e]
        delta[r] = total


def _cotangent_delta_layout(g, out, delta):
    return g.shape[0], g.size  # one job per row, one multiply-add per entry


#: ``delta = (g * out).sum(-1)`` row by row, on the library's threads (:func:`_cotangent_delta_rows`).
cotangent_delta = Threaded(_cotangent_delta_rows, _cotangent_delta_layout)


# ---------------------------------------------------------------- exact attention
# The three kernels are serial ``nogil`` kernels over a range of jobs, run on the library's
# threads (._launch.Threaded): a prange body is compiled three times (docs/performance.rst).
@jit(nogil=True)
def _exact_backward_tiles_jobs(job_lo, job_hi, k, v, key_bias, causal, q_t, g_t, q_rows, g_rows, shift, offset,
                               positions, span, key_tile, dq_t_part, dk_part, dv_part):
    """Exact attention's gradients in one recompute, as partial sums over a fixed grid: the
    jobs ``job_lo <= job < job_hi`` of the ``B * sides * sides`` rectangles.

    The (query, key) square is cut into ``sides x sides`` rectangles of ``span`` queries by
    ``span`` keys (``sides = dk_part.shape[0]``, ``span`` a multiple of the query tile), one
    job each. Job ``(h, c)`` recomputes every logit of its rectangle once and adds
    into ``dq_t_part[c]`` for its queries and ``dk_part[h]``, ``dv_part[h]`` for its keys,
    entries no other job writes (it zeroes them first); :func:`exact_backward_reduce` sums the
    parts in index order. The grid depends on the shapes only, never on the thread count, so
    the sums are always the same.

    Inside a rectangle the loop is key-major (FlashAttention-2's backward): for each tile of
    ``key_tile`` keys, every query tile in order, logits stored key-major
    (``scores[key, query]``) as in FMA's block kernel, so that all five products run on
    :func:`._tiles.gemm_tiles` with no temporary and no transposed copy: they read the keys
    and values a row at a time where they lie and add into the partials in place (``np.dot``
    ran the last three at about 70 % of the first two's rate, with a temporary and a ``+=``
    pass each: docs/performance.rst).

    Operands (``B`` entries, ``n`` positions, ``T`` query tiles of ``w`` columns, ``w`` a
    multiple of the panel width): ``k`` (B, n, d), ``v`` (B, n, dv); ``key_bias`` (B or 1,
    n), 0 or ``-inf``; ``q_t`` (B, T, d, w), the scaled queries transposed tile by tile, and
    ``g_t`` (B, T, dv, w) the cotangents, zero past ``n`` (one tile's block is contiguous: as
    one (d, n) array the rows of a panel lay ``4 n`` bytes apart, all in one L1 set);
    ``q_rows`` (B, n, d_pad), ``g_rows`` (B, n, dv_pad) the unscaled queries and the
    cotangents row-major, feature dims padded with zeros to the panel width; ``shift`` (B,
    T * w) the forward's ``lse`` (``+inf`` for a query without a valid key and past ``n``:
    weight 0), ``offset`` (B, T * w) ``delta``; ``positions`` ``arange(n)``. Results:
    ``dq_t_part`` (sides, B, T, d, w) ``sum_j dS_ij k_j`` in the layout of ``q_t``,
    ``dk_part`` (sides, B, n, d_pad) ``sum_i dS_ij q_i`` (both without the scale),
    ``dv_part`` (sides, B, n, dv_pad) ``sum_i P_ij g_i``.
    """
    n_batch, n, d = k.shape
    dv = v.shape[2]
    n_tiles, width = q_t.shape[1], q_t.shape[3]
    d_pad = q_rows.shape[2]
    dv_pad = g_rows.shape[2]
    sides = dk_part.shape[0]
    # flat views: every product reads and writes at flat offsets, so gemm_tiles is compiled
    # for one operand layout only
    k_flat, v_flat = k.reshape(-1), v.reshape(-1)
    qt_flat, gt_flat = q_t.reshape(-1), g_t.reshape(-1)
    qr_flat, gr_flat = q_rows.reshape(-1), g_rows.reshape(-1)
    dq_flat, dk_flat, dv_flat = dq_t_part.reshape(-1), dk_part.reshape(-1), dv_part.reshape(-1)
    masked = key_bias.shape[0] > 1
    for job in range(job_lo, job_hi):
        b = job // (sides * sides)
        # query ranges in the order 0, sides-1, 1, sides-2, ...: causal range h costs about
        # h + 1/2 rectangles, so each pair costs the same and the contiguous runs of jobs
        # that each thread gets have equal work (in range order the thread with the last
        # ranges got three quarters of it). Jobs write disjoint entries: no result changes.
        slot = (job // sides) % sides
        h = slot // 2 if slot % 2 == 0 else sides - 1 - slot // 2
        c = job % sides
        qa = min(n, h * span)
        qb = min(n, qa + span)
        ka = min(n, c * span)
        kb = min(n, ka + span)
        # zero this job's entries of the partials: its query tiles of dq_t_part[c] (padding
        # columns included), its keys' rows of dk_part[h] and dv_part[h]. A query range past
        # n (qa = qb = n, when (sides - 1) * span >= n: small BACKWARD_MIN_SPAN) owns no tile
        # (it used to take the last tile of the range before it: those queries counted twice)
        t_lo = qa // width
        t_hi = (qb + width - 1) // width if qb > qa else t_lo
        for x in range(((c * n_batch + b) * n_tiles + t_lo) * d * width,
                       ((c * n_batch + b) * n_tiles + t_hi) * d * width):
            dq_flat[x] = 0
        dk_base = (h * n_batch + b) * n
        for x in range((dk_base + ka) * d_pad, (dk_base + kb) * d_pad):
            dk_flat[x] = 0
        for x in range((dk_base + ka) * dv_pad, (dk_base + kb) * dv_pad):
            dv_flat[x] = 0
        if causal:
            kb = min(kb, qb)  # keys after the rectangle's last query: nothing to add
        scores_flat = np.empty(key_tile * width, dtype=k.dtype)
        grads_flat = np.empty(key_tile * width, dtype=k.dtype)
        scores = scores_flat.reshape((key_tile, width))
        grads = grads_flat.reshape((key_tile, width))
        bias_row = 0 if not masked else b
        for j0 in range(ka, kb, key_tile):
            j1 = min(kb, j0 + key_tile)
            first = t_lo
            if causal and j0 > qa:  # the first query tile holding a query at or after key j0
                first = j0 // width
            for tile in range(first, t_hi):
                i0 = tile * width
                rows = min(qb, i0 + width) - i0
                q_off = (b * n_tiles + tile) * d * width
                g_off = (b * n_tiles + tile) * dv * width
                # causal: the keys after the tile's last query have weight 0 for all of it, so
                # they are left out (their terms were exact zeros at the end of each sum)
                nk = j1 - j0 if not causal else min(j1, i0 + rows) - j0
                # scores[key, query] = k . (scale q), grads[key, query] = v . g
                gemm_tiles(nk, width, d, k_flat, (b * n + j0) * d, d, 1, qt_flat, q_off, width, scores_flat, 0, width,
                           False)
                gemm_tiles(nk, width, dv, v_flat, (b * n + j0) * dv, dv, 1, gt_flat, g_off, width, grads_flat, 0,
                           width, False)
                # P from the forward's lse and dS = P (dP - delta), one pass; the causal mask
                # only where the tile crosses the diagonal
                weights_and_logit_grads(scores, grads, nk, key_bias[bias_row, j0:j1], positions[j0:j1], i0,
                                        causal and j0 + nk - 1 > i0, shift[b, i0:i0 + width],
                                        offset[b, i0:i0 + width])
                # dq^T[feature, query] += sum over keys of k[key, feature] dS[key, query]
                gemm_tiles(d, width, nk, k_flat, (b * n + j0) * d, 1, d, grads_flat, 0, width, dq_flat,
                           (c * n_batch * n_tiles) * d * width + q_off, width, True)
                # dk[key] += sum over queries of dS[key, query] q[query], dv[key] += P g
                gemm_tiles(nk, d_pad, rows, grads_flat, 0, width, 1, qr_flat, (b * n + i0) * d_pad, d_pad, dk_flat,
                           (dk_base + j0) * d_pad, d_pad, True)
                gemm_tiles(nk, dv_pad, rows, scores_flat, 0, width, 1, gr_flat, (b * n + i0) * dv_pad, dv_pad,
                           dv_flat, (dk_base + j0) * dv_pad, dv_pad, True)


def _exact_backward_tiles_layout(k, v, key_bias, causal, q_t, g_t, q_rows, g_rows, shift, offset, positions, span,
                                 key_tile, dq_t_part, dk_part, dv_part):
    # five products over every (query, key) pair, half of them when causal
    n_batch, n, d = k.shape
    sides = dk_part.shape[0]
    return n_batch * sides * sides, n_batch * n * n * (d + v.shape[2]) * 5 // (4 if causal else 2)


#: :func:`_exact_backward_tiles_jobs` over the whole grid, split over the threads.
exact_backward_tiles = Threaded(_exact_backward_tiles_jobs, _exact_backward_tiles_layout)


@jit(nogil=True)
def _exact_backward_prepare_jobs(job_lo, job_hi, q, g, lse, delta, scale, q_t, g_t, shift, offset):
    """The query-side operands of :func:`exact_backward_tiles`, one query tile per job
    (``job = b * T + tile``, the jobs ``job_lo <= job < job_hi``): ``q_t = scale q`` and
    ``g_t = g`` transposed tile by tile (B, T, ., w), ``shift = lse`` (``+inf`` where
    ``lse = -inf``) and ``offset = delta`` (B, T * w); past ``n``: zeros, and ``shift = +inf``.
    """
    n_batch, n, d = q.shape
    dv = g.shape[2]
    n_tiles, width = q_t.shape[1], q_t.shape[3]
    for job in range(job_lo, job_hi):
        b = job // n_tiles
        tile = job % n_tiles
        i0 = tile * width
        rows = min(n, i0 + width) - i0
        for e in range(d):
            for i in range(rows):
                q_t[b, tile, e, i] = q[b, i0 + i, e] * scale
            for i in range(rows, width):
                q_t[b, tile, e, i] = 0
        for e in range(dv):
            for i in range(rows):
                g_t[b, tile, e, i] = g[b, i0 + i, e]
            for i in range(rows, width):
                g_t[b, tile, e, i] = 0
        for i in range(i0, i0 + rows):
            shift[b, i] = lse[b, i] if lse[b, i] > -np.inf else np.inf
            offset[b, i] = delta[b, i]
        for i in range(i0 + rows, i0 + width):
            shift[b, i] = np.inf
            offset[b, i] = 0


def _exact_backward_prepare_layout(q, g, lse, delta, scale, q_t, *args):
    return q_t.shape[0] * q_t.shape[1], q_t.size + args[0].size  # q_t and g_t written


#: :func:`_exact_backward_prepare_jobs` over every query tile, split over the threads.
exact_backward_prepare = Threaded(_exact_backward_prepare_jobs, _exact_backward_prepare_layout)


@jit(nogil=True)
def _exact_backward_reduce_jobs(job_lo, job_hi, dq_t_part, dk_part, dv_part, scale, dq, dk, dv):
    """The gradients from :func:`exact_backward_tiles`' partials, each summed over the
    leading axis in index order (a chain fixed by the shapes), one query tile's rows per
    job (``job = b * T + tile``, the jobs ``job_lo <= job < job_hi``):
    ``dq = scale sum_c dq_t_part[c]`` transposed back, ``dk = scale sum_h dk_part[h]``,
    ``dv = sum_h dv_part[h]``, the padding dropped.
    """
    n_batch, n, d = dq.shape
    dv_dim = dv.shape[2]
    sides = dk_part.shape[0]
    n_tiles, width = dq_t_part.shape[2], dq_t_part.shape[4]
    # Each entry's sum is the chain part 0 + part 1 + ... then the scale, as before; the
    # loops run along contiguous rows (a whole row of parts at a time) so they vectorise,
    # where summing one entry over its parts in the innermost loop read them scalar.
    for job in range(job_lo, job_hi):
        b = job // n_tiles
        tile = job % n_tiles
        i0 = tile * width
        rows = min(n, i0 + width) - i0
        total = np.empty((d, width), dtype=dq.dtype)
        for e in range(d):
            for i in range(width):
                total[e, i] = dq_t_part[0, b, tile, e, i]
            for part in range(1, sides):
                for i in range(width):
                    total[e, i] += dq_t_part[part, b, tile, e, i]
        for i in range(rows):
            for e in range(d):
                dq[b, i0 + i, e] = total[e, i] * scale
        for i in range(i0, i0 + rows):
            for e in range(d):
                dk[b, i, e] = dk_part[0, b, i, e]
            for part in range(1, sides):
                for e in range(d):
                    dk[b, i, e] += dk_part[part, b, i, e]
            for e in range(d):
                dk[b, i, e] *= scale
            for e in range(dv_dim):
                dv[b, i, e] = dv_part[0, b, i, e]
            for part in range(1, sides):
                for e in range(dv_dim):
                    dv[b, i, e] += dv_part[part, b, i, e]


def _exact_backward_reduce_layout(dq_t_part, dk_part, dv_part, scale, dq, dk, dv):
    # every partial read once
    return dq_t_part.shape[1] * dq_t_part.shape[2], dq_t_part.size + dk_part.size + dv_part.size


#: :func:`_exact_backward_reduce_jobs` over every query tile, split over the threads.
exact_backward_reduce = Threaded(_exact_backward_reduce_jobs, _exact_backward_reduce_layout)


# ---------------------------------------------------------------- FMA: blocks over a plan
@jit(nogil=True)
def _block_backward_jobs(
    job_lo, job_hi, q, k, v, q_index, kv_index, q_start, key_bias, has_mask, kc, vc, cbias, seg_lo, seg_hi, segments, col_ptr,
    seg_col, max_keys, block_size, scale, causal, g, lse, delta, run_starts, run_lo, run_hi, parity,
    set_ptr, set_entries, dq, dk, dv, dk_cols, dv_cols,
):
    """Jobs ``job_lo <= job < job_hi`` of :data:`block_backward`, the backward of
    :data:`fmm_attention.cpu.blocks.block_attention` over the same plan.

    For block ``I`` of output entry ``b`` (plan ``p = b``, or ``p = 0`` when shared) the
    plan's segments are gathered as the forward lists them, the near-field token segments
    (:func:`.backward_plan.is_direct`) first and the others after them, each group in
    segment order: token rows of ``k``/``v`` with their mask bias (masked tokens zeroed, as
    the forward does), coarse rows of ``kc``/``vc`` with ``cbias``. As in the forward,
    entry ``b`` reads the queries ``q[q_index[b]]`` and the keys, values, coarse rows and
    key bias of ``kv_index[b]`` (grouped heads and broadcast leading dims copy nothing),
    and query ``i`` sits at key position ``q_start + i``: block rows without a query are
    padding (weight 0). Writes ``dq[b]`` of the block's queries (the far field of coarse
    queries adds to it later), adds the near-field key gradients straight into ``dk``,
    ``dv`` of key set ``kv_index[b]``, and adds the other columns' shares into the run's
    partial rows of ``dk_cols[b]``/``dv_cols[b]`` (:func:`.backward_plan.transpose_plan`:
    run ``r`` owns rows ``col_ptr[p, r] .. col_ptr[p, r + 1] - 1``, stored from row
    ``col_ptr[p, r] - col_ptr[p, run_lo]``, one per target its blocks list, and segment
    ``s`` starts at row ``seg_col[p, s]``): the blocks of a run that list the same coarse
    row add into one partial row, in block order, which :func:`reduce_columns` then sums
    run by run.

    Jobs are (key set, run of blocks), ``job = set * n_runs + i`` for the ``i``-th run
    ``r`` of ``run_lo <= r < run_hi`` with ``r % 2 == parity`` (the threads split the
    jobs), run ``r`` the blocks ``run_starts[r] .. run_starts[r + 1] - 1`` (each holding a
    query), its entries ``set_entries[set_ptr[s] : set_ptr[s + 1]]``. A job walks its blocks
    in order and, per block, its entries in order. A block's near field lies in the rows of
    its neighbours, so two runs of the same parity (a run of at least two blocks between
    them) never write the same rows of ``dk``, ``dv``: no atomics, and each row adds its
    shares in one order fixed by the run grid (set from the shapes, never the threads).

    Layout as in the forward: logits key-major, ``scores[key, query]``, the block's queries
    padded to a multiple of the micro-kernel's panel width, so all five products run on
    :func:`._tiles.gemm_tiles` (no BLAS call per block). Padded query columns get weight 0
    (shift ``+inf``); the key-side products read the queries and cotangents row-major,
    their feature dims padded to the panel width, and the first ``d`` (``dv``) columns are
    kept.
    """
    d = q.shape[2]
    n = k.shape[1]
    dv_dim = v.shape[2]
    shared = seg_lo.shape[0] == 1
    first_run = run_lo + (run_lo + parity) % 2  # the first run of this parity
    n_runs = max(0, (run_hi - first_run + 1) // 2)
    panel = panel_width(q)
    width = -(-block_size // panel) * panel
    d_pad = -(-d // panel) * panel
    dv_pad = -(-dv_dim // panel) * panel
    rows_max = max(max_keys, 1)
    n_q = q.shape[1]
    # work buffers once per call: each thread runs one range of jobs
    keys = np.empty((rows_max, d), dtype=q.dtype)
    vals = np.empty((rows_max, dv_dim), dtype=q.dtype)
    bias = np.empty(rows_max, dtype=q.dtype)
    positions = np.empty(rows_max, dtype=np.int64)
    queries_t = np.zeros((d, width), dtype=q.dtype)  # scaled queries, transposed
    grads_t = np.zeros((dv_dim, width), dtype=q.dtype)  # cotangents, transposed
    queries = np.zeros((width, d_pad), dtype=q.dtype)  # scaled queries, row-major
    cotangents = np.zeros((width, dv_pad), dtype=q.dtype)
    scores = np.empty((rows_max, width), dtype=q.dtype)
    grads = np.empty((rows_max, width), dtype=q.dtype)
    dq_t = np.empty((d, width), dtype=q.dtype)
    dk_buf = np.empty((rows_max, d_pad), dtype=q.dtype)  # key-side shares of the partial columns
    dv_buf = np.empty((rows_max, dv_pad), dtype=q.dtype)
    shift = np.empty(width, dtype=q.dtype)
    offset = np.zeros(width, dtype=q.dtype)
    for job in range(job_lo, job_hi):
        bk = job // n_runs
        run = first_run + 2 * (job % n_runs)
        nk = 0
        n_direct = np.int64(0)
        for slot in range(set_ptr[bk], set_ptr[bk + 1]):  # the run's partial rows start at zero
            b = set_entries[slot]
            p = 0 if shared else b
            for c in range(col_ptr[p, run] - col_ptr[p, run_lo], col_ptr[p, run + 1] - col_ptr[p, run_lo]):
                for e in range(d):
                    dk_cols[b, c, e] = 0
                for e in range(dv_dim):
                    dv_cols[b, c, e] = 0
        for blk in range(run_starts[run], run_starts[run + 1]):
            i0 = blk * block_size
            i1 = min(n, i0 + block_size)
            r0 = max(i0, q_start) - i0  # block rows holding queries: r0 <= row < r1
            r1 = min(i1, q_start + n_q) - i0
            for slot in range(set_ptr[bk], set_ptr[bk + 1]):
                b = set_entries[slot]
                bq = q_index[b]
                p = 0 if shared else b
                if not shared or slot == set_ptr[bk]:  # a shared plan gathers once per block
                    nk = 0
                    # near-field tokens first, then the rest: explicit element loops (a row
                    # slice assignment compiles a broadcast and its shape check per row,
                    # which cost more than the copy itself here)
                    for direct_pass in (True, False):
                        for s in range(seg_lo[p, blk], seg_hi[p, blk]):
                            kind = segments[p, s, 0]
                            start = segments[p, s, 1]
                            count = segments[p, s, 2]
                            if is_direct(kind, start, count, blk, block_size) != direct_pass:
                                continue
                            if kind == TOKEN:
                                for t in range(count):
                                    col = nk + t
                                    positions[col] = start + t
                                    bias[col] = key_bias[bk, start + t] if has_mask else 0.0
                                    live = bias[col] != -np.inf  # masked tokens may hold anything
                                    for e in range(d):
                                        keys[col, e] = k[bk, start + t, e] if live else 0
                                    for e in range(dv_dim):
                                        vals[col, e] = v[bk, start + t, e] if live else 0
                            else:
                                for t in range(count):
                                    col = nk + t
                                    positions[col] = -1
                                    bias[col] = cbias[bk, start + t]
                                    for e in range(d):
                                        keys[col, e] = kc[bk, start + t, e]
                                    for e in range(dv_dim):
                                        vals[col, e] = vc[bk, start + t, e]
                            nk += count
                        if direct_pass:
                            n_direct = nk
                for i in range(width):
                    if r0 <= i < r1:
                        row = i0 + i - q_start
                        for e in range(d):
                            x = q[bq, row, e] * scale
                            queries_t[e, i] = x
                            queries[i, e] = x
                        for e in range(dv_dim):
                            grads_t[e, i] = g[b, row, e]
                            cotangents[i, e] = g[b, row, e]
                        shift[i] = lse[b, row] if lse[b, row] > -np.inf else np.inf
                        offset[i] = delta[b, row]
                    else:  # padding (the last block), or a position without a query: weight 0
                        for e in range(d):
                            queries_t[e, i] = 0
                            queries[i, e] = 0
                        for e in range(dv_dim):
                            grads_t[e, i] = 0
                            cotangents[i, e] = 0
                        shift[i] = np.inf
                        offset[i] = 0
                gemm_tiles(nk, width, d, keys, 0, d, 1, queries_t, 0, width, scores, 0, width, False)
                gemm_tiles(nk, width, dv_dim, vals, 0, dv_dim, 1, grads_t, 0, width, grads, 0, width, False)
                # probabilities from the forward's lse, and dS, in one pass
                weights_and_logit_grads(scores, grads, nk, bias, positions, i0, causal, shift, offset)
                # dq^T[feature, query] = sum over keys of key[key, feature] dS[key, query]
                gemm_tiles(d, width, nk, keys, 0, 1, d, grads, 0, width, dq_t, 0, width, False)
                for i in range(r0, r1):
                    for e in range(d):
                        dq[b, i0 + i - q_start, e] = dq_t[e, i] * scale
                # key-side shares: dS @ (scale q) and P @ g; near-field rows added into
                # dk, dv (straight from the micro-kernel when the feature dims fill whole
                # panels), the others into the run's partial rows
                col0 = col_ptr[p, run_lo]
                s_lo, s_hi = seg_lo[p, blk], seg_hi[p, blk]
                if d == d_pad:
                    _direct_shares(grads, width, queries, d, dk, bk, n, segments, p, s_lo, s_hi, blk, block_size)
                    gemm_tiles(nk - n_direct, d, width, grads, n_direct * width, width, 1, queries, 0, d, dk_buf, 0,
                               d, False)
                    _add_partials(dk_buf, np.int64(0), d, dk_cols, b, col0, seg_col, segments, p, s_lo, s_hi, blk, block_size)
                else:
                    gemm_tiles(nk, d_pad, width, grads, 0, width, 1, queries, 0, d_pad, dk_buf, 0, d_pad, False)
                    _scatter_direct(dk_buf, d, dk, bk, segments, p, s_lo, s_hi, blk, block_size)
                    _add_partials(dk_buf, n_direct, d, dk_cols, b, col0, seg_col, segments, p, s_lo, s_hi, blk,
                                  block_size)
                if dv_dim == dv_pad:
                    _direct_shares(scores, width, cotangents, dv_dim, dv, bk, n, segments, p, s_lo, s_hi, blk,
                                   block_size)
                    gemm_tiles(nk - n_direct, dv_dim, width, scores, n_direct * width, width, 1, cotangents, 0,
                               dv_dim, dv_buf, 0, dv_dim, False)
                    _add_partials(dv_buf, np.int64(0), dv_dim, dv_cols, b, col0, seg_col, segments, p, s_lo, s_hi, blk,
                                  block_size)
                else:
                    gemm_tiles(nk, dv_pad, width, scores, 0, width, 1, cotangents, 0, dv_pad, dv_buf, 0, dv_pad,
                               False)
                    _scatter_direct(dv_buf, dv_dim, dv, bk, segments, p, s_lo, s_hi, blk, block_size)
                    _add_partials(dv_buf, n_direct, dv_dim, dv_cols, b, col0, seg_col, segments, p, s_lo, s_hi,
                                  blk, block_size)


def _block_backward_layout(q, k, v, q_index, kv_index, q_start, key_bias, has_mask, kc, vc, cbias, seg_lo, seg_hi,
                           segments, col_ptr, seg_col, max_keys, block_size, scale, causal, g, lse, delta,
                           run_starts, run_lo, run_hi, parity, set_ptr, *args):
    # jobs: (key set, run of this parity); each block's five products against max_keys keys
    first_run = run_lo + (run_lo + parity) % 2
    n_runs = max(0, (run_hi - first_run + 1) // 2)
    n_jobs = (set_ptr.shape[0] - 1) * n_runs
    blocks = max(1, (int(run_starts[run_hi]) - int(run_starts[run_lo])) // max(1, run_hi - run_lo))
    per_set = max(1, q_index.shape[0] // max(1, set_ptr.shape[0] - 1))
    return n_jobs, n_jobs * blocks * per_set * block_size * max_keys * (q.shape[2] + v.shape[2]) * 5 // 2


#: The backward block kernel: :func:`_block_backward_jobs` split over the threads
#: (:class:`._launch.Threaded`: a serial ``nogil`` kernel, no ``prange`` to compile).
block_backward = Threaded(_block_backward_jobs, _block_backward_layout)


@jit()
def _direct_shares(weights, width, rhs, e_dim, target, bk, n, segments, p, s_lo, s_hi, blk, block_size):
    """``target[bk, rows] += weights[cols] @ rhs`` for each near-field token segment of the
    block (its columns come first in the gather, in segment order)."""
    col = 0
    for s in range(s_lo, s_hi):
        start = segments[p, s, 1]
        count = segments[p, s, 2]
        if is_direct(segments[p, s, 0], start, count, blk, block_size):
            gemm_tiles(count, e_dim, width, weights, col * width, width, 1, rhs, 0, e_dim, target,
                       (bk * n + start) * e_dim, e_dim, True)
            col += count


@jit()
def _scatter_direct(buf, e_dim, target, bk, segments, p, s_lo, s_hi, blk, block_size):
    """The padded-feature case of :func:`_direct_shares`: the shares of all the block's
    columns are in ``buf``; the near-field rows are added to ``target[bk]``."""
    col = 0
    for s in range(s_lo, s_hi):
        start = segments[p, s, 1]
        count = segments[p, s, 2]
        if is_direct(segments[p, s, 0], start, count, blk, block_size):
            for t in range(count):
                for e in range(e_dim):
                    target[bk, start + t, e] += buf[col + t, e]
            col += count


@jit()
def _add_partials(buf, first, e_dim, cols, b, col0, seg_col, segments, p, s_lo, s_hi, blk, block_size):
    """Add the shares of the block's other columns, rows ``first ..`` of ``buf`` in gather
    order (``first = n_direct`` when ``buf`` holds every column's share), into the run's
    partial rows ``cols[b, seg_col[p, s] - col0 ..]`` of each of its segments ``s``."""
    row = first
    for s in range(s_lo, s_hi):
        start = segments[p, s, 1]
        count = segments[p, s, 2]
        if is_direct(segments[p, s, 0], start, count, blk, block_size):
            continue
        c = seg_col[p, s] - col0
        for t in range(count):
            for e in range(e_dim):
                cols[b, c + t, e] += buf[row + t, e]
        row += count


@jit(nogil=True)
def _reduce_columns_jobs(job_lo, job_hi, dk_cols, dv_cols, t_ptr, t_cols, col_lo, col_hi, cursor, n, set_ptr,
                         set_entries, dk, dv, dkc, dvc, first_target):
    """Jobs ``job_lo <= job < job_hi`` of :data:`reduce_columns`: add one slab's key-side
    partials to their targets, in the transposed plan's order.

    Target ``t < n`` is token row ``t`` (added to ``dk``/``dv``), target ``n + r`` is coarse
    row ``r`` (added to ``dkc``/``dvc``), of key set ``s``: the output entries reading it are
    ``set_entries[set_ptr[s] : set_ptr[s + 1]]`` (ascending), and entry ``b``'s partials of
    target ``t`` are the columns ``t_cols[p, t_ptr[p, t] : t_ptr[p, t + 1]]`` of ``dk_cols[b]``
    (ascending, so in block order; ``p = b``, or 0 for a shared plan). The slab holds columns
    ``col_lo[p] <= c < col_hi[p]`` at rows ``c - col_lo[p]``; ``cursor[b, t]`` is the first of
    target ``t``'s columns not yet added, and advances past the slab's (columns of blocks
    before the first slab, which hold no query, are skipped). Slabs run in block order, and
    within a slab the entries of a set in index order, so every target sums its partials
    in one fixed chain, set by the shapes and the plan: never by the thread count. Only
    the targets ``t >= first_target`` are visited (``n`` when no token row has a partial
    column: the near field is added by :func:`block_backward` itself). A job is one
    (key set, target) pair, ``job = set * n_targets + (t - first_target)``: it alone writes
    its target's row.
    """
    d = dk_cols.shape[2]
    e_v = dv_cols.shape[2]
    n_targets = t_ptr.shape[1] - 1 - first_target
    shared = t_ptr.shape[0] == 1
    for job in range(job_lo, job_hi):
        kb = job // n_targets
        t = first_target + job % n_targets
        for slot in range(set_ptr[kb], set_ptr[kb + 1]):
            b = set_entries[slot]
            p = 0 if shared else b
            s = cursor[b, t]
            hi = t_ptr[p, t + 1]
            lo_col = col_lo[p]
            hi_col = col_hi[p]
            while s < hi and t_cols[p, s] < lo_col:
                s += 1
            if t < n:
                while s < hi and t_cols[p, s] < hi_col:
                    c = t_cols[p, s] - lo_col
                    for e in range(d):
                        dk[kb, t, e] += dk_cols[b, c, e]
                    for e in range(e_v):
                        dv[kb, t, e] += dv_cols[b, c, e]
                    s += 1
            else:
                r = t - n
                while s < hi and t_cols[p, s] < hi_col:
                    c = t_cols[p, s] - lo_col
                    for e in range(d):
                        dkc[kb, r, e] += dk_cols[b, c, e]
                    for e in range(e_v):
                        dvc[kb, r, e] += dv_cols[b, c, e]
                    s += 1
            cursor[b, t] = s


def _reduce_columns_layout(dk_cols, dv_cols, t_ptr, t_cols, col_lo, col_hi, cursor, n, set_ptr, *args):
    first_target = args[-1]
    n_jobs = (set_ptr.shape[0] - 1) * (t_ptr.shape[1] - 1 - first_target)
    # every partial row of the slab is read once
    return n_jobs, dk_cols.shape[0] * dk_cols.shape[1] * (dk_cols.shape[2] + dv_cols.shape[2]) + n_jobs


#: The reduction of the key-side partials, on the library's threads (:func:`_reduce_columns_jobs`).
reduce_columns = Threaded(_reduce_columns_jobs, _reduce_columns_layout)


# ---------------------------------------------------------------- coarsening adjoints
@jit(nogil=True)
def _mean_downward_jobs(job_lo, job_hi, valid, has_mask, sub_sizes, offsets, counts, dkc, dvc, dk, dv):
    """Jobs ``job_lo <= job < job_hi`` of :data:`mean_downward`, the adjoint of
    :func:`fmm_attention.cpu.upward.mean_upward` (a downward pass).

    A coarse row is the mean of the valid tokens of its sub-box, so each of them receives
    ``d(row) / count``. Sub-boxes nest, so all tokens of one level-1 sub-box receive the
    same total over the levels: one job per (key set, level-1 sub-box),
    ``job = b * n_groups + r``, sums its rows' shares level by level and adds the total to
    each of its valid tokens (rows no other job writes).
    """
    n_batch, n, d = dk.shape
    e_v = dv.shape[2]
    n_levels = sub_sizes.size
    size = sub_sizes[0]
    n_groups = (n + size - 1) // size
    share_k = np.empty(d, dtype=dk.dtype)
    share_v = np.empty(e_v, dtype=dv.dtype)
    for job in range(job_lo, job_hi):
        b = job // n_groups
        r = job % n_groups
        first = r * size
        for e in range(d):  # loops, not slice assignments: no shape check to compile
            share_k[e] = 0
        for e in range(e_v):
            share_v[e] = 0
        for level in range(n_levels):
            row = offsets[level] + first // sub_sizes[level]
            count = counts[b, row]
            if count > 0:
                inv = 1.0 / count
                for e in range(d):
                    share_k[e] += dkc[b, row, e] * inv
                for e in range(e_v):
                    share_v[e] += dvc[b, row, e] * inv
        for t in range(first, min(n, first + size)):
            if has_mask and not valid[b, t]:
                continue
            for e in range(d):
                dk[b, t, e] += share_k[e]
            for e in range(e_v):
                dv[b, t, e] += share_v[e]


def _mean_downward_layout(valid, has_mask, sub_sizes, offsets, counts, dkc, dvc, dk, dv):
    n_batch, n, _ = dk.shape
    size = int(sub_sizes[0])
    return n_batch * -(-n // size), dk.size + dv.size  # one add per gradient entry


#: The mean coarsening's adjoint, on the library's threads (:func:`_mean_downward_jobs`).
mean_downward = Threaded(_mean_downward_jobs, _mean_downward_layout)


@jit(nogil=True)
def _cluster_downward_jobs(job_lo, job_hi, valid, has_mask, box_sizes, ranks, offsets, labels, parents, counts, dkc,
                           dvc, dk, dv):
    """Adjoint of :func:`fmm_attention.cpu.cluster.cluster_groups` with its groups held fixed,
    jobs (tokens of all batch entries) ``job_lo <= job < job_hi``.

    Every coarse row is the mean of the tokens of its group, so each of them receives
    ``d(row) / count``. A token's row is ``labels`` at the token-level levels (its slot in
    its box) and follows ``parents`` from the row below above them; each job sums its
    token's shares level by level (tokens are independent: no atomics).
    """
    n_batch, n, d = dk.shape
    e_v = dv.shape[2]
    n_levels = box_sizes.size
    n_flat = labels.shape[1]
    for job in range(job_lo, job_hi):
        b = job // n
        t = job % n
        if has_mask and not valid[b, t]:
            continue
        row = 0
        for level in range(n_levels):
            if level < n_flat:
                row = offsets[level] + (t // box_sizes[level]) * ranks[level] + labels[b, level, t]
            else:
                row = parents[b, row]
            inv = 1.0 / counts[b, row]
            for e in range(d):
                dk[b, t, e] += dkc[b, row, e] * inv
            for e in range(e_v):
                dv[b, t, e] += dvc[b, row, e] * inv


def _cluster_downward_layout(valid, has_mask, box_sizes, ranks, offsets, labels, parents, counts, dkc, dvc, dk, dv):
    n_batch, n, d = dk.shape
    return n_batch * n, n_batch * n * box_sizes.size * (d + dv.shape[2])  # each token: one row per level


#: ``cluster_downward(valid, has_mask, box_sizes, ranks, offsets, labels, parents, counts, dkc, dvc,
#: dk, dv)``: :func:`_cluster_downward_jobs` over every token, split over the threads.
cluster_downward = Threaded(_cluster_downward_jobs, _cluster_downward_layout)


@jit(nogil=True)
def _learned_downward_jobs(job_lo, job_hi, weights_t, valid, has_mask, box_size, rank, offset, tokens_per_job, dout,
                           dx):
    """Adjoint of :func:`fmm_attention.cpu.upward.learned_upward_level` for its input, jobs
    ``job_lo <= job < job_hi``: the transposed grouped convolution ``dx[c*w + u, e] += sum_t
    W[e*r + t, u] dout[c*r + t, e]`` (valid tokens only; padded and masked tokens entered as
    zeros).

    ``weights_t`` is ``W`` transposed, ``(w, r*d)``: a token reads one contiguous row (in
    ``W`` its ``r*d`` weights lie a row apart, one cache line each, and the top levels'
    weights are megabytes). Jobs are runs of ``tokens_per_job`` tokens, not boxes, so the
    few huge boxes of the top levels still spread over the threads; tokens are independent.
    """
    n_batch, n, d = dx.shape
    n_runs = (n + tokens_per_job - 1) // tokens_per_job
    for job in range(job_lo, job_hi):
        b = job // n_runs
        lo = (job % n_runs) * tokens_per_job
        for t in range(lo, min(n, lo + tokens_per_job)):
            if has_mask and not valid[b, t]:
                continue
            c = t // box_size
            u = t - c * box_size
            for e in range(d):
                acc = dx.dtype.type(0)
                for s in range(rank):
                    acc += weights_t[u, e * rank + s] * dout[b, offset + c * rank + s, e]
                dx[b, t, e] += acc


def _learned_downward_layout(weights_t, valid, has_mask, box_size, rank, offset, tokens_per_job, dout, dx):
    n_batch, n, d = dx.shape
    return n_batch * -(-n // tokens_per_job), n_batch * n * d * rank


#: ``learned_downward_level(weights_t, valid, has_mask, box_size, rank, offset, tokens_per_job,
#: dout, dx)``: :func:`_learned_downward_jobs` over every run of tokens, split over the threads.
learned_downward_level = Threaded(_learned_downward_jobs, _learned_downward_layout)


@jit(nogil=True)
def _learned_weight_grad_jobs(job_lo, job_hi, x_t, valid, has_mask, box_size, rank, offset, dout, dw, dbias):
    """Weight and bias gradients of one level's grouped convolution (Conv1d layout rows),
    jobs (weight rows) ``job_lo <= job < job_hi``:
    ``dw[e*r + t, u] = sum_{b, c} dout[b, c*r + t, e] x[b, c*w + u, e]`` over valid tokens,
    ``dbias[e*r + t] = sum_{b, c} dout[b, c*r + t, e]``; one weight row per job, summed over
    ``b`` then ``c`` in order. ``x_t`` is ``x`` transposed, ``(B, d, n)``: a job reads one
    feature of every token, contiguous there (in ``x`` each read was a cache line of its own).
    """
    n_batch, d, n = x_t.shape
    n_boxes = (n + box_size - 1) // box_size
    for w_row in range(job_lo, job_hi):
        e = w_row // rank
        t = w_row % rank
        for u in range(dw.shape[1]):
            dw[w_row, u] = 0
        total = dw.dtype.type(0)
        for b in range(n_batch):
            for c in range(n_boxes):
                grad = dout[b, offset + c * rank + t, e]
                total += grad
                first = c * box_size
                for u in range(min(n, first + box_size) - first):
                    if has_mask and not valid[b, first + u]:
                        continue
                    dw[w_row, u] += grad * x_t[b, e, first + u]
        dbias[w_row] = total


def _learned_weight_grad_layout(x_t, valid, has_mask, box_size, rank, offset, dout, dw, dbias):
    n_batch, d, n = x_t.shape
    return d * rank, n_batch * n * d * rank  # each weight row: one product per token of its feature


#: ``learned_weight_grad(x_t, valid, has_mask, box_size, rank, offset, dout, dw, dbias)``:
#: :func:`_learned_weight_grad_jobs` over every weight row, split over the threads.
learned_weight_grad = Threaded(_learned_weight_grad_jobs, _learned_weight_grad_layout)
