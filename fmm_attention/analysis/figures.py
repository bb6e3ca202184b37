"""Figures of the error analysis (matplotlib, the ``plot`` extra): the plan, attention, errors, spectra.

Each function returns a :class:`matplotlib.figure.Figure` (no pyplot state, no window);
``python -m fmm_attention analyze --plot DIR`` writes them as PNG files, and
``docs/make_analysis_figures.py`` draws the documentation's figures with them.
matplotlib is imported inside each function, so importing this module needs none.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "figure_level_map",
    "figure_attention",
    "figure_error_by_level",
    "figure_singular_values",
    "figure_error_by_head",
]


def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_level_map(tree):
    """Which level serves each (query, key) pair: the FMA plan as an image.

    Parameters
    ----------
    tree : FMMTree
        The plan (:func:`fmm_attention.build_tree`).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap

    levels = tree.level_map()
    n_levels = tree.n_levels
    colors = ["#ffffff", "#222222"] + [f"C{i}" for i in range(n_levels)]
    cmap = ListedColormap(colors[: n_levels + 2])
    norm = BoundaryNorm(np.arange(-1.5, n_levels + 1.5), cmap.N)
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot()
    image = ax.imshow(levels, cmap=cmap, norm=norm, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, ticks=np.arange(-1, n_levels + 1), shrink=0.8)
    bar.ax.set_yticklabels(["never"] + ["near field"] + [f"level {lv.index}: w={lv.box_size}, r={lv.rank}"
                                                         for lv in tree.levels], fontsize=8)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    kind = "causal" if tree.causal else "bidirectional"
    ax.set_title(f"FMA plan: n={tree.n}, block {tree.block_size}, rank {tree.rank}, {kind}", fontsize=9)
    return fig


def _pooled(matrix, size=256):
    """Mean over square tiles so that the image has at most ``size`` pixels a side."""
    factor = -(-max(matrix.shape) // size)
    if factor == 1:
        return matrix
    rows, cols = (-(-s // factor) * factor for s in matrix.shape)
    padded = np.zeros((rows, cols))
    padded[: matrix.shape[0], : matrix.shape[1]] = matrix
    return padded.reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))


def figure_attention(exact, implied, label):
    """Exact attention, FMA-implied attention and their difference (log scale).

    Matrices larger than 256 are shown as means over square tiles (the extent stays in
    token units).

    Parameters
    ----------
    exact, implied : ndarray, shape (n, n)
        ``P`` and ``P~`` of one head (:func:`~fmm_attention.analysis.attention_matrix`).
    label : str
        The figure's title (which head).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm

    floor = 1e-6
    fig = _figure(10, 3.4)
    axes = fig.subplots(1, 3, sharex=True, sharey=True)
    bounds = np.logspace(-6, 0, 13)  # two colours a decade: readable, and the PNG stays small
    norm = BoundaryNorm(bounds, 12)
    cmap = colormaps["magma"].resampled(12)
    n = exact.shape[0]
    panels = [(exact, "exact P"), (implied, "FMA-implied P~"), (np.abs(implied - exact), "|P~ - P|")]
    for ax, (matrix, title) in zip(axes, panels):
        image = ax.imshow(np.maximum(_pooled(matrix), floor), norm=norm, cmap=cmap, interpolation="nearest",
                          extent=(-0.5, n - 0.5, n - 0.5, -0.5))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key j")
    axes[0].set_ylabel("query i")
    fig.suptitle(label, fontsize=9)
    bar = fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight", ticks=bounds[::2])
    bar.ax.set_yticklabels([f"1e{int(e)}" for e in np.log10(bounds[::2])])
    return fig


def figure_error_by_level(report):
    """Median share of exact mass and of the L1 error per level; bound vs error per query.

    Parameters
    ----------
    report : CompareReport
        The result of :func:`~fmm_attention.analysis.compare`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = _figure(10, 3.8)
    ax, ax2 = fig.subplots(1, 2)
    mass = np.array([h.level_mass for h in report.heads])
    share = np.array([h.level_error_share for h in report.heads])
    x = np.arange(mass.shape[1])
    ax.bar(x - 0.2, np.median(mass, axis=0), 0.4, label="exact attention mass")
    ax.bar(x + 0.2, np.median(share, axis=0), 0.4, label="share of |P~ - P|")
    ax.set_xticks(x, ["near"] + [f"{i}\nw={w}" for i, w in enumerate(report.box_sizes[1:], start=1)])
    ax.set_xlabel("level")
    ax.set_ylabel(f"median over {len(report)} heads")
    ax.legend(fontsize=8)
    ax.set_title("where the attention and the error sit", fontsize=9)
    errors = np.concatenate([h.row_error for h in report.heads])
    bounds = np.concatenate([h.bound for h in report.heads])
    keep = (errors > 0) & np.isfinite(bounds)
    rng = np.random.default_rng(0)
    shown = rng.choice(np.flatnonzero(keep), size=min(4000, int(keep.sum())), replace=False)
    ax2.loglog(errors[shown], bounds[shown], ".", ms=2, alpha=0.4)
    if shown.size:
        lo, hi = errors[shown].min(), bounds[shown].max()
        ax2.loglog([lo, hi], [lo, hi], "k-", lw=1, label="bound = error")
        ax2.legend(fontsize=8)
    ax2.set_xlabel("actual error ||o~_i - o_i||")
    ax2.set_ylabel("Theorem 2 bound")
    ax2.set_title("per-query bound vs actual error", fontsize=9)
    return fig


def figure_singular_values(study, label):
    """Normalised singular values of the exact far-field blocks, level by level.

    Parameters
    ----------
    study : RankStudy
        The result of :func:`~fmm_attention.analysis.far_field_rank_study` for one head.
    label : str
        Which head, for the title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for i, level in enumerate(study.levels):
        sv = level.singular_values.reshape(-1, level.box_size)
        keep = sv[:, 0] > 0
        if not keep.any():
            continue
        normalised = np.median(sv[keep] / sv[keep, :1], axis=0)
        t = np.arange(1, level.box_size + 1)
        excess = float(np.nanmedian(level.excess))
        ax.semilogy(t, np.maximum(normalised, 1e-16), "-", color=f"C{i}",
                    label=f"level {level.level} (w={level.box_size}): FMA/optimal error {excess:.1f}x")
        ax.axvline(level.rank + 0.5, color=f"C{i}", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("singular value index t (dotted: FMA's rank + 1/2)")
    ax.set_ylabel("median sigma_t / sigma_1 over blocks")
    ax.set_title(f"far-field blocks of the exact attention ({label})", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def figure_error_by_head(values, row_labels, col_labels, title):
    """Heat map of one metric over (layer, head).

    Parameters
    ----------
    values : ndarray, shape (n_layers, n_heads)
        The metric per (layer, head).
    row_labels, col_labels : sequence of str
        Tick labels of the layers and the heads.
    title : str
        The figure's title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = _figure(1.2 + 0.45 * len(col_labels), 1.2 + 0.4 * len(row_labels))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, fontsize=7)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig
