"""Cost accounting of one FMA call (``return_stats=True``): keys per query and FLOPs by stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from numba import njit

from ._config import CACHE
from .tree import TOKEN


@dataclass(frozen=True)
class FMMStats:
    """What one :func:`~fmm_attention.fmm_attention` call computed.

    Attributes
    ----------
    keys_per_query_mean, keys_per_query_max : float
        Logits per query (exact tokens plus coarse keys; a coarse-query far field counts
        its box's coarse keys for every query of the box), over all leading indices.
    keys_fraction : float
        ``keys_per_query_mean / n``: the share of a dense row each query costs.
    flops : dict
        Floating-point operations by stage: ``"upward"`` (coarsening), ``"near"`` (exact
        tokens, ``2 (d + dv)`` per logit), ``"far"`` (coarse keys), ``"refine"`` (scoring
        the plan to choose refinements). Counted from the executed plan, not timed.
    """

    keys_per_query_mean: float
    keys_per_query_max: float
    keys_fraction: float
    flops: dict = field(default_factory=dict)

    def to_dict(self):
        """The statistics as a plain dict."""
        return asdict(self)


@njit(cache=CACHE)
def _keys_per_query(seg_lo, seg_hi, segments, n, block_size, causal, token_keys, coarse_keys):
    """Fill per-query key counts ``(P, n)``: exact tokens and coarse keys separately."""
    for p in range(seg_lo.shape[0]):
        for blk in range(seg_lo.shape[1]):
            i0 = blk * block_size
            for s in range(seg_lo[p, blk], seg_hi[p, blk]):
                start = segments[p, s, 1]
                count = segments[p, s, 2]
                for i in range(i0, min(n, i0 + block_size)):
                    if segments[p, s, 0] == TOKEN:
                        if causal:
                            token_keys[p, i] += max(0, min(count, i + 1 - start))
                        else:
                            token_keys[p, i] += count
                    else:
                        coarse_keys[p, i] += count


def fmm_stats(tree, plan, *, batch_size, d, dv, coarsening, cluster_iters, refine, query_coarsening):
    """Statistics of a call that executed ``plan = (seg_lo, seg_hi, segments)`` along ``tree``."""
    seg_lo, seg_hi, segments = plan
    n = tree.n
    token_keys = np.zeros((seg_lo.shape[0], n), dtype=np.int64)
    coarse_keys = np.zeros_like(token_keys)
    _keys_per_query(seg_lo, seg_hi, segments, n, tree.block_size, tree.causal, token_keys, coarse_keys)
    if query_coarsening:  # each query inherits its boxes' far fields
        _, inter = tree.box_tables
        ranks = np.concatenate([np.full(lv.n_boxes, lv.rank) for lv in tree.levels])
        per_box = (inter >= 0).sum(axis=1) * ranks
        offset = 0
        for level in tree.levels:
            coarse_keys += np.repeat(per_box[offset : offset + level.n_boxes], level.box_size)[None, :n]
            offset += level.n_boxes
    scale_to_batch = batch_size / seg_lo.shape[0]
    keys = token_keys + coarse_keys
    per_logit = 2 * (d + dv)
    levels_rows = sum(lv.n_boxes * lv.rank for lv in tree.levels)
    if coarsening == "mean":
        upward = (d + dv) * (n + 2 * levels_rows)
    elif coarsening == "cluster":
        upward = sum(3 * d * lv.rank * n * max(cluster_iters, 1) + (d + dv) * n for lv in tree.levels)
    else:
        upward = sum(2 * (d + dv) * lv.rank * n for lv in tree.levels)
    far = per_logit * coarse_keys.sum() * scale_to_batch
    if query_coarsening:  # far logits are computed once per box, not per query
        _, inter = tree.box_tables
        far = per_logit * float(((inter >= 0).sum(axis=1) * ranks).sum()) * batch_size
    refine_flops = 0.0
    if refine:
        # two scoring passes of the base plan (max, then normaliser), then the split candidates
        base_ptr, base_seg, _ = tree.plan(with_far=not query_coarsening)
        base_keys = float(np.add.reduceat(base_seg[:, 2], base_ptr[:-1]).sum())
        refine_flops = 2 * (2 * d) * base_keys * tree.block_size * batch_size
        refine_flops += 2 * d * float(coarse_keys.sum()) * scale_to_batch
    return FMMStats(
        keys_per_query_mean=float(keys.mean()),
        keys_per_query_max=float(keys.max()),
        keys_fraction=float(keys.mean() / n),
        flops={
            "upward": float(upward * batch_size),
            "near": float(per_logit * token_keys.sum() * scale_to_batch),
            "far": float(far),
            "refine": refine_flops,
        },
    )
