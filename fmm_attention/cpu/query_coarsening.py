"""The O(n) variant on the CPU (``query_coarsening=True``): coarse queries.

Queries are averaged per box like keys (:func:`coarse_queries`), each coarse query box
takes partial softmax sums over the coarse key boxes its interaction list names
(:func:`far_partials`), and :func:`downward_pass` merges each box's partials into its
sub-boxes through their log-sum-exp, down to the tokens.

Threads: each pass is a serial ``nogil`` kernel over a range of ``(entry, box)`` jobs, run
on the library's threads (:class:`._launch.Threaded`) rather than a ``prange`` loop, whose
body Numba compiled three times; the passes that go level by level launch once per level
(a level reads the one below, written by the previous launch). Each job writes only its
own box's rows, so the results do not depend on the thread count or on the split.
"""

import numpy as np

from ._jit import dot as _dot
from ._jit import jit
from ._launch import Threaded


@jit(nogil=True)
def _coarse_queries_jobs(job_lo, job_hi, level, q, valid, has_mask, box_sizes, box_offset, qc, q_count):
    """The boxes ``job_lo <= job < job_hi`` of ``level`` (``job = b * n_boxes + box``) for
    :func:`coarse_queries`; the level below is done."""
    n_batch, n, d = q.shape
    n_boxes = box_offset[level + 1] - box_offset[level]
    size = box_sizes[level]
    for job in range(job_lo, job_hi):
        b = job // n_boxes
        c = job % n_boxes
        row = box_offset[level] + c
        qc[b, row] = 0
        if level == 0:
            count = 0
            for t in range(c * size, min(n, (c + 1) * size)):
                if has_mask and not valid[b, t]:
                    continue
                count += 1
                for e in range(d):  # a row expression would allocate per token
                    qc[b, row, e] += q[b, t, e]
            if count > 0:
                for e in range(d):
                    qc[b, row, e] /= count
        else:
            left = box_offset[level - 1] + 2 * c
            c0 = q_count[b, left]
            c1 = q_count[b, left + 1]
            count = c0 + c1
            if count > 0:
                for e in range(d):
                    qc[b, row, e] = (c0 * qc[b, left, e] + c1 * qc[b, left + 1, e]) / count
        q_count[b, row] = count


_coarse_queries_level = Threaded(_coarse_queries_jobs, None)


def coarse_queries(q, valid, has_mask, box_sizes, box_offset, qc, q_count):
    """Mean of the valid queries of every box at every level, by count-weighted pairwise merging.

    Valid queries are the real positions (``< n``) that ``valid`` marks (all real positions
    without ``has_mask``): a masked or padded position's query never enters a mean.
    ``q_count`` receives each box's number of valid queries; a box with none gets a zero
    coarse query and is skipped by :func:`far_partials`. One launch per level, bottom up.
    """
    n_batch, n, d = q.shape
    for level in range(box_sizes.size):
        n_boxes = int(box_offset[level + 1] - box_offset[level])
        work = n_batch * (n if level == 0 else 2 * n_boxes) * d  # the tokens, then two children per box
        _coarse_queries_level.launch(n_batch * n_boxes, work, level, q, valid, has_mask, box_sizes, box_offset,
                                     qc, q_count)


@jit(nogil=True)
def _far_partials_jobs(job_lo, job_hi, qc, q_count, kc, vc, cbias, box_offset, box_ranks, interactions, scale,
                       part_max, part_sum, part_num):
    """Far-field softmax partial ``(max, sum, numerator)`` of the coarse query boxes
    ``job_lo <= job < job_hi`` (``job = b * n_total + row``).

    A box with no valid query (``q_count == 0``) gets the empty partial ``(-inf, 0, 0)``:
    it contributes nothing, and its (masked or padded) queries keep only what they
    inherit from larger boxes and their own near field.
    """
    n_total = interactions.shape[0]
    for job in range(job_lo, job_hi):
        b = job // n_total
        row = job % n_total
        level = 0
        while box_offset[level + 1] <= row:
            level += 1
        rank = box_ranks[level]
        mx = -np.inf
        for slot in range(3 if q_count[b, row] > 0 else 0):
            start = interactions[row, slot]
            if start < 0:
                continue
            for t in range(rank):
                x = scale * _dot(qc[b, row], kc[b, start + t]) + cbias[b, start + t]
                mx = max(mx, x)
        part_max[b, row] = mx
        part_sum[b, row] = 0
        part_num[b, row] = 0
        if mx == -np.inf:
            continue
        for slot in range(3):
            start = interactions[row, slot]
            if start < 0:
                continue
            for t in range(rank):
                x = scale * _dot(qc[b, row], kc[b, start + t]) + cbias[b, start + t]
                w = np.exp(x - mx)
                part_sum[b, row] += w
                part_num[b, row] += w * vc[b, start + t]


def _far_partials_layout(qc, q_count, kc, vc, cbias, box_offset, box_ranks, interactions, *args):
    # each box's logits against at most three interaction boxes (twice: max, then sums) and
    # their values
    n_batch, n_total, d = qc.shape
    return n_batch * n_total, n_batch * n_total * 3 * int(box_ranks.max()) * (2 * d + vc.shape[2])


#: :func:`_far_partials_jobs` over every ``(entry, box)`` job, split over the threads;
#: called as ``far_partials(qc, q_count, kc, vc, cbias, box_offset, box_ranks,
#: interactions, scale, part_max, part_sum, part_num)``.
far_partials = Threaded(_far_partials_jobs, _far_partials_layout)


@jit(nogil=True)
def _downward_jobs(job_lo, job_hi, level, box_offset, part_max, part_sum, part_num):
    """Merge the partials of boxes ``job_lo <= job < job_hi`` of ``level`` (``job = b *
    n_boxes + box``) with their parents' accumulated ones (the level above is done)."""
    n_boxes = box_offset[level + 1] - box_offset[level]
    for job in range(job_lo, job_hi):
        b = job // n_boxes
        c = job % n_boxes
        row = box_offset[level] + c
        parent = box_offset[level + 1] + c // 2
        pm = part_max[b, parent]
        if pm == -np.inf:
            continue
        mx = max(part_max[b, row], pm)
        own = np.exp(part_max[b, row] - mx) if part_max[b, row] > -np.inf else 0.0
        inherited = np.exp(pm - mx)
        part_sum[b, row] = own * part_sum[b, row] + inherited * part_sum[b, parent]
        part_num[b, row] = own * part_num[b, row] + inherited * part_num[b, parent]
        part_max[b, row] = mx


_downward_level = Threaded(_downward_jobs, None)


def downward_pass(box_offset, part_max, part_sum, part_num):
    """Merge each box's partial with its parent's accumulated one, top level down (one
    launch per level)."""
    n_batch, _, dv = part_num.shape
    for level in range(box_offset.size - 3, -1, -1):
        n_boxes = int(box_offset[level + 1] - box_offset[level])
        _downward_level.launch(n_batch * n_boxes, n_batch * n_boxes * dv, level, box_offset, part_max, part_sum,
                               part_num)
