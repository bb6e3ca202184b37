"""Error analysis of Fast Multipole Attention against exact attention (SciPy).

Mean-coarsened FMA is itself a softmax attention: seen from query ``i``, every key ``j``
served by a far level is replaced by the coarse key of its sub-box, and every valid token
of that sub-box receives the same weight. The resulting dense *implied* attention matrix
``P~`` satisfies ``P~ @ v == fmm_attention(q, k, v)`` to rounding, which turns every
question about FMA's error into a question about two row-stochastic matrices:

* :func:`attention_matrix` builds ``P`` (exact) or ``P~`` (FMA) densely;
* :func:`compare` measures output errors, per-row KL divergence and total variation, the
  spectral-norm error, where (by level) the attention mass and the error sit, and checks
  two rigorous per-query bounds (Theorem 2 and Proposition 3 of the "Error analysis"
  page of the documentation, with proofs);
* :func:`far_field_rank_study` compares FMA's far-field blocks with the best possible
  (Eckart-Young) approximation of the same rank.

All three build ``(n, n)`` matrices, so ``n`` is limited to
8192; everything is computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import scipy.special
from numba import prange

from . import _config
from ._validate import attention_inputs, check_bool, check_choice, check_fmm_options
from .api import fmm_attention
from .coarsening import LearnedCoarsening
from .cpu._jit import jit
from .cpu._launch import launch_guard
from .tree import build_tree

__all__ = [
    "attention_matrix",
    "compare",
    "far_field_rank_study",
    "CompareReport",
    "HeadReport",
    "RankStudy",
    "LevelRankStudy",
]

#: Rounding slack of the bound checks: a bound holds for query ``i`` when
#: ``error_i <= bound_i + BOUND_SLACK * (bound_i + max_j ||v_j||)``.
BOUND_SLACK = 1e-10


# --------------------------------------------------------------------------- planning
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
    if coarsening != "mean":
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
    options = dict(causal=causal, block_size=tree.block_size, rank=tree.rank, coarsening=coarsening,
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


# --------------------------------------------------------------------------- dense matrices
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


# --------------------------------------------------------------------------- compare
def _ratio(num, den):
    """``num / den`` with ``0/0 = 0`` and ``x/0 = inf``."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))


def _spectral_norm(a):
    """Largest singular value of ``a`` (ARPACK for large matrices, dense SVD otherwise)."""
    if not np.any(a):
        return 0.0
    if min(a.shape) < 64:
        return float(scipy.linalg.svdvals(a, check_finite=False)[0])
    v0 = np.random.default_rng(0).standard_normal(min(a.shape))  # never in a null space by accident
    try:
        return float(scipy.sparse.linalg.svds(a, k=1, v0=v0, return_singular_vectors=False)[0])
    except scipy.sparse.linalg.ArpackError:  # pragma: no cover - ARPACK converges on these sizes
        return float(scipy.linalg.svdvals(a, check_finite=False)[0])


#: Perturbations from which ``sinh`` and ``cosh`` may overflow: the bound is set to ``inf``.
_OVERFLOW = 700.0


@jit(parallel=True)
def _bound_kernel(exact, implied, levels, pt, values, centers, part_a, radius, max_delta):
    """Per query ``i`` (one pass over its keys, no ``(n, n)`` temporaries):

    * ``part_a[i]``: Theorem 2 (A), ``(||sum_j p~_ij (cosh d_ij - 1) u_ij||
      + ||sum_j p~_ij sinh(d_ij) |u_ij| ||) / sum_j p~_ij exp(-d_ij)`` with
      ``u_ij = v_j - o~_i`` and ``d_ij = |implied_ij - exact_ij|`` on far pairs (0 near);
    * ``radius[i] = max_j ||u_ij||`` and ``max_delta[i] = max_j d_ij`` over attended keys.

    ``sinh``, ``cosh - 1`` and ``exp(-d)`` all come from one ``e = expm1(d)``, free of
    cancellation: ``sinh d = e (e + 2) / (2 (e + 1))``, ``cosh d - 1 = e**2 / (2 (e + 1))``.
    """
    n_rows, n_cols = exact.shape
    dv = values.shape[1]
    for i in prange(n_rows):
        even = np.zeros(dv)
        odd = np.zeros(dv)
        denominator = 0.0
        r2 = 0.0
        dmax = 0.0
        blowup = False
        for j in range(n_cols):
            if exact[i, j] == -np.inf:
                continue
            w = pt[i, j]
            d = abs(implied[i, j] - exact[i, j]) if levels[i, j] > 0 else 0.0
            dmax = max(dmax, d)
            w_even = 0.0
            w_odd = 0.0
            if d > _OVERFLOW:
                blowup = True
            elif d > 0:
                e = math.expm1(d)
                w_even = w * e * e / (2.0 * (e + 1.0))
                w_odd = w * e * (e + 2.0) / (2.0 * (e + 1.0))
                denominator += w / (e + 1.0)
            else:
                denominator += w
            dist2 = 0.0
            for f in range(dv):
                u = values[j, f] - centers[i, f]
                dist2 += u * u
                even[f] += w_even * u
                odd[f] += w_odd * abs(u)
            r2 = max(r2, dist2)
        radius[i] = math.sqrt(r2)
        max_delta[i] = dmax
        numerator = math.sqrt(np.sum(even * even)) + math.sqrt(np.sum(odd * odd))
        if blowup or denominator == 0.0:
            part_a[i] = np.inf if (blowup or numerator > 0) else 0.0
        else:
            part_a[i] = numerator / denominator


def _output_bound(exact, implied, levels, pt, values, fma_out):
    """Theorem 2 for every query: ``(bound, max_delta)``.

    The bound is the smaller of part A (see :func:`_bound_kernel`) and part B,
    ``2 tanh(max_j d_ij / 2) max_j ||v_j - o~_i||``. Rounding: a weight ``p~ < 5e-324``
    that underflowed to 0 drops a term below ``5e-324 * sinh(700) * ||u|| < 1e-15 ||u||``
    (larger perturbations give ``inf``), far inside :data:`BOUND_SLACK`.
    """
    n = exact.shape[0]
    part_a, radius, max_delta = np.empty(n), np.empty(n), np.empty(n)
    with launch_guard():  # a parallel kernel like the library's others: see cpu/_launch.py
        _bound_kernel(exact, implied, levels, pt, values, fma_out, part_a, radius, max_delta)
    return np.minimum(part_a, 2.0 * np.tanh(max_delta / 2) * radius), max_delta


@dataclass(frozen=True, eq=False)
class HeadReport:
    """Errors of FMA against exact attention for one leading index (one head).

    All per-query arrays have shape ``(n,)``; queries with no valid key contribute zeros.
    The level arrays have one entry per level, ``0`` (near field) to ``L``.

    Attributes
    ----------
    index : tuple of int
        The leading index (e.g. ``(layer, head)``); ``()`` for 2-D inputs.
    rel_fro_error : float
        ``||O~ - O||_F / ||O||_F`` over the head's outputs.
    max_abs_error : float
        ``max |O~ - O|`` over all outputs and features.
    spectral_error : float
        ``||P~ - P||_2``, spectral norm of the attention-matrix error.
    spectral_rel_error : float
        ``||P~ - P||_2 / ||P||_2``.
    row_error : ndarray
        ``||o~_i - o_i||_2`` per query: what the bound bounds.
    kl : ndarray
        ``KL(p_i || p~_i) = sum_j rel_entr(p_ij, p~_ij)`` per query, in nats.
    tv : ndarray
        Total variation ``0.5 * sum_j |p~_ij - p_ij|`` per query.
    max_perturbation : ndarray
        ``max_j delta_ij``, the largest logit perturbation of each query.
    level_mass : ndarray
        Share of the exact attention mass each level serves (mean over queries).
    level_error_share : ndarray
        Each level's share of the entrywise L1 error ``sum |P~ - P|``.
    bound : ndarray
        Theorem 2's a-posteriori bound on ``row_error``: the smaller of its parts A and B.
    tv_bound : ndarray
        Proposition 3's bound ``tanh(max_j delta_ij / 2)`` on ``tv``.
    bound_held, tv_bound_held : bool
        Whether each bound held for every query (up to :data:`BOUND_SLACK`).
    value_norm : float
        ``max_j ||v_j||_2`` over valid keys: the scale of the rounding slack.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention.analysis import compare
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 64, 8))
    >>> head = compare(q, k, v, block_size=4, rank=2)[0]
    >>> bool(head.bound_held), head.level_mass.shape
    (True, (4,))
    """

    index: tuple
    rel_fro_error: float
    max_abs_error: float
    spectral_error: float
    spectral_rel_error: float
    row_error: np.ndarray
    kl: np.ndarray
    tv: np.ndarray
    max_perturbation: np.ndarray
    level_mass: np.ndarray
    level_error_share: np.ndarray
    bound: np.ndarray
    tv_bound: np.ndarray
    bound_held: bool
    tv_bound_held: bool
    value_norm: float

    @property
    def far_mass(self):
        """Share of the exact attention mass served by the far field (levels ``1..L``)."""
        return float(self.level_mass[1:].sum())

    @property
    def bound_ratio(self):
        """Median over queries of ``bound / row_error``: how tight the bound is (``>= 1``).

        Queries whose error is at rounding level (``<= 1e-12 * value_norm``) are left out;
        ``nan`` when none is left (FMA exact).
        """
        keep = self.row_error > 1e-12 * self.value_norm
        return float(np.median(self.bound[keep] / self.row_error[keep])) if keep.any() else float("nan")

    def scalars(self):
        """The head's scalar metrics as a dict (per-query arrays reduced to mean and max)."""
        return {
            "rel_fro_error": float(self.rel_fro_error),
            "max_abs_error": float(self.max_abs_error),
            "spectral_error": float(self.spectral_error),
            "spectral_rel_error": float(self.spectral_rel_error),
            "kl_mean": float(self.kl.mean()),
            "kl_max": float(self.kl.max()),
            "tv_mean": float(self.tv.mean()),
            "tv_max": float(self.tv.max()),
            "far_mass": self.far_mass,
            "max_perturbation": float(self.max_perturbation.max()),
            "bound_ratio": self.bound_ratio,
        }

    def to_dict(self, *, rows=True):
        """JSON-ready dict of the head's metrics; per-query arrays as lists when ``rows``."""
        out = {"index": list(self.index), **self.scalars(),
               "level_mass": self.level_mass.tolist(), "level_error_share": self.level_error_share.tolist(),
               "bound_held": self.bound_held, "tv_bound_held": self.tv_bound_held}
        if rows:
            for name in ("row_error", "kl", "tv", "max_perturbation", "bound", "tv_bound"):
                out[name] = getattr(self, name).tolist()
        return out


#: The per-head scalars summarised by :meth:`CompareReport.summary`.
SUMMARY_METRICS = ("rel_fro_error", "max_abs_error", "spectral_error", "spectral_rel_error", "kl_mean",
                   "kl_max", "tv_mean", "tv_max", "far_mass", "max_perturbation", "bound_ratio")


def _jsonable(options):
    return {key: (value if isinstance(value, (bool, int, float, str)) else repr(value))
            for key, value in options.items()}


@dataclass(frozen=True, eq=False)
class CompareReport:
    """Result of :func:`compare`: one :class:`HeadReport` per leading index.

    Indexable and iterable over the heads (row-major over the leading dims).

    Attributes
    ----------
    heads : tuple of HeadReport
    lead_shape : tuple of int
        The inputs' leading dims.
    options : dict
        The FMA options analysed (``causal``, ``block_size``, ``rank``, ``coarsening``,
        ``count_scaling``, ``query_coarsening``, ``scale``).
    box_sizes : tuple of int
        Tokens per box of each level: the block size for level 0 (near field), then
        ``w_1 .. w_L``.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention.analysis import compare
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 64, 8))
    >>> report = compare(q, k, v, block_size=4, rank=2)
    >>> len(report), report[1].index
    (2, (1,))
    >>> sorted(report.summary()["rel_fro_error"])
    ['max', 'median', 'p90']
    """

    heads: tuple
    lead_shape: tuple
    options: dict
    box_sizes: tuple

    def __len__(self):
        return len(self.heads)

    def __iter__(self):
        return iter(self.heads)

    def __getitem__(self, i):
        return self.heads[i]

    def summary(self):
        """Medians, 90th percentiles and maxima over heads of every scalar metric.

        Returns
        -------
        dict
            ``{metric: {"median", "p90", "max"}}`` for the metrics of
            :meth:`HeadReport.scalars` (NaN ratios of heads without error are skipped), the
            per-level medians ``level_mass`` and ``level_error_share``, ``n_heads``, and
            ``bound_held`` / ``tv_bound_held`` (over all heads and queries).
        """
        out = {"n_heads": len(self.heads)}
        scalars = [h.scalars() for h in self.heads]
        for name in SUMMARY_METRICS:
            values = np.array([s[name] for s in scalars], dtype=float)
            values = values[~np.isnan(values)]
            out[name] = (
                {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
                 "max": float(values.max())}
                if values.size else {"median": float("nan"), "p90": float("nan"), "max": float("nan")}
            )
        out["level_mass"] = np.median([h.level_mass for h in self.heads], axis=0).tolist()
        out["level_error_share"] = np.median([h.level_error_share for h in self.heads], axis=0).tolist()
        out["bound_held"] = all(h.bound_held for h in self.heads)
        out["tv_bound_held"] = all(h.tv_bound_held for h in self.heads)
        return out

    def to_dict(self, *, rows=True):
        """JSON-ready dict: ``options``, ``lead_shape``, ``box_sizes``, ``summary``, ``heads``.

        Parameters
        ----------
        rows : bool, optional
            Include the per-query arrays of every head (default); ``False`` keeps scalars.
        """
        return {"options": _jsonable(self.options), "lead_shape": list(self.lead_shape),
                "box_sizes": list(self.box_sizes), "summary": self.summary(),
                "heads": [h.to_dict(rows=rows) for h in self.heads]}

    def format(self, *, labels=None):
        """A plain-text table, one line per head, then the summary.

        Parameters
        ----------
        labels : sequence of str, optional
            One label per head (default: its leading index).
        """
        labels = [",".join(map(str, h.index)) or "-" for h in self.heads] if labels is None else list(labels)
        width = max([len("head")] + [len(s) for s in labels])
        header = (f"{'head':>{width}}  {'rel.fro':>9} {'max.abs':>9} {'KL.mean':>9} {'TV.mean':>9} "
                  f"{'TV.max':>9} {'spec.err':>9} {'far.mass':>8} {'bnd/err':>8}  held")
        lines = [header, "-" * len(header)]
        for label, h in zip(labels, self.heads):
            s = h.scalars()
            held = "yes" if (h.bound_held and h.tv_bound_held) else "NO"
            lines.append(
                f"{label:>{width}}  {s['rel_fro_error']:9.2e} {s['max_abs_error']:9.2e} {s['kl_mean']:9.2e} "
                f"{s['tv_mean']:9.2e} {s['tv_max']:9.2e} {s['spectral_error']:9.2e} {s['far_mass']:8.3f} "
                f"{s['bound_ratio']:8.2f}  {held}"
            )
        summ = self.summary()
        lines += ["", f"summary over {summ['n_heads']} heads ({_describe(self.options)}):",
                  f"  {'metric':<20} {'median':>10} {'p90':>10} {'max':>10}"]
        for name in SUMMARY_METRICS:
            m = summ[name]
            lines.append(f"  {name:<20} {m['median']:10.3e} {m['p90']:10.3e} {m['max']:10.3e}")
        lines.append("  level                " + " ".join(f"{i:>7d}" for i in range(len(self.box_sizes))))
        lines.append("  box size             " + " ".join(f"{w:>7d}" for w in self.box_sizes))
        lines.append("  exact mass (median)  " + " ".join(f"{x:7.3f}" for x in summ["level_mass"]))
        lines.append("  error share (median) " + " ".join(f"{x:7.3f}" for x in summ["level_error_share"]))
        verdict = {True: "held for every query", False: "VIOLATED"}
        lines.append(f"  output bound (Theorem 2): {verdict[summ['bound_held']]}; "
                     f"TV bound (Proposition 3): {verdict[summ['tv_bound_held']]}")
        return "\n".join(lines)

    def __str__(self):
        return self.format()


def _describe(options):
    text = f"block_size={options['block_size']}, rank={options['rank']}"
    if options["causal"]:
        text += ", causal"
    if not options["count_scaling"]:
        text += ", no count scaling"
    if options["query_coarsening"]:
        text += ", coarse queries"
    return text


def _compare_head(setup, b, fma_out):
    v = setup.v[b]
    exact, implied = _logits(setup, b)
    log_p = _log_softmax(exact)
    log_pt = _log_softmax(implied)
    p, pt = np.exp(log_p), np.exp(log_pt)
    out = p @ v
    diff = fma_out - out
    row_error = np.linalg.norm(diff, axis=1)
    abs_diff = np.abs(pt - p)

    levels = setup.levels
    attended = np.isfinite(exact)
    n_active = max(int(attended.any(axis=1).sum()), 1)
    n_levels = setup.tree.n_levels + 1
    by_level = levels.ravel() + 1  # bin 0 holds the pairs never attended
    level_mass = np.bincount(by_level, weights=p.ravel(), minlength=n_levels + 1)[1:] / n_active
    level_error = np.bincount(by_level, weights=abs_diff.ravel(), minlength=n_levels + 1)[1:]
    level_error_share = _ratio(level_error, level_error.sum())

    # The logit perturbations delta_ij = |l~_ij - l_ij| of the far pairs give Theorem 2 and
    # Proposition 3.
    bound, max_perturbation = _output_bound(exact, implied, levels, pt, v, fma_out)
    tv = 0.5 * abs_diff.sum(axis=1)
    tv_bound = np.tanh(max_perturbation / 2)

    value_norm = float(np.linalg.norm(v[setup.valid[b]], axis=1).max(initial=0.0))
    spectral = _spectral_norm(pt - p)
    return HeadReport(
        index=setup.index(b),
        rel_fro_error=float(_ratio(np.linalg.norm(diff), np.linalg.norm(out))),
        max_abs_error=float(np.abs(diff).max()),
        spectral_error=spectral,
        spectral_rel_error=float(_ratio(spectral, _spectral_norm(p))),
        row_error=row_error,
        kl=scipy.special.rel_entr(p, pt).sum(axis=1),
        tv=tv,
        max_perturbation=max_perturbation,
        level_mass=level_mass,
        level_error_share=level_error_share,
        bound=bound,
        tv_bound=tv_bound,
        bound_held=bool(np.all(row_error <= bound + BOUND_SLACK * (bound + value_norm))),
        tv_bound_held=bool(np.all(tv <= tv_bound + BOUND_SLACK)),
        value_norm=value_norm,
    )


def compare(q, k, v, *, causal=False, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
            coarsening="mean", count_scaling=True, query_coarsening=False, scale=None, key_padding_mask=None,
            check_finite=True, progress=None):
    """Measure FMA's error against exact attention, head by head, and check the error bounds.

    For each leading index (head) the exact attention ``P`` and FMA's implied attention
    ``P~`` (see :func:`attention_matrix`) are built densely; FMA's output ``O~`` comes from
    :func:`fmm_attention.fmm_attention` (float64, CPU backend) and the exact output is
    ``O = P @ v``.

    Parameters
    ----------
    q, k : array_like, shape (..., n, d)
        Queries and keys; leading dims (batch, heads) must match across ``q``, ``k``, ``v``.
    v : array_like, shape (..., n, dv)
        Values.
    causal, block_size, rank, coarsening, count_scaling, query_coarsening, scale, key_padding_mask, check_finite
        FMA's options, as in :func:`fmm_attention.fmm_attention`; ``coarsening`` must be
        ``"mean"`` (learned coarsening has no token-level attention matrix).
    progress : callable, optional
        Wraps the iterable of heads to report progress, e.g. ``tqdm.tqdm``.

    Returns
    -------
    CompareReport
        One :class:`HeadReport` per leading index, with

        * output errors: relative Frobenius ``||O~ - O||_F / ||O||_F``, max-abs, and per
          query ``||o~_i - o_i||_2``;
        * attention errors: per-row ``KL(p_i || p~_i)`` (``scipy.special.rel_entr``), total
          variation, and the spectral norm ``||P~ - P||_2``;
        * per level (0 = near field, 1..L far): the share of exact attention mass it serves
          and its share of the entrywise error ``sum |P~ - P|``;
        * the bounds and whether they held (up to :data:`BOUND_SLACK`): with the logit
          perturbations ``delta_ij = |l~_ij - l_ij|`` of the far pairs (``s |q_i . (kc - k_j)|``
          with count scaling and fine queries) and ``u_ij = v_j - o~_i``, Theorem 2,
          ``||o~_i - o_i|| <= min(A, B)`` with
          A = ``(||sum_j p~_ij (cosh delta_ij - 1) u_ij||
          + ||sum_j p~_ij sinh(delta_ij) |u_ij| ||) / sum_j p~_ij exp(-delta_ij)`` and
          B = ``2 tanh(max_j delta_ij / 2) max_j ||u_ij||``; and Proposition 3,
          ``TV(p_i, p~_i) <= tanh(max_j delta_ij / 2)``.

    Raises
    ------
    ValueError
        ``n`` above 8192, learned coarsening, invalid
        options or inputs (see :func:`fmm_attention.fmm_attention`).
    TypeError
        Non-float inputs, non-bool flags, or a ``progress`` that is not callable.

    See Also
    --------
    attention_matrix, far_field_rank_study

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention.analysis import compare
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 4, 128, 16))
    >>> report = compare(q, k, v, block_size=8, rank=2, causal=True)
    >>> len(report), report.summary()["bound_held"]
    (4, True)
    >>> head = report[0]
    >>> bool(np.all(head.row_error <= head.bound + 1e-12))
    True
    >>> bool(head.bound_ratio >= 1)
    True
    >>> # the near field and the far levels serve all the mass
    >>> round(float(head.level_mass.sum()), 6)
    1.0
    """
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be None or a callable that wraps an iterable (e.g. tqdm.tqdm), "
                        f"got {type(progress).__name__}")
    setup = _setup("compare", q, k, v, causal=causal, block_size=block_size, rank=rank,
                   coarsening=coarsening, count_scaling=count_scaling, query_coarsening=query_coarsening,
                   scale=scale, key_padding_mask=key_padding_mask, check_finite=check_finite)
    options = {key: value for key, value in setup.options.items() if key != "coarsening"}
    fma_out = fmm_attention(setup.q, setup.k, setup.v, key_padding_mask=setup.valid if setup.has_mask else None,
                            check_finite=False, backend="cpu", **options)
    heads = range(setup.n_heads)
    if progress is not None:
        heads = progress(heads)
    reports = tuple(_compare_head(setup, b, fma_out[b]) for b in heads)
    box_sizes = (setup.tree.block_size,) + tuple(level.box_size for level in setup.tree.levels)
    return CompareReport(reports, setup.lead_shape, dict(setup.options), box_sizes)


# --------------------------------------------------------------------------- rank study
@dataclass(frozen=True, eq=False)
class LevelRankStudy:
    """Far-field blocks of one level: their spectra and FMA's error against the optimum.

    Block ``t`` is the ``w x w`` submatrix (``w`` the level's box size) of the exact
    attention matrix ``P`` with rows = the queries of level box ``blocks[t, 0]`` and
    columns = the keys of level box ``blocks[t, 1]``, one of the far boxes in its
    interaction list at this level; positions beyond ``n`` are zero rows/columns. These
    blocks tile exactly the pairs the level serves. FMA's implied block (same rows and
    columns of ``P~``) is constant on each of the ``rank`` sub-boxes of its columns, so its
    rank is at most ``rank``, and by Eckart-Young its error is at least ``best_error``.

    Attributes
    ----------
    level : int
        Far level ``l`` (1 = finest).
    box_size : int
        ``w_l``.
    rank : int
        ``r_l``, the coarse keys per box FMA uses at this level.
    blocks : ndarray of int64, shape (n_blocks, 2)
        ``(query box, far box)`` of each block.
    singular_values : ndarray, shape (..., n_blocks, box_size)
        Singular values of each exact block, descending (``scipy.linalg.svdvals``).
    block_norm : ndarray, shape (..., n_blocks)
        Frobenius norm of each exact block.
    best_error, best_spectral_error : ndarray, shape (..., n_blocks)
        Eckart-Young: the smallest Frobenius / spectral error of any rank-``rank``
        approximation of the block, ``sqrt(sum_{t >= rank} sigma_t**2)`` and ``sigma_rank``.
    fma_error, fma_spectral_error : ndarray, shape (..., n_blocks)
        Frobenius / spectral norm of FMA's actual error ``P~ - P`` on the block.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention.analysis import far_field_rank_study
    >>> q, k = np.random.default_rng(0).standard_normal((2, 64, 8))
    >>> level = far_field_rank_study(q, k, block_size=4, rank=2).levels[0]
    >>> level.singular_values.shape == (len(level.blocks), level.box_size)
    True
    """

    level: int
    box_size: int
    rank: int
    blocks: np.ndarray
    singular_values: np.ndarray
    block_norm: np.ndarray
    best_error: np.ndarray
    best_spectral_error: np.ndarray
    fma_error: np.ndarray
    fma_spectral_error: np.ndarray

    @property
    def excess(self):
        """``||P~ - P||_F / min_rank ||A - P||_F`` over all blocks of the level, per head (>= 1).

        How far FMA's fixed coarsening is from the best possible rank-``rank``
        approximation of the same blocks; ``nan`` where the optimum is exact.
        """
        fma = np.sqrt((self.fma_error**2).sum(axis=-1))
        best = np.sqrt((self.best_error**2).sum(axis=-1))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(best > 0, fma / np.where(best > 0, best, 1.0), np.nan)

    def to_dict(self):
        """JSON-ready dict of all arrays."""
        return {name: (value.tolist() if isinstance(value, np.ndarray) else value)
                for name, value in self.__dict__.items()} | {"excess": np.asarray(self.excess).tolist()}


@dataclass(frozen=True, eq=False)
class RankStudy:
    """Result of :func:`far_field_rank_study`: one :class:`LevelRankStudy` per far level.

    Attributes
    ----------
    levels : tuple of LevelRankStudy
        Far levels ``1 .. L`` (levels serving no pair of the sequence are left out).
    lead_shape : tuple of int
        Leading dims of the inputs; every per-block array starts with them.
    options : dict
        The FMA options studied.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention.analysis import far_field_rank_study
    >>> q, k = np.random.default_rng(0).standard_normal((2, 64, 8))
    >>> study = far_field_rank_study(q, k, block_size=4, rank=2)
    >>> [s["level"] for s in study.summary()]
    [1, 2, 3]
    """

    levels: tuple
    lead_shape: tuple
    options: dict

    def summary(self):
        """Per level: box size, rank, number of blocks, FMA and optimal errors over all blocks
        and heads (Frobenius), and their ratio ``excess``."""
        out = []
        for lv in self.levels:
            fma = float(np.sqrt((lv.fma_error**2).sum()))
            best = float(np.sqrt((lv.best_error**2).sum()))
            out.append({"level": lv.level, "box_size": lv.box_size, "rank": lv.rank,
                        "n_blocks": len(lv.blocks), "fma_error": fma, "best_error": best,
                        "excess": fma / best if best > 0 else float("nan")})
        return out

    def to_dict(self):
        """JSON-ready dict: options, summary and every level's arrays."""
        return {"options": _jsonable(self.options), "lead_shape": list(self.lead_shape), "summary": self.summary(),
                "levels": [lv.to_dict() for lv in self.levels]}


def far_field_rank_study(q, k, *, causal=False, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
                         coarsening="mean", count_scaling=True, query_coarsening=False, scale=None,
                         key_padding_mask=None, check_finite=True):
    """Spectra of the exact far-field attention blocks, and FMA's error beside the optimum.

    At far level ``l`` (box size ``w``), for every query box ``b`` and every far box ``c``
    in its interaction list, the block ``A = P[b*w:(b+1)*w, c*w:(c+1)*w]`` of the exact
    attention matrix is the part of the attention that FMA approximates with ``r_l``
    coarse keys. FMA's implied block ``A~`` (same rows and columns of the matrix of
    :func:`attention_matrix`) has rank at most ``r_l``, so by Eckart-Young
    ``||A~ - A|| >= min_{rank B <= r_l} ||B - A||``, in the Frobenius and spectral norms.
    The study reports both sides, per block.

    Parameters
    ----------
    q, k : array_like, shape (..., n, d)
        Queries and keys.
    causal, block_size, rank, coarsening, count_scaling, query_coarsening, scale, key_padding_mask, check_finite
        FMA's options, as in :func:`fmm_attention.fmm_attention` (``coarsening="mean"``).

    Returns
    -------
    RankStudy

    Raises
    ------
    ValueError
        As :func:`attention_matrix`.

    See Also
    --------
    compare, attention_matrix

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention.analysis import far_field_rank_study
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 128, 16))
    >>> study = far_field_rank_study(q, k, block_size=8, rank=2)
    >>> level = study.levels[0]
    >>> level.box_size, level.rank, level.singular_values.shape[-1]
    (8, 2, 8)
    >>> bool(np.all(level.fma_error >= level.best_error))
    True
    """
    setup = _setup("far_field_rank_study", q, k, None, causal=causal, block_size=block_size, rank=rank,
                   coarsening=coarsening, count_scaling=count_scaling, query_coarsening=query_coarsening,
                   scale=scale, key_padding_mask=key_padding_mask, check_finite=check_finite)
    tree, n, B = setup.tree, setup.q.shape[1], setup.n_heads
    N = tree.padded_length
    pairs = []
    for level in tree.levels:
        w = level.box_size
        blocks = [(b, c) for b in range(level.n_boxes) for c in level.interactions[b]
                  if c >= 0 and b * w < n and c * w < n]
        pairs.append(np.array(blocks, dtype=np.int64).reshape(-1, 2))
    results = [{name: np.zeros((B, len(blocks)) + ((level.box_size,) if name == "sv" else ()))
                for name in ("sv", "norm", "best", "best2", "fma", "fma2")}
               for level, blocks in zip(tree.levels, pairs)]
    for b in range(B):
        exact, implied = _logits(setup, b)
        p = np.zeros((N, N))
        pt = np.zeros((N, N))
        p[:n, :n] = _softmax(exact)
        pt[:n, :n] = _softmax(implied)
        for level, blocks, res in zip(tree.levels, pairs, results):
            w, r = level.box_size, level.rank
            for t, (qb, kb) in enumerate(blocks):
                rows, cols = slice(qb * w, (qb + 1) * w), slice(kb * w, (kb + 1) * w)
                sv = scipy.linalg.svdvals(p[rows, cols], check_finite=False)
                err = pt[rows, cols] - p[rows, cols]
                res["sv"][b, t] = sv
                res["norm"][b, t] = np.sqrt(np.sum(sv**2))
                res["best"][b, t] = np.sqrt(np.sum(sv[r:] ** 2))
                res["best2"][b, t] = sv[r] if r < sv.size else 0.0
                res["fma"][b, t] = np.linalg.norm(err)
                res["fma2"][b, t] = scipy.linalg.svdvals(err, check_finite=False)[0]
    studies = []
    for level, blocks, res in zip(tree.levels, pairs, results):
        if not len(blocks):
            continue
        shape = setup.lead_shape + (len(blocks),)
        studies.append(LevelRankStudy(
            level=level.index, box_size=level.box_size, rank=level.rank, blocks=blocks,
            singular_values=res["sv"].reshape(shape + (level.box_size,)), block_norm=res["norm"].reshape(shape),
            best_error=res["best"].reshape(shape), best_spectral_error=res["best2"].reshape(shape),
            fma_error=res["fma"].reshape(shape), fma_spectral_error=res["fma2"].reshape(shape),
        ))
    return RankStudy(tuple(studies), setup.lead_shape, dict(setup.options))
