"""Streaming decode kernels: one causal FMA row per new token, from a small state.

The state of one sequence (see :class:`fmm_attention.FMMDecoder`):

* the near ring: the last ``2m`` tokens, position ``i`` in slot ``i % 2m``;
* per far level, a ring of the coarse rows of the last four finished boxes, box ``c`` in
  slot ``c % 4`` (a query in box ``b`` lists boxes ``b-2`` and, ``b`` odd, ``b-3``; box
  ``b-1`` is kept for the next box, and the slot of ``b-4`` is free to receive ``b``);
* learned coarsening: per level, the running weighted sums of the box being filled;
* the global tokens reached so far, exactly.

A token is first written into the state (finishing every box it closes), then its query
attends near ring, global tokens and listed coarse rows in one joint softmax. The mean
rows are made with the arithmetic of the forward's upward pass
(:func:`fmm_attention.cpu.upward.mean_upward`: level 1 from tokens, each later level from its
two children), and the learned sums in the forward's order, so the rows match the one-shot
forward to rounding.
"""

import numpy as np
from numba import prange

from ._jit import jit
from ._softmax import exp_shift_sum


@jit()
def _mean_level1(near_k, near_v, near_cv, b, first, block_size, rank, slot, ck, cv, cb, cn, count_scaling):
    """Level-1 coarse rows of the block starting at ``first`` (all in the near ring)."""
    d = near_k.shape[2]
    dv = near_v.shape[2]
    ring = near_k.shape[1]
    r = min(rank, block_size)
    size = block_size // r
    for t in range(r):
        for e in range(d):
            ck[b, 0, slot, t, e] = 0
        for e in range(dv):
            cv[b, 0, slot, t, e] = 0
        count = np.int64(0)
        for u in range(first + t * size, first + (t + 1) * size):
            s = u % ring
            if not near_cv[b, s]:
                continue
            count += 1
            for e in range(d):
                ck[b, 0, slot, t, e] += near_k[b, s, e]
            for e in range(dv):
                cv[b, 0, slot, t, e] += near_v[b, s, e]
        if count > 0:
            inv = 1.0 / count
            for e in range(d):
                ck[b, 0, slot, t, e] *= inv
            for e in range(dv):
                cv[b, 0, slot, t, e] *= inv
        _set_bias(cb, cn, b, np.int64(0), slot, t, count, count_scaling)  # int count, as the forward's level 1


@jit()
def _set_bias(cb, cn, b, level, slot, t, count, count_scaling):
    cn[b, level, slot, t] = count
    if count == 0:
        cb[b, level, slot, t] = -np.inf
    elif count_scaling:
        cb[b, level, slot, t] = np.log(count)
    else:
        cb[b, level, slot, t] = 0


@jit()
def _mean_merge(b, level, box, block_size, rank, ck, cv, cb, cn, count_scaling):
    """Coarse rows of box ``box`` at ``level`` (0-based, >= 1) from its two children."""
    d = ck.shape[4]
    dv = cv.shape[4]
    w = block_size << level
    r = min(rank, w)
    r_child = min(rank, w // 2)
    slot = box & 3
    for t in range(r):
        if r == 2 * r_child:  # same sub-box size: the children's rows, in order
            j = t
            c_slot = (2 * box + j // r_child) & 3
            c_t = j % r_child
            for e in range(d):
                ck[b, level, slot, t, e] = ck[b, level - 1, c_slot, c_t, e]
            for e in range(dv):
                cv[b, level, slot, t, e] = cv[b, level - 1, c_slot, c_t, e]
            count = cn[b, level - 1, c_slot, c_t]
        else:  # sub-boxes twice as large: merge pairs, weighted by their counts
            j0 = 2 * t
            j1 = 2 * t + 1
            s0 = (2 * box + j0 // r_child) & 3
            s1 = (2 * box + j1 // r_child) & 3
            t0 = j0 % r_child
            t1 = j1 % r_child
            c0 = cn[b, level - 1, s0, t0]
            c1 = cn[b, level - 1, s1, t1]
            count = c0 + c1
            if count > 0:
                w0 = c0 / count
                w1 = c1 / count
                for e in range(d):
                    ck[b, level, slot, t, e] = w0 * ck[b, level - 1, s0, t0, e] + w1 * ck[b, level - 1, s1, t1, e]
                for e in range(dv):
                    cv[b, level, slot, t, e] = w0 * cv[b, level - 1, s0, t0, e] + w1 * cv[b, level - 1, s1, t1, e]
            else:
                for e in range(d):
                    ck[b, level, slot, t, e] = 0
                for e in range(dv):
                    cv[b, level, slot, t, e] = 0
        _set_bias(cb, cn, b, level, slot, t, count, count_scaling)


@jit()
def _learned_add(acc, b, level, x, wt, w_off, width, rank, u):
    """``acc[b, level, t, e] += W[e*rank + t, u] * x[e]`` (weights stored ``(w, rank*dx)``)."""
    dx = x.size
    base = w_off[level] + u * rank * dx
    for e in range(dx):
        for t in range(rank):
            acc[b, level, t, e] += wt[base + e * rank + t] * x[e]


@jit()
def _learned_reset(acc, b, level, bias, b_off, rank):
    dx = acc.shape[3]
    for e in range(dx):
        for t in range(rank):
            acc[b, level, t, e] = bias[b_off[level] + e * rank + t]


@jit()
def _learned_finish(b, level, slot, rank, acck, accv, accn, ck, cv, cb, cn, count_scaling):
    count = accn[b, level]
    for t in range(rank):
        if count == 0:  # a box with no valid token is masked; zero rows keep products finite
            ck[b, level, slot, t] = 0
            cv[b, level, slot, t] = 0
            cb[b, level, slot, t] = -np.inf
        else:
            ck[b, level, slot, t] = acck[b, level, t]
            cv[b, level, slot, t] = accv[b, level, t]
            cb[b, level, slot, t] = np.log(count / rank) if count_scaling else 0
        cn[b, level, slot, t] = count


@jit()
def first_nonfinite(q, k, v):
    """Which of the flat arrays ``q, k, v`` holds a NaN or infinity first (0, 1, 2), or -1.

    A decode step checks a few tokens: one serial call for all three costs less than three
    NumPy passes (each a ufunc, a temporary and a reduction).
    """
    for which, arr in enumerate((q, k, v)):
        for i in range(arr.size):
            if not np.isfinite(arr[i]):
                return which
    return -1


@jit()
def _dot(a, b):
    total = a.dtype.type(0)
    for e in range(a.size):
        total += a[e] * b[e]
    return total


@jit(parallel=True)
def fma_decode(
    q, k, v, valid, is_global, global_slot, pos0, block_size, rank, n_levels, scale, count_scaling, learned,
    near_k, near_v, near_ok, near_cv, ck, cv, cb, cn,
    wkt, wvt, bk, bv, wk_off, wv_off, bk_off, bv_off, acck, accv, accn,
    gk, gv, gok, gpos, out, lse,
):
    """Append ``t`` tokens to each of ``B`` decoder states and return their FMA outputs.

    ``k`` (B, t, d), ``v`` (B, t, dv) and ``valid`` (B, t) are the new tokens of each
    state at positions ``pos0 .. pos0 + t - 1``; ``is_global`` (t,) flags global tokens
    and ``global_slot`` (t,) their row in the global store ``gk``/``gv``/``gok`` (positions
    ``gpos``, ascending). ``n_levels`` far levels are held (``ck`` etc. have at least that
    many); ``learned`` selects the running-sum coarsening (weights ``wkt``/``wvt`` stored
    per level as ``(w_l, r_l * d)``, flattened at ``wk_off``/``wv_off``). Each sequence is one serial
    pass over its tokens; the sequences run in parallel. ``q`` (B, g, t, d) holds ``g``
    queries per token and state (the query heads of one key/value head: grouped heads share
    one state, written once per token). Writes ``out`` (B, g, t, dv) and ``lse`` (B, g, t).
    """
    n_batch, n_grp, n_tok, d = q.shape
    dv = v.shape[2]
    ring = near_k.shape[1]
    n_global = gpos.size
    max_keys = ring + n_global + 2 * rank * n_levels
    for b in prange(n_batch):
        logits = np.empty(max_keys, dtype=q.dtype)
        acc = np.empty(dv, dtype=q.dtype)
        qs = np.empty(d, dtype=q.dtype)
        for s in range(n_tok):
            i = pos0 + s
            # ---- write the token into the state
            slot = i % ring
            near_ok[b, slot] = valid[b, s]
            near_cv[b, slot] = valid[b, s] and not is_global[s]
            for e in range(d):
                near_k[b, slot, e] = k[b, s, e]
            for e in range(dv):
                near_v[b, slot, e] = v[b, s, e]
            if is_global[s]:
                g = global_slot[s]
                gok[b, g] = valid[b, s]
                gk[b, g] = k[b, s]
                gv[b, g] = v[b, s]
            if learned:
                for level in range(n_levels):
                    w = block_size << level
                    r = min(rank, w)
                    u = i % w
                    if u == 0:
                        _learned_reset(acck, b, level, bk, bk_off, r)
                        _learned_reset(accv, b, level, bv, bv_off, r)
                        accn[b, level] = 0
                    if near_cv[b, slot]:
                        _learned_add(acck, b, level, k[b, s], wkt, wk_off, w, r, u)
                        _learned_add(accv, b, level, v[b, s], wvt, wv_off, w, r, u)
                        accn[b, level] += 1
                    if u == w - 1:
                        _learned_finish(b, level, (i // w) & 3, r, acck, accv, accn, ck, cv, cb, cn, count_scaling)
            elif (i + 1) % block_size == 0:
                box = i // block_size
                _mean_level1(near_k, near_v, near_cv, b, box * block_size, block_size, rank, box & 3,
                             ck, cv, cb, cn, count_scaling)
                for level in range(1, n_levels):
                    w = block_size << level
                    if (i + 1) % w != 0:
                        break
                    _mean_merge(b, level, i // w, block_size, rank, ck, cv, cb, cn, count_scaling)
            # ---- the queries (one per head of the group): near field, global tokens before it,
            # listed coarse boxes
            for h in range(n_grp):
                for e in range(d):
                    qs[e] = q[b, h, s, e] * scale
                lo = max(0, (i // block_size - 1) * block_size)
                nk = 0
                for j in range(lo, i + 1):
                    sj = j % ring
                    logits[nk] = _dot(qs, near_k[b, sj]) if near_ok[b, sj] else -np.inf
                    nk += 1
                n_gl = 0
                while n_gl < n_global and gpos[n_gl] < lo:
                    logits[nk] = _dot(qs, gk[b, n_gl]) if gok[b, n_gl] else -np.inf
                    nk += 1
                    n_gl += 1
                for level in range(n_levels):
                    w = block_size << level
                    box = i // w
                    if box < 2:  # every coarser level has box < 2 too: nothing listed
                        break
                    r = min(rank, w)
                    for c in (box - 2, box - 3):
                        if c < 0 or (c == box - 3 and box % 2 == 0):
                            continue
                        for t in range(r):
                            x = cb[b, level, c & 3, t]
                            logits[nk] = _dot(qs, ck[b, level, c & 3, t]) + x if x > -np.inf else -np.inf
                            nk += 1
                mx = -np.inf
                for j in range(nk):
                    mx = max(mx, logits[j])
                if mx == -np.inf:  # no valid key at all
                    out[b, h, s] = 0
                    lse[b, h, s] = -np.inf
                    continue
                total = exp_shift_sum(logits[:nk], mx)
                if not total > 0:  # a non-finite input (check_finite=False): NaN, not a ZeroDivisionError
                    out[b, h, s] = np.nan
                    lse[b, h, s] = np.nan
                    continue
                acc[:] = 0
                nk = 0
                for j in range(lo, i + 1):
                    wgt = logits[nk]
                    nk += 1
                    if wgt != 0:
                        sj = j % ring
                        for e in range(dv):
                            acc[e] += wgt * near_v[b, sj, e]
                for g in range(n_gl):
                    wgt = logits[nk]
                    nk += 1
                    if wgt != 0:
                        for e in range(dv):
                            acc[e] += wgt * gv[b, g, e]
                for level in range(n_levels):
                    w = block_size << level
                    box = i // w
                    if box < 2:
                        break
                    r = min(rank, w)
                    for c in (box - 2, box - 3):
                        if c < 0 or (c == box - 3 and box % 2 == 0):
                            continue
                        for t in range(r):
                            wgt = logits[nk]
                            nk += 1
                            if wgt != 0:
                                for e in range(dv):
                                    acc[e] += wgt * cv[b, level, c & 3, t, e]
                inv = 1.0 / total
                for e in range(dv):
                    out[b, h, s, e] = acc[e] * inv
                lse[b, h, s] = mx + np.log(total)


@jit(parallel=True)
def learned_prefill_level(x, cvalid, has_mask, wt, bias, box_size, rank, n, ring_rows, acc):
    """State of one learned level after ``n`` prompt tokens, for keys or values.

    ``ring_rows`` (B, 4, p, dx) receives the coarse rows of the last four finished boxes
    (box ``c`` in slot ``c % 4``), ``acc`` (B, p, dx) the running sums of the box being
    filled (bias plus the terms of its first ``n % box_size`` tokens), both summed in the
    forward's order. ``wt`` (w, rank*dx) is the level's weights transposed.
    """
    n_batch = x.shape[0]
    dx = x.shape[2]
    n_done = n // box_size
    first_box = max(0, n_done - 4)
    n_jobs = n_done - first_box + 1
    for job in prange(n_batch * n_jobs):
        b = job // n_jobs
        c = first_box + job % n_jobs
        start = c * box_size
        stop = min(n, start + box_size)
        if c == n_done and stop == start:
            continue  # no partial box: the next token resets the sums
        for t in range(rank):
            for e in range(dx):
                total = bias[e * rank + t]
                for u in range(stop - start):
                    if has_mask and not cvalid[b, start + u]:
                        continue
                    total += wt[u, e * rank + t] * x[b, start + u, e]
                if c == n_done:
                    acc[b, t, e] = total
                else:
                    ring_rows[b, c & 3, t, e] = total


@jit(parallel=True)
def exact_decode(q, kc, vc, ok, pos0, scale, n_chunks, part_max, part_sum, part_num, out, lse):
    """Exact causal attention of ``t`` new queries over a KV cache, split over key chunks.

    ``q`` (B, g, t, d): query ``s`` of head ``h`` of cache ``b`` (``g`` query heads share a
    cache) sits at position ``pos0 + s`` and sees cache rows ``0 .. pos0 + s`` (``ok`` marks
    valid keys). Each (cache, head, query, chunk) job makes a softmax partial (max, sum,
    numerator); the partials are merged by log-sum-exp, so one long sequence uses every
    core. ``part_*``, ``out`` and ``lse`` have the leading dims (B, g, t).
    """
    n_batch, n_grp, n_tok = q.shape[:3]
    dv = vc.shape[2]
    n_jobs = n_batch * n_grp * n_tok * n_chunks
    for job in prange(n_jobs):
        b = job // (n_grp * n_tok * n_chunks)
        h = (job // (n_tok * n_chunks)) % n_grp
        s = (job // n_chunks) % n_tok
        chunk = job % n_chunks
        n_keys = pos0 + s + 1
        lo = chunk * n_keys // n_chunks
        hi = (chunk + 1) * n_keys // n_chunks
        qs = q[b, h, s] * scale
        x = np.empty(max(hi - lo, 1), dtype=q.dtype)
        mx = -np.inf
        for j in range(lo, hi):
            x[j - lo] = _dot(qs, kc[b, j]) if ok[b, j] else -np.inf
            mx = max(mx, x[j - lo])
        part_max[b, h, s, chunk] = mx
        part_num[b, h, s, chunk] = 0
        if mx == -np.inf:
            part_sum[b, h, s, chunk] = 0
            continue
        part_sum[b, h, s, chunk] = exp_shift_sum(x[: hi - lo], mx)
        for j in range(lo, hi):
            wgt = x[j - lo]
            if wgt != 0:
                for e in range(dv):
                    part_num[b, h, s, chunk, e] += wgt * vc[b, j, e]
    for job in prange(n_batch * n_grp * n_tok):
        b = job // (n_grp * n_tok)
        h = (job // n_tok) % n_grp
        s = job % n_tok
        mx = -np.inf
        for c in range(n_chunks):
            mx = max(mx, part_max[b, h, s, c])
        if mx == -np.inf:
            out[b, h, s] = 0
            lse[b, h, s] = -np.inf
            continue
        total = 0.0
        for e in range(dv):
            out[b, h, s, e] = 0
        for c in range(n_chunks):
            if part_max[b, h, s, c] == -np.inf:
                continue
            f = np.exp(part_max[b, h, s, c] - mx)
            total += f * part_sum[b, h, s, c]
            for e in range(dv):
                out[b, h, s, e] += f * part_num[b, h, s, c, e]
        for e in range(dv):
            out[b, h, s, e] /= total
        lse[b, h, s] = mx + np.log(total)


# One sequence (or a few short ones) is a few microseconds of work: a parallel region's
# launch and thread wake-ups would cost more than the work, so these run on the caller's
# thread (same code; ``prange`` is ``range`` there).
fma_decode_serial = jit()(fma_decode.py_func)
exact_decode_serial = jit()(exact_decode.py_func)
