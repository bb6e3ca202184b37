"""Block attention on the CPU: one joint softmax per query over its whole key plan.

The tree (:mod:`fmm_attention.tree`) hands every query block a *key plan*: segments of
exact tokens and of coarse-buffer rows. The block kernel scores the whole block against
all of them (token runs in place, coarse rows gathered; products on the micro-kernel of
:mod:`._tiles`) and takes one joint softmax per query, so near and far field share a
single max and denominator as the spec requires.
"""

import numpy as np
from numba import prange

from ..tree import TOKEN
from ._jit import jit
from ._softmax import softmax_columns
from ._tiles import gemm_tiles, panel_width

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
