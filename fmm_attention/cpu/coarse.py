"""The CPU upward passes of the built-in coarsenings, one entry point each.

Each follows the calling convention of :attr:`fmm_attention.coarsening.Coarsening.kernels`:
``upward(coarsening, batch, tree, valid=, has_mask=, count_scaling=, kc=, vc=, cbias=)``
writes the coarse keys, values and logit biases of every level into the given buffers
(zeros, and ``-inf`` biases, on entry). They turn the tree into the arrays the compiled
kernels take; cluster coarsening's entry point lives with its kernels
(:func:`fmm_attention.cpu.cluster.upward`).
"""

import numpy as np

from .upward import box_counts_bias, learned_upward_level
from .upward import mean_upward as _mean_kernel

__all__ = ["learned_upward", "mean_upward"]


def mean_upward(coarsening, batch, tree, *, valid, has_mask, count_scaling, kc, vc, cbias):
    """Mean coarsening of every level in one O(n d) pass (see :class:`~fmm_attention.MeanCoarsening`)."""
    levels = tree.levels
    sub_sizes = np.array([lv.sub_box_size for lv in levels], dtype=np.int64)
    offsets = np.array([lv.offset for lv in levels], dtype=np.int64)
    n_rows = np.array([lv.n_boxes * lv.rank for lv in levels], dtype=np.int64)
    counts = np.zeros(cbias.shape, dtype=cbias.dtype)
    _mean_kernel(batch.k, batch.v, valid, has_mask, sub_sizes, offsets, n_rows, count_scaling, kc, vc, cbias, counts)


def learned_upward(coarsening, batch, tree, *, valid, has_mask, count_scaling, kc, vc, cbias):
    """One grouped convolution per level (see :class:`~fmm_attention.LearnedCoarsening`)."""
    kw, vw, kb, vb = coarsening.level_arrays(batch.dtype)
    for i, level in enumerate(tree.levels):
        args = (level.box_size, level.rank, level.offset)
        learned_upward_level(batch.k, valid, has_mask, kw[i], kb[i], *args, kc)
        learned_upward_level(batch.v, valid, has_mask, vw[i], vb[i], *args, vc)
        box_counts_bias(valid, has_mask, batch.n, *args, count_scaling, kc, vc, cbias)
