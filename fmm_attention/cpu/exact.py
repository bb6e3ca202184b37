"""Exact softmax attention on the CPU, streamed in tiles (flash-style), O(n d) memory.

Each parallel job owns a tile of query rows and walks the key tiles with an online
softmax: scores by BLAS (``np.dot``), then a vectorised max and a fused exp-and-sum per
row, then the weighted values by BLAS. No ``(n, n)`` array exists at any time.

A job is one (batch entry, query tile); :data:`exact_kernel` launches the jobs in chunks so
that a long call stays interruptible (:class:`._launch.Chunked`).
"""

import numpy as np
from numba import prange

from .. import _config
from ._jit import jit
from ._softmax import exp_shift_sum, row_max
from ._launch import Chunked


@jit()
def _tile_of(slot, n_tiles):
    """Return the query tile of job slot ``slot``: tiles 0, n-1, 1, n-2, ... (n = ``n_tiles``).

    Causal tile ``t`` costs about ``t + 1`` key tiles, so tiles ``t`` and ``n - 1 - t`` together
    cost the same for every ``t``. Each thread of a ``prange`` takes one contiguous run of
    slots, so in this order each gets the same work, where in tile order the thread with the
    last tiles got three quarters of the triangle. The tiles are independent: the order
    changes no result.
    """
    half = slot // 2
    return half if slot % 2 == 0 else n_tiles - 1 - half


def _tile_order(n_tiles):
    """:func:`_tile_of` of every slot ``0 .. n_tiles - 1``."""
    slot = np.arange(n_tiles)
    return np.where(slot % 2 == 0, slot // 2, n_tiles - 1 - slot // 2)


@jit(parallel=True)
def exact_tiles(job_lo, job_hi, query_tile, key_tile, q, k, v, key_bias, has_mask, scale, causal, out, lse):
    """Write softmax(scale q k^T + bias) v into ``out`` (B, n, dv), its lse into ``lse`` (B, n).

    Jobs ``job_lo <= job < job_hi`` run (``job = b * n_tiles + slot``, the query tile of a
    slot given by :func:`_tile_of`).

    ``key_bias`` is 0 (valid) or ``-inf`` (masked): a masked key's logit is replaced by
    ``-inf``, whatever the key holds. Masked *values* still enter the weighted sum with
    weight 0, so the caller must hand over ``v`` with masked rows finite (see
    :func:`fmm_attention.cpu.exact_batch`).
    """
    n_batch, n, _ = q.shape
    dv = v.shape[2]
    n_tiles = (n + query_tile - 1) // query_tile
    for job in prange(job_lo, job_hi):
        b = job // n_tiles
        i0 = _tile_of(job % n_tiles, n_tiles) * query_tile
        i1 = min(n, i0 + query_tile)
        rows = i1 - i0
        q_tile = q[b, i0:i1] * scale
        acc = np.zeros((rows, dv), dtype=q.dtype)
        run_max = np.full(rows, -np.inf, dtype=q.dtype)
        run_sum = np.zeros(rows, dtype=q.dtype)
        key_end = i1 if causal else n
        for j0 in range(0, key_end, key_tile):
            j1 = min(key_end, j0 + key_tile)
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


def _layout(q, k, v, key_bias, has_mask, scale, causal, *outputs):
    """Tile sizes from ``_config`` (read now), the number of query tiles and their
    multiply-adds (a causal tile reads the keys up to its last query only).
    """
    query_tile, key_tile = max(1, int(_config.EXACT_QUERY_TILE)), max(1, int(_config.EXACT_KEY_TILE))
    n_batch, n, d = q.shape
    width = d + v.shape[2]
    n_tiles = -(-n // query_tile)

    def cumulative():
        first = np.arange(0, n, query_tile, dtype=np.float64)  # first query of each tile
        rows = np.minimum(query_tile, n - first)
        keys = first + rows if causal else np.full_like(first, n)
        per_tile = (rows * keys * width)[_tile_order(len(first))]  # in job order
        return np.concatenate(([0.0], np.cumsum(np.tile(per_tile, n_batch))))

    total = n_batch * n * (n + query_tile if causal else 2 * n) / 2 * width  # causal: sum of (first + rows) * rows
    return (query_tile, key_tile), n_batch * n_tiles, total, cumulative


#: ``exact_kernel(q, k, v, key_bias, has_mask, scale, causal, out, lse)``: every tile.
exact_kernel = Chunked(exact_tiles, _layout, group=2)
