"""Fast Multipole Attention on the CPU: upward pass, block attention, coarse-query pass.

The tree (:mod:`fmm_attention.tree`) hands every query block a *key plan*: segments of
exact tokens and of coarse-buffer rows. The block kernel scores the whole block against
all of them (token runs in place, coarse rows gathered; products on the micro-kernel of
:mod:`._tiles`) and takes one joint softmax per query, so near and far field share a
single max and denominator as the spec requires.
"""

import numpy as np
from numba import prange

from ..tree import COARSE, TOKEN
from ._blocks import jit, softmax_columns
from ._tiles import gemm_tiles, panel_width


# ---------------------------------------------------------------- upward pass (coarsening)
@jit(parallel=True)
def mean_upward(k, v, valid, has_mask, sub_sizes, offsets, n_rows, count_scaling, kc, vc, cbias, counts):
    """Mean coarsening of every level in one O(n d) upward pass.

    Level 1 averages tokens; each later level either reuses the previous level's sub-boxes
    (same sub-box size, more slots) or merges pairs of them, weighted by their counts.
    Rows with no valid token get zero keys/values and bias ``-inf``.
    """
    n_batch, n, d = k.shape
    dv = v.shape[2]
    for level in range(sub_sizes.size):
        size = sub_sizes[level]
        start = offsets[level]
        for job in prange(n_batch * n_rows[level]):
            b = job // n_rows[level]
            g = job % n_rows[level]
            row = start + g
            # explicit loops over channels: row expressions like kc[b, row] += k[b, t]
            # allocate a temporary per token in compiled code
            if level == 0:
                kc[b, row] = 0
                vc[b, row] = 0
                count = 0
                for t in range(g * size, min(n, (g + 1) * size)):
                    if has_mask and not valid[b, t]:
                        continue
                    count += 1
                    for e in range(d):
                        kc[b, row, e] += k[b, t, e]
                    for e in range(dv):
                        vc[b, row, e] += v[b, t, e]
                if count > 0:
                    inv = 1.0 / count
                    for e in range(d):
                        kc[b, row, e] *= inv
                    for e in range(dv):
                        vc[b, row, e] *= inv
            elif sub_sizes[level - 1] == size:
                prev = offsets[level - 1] + g
                kc[b, row] = kc[b, prev]
                vc[b, row] = vc[b, prev]
                count = counts[b, prev]
            else:
                left = offsets[level - 1] + 2 * g
                c0 = counts[b, left]
                c1 = counts[b, left + 1]
                count = c0 + c1
                if count > 0:
                    w0 = c0 / count
                    w1 = c1 / count
                    for e in range(d):
                        kc[b, row, e] = w0 * kc[b, left, e] + w1 * kc[b, left + 1, e]
                    for e in range(dv):
                        vc[b, row, e] = w0 * vc[b, left, e] + w1 * vc[b, left + 1, e]
                else:
                    kc[b, row] = 0
                    vc[b, row] = 0
            counts[b, row] = count
            if count == 0:
                cbias[b, row] = -np.inf
            elif count_scaling:
                cbias[b, row] = np.log(count)
            else:
                cbias[b, row] = 0


@jit(parallel=True)
def learned_upward_level(x, valid, has_mask, weights, bias, box_size, rank, offset, out):
    """Grouped-convolution coarsening of one level for one of keys or values.

    ``out[b, offset + c*rank + t, e] = sum_u weights[e*rank + t, u] * x[b, c*box_size + u, e]
    + bias[e*rank + t]`` with padded and masked tokens entering as zeros.
    """
    n_batch, n, d = x.shape
    n_boxes = (n + box_size - 1) // box_size  # boxes of padding only are never planned
    for job in prange(n_batch * n_boxes):
        b = job // n_boxes
        c = job % n_boxes
        first = c * box_size
        last = min(n, first + box_size)
        for t in range(rank):
            row = offset + c * rank + t
            for e in range(d):
                w_row = e * rank + t
                acc = bias[w_row]
                for u in range(last - first):
                    if has_mask and not valid[b, first + u]:
                        continue
                    acc += weights[w_row, u] * x[b, first + u, e]
                out[b, row, e] = acc


@jit(parallel=True)
def box_counts_bias(valid, has_mask, n, box_size, rank, offset, count_scaling, kc, vc, cbias):
    """Bias ``log(valid(box) / rank)`` (or 0) of the learned coarse keys; masks empty boxes."""
    n_batch = cbias.shape[0]
    n_boxes = (n + box_size - 1) // box_size
    for job in prange(n_batch * n_boxes):
        b = job // n_boxes
        c = job % n_boxes
        first = c * box_size
        last = min(n, first + box_size)
        count = 0
        for t in range(first, last):
            if not has_mask or valid[b, t]:
                count += 1
        for t in range(rank):
            row = offset + c * rank + t
            if count == 0:
                cbias[b, row] = -np.inf
                kc[b, row] = 0  # keep masked rows finite: 0 * nan would poison the products
                vc[b, row] = 0
            elif count_scaling:
                cbias[b, row] = np.log(count / rank)
            else:
                cbias[b, row] = 0


# ---------------------------------------------------------------- block attention
@jit(parallel=True)
def block_attention(
    q, k, v, key_bias, has_mask, kc, vc, cbias, seg_lo, seg_hi, segments, max_keys, block_size,
    scale, causal, inherit, inh_max, inh_sum, inh_num, n_chunks, out, lse,
):
    """Joint softmax of every query block over its planned keys.

    For block ``I`` of batch entry ``b`` the plan rows ``segments[p, seg_lo[p, I]:seg_hi[p, I]]``
    (``p = b`` for per-entry plans, ``p = 0`` for a shared plan) name token rows of
    ``k``/``v`` and coarse rows of ``kc``/``vc``. Token runs are scored and applied straight
    from ``k`` and ``v`` (no copy); coarse rows, and tokens when a key mask is present
    (masked keys may hold NaN, so they are copied and zeroed), are gathered into one small
    buffer. All columns share one joint softmax per query.

    Scores are laid out key-major, ``scores[key, query]``, with the block's queries padded
    to a multiple of the micro-kernel's panel width (:mod:`._tiles`): both products then
    read keys and values a row at a time straight from their source, the softmax runs
    along contiguous rows for a whole block of queries at once, and the weighted values
    come out as ``out_t[feature, query]``, normalised on the way into ``out``. With
    ``inherit`` (coarse queries) the block's far field arrives as a ready partial
    ``(inh_max, inh_sum, inh_num)`` and is merged into the same softmax. Work buffers are
    allocated once per chunk of blocks (``n_chunks`` chunks, a few per thread).
    """
    n_batch, n, d = q.shape
    dv = v.shape[2]
    n_blocks = seg_lo.shape[1]
    shared = seg_lo.shape[0] == 1
    n_jobs = n_batch * n_blocks
    max_segments = np.max(seg_hi - seg_lo)
    n_chunks = max(1, min(n_jobs, n_chunks))
    panel = panel_width(q)
    width = -(-block_size // panel) * panel  # queries per block, padded
    for chunk in prange(n_chunks):
        gathered_keys = np.empty((max_keys, d), dtype=q.dtype)
        gathered_vals = np.empty((max_keys, dv), dtype=q.dtype)
        bias = np.empty(max_keys, dtype=q.dtype)
        positions = np.empty(max_keys, dtype=np.int64)
        queries_t = np.zeros((d, width), dtype=q.dtype)  # scaled queries, transposed
        scores = np.empty((max_keys, width), dtype=q.dtype)
        out_t = np.empty((dv, width), dtype=q.dtype)
        col_max = np.empty(width, dtype=q.dtype)
        col_sum = np.empty(width, dtype=q.dtype)
        shift = np.empty(width, dtype=q.dtype)
        runs = np.empty((max(max_segments, 1), 2), dtype=np.int64)  # direct token runs: start, count
        prev = np.empty((max(max_segments, 1), 4), dtype=np.int64)  # last job's gathered segments
        n_prev = 0
        for job in range(chunk * n_jobs // n_chunks, (chunk + 1) * n_jobs // n_chunks):
            b = job // n_blocks
            blk = job % n_blocks
            p = 0 if shared else b
            i0 = blk * block_size
            i1 = min(n, i0 + block_size)
            rows = i1 - i0
            # Keys: the gathered rows first, then the direct token runs. Segments are
            # gathered last to first (coarsest level first), so consecutive blocks of a
            # chunk share a prefix (blocks of one level-l box share levels >= l) that is
            # already in place and is not copied again.
            n_gathered = 0
            n_slots = 0
            same_prefix = True
            for s in range(seg_hi[p, blk] - 1, seg_lo[p, blk] - 1, -1):
                kind = segments[p, s, 0]
                start = segments[p, s, 1]
                count = segments[p, s, 2]
                if kind == TOKEN and not has_mask:
                    continue
                same_prefix = (
                    same_prefix and n_slots < n_prev and prev[n_slots, 0] == b and prev[n_slots, 1] == kind
                    and prev[n_slots, 2] == start and prev[n_slots, 3] == count
                )
                prev[n_slots, 0] = b
                prev[n_slots, 1] = kind
                prev[n_slots, 2] = start
                prev[n_slots, 3] = count
                n_slots += 1
                if same_prefix:
                    n_gathered += count
                    continue
                if kind == TOKEN:
                    gathered_keys[n_gathered : n_gathered + count] = k[b, start : start + count]
                    gathered_vals[n_gathered : n_gathered + count] = v[b, start : start + count]
                    for t in range(count):
                        col = n_gathered + t
                        positions[col] = start + t
                        bias[col] = key_bias[b, start + t]
                        if bias[col] == -np.inf:  # masked tokens may hold anything: zero them
                            gathered_keys[col] = 0
                            gathered_vals[col] = 0
                else:
                    gathered_keys[n_gathered : n_gathered + count] = kc[b, start : start + count]
                    gathered_vals[n_gathered : n_gathered + count] = vc[b, start : start + count]
                    for t in range(count):
                        positions[n_gathered + t] = -1
                        bias[n_gathered + t] = cbias[b, start + t]
                n_gathered += count
            n_prev = n_slots
            nk = n_gathered
            n_runs = 0
            if not has_mask:
                for s in range(seg_lo[p, blk], seg_hi[p, blk]):
                    if segments[p, s, 0] == TOKEN:
                        start = segments[p, s, 1]
                        count = segments[p, s, 2]
                        runs[n_runs, 0] = start
                        runs[n_runs, 1] = count
                        n_runs += 1
                        for t in range(count):
                            positions[nk + t] = start + t
                            bias[nk + t] = 0
                        nk += count
            for i in range(rows):
                for e in range(d):
                    queries_t[e, i] = q[b, i0 + i, e] * scale
            if rows < width:  # the last block: padding queries score 0 and are never written
                queries_t[:, rows:] = 0
            # scores[key, query], gathered keys then token runs (row offsets into k)
            gemm_tiles(n_gathered, width, d, gathered_keys, 0, d, 1, queries_t, 0, width, scores, 0, width, False)
            key = n_gathered
            for r in range(n_runs):
                start = runs[r, 0]
                count = runs[r, 1]
                gemm_tiles(count, width, d, k, (b * n + start) * d, d, 1, queries_t, 0, width,
                           scores, key * width, width, False)
                key += count
            floor_max = inh_max[b, blk] if inherit else -np.inf
            softmax_columns(scores, nk, bias, positions, i0, causal, floor_max, col_max, shift, col_sum)
            # out_t[feature, query] = sum over keys of value[key, feature] * weight[key, query]
            gemm_tiles(dv, width, n_gathered, gathered_vals, 0, 1, dv, scores, 0, width, out_t, 0, width, False)
            key = n_gathered
            for r in range(n_runs):
                start = runs[r, 0]
                count = runs[r, 1]
                gemm_tiles(dv, width, count, v, (b * n + start) * dv, 1, dv, scores, key * width, width,
                           out_t, 0, width, True)
                key += count
            for i in range(rows):
                total = col_sum[i]
                carry = 0.0
                if inherit and inh_max[b, blk] > -np.inf:
                    carry = np.exp(inh_max[b, blk] - col_max[i])
                    total += carry * inh_sum[b, blk]
                if total > 0:
                    inv = 1.0 / total
                    for e in range(dv):
                        extra = carry * inh_num[b, blk, e] if inherit else 0.0
                        out[b, i0 + i, e] = (out_t[e, i] + extra) * inv
                    lse[b, i0 + i] = col_max[i] + np.log(total)
                else:
                    out[b, i0 + i] = 0
                    lse[b, i0 + i] = -np.inf


# ---------------------------------------------------------------- coarse queries (O(n))
@jit()
def _dot(a, b):
    total = a.dtype.type(0)
    for e in range(a.size):
        total += a[e] * b[e]
    return total


@jit(parallel=True)
def coarse_queries(q, valid, has_mask, box_sizes, box_offset, qc, q_count):
    """Mean of the valid queries of every box at every level, by count-weighted pairwise merging.

    Valid queries are the real positions (``< n``) that ``valid`` marks (all real positions
    without ``has_mask``): a masked or padded position's query never enters a mean.
    ``q_count`` receives each box's number of valid queries; a box with none gets a zero
    coarse query and is skipped by :func:`far_partials`.
    """
    n_batch, n, d = q.shape
    for level in range(box_sizes.size):
        n_boxes = box_offset[level + 1] - box_offset[level]
        size = box_sizes[level]
        for job in prange(n_batch * n_boxes):
            b = job // n_boxes
            c = job % n_boxes
            row = box_offset[level] + c
            qc[b, row] = 0
            if level == 0:
                count = 0
                for t in range(c * size, min(n, (c + 1) * size)):
                    if has_mask and not valid[b, t]:
                        continue
                    count += 1
                    for e in range(d):  # a row expression would allocate per token
                        qc[b, row, e] += q[b, t, e]
                if count > 0:
                    for e in range(d):
                        qc[b, row, e] /= count
            else:
                left = box_offset[level - 1] + 2 * c
                c0 = q_count[b, left]
                c1 = q_count[b, left + 1]
                count = c0 + c1
                if count > 0:
                    for e in range(d):
                        qc[b, row, e] = (c0 * qc[b, left, e] + c1 * qc[b, left + 1, e]) / count
            q_count[b, row] = count


@jit(parallel=True)
def far_partials(qc, q_count, kc, vc, cbias, box_offset, box_ranks, interactions, scale, part_max, part_sum,
                 part_num):
    """Far-field softmax partial ``(max, sum, numerator)`` of every coarse query box.

    A box with no valid query (``q_count == 0``) gets the empty partial ``(-inf, 0, 0)``:
    it contributes nothing, and its (masked or padded) queries keep only what they
    inherit from larger boxes and their own near field.
    """
    n_batch = qc.shape[0]
    n_total = interactions.shape[0]
    for job in prange(n_batch * n_total):
        b = job // n_total
        row = job % n_total
        level = 0
        while box_offset[level + 1] <= row:
            level += 1
        rank = box_ranks[level]
        mx = -np.inf
        for slot in range(3 if q_count[b, row] > 0 else 0):
            start = interactions[row, slot]
            if start < 0:
                continue
            for t in range(rank):
                x = scale * _dot(qc[b, row], kc[b, start + t]) + cbias[b, start + t]
                mx = max(mx, x)
        part_max[b, row] = mx
        part_sum[b, row] = 0
        part_num[b, row] = 0
        if mx == -np.inf:
            continue
        for slot in range(3):
            start = interactions[row, slot]
            if start < 0:
                continue
            for t in range(rank):
                x = scale * _dot(qc[b, row], kc[b, start + t]) + cbias[b, start + t]
                w = np.exp(x - mx)
                part_sum[b, row] += w
                part_num[b, row] += w * vc[b, start + t]


@jit(parallel=True)
def downward_pass(box_offset, part_max, part_sum, part_num):
    """Merge each box's partial with its parent's accumulated one, top level down."""
    n_batch = part_max.shape[0]
    n_levels = box_offset.size - 1
    for level in range(n_levels - 2, -1, -1):
        n_boxes = box_offset[level + 1] - box_offset[level]
        for job in prange(n_batch * n_boxes):
            b = job // n_boxes
            c = job % n_boxes
            row = box_offset[level] + c
            parent = box_offset[level + 1] + c // 2
            pm = part_max[b, parent]
            if pm == -np.inf:
                continue
            mx = max(part_max[b, row], pm)
            own = np.exp(part_max[b, row] - mx) if part_max[b, row] > -np.inf else 0.0
            inherited = np.exp(pm - mx)
            part_sum[b, row] = own * part_sum[b, row] + inherited * part_sum[b, parent]
            part_num[b, row] = own * part_num[b, row] + inherited * part_num[b, parent]
            part_max[b, row] = mx


# ---------------------------------------------------------------- adaptive refinement
@jit(parallel=True)
def refine_plans(
    q, k, v, kc, vc, cbias, token_bias, is_global, ptr, segments, level_offset, level_rank, level_box,
    block_size, scale, causal, budget, capacity, room, seg_lo, seg_hi, out_segments,
):
    """Per (entry, block) plans with the far boxes that matter most split finer.

    The block's queries score the base plan once (max, normaliser, output ``o_i``). Each far
    box's *benefit* is the first-order change its split would make to the block's outputs,
    ``sum_i ||dnum_i - o_i dden_i|| / Z_i``, where ``dnum``/``dden`` are the children's
    softmax numerator/denominator contributions minus the box's own. Repeatedly the alive
    far box of largest benefit (ties: earliest in the plan) is replaced by its two children
    one level finer (a level-1 box by its exact tokens), as long as the extra keys fit in
    ``budget``.
    Children of a causal far box lie in the past too. Causal blocks are scored with the
    previous block's queries, so no choice depends on a position after any of the block's
    own queries. Global tokens (``is_global``) are never emitted again by a split.

    Masked tokens (``token_bias == -inf``; the key mask marks tokens) take no part: their
    queries do not score, a split costs only the *live* keys it adds (valid tokens, coarse
    rows with a valid token) minus the live keys it removes, boxes with no live key are
    dropped from the plan and never split, and a level-1 split emits only valid tokens.
    So a padded sequence refines exactly as the same sequence unpadded. At most ``room``
    candidates are added per block beyond its live base segments (``capacity`` bounds the
    segments of one block).
    """
    n_batch, n, _ = q.shape
    n_blocks = ptr.size - 1
    n_levels = level_offset.size
    for job in prange(n_batch * n_blocks):
        b = job // n_blocks
        blk = job % n_blocks
        i0 = blk * block_size
        i1 = min(n, i0 + block_size)
        # queries that score the plan: the block's own, or (causal) the previous block's
        s0 = max(0, i0 - block_size) if causal else i0
        s1 = i0 if causal else i1
        rows = s1 - s0
        queries = q[b, s0:s1] * scale
        # ---- base plan: per-query max, normaliser and output, from its logits scored once
        lo = ptr[blk]
        hi = ptr[blk + 1]
        n_plan = 0
        for s in range(lo, hi):
            n_plan += segments[s, 2]
        logits = np.full((rows, n_plan), -np.inf)
        column_is_token = np.empty(n_plan, dtype=np.bool_)
        column_row = np.empty(n_plan, dtype=np.int64)  # row of k/v (token) or kc/vc (coarse)
        col = 0
        for s in range(lo, hi):
            for t in range(segments[s, 2]):
                column_is_token[col] = segments[s, 0] == TOKEN
                column_row[col] = segments[s, 1] + t
                col += 1
        for col in range(n_plan):
            row = column_row[col]
            for i in range(rows):
                if token_bias[b, s0 + i] == -np.inf:  # a masked query scores nothing
                    continue
                if column_is_token[col]:
                    if token_bias[b, row] == -np.inf or (causal and row > s0 + i):
                        continue
                    logits[i, col] = _dot(queries[i], k[b, row])
                elif cbias[b, row] > -np.inf:
                    logits[i, col] = _dot(queries[i], kc[b, row]) + cbias[b, row]
        row_max = np.full(rows, -np.inf)
        row_sum = np.zeros(rows)
        base_out = np.zeros((rows, v.shape[2]))
        for i in range(rows):
            for c in range(n_plan):
                row_max[i] = max(row_max[i], logits[i, c])
            if row_max[i] == -np.inf:
                continue
            for c in range(n_plan):
                logits[i, c] = np.exp(logits[i, c] - row_max[i])
                row_sum[i] += logits[i, c]
        for col in range(n_plan):
            if column_is_token[col]:
                if token_bias[b, column_row[col]] == -np.inf:  # weight 0, value may be NaN: 0 * nan
                    continue
                values = v[b, column_row[col]]
            else:
                if cbias[b, column_row[col]] == -np.inf:
                    continue
                values = vc[b, column_row[col]]
            for i in range(rows):
                if row_sum[i] == 0:
                    continue
                w = logits[i, col] / row_sum[i]
                for e in range(values.size):
                    base_out[i, e] += w * values[e]
        # ---- candidates: (kind, start, count, level, alive, mass)
        num = np.empty((rows, v.shape[2]))
        den = np.empty(rows)
        no_skip = np.zeros(1, dtype=np.bool_)
        cand = np.zeros((capacity, 4), dtype=np.int64)
        alive = np.zeros(capacity, dtype=np.bool_)
        mass = np.zeros(capacity)
        nc = 0
        for s in range(lo, hi):
            if segments[s, 0] != TOKEN and _live_rows(cbias, b, segments[s, 1], segments[s, 2]) == 0:
                continue  # every key of the box is masked: it contributes nothing, costs nothing
            cand[nc, 0] = segments[s, 0]
            cand[nc, 1] = segments[s, 1]
            cand[nc, 2] = segments[s, 2]
            cand[nc, 3] = 0
            if segments[s, 0] != TOKEN:
                level = 0
                while level + 1 < n_levels and level_offset[level + 1] <= segments[s, 1]:
                    level += 1
                cand[nc, 3] = level + 1
                mass[nc] = _split_benefit(
                    queries, row_max, row_sum, base_out, k, v, token_bias, kc, vc, cbias, is_global, b,
                    level, segments[s, 1], segments[s, 2], level_offset, level_rank, level_box, num, den, no_skip,
                )
            alive[nc] = True
            nc += 1
        n_base = nc
        spent = 0
        blocked = np.zeros(capacity, dtype=np.bool_)
        while True:
            best = -1
            for c in range(nc):
                if alive[c] and not blocked[c] and cand[c, 3] > 0 and (best < 0 or mass[c] > mass[best]):
                    best = c
            if best < 0:
                break
            level = cand[best, 3] - 1
            box = (cand[best, 1] - level_offset[level]) // level_rank[level]
            width = level_box[level]
            if level_rank[level] >= width:  # already exact: one coarse key per token
                blocked[best] = True
                continue
            cost = -_live_rows(cbias, b, cand[best, 1], cand[best, 2])
            if level == 0:
                first = box * width
                for t in range(first, min(n, first + width)):
                    if not is_global[t] and token_bias[b, t] > -np.inf:
                        cost += 1
            else:
                for child in (2 * box, 2 * box + 1):
                    if child * level_box[level - 1] < n:
                        start = level_offset[level - 1] + child * level_rank[level - 1]
                        cost += _live_rows(cbias, b, start, level_rank[level - 1])
            if spent + cost > budget or nc - n_base + width + 2 > room:
                blocked[best] = True
                continue
            spent += cost
            alive[best] = False
            if level == 0:  # the box's valid tokens, as runs between global and masked tokens
                first = box * width
                t = first
                end = min(n, first + width)
                while t < end:
                    if is_global[t] or token_bias[b, t] == -np.inf:
                        t += 1
                        continue
                    run = t
                    while run < end and not is_global[run] and token_bias[b, run] > -np.inf:
                        run += 1
                    cand[nc, 0] = TOKEN
                    cand[nc, 1] = t
                    cand[nc, 2] = run - t
                    cand[nc, 3] = 0
                    alive[nc] = True
                    nc += 1
                    t = run
            else:
                for child in (2 * box, 2 * box + 1):
                    if child * level_box[level - 1] >= n:
                        continue
                    start = level_offset[level - 1] + child * level_rank[level - 1]
                    if _live_rows(cbias, b, start, level_rank[level - 1]) == 0:
                        continue  # a child with every key masked is left out
                    cand[nc, 0] = COARSE
                    cand[nc, 1] = start
                    cand[nc, 2] = level_rank[level - 1]
                    cand[nc, 3] = level
                    mass[nc] = _split_benefit(
                        queries, row_max, row_sum, base_out, k, v, token_bias, kc, vc, cbias, is_global, b,
                        level - 1, start, level_rank[level - 1], level_offset, level_rank, level_box, num, den, no_skip,
                    )
                    alive[nc] = True
                    nc += 1
        out_lo = blk * capacity
        count = 0
        for c in range(nc):
            if alive[c]:
                out_segments[b, out_lo + count, 0] = cand[c, 0]
                out_segments[b, out_lo + count, 1] = cand[c, 1]
                out_segments[b, out_lo + count, 2] = cand[c, 2]
                count += 1
        seg_lo[b, blk] = out_lo
        seg_hi[b, blk] = out_lo + count


@jit()
def _live_rows(cbias, b, start, count):
    """Coarse rows ``start:start+count`` of entry ``b`` that hold a valid token (bias > -inf)."""
    live = 0
    for t in range(start, start + count):
        if cbias[b, t] > -np.inf:
            live += 1
    return live


@jit()
def _add_softmax_terms(queries, row_max, keys, vals, bias, b, start, count, skip, sign, num, den):
    """``num[i] += sign * sum_t exp(x_it - M_i) vals[t]`` and likewise ``den`` over rows ``start:start+count``."""
    for t in range(start, start + count):
        if bias[b, t] == -np.inf or (skip.size > 1 and skip[t]):
            continue
        for i in range(queries.shape[0]):
            if row_max[i] == -np.inf:
                continue
            w = sign * np.exp(_dot(queries[i], keys[b, t]) + bias[b, t] - row_max[i])
            den[i] += w
            for e in range(vals.shape[2]):  # a row expression would allocate per term
                num[i, e] += w * vals[b, t, e]


@jit()
def _split_benefit(queries, row_max, row_sum, base_out, k, v, token_bias, kc, vc, cbias, is_global, b,
                   level, start, count, level_offset, level_rank, level_box, num, den, no_skip):
    """First-order change of the block's outputs if far box ``(level, start)`` were split.

    ``num`` (rows, dv) and ``den`` (rows,) are work buffers, ``no_skip`` a length-1 array.
    """
    rows = queries.shape[0]
    num[:] = 0
    den[:] = 0
    _add_softmax_terms(queries, row_max, kc, vc, cbias, b, start, count, no_skip, -1.0, num, den)
    box = (start - level_offset[level]) // level_rank[level]
    if level == 0:
        first = box * level_box[0]
        last = min(k.shape[1], first + level_box[0])
        _add_softmax_terms(queries, row_max, k, v, token_bias, b, first, last - first, is_global, 1.0, num, den)
    else:
        child_rank = level_rank[level - 1]
        for child in (2 * box, 2 * box + 1):
            if child * level_box[level - 1] < k.shape[1]:
                child_start = level_offset[level - 1] + child * child_rank
                _add_softmax_terms(queries, row_max, kc, vc, cbias, b, child_start, child_rank, no_skip, 1.0, num, den)
    total = 0.0
    for i in range(rows):
        if row_sum[i] > 0:
            change = 0.0
            for e in range(num.shape[1]):
                diff = num[i, e] - base_out[i, e] * den[i]
                change += diff * diff
            total += np.sqrt(change) / row_sum[i]
    return total
