"""Adaptive refinement on the CPU (``refine > 0``): which coarse boxes each block splits.

For each query block, :func:`refine_plans` scores the coarse segments of its plan by the
estimated benefit of replacing a box by its sub-boxes (:func:`_split_benefit`: the
first-order change of the block's softmax output) and rewrites the plan with
the best splits within the budget, deterministically.
"""

import numpy as np
from numba import prange

from ..tree import COARSE, TOKEN
from ._jit import dot as _dot
from ._jit import jit

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
