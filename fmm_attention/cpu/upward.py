"""The upward pass on the CPU: coarse keys, values and their count bias, level by level.

Mean coarsening averages each box's valid tokens (level 1 from tokens, each later level
from its sub-boxes, so one pass per level reads only the level below); learned coarsening
applies one level's grouped convolution to the level below. :func:`box_counts_bias` gives
the log-count bias of a box's coarse rows (``count_scaling``) and ``-inf`` for boxes with
no valid token.
"""

import numpy as np

from .. import _config
from ._jit import jit
from ._launch import Threaded


@jit(nogil=True)
def _mean_levels(job_lo, job_hi, level_lo, level_hi, k, v, valid, has_mask, sub_sizes, offsets, n_rows,
                 count_scaling, kc, vc, cbias, counts):
    """Mean coarsening of levels ``level_lo <= level < level_hi``, jobs (coarse rows of all
    batch entries) ``job_lo <= job < job_hi`` of each level.

    Level 1 averages tokens; each later level either reuses the previous level's sub-boxes
    (same sub-box size, more slots) or merges pairs of them, weighted by their counts.
    Rows with no valid token get zero keys/values and bias ``-inf``.
    """
    n_batch, n, d = k.shape
    dv = v.shape[2]
    for level in range(level_lo, level_hi):
        size = sub_sizes[level]
        start = offsets[level]
        for job in range(max(job_lo, 0), min(job_hi, n_batch * n_rows[level])):
            b = job // n_rows[level]
            g = job % n_rows[level]
            row = start + g
            # explicit loops over channels: row expressions like kc[b, row] += k[b, t]
            # allocate a temporary per token in compiled code, and row assignments compile
            # a broadcast with a shape-mismatch error whose message is built with Numba's
            # string routines (about 2 s of a cold first call)
            if level == 0:
                for e in range(d):
                    kc[b, row, e] = 0
                for e in range(dv):
                    vc[b, row, e] = 0
                count = 0
                for t in range(g * size, min(n, (g + 1) * size)):
                    if has_mask and not valid[b, t]:
                        continue
                    count += 1
                    for e in range(d):
                        kc[b, row, e] += k[b, t, e]
                    for e in range(dv):
                        vc[b, row, e] += v[b, t, e]
                if count > 0:
                    inv = 1.0 / count
                    for e in range(d):
                        kc[b, row, e] *= inv
                    for e in range(dv):
                        vc[b, row, e] *= inv
            elif sub_sizes[level - 1] == size:
                prev = offsets[level - 1] + g
                for e in range(d):
                    kc[b, row, e] = kc[b, prev, e]
                for e in range(dv):
                    vc[b, row, e] = vc[b, prev, e]
                count = counts[b, prev]
            else:
                left = offsets[level - 1] + 2 * g
                c0 = counts[b, left]
                c1 = counts[b, left + 1]
                count = c0 + c1
                if count > 0:
                    w0 = c0 / count
                    w1 = c1 / count
                    for e in range(d):
                        kc[b, row, e] = w0 * kc[b, left, e] + w1 * kc[b, left + 1, e]
                    for e in range(dv):
                        vc[b, row, e] = w0 * vc[b, left, e] + w1 * vc[b, left + 1, e]
                else:
                    for e in range(d):
                        kc[b, row, e] = 0
                    for e in range(dv):
                        vc[b, row, e] = 0
            counts[b, row] = count
            if count == 0:
                cbias[b, row] = -np.inf
            elif count_scaling:
                cbias[b, row] = np.log(count)
            else:
                cbias[b, row] = 0


_mean_level = Threaded(_mean_levels, None)


class _MeanUpward:
    """``mean_upward(k, v, valid, has_mask, sub_sizes, offsets, n_rows, count_scaling, kc, vc,
    cbias, counts)``: mean coarsening of every level in one O(n d) upward pass.

    Levels run bottom up (each reads the one below); a level with enough work runs on
    several threads (:class:`._launch.Threaded`), consecutive small ones in one serial call.
    A serial kernel rather than a ``prange``: the parallel loop cost about 3 s of a cold
    first call to compile.
    """

    @property
    def signatures(self):
        """The compiled variants of the kernel."""
        return _mean_levels.signatures

    @property
    def py_func(self):
        """The kernel's Python function."""
        return _mean_levels.py_func

    def __call__(self, k, v, valid, has_mask, sub_sizes, offsets, n_rows, count_scaling, kc, vc, cbias, counts):
        args = (k, v, valid, has_mask, sub_sizes, offsets, n_rows, count_scaling, kc, vc, cbias, counts)
        n_batch, n, d = k.shape
        per_row = d + v.shape[2]
        everything = np.iinfo(np.int64).max
        level = first = 0
        n_levels = sub_sizes.size
        while level < n_levels:
            n_jobs = n_batch * int(n_rows[level])
            # level 1 reads every token once; a later level merges two rows per row
            work = (n_batch * n if level == 0 else 2 * n_jobs) * per_row
            if work >= _config.THREADED_MIN_WORK:
                if first < level:
                    _mean_levels(0, everything, first, level, *args)
                _mean_level.launch(n_jobs, work, level, level + 1, *args)
                first = level + 1
            level += 1
        if first < n_levels:
            _mean_levels(0, everything, first, n_levels, *args)


mean_upward = _MeanUpward()


@jit(nogil=True)
def _learned_upward_jobs(job_lo, job_hi, x, valid, has_mask, weights, bias, box_size, rank, offset, out):
    """Grouped-convolution coarsening of one level for one of keys or values, jobs (boxes of
    all batch entries) ``job_lo <= job < job_hi``.

    ``out[b, offset + c*rank + t, e] = sum_u weights[e*rank + t, u] * x[b, c*box_size + u, e]
    + bias[e*rank + t]`` with padded and masked tokens entering as zeros.
    """
    n_batch, n, d = x.shape
    n_boxes = (n + box_size - 1) // box_size  # boxes of padding only are never planned
    for job in range(job_lo, job_hi):
        b = job // n_boxes
        c = job % n_boxes
        first = c * box_size
        last = min(n, first + box_size)
        for t in range(rank):
            row = offset + c * rank + t
            for e in range(d):
                w_row = e * rank + t
                acc = bias[w_row]
                for u in range(last - first):
                    if has_mask and not valid[b, first + u]:
                        continue
                    acc += weights[w_row, u] * x[b, first + u, e]
                out[b, row, e] = acc


def _boxes_layout(batched, n, box_size, rank, per_token):
    # jobs: the boxes of every batch entry (``batched.shape[0]`` of them); work: per token
    n_batch = batched.shape[0]
    return n_batch * ((n + box_size - 1) // box_size), n_batch * n * rank * per_token


def _learned_upward_layout(x, valid, has_mask, weights, bias, box_size, rank, offset, out):
    return _boxes_layout(x, x.shape[1], box_size, rank, x.shape[2])  # each token: rank weights per feature


#: ``learned_upward_level(x, valid, has_mask, weights, bias, box_size, rank, offset, out)``:
#: :func:`_learned_upward_jobs` over every box, split over the threads.
learned_upward_level = Threaded(_learned_upward_jobs, _learned_upward_layout)


@jit(nogil=True)
def _box_counts_jobs(job_lo, job_hi, valid, has_mask, n, box_size, rank, offset, count_scaling, kc, vc, cbias):
    """Bias ``log(valid(box) / rank)`` (or 0) of the learned coarse keys, jobs (boxes of all
    batch entries) ``job_lo <= job < job_hi``; masks empty boxes."""
    n_boxes = (n + box_size - 1) // box_size
    d = kc.shape[2]
    dv = vc.shape[2]
    for job in range(job_lo, job_hi):
        b = job // n_boxes
        c = job % n_boxes
        first = c * box_size
        last = min(n, first + box_size)
        count = 0
        for t in range(first, last):
            if not has_mask or valid[b, t]:
                count += 1
        for t in range(rank):
            row = offset + c * rank + t
            if count == 0:
                cbias[b, row] = -np.inf
                # keep masked rows finite: 0 * nan would poison the products (explicit loops:
                # a row assignment compiles a broadcast and its shape-mismatch error)
                for e in range(d):
                    kc[b, row, e] = 0
                for e in range(dv):
                    vc[b, row, e] = 0
            elif count_scaling:
                cbias[b, row] = np.log(count / rank)
            else:
                cbias[b, row] = 0


def _box_counts_layout(valid, has_mask, n, box_size, rank, offset, count_scaling, kc, vc, cbias):
    return _boxes_layout(cbias, n, box_size, 1, 1)  # one pass over the mask


#: ``box_counts_bias(valid, has_mask, n, box_size, rank, offset, count_scaling, kc, vc, cbias)``:
#: :func:`_box_counts_jobs` over every box, split over the threads.
box_counts_bias = Threaded(_box_counts_jobs, _box_counts_layout)
