"""The tiled joint-softmax attention kernel shared by exact attention and FMA.

One CUDA block owns a tile of query rows (one thread per row) of one batch entry. It walks
the keys of its *plan* (for exact attention: every key, or every key up to the tile's last
query when causal; for FMA: the segments of :attr:`fmm_attention.FMMTree.key_plan`, exact
tokens and coarse rows) in tiles staged through shared memory, and keeps a flash-style
online softmax per query: a running maximum, denominator and weighted sum of values.
Near and far field therefore share one maximum and one denominator: one joint softmax.

Every output row is written by exactly one thread and every sum runs in a fixed order, so
results are deterministic (no atomics).
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

from ..tree import TOKEN
from . import _device

# A module global (not a closure variable): the CUDA simulator swaps module globals that
# hold numba.cuda for its fake module while a kernel runs.
cuda = _device.cuda_module()


@cuda.jit
def nonfinite(x, flag):
    """Set ``flag[0] = 1`` if any element of ``x`` (1-D) is NaN or infinite.

    Every writer stores the same value, so the race is benign and the result deterministic.
    """
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        if not math.isfinite(x[i]):
            flag[0] = 1


def all_finite(arr):
    """True if the device array ``arr`` holds no NaN or infinity (one pass, a 4-byte read back)."""
    flat = arr.reshape(arr.size)
    flag = _device.cuda_module().to_device(np.zeros(1, dtype=np.int32))
    threads = _device.threads_per_block()
    nonfinite[_device.grid(flat.size, threads), threads](flat, flag)
    return int(flag.copy_to_host()[0]) == 0


@functools.cache
def attention_kernel(dtype_str):
    """The attention kernel compiled for one float dtype (``"float32"`` or ``"float64"``)."""
    dtype = np.dtype(dtype_str)
    nb_dtype = numba.from_dtype(dtype)
    neg_inf = dtype.type(-np.inf)
    zero = dtype.type(0)

    @cuda.jit
    def attention(q, k, v, valid, has_mask, kc, vc, cbias, ptr, segments, exact, plan_block,
                  tile_rows, key_tile, causal, scale, inherit, inh_max, inh_sum, inh_num, out, lse):
        """Joint online softmax of every query tile over its planned keys.

        Parameters
        ----------
        q, k, v : (B, n, d), (B, n, d), (B, n, dv) inputs.
        valid, has_mask : (B, n) key validity, read only when ``has_mask``.
        kc, vc, cbias : coarse keys, values and logit biases (B, C, .) of the FMA far field.
        ptr, segments : the key plan: segments ``ptr[I]:ptr[I+1]`` of plan block ``I`` are
            ``(kind, start, count)`` rows (unused when ``exact``).
        exact : one token segment of all keys (``[0, n)``) for every plan block.
        plan_block : query rows per plan block (the FMA block size; the tile for exact).
        tile_rows, key_tile : query rows per CUDA block (``blockDim.x``) and keys per tile.
        causal : mask token keys after each query.
        scale : logit scale, applied to the query when it is staged.
        inherit, inh_max, inh_sum, inh_num : a ready far-field partial per plan block (coarse
            queries), the initial state of the online softmax.
        out, lse : (B, n, dv) and (B, n) outputs.
        """
        n_batch = q.shape[0]
        n = q.shape[1]
        d = q.shape[2]
        dv = v.shape[2]
        if exact:
            n_plan = (n + plan_block - 1) // plan_block
        else:
            n_plan = ptr.shape[0] - 1
        tiles = (plan_block + tile_rows - 1) // tile_rows
        per_batch = n_plan * tiles
        n_jobs = n_batch * per_batch
        # dynamic shared memory: queries | accumulators | scores | key tile | value tile | bias tile.
        # Per-thread rows are padded by one element, so that threads reading element e of
        # their own row hit different banks (a stride of d = 64 would serialise them).
        shared = cuda.shared.array(0, dtype=nb_dtype)
        o_acc = tile_rows * (d + 1)
        o_score = o_acc + tile_rows * (dv + 1)
        o_key = o_score + tile_rows * (key_tile + 1)
        o_val = o_key + key_tile * d
        o_bias = o_val + key_tile * dv
        tid = cuda.threadIdx.x
        n_threads = cuda.blockDim.x
        o_q = tid * (d + 1)
        o_my_acc = o_acc + tid * (dv + 1)
        o_my_score = o_score + tid * (key_tile + 1)
        for job in range(cuda.blockIdx.x, n_jobs, cuda.gridDim.x):  # block-uniform loop
            b = job // per_batch
            blk = (job % per_batch) // tiles
            i0 = blk * plan_block + (job % tiles) * tile_rows
            block_end = (blk + 1) * plan_block
            if block_end > n:
                block_end = n
            rows = block_end - i0
            if rows > tile_rows:
                rows = tile_rows
            if rows <= 0:
                continue
            last = i0 + rows - 1
            i = i0 + tid
            active = tid < rows
            cuda.syncthreads()  # the previous job is done with shared memory
            run_max = neg_inf
            run_sum = zero
            if active:
                for e in range(d):
                    shared[o_q + e] = q[b, i, e] * scale
                if inherit:
                    run_max = inh_max[b, blk]
                    run_sum = inh_sum[b, blk]
                    for e in range(dv):
                        shared[o_my_acc + e] = inh_num[b, blk, e]
                else:
                    for e in range(dv):
                        shared[o_my_acc + e] = zero
            if exact:
                seg_lo = 0
                seg_hi = 1
            else:
                seg_lo = ptr[blk]
                seg_hi = ptr[blk + 1]
            for s in range(seg_lo, seg_hi):
                if exact:
                    kind = TOKEN
                    start = 0
                    count = n
                else:
                    kind = segments[s, 0]
                    start = segments[s, 1]
                    count = segments[s, 2]
                if causal and kind == TOKEN and last + 1 - start < count:
                    count = last + 1 - start  # keys after the tile's last query are all masked
                for j0 in range(0, count, key_tile):
                    c = count - j0
                    if c > key_tile:
                        c = key_tile
                    first = start + j0
                    cuda.syncthreads()  # every thread is done with the previous tile
                    if kind == TOKEN:
                        for idx in range(tid, c * d, n_threads):
                            shared[o_key + idx] = k[b, first + idx // d, idx % d]
                        for idx in range(tid, c * dv, n_threads):
                            shared[o_val + idx] = v[b, first + idx // dv, idx % dv]
                        for idx in range(tid, c, n_threads):
                            if has_mask and not valid[b, first + idx]:
                                shared[o_bias + idx] = neg_inf
                            else:
                                shared[o_bias + idx] = zero
                    else:
                        for idx in range(tid, c * d, n_threads):
                            shared[o_key + idx] = kc[b, first + idx // d, idx % d]
                        for idx in range(tid, c * dv, n_threads):
                            shared[o_val + idx] = vc[b, first + idx // dv, idx % dv]
                        for idx in range(tid, c, n_threads):
                            shared[o_bias + idx] = cbias[b, first + idx]
                    cuda.syncthreads()
                    if active:
                        tile_max = neg_inf
                        for j in range(c):
                            x = shared[o_bias + j]
                            if x != neg_inf:
                                if causal and kind == TOKEN and first + j > i:
                                    x = neg_inf
                                else:
                                    dot = zero
                                    for e in range(d):
                                        dot += shared[o_q + e] * shared[o_key + j * d + e]
                                    x = dot + x
                            shared[o_my_score + j] = x
                            if x > tile_max:
                                tile_max = x
                        if tile_max > run_max:
                            if run_max == neg_inf:
                                factor = zero
                            else:
                                factor = math.exp(run_max - tile_max)
                            run_sum = run_sum * factor
                            for e in range(dv):
                                shared[o_my_acc + e] = shared[o_my_acc + e] * factor
                            run_max = tile_max
                        if run_max != neg_inf:
                            for j in range(c):
                                x = shared[o_my_score + j]
                                if x != neg_inf:
                                    w = math.exp(x - run_max)
                                    run_sum += w
                                    for e in range(dv):
                                        shared[o_my_acc + e] += w * shared[o_val + j * dv + e]
            if active:
                if run_sum > zero:
                    for e in range(dv):
                        out[b, i, e] = shared[o_my_acc + e] / run_sum
                    lse[b, i] = run_max + math.log(run_sum)
                else:
                    for e in range(dv):
                        out[b, i, e] = zero
                    lse[b, i] = neg_inf

    return attention


def attend(batch, *, causal, scale, exact, plan_block, plan=None, coarse=None, inherit=None):
    """Launch the attention kernel; returns ``(out, lse)`` device arrays ``(B, n, dv)``, ``(B, n)``.

    Parameters
    ----------
    batch : DeviceBatch
    causal : bool
    scale : float
    exact : bool
        All keys for every query (exact attention) instead of a plan.
    plan_block : int
        Query rows per plan block.
    plan : (ptr, segments) device arrays, optional
        The key plan (FMA).
    coarse : (kc, vc, cbias) device arrays, optional
        Coarse buffers the plan's ``COARSE`` segments index.
    inherit : (part_max, part_sum, part_num) device arrays, optional
        Far-field partials indexed by plan block (coarse queries).
    """
    dtype = batch.dtype
    B, n, dv = batch.batch, batch.n, batch.dv
    out = _device.empty((B, n, dv), dtype)
    lse = _device.empty((B, n), dtype)
    if B == 0:
        return out, lse
    tiles = _device.attention_tiles(batch.d, dv, dtype.itemsize, plan_block)
    if exact:
        plan_block = tiles.rows
    has_mask = batch.valid is not None
    valid = batch.valid if has_mask else _device.dummy(2, np.bool_)
    ptr, segments = plan if plan is not None else (_device.dummy(1, np.int64), _device.dummy(2, np.int64))
    kc, vc, cbias = coarse if coarse is not None else (_device.dummy(3, dtype), _device.dummy(3, dtype), _device.dummy(2, dtype))
    use_inherit = inherit is not None
    inh_max, inh_sum, inh_num = inherit if use_inherit else (_device.dummy(2, dtype), _device.dummy(2, dtype), _device.dummy(3, dtype))
    n_plan = -(-n // plan_block) if exact else ptr.shape[0] - 1
    n_jobs = B * n_plan * -(-plan_block // tiles.rows)
    kernel = attention_kernel(dtype.name)
    kernel[_device.grid(n_jobs, 1), tiles.rows, 0, tiles.shared_bytes](
        batch.q, batch.k, batch.v, valid, has_mask, kc, vc, cbias, ptr, segments, exact, plan_block,
        tiles.rows, tiles.keys, causal, dtype.type(scale), use_inherit, inh_max, inh_sum, inh_num, out, lse,
    )
    return out, lse
