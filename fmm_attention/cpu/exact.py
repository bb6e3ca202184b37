"""Exact softmax attention on the CPU, streamed in tiles (flash-style), O(n d) memory.

Each job owns a tile of query rows and walks the key tiles with an online softmax; the
kernels are serial over a range of jobs and run on the library's threads
(:class:`._launch.Threaded`), like FMA's block kernel. The layout is that of FMA's block
kernel and of exact attention's backward: logits key-major (``scores[key, query]``), the
tile's scaled queries transposed and padded to the micro-kernel's panel width, so that both
products (the logits, then the weighted values) run on the register-blocked micro-kernel
of :mod:`._tiles`, reading keys and values a row at a time where they lie, and the softmax
passes (maximum, rescale, exponential and sum) run along contiguous rows across the tile's
queries (:func:`exact_tiles`). That is the path of both dtypes by default; the earlier
query-major kernel whose products are BLAS calls (:func:`exact_tiles_blas`) runs the dtypes
that ``_config.EXACT_MICRO_KERNEL_DTYPES`` leaves out, for a host whose BLAS beats the
micro-kernel at these shapes. No ``(n, n)`` array in either.

Queries and keys may differ in number and in batch: each output entry names the row sets
it reads (broadcast leading dims and grouped heads copy nothing), and each query has a
position in the key sequence for causal attention and sliding windows. Pairwise masks
and biases are read in place with strides.

A job is one (group of output entries sharing their keys and values, query tile): grouped
query heads read each key and value tile once per group. :data:`exact_kernel` launches the
jobs in chunks so that a long call stays interruptible (:class:`._launch.Chunked`), each
chunk split over the threads.
"""

import functools

import numpy as np
from numba import njit

from .. import _config
from .._threads import num_threads
from ._jit import jit
from ._launch import Chunked, Threaded
from ._softmax import _maxnum, exp_columns, exp_shift_sum, row_max
from ._tiles import gemm_tiles, panel_width


@jit()
def _tile_of(slot, n_tiles):
    """Return the query tile of job slot ``slot``: tiles 0, n-1, 1, n-2, ... (n = ``n_tiles``).

    Causal tile ``t`` costs about ``t + 1`` key tiles, so tiles ``t`` and ``n - 1 - t`` together
    cost the same for every ``t``. Each thread takes one contiguous run of slots
    (:class:`._launch.Threaded`), so in this order each gets the same work, where in tile
    order the thread with the last tiles got three quarters of the triangle. The tiles are independent: the order
    changes no result.
    """
    half = slot // 2
    return half if slot % 2 == 0 else n_tiles - 1 - half


@jit()
def _job_tile(job, n_tiles, query_tile, n_q, members, group_start, kv_index):
    """``(first, size, bk, i0, i1)`` of job ``job`` of the exact kernels: its group's first
    member slot and size, the key set the group reads, and its query rows ``i0 <= i < i1``
    (tile :func:`_tile_of` of the job's slot)."""
    group = job // n_tiles
    first = group_start[group]
    size = group_start[group + 1] - first
    i0 = _tile_of(job % n_tiles, n_tiles) * query_tile
    return first, size, kv_index[members[first]], i0, min(n_q, i0 + query_tile)


def _tile_order(n_tiles):
    """:func:`_tile_of` of every slot ``0 .. n_tiles - 1``."""
    slot = np.arange(n_tiles)
    return np.where(slot % 2 == 0, slot // 2, n_tiles - 1 - slot // 2)


@njit(cache=_config.CACHE, fastmath=_config.FASTMATH | {"nnan"})
def online_softmax_columns(scores, n_keys, run_max, run_sum, acc_t, tile_max, shift, rescale):
    """One key tile's step of the online softmax, key-major: ``scores[:n_keys]`` (one row per
    key, one column per query) becomes the tile's unnormalised weights, in place.

    Each column's running maximum ``run_max`` rises to the tile's maximum; where it rises,
    the column's running sum ``run_sum`` and its accumulated weighted values ``acc_t[:, i]``
    (one row per value feature) are rescaled by ``exp(old - new)``. The weights are
    ``exp(score - run_max)`` (0 for a column still all ``-inf``) and their sums are added to
    ``run_sum``. Every pass runs along contiguous rows, across the queries; the maximum is
    LLVM's ``maxnum`` as in :func:`._softmax.softmax_columns`. ``tile_max``, ``shift`` and
    ``rescale`` are scratch, one entry per column.
    """
    width = scores.shape[1]
    for i in range(width):
        tile_max[i] = run_max[i]
    for j in range(n_keys):
        for i in range(width):
            tile_max[i] = _maxnum(tile_max[i], scores[j, i])
    grew = False
    for i in range(width):
        new = tile_max[i]
        rescale[i] = 1
        if new > run_max[i]:  # so new > -inf; exp(-inf - new) = 0 for a column's first keys
            rescale[i] = np.exp(run_max[i] - new)
            run_sum[i] *= rescale[i]
            run_max[i] = new
            grew = True
        shift[i] = new if new > -np.inf else 0  # all masked so far: exp(-inf) = 0
    if grew:
        for f in range(acc_t.shape[0]):
            for i in range(width):
                acc_t[f, i] *= rescale[i]
    exp_columns(scores, n_keys, shift, run_sum)


@jit(nogil=True)
def exact_tiles(job_lo, job_hi, query_tile, key_tile, members, group_start, q, k, v, q_index, kv_index, pad,
                has_pad, mask_flat, mask_off, mask_si, mask_sj, has_attn_mask, bias_flat, bias_off, bias_si, bias_sj,
                has_bias, scale, causal, offset, left, right, out, lse):
    """Write softmax(scale q k^T + bias) v into ``out`` (B, n_q, dv), its lse into ``lse`` (B, n_q).

    Jobs ``job_lo <= job < job_hi`` run (``job = group * n_tiles + slot``, the query tile of a
    slot given by :func:`_tile_of`). A group is the output entries
    ``members[group_start[group]:group_start[group + 1]]``, all reading the same keys and
    values (:func:`_groups`); entry ``b`` reads the query rows ``q[q_index[b]]`` and the keys
    and values ``k[kv_index[b]]``, ``v[kv_index[b]]``: a broadcast or grouped-head call reads
    each row set where it lies. A job walks its key tiles once and runs every member's query
    tile against each, so grouped heads read their keys and values once per group, not once
    per query head. Each entry's arithmetic (its products, in the same shapes, and its
    softmax passes) is the same whatever group it is in: groups change no bit of the result.

    Layout (as FMA's block kernel and exact attention's backward): logits key-major,
    ``scores[key, query]``, with the tile's queries scaled, transposed and padded to a
    multiple of the micro-kernel's panel width (:func:`._tiles.panel_width`), so both products
    run on :func:`._tiles.gemm_tiles` reading keys and values a row at a time where they lie
    (no copy, no BLAS call): ``scores = k_tile (scale q)^T``, then ``acc_t[feature, query] +=
    v_tile^T weights``. The online softmax runs along the contiguous query rows
    (:func:`online_softmax_columns`). Padding columns score 0 and are never written.

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
    d = q.shape[2]
    dv = v.shape[2]
    n_tiles = (n_q + query_tile - 1) // query_tile
    panel = panel_width(q)
    if causal:
        right = min(right, 0)
    # flat views: gemm_tiles is compiled for one operand layout only (see cpu/blocks.py)
    k_flat = k.reshape(k.size)
    v_flat = v.reshape(v.size)
    minus_inf = q.dtype.type(-np.inf)
    for job in range(job_lo, job_hi):
        first, size, bk, i0, i1 = _job_tile(job, n_tiles, query_tile, n_q, members, group_start, kv_index)
        rows = i1 - i0
        width = -(-rows // panel) * panel  # the tile's queries, padded (no wider: a short call's work)
        # keys any query of the tile may see: [first - left, last + right]
        key_start = max(0, offset + i0 - left)
        key_end = min(n_k, offset + i1 + right)  # offset + (i1 - 1) + right + 1
        span = min(key_tile, max(key_end - key_start, 0))
        queries_t = np.empty(size * d * width, dtype=q.dtype)  # per member: scale q^T (d, width)
        acc_flat = np.zeros(size * dv * width, dtype=q.dtype)  # per member: (dv, width)
        acc_t = acc_flat.reshape((size, dv, width))
        run_max = np.full((size, width), minus_inf, dtype=q.dtype)
        run_sum = np.zeros((size, width), dtype=q.dtype)
        scores_flat = np.empty(max(span, 1) * width, dtype=q.dtype)
        scores = scores_flat.reshape((max(span, 1), width))
        tile_max = np.empty(width, dtype=q.dtype)
        shift = np.empty(width, dtype=q.dtype)
        rescale = np.empty(width, dtype=q.dtype)
        for e in range(size):
            bq = q_index[members[first + e]]
            base = e * d * width
            for f in range(d):
                for i in range(rows):
                    queries_t[base + f * width + i] = q[bq, i0 + i, f] * scale
                for i in range(rows, width):
                    queries_t[base + f * width + i] = 0
        for j0 in range(key_start, key_end, key_tile):
            j1 = min(key_end, j0 + key_tile)
            nk = j1 - j0
            for e in range(size):
                b = members[first + e]
                # scores[key, query] = k . (scale q)
                gemm_tiles(nk, width, d, k_flat, (bk * n_k + j0) * d, d, 1, queries_t, e * d * width, width,
                           scores_flat, 0, width, False)
                if has_bias:
                    for i in range(rows):
                        base = bias_off[b] + (i0 + i) * bias_si + j0 * bias_sj
                        for j in range(nk):
                            scores[j, i] += bias_flat[base + j * bias_sj]
                # select, never add: a masked key may hold inf or NaN (its logit too)
                if has_pad:
                    for j in range(nk):
                        if not pad[b, j0 + j]:
                            for i in range(width):
                                scores[j, i] = minus_inf
                if has_attn_mask:
                    for i in range(rows):
                        base = mask_off[b] + (i0 + i) * mask_si + j0 * mask_sj
                        for j in range(nk):
                            if not mask_flat[base + j * mask_sj]:
                                scores[j, i] = minus_inf
                # key j0 + j is seen by the columns j0 + j - right <= offset + i0 + i <= j0 + j + left
                for j in range(nk):
                    lo = j0 + j - right - offset - i0  # first column that sees it (may be < 0)
                    hi = j0 + j + left - offset - i0 + 1  # one past the last
                    if lo > 0:
                        for i in range(min(lo, width)):
                            scores[j, i] = minus_inf
                    if hi < width:
                        for i in range(max(hi, 0), width):
                            scores[j, i] = minus_inf
                online_softmax_columns(scores, nk, run_max[e], run_sum[e], acc_t[e], tile_max, shift, rescale)
                # acc_t[feature, query] += sum over keys of v[key, feature] weight[key, query]
                gemm_tiles(dv, width, nk, v_flat, (bk * n_k + j0) * dv, 1, dv, scores_flat, 0, width,
                           acc_flat, e * dv * width, width, True)
        for e in range(size):
            b = members[first + e]
            for i in range(rows):
                total = run_sum[e, i]
                if total > 0:
                    for f in range(dv):
                        out[b, i0 + i, f] = acc_t[e, f, i] / total
                    lse[b, i0 + i] = run_max[e, i] + np.log(total)
                else:
                    for f in range(dv):
                        out[b, i0 + i, f] = 0
                    lse[b, i0 + i] = -np.inf


@jit(nogil=True)
def exact_tiles_blas(job_lo, job_hi, query_tile, key_tile, members, group_start, q, k, v, q_index, kv_index, pad,
                has_pad, mask_flat, mask_off, mask_si, mask_sj, has_attn_mask, bias_flat, bias_off, bias_si, bias_sj,
                has_bias, scale, causal, offset, left, right, out, lse):
    """:func:`exact_tiles` with its two products by BLAS (``np.dot``) on query-major tiles:
    the same arguments and contract. Scores ``q_tile k_tile^T`` one query row at a time
    through the masks and the online softmax (a vectorised max, a fused exp-and-sum per
    row), then ``acc += weights @ v_tile``. The dtypes not in
    ``_config.EXACT_MICRO_KERNEL_DTYPES`` run here (none by default: on a quiet machine the
    micro-kernel beat OpenBLAS's small products in float64 too, docs/performance.rst); the
    caller pins BLAS to one thread around it (:func:`calls_blas`).
    """
    n_q = q.shape[1]
    n_k = k.shape[1]
    d = q.shape[2]
    dv = v.shape[2]
    n_tiles = (n_q + query_tile - 1) // query_tile
    if causal:
        right = min(right, 0)
    for job in range(job_lo, job_hi):
        first, size, bk, i0, i1 = _job_tile(job, n_tiles, query_tile, n_q, members, group_start, kv_index)
        rows = i1 - i0
        q_tiles = np.empty((size, rows, d), dtype=q.dtype)
        for e in range(size):
            q_tiles[e] = q[q_index[members[first + e]], i0:i1] * scale
        acc = np.zeros((size, rows, dv), dtype=q.dtype)
        run_max = np.full((size, rows), -np.inf, dtype=q.dtype)
        run_sum = np.zeros((size, rows), dtype=q.dtype)
        # keys any query of the tile may see: [first - left, last + right]
        key_start = max(0, offset + i0 - left)
        key_end = min(n_k, offset + i1 + right)  # offset + (i1 - 1) + right + 1
        for j0 in range(key_start, key_end, key_tile):
            j1 = min(key_end, j0 + key_tile)
            k_tile = k[bk, j0:j1].T
            v_tile = v[bk, j0:j1]
            for e in range(size):
                b = members[first + e]
                scores = np.dot(q_tiles[e], k_tile)
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
                    new_max = max(run_max[e, i], row_max(row))
                    if new_max == -np.inf:
                        row[:] = 0
                        continue
                    if new_max > run_max[e, i]:
                        rescale = np.exp(run_max[e, i] - new_max)
                        run_sum[e, i] *= rescale
                        acc[e, i] *= rescale
                        run_max[e, i] = new_max
                    run_sum[e, i] += exp_shift_sum(row, new_max)
                acc[e] += np.dot(scores, v_tile)
        for e in range(size):
            b = members[first + e]
            for i in range(rows):
                if run_sum[e, i] > 0:
                    out[b, i0 + i] = acc[e, i] / run_sum[e, i]
                    lse[b, i0 + i] = run_max[e, i] + np.log(run_sum[e, i])
                else:
                    out[b, i0 + i] = 0
                    lse[b, i0 + i] = -np.inf


def _groups(kv_index, n_tiles, cap, threads):
    """Split the output entries into groups that share their keys and values.

    Returns ``members`` (the entries, grouped, int64) and ``group_start`` (``n_groups + 1``
    offsets into it). The entries reading one key/value set are cut into near-equal groups of
    at most ``cap`` (a group's query and output tiles stay in the L2 cache beside the key
    and value tiles), and into smaller groups while that leaves fewer than ``4 * threads``
    jobs (a short call with a few large groups would leave threads idle). Which entries
    share a job changes no result.
    """
    # plain Python: B is small and this runs on every call (NumPy's per-call costs were ~10x more)
    kv = kv_index.tolist()
    order = list(range(len(kv)))
    if any(x > y for x, y in zip(kv, kv[1:])):
        order.sort(key=kv.__getitem__)  # stable: entries of one key set keep their order
    runs = []
    for pos, entry in enumerate(order):
        if pos and kv[entry] == kv[order[pos - 1]]:
            runs[-1] += 1
        else:
            runs.append(1)
    want_jobs = min(len(kv) * n_tiles, 4 * threads)
    size = max(1, min(int(cap), max(runs, default=1)))
    while size > 1 and sum(-(-run // size) for run in runs) * n_tiles < want_jobs:
        size -= 1
    start = [0]
    for run in runs:
        parts = -(-run // size)
        for part in range(parts):  # near-equal parts, the first (run % parts) one larger
            start.append(start[-1] + run // parts + (part < run % parts))
    return np.array(order, dtype=np.int64), np.array(start, dtype=np.int64)


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
    """Tile sizes from ``_config`` (read now: ``EXACT_LONG_QUERY_TILE`` for a float32 call
    with long queries and keys), the number of jobs and their multiply-adds (a tile reads only the keys its
    queries may see).
    """
    # long queries too: a few query tiles over many keys need the short tile's jobs for the threads
    long = q.dtype == np.float32 and min(q.shape[1], k.shape[1]) >= int(_config.EXACT_LONG_KEYS)
    query_tile = max(1, int(_config.EXACT_LONG_QUERY_TILE if long else _config.EXACT_QUERY_TILE))
    key_tile = max(1, int(_config.EXACT_KEY_TILE))
    # kv_index by value: one plan per call shape, a few microseconds instead of tens
    kv_bytes = np.ascontiguousarray(kv_index, dtype=np.int64).tobytes()
    members, group_start, n_jobs, total, per_tile, sizes = _job_plan(
        q.shape[1], k.shape[1], q.shape[2] + v.shape[2], query_tile, bool(causal), int(offset), int(left),
        int(right), kv_bytes, int(_config.EXACT_GROUP_ENTRIES), num_threads())

    def cumulative():
        in_order = per_tile[_tile_order(per_tile.size)]
        return np.concatenate(([0.0], np.cumsum(np.outer(sizes, in_order).ravel())))

    return (query_tile, key_tile, members, group_start), n_jobs, total, cumulative


@functools.lru_cache(maxsize=_config.PLAN_CACHE_SIZE * 8)
def _job_plan(n_q, n_k, width, query_tile, causal, offset, left, right, kv_bytes, cap, threads):
    """The jobs of one call shape: ``(members, group_start, n_jobs, total, per_tile, sizes)``
    (:func:`_groups`; the multiply-adds of the jobs and of each query tile; the size of each
    group). The arrays are read-only: the cache hands the same ones to every call."""
    n_tiles = -(-n_q // query_tile)
    members, group_start = _groups(np.frombuffer(kv_bytes, dtype=np.int64), n_tiles, cap, threads)
    sizes = np.diff(group_start).astype(np.float64)
    rows, keys = _key_span(n_q, n_k, query_tile, causal, offset, left, right)
    per_tile = (rows * keys * width).astype(np.float64)
    for arr in (members, group_start, per_tile, sizes):
        arr.setflags(write=False)
    return members, group_start, sizes.size * n_tiles, float(sizes.sum()) * float(per_tile.sum()), per_tile, sizes


def calls_blas(dtype):
    """Whether exact attention's forward in ``dtype`` calls BLAS (``np.dot``): the dtypes
    not in ``_config.EXACT_MICRO_KERNEL_DTYPES`` (read now). The caller then pins BLAS to
    one thread (:func:`._launch.launch_guard`)."""
    return _calls_blas(np.dtype(dtype), tuple(_config.EXACT_MICRO_KERNEL_DTYPES))


@functools.lru_cache(maxsize=16)
def _calls_blas(dtype, micro_kernel_dtypes):
    return dtype.name not in micro_kernel_dtypes  # dtype.name costs microseconds: asked twice a call


class _Kernels:
    """The forward kernel for the dtype of ``q``: ``(job_lo, job_hi, query_tile, key_tile,
    members, group_start, q, *args)`` runs the jobs ``job_lo <= job < job_hi`` of
    :func:`exact_tiles`, or of :func:`exact_tiles_blas` where :func:`calls_blas` says so,
    split over the threads (:class:`._launch.Threaded`: one contiguous range each, as
    ``prange``'s static schedule split them). Each compiles only the dtypes that reach it.
    """

    def __call__(self, job_lo, job_hi, query_tile, key_tile, members, group_start, q, k, v, *args):
        # looked up at call time, so that a kernel patched into the module takes effect
        kernel = exact_tiles_blas if calls_blas(q.dtype) else exact_tiles
        # multiply-adds if every job saw every key (at most twice the causal work): it only
        # decides whether waking a thread is worth it
        work = (job_hi - job_lo) * query_tile * k.shape[1] * (q.shape[2] + v.shape[2])
        Threaded(kernel, None).launch(job_hi - job_lo, work, query_tile, key_tile, members, group_start, q, k, v,
                                      *args, first=job_lo)

    @property
    def signatures(self):
        """The compiled variants of both kernels."""
        return list(exact_tiles.signatures) + list(exact_tiles_blas.signatures)


#: ``exact_kernel(q, k, v, q_index, kv_index, pad, has_pad, mask_flat, mask_off, mask_si, mask_sj,
#: has_attn_mask, bias_flat, bias_off, bias_si, bias_sj, has_bias, scale, causal, offset, left, right,
#: out, lse)``: every tile.
exact_kernel = Chunked(_Kernels(), _layout, group=2)
