"""Accuracy against cost: FMA settings beside an oracle that keeps each query's top keys.

Training-free FMA is judged by two numbers per setting: the keys each query attends to
(its cost, from :class:`~fmm_attention.FMMStats`) and the relative output error against
exact attention. The *top-k oracle* gives the yardstick: at the same number of keys per
query, it keeps the ``k`` largest exact logits of each query and renormalises. It needs
the full attention matrix to choose them, so no O(n log n) method can do better by
selection alone; beating it takes coarse keys that summarise what they leave out.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

from . import _config
from ._validate import attention_inputs, check_bool
from .api import exact_attention, fmm_attention

__all__ = ["ACCURATE", "BALANCED", "FAST", "PRESETS", "CostErrorRow", "accuracy_vs_cost", "default_settings", "relative_errors", "topk_attention"]


def topk_attention(q, k, v, *, keys, causal=False, scale=None, key_padding_mask=None):
    """Oracle attention that keeps each query's ``keys`` largest logits exactly.

    Parameters
    ----------
    q, k : array_like, shape (..., n, d)
        Queries and keys, leading dims as in :func:`~fmm_attention.exact_attention`.
    v : array_like, shape (..., n, dv)
        Values.
    keys : int or array_like of int, shape (n,)
        Keys kept per query (``>= 1``), one number for all queries or one per query
        position; causal rows with fewer allowed keys keep all.
    causal : bool, optional
        Query ``i`` chooses among the keys ``j <= i`` only.
    scale : float, optional
        Logit scale, ``1/sqrt(d)`` by default.
    key_padding_mask : array_like of bool, shape (..., n), optional
        ``True`` marks a valid key; only valid keys are kept. A query with no valid key
        gets a zero output.

    Returns
    -------
    ndarray, shape (..., n, dv), float64

    Notes
    -----
    Dense: builds each head's ``(n, n)`` logits, so ``n`` is limited to
    8192. Ties at the threshold keep every tied key.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention.accuracy import topk_attention
    >>> from fmm_attention import exact_attention
    >>> x = np.random.default_rng(0).standard_normal((64, 8))
    >>> all_keys = topk_attention(x, x, x, keys=64)  # every key: exact
    >>> bool(np.allclose(all_keys, exact_attention(x, x, x)))
    True
    """
    causal = check_bool(causal, "causal")
    batch = attention_inputs(q, k, v, scale=scale, key_padding_mask=key_padding_mask, check_finite=True)
    n = batch.n
    if n > _config.DENSE_MAX_N:
        raise ValueError(f"topk_attention builds (n, n) logits; n={n} exceeds {_config.DENSE_MAX_N}")
    budget = np.asarray(keys)
    if (budget.dtype.kind not in "iu" or budget.ndim > 1 or (budget.ndim == 1 and budget.shape != (n,))
            or (budget.size and budget.min() < 1)):
        raise ValueError(f"keys must be a positive integer or n = {n} positive integers, got {keys!r}")
    budget = np.minimum(np.broadcast_to(budget, (n,)), n).astype(np.int64)
    out = np.empty((batch.q.shape[0], n, batch.dv))
    allowed = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    rows = np.arange(n)
    for b in range(batch.q.shape[0]):
        logits = batch.scale * batch.q[b].astype(np.float64) @ batch.k[b].astype(np.float64).T
        row_allowed = allowed if batch.valid is None else allowed & batch.valid[b][None, :]
        logits = np.where(row_allowed, logits, -np.inf)
        threshold = -np.sort(-logits, axis=1)[rows, budget - 1][:, None]
        logits = np.where(logits >= threshold, logits, -np.inf)
        row_max = logits.max(axis=1, keepdims=True)
        w = np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0))  # no valid key: all zero
        total = w.sum(axis=1, keepdims=True)
        out[b] = (w / np.where(total > 0, total, 1.0)) @ batch.v[b]
    return batch.restore(out)


def matched_budgets(mean_keys, n, *, causal=False):
    """Per-query top-k budgets whose mean kept keys equals ``mean_keys`` (to ``1/(2n)``).

    Query ``i`` can keep at most ``n`` keys (``i + 1`` causal). The budgets are
    ``min(K, allowed_i)`` for the largest ``K`` that stays within ``round(mean_keys * n)``
    kept keys in total, plus one more key for as many of the queries that can take it as
    the total still allows (the last ones). Every query keeps at least one key.

    Returns
    -------
    ndarray of int64, shape (n,)
    """
    allowed = np.arange(1, n + 1) if causal else np.full(n, n)
    total = int(np.clip(round(mean_keys * n), n, allowed.sum()))
    # kept(K) = sum_i min(K, allowed_i) grows with K: the largest K with kept(K) <= total
    K_all = np.arange(1, n + 1)
    below = np.searchsorted(allowed, K_all)  # queries with fewer than K allowed keys (allowed is sorted)
    kept = np.r_[0, np.cumsum(allowed)][below] + K_all * (n - below)
    K = int(np.searchsorted(kept, total, side="right"))  # kept[K - 1] <= total
    budgets = np.minimum(K, allowed)
    room = np.flatnonzero(allowed > K)
    budgets[room[room.size - (total - int(budgets.sum())):]] += 1
    return budgets


@dataclass(frozen=True)
class CostErrorRow:
    """One setting of :func:`accuracy_vs_cost`.

    Attributes
    ----------
    label : str
    options : dict
        Keyword arguments given to :func:`~fmm_attention.fmm_attention`.
    keys_fraction : float
        Mean keys per query over ``n``.
    errors : ndarray
        Relative Frobenius output error of each head.
    oracle_errors : ndarray
        The top-k oracle's errors at the same keys per query.
    seconds : float
        Best wall time of one FMA call on all the inputs (``nan`` when not timed).
    time_ratio : float
        :attr:`seconds` over the best time of :func:`~fmm_attention.exact_attention` on the
        same inputs, timed in the same rounds (``nan`` when not timed).
    """

    label: str
    options: dict
    keys_fraction: float
    errors: np.ndarray
    oracle_errors: np.ndarray
    seconds: float = float("nan")
    time_ratio: float = float("nan")

    @property
    def median(self):
        """Median of :attr:`errors` over the heads."""
        return float(np.median(self.errors))

    @property
    def p90(self):
        """90th percentile of :attr:`errors` over the heads."""
        return float(np.percentile(self.errors, 90))

    @property
    def oracle_median(self):
        """Median of :attr:`oracle_errors` over the heads."""
        return float(np.median(self.oracle_errors))


def relative_errors(out, ref):
    """Relative Frobenius error of each leading index: ``||out - ref|| / ||ref||`` over (n, dv).

    Parameters
    ----------
    out, ref : array_like, shape (..., n, dv)
        An approximation and the reference, e.g. FMA's and exact attention's outputs.

    Returns
    -------
    ndarray, shape (prod(...),), float64
        One error per leading index (flattened); 0 where ``ref`` is 0 and ``out`` equals it.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention.accuracy import relative_errors
    >>> ref = np.ones((2, 4, 3))
    >>> relative_errors(ref * [[[1.0]], [[1.5]]], ref).tolist()
    [0.0, 0.5]
    """
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    num = np.linalg.norm((out - ref).reshape(-1, ref.shape[-2] * ref.shape[-1]), axis=1)
    den = np.linalg.norm(ref.reshape(-1, ref.shape[-2] * ref.shape[-1]), axis=1)
    return num / np.where(den > 0, den, 1.0)


def default_settings(n):
    """The settings of the accuracy-versus-cost table of :doc:`/accuracy`.

    Parameters
    ----------
    n : int
        Sequence length; the settings with sinks use tokens ``0`` and ``n - 1``.

    Returns
    -------
    list of (str, dict)
        Labels and :func:`~fmm_attention.fmm_attention` options, the input of
        :func:`accuracy_vs_cost`.

    Examples
    --------
    >>> from fmm_attention.accuracy import default_settings
    >>> label, options = default_settings(512)[-4]
    >>> label, options["global_tokens"]
    ('cluster m=4 p=2 refine 80 + sinks', [0, 511])
    """
    sinks = [0, n - 1]
    return [
        ("mean m=16 p=1", dict(block_size=16, rank=1)),
        ("mean m=16 p=4", dict(block_size=16, rank=4)),
        ("mean m=16 p=8", dict(block_size=16, rank=8)),
        ("cluster m=16 p=4", dict(block_size=16, rank=4, coarsening="cluster", cluster_iters=8)),
        ("cluster m=16 p=8", dict(block_size=16, rank=8, coarsening="cluster", cluster_iters=8)),
        ("mean m=16 p=1 + sinks", dict(block_size=16, rank=1, global_tokens=sinks)),
        ("mean m=16 p=1 refine 32", dict(block_size=16, rank=1, refine=32)),
        ("mean m=16 p=1 refine 64", dict(block_size=16, rank=1, refine=64)),
        ("mean m=16 p=1 refine 64 + sinks", dict(block_size=16, rank=1, refine=64, global_tokens=sinks)),
        ("cluster m=8 p=4 refine 48 + sinks",
         dict(block_size=8, rank=4, coarsening="cluster", cluster_iters=8, refine=48, global_tokens=sinks)),
        ("cluster m=4 p=2 refine 80 + sinks", dict(_CLUSTER_M4, global_tokens=sinks)),
        *((f"preset {name}", dict(options)) for name, options in PRESETS.items()),
    ]


#: Presets (:doc:`/accuracy`, "Presets"): pass one as ``fmm_attention(q, k, v, **FAST)``.
#: Chosen by error against time on the heads of one shipped file, measured on the other
#: (held out); their measured errors and time ratios are in the docs. Each attends token 0
#: exactly (the first token, [CLS] or BOS, is a sink in pretrained models).
#: All three are mean coarsening without refinement: on the error-against-time frontier
#: (``docs/make_preset_table.py frontier``) a larger block beat cluster coarsening and
#: refinement at block 16, whose bookkeeping cost more than the keys it saved.
#: FAST: block 32, rank 4.
FAST = dict(block_size=32, rank=4, global_tokens=(0,))
#: BALANCED: block 64, rank 8.
BALANCED = dict(block_size=64, rank=8, global_tokens=(0,))
#: ACCURATE: block 128, rank 8 (at n = 512 its near field holds most keys exactly).
ACCURATE = dict(block_size=128, rank=8, global_tokens=(0,))

#: The accuracy setting of earlier releases (block 4, rank 2, cluster coarsening with 8
#: Lloyd steps, refinement 80), kept in the study's table for comparison.
_CLUSTER_M4 = dict(block_size=4, rank=2, coarsening="cluster", cluster_iters=8, refine=80)

#: The presets by name, in order of cost.
PRESETS = {"FAST": FAST, "BALANCED": BALANCED, "ACCURATE": ACCURATE}


def accuracy_vs_cost(q, k, v, settings=None, *, causal=False, scale=None, key_padding_mask=None, progress=None,
                     repeats=3, dtype=np.float64):
    """Error, keys per query and time of several FMA settings, beside the top-k oracle.

    Keys per query is not the cost when a setting's bookkeeping (refinement, clustering)
    dominates, so with ``repeats > 0`` each setting is also timed against
    :func:`~fmm_attention.exact_attention` on the same inputs: ``repeats`` rounds, each
    timing exact attention and then every setting once (so a change in the machine's load
    affects both sides alike), best time of each kept.

    Parameters
    ----------
    q, k : array_like, shape (..., n, d)
        Queries and keys, computed in ``dtype``.
    v : array_like, shape (..., n, dv)
        Values. Every leading index (layer, head, ...) is one sample of the error
        distribution.
    settings : list of (str, dict), optional
        Labels and :func:`~fmm_attention.fmm_attention` options; :func:`default_settings`
        when omitted.
    causal : bool, optional
        Causal attention for every setting, the reference and the oracle.
    scale : float, optional
        Logit scale, ``1/sqrt(d)`` by default; the same for FMA, the reference and the oracle.
    key_padding_mask : array_like of bool, shape (..., n), optional
        ``True`` marks a valid key; given to FMA, the reference and the oracle alike.
    progress : callable, optional
        Called with each label after its setting is measured.
    repeats : int, optional
        Timing rounds (0: no timing, :attr:`CostErrorRow.time_ratio` is ``nan``).
    dtype : {numpy.float64, numpy.float32}, optional
        The dtype of every computation (and of the timing).

    Returns
    -------
    list of CostErrorRow

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention.accuracy import accuracy_vs_cost
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 128, 16))
    >>> settings = [("exact limit", dict(block_size=8, rank=32))]
    >>> rows = accuracy_vs_cost(q, k, v, settings)
    >>> rows[0].keys_fraction, rows[0].median < 1e-12
    (1.0, True)
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    q, k, v = (np.ascontiguousarray(x, dtype=dtype) for x in (q, k, v))
    n = q.shape[-2]
    settings = default_settings(n) if settings is None else settings
    common = dict(causal=causal, scale=scale, key_padding_mask=key_padding_mask)
    ref = exact_attention(q, k, v, **common)
    oracle_cache = {}
    rows = []
    for label, options in settings:
        out, stats = fmm_attention(q, k, v, return_stats=True, **common, **options)
        budgets = matched_budgets(stats.keys_per_query_mean, n, causal=causal)
        key = int(budgets.sum())
        if key not in oracle_cache:
            oracle_cache[key] = relative_errors(topk_attention(q, k, v, keys=budgets, **common), ref)
        rows.append(CostErrorRow(label, dict(options), stats.keys_fraction, relative_errors(out, ref), oracle_cache[key]))
        if progress is not None:
            progress(label)
    if int(repeats) > 0:
        best_exact, best = _interleaved_times(q, k, v, settings, common, int(repeats))
        rows = [dataclasses.replace(row, seconds=t, time_ratio=t / best_exact) for row, t in zip(rows, best)]
    return rows


def _interleaved_times(q, k, v, settings, common, repeats):
    """Best time of exact attention and of each setting over ``repeats`` rounds of all of them."""
    timer = time.perf_counter
    best_exact, best = math.inf, [math.inf] * len(settings)
    for _ in range(repeats):
        t0 = timer()
        exact_attention(q, k, v, **common)
        best_exact = min(best_exact, timer() - t0)
        for i, (_, options) in enumerate(settings):
            t0 = timer()
            fmm_attention(q, k, v, **common, **options)
            best[i] = min(best[i], timer() - t0)
    return best_exact, best


def format_rows(rows):
    """The rows of :func:`accuracy_vs_cost` as a text table."""
    from .perf import format_table as table

    timed = any(math.isfinite(r.time_ratio) for r in rows)
    body = [[r.label, f"{100 * r.keys_fraction:.1f}%", f"{r.median:.3f}", f"{r.p90:.3f}", f"{r.oracle_median:.3f}",
             "yes" if r.median < r.oracle_median else "no"] + ([f"{r.time_ratio:.2f}x"] if timed else []) for r in rows]
    headers = ["setting", "keys/query", "median err", "p90 err", "top-k oracle median", "beats oracle"]
    return table(body, headers + (["time / exact"] if timed else []))
