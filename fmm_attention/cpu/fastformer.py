"""Fastformer additive attention on the CPU, O(n d) time and memory.

The semantics are stated in :doc:`/semantics`. Notation: ``s`` the logit scale,
``a_i = s q_i . w_q``, ``qg = sum_i softmax(a)_i q_i``, ``p_i = qg * k_i``,
``b_i = s p_i . w_k``, ``kg = sum_i softmax(b)_i p_i``, output ``u_i = kg * v_i``.
Masked positions leave both softmaxes; their output is still ``kg * v_i``.

Bidirectional: each pool is a two-pass reduction. :func:`chunk_partials` runs in parallel
over ``(batch, chunk)`` jobs and leaves one ``(max, sum, weighted sum)`` partial per chunk;
:func:`merge_partials` combines them by log-sum-exp. Two algebraic shortcuts keep it to one
read of each input: ``b_i = k_i . (s qg * w_k)`` and ``sum_i e_i p_i = qg * sum_i e_i k_i``,
so ``p`` is never formed. A third parallel pass, :func:`modulate`, writes ``u``.

Causal: :func:`causal_kernel` walks each sequence once with running maxima (online
softmax: the running sums are rescaled whenever the maximum grows), in parallel over the
leading dims. Weights are ``exp(logit - running max) <= 1``, so logits of any size are safe.
"""

import numpy as np
from numba import prange

from .. import _config
from ._jit import jit
from ._softmax import exp_inplace
from ._launch import launch_guard


@jit(parallel=True)
def chunk_partials(x, w, valid, has_mask, chunk, part_max, part_sum, part_vec):
    """Per-chunk softmax partials of the logits ``x[b, i] . w[b]`` over the rows ``x[b, i]``.

    Parameters
    ----------
    x : (B, n, d) rows to pool; w : (B, d) logit vector (scale already applied).
    valid, has_mask : (B, n) bool key validity, used only when ``has_mask``.
    chunk : sequence positions per parallel job.
    part_max, part_sum : (B, C) out, ``C = ceil(n / chunk)``: each chunk's largest logit
        (``-inf`` when it has no valid row) and ``sum_i exp(logit_i - max)``.
    part_vec : (B, C, d) out, ``sum_i exp(logit_i - max) x[b, i]``.
    """
    n_batch, n, d = x.shape
    n_chunks = part_max.shape[1]
    for job in prange(n_batch * n_chunks):
        b = job // n_chunks
        c = job % n_chunks
        i0 = c * chunk
        i1 = min(n, i0 + chunk)
        logits = np.empty(i1 - i0, dtype=x.dtype)
        top = x.dtype.type(-np.inf)
        for i in range(i1 - i0):
            acc = x.dtype.type(0)
            for e in range(d):
                acc += x[b, i0 + i, e] * w[b, e]
            if has_mask and not valid[b, i0 + i]:
                acc = -np.inf
            logits[i] = acc
            top = max(top, acc)
        part_max[b, c] = top
        part_vec[b, c] = 0
        if top == -np.inf:
            part_sum[b, c] = 0
            continue
        logits -= top
        exp_inplace(logits)
        part_sum[b, c] = logits.sum()
        vec = part_vec[b, c]
        for i in range(i1 - i0):
            weight = logits[i]
            for e in range(d):
                vec[e] += weight * x[b, i0 + i, e]


@jit(parallel=True)
def modulate(kg, v, chunk, out):
    """``out[b, i] = kg[b] * v[b, i]``, in parallel over ``(batch, chunk)`` jobs."""
    n_batch, n, _ = v.shape
    n_chunks = (n + chunk - 1) // chunk
    for job in prange(n_batch * n_chunks):
        b = job // n_chunks
        i0 = (job % n_chunks) * chunk
        i1 = min(n, i0 + chunk)
        out[b, i0:i1] = v[b, i0:i1] * kg[b]


@jit(parallel=True)
def causal_kernel(q, k, v, w_q, w_k, valid, has_mask, store_pools, out, qg_out, kg_out):
    """Causal Fastformer in one pass per sequence, with online-softmax running sums.

    ``w_q``, ``w_k`` (B, d) carry the scale. Writes ``out`` (B, n, d) and, when
    ``store_pools``, the prefix pools ``qg_out``, ``kg_out`` (B, n, d). A position with no
    valid position at or before it gets zero pools and a zero output.
    """
    n_batch, n, d = q.shape
    zero = q.dtype.type(0)
    neg_inf = q.dtype.type(-np.inf)
    for b in prange(n_batch):
        q_acc = np.zeros(d, dtype=q.dtype)  # sum_j exp(a_j - a_max) q_j
        k_acc = np.zeros(d, dtype=q.dtype)  # sum_j exp(b_j - b_max) p_j
        qg = np.zeros(d, dtype=q.dtype)
        p = np.empty(d, dtype=q.dtype)
        a_max = neg_inf
        b_max = neg_inf
        a_sum = zero
        b_sum = zero
        for i in range(n):
            if not has_mask or valid[b, i]:
                a = zero
                for e in range(d):
                    a += q[b, i, e] * w_q[b, e]
                new_max = max(a_max, a)
                shrink = np.exp(a_max - new_max)  # 0 at the first valid position
                weight = np.exp(a - new_max)
                a_max = new_max
                a_sum = a_sum * shrink + weight
                inv = 1 / a_sum
                logit = zero
                for e in range(d):
                    q_acc[e] = q_acc[e] * shrink + weight * q[b, i, e]
                    qg[e] = q_acc[e] * inv
                    p[e] = qg[e] * k[b, i, e]
                    logit += p[e] * w_k[b, e]
                new_max = max(b_max, logit)
                shrink = np.exp(b_max - new_max)
                weight = np.exp(logit - new_max)
                b_max = new_max
                b_sum = b_sum * shrink + weight
                for e in range(d):
                    k_acc[e] = k_acc[e] * shrink + weight * p[e]
            if b_sum > 0:
                inv = 1 / b_sum
                for e in range(d):
                    out[b, i, e] = k_acc[e] * inv * v[b, i, e]
                    if store_pools:
                        qg_out[b, i, e] = qg[e]
                        kg_out[b, i, e] = k_acc[e] * inv
            else:
                out[b, i] = 0
                if store_pools:
                    qg_out[b, i] = 0
                    kg_out[b, i] = 0


def merge_partials(part_max, part_sum, part_vec):
    """Log-sum-exp merge of chunk partials into the pooled vector ``(B, d)``.

    Each chunk's sums are rescaled by ``exp(chunk max - overall max)``; a batch entry with no
    valid position at all (every max ``-inf``) pools to zero.
    """
    top = part_max.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    rescale = np.exp(part_max - top)
    total = (rescale * part_sum).sum(axis=1)[:, None]
    pooled = np.einsum("bc,bcd->bd", rescale, part_vec)
    return np.divide(pooled, total, out=np.zeros_like(pooled), where=total > 0)


def _pool(x, w, valid, has_mask, chunk):
    """Softmax pool of the rows of ``x`` (B, n, d) by the logits ``x . w``: ``(B, d)``."""
    n_batch, n, d = x.shape
    n_chunks = (n + chunk - 1) // chunk
    part_max = np.empty((n_batch, n_chunks), dtype=x.dtype)
    part_sum = np.empty((n_batch, n_chunks), dtype=x.dtype)
    part_vec = np.empty((n_batch, n_chunks, d), dtype=x.dtype)
    chunk_partials(x, w, valid, has_mask, chunk, part_max, part_sum, part_vec)
    return merge_partials(part_max, part_sum, part_vec)


def fastformer_batch(batch, w_q, w_k, *, causal, return_pools):
    """Fastformer attention core of a validated batch.

    Parameters
    ----------
    batch : fmm_attention._validate.Batch
        ``q``, ``k``, ``v`` of shape ``(B, n, d)``.
    w_q, w_k : ndarray, shape (B, d)
        Additive-attention vectors in ``batch.dtype``, one per batch entry (unscaled).
    causal, return_pools : bool

    Returns
    -------
    (out, qg, kg)
        ``out`` (B, n, d); the pools ``qg``, ``kg`` are ``(B, d)`` bidirectional, ``(B, n, d)``
        causal, or ``None`` when causal and not ``return_pools``. The chunk length of the
        parallel reductions is read from ``_config.FASTFORMER_CHUNK`` at call time.
    """
    dtype = batch.dtype
    scale = dtype.type(batch.scale)
    chunk = max(1, int(_config.FASTFORMER_CHUNK))
    has_mask = batch.valid is not None
    valid = batch.valid if has_mask else np.ones((1, 1), dtype=np.bool_)
    w_q = (w_q * scale).astype(dtype, copy=False)
    out = np.empty_like(batch.v)

    with launch_guard():
        if causal:
            shape = batch.q.shape if return_pools else (1, 1, 1)
            qg, kg = np.empty(shape, dtype), np.empty(shape, dtype)
            w_k = (w_k * scale).astype(dtype, copy=False)
            causal_kernel(batch.q, batch.k, batch.v, w_q, w_k, valid, has_mask, return_pools, out, qg, kg)
            return (out, qg, kg) if return_pools else (out, None, None)
        qg = _pool(batch.q, w_q, valid, has_mask, chunk)
        # b_i = s (qg * k_i) . w_k = k_i . (s qg * w_k);  sum_i e_i p_i = qg * sum_i e_i k_i
        kg = qg * _pool(batch.k, (qg * w_k * scale).astype(dtype, copy=False), valid, has_mask, chunk)
        modulate(kg, batch.v, chunk, out)
    return out, qg, kg
