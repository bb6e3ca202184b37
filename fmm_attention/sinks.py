"""``global_tokens="auto"``: attention sinks chosen from the inputs, per batch entry.

Pretrained heads park much of their attention on a few keys ([CLS], [SEP], punctuation),
wherever those sit. FMA serves far keys through coarse means, which blur such a key into
its neighbours; :func:`fmm_attention.fmm_attention` with ``global_tokens`` attends them
exactly. ``"auto"`` finds them without knowledge of the tokenizer, by estimated attention
mass (``G = _config.AUTO_GLOBAL_TOKENS`` keys per batch entry):

* bidirectional: ``R = min(AUTO_GLOBAL_QUERIES, valid queries)`` queries, evenly spaced
  over the entry's valid positions, take their exact softmax over all valid keys (O(R n d));
  a key's estimate is the weight these queries give it from *outside* their near field
  (blocks ``I-1, I, I+1``), where an exact global token would replace a coarse mean. The
  ``G`` keys of largest estimate (ties: lower index) with a positive estimate are chosen.
* causal: the choice may depend only on positions every query it serves has seen. Keys are
  chosen among the first ``2m`` positions (``m`` the block size) by the causal attention
  mass that the queries of block 1 (positions ``m .. 2m-1``) give them. Every query before
  ``2m`` attends all keys ``j <= i`` of the first two blocks exactly anyway (its near field),
  so its output does not depend on the choice (beyond rounding), and every later query sees
  a choice made from its past: perturbing position ``t`` changes no output before ``t``.

Both depend only on valid positions (a key mask leaves them out), so a right-padded
sequence chooses what the unpadded one does.
"""

from __future__ import annotations

import numpy as np

from . import _config

__all__ = ["auto_global_tokens"]


def _estimates_bidirectional(q, k, valid, block_size, scale, n_queries):
    n = k.shape[0]
    positions = np.flatnonzero(valid)
    if positions.size == 0:
        return np.zeros(n)
    count = min(n_queries, positions.size)
    sample = positions[(np.arange(count) * positions.size + positions.size // 2) // count]
    logits = (q[sample] @ k.T).astype(np.float64) * scale
    logits[:, ~valid] = -np.inf
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=1, keepdims=True)
    near = np.abs(np.arange(n)[None, :] // block_size - sample[:, None] // block_size) <= 1
    weights[near] = 0
    return weights.sum(axis=0)


def _estimates_causal(q, k, valid, block_size, scale):
    n = k.shape[0]
    end = min(n, 2 * block_size)
    mass = np.zeros(n)
    rows = np.arange(block_size, end)
    rows = rows[valid[rows]]
    if rows.size == 0:
        return mass
    logits = (q[rows] @ k[:end].T).astype(np.float64) * scale
    allowed = (np.arange(end)[None, :] <= rows[:, None]) & valid[None, :end]
    logits = np.where(allowed, logits, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=1, keepdims=True)
    mass[:end] = weights.sum(axis=0)
    return mass


def auto_global_tokens(q, k, valid, *, block_size, scale, causal, n_tokens=None, n_queries=None):
    """The keys ``global_tokens="auto"`` chooses for each batch entry.

    Parameters
    ----------
    q, k : ndarray, shape (B, n, d)
        Validated queries and keys (float32 or float64).
    valid : ndarray of bool, shape (B, n), or None
        Key validity (``None``: all valid).
    block_size : int
        The tree's block size ``m`` (after clamping to the sequence).
    scale : float
        Logit scale.
    causal : bool
    n_tokens, n_queries : int, optional
        Keys per entry and sampled queries (bidirectional);
        ``_config.AUTO_GLOBAL_TOKENS`` and ``_config.AUTO_GLOBAL_QUERIES`` by default.

    Returns
    -------
    list of tuple of int
        Per entry, sorted token indices (at most ``n_tokens``; fewer where fewer keys get a
        positive estimate).

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention.sinks import auto_global_tokens
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 1, 256, 8))
    >>> k[0, 200] = 4 * q[0].mean(axis=0) / np.linalg.norm(q[0].mean(axis=0)) ** 2  # a sink
    >>> 200 in auto_global_tokens(q, k, None, block_size=16, scale=1.0, causal=False)[0]
    True
    """
    n_tokens = int(_config.AUTO_GLOBAL_TOKENS if n_tokens is None else n_tokens)
    n_queries = max(1, int(_config.AUTO_GLOBAL_QUERIES if n_queries is None else n_queries))
    B, n, _ = q.shape
    chosen = []
    for b in range(B):
        ok = np.ones(n, dtype=np.bool_) if valid is None else np.asarray(valid[b], dtype=np.bool_)
        if causal:
            mass = _estimates_causal(q[b], k[b], ok, block_size, scale)
        else:
            mass = _estimates_bidirectional(q[b], k[b], ok, block_size, scale, n_queries)
        order = np.argsort(-mass, kind="stable")[:n_tokens]
        chosen.append(tuple(sorted(int(j) for j in order if mass[j] > 0)))
    return chosen
