"""Block attention on the CPU: one joint softmax per query over its whole key plan.

The tree (:mod:`fmm_attention.tree`) hands every query block a *key plan*: segments of
exact tokens and of coarse-buffer rows. The block kernel scores the whole block against
all of them (token runs in place, coarse rows gathered; products on the micro-kernel of
:mod:`._tiles`) and takes one joint softmax per query, so near and far field share a
single max and denominator as the spec requires.
"""

import numpy as np

from ..tree import TOKEN
from ._jit import jit
from ._launch import Threaded
from ._softmax import softmax_columns
from ._tiles import gemm_tiles, panel_width

@jit(nogil=True)
def _block_jobs(
    job_lo, job_hi, q, k, v, q_index, kv_index, q_start, key_bias, has_mask, kc, vc, cbias, seg_lo, seg_hi, segments, max_keys, block_size,
    scale, causal, inherit, inh_max, inh_sum, inh_num, out, lse,
):
    """Jobs ``job_lo <= job < job_hi`` of :func:`block_attention`: the joint softmax of
    every query block over its planned keys.

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
    allocated once per range of jobs (each thread runs one range).

    Output entry ``b`` reads the queries ``q[q_index[b]]`` and the keys, values, coarse
    rows and key bias of ``kv_index[b]`` (grouped heads and broadcast leading dims copy
    nothing). Query ``i`` sits at key position ``q_start + i`` (``n_q = q.shape[1]`` of them):
    only the blocks holding such positions run, and block rows without a query score as
    padding and are never written, so each query gets exactly the row of its position in
    the self-attention over the keys.
    """
    n_q, d = q.shape[1], q.shape[2]
    n = k.shape[1]
    dv = v.shape[2]
    shared = seg_lo.shape[0] == 1
    blk_first = q_start // block_size
    n_blocks = (q_start + n_q - 1) // block_size + 1 - blk_first  # blocks holding queries
    max_segments = 1  # a loop: np.max of a difference compiles a temporary and take()
    for p in range(seg_lo.shape[0]):
        for blk in range(seg_lo.shape[1]):
            max_segments = max(max_segments, seg_hi[p, blk] - seg_lo[p, blk])
    panel = panel_width(q)
    width = -(-block_size // panel) * panel  # queries per block, padded
    # Every product reads its first operand from a flat array, so gemm_tiles compiles once
    # per dtype: a 2-D gathered buffer and a 3-D k were two specialisations of the whole
    # micro-kernel set, the larger part of this kernel's first-call compile time.
    k_flat = k.reshape(k.size)
    v_flat = v.reshape(v.size)
    kc_flat = kc.reshape(kc.size)
    vc_flat = vc.reshape(vc.size)
    n_coarse = kc.shape[1]
    gathered_keys = np.empty(max_keys * d, dtype=q.dtype)  # row-major (key, feature)
    gathered_vals = np.empty(max_keys * dv, dtype=q.dtype)
    bias = np.empty(max_keys, dtype=q.dtype)
    positions = np.empty(max_keys, dtype=np.int64)
    queries_t = np.zeros((d, width), dtype=q.dtype)  # scaled queries, transposed
    scores = np.empty((max_keys, width), dtype=q.dtype)
    out_t = np.empty((dv, width), dtype=q.dtype)
    col_max = np.empty(width, dtype=q.dtype)
    col_sum = np.empty(width, dtype=q.dtype)
    shift = np.empty(width, dtype=q.dtype)
    runs = np.empty((max_segments, 2), dtype=np.int64)  # direct token runs: start, count
    prev = np.empty((max_segments, 4), dtype=np.int64)  # last job's gathered segments
    n_prev = 0
    for job in range(job_lo, job_hi):
        b = job // n_blocks
        blk = blk_first + job % n_blocks
        bq = q_index[b]
        bk = kv_index[b]
        p = 0 if shared else b
        i0 = blk * block_size
        i1 = min(n, i0 + block_size)
        rows = i1 - i0
        r0 = max(i0, q_start) - i0  # block rows holding queries: r0 <= row < r1
        r1 = min(i1, q_start + n_q) - i0
        # Keys: the gathered rows first, then the direct token runs. Segments are
        # gathered last to first (coarsest level first), so consecutive blocks of a
        # chunk share a prefix (blocks of one level-l box share levels >= l) that is
        # already in place and is not copied again.
        # int64, not the literal 0: type inference would also compile softmax_columns for
        # a literal key count while it propagates
        n_gathered = np.int64(0)
        n_slots = 0
        same_prefix = True
        for s in range(seg_hi[p, blk] - 1, seg_lo[p, blk] - 1, -1):
            kind = segments[p, s, 0]
            start = segments[p, s, 1]
            count = segments[p, s, 2]
            if kind == TOKEN and not has_mask:
                continue
            same_prefix = (
                same_prefix and n_slots < n_prev and prev[n_slots, 0] == bk and prev[n_slots, 1] == kind
                and prev[n_slots, 2] == start and prev[n_slots, 3] == count
            )
            prev[n_slots, 0] = bk
            prev[n_slots, 1] = kind
            prev[n_slots, 2] = start
            prev[n_slots, 3] = count
            n_slots += 1
            if same_prefix:
                n_gathered += count
                continue
            # explicit copies: a slice assignment compiles a broadcast and its
            # shape-mismatch error (string formatting) into the kernel
            if kind == TOKEN:
                for t in range(count):
                    col = n_gathered + t
                    positions[col] = start + t
                    bias[col] = key_bias[bk, start + t]
                    live = bias[col] != -np.inf  # masked tokens may hold anything: zero them
                    for e in range(d):
                        gathered_keys[col * d + e] = k[bk, start + t, e] if live else 0
                    for e in range(dv):
                        gathered_vals[col * dv + e] = v[bk, start + t, e] if live else 0
            else:
                for t in range(count):
                    positions[n_gathered + t] = -1
                    bias[n_gathered + t] = cbias[bk, start + t]
                # consecutive coarse rows: one flat, vectorised copy each
                src = (bk * n_coarse + start) * d
                dst = n_gathered * d
                for x in range(count * d):
                    gathered_keys[dst + x] = kc_flat[src + x]
                src = (bk * n_coarse + start) * dv
                dst = n_gathered * dv
                for x in range(count * dv):
                    gathered_vals[dst + x] = vc_flat[src + x]
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
            if r0 <= i < r1:
                for e in range(d):
                    queries_t[e, i] = q[bq, i0 + i - q_start, e] * scale
            else:  # a position without a query (prefill chunk or decode): padding
                for e in range(d):
                    queries_t[e, i] = 0
        for e in range(d):  # the last block: padding queries score 0 and are never written
            for i in range(rows, width):
                queries_t[e, i] = 0
        # scores[key, query], gathered keys then token runs (row offsets into k)
        gemm_tiles(n_gathered, width, d, gathered_keys, 0, d, 1, queries_t, 0, width, scores, 0, width, False)
        key = n_gathered
        for r in range(n_runs):
            start = runs[r, 0]
            count = runs[r, 1]
            gemm_tiles(count, width, d, k_flat, (bk * n + start) * d, d, 1, queries_t, 0, width,
                       scores, key * width, width, False)
            key += count
        floor_max = inh_max[b, blk] if inherit else inh_max.dtype.type(-np.inf)
        softmax_columns(scores, nk, bias, positions, i0, causal, floor_max, col_max, shift, col_sum)
        # out_t[feature, query] = sum over keys of value[key, feature] * weight[key, query]
        gemm_tiles(dv, width, n_gathered, gathered_vals, 0, 1, dv, scores, 0, width, out_t, 0, width, False)
        key = n_gathered
        for r in range(n_runs):
            start = runs[r, 0]
            count = runs[r, 1]
            gemm_tiles(dv, width, count, v_flat, (bk * n + start) * dv, 1, dv, scores, key * width, width,
                       out_t, 0, width, True)
            key += count
        for i in range(r0, r1):
            total = col_sum[i]
            carry = 0.0
            if inherit and inh_max[b, blk] > -np.inf:
                carry = np.exp(inh_max[b, blk] - col_max[i])
                total += carry * inh_sum[b, blk]
            if total > 0:
                inv = 1.0 / total
                for e in range(dv):
                    extra = carry * inh_num[b, blk, e] if inherit else 0.0
                    out[b, i0 + i - q_start, e] = (out_t[e, i] + extra) * inv
                lse[b, i0 + i - q_start] = col_max[i] + np.log(total)
            else:
                for e in range(dv):
                    out[b, i0 + i - q_start, e] = 0
                lse[b, i0 + i - q_start] = -np.inf


def _layout(q, k, v, q_index, kv_index, q_start, key_bias, has_mask, kc, vc, cbias, seg_lo, seg_hi, segments,
            max_keys, block_size, *args):
    # one job per (output entry, query block holding queries), each at most a block of
    # queries against max_keys keys in both products
    n_q = q.shape[1]
    n_jobs = q_index.shape[0] * ((q_start + n_q - 1) // block_size + 1 - q_start // block_size)
    return n_jobs, n_jobs * block_size * max_keys * (q.shape[2] + v.shape[2])


#: ``block_attention(q, k, v, q_index, kv_index, q_start, key_bias, has_mask, kc, vc, cbias,
#: seg_lo, seg_hi, segments, max_keys, block_size, scale, causal, inherit, inh_max, inh_sum,
#: inh_num, out, lse)``: every job of :func:`_block_jobs`, on
#: ``numba.get_num_threads()`` threads. A serial kernel on Python threads rather than a
#: ``prange``: the parallel loop's body was compiled again as a gufunc and once more with
#: the calling function, two thirds of a cold first call (docs/performance.rst).
block_attention = Threaded(_block_jobs, _layout)
