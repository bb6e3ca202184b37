"""Exact softmax attention on the CPU, streamed in tiles (flash-style), O(n d) memory.

Each parallel job owns a tile of query rows and walks the key tiles with an online
softmax: scores by BLAS (``np.dot``), then a vectorised max and a fused exp-and-sum per
row, then the weighted values by BLAS. No ``(n, n)`` array exists at any time.
"""

import numpy as np
from numba import prange

from .. import _config
from ._blocks import exp_shift_sum, jit, row_max

QUERY_TILE = _config.EXACT_QUERY_TILE
KEY_TILE = _config.EXACT_KEY_TILE


@jit(parallel=True)
def exact_kernel(q, k, v, key_bias, has_mask, scale, causal, out, lse):
    """Write softmax(scale q k^T + bias) v into ``out`` (B, n, dv) and its lse into ``lse`` (B, n).

    ``key_bias`` is 0 (valid) or ``-inf`` (masked): a masked key's logit is replaced by
    ``-inf``, whatever the key holds. Masked *values* still enter the weighted sum with
    weight 0, so the caller must hand over ``v`` with masked rows finite (see
    :func:`fmm_attention.cpu.exact`).
    """
    n_batch, n, _ = q.shape
    dv = v.shape[2]
    n_tiles = (n + QUERY_TILE - 1) // QUERY_TILE
    for job in prange(n_batch * n_tiles):
        b = job // n_tiles
        i0 = (job % n_tiles) * QUERY_TILE
        i1 = min(n, i0 + QUERY_TILE)
        rows = i1 - i0
        q_tile = q[b, i0:i1] * scale
        acc = np.zeros((rows, dv), dtype=q.dtype)
        run_max = np.full(rows, -np.inf, dtype=q.dtype)
        run_sum = np.zeros(rows, dtype=q.dtype)
        key_end = i1 if causal else n
        for j0 in range(0, key_end, KEY_TILE):
            j1 = min(key_end, j0 + KEY_TILE)
            scores = np.dot(q_tile, k[b, j0:j1].T)
            diagonal = causal and j1 - 1 > i0
            for i in range(rows):
                row = scores[i]
                if has_mask:
                    # select, never add: a masked key may hold inf or NaN (its logit too)
                    for j in range(j1 - j0):
                        if key_bias[b, j0 + j] != 0:
                            row[j] = -np.inf
                if diagonal:  # keys after query i0 + i
                    row[max(0, i0 + i + 1 - j0) :] = -np.inf
                new_max = max(run_max[i], row_max(row))
                if new_max == -np.inf:
                    row[:] = 0
                    continue
                if new_max > run_max[i]:
                    rescale = np.exp(run_max[i] - new_max)
                    run_sum[i] *= rescale
                    acc[i] *= rescale
                    run_max[i] = new_max
                run_sum[i] += exp_shift_sum(row, new_max)
            acc += np.dot(scores, v[b, j0:j1])
        for i in range(rows):
            if run_sum[i] > 0:
                out[b, i0 + i] = acc[i] / run_sum[i]
                lse[b, i0 + i] = run_max[i] + np.log(run_sum[i])
            else:
                out[b, i0 + i] = 0
                lse[b, i0 + i] = -np.inf
