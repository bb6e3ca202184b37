"""Fastformer additive attention on the GPU: parallel reductions, and a chunked scan when causal.

Semantics as :func:`fmm_attention.fastformer_attention` (:doc:`/semantics`). The
sequence is cut into chunks of ``CUDA_THREADS_PER_BLOCK * CUDA_FASTFORMER_ITEMS_PER_THREAD``
positions (kernel settings).

A *softmax pool* of rows ``x_i`` (optionally multiplied element-wise by ``mul_i``) by logits
``l_i`` is built from four kernels, each writing its own outputs in a fixed order (no
atomics, deterministic):

1. :func:`logits`: one thread per position, ``l_i = (x_i [* mul_i]) . w`` (``-inf`` when masked);
2. :func:`chunk_max_sum`: one block per chunk, a shared-memory tree reduction of the chunk's
   maximum, then of ``sum exp(l_i - max)`` (the weights are kept);
3. :func:`chunk_vec`: one thread per (chunk, channel), the chunk's weighted sum of rows;
4. bidirectional: :func:`merge` (one thread per channel) combines the chunk partials by
   log-sum-exp; causal: :func:`carry_scan` turns them into each chunk's exclusive prefix
   partial, and :func:`chunk_scan` (one thread per chunk and channel) walks the chunk from
   that carry with an online softmax (running maximum; sums rescaled when it grows), writing
   the prefix pool at every position.

Bidirectional: ``qg = pool(q; s q.w_q)``, ``kg = qg * pool(k; k.(s qg*w_k))``, ``u = kg * v``.
Causal: ``qg(i)`` by the scan, then ``p_j = qg(j) * k_j`` pooled by a second scan into ``kg(i)``.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numba
import numpy as np

from .. import _config, _validate
from . import _device
from ._attention import all_finite

cuda = _device.cuda_module()  # a module global, so that the CUDA simulator can swap it


@functools.cache
def kernels(dtype_str):
    """The Fastformer kernels compiled for one float dtype."""
    dtype = np.dtype(dtype_str)
    nb_dtype = numba.from_dtype(dtype)
    neg_inf = dtype.type(-np.inf)
    zero = dtype.type(0)

    @cuda.jit
    def scaled_vector(w, scale, out):
        """``out[b, e] = w[b, e] * scale``."""
        n_batch, d = out.shape
        for job in range(cuda.grid(1), n_batch * d, cuda.gridsize(1)):
            b = job // d
            e = job % d
            out[b, e] = w[b, e] * scale

    @cuda.jit
    def key_vector(qg, w_k, scale, out):
        """``out[b, e] = qg[b, e] * w_k[b, e] * scale``: then ``s (qg * k_i) . w_k = k_i . out``."""
        n_batch, d = out.shape
        for job in range(cuda.grid(1), n_batch * d, cuda.gridsize(1)):
            b = job // d
            e = job % d
            out[b, e] = qg[b, e] * w_k[b, e] * scale

    @cuda.jit
    def logits(x, mul, use_mul, w, valid, has_mask, out):
        """``out[b, i] = sum_e x[b,i,e] [* mul[b,i,e]] * w[b,e]``, ``-inf`` for masked positions."""
        n_batch, n, d = x.shape
        for job in range(cuda.grid(1), n_batch * n, cuda.gridsize(1)):
            b = job // n
            i = job % n
            if has_mask and not valid[b, i]:
                out[b, i] = neg_inf
                continue
            total = zero
            for e in range(d):
                if use_mul:
                    total += x[b, i, e] * mul[b, i, e] * w[b, e]
                else:
                    total += x[b, i, e] * w[b, e]
            out[b, i] = total

    @cuda.jit
    def chunk_max_sum(logit, chunk, part_max, part_sum, weight):
        """Per (batch, chunk) block: tree reductions of the chunk's max and ``sum exp(l - max)``.

        Also writes the weights ``exp(l_i - max)`` (0 for masked positions).
        """
        n_batch, n = logit.shape
        n_chunks = part_max.shape[1]
        shared = cuda.shared.array(0, dtype=nb_dtype)
        tid = cuda.threadIdx.x
        n_threads = cuda.blockDim.x
        for job in range(cuda.blockIdx.x, n_batch * n_chunks, cuda.gridDim.x):  # block-uniform
            b = job // n_chunks
            c = job % n_chunks
            i0 = c * chunk
            i1 = i0 + chunk
            if i1 > n:
                i1 = n
            top = neg_inf
            for i in range(i0 + tid, i1, n_threads):
                if logit[b, i] > top:
                    top = logit[b, i]
            cuda.syncthreads()  # the previous job is done with shared memory
            shared[tid] = top
            step = 1
            while step < n_threads:
                cuda.syncthreads()
                if tid % (2 * step) == 0 and tid + step < n_threads:
                    if shared[tid + step] > shared[tid]:
                        shared[tid] = shared[tid + step]
                step *= 2
            cuda.syncthreads()
            top = shared[0]
            total = zero
            for i in range(i0 + tid, i1, n_threads):
                x = logit[b, i]
                w = zero
                if x != neg_inf:
                    w = math.exp(x - top)
                weight[b, i] = w
                total += w
            cuda.syncthreads()  # everyone has read shared[0]
            shared[tid] = total
            step = 1
            while step < n_threads:
                cuda.syncthreads()
                if tid % (2 * step) == 0 and tid + step < n_threads:
                    shared[tid] += shared[tid + step]
                step *= 2
            cuda.syncthreads()
            if tid == 0:
                part_max[b, c] = top
                part_sum[b, c] = shared[0]

    @cuda.jit
    def chunk_vec(x, mul, use_mul, weight, chunk, part_vec):
        """``part_vec[b, c, e] = sum_{i in chunk c} weight[b, i] * x[b, i, e] [* mul[b, i, e]]``."""
        n_batch, n, d = x.shape
        n_chunks = part_vec.shape[1]
        per_batch = n_chunks * d
        for job in range(cuda.grid(1), n_batch * per_batch, cuda.gridsize(1)):
            b = job // per_batch
            c = (job % per_batch) // d
            e = job % d
            i1 = (c + 1) * chunk
            if i1 > n:
                i1 = n
            total = zero
            for i in range(c * chunk, i1):
                if use_mul:
                    total += weight[b, i] * (x[b, i, e] * mul[b, i, e])
                else:
                    total += weight[b, i] * x[b, i, e]
            part_vec[b, c, e] = total

    @cuda.jit
    def merge(part_max, part_sum, part_vec, pooled):
        """Log-sum-exp merge of the chunk partials: ``pooled[b, e]`` (0 with no valid position)."""
        n_batch, n_chunks = part_max.shape
        d = pooled.shape[1]
        for job in range(cuda.grid(1), n_batch * d, cuda.gridsize(1)):
            b = job // d
            e = job % d
            top = neg_inf
            for c in range(n_chunks):
                if part_max[b, c] > top:
                    top = part_max[b, c]
            total = zero
            acc = zero
            if top != neg_inf:
                for c in range(n_chunks):
                    if part_max[b, c] != neg_inf:
                        r = math.exp(part_max[b, c] - top)
                        total += r * part_sum[b, c]
                        acc += r * part_vec[b, c, e]
            if total > zero:
                pooled[b, e] = acc / total
            else:
                pooled[b, e] = zero

    @cuda.jit
    def carry_scan(part_max, part_sum, part_vec, carry_max, carry_sum, carry_vec):
        """Exclusive prefix of the chunk partials: the state each chunk starts from."""
        n_batch, n_chunks = part_max.shape
        d = part_vec.shape[2]
        for job in range(cuda.grid(1), n_batch * d, cuda.gridsize(1)):
            b = job // d
            e = job % d
            run_max = neg_inf
            run_sum = zero
            acc = zero
            for c in range(n_chunks):
                if e == 0:
                    carry_max[b, c] = run_max
                    carry_sum[b, c] = run_sum
                carry_vec[b, c, e] = acc
                m = part_max[b, c]
                if m != neg_inf:
                    if m > run_max:
                        shrink = zero
                        if run_max != neg_inf:
                            shrink = math.exp(run_max - m)
                        run_sum = run_sum * shrink + part_sum[b, c]
                        acc = acc * shrink + part_vec[b, c, e]
                        run_max = m
                    else:
                        r = math.exp(m - run_max)
                        run_sum += r * part_sum[b, c]
                        acc += r * part_vec[b, c, e]

    @cuda.jit
    def chunk_scan(x, mul, use_mul, logit, chunk, carry_max, carry_sum, carry_vec, pooled):
        """Prefix pools inside each chunk, from the chunk's carry: ``pooled[b, i, e]``.

        Online softmax over the positions of the chunk: when the running maximum grows, the
        running sums are rescaled by ``exp(old - new) <= 1``, so no exponential overflows.
        """
        n_batch, n, d = x.shape
        n_chunks = carry_max.shape[1]
        per_batch = n_chunks * d
        for job in range(cuda.grid(1), n_batch * per_batch, cuda.gridsize(1)):
            b = job // per_batch
            c = (job % per_batch) // d
            e = job % d
            run_max = carry_max[b, c]
            run_sum = carry_sum[b, c]
            acc = carry_vec[b, c, e]
            i1 = (c + 1) * chunk
            if i1 > n:
                i1 = n
            for i in range(c * chunk, i1):
                a = logit[b, i]
                if a != neg_inf:
                    top = run_max
                    if a > top:
                        top = a
                    shrink = zero
                    if run_max != neg_inf:
                        shrink = math.exp(run_max - top)
                    w = math.exp(a - top)
                    if use_mul:
                        xe = x[b, i, e] * mul[b, i, e]
                    else:
                        xe = x[b, i, e]
                    run_sum = run_sum * shrink + w
                    acc = acc * shrink + w * xe
                    run_max = top
                if run_sum > zero:
                    pooled[b, i, e] = acc / run_sum
                else:
                    pooled[b, i, e] = zero

    @cuda.jit
    def hadamard(a, b_, out):
        """``out = a * b_`` element-wise (2-D)."""
        rows, d = out.shape
        for job in range(cuda.grid(1), rows * d, cuda.gridsize(1)):
            out[job // d, job % d] = a[job // d, job % d] * b_[job // d, job % d]

    @cuda.jit
    def modulate(kg, per_position, v, out):
        """``out[b, i, e] = kg[b, (i,) e] * v[b, i, e]``."""
        n_batch, n, d = v.shape
        for job in range(cuda.grid(1), n_batch * n * d, cuda.gridsize(1)):
            b = job // (n * d)
            i = (job // d) % n
            e = job % d
            if per_position:
                out[b, i, e] = kg[b, i, e] * v[b, i, e]
            else:
                out[b, i, e] = kg[b, 0, e] * v[b, i, e]

    @cuda.jit
    def gather_rows(src, rows, out):
        """``out[b, e] = src[rows[b], e]`` (broadcasting of the attention vectors, with a cast)."""
        n_batch, d = out.shape
        for job in range(cuda.grid(1), n_batch * d, cuda.gridsize(1)):
            out[job // d, job % d] = src[rows[job // d], job % d]

    return SimpleNamespace(**{f.__name__: f for f in (
        scaled_vector, key_vector, logits, chunk_max_sum, chunk_vec, merge, carry_scan, chunk_scan,
        hadamard, modulate, gather_rows,
    )})


def _launch(kernel, n_jobs):
    threads = _device.threads_per_block()
    return kernel[_device.grid(n_jobs, threads), threads]


def attention_vector(w, name, batch, check_finite):
    """Validate ``w`` (..., d) against the batch and return it on the device as ``(B, d)``.

    Host vectors are checked and broadcast like on the CPU, then copied in. Device vectors
    (float32/float64, C-contiguous) are broadcast on the device and cast to the batch dtype.
    """
    B, d, lead = batch.batch, batch.d, batch.lead_shape
    if not _device.is_device_array(w):
        host = _validate.attention_vector(w, name, batch, check_finite)
        return _device.cuda_module().to_device(np.ascontiguousarray(host))
    arr = _device.as_device_array(w, name)
    _validate.check_kernel_dtypes({name: arr.dtype}, "device")
    shape = tuple(arr.shape)
    _validate.check_vector_shape(shape, name, d, lead)
    _validate.check_c_contiguous(name, arr.is_c_contiguous(), arr.strides, "device")
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    flat = arr.reshape(n_rows, d)
    if check_finite and n_rows and not all_finite(flat):
        raise _validate.nonfinite_error(name)
    rows = np.broadcast_to(np.arange(n_rows, dtype=np.int64).reshape(shape[:-1]), lead).reshape(B)
    out = _device.empty((B, d), batch.dtype)
    if B:
        _launch(kernels(batch.dtype.name).gather_rows, B * d)(flat, _device.cuda_module().to_device(rows), out)
    return out


class _Pool:
    """Scratch buffers and launches of one softmax pool over a ``(B, n, d)`` batch."""

    def __init__(self, batch):
        self.kern = kernels(batch.dtype.name)
        self.B, self.n, self.d, self.dtype = batch.batch, batch.n, batch.d, batch.dtype
        self.threads = _device.threads_per_block()
        self.chunk = self.threads * max(1, int(_config.CUDA_FASTFORMER_ITEMS_PER_THREAD))
        self.n_chunks = -(-self.n // self.chunk)
        self.has_mask = batch.valid is not None
        self.valid = batch.valid if self.has_mask else _device.dummy(2, np.bool_)
        self.dummy = _device.dummy(3, self.dtype)
        shape2 = (self.B, self.n_chunks)
        self.logit = _device.empty((self.B, self.n), self.dtype)
        self.weight = _device.empty((self.B, self.n), self.dtype)
        self.part_max = _device.empty(shape2, self.dtype)
        self.part_sum = _device.empty(shape2, self.dtype)
        self.part_vec = _device.empty(shape2 + (self.d,), self.dtype)

    def partials(self, x, w, mul=None):
        """Logits ``(x [* mul]) . w`` and per-chunk partials (max, sum, weighted rows)."""
        kern, B, n, d = self.kern, self.B, self.n, self.d
        use_mul = mul is not None
        mul = mul if use_mul else self.dummy
        _launch(kern.logits, B * n)(x, mul, use_mul, w, self.valid, self.has_mask, self.logit)
        grid = _device.grid(B * self.n_chunks, 1)
        kern.chunk_max_sum[grid, self.threads, 0, self.threads * self.dtype.itemsize](
            self.logit, self.chunk, self.part_max, self.part_sum, self.weight,
        )
        _launch(kern.chunk_vec, B * self.n_chunks * d)(x, mul, use_mul, self.weight, self.chunk, self.part_vec)

    def pooled(self, x, w):
        """Bidirectional pool ``(B, d)``."""
        self.partials(x, w)
        out = _device.empty((self.B, self.d), self.dtype)
        _launch(self.kern.merge, self.B * self.d)(self.part_max, self.part_sum, self.part_vec, out)
        return out

    def prefix_pooled(self, x, w, mul=None):
        """Causal prefix pools ``(B, n, d)``."""
        kern, B, d = self.kern, self.B, self.d
        self.partials(x, w, mul)
        carry_max = _device.empty((B, self.n_chunks), self.dtype)
        carry_sum = _device.empty((B, self.n_chunks), self.dtype)
        carry_vec = _device.empty((B, self.n_chunks, d), self.dtype)
        _launch(kern.carry_scan, B * d)(self.part_max, self.part_sum, self.part_vec, carry_max, carry_sum, carry_vec)
        out = _device.empty((B, self.n, d), self.dtype)
        use_mul = mul is not None
        _launch(kern.chunk_scan, B * self.n_chunks * d)(
            x, mul if use_mul else self.dummy, use_mul, self.logit, self.chunk, carry_max, carry_sum, carry_vec, out,
        )
        return out


def fastformer(batch, w_q, w_k, *, causal):
    """Fastformer core of a :class:`~._inputs.DeviceBatch`; ``w_q``, ``w_k`` device ``(B, d)``.

    Returns
    -------
    (out, qg, kg) : device arrays ``(B, n, d)``; pools ``(B, d)`` bidirectional, ``(B, n, d)`` causal.
    """
    kern = kernels(batch.dtype.name)
    B, n, d, dtype = batch.batch, batch.n, batch.d, batch.dtype
    scale = dtype.type(batch.scale)
    pool = _Pool(batch)
    w_q_scaled = _device.empty((B, d), dtype)
    _launch(kern.scaled_vector, B * d)(w_q, scale, w_q_scaled)
    out = _device.empty((B, n, d), dtype)
    if causal:
        w_k_scaled = _device.empty((B, d), dtype)
        _launch(kern.scaled_vector, B * d)(w_k, scale, w_k_scaled)
        qg = pool.prefix_pooled(batch.q, w_q_scaled)
        kg = pool.prefix_pooled(batch.k, w_k_scaled, mul=qg)  # p_j = qg(j) * k_j
        _launch(kern.modulate, B * n * d)(kg, True, batch.v, out)
        return out, qg, kg
    qg = pool.pooled(batch.q, w_q_scaled)
    w_key = _device.empty((B, d), dtype)
    _launch(kern.key_vector, B * d)(qg, w_k, scale, w_key)
    pooled_k = pool.pooled(batch.k, w_key)  # sum_i beta_i p_i = qg * sum_i beta_i k_i
    kg = _device.empty((B, d), dtype)
    _launch(kern.hadamard, B * d)(qg, pooled_k, kg)
    _launch(kern.modulate, B * n * d)(kg.reshape(B, 1, d), False, batch.v, out)
    return out, qg, kg
