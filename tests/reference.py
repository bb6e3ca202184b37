"""Plain NumPy oracles for small n, float64, written from the specs independently of the library.

Nothing here imports :mod:`fmm_attention`: the interaction rules are re-derived from
``shared/spec/fma.md`` in the simplest (slowest) form, so a bug in ``tree.py`` or the
kernels cannot hide in the oracle too.
"""

import numpy as np


def softmax_rows(logits):
    """Row softmax with ``-inf`` masking; all-masked rows give zeros (and lse -inf)."""
    mx = logits.max(axis=-1, keepdims=True)
    safe = np.where(np.isfinite(mx), mx, 0.0)
    w = np.exp(logits - safe)
    total = w.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(total > 0, w / np.where(total > 0, total, 1.0), 0.0)
        lse = np.where(total[..., 0] > 0, np.log(np.where(total[..., 0] > 0, total[..., 0], 1.0)) + safe[..., 0], -np.inf)
    return p, lse


def exact_reference(q, k, v, *, causal=False, scale=None, valid=None):
    """Dense softmax attention of one head: q (n, d), k (n, d), v (n, dv), valid (n,) bool."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    n, d = q.shape
    scale = 1 / np.sqrt(d) if scale is None else scale
    logits = scale * q @ k.T
    allowed = np.ones((n, n), bool) if valid is None else np.broadcast_to(np.asarray(valid, bool), (n, n)).copy()
    if causal:
        allowed &= np.tril(np.ones((n, n), bool))
    p, lse = softmax_rows(np.where(allowed, logits, -np.inf))
    return p @ v, lse


def cross_reference(q, k, v, *, causal=False, scale=None, valid=None, attn_mask=None, attn_bias=None,
                    window=None, query_offset=None):
    """Dense softmax attention of one head with queries and keys of any lengths.

    q (n_q, d), k (n_k, d), v (n_k, dv); ``valid`` (n_k,) bool; ``attn_mask`` (n_q, n_k)
    bool (True = may attend) and ``attn_bias`` (n_q, n_k) float, both broadcastable;
    ``window = (left, right)`` with None for an unbounded side. Query ``i`` sits at key
    position ``t_i = query_offset + i``, the offset ``n_k - n_q`` by default (queries
    aligned to the end of the keys, ``shared/spec/shapes-and-decoding.md``). Returns
    ``(out, lse)``.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    n_q, d = q.shape
    n_k = k.shape[0]
    scale = 1 / np.sqrt(d) if scale is None else scale
    offset = n_k - n_q if query_offset is None else query_offset
    t = offset + np.arange(n_q)[:, None]
    j = np.arange(n_k)[None, :]
    allowed = np.ones((n_q, n_k), bool)
    if valid is not None:
        allowed &= np.asarray(valid, bool)[None, :]
    if causal:
        allowed &= j <= t
    if window is not None:
        left, right = window
        if left is not None:
            allowed &= j >= t - left
        if right is not None:
            allowed &= j <= t + right
    if attn_mask is not None:
        allowed &= np.broadcast_to(np.asarray(attn_mask, bool), (n_q, n_k))
    logits = scale * q @ k.T
    if attn_bias is not None:
        logits = logits + np.broadcast_to(np.asarray(attn_bias, np.float64), (n_q, n_k))
    p, lse = softmax_rows(np.where(allowed, logits, -np.inf))
    return p @ v, lse


def broadcast_heads(q, k, v):
    """Copy ``k``, ``v`` (..., Hk, n, .) to the query heads (..., Hq, n, .) and broadcast every
    leading dim: the dense form of grouped heads (query head ``h`` reads ``h // g``)."""
    q, k, v = (np.asarray(x) for x in (q, k, v))
    if q.ndim >= 3 and k.ndim >= 3 and q.shape[-3] != k.shape[-3] and k.shape[-3] != 1:
        g = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, g, axis=-3), np.repeat(v, g, axis=-3)
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    return (np.broadcast_to(q, lead + q.shape[-2:]), np.broadcast_to(k, lead + k.shape[-2:]),
            np.broadcast_to(v, lead + v.shape[-2:]))


def padded_length(n, m):
    N = 4 * m
    while N < n:
        N *= 2
    return N


def serving_level(i, j, N, m, causal):
    """Level serving pair (i, j) by the spec's lists: 0 near, l >= 1 far, -1 never."""
    if causal and j > i:
        return -1
    I, J = i // m, j // m
    if (causal and I - 1 <= J <= I) or (not causal and abs(I - J) <= 1):
        return 0
    L = int(np.log2(N // m)) - 1
    for level in range(1, L + 1):
        w = m * 2 ** (level - 1)
        b, c = i // w, j // w
        if causal:
            listed = [b - 2] if b % 2 == 0 else [b - 3, b - 2]
        else:
            listed = [b - 2, b + 2, b + 3] if b % 2 == 0 else [b - 3, b - 2, b + 2]
        if c in listed:
            return level
    raise AssertionError(f"pair ({i}, {j}) served by no level")


def level_map_reference(n, m, causal):
    N = padded_length(n, m)
    return np.array([[serving_level(i, j, N, m, causal) for j in range(n)] for i in range(n)])


def fma_reference(q, k, v, *, block_size, rank, causal=False, scale=None, valid=None, count_scaling=True,
                  learned=None):
    """Dense FMA of one head (fine queries) by enumerating, for each query, all its logits.

    ``learned``: None for mean coarsening, else ``(key_weights, value_weights, key_bias,
    value_bias)``, one ``(r*d, 1, w)`` array (and ``(r*d,)`` bias) per level.
    Returns ``(out, lse)``.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    n, d = q.shape
    m, p = block_size, rank
    scale = 1 / np.sqrt(d) if scale is None else scale
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    N = padded_length(n, m)
    levels = level_map_reference(n, m, causal)
    L = int(np.log2(N // m)) - 1
    out = np.zeros((n, v.shape[1]))
    lse = np.full(n, -np.inf)
    for i in range(n):
        logits, values = [], []
        for j in range(n):
            if levels[i, j] == 0 and valid[j]:
                logits.append(scale * q[i] @ k[j])
                values.append(v[j])
        for level in range(1, L + 1):
            w = m * 2 ** (level - 1)
            r = min(p, w)
            boxes = sorted({j // w for j in range(n) if levels[i, j] == level})
            for c in boxes:
                tokens = np.arange(c * w, min(n, (c + 1) * w))
                ok = tokens[valid[tokens]]
                if learned is None:
                    sub = w // r
                    for t in range(r):
                        members = [j for j in ok if (j - c * w) // sub == t]
                        if not members:
                            continue
                        kc, vc = k[members].mean(0), v[members].mean(0)
                        bias = np.log(len(members)) if count_scaling else 0.0
                        logits.append(scale * q[i] @ kc + bias)
                        values.append(vc)
                else:
                    if len(ok) == 0:
                        continue
                    kw, vw, kb, vb = (x[level - 1] for x in learned)
                    kpad = np.zeros((w, d))
                    vpad = np.zeros((w, v.shape[1]))
                    kpad[ok - c * w] = k[ok]
                    vpad[ok - c * w] = v[ok]
                    for t in range(r):
                        kc = np.array([kw[e * r + t, 0] @ kpad[:, e] + kb[e * r + t] for e in range(d)])
                        vc = np.array([vw[e * r + t, 0] @ vpad[:, e] + vb[e * r + t] for e in range(v.shape[1])])
                        bias = np.log(len(ok) / r) if count_scaling else 0.0
                        logits.append(scale * q[i] @ kc + bias)
                        values.append(vc)
        if logits:
            x = np.array(logits)
            mx = x.max()
            wgt = np.exp(x - mx)
            out[i] = wgt @ np.array(values) / wgt.sum()
            lse[i] = mx + np.log(wgt.sum())
    return out, lse


def fma_implied_matrix(q, k, *, block_size, rank, causal=False, scale=None, valid=None, count_scaling=True):
    """Dense (n, n) attention implied by mean-coarsened FMA (fine queries).

    Seen from query ``i``, key ``j`` is replaced by the coarse key of its sub-box at the level
    serving ``(i, j)``; with count scaling every token of a sub-box carries the sub-box's
    logit, without it the sub-box's weight is shared among its tokens.
    ``implied @ v`` is FMA's output.
    """
    q, k = (np.asarray(x, dtype=np.float64) for x in (q, k))
    n, d = q.shape
    m, p = block_size, rank
    scale = 1 / np.sqrt(d) if scale is None else scale
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    levels = level_map_reference(n, m, causal)
    logits = np.full((n, n), -np.inf)
    for i in range(n):
        for j in range(n):
            level = levels[i, j]
            if level < 0 or not valid[j]:
                continue
            if level == 0:
                logits[i, j] = scale * q[i] @ k[j]
                continue
            w = m * 2 ** (level - 1)
            sub = w // min(p, w)
            first = (j // sub) * sub
            members = [t for t in range(first, min(n, first + sub)) if valid[t]]
            logits[i, j] = scale * q[i] @ k[members].mean(0) - (0.0 if count_scaling else np.log(len(members)))
    return softmax_rows(logits)[0]


def fma_grouped_implied_matrix(q, k, groups, *, block_size, rank, causal=False, scale=None, valid=None,
                               count_scaling=True):
    """Dense (n, n) attention implied by FMA whose coarse row of each key is the mean of an
    arbitrary fixed group of tokens (cluster coarsening with its groups held fixed).

    ``groups[l - 1][j]`` labels key ``j``'s group at far level ``l`` (tokens with equal
    labels at a level form one coarse row); as in :func:`fma_implied_matrix`, every member
    carries its group's logit with count scaling, and shares its weight without it.
    """
    q, k = (np.asarray(x, dtype=np.float64) for x in (q, k))
    n, d = q.shape
    m = block_size
    scale = 1 / np.sqrt(d) if scale is None else scale
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    levels = level_map_reference(n, m, causal)
    logits = np.full((n, n), -np.inf)
    for i in range(n):
        for j in range(n):
            level = levels[i, j]
            if level < 0 or not valid[j]:
                continue
            if level == 0:
                logits[i, j] = scale * q[i] @ k[j]
                continue
            label = groups[level - 1]
            members = [t for t in range(n) if valid[t] and label[t] == label[j]]
            logits[i, j] = scale * q[i] @ k[members].mean(0) - (0.0 if count_scaling else np.log(len(members)))
    return softmax_rows(logits)[0]


# ---------------------------------------------------------------------------------------
# Fastformer additive attention (shared/spec/fastformer.md), dense and direct
# ---------------------------------------------------------------------------------------


def fastformer_reference(q, k, v, w_q, w_k, *, causal=False, scale=None, valid=None):
    """Fastformer core of one head by the spec's equations, with dense ``(n, n)`` pool weights.

    q, k, v (n, d); w_q, w_k (d,); valid (n,) bool or None. Row ``i`` of the pool matrices
    holds the softmax weights of pool ``i``: every valid ``j`` bidirectionally, the valid
    ``j <= i`` causally. Masked positions take part in no softmax; a pool with nothing to
    pool is zero. Returns ``(u, qg, kg)``: pools ``(d,)`` bidirectional, ``(n, d)`` causal.
    """
    q, k, v, w_q, w_k = (np.asarray(x, dtype=np.float64) for x in (q, k, v, w_q, w_k))
    n, d = q.shape
    scale = 1 / np.sqrt(d) if scale is None else scale
    allowed = np.ones((n, n), bool) if valid is None else np.broadcast_to(np.asarray(valid, bool), (n, n)).copy()
    if causal:
        allowed &= np.tril(np.ones((n, n), bool))
    alpha, _ = softmax_rows(np.where(allowed, scale * (q @ w_q)[None, :], -np.inf))
    qg = alpha @ q  # row i: the global query seen from position i
    p = qg * k  # p_j = qg(j) * k_j; bidirectionally every row of qg is the same
    beta, _ = softmax_rows(np.where(allowed, scale * (p @ w_k)[None, :], -np.inf))
    kg = beta @ p
    u = kg * v
    if causal:
        return u, qg, kg
    return u, qg[0], kg[0]
