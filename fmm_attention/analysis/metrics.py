"""Error metrics of FMA against exact attention, head by head: :func:`compare` and its reports."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import scipy.special

from .. import _config
from ..api import fmm_attention
from ..perf import _progress
from .bounds import BOUND_SLACK, _output_bound
from .implied import _log_softmax, _logits, _setup


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
        Called as ``progress(label)`` after each head (the package's one progress
        contract, see :mod:`fmm_attention.perf`), ``label`` naming the head (``"head 3"``);
        with tqdm: ``bar = tqdm.tqdm(total=n_heads)`` and ``progress=lambda label: bar.update()``.

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
    progress = _progress(progress)
    setup = _setup("compare", q, k, v, causal=causal, block_size=block_size, rank=rank,
                   coarsening=coarsening, count_scaling=count_scaling, query_coarsening=query_coarsening,
                   scale=scale, key_padding_mask=key_padding_mask, check_finite=check_finite)
    options = {key: value for key, value in setup.options.items() if key != "coarsening"}
    fma_out = fmm_attention(setup.q, setup.k, setup.v, key_padding_mask=setup.valid if setup.has_mask else None,
                            check_finite=False, backend="cpu", **options)
    reports = []
    for b in range(setup.n_heads):
        reports.append(_compare_head(setup, b, fma_out[b]))
        progress(f"head {b}")
    reports = tuple(reports)
    box_sizes = (setup.tree.block_size,) + tuple(level.box_size for level in setup.tree.levels)
    return CompareReport(reports, setup.lead_shape, dict(setup.options), box_sizes)
