"""Backward of Fastformer additive attention (``shared/spec/fastformer.md``), O(n d).

Notation of :mod:`.fastformer`: ``a_i = s q_i . w_q``, ``alpha = softmax(a)``,
``qg = sum alpha_i q_i``, ``p_i = qg * k_i``, ``b_i = s p_i . w_k``, ``beta = softmax(b)``,
``kg = sum beta_i p_i``, ``u_i = kg * v_i``. Reverse mode, with ``G`` the cotangent of ``u``:
``dv_i = G_i * kg``, ``dkg = sum G_i * v_i``, then each softmax pool ``y = sum w_i x_i``
(``w = softmax(z)``) sends ``dx_i = w_i dy`` and ``dz_i = w_i (x_i . dy - y . dy)``.

Bidirectional: NumPy reductions over the sequence (``einsum``, no BLAS, so the result does
not depend on a thread count). Causal: each prefix pool is a softmax over ``j <= i``; the
adjoint runs backwards once with suffix sums rescaled by ``exp(lse_j - lse_{j+1}) <= 1``
(the prefix log-sum-exp never decreases), so no exponential can overflow. The causal kernel
runs one sequence per job, a serial ``nogil`` kernel on the library's threads
(:class:`._launch.Threaded`, no ``prange`` to compile): each job writes only its own
sequence's gradients, so they do not depend on the thread count.
"""

import numpy as np

from ._jit import jit
from ._launch import Threaded


def _softmax(logits):
    """Softmax over the last axis; an all ``-inf`` row gives zeros."""
    top = logits.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    e = np.exp(logits - top)
    total = e.sum(axis=-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def _bidirectional(q, k, v, wq, wk, valid, scale, g):
    a = scale * np.einsum("bnd,bd->bn", q, wq)
    if valid is not None:
        a = np.where(valid, a, -np.inf)
    alpha = _softmax(a)
    qg = np.einsum("bn,bnd->bd", alpha, q)
    p = qg[:, None, :] * k
    logits = scale * np.einsum("bnd,bd->bn", p, wk)
    if valid is not None:
        logits = np.where(valid, logits, -np.inf)
    beta = _softmax(logits)
    kg = np.einsum("bn,bnd->bd", beta, p)
    dv = g * kg[:, None, :]
    dkg = np.einsum("bnd,bnd->bd", g, v)
    dbeta = np.einsum("bnd,bd->bn", p, dkg)
    db = beta * (dbeta - np.einsum("bn,bn->b", beta, dbeta)[:, None])
    dp = beta[:, :, None] * dkg[:, None, :] + scale * db[:, :, None] * wk[:, None, :]
    dwk = scale * np.einsum("bn,bnd->bd", db, p)
    dk = dp * qg[:, None, :]
    dqg = np.einsum("bnd,bnd->bd", dp, k)
    dalpha = np.einsum("bnd,bd->bn", q, dqg)
    da = alpha * (dalpha - np.einsum("bn,bn->b", alpha, dalpha)[:, None])
    dq = alpha[:, :, None] * dqg[:, None, :] + scale * da[:, :, None] * wq[:, None, :]
    dwq = scale * np.einsum("bn,bnd->bd", da, q)
    return dq, dk, dv, dwq, dwk


@jit(nogil=True)
def _causal_backward_jobs(job_lo, job_hi, q, k, v, wq, wk, valid, has_mask, scale, g, dq, dk, dv, dwq, dwk):
    """Causal Fastformer's gradients of the sequences ``job_lo <= b < job_hi``, one job each:
    a forward pass that stores the prefix pools and log-sum-exps, then one backward pass with
    suffix sums.
    """
    n_batch, n, d = q.shape
    neg_inf = q.dtype.type(-np.inf)
    for b in range(job_lo, job_hi):
        qg = np.zeros((n, d), dtype=q.dtype)
        kg = np.zeros((n, d), dtype=q.dtype)
        lse_a = np.full(n, neg_inf, dtype=q.dtype)
        lse_b = np.full(n, neg_inf, dtype=q.dtype)
        alpha = np.zeros(n, dtype=q.dtype)  # own weight alpha_jj = exp(a_j - lse_a_j), 0 if masked
        beta = np.zeros(n, dtype=q.dtype)
        q_acc = np.zeros(d, dtype=q.dtype)
        k_acc = np.zeros(d, dtype=q.dtype)
        p = np.empty(d, dtype=q.dtype)
        a_max = neg_inf
        b_max = neg_inf
        a_sum = q.dtype.type(0)
        b_sum = q.dtype.type(0)
        for i in range(n):
            if not has_mask or valid[b, i]:
                a = q.dtype.type(0)
                for e in range(d):
                    a += q[b, i, e] * wq[b, e]
                a *= scale
                new_max = max(a_max, a)
                shrink = np.exp(a_max - new_max)
                weight = np.exp(a - new_max)
                a_max = new_max
                a_sum = a_sum * shrink + weight
                lse_a[i] = a_max + np.log(a_sum)
                alpha[i] = np.exp(a - lse_a[i])
                logit = q.dtype.type(0)
                for e in range(d):
                    q_acc[e] = q_acc[e] * shrink + weight * q[b, i, e]
                    qg[i, e] = q_acc[e] / a_sum
                    p[e] = qg[i, e] * k[b, i, e]
                    logit += p[e] * wk[b, e]
                logit *= scale
                new_max = max(b_max, logit)
                shrink = np.exp(b_max - new_max)
                weight = np.exp(logit - new_max)
                b_max = new_max
                b_sum = b_sum * shrink + weight
                lse_b[i] = b_max + np.log(b_sum)
                beta[i] = np.exp(logit - lse_b[i])
                for e in range(d):
                    k_acc[e] = k_acc[e] * shrink + weight * p[e]
                    kg[i, e] = k_acc[e] / b_sum
            elif i > 0:
                lse_a[i] = lse_a[i - 1]
                lse_b[i] = lse_b[i - 1]
                for e in range(d):
                    qg[i, e] = qg[i - 1, e]
                    kg[i, e] = kg[i - 1, e]
        s_k = np.zeros(d, dtype=q.dtype)  # sum_{i >= j} exp(lse_b_j - lse_b_i) dkg_i
        s_q = np.zeros(d, dtype=q.dtype)
        t_k = q.dtype.type(0)  # sum_{i >= j} exp(lse_b_j - lse_b_i) dkg_i . kg_i
        t_q = q.dtype.type(0)
        dp = np.empty(d, dtype=q.dtype)
        dwq[b] = 0
        dwk[b] = 0
        for j in range(n - 1, -1, -1):
            for e in range(d):
                dv[b, j, e] = g[b, j, e] * kg[j, e]
            if lse_b[j] == -np.inf:  # no valid position at or before j: zero pools, zero output
                for e in range(d):
                    dq[b, j, e] = 0
                    dk[b, j, e] = 0
                continue
            if j + 1 < n:
                fb = np.exp(lse_b[j] - lse_b[j + 1])
                fa = np.exp(lse_a[j] - lse_a[j + 1])
            else:
                fb = q.dtype.type(0)
                fa = q.dtype.type(0)
            t_k *= fb
            for e in range(d):
                dkg = g[b, j, e] * v[b, j, e]
                s_k[e] = s_k[e] * fb + dkg
                t_k += dkg * kg[j, e]
            # p_j = qg_j * k_j enters the key pool with weight beta_jj
            pdot = q.dtype.type(0)
            for e in range(d):
                pdot += qg[j, e] * k[b, j, e] * s_k[e]
            db = beta[j] * (pdot - t_k)
            t_q *= fa
            for e in range(d):
                dp[e] = beta[j] * s_k[e] + scale * db * wk[b, e]
                dwk[b, e] += scale * db * qg[j, e] * k[b, j, e]
                dk[b, j, e] = dp[e] * qg[j, e]
                dqg = dp[e] * k[b, j, e]
                s_q[e] = s_q[e] * fa + dqg
                t_q += dqg * qg[j, e]
            qdot = q.dtype.type(0)
            for e in range(d):
                qdot += q[b, j, e] * s_q[e]
            da = alpha[j] * (qdot - t_q)
            for e in range(d):
                dq[b, j, e] = alpha[j] * s_q[e] + scale * da * wq[b, e]
                dwq[b, e] += scale * da * q[b, j, e]


def _causal_backward_layout(q, *args):
    # per entry: about ten multiply-adds forward and twenty backward
    return q.shape[0], 30 * q.size


#: :func:`_causal_backward_jobs` over every sequence, split over the threads.
causal_backward = Threaded(_causal_backward_jobs, _causal_backward_layout)


def fastformer_backward(batch, wq, wk, g, *, causal):
    """Gradients ``(dq, dk, dv, dwq, dwk)`` of Fastformer: ``(B, n, d)`` and ``(B, d)``
    (``wq``, ``wk`` the unscaled per-entry vectors, as the forward takes them).
    """
    from ._launch import launch_guard

    dtype = batch.dtype
    scale = dtype.type(batch.scale)
    if not causal:
        grads = _bidirectional(batch.q, batch.k, batch.v, wq, wk, batch.valid, scale, g)
        return tuple(np.ascontiguousarray(x, dtype=dtype) for x in grads)
    has_mask = batch.valid is not None
    valid = batch.valid if has_mask else np.ones((1, 1), dtype=np.bool_)
    dq, dk, dv = (np.empty_like(batch.q) for _ in range(3))
    dwq = np.empty_like(wq)
    dwk = np.empty_like(wk)
    with launch_guard():
        causal_backward(batch.q, batch.k, batch.v, wq, wk, valid, has_mask, scale, g, dq, dk, dv, dwq, dwk)
    return dq, dk, dv, dwq, dwk
