"""Implied attention matrices: mean-coarsened FMA as a dense softmax attention ``P~``.

The validated float64 setup every study shares, the exact and FMA-implied logits of one
head, and :func:`attention_matrix`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.special

from .. import _config
from .._validate import attention_inputs, check_bool, check_choice
from ..options import check_fmm_options
from ..coarsening import LearnedCoarsening, as_coarsening
from ..tree import build_tree


@dataclass(frozen=True, eq=False)
class _Setup:
    """Validated float64 inputs (leading dims flattened to one axis) and the FMA tree."""

    q: np.ndarray  # (B, n, d)
    k: np.ndarray  # (B, n, d)
    v: np.ndarray | None  # (B, n, dv)
    valid: np.ndarray  # (B, n) bool
    has_mask: bool
    lead_shape: tuple
    scale: float
    tree: object
    levels: np.ndarray  # (n, n) int8: tree.level_map()
    level_masks: tuple  # per far level: (n, n) bool, the pairs it serves
    never: np.ndarray  # (n, n) bool, pairs never attended (future keys when causal)
    count_scaling: bool
    query_coarsening: bool
    options: dict

    @property
    def n_heads(self):
        return self.q.shape[0]

    def index(self, b):
        """The caller's leading index of flat head ``b``."""
        return tuple(int(i) for i in np.unravel_index(b, self.lead_shape)) if self.lead_shape else ()


def _setup(caller, q, k, v, *, causal, block_size, rank, coarsening, count_scaling, query_coarsening,
           scale, key_padding_mask, check_finite):
    causal = check_bool(causal, "causal")
    if isinstance(coarsening, LearnedCoarsening):
        raise ValueError(
            f"{caller}: coarsening={coarsening!r} has no token-level attention matrix: a learned "
            "coarse key mixes all keys of its box with trained (possibly negative) weights, so the "
            "weight it receives cannot be attributed to individual tokens. Use coarsening='mean', "
            "or measure learned coarsening by comparing fmm_attention with exact_attention outputs"
        )
    coarsening, count_scaling, query_coarsening = check_fmm_options(
        coarsening=coarsening, count_scaling=count_scaling, query_coarsening=query_coarsening, causal=causal
    )
    # The protocol says which coarsenings have a token-level matrix the analysis reproduces
    # (a MeanCoarsening() instance is as good as the string "mean").
    if not as_coarsening(coarsening, 0).analysis:
        raise ValueError(
            f"{caller}: coarsening={coarsening!r} is not supported; the analysis reproduces mean "
            "coarsening (aligned sub-boxes) only. Content-dependent groups ('cluster') also have a "
            "token-level matrix, but their assignments live inside the kernels"
        )
    # attention_matrix has no values: k stands in for v, which only passes the shape checks.
    batch = attention_inputs(q, k, k if v is None else v, scale=scale, key_padding_mask=key_padding_mask,
                             check_finite=check_finite)
    n = batch.n
    if n > _config.DENSE_MAX_N:
        raise ValueError(
            f"{caller} builds dense (n, n) matrices; the sequence length n={n} exceeds "
            f"fmm_attention._config.DENSE_MAX_N={_config.DENSE_MAX_N} (analyse a shorter window)"
        )
    tree = build_tree(n, block_size=block_size, rank=rank, causal=causal)
    valid = np.ones(batch.q.shape[:2], dtype=bool) if batch.valid is None else batch.valid
    levels = tree.level_map()
    options = dict(causal=causal, block_size=tree.block_size, rank=tree.rank, coarsening="mean",
                   count_scaling=count_scaling, query_coarsening=query_coarsening, scale=batch.scale)
    f64 = np.float64
    return _Setup(
        q=batch.q.astype(f64), k=batch.k.astype(f64), v=None if v is None else batch.v.astype(f64),
        valid=valid, has_mask=batch.valid is not None, lead_shape=batch.lead_shape, scale=batch.scale,
        tree=tree, levels=levels, level_masks=tuple(levels == lv.index for lv in tree.levels),
        never=levels < 0,
        count_scaling=count_scaling, query_coarsening=query_coarsening,
        options=options,
    )


def _segments(n, size):
    """Number of aligned segments of ``size`` tokens covering ``n``, and the padding."""
    n_seg = -(-n // size)
    return n_seg, n_seg * size - n


def _segment_sum(x, size):
    """Sums of ``x`` (n, ...) over aligned segments of ``size`` rows (zero-padded)."""
    n_seg, pad = _segments(x.shape[0], size)
    x = np.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape((n_seg, size) + x.shape[1:]).sum(axis=1)


def _sub_boxes(k, valid, size):
    """Mean coarsening of one level: ``(owner (n,), count (S,), kc (S, d))``.

    ``owner[j]`` is the sub-box of token ``j``; sub-boxes without a valid token get a zero mean.
    """
    count = _segment_sum(valid.astype(np.int64), size)
    kc = _segment_sum(np.where(valid[:, None], k, 0.0), size) / np.maximum(count, 1)[:, None]
    return np.arange(k.shape[0]) // size, count, kc


def _box_means(q, size, valid):
    """Mean of the valid queries of the level box (``size`` tokens) of every token: ``(n, d)``,
    and which tokens' boxes hold no valid query (their far field at this level is empty)."""
    n = q.shape[0]
    count = _segment_sum(valid[:, None].astype(q.dtype), size)[:, 0]
    means = _segment_sum(np.where(valid[:, None], q, 0), size) / np.maximum(count, 1)[:, None]
    box = np.arange(n) // size
    return means[box], (count == 0)[box]


def _logits(setup, b):
    """Exact and FMA-implied logits of head ``b``: ``(n, n)`` each, ``-inf`` where not attended."""
    q, k, valid = setup.q[b], setup.k[b], setup.valid[b]
    exact = setup.scale * (q @ k.T)
    exact[setup.never] = -np.inf
    if setup.has_mask:
        exact[:, ~valid] = -np.inf
    implied = exact.copy()
    for level, served in zip(setup.tree.levels, setup.level_masks):
        owner, count, kc = _sub_boxes(k, valid, level.sub_box_size)
        if setup.query_coarsening:  # the spec: the mean of the box's valid queries
            queries, no_query = _box_means(q, level.box_size, valid)
        else:
            queries, no_query = q, None
        coarse = setup.scale * (queries @ kc.T)
        if not setup.count_scaling:  # the coarse key's weight is shared by its tokens
            coarse -= np.log(np.maximum(count, 1))[None, :]
        if no_query is not None:
            coarse[no_query] = -np.inf
        # every token carries the logit of its sub-box: expand the columns, keep the served pairs
        np.copyto(implied, np.take(coarse, owner, axis=1), where=served & valid[None, :] if setup.has_mask else served)
    return exact, implied


def _log_softmax(logits):
    """Row-wise log-softmax; rows with no finite logit (no valid key) get ``-inf`` everywhere."""
    with np.errstate(invalid="ignore"):
        log_p = scipy.special.log_softmax(logits, axis=-1)
    return np.where(np.isnan(log_p), -np.inf, log_p)


def _softmax(logits):
    return np.exp(_log_softmax(logits))


def attention_matrix(q, k, *, method="exact", causal=False, block_size=_config.DEFAULT_BLOCK_SIZE,
                     rank=_config.DEFAULT_RANK, coarsening="mean", count_scaling=True, query_coarsening=False,
                     scale=None, key_padding_mask=None, check_finite=True):
    """Dense attention matrix, exact or implied by Fast Multipole Attention.

    ``method="exact"`` gives ``P = softmax(scale * q @ k.T)`` (with the causal and padding
    masks). ``method="fmm"`` gives the matrix ``P~`` that FMA with mean coarsening
    implicitly applies: for a pair ``(i, j)`` served by far level ``l``, key ``j`` is
    replaced by the coarse key ``kc`` (mean of the valid keys) of its level-``l`` sub-box
    ``S``; with count scaling every token of ``S`` carries the logit ``scale * q_i . kc``
    (so ``S`` as a whole carries the coarse logit ``scale * q_i . kc + log|S|``), without it
    the coarse key's weight is shared among the ``|S|`` tokens (logit
    ``scale * q_i . kc - log|S|`` each). Because the coarse value is the mean of the
    sub-box's values, ``P~ @ v`` equals ``fmm_attention(q, k, v, ...)`` to rounding.

    Parameters
    ----------
    q, k : array_like, shape (..., n, d)
        Queries and keys; leading dims (batch, heads) must match.
    method : {"exact", "fmm"}, optional
        Exact softmax attention, or the attention implied by FMA.
    causal : bool, optional
        Query ``i`` attends only to keys ``j <= i``.
    block_size, rank : int, optional
        FMA's finest box size ``m`` and coarse keys per box ``p`` (powers of two); they only
        matter for ``method="fmm"`` but are validated either way.
    coarsening : "mean", optional
        Only mean coarsening has a token-level matrix; a
        :class:`~fmm_attention.LearnedCoarsening` raises ``ValueError``.
    count_scaling : bool, optional
        FMA's count scaling (``log|S|`` added to each coarse logit).
    query_coarsening : bool, optional
        FMA's O(n) variant: far-field logits use the mean query of the query's level box
        (``scale * qc_b . kc`` instead of ``scale * q_i . kc``). Bidirectional only.
    scale : float, optional
        Logit scale; ``1 / sqrt(d)`` by default.
    key_padding_mask : array_like of bool, shape (..., n), optional
        ``True`` marks a valid key. Invalid keys get zero weight and leave the coarse means.
    check_finite : bool, optional
        Reject NaN or infinity in ``q`` and ``k`` (default).

    Returns
    -------
    ndarray of float64, shape (..., n, n)
        Row ``i`` holds query ``i``'s weights over the keys; each row sums to 1, except rows
        of queries with no valid key (all zero, as FMA's output is zero there).

    Raises
    ------
    ValueError
        ``n`` above 8192, learned coarsening, an unknown
        ``method``, ``query_coarsening`` with ``causal``, or invalid inputs.
    TypeError
        Non-float inputs or non-bool flags.

    See Also
    --------
    compare : error metrics and bounds built from these matrices.
    fmm_attention.FMMTree.level_map : which level serves each pair.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention import fmm_attention
    >>> from fmm_attention.analysis import attention_matrix
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 64, 8))
    >>> implied = attention_matrix(q, k, method="fmm", block_size=4, rank=2)
    >>> implied.shape, bool(np.allclose(implied.sum(axis=1), 1.0))
    ((64, 64), True)
    >>> out = fmm_attention(q, k, v, block_size=4, rank=2)
    >>> bool(np.allclose(implied @ v, out))
    True
    """
    method = check_choice(method, "method", ("exact", "fmm"))
    setup = _setup("attention_matrix", q, k, None, causal=causal, block_size=block_size, rank=rank,
                   coarsening=coarsening, count_scaling=count_scaling, query_coarsening=query_coarsening,
                   scale=scale, key_padding_mask=key_padding_mask, check_finite=check_finite)
    n = setup.q.shape[1]
    out = np.empty((setup.n_heads, n, n))
    for b in range(setup.n_heads):
        exact, implied = _logits(setup, b)
        out[b] = _softmax(exact if method == "exact" else implied)
    return out.reshape(setup.lead_shape + (n, n))
