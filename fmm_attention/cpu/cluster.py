"""Content-grouped (cluster) coarsening on the CPU: k-means up the tree.

Levels whose boxes hold at most ``_config.CLUSTER_FLAT_SIZE`` tokens (and level 1 always) group their
box's valid *tokens*; every level above groups the *groups* of its box's two children, each
a weighted point (its key mean, weighted by its token count). Either way a group's key and
value are the means of the tokens it holds. See :func:`cluster_upward`.

Threads: each level's boxes (at the token-level levels, each span of boxes) are independent
jobs of a serial ``nogil`` kernel over a range of them, run on the library's threads
(:class:`._launch.Threaded`) rather than a ``prange`` loop, whose body Numba compiled three
times. Each range allocates its scratch once; a job writes only its own boxes' rows and
reads only its own tokens and the level below (written by the previous launch), so the
result does not depend on the thread count or the split.
"""

import numpy as np

from .. import _config
from ._jit import jit
from ._launch import Threaded


@jit()
def _lloyd(x, index, weight, count, group, rank, iters, centre, total):
    """Weighted Lloyd steps over the points ``x[index[i]]`` (``i < count``), in place.

    ``group[:count]`` holds the starting groups and receives the final ones; on return
    ``centre[g]`` is the weighted mean of group ``g`` and ``total[g]`` its weight (0: empty,
    its centre 0). Each step reassigns every point to the nearest non-empty centre (squared
    Euclidean distance, ties to the lowest group); it stops early once no point moves (the
    centres would not change either).
    """
    d = x.shape[1]
    zero = centre.dtype.type(0)
    for step in range(iters + 1):
        centre[:rank] = 0
        total[:rank] = 0
        for i in range(count):
            g = group[i]
            row = index[i]
            total[g] += weight[i]
            w = centre.dtype.type(weight[i])
            for e in range(d):
                centre[g, e] += w * x[row, e]
        for g in range(rank):
            if total[g] > 0:
                inv = centre.dtype.type(1.0 / total[g])
                for e in range(d):
                    centre[g, e] *= inv
        if step == iters:
            break
        moved = False
        for i in range(count):
            row = index[i]
            best = -1
            best_dist = zero
            for g in range(rank):
                if total[g] == 0:
                    continue
                dist = zero
                for e in range(d):
                    diff = x[row, e] - centre[g, e]
                    dist += diff * diff
                if best < 0 or dist < best_dist:
                    best_dist = dist
                    best = g
            if best != group[i]:
                group[i] = best
                moved = True
        if not moved:
            break


@jit()
def _group_box(x, xv, index, weight, count, group, rank, iters, centre, total, b, base, count_scaling,
               kc, vc, cbias, counts):
    """Group one box's candidates ``x[index[:count]]`` and write its ``rank`` rows from ``base``."""
    _lloyd(x, index, weight, count, group, rank, iters, centre, total)
    dv = xv.shape[1]
    for g in range(rank):
        kc[b, base + g] = centre[g]
        vc[b, base + g] = 0
        counts[b, base + g] = total[g]
    for i in range(count):
        w = vc.dtype.type(weight[i])
        row = index[i]
        out = base + group[i]
        for e in range(dv):
            vc[b, out, e] += w * xv[row, e]
    for g in range(rank):
        row = base + g
        if total[g] == 0:
            cbias[b, row] = -np.inf
        else:
            for e in range(dv):
                vc[b, row, e] /= total[g]
            cbias[b, row] = np.log(total[g]) if count_scaling else 0


@jit(nogil=True)
def _flat_spans_jobs(first_job, last_job, k, v, valid, has_mask, box_sizes, ranks, offsets, n_flat, iters,
                     count_scaling, kc, vc, cbias, counts, record, labels):
    """Token-level levels ``0 .. n_flat-1`` of the spans ``first_job <= job < last_job``.

    A span is one box of the last token-level level (``job = b * n_spans + span``); all its
    levels run while its tokens are in cache. With ``record``, ``labels[b, level, t]``
    receives token ``t``'s final group (slot in its box) at each of these levels.
    """
    n = k.shape[1]
    span = box_sizes[n_flat - 1]
    n_spans = (n + span - 1) // span
    index = np.empty(span, dtype=np.int64)
    weight = np.ones(span, dtype=np.float64)
    group = np.empty(span, dtype=np.int64)
    label = np.empty(span, dtype=np.int64)  # each token's slot in its box at the level below
    centre = np.empty((ranks.max(), k.shape[2]), dtype=kc.dtype)
    total = np.empty(ranks.max(), dtype=np.float64)
    for job in range(first_job, last_job):
        b = job // n_spans
        lo = (job % n_spans) * span
        hi = min(n, lo + span)
        for level in range(n_flat):
            box_size = box_sizes[level]
            rank = ranks[level]
            prev_rank = ranks[level - 1] if level > 0 else 0
            spread = (2 * prev_rank if level > 0 else box_size) // rank  # candidates per slot of the start
            steps = iters if box_size > rank else 0  # one token per slot: every group is exact already
            half = box_size // 2
            for first in range(lo, hi, box_size):
                count = np.int64(0)
                for t in range(first, min(hi, first + box_size)):
                    if not has_mask or valid[b, t]:
                        index[count] = t
                        if level == 0:
                            group[count] = (t - first) // spread
                        else:  # the slot of the token's group in its child box, children side by side
                            group[count] = (((t - first) // half) * prev_rank + label[t - lo]) // spread
                        count += 1
                _group_box(k[b], v[b], index, weight, count, group, rank, steps, centre, total,
                           b, offsets[level] + (first // box_size) * rank, count_scaling, kc, vc, cbias, counts)
                for i in range(count):
                    label[index[i] - lo] = group[i]
                    if record:
                        labels[b, level, index[i]] = group[i]


@jit(nogil=True)
def _merged_boxes_jobs(first_job, last_job, box_size, rank, offset, prev_rank, prev_offset, iters, count_scaling,
                       n_boxes, kc, vc, cbias, counts, record, parents):
    """Group-level level: boxes ``first_job <= job < last_job`` (``job = b * n_boxes + c``).

    With ``record``, ``parents[b, row]`` receives the coarse row that each non-empty child
    row joined (whole groups move at these levels).
    """
    n_points = 2 * prev_rank
    spread = n_points // rank  # candidates per slot of the start
    steps = iters if box_size > rank else 0  # one token per slot: every group is exact already
    index = np.empty(n_points, dtype=np.int64)
    weight = np.empty(n_points, dtype=np.float64)
    group = np.empty(n_points, dtype=np.int64)
    centre = np.empty((rank, kc.shape[2]), dtype=kc.dtype)
    total = np.empty(rank, dtype=np.float64)
    for job in range(first_job, last_job):
        b = job // n_boxes
        c = job % n_boxes
        first = prev_offset + 2 * c * prev_rank
        count = np.int64(0)
        for i in range(n_points):
            if counts[b, first + i] > 0:
                index[count] = first + i
                weight[count] = counts[b, first + i]
                group[count] = i // spread
                count += 1
        _group_box(kc[b], vc[b], index, weight, count, group, rank, steps, centre, total,
                   b, offset + c * rank, count_scaling, kc, vc, cbias, counts)
        if record:
            for i in range(count):
                parents[b, index[i]] = offset + c * rank + group[i]


#: :func:`_flat_spans_jobs` and :func:`_merged_boxes_jobs` split over the threads (the jobs
#: and their work in multiply-adds are given at each launch).
flat_spans = Threaded(_flat_spans_jobs, None)
merged_boxes = Threaded(_merged_boxes_jobs, None)


def flat_levels(box_sizes, flat_size):
    """How many levels (from level 1) group tokens rather than groups: level 1 and every
    level whose boxes hold at most ``flat_size`` tokens.
    """
    n_flat = 1
    while n_flat < len(box_sizes) and box_sizes[n_flat] <= flat_size:
        n_flat += 1
    return n_flat


def cluster_upward(k, v, valid, has_mask, box_sizes, ranks, offsets, iters, count_scaling, flat_size, kc, vc, cbias):
    """Content-grouped coarsening of every level (:func:`cluster_groups` without the record of
    the group assignments, which only the backward needs).
    """
    counts = np.zeros(cbias.shape, dtype=np.float64)
    none = np.zeros((1, 1, 1), dtype=np.int64)
    cluster_groups(k, v, valid, has_mask, box_sizes, ranks, offsets, iters, count_scaling, flat_size,
                   kc, vc, cbias, counts, False, none, none[0])


def cluster_groups(k, v, valid, has_mask, box_sizes, ranks, offsets, iters, count_scaling, flat_size,
                   kc, vc, cbias, counts, record, labels, parents):
    """Content-grouped coarsening of every level in one upward pass (k-means up the tree).

    Each box's ``r_l`` groups start from the groups of its two children, their slots side by
    side, ``2 r_{l-1} / r_l`` of them to a slot (level 1: token ``t`` of a box in slot
    ``t // (w_1 / r_1)``), so with ``iters=0`` every group is its positional sub-box: mean
    coarsening. Then at most ``iters`` Lloyd steps (:func:`_lloyd`), over

    * the box's valid tokens, at level 1 and at every level whose boxes hold at most
      ``flat_size`` tokens (these levels run span by span, a span being one box of the
      last of them, so its tokens are read from memory once; one job per span):
      O(n p d iters) per level;
    * above, the children's non-empty groups, each a point at its key mean weighted by its
      token count: whole groups move, O(p^2 d iters) per box (one job per box, one
      launch per level).

    Lloyd steps are skipped where a box has one token per slot (``w_l <= r_l``: exact).
    Coarse key and value are the group's (weighted) means, which are the means of its
    tokens' keys and values; the bias is ``log(count)`` (count scaling) or 0, and ``-inf``
    with zero key and value for an empty group. Rows of boxes that start at or after ``n``
    are left as given. Deterministic (nothing depends on the thread count or on how the
    jobs are split) and causal-safe: a box's groups depend only on its own
    tokens.

    ``counts`` (B, C) float64, zeros on entry, receives each row's token count. With
    ``record`` the group assignments are written for the backward: ``labels`` (B, n_flat, n)
    the slot of every valid token at each token-level level (:func:`flat_levels`),
    ``parents`` (B, C) the row that each non-empty row of a level joins at the next
    group-level level.
    """
    n_batch, n, d = k.shape
    n_flat = flat_levels(box_sizes, flat_size)
    span = int(box_sizes[n_flat - 1])
    steps = iters + 1
    # work: a distance per (token or group, slot, feature) per Lloyd step
    flat_spans.launch(n_batch * -(-n // span), n_batch * n * d * n_flat * int(ranks[:n_flat].max()) * steps,
                      k, v, valid, has_mask, box_sizes, ranks, offsets, n_flat, iters, count_scaling,
                      kc, vc, cbias, counts, record, labels)
    for level in range(n_flat, box_sizes.size):
        n_boxes = -(-n // int(box_sizes[level]))
        work = n_batch * n_boxes * 2 * int(ranks[level - 1]) * int(ranks[level]) * d * steps
        merged_boxes.launch(n_batch * n_boxes, work, box_sizes[level], ranks[level], offsets[level],
                            ranks[level - 1], offsets[level - 1], iters, count_scaling, n_boxes,
                            kc, vc, cbias, counts, record, parents)

def upward(coarsening, batch, tree, *, valid, has_mask, count_scaling, kc, vc, cbias):
    """The upward pass of a :class:`~fmm_attention.ClusterCoarsening` (its CPU kernel entry).

    The calling convention of :attr:`fmm_attention.coarsening.Coarsening.kernels`; the
    level split is read from ``_config`` at call time.
    """
    levels = tree.levels
    box_sizes, ranks, offsets = (np.array([getattr(lv, a) for lv in levels], dtype=np.int64)
                                 for a in ("box_size", "rank", "offset"))
    cluster_upward(batch.k, batch.v, valid, has_mask, box_sizes, ranks, offsets, coarsening.iters, count_scaling,
                   int(_config.CLUSTER_FLAT_SIZE), kc, vc, cbias)
