"""Exact softmax attention on the CPU, streamed in tiles (flash-style), O(n d) memory.

Each parallel job owns a tile of query rows and walks the key tiles with an online
softmax: scores by BLAS (``np.dot``), then a vectorised max and a fused exp-and-sum per
row, then the weighted values by BLAS. No ``(n, n)`` array exists at any time.

Queries and keys may differ in number and in batch: each output entry names the row sets
it reads (broadcast leading dims and grouped heads copy nothing), and each query has a
position in the key sequence for causal attention and sliding windows. Pairwise masks
and biases are read in place with strides.

A job is one (output entry, query tile); :data:`exact_kernel` launches the jobs in chunks so
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
def exact_tiles(job_lo, job_hi, query_tile, key_tile, q, k, v, q_index, kv_index, pad, has_pad,
                mask_flat, mask_off, mask_si, mask_sj, has_attn_mask, bias_flat, bias_off, bias_si, bias_sj, has_bias,
                scale, causal, offset, left, right, out, lse):
    """Write softmax(scale q k^T + bias) v into ``out`` (B, n_q, dv), its lse into ``lse`` (B, n_q).

    Jobs ``job_lo <= job < job_hi`` run (``job = b * n_tiles + slot``, the query tile of a
    slot given by :func:`_tile_of`). Output entry ``b`` reads the query rows
    ``q[q_index[b]]`` and the keys and values ``k[kv_index[b]]``, ``v[kv_index[b]]``: a
    broadcast or grouped-head call reads each row set where it lies.

    Query ``i`` sits at position ``t = offset + i`` of the keys and sees the keys
    ``t - left <= j <= t + right`` (``causal``: ``j <= t`` too; ``left``/``right`` larger than
    any distance when unbounded); only the key tiles meeting that range are read.
    ``pad[b, j]`` (``has_pad``) marks valid keys, ``mask_flat[mask_off[b] + i * mask_si +
    j * mask_sj]`` (``has_attn_mask``) the allowed pairs, and the bias of a pair is read the
    same way from ``bias_flat`` (``has_bias``) and added to its logit: the strides are 0 along
    an axis the caller broadcast, so no ``(n_q, n_k)`` array is made. A disallowed key's logit
    is replaced by ``-inf`` whatever the key holds; its *value* still enters the weighted sum
    with weight 0, so the caller hands over ``v`` with padded rows finite (see
    :func:`fmm_attention.cpu.exact_batch`).
    """
    n_q = q.shape[1]
    n_k = k.shape[1]
    dv = v.shape[2]
    n_tiles = (n_q + query_tile - 1) // query_tile
    if causal:
        right = min(right, 0)
    for job in prange(job_lo, job_hi):
        b = job // n_tiles
        bq = q_index[b]
        bk = kv_index[b]
        i0 = _tile_of(job % n_tiles, n_tiles) * query_tile
        i1 = min(n_q, i0 + query_tile)
        rows = i1 - i0
        q_tile = q[bq, i0:i1] * scale
        acc = np.zeros((rows, dv), dtype=q.dtype)
        run_max = np.full(rows, -np.inf, dtype=q.dtype)
        run_sum = np.zeros(rows, dtype=q.dtype)
        # keys any query of the tile may see: [first - left, last + right]
        key_start = max(0, offset + i0 - left)
        key_end = min(n_k, offset + i1 + right)  # offset + (i1 - 1) + right + 1
        for j0 in range(key_start, key_end, key_tile):
            j1 = min(key_end, j0 + key_tile)
            scores = np.dot(q_tile, k[bk, j0:j1].T)
            for i in range(rows):
                row = scores[i]
                if has_bias:
                    base = bias_off[b] + (i0 + i) * bias_si
                    for j in range(j1 - j0):
                        row[j] += bias_flat[base + (j0 + j) * bias_sj]
                # select, never add: a masked key may hold inf or NaN (its logit too)
                if has_pad:
                    for j in range(j1 - j0):
                        if not pad[b, j0 + j]:
                            row[j] = -np.inf
                if has_attn_mask:
                    base = mask_off[b] + (i0 + i) * mask_si
                    for j in range(j1 - j0):
                        if not mask_flat[base + (j0 + j) * mask_sj]:
                            row[j] = -np.inf
                t = offset + i0 + i
                lo = t - left - j0  # first column query i sees (may be < 0: all of them)
                hi = t + right + 1 - j0  # one past its last
                if lo > 0:
                    row[: min(lo, j1 - j0)] = -np.inf
                if hi < j1 - j0:
                    row[max(hi, 0) :] = -np.inf
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
            acc += np.dot(scores, v[bk, j0:j1])
        for i in range(rows):
            if run_sum[i] > 0:
                out[b, i0 + i] = acc[i] / run_sum[i]
                lse[b, i0 + i] = run_max[i] + np.log(run_sum[i])
            else:
                out[b, i0 + i] = 0
                lse[b, i0 + i] = -np.inf


def _key_span(n_q, n_k, query_tile, causal, offset, left, right):
    """First query and the number of keys read by each query tile (in tile order)."""
    right = min(right, 0) if causal else right
    first = np.arange(0, n_q, query_tile, dtype=np.int64)
    rows = np.minimum(query_tile, n_q - first)
    start = np.maximum(0, offset + first - left)
    end = np.minimum(n_k, offset + first + rows + right)
    return rows, np.maximum(end - start, 0)


def _layout(q, k, v, q_index, kv_index, pad, has_pad, mask_flat, mask_off, mask_si, mask_sj, has_attn_mask,
            bias_flat, bias_off, bias_si, bias_sj, has_bias, scale, causal, offset, left, right, *outputs):
    """Tile sizes from ``_config`` (read now), the number of jobs and their multiply-adds
    (a tile reads only the keys its queries may see).
    """
    query_tile, key_tile = max(1, int(_config.EXACT_QUERY_TILE)), max(1, int(_config.EXACT_KEY_TILE))
    n_batch = q_index.shape[0]
    n_q, n_k, d = q.shape[1], k.shape[1], q.shape[2]
    width = d + v.shape[2]
    n_tiles = -(-n_q // query_tile)
    rows, keys = _key_span(n_q, n_k, query_tile, causal, offset, left, right)
    per_tile = (rows * keys * width).astype(np.float64)

    def cumulative():
        in_order = per_tile[_tile_order(n_tiles)]
        return np.concatenate(([0.0], np.cumsum(np.tile(in_order, n_batch))))

    return (query_tile, key_tile), n_batch * n_tiles, n_batch * float(per_tile.sum()), cumulative


#: ``exact_kernel(q, k, v, q_index, kv_index, pad, has_pad, mask_flat, mask_off, mask_si, mask_sj,
#: has_attn_mask, bias_flat, bias_off, bias_si, bias_sj, has_bias, scale, causal, offset, left, right,
#: out, lse)``: every tile.
exact_kernel = Chunked(exact_tiles, _layout, group=2)
