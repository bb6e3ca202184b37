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
        Keys per query that can carry weight: valid exact tokens plus coarse keys whose
        sub-box holds a valid token (a coarse-query far field counts its box's coarse keys
        for every query of the box), over the valid queries of all leading indices (the
        positions ``key_padding_mask`` marks; every query without a mask).
    keys_fraction : float
        ``keys_per_query_mean`` over the length of a dense row (the number of valid keys
        of the query's sequence, ``n`` without a mask): the share of a dense row each
        query costs.
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
    """Fill per-query key counts ``(P, n)`` of the executed plan: exact tokens and coarse keys
    separately, every named key (masked or not: the kernels compute their logits).
    """
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


@njit(cache=CACHE)
def _live_keys_per_query(seg_lo, seg_hi, segments, n, block_size, causal, valid_cum, live_cum, keys):
    """Per-query count ``(B, n)`` of the keys that can carry weight: valid tokens (``j <= i``
    when causal) and coarse rows holding a valid token. ``valid_cum`` (B, n + 1) and
    ``live_cum`` (B, C + 1) are prefix counts of valid tokens and live coarse rows.
    """
    shared = seg_lo.shape[0] == 1
    for b in range(keys.shape[0]):
        p = 0 if shared else b
        for blk in range(seg_lo.shape[1]):
            i0 = blk * block_size
            for s in range(seg_lo[p, blk], seg_hi[p, blk]):
                start = segments[p, s, 1]
                count = segments[p, s, 2]
                if segments[p, s, 0] == TOKEN:
                    for i in range(i0, min(n, i0 + block_size)):
                        stop = min(start + count, i + 1) if causal else start + count
                        if stop > start:
                            keys[b, i] += valid_cum[b, stop] - valid_cum[b, start]
                else:
                    live = live_cum[b, start + count] - live_cum[b, start]
                    for i in range(i0, min(n, i0 + block_size)):
                        keys[b, i] += live


def _prefix_counts(flags):
    """``(B, m + 1)`` prefix counts of a ``(B, m)`` bool array."""
    out = np.zeros((flags.shape[0], flags.shape[1] + 1), dtype=np.int64)
    np.cumsum(flags, axis=1, out=out[:, 1:])
    return out


def fmm_stats(tree, plan, *, batch_size, d, dv, coarsening, refine, query_coarsening, valid=None):
    """Statistics of a call that executed ``plan = (seg_lo, seg_hi, segments, live_coarse)`` along ``tree``.

    ``coarsening`` (a :class:`~fmm_attention.coarsening.Coarsening`) counts its upward pass
    (:meth:`~fmm_attention.coarsening.Coarsening.upward_flops`).

    ``live_coarse`` (B, C) marks the coarse rows that hold a valid token; ``valid`` (B, n)
    is the key mask (``None``: all valid). Keys per query count only keys that can carry
    weight (valid tokens, live coarse rows), averaged over the valid queries; FLOPs count
    every logit the kernels compute.
    """
    seg_lo, seg_hi, segments, live_coarse = plan
    n = tree.n
    token_keys = np.zeros((seg_lo.shape[0], n), dtype=np.int64)
    coarse_keys = np.zeros_like(token_keys)
    _keys_per_query(seg_lo, seg_hi, segments, n, tree.block_size, tree.causal, token_keys, coarse_keys)
    valid = np.ones((batch_size, n), dtype=np.bool_) if valid is None else np.asarray(valid, dtype=np.bool_)
    live_cum = _prefix_counts(live_coarse)
    keys = np.zeros((batch_size, n), dtype=np.int64)
    _live_keys_per_query(seg_lo, seg_hi, segments, n, tree.block_size, tree.causal, _prefix_counts(valid),
                         live_cum, keys)
    if query_coarsening:  # each query inherits its boxes' far fields
        _, inter = tree.box_tables
        ranks = np.concatenate([np.full(lv.n_boxes, lv.rank) for lv in tree.levels])
        per_box = (inter >= 0).sum(axis=1) * ranks
        listed = inter >= 0
        starts = np.where(listed, inter, 0)
        stops = starts + ranks[:, None]
        live_box = np.where(listed[None], live_cum[:, stops] - live_cum[:, starts], 0).sum(axis=2)  # (B, boxes)
        offset = 0
        for level in tree.levels:
            rows = slice(offset, offset + level.n_boxes)
            coarse_keys += np.repeat(per_box[rows], level.box_size)[None, :n]
            keys += np.repeat(live_box[:, rows], level.box_size, axis=1)[:, :n]
            offset += level.n_boxes
    scale_to_batch = batch_size / seg_lo.shape[0]
    n_valid_queries = int(valid.sum())
    if n_valid_queries:
        valid_keys = keys[valid]
        mean_keys, max_keys = float(valid_keys.mean()), float(valid_keys.max())
        dense_row = float((valid.sum(axis=1) * valid.sum(axis=1)).sum() / n_valid_queries)
    else:  # nothing valid: no query costs anything
        mean_keys, max_keys, dense_row = 0.0, 0.0, 1.0
    per_logit = 2 * (d + dv)
    upward = coarsening.upward_flops(tree, d, dv)
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
        keys_per_query_mean=mean_keys,
        keys_per_query_max=max_keys,
        keys_fraction=mean_keys / dense_row,
        flops={
            "upward": float(upward * batch_size),
            "near": float(per_logit * token_keys.sum() * scale_to_batch),
            "far": float(far),
            "refine": refine_flops,
        },
    )
