"""Adaptive refinement on the CPU (``refine > 0``): which coarse boxes each block splits.

For each query block, :func:`refine_plans` scores the coarse segments of its plan by the
estimated benefit of replacing a box by its sub-boxes (the first-order change of the
block's softmax output) and rewrites the plan with the best splits within the budget,
deterministically.

Scoring runs on the block path, like :func:`fmm_attention.cpu.blocks.block_attention`:
the scoring queries are laid out once per block, transposed and padded to the
micro-kernel's panel width (:mod:`._tiles`); the base plan's keys are copied (one
contiguous loop per segment) and scored with :func:`gemm_tiles` and the block kernel's
vectorised softmax. The candidates are scored together: all their rows (each box's own
coarse rows and its children's) in one buffer, one product, one vectorised exponential
pass, then one small product per candidate for its values; the candidates a split
creates are scored together the same way. A box whose split cannot fit in the budget
or the segment room left is never scored (it could not be split later either, as the
keys spent and the segments added only grow), so small budgets cost little. All in the
input dtype (float32 stays float32).

Threads: the kernel is serial over a range of ``(entry, block)`` jobs and runs on the
library's threads (:class:`._launch.Threaded`: one contiguous range per thread, as a
``prange``'s static schedule split them) rather than a ``prange`` loop, whose body Numba
compiled three times. Each range allocates its work buffers once; each job writes only its
own block's plan and reads nothing another job writes, so the plans do not depend on the
thread count or on the split.
"""

import numpy as np

from ..tree import COARSE, TOKEN
from ._jit import jit
from ._launch import Threaded
from ._softmax import exp_columns, softmax_columns
from ._tiles import gemm_tiles, panel_width


@jit(nogil=True)
def _refine_jobs(
    job_lo, job_hi, q, k, v, kc, vc, cbias, token_bias, is_global, ptr, segments, level_offset, level_rank,
    level_box, block_size, scale, causal, budget, capacity, room, seg_lo, seg_hi, out_segments,
):
    """Per (entry, block) plans with the far boxes that matter most split finer, for the jobs
    ``job_lo <= job < job_hi`` (``job = b * n_blocks + block``).

    The block's scoring queries score the base plan once (max ``M_i``, normaliser ``Z_i``,
    output ``o_i``). Each far box's *benefit* is the first-order change its split would make
    to the block's outputs, ``sum_i ||dnum_i - o_i dden_i|| / Z_i``, where ``dnum``/``dden``
    are the children's softmax numerator/denominator contributions (relative to ``M_i``)
    minus the box's own. Repeatedly the alive far box of largest benefit (ties: earliest in
    the plan) is replaced by its two children one level finer (a level-1 box by its exact
    tokens), as long as the extra keys fit in ``budget``.

    Scoring queries: the block's own; causal, the ``m`` queries ending at the block's first
    query (positions ``i0 - m + 1 .. i0``), so no choice depends on a position after any
    query the plan serves, and the block's first query scores its own plan. Children of a
    causal far box lie before every scoring query. Global tokens (``is_global``) are never
    emitted again by a split.

    Masked tokens (``token_bias == -inf``; the key mask marks tokens) take no part: their
    queries do not score, a split costs only the *live* keys it adds (valid tokens, coarse
    rows with a valid token) minus the live keys it removes, boxes with no live key are
    dropped from the plan and never split, and a level-1 split emits only valid tokens.
    So a padded sequence refines exactly as the same sequence unpadded. At most ``room``
    segments are added per block beyond its live base segments (``capacity`` bounds the
    segments of one block); a split reserves the segments it adds (two for a coarse box,
    its runs of valid tokens for a level-1 box).
    """
    n_batch, n, d = q.shape
    dv = v.shape[2]
    n_blocks = ptr.size - 1
    n_levels = level_offset.size
    panel = panel_width(q)
    width = -(-block_size // panel) * panel  # scoring queries per block, padded
    max_plan = 1
    max_segments = 2  # candidates scored together: a block's base boxes, or a split's two children
    for blk in range(n_blocks):
        total = 0
        for s in range(ptr[blk], ptr[blk + 1]):
            total += segments[s, 2]
        max_plan = max(max_plan, total)
        max_segments = max(max_segments, ptr[blk + 1] - ptr[blk])
    max_rank = 1
    for level in range(n_levels):
        max_rank = max(max_rank, level_rank[level])
    max_rows = max(2 * max_rank, level_box[0]) + max_rank  # rows of one candidate: children and the box
    max_batch = max_segments * max_rows
    # flat views: each row copy below is one contiguous, vectorised loop
    k_flat = k.reshape(k.size)
    v_flat = v.reshape(v.size)
    kc_flat = kc.reshape(kc.size)
    vc_flat = vc.reshape(vc.size)
    # work buffers, once per range of jobs: every job overwrites what it reads of them
    queries_t = np.zeros((d, width), dtype=q.dtype)
    keys = np.empty(max_plan * d, dtype=q.dtype)  # row-major (key, feature)
    vals = np.empty(max_plan * dv, dtype=q.dtype)
    bias = np.empty(max_plan, dtype=q.dtype)
    pos = np.empty(max_plan, dtype=np.int64)
    scores = np.empty((max_plan, width), dtype=q.dtype)
    row_max = np.empty(width, dtype=q.dtype)
    row_sum = np.empty(width, dtype=q.dtype)
    shift = np.empty(width, dtype=q.dtype)
    out_t = np.empty((dv, width), dtype=q.dtype)
    c_keys = np.empty(max_batch * d, dtype=q.dtype)
    c_vals = np.empty(max_batch * dv, dtype=q.dtype)
    c_bias = np.empty(max_batch, dtype=q.dtype)
    c_sign = np.empty(max_batch, dtype=q.dtype)
    c_scores = np.empty((max_batch, width), dtype=q.dtype)
    c_start = np.empty(max_segments + 1, dtype=np.int64)
    num_t = np.empty((dv, width), dtype=q.dtype)
    den = np.empty(width, dtype=q.dtype)
    change = np.empty(width, dtype=q.dtype)
    cand = np.zeros((capacity, 4), dtype=np.int64)
    alive = np.zeros(capacity, dtype=np.bool_)
    blocked = np.zeros(capacity, dtype=np.bool_)
    mass = np.zeros(capacity)
    for job in range(job_lo, job_hi):
        b = job // n_blocks
        blk = job % n_blocks
        i0 = blk * block_size
        i1 = min(n, i0 + block_size)
        s0 = max(0, i0 - block_size + 1) if causal else i0
        s1 = i0 + 1 if causal else i1
        rows = s1 - s0
        # a masked query scores nothing: its column is zero here and dropped below
        for i in range(width):
            live = i < rows and token_bias[b, s0 + i] > -np.inf
            for e in range(d):
                queries_t[e, i] = q[b, s0 + i, e] * scale if live else 0
        # ---- base plan: gathered keys, scored once for max, normaliser and output
        lo = ptr[blk]
        hi = ptr[blk + 1]
        n_plan = np.int64(0)
        for s in range(lo, hi):
            start = segments[s, 1]
            count = segments[s, 2]
            if segments[s, 0] == TOKEN:
                _copy_rows(k_flat, v_flat, token_bias, b, start, count, d, dv, n_plan, keys, vals, bias)
                for t in range(count):
                    pos[n_plan + t] = start + t
            else:
                _copy_rows(kc_flat, vc_flat, cbias, b, start, count, d, dv, n_plan, keys, vals, bias)
                for t in range(count):
                    pos[n_plan + t] = -1
            n_plan += count
        gemm_tiles(n_plan, width, d, keys, 0, d, 1, queries_t, 0, width, scores, 0, width, False)
        softmax_columns(scores, n_plan, bias, pos, s0, causal, q.dtype.type(-np.inf), row_max, shift, row_sum)
        gemm_tiles(dv, width, n_plan, vals, 0, 1, dv, scores, 0, width, out_t, 0, width, False)
        for i in range(width):
            if i >= rows or token_bias[b, s0 + i] == -np.inf:
                row_sum[i] = 0  # padding or a masked query: no output to change
        for i in range(rows):
            if row_sum[i] > 0:
                inv = 1 / row_sum[i]
                for e in range(dv):
                    out_t[e, i] *= inv
        # ---- candidates: (kind, start, count, level + 1 or 0 for tokens), alive, benefit
        nc = np.int64(0)
        for s in range(lo, hi):
            if segments[s, 0] != TOKEN and _live_rows(cbias, b, segments[s, 1], segments[s, 2]) == 0:
                continue  # every key of the box is masked: it contributes nothing, costs nothing
            cand[nc, 0] = segments[s, 0]
            cand[nc, 1] = segments[s, 1]
            cand[nc, 2] = segments[s, 2]
            cand[nc, 3] = 0
            mass[nc] = 0
            if segments[s, 0] != TOKEN:
                level = 0
                while level + 1 < n_levels and level_offset[level + 1] <= segments[s, 1]:
                    level += 1
                cand[nc, 3] = level + 1
            alive[nc] = True
            blocked[nc] = False
            nc += 1
        n_base = nc
        spent = 0
        # a split that does not fit now never will (spent and nc only grow): such a box
        # is blocked at once and its benefit, which could not change the plan, is not scored
        _block_unaffordable(np.int64(0), nc, cand, blocked, budget - spent, room - (nc - n_base), b, cbias, token_bias,
                            is_global, level_offset, level_rank, level_box)
        _split_benefits(
            np.int64(0), nc, cand, blocked, mass, queries_t, rows, shift, row_sum, out_t, k_flat, v_flat, token_bias,
            kc_flat, vc_flat, cbias, is_global, b, level_offset, level_rank, level_box, c_keys, c_vals, c_bias,
            c_sign, c_scores, c_start, num_t, den, change,
        )
        while True:
            best = np.int64(-1)
            for c in range(nc):
                if alive[c] and not blocked[c] and cand[c, 3] > 0 and (best < 0 or mass[c] > mass[best]):
                    best = c
            if best < 0:
                break
            cost, added = _split_cost(cand, best, b, cbias, token_bias, is_global, level_offset, level_rank,
                                      level_box)
            if added < 0 or spent + cost > budget or nc - n_base + added > room:
                blocked[best] = True
                continue
            level = cand[best, 3] - 1
            box = (cand[best, 1] - level_offset[level]) // level_rank[level]
            box_width = level_box[level]
            spent += cost
            alive[best] = False
            if level == 0:  # the box's valid tokens, as runs between global and masked tokens
                first = box * box_width
                t = first
                end = min(n, first + box_width)
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
                    mass[nc] = 0
                    alive[nc] = True
                    blocked[nc] = False
                    nc += 1
                    t = run
            else:
                first_child = nc
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
                    alive[nc] = True
                    blocked[nc] = False
                    nc += 1
                _block_unaffordable(first_child, nc, cand, blocked, budget - spent, room - (nc - n_base), b,
                                    cbias, token_bias, is_global, level_offset, level_rank, level_box)
                _split_benefits(
                    first_child, nc, cand, blocked, mass, queries_t, rows, shift, row_sum, out_t, k_flat, v_flat,
                    token_bias, kc_flat, vc_flat, cbias, is_global, b, level_offset, level_rank, level_box, c_keys,
                    c_vals, c_bias, c_sign, c_scores, c_start, num_t, den, change,
                )
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


def _refine_layout(q, k, v, kc, vc, cbias, token_bias, is_global, ptr, segments, *args):
    # the base plan's products: each block's plan keys against its scoring queries, for the
    # logits and the values (the candidates' products are of the same order)
    n_batch, n, d = q.shape
    n_blocks = ptr.size - 1
    keys = int(segments[: ptr[-1], 2].sum())
    return n_batch * n_blocks, n_batch * keys * -(-n // max(1, n_blocks)) * (d + v.shape[2])


#: :func:`_refine_jobs` over every ``(entry, block)`` job, split over the threads
#: (:class:`._launch.Threaded`: a serial ``nogil`` kernel, no ``prange`` to compile);
#: called as ``refine_plans(q, k, v, kc, vc, cbias, token_bias, is_global, ptr, segments,
#: level_offset, level_rank, level_box, block_size, scale, causal, budget, capacity, room,
#: seg_lo, seg_hi, out_segments)``.
refine_plans = Threaded(_refine_jobs, _refine_layout)


@jit()
def _split_cost(cand, c, b, cbias, token_bias, is_global, level_offset, level_rank, level_box):
    """``(cost, added)`` of splitting coarse candidate ``c``: the live keys it adds minus those
    it removes, and the segments it emits; ``added = -1`` for a box that is exact already
    (one coarse key per token)."""
    n = token_bias.shape[1]
    level = cand[c, 3] - 1
    box = (cand[c, 1] - level_offset[level]) // level_rank[level]
    box_width = level_box[level]
    if level_rank[level] >= box_width:
        return 0, -1
    cost = -_live_rows(cbias, b, cand[c, 1], cand[c, 2])
    added = 0
    if level == 0:
        first = box * box_width
        previous_live = False
        for t in range(first, min(n, first + box_width)):
            live = not is_global[t] and token_bias[b, t] > -np.inf
            if live:
                cost += 1
                if not previous_live:
                    added += 1
            previous_live = live
    else:
        for child in (2 * box, 2 * box + 1):
            if child * level_box[level - 1] < n:
                start = level_offset[level - 1] + child * level_rank[level - 1]
                live = _live_rows(cbias, b, start, level_rank[level - 1])
                cost += live
                if live > 0:
                    added += 1
    return cost, added


@jit()
def _block_unaffordable(first, last, cand, blocked, budget_left, room_left, b, cbias, token_bias, is_global,
                        level_offset, level_rank, level_box):
    """Block the coarse candidates ``first <= c < last`` whose split does not fit in
    ``budget_left`` keys and ``room_left`` segments, or that are exact already."""
    for c in range(first, last):
        if cand[c, 3] > 0:
            cost, added = _split_cost(cand, c, b, cbias, token_bias, is_global, level_offset, level_rank, level_box)
            if added < 0 or cost > budget_left or added > room_left:
                blocked[c] = True


@jit()
def _live_rows(cbias, b, start, count):
    """Coarse rows ``start:start+count`` of entry ``b`` that hold a valid token (bias > -inf)."""
    live = 0
    for t in range(start, start + count):
        if cbias[b, t] > -np.inf:
            live += 1
    return live


@jit()
def _copy_rows(keys, vals, bias, b, start, count, d, dv, dst, out_keys, out_vals, out_bias):
    """Copy rows ``start:start+count`` of entry ``b`` (``keys``, ``vals`` flat views of
    ``(B, rows, d)`` arrays, ``bias`` (B, rows)) to rows ``dst:dst+count`` of the flat
    buffers; a row with bias ``-inf`` (masked: it may hold anything, and 0 * nan is nan)
    becomes zeros."""
    n_rows = bias.shape[1]
    live = 0
    for t in range(count):
        out_bias[dst + t] = bias[b, start + t]
        if out_bias[dst + t] > -np.inf:
            live += 1
    if live == count:  # the common case: one contiguous copy of all the rows
        src = (b * n_rows + start) * d
        for x in range(count * d):
            out_keys[dst * d + x] = keys[src + x]
        src = (b * n_rows + start) * dv
        for x in range(count * dv):
            out_vals[dst * dv + x] = vals[src + x]
        return
    for t in range(count):
        masked = out_bias[dst + t] == -np.inf
        src = (b * n_rows + start + t) * d
        for e in range(d):
            out_keys[(dst + t) * d + e] = 0 if masked else keys[src + e]
        src = (b * n_rows + start + t) * dv
        for e in range(dv):
            out_vals[(dst + t) * dv + e] = 0 if masked else vals[src + e]


@jit()
def _gather_rows(keys, vals, bias, b, start, count, d, dv, skip, sign, c_keys, c_vals, c_bias, c_sign, nr):
    """Append the live rows ``start:start+count`` (bias > -inf, not ``skip``) of entry ``b``
    (``keys``, ``vals`` flat views of ``(B, rows, d)`` arrays) to the candidate buffers;
    returns the new row count."""
    n_rows = bias.shape[1]
    for t in range(start, start + count):
        if bias[b, t] == -np.inf or (skip.size > 1 and skip[t]):
            continue
        src = (b * n_rows + t) * d
        for e in range(d):
            c_keys[nr * d + e] = keys[src + e]
        src = (b * n_rows + t) * dv
        for e in range(dv):
            c_vals[nr * dv + e] = vals[src + e]
        c_bias[nr] = bias[b, t]
        c_sign[nr] = sign
        nr += 1
    return nr


@jit()
def _split_benefits(first, last, cand, blocked, mass, queries_t, rows, shift, row_sum, out_t, k, v, token_bias, kc, vc,
                    cbias, is_global, b, level_offset, level_rank, level_box, c_keys, c_vals, c_bias, c_sign, c_scores,
                    c_start, num_t, den, change):
    """``mass[c]``: the first-order change of the block's outputs if far box ``cand[c]`` were
    split, for the candidates ``first <= c < last`` together (token runs and ``blocked``
    candidates get 0).

    Each box's own rows (sign -1) and its children's (+1) are gathered one candidate after
    the other, scored against the scoring queries in one product and exponentiated in one
    vectorised pass (shifted by the base plan's maxima ``shift``); then each candidate's
    rows are applied to their values on the micro-kernel. ``out_t`` holds the base outputs
    ``o_i`` transposed, ``row_sum`` the normalisers ``Z_i`` (0: a query that does not
    count). The ``c_*``, ``num_t``, ``den`` and ``change`` are work buffers.
    """
    width = queries_t.shape[1]
    d = queries_t.shape[0]
    dv = out_t.shape[0]
    n = token_bias.shape[1]  # k, v, kc, vc: flat views
    no_skip = is_global[:1]  # size 1: skip nothing
    nr = np.int64(0)
    for c in range(first, last):
        c_start[c - first] = nr
        if cand[c, 3] == 0 or blocked[c]:  # a token run, or a split that cannot happen
            continue
        level = cand[c, 3] - 1
        start = cand[c, 1]
        nr = _gather_rows(kc, vc, cbias, b, start, cand[c, 2], d, dv, no_skip, -1.0, c_keys, c_vals, c_bias, c_sign,
                          nr)
        box = (start - level_offset[level]) // level_rank[level]
        if level == 0:
            first_token = box * level_box[0]
            last_token = min(n, first_token + level_box[0])
            nr = _gather_rows(k, v, token_bias, b, first_token, last_token - first_token, d, dv, is_global, 1.0,
                              c_keys, c_vals, c_bias, c_sign, nr)
        else:
            child_rank = level_rank[level - 1]
            for child in (2 * box, 2 * box + 1):
                if child * level_box[level - 1] < n:
                    child_start = level_offset[level - 1] + child * child_rank
                    nr = _gather_rows(kc, vc, cbias, b, child_start, child_rank, d, dv, no_skip, 1.0, c_keys, c_vals,
                                      c_bias, c_sign, nr)
    c_start[last - first] = nr
    if nr > 0:
        gemm_tiles(nr, width, d, c_keys, 0, d, 1, queries_t, 0, width, c_scores, 0, width, False)
        # exp(score + bias - max): a child may outscore the base plan's maximum, so the
        # exponent is capped where the vectorised exponential would overflow its bits
        cap = c_scores.dtype.type(80.0 if c_scores.itemsize == 4 else 700.0)
        for t in range(nr):
            key_bias = c_bias[t]
            for i in range(width):
                x = c_scores[t, i] + key_bias
                c_scores[t, i] = x if x - shift[i] < cap else shift[i] + cap
        exp_columns(c_scores, nr, shift, den)  # den: scratch
        for t in range(nr):
            sign = c_sign[t]
            for i in range(width):
                c_scores[t, i] *= sign
    for c in range(first, last):
        r0 = c_start[c - first]
        r1 = c_start[c - first + 1]
        mass[c] = 0
        if r1 == r0:
            continue
        gemm_tiles(dv, width, r1 - r0, c_vals, r0 * dv, 1, dv, c_scores, r0 * width, width, num_t, 0, width, False)
        for i in range(width):
            den[i] = 0
            change[i] = 0
        for t in range(r0, r1):
            for i in range(width):
                den[i] += c_scores[t, i]
        for e in range(dv):
            for i in range(width):
                diff = num_t[e, i] - out_t[e, i] * den[i]
                change[i] += diff * diff
        total = 0.0
        for i in range(rows):
            if row_sum[i] > 0:
                total += np.sqrt(change[i]) / row_sum[i]
        mass[c] = total
