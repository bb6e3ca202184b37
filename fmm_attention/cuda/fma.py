"""Fast Multipole Attention on the GPU: upward pass, fused near + far field, coarse queries.

The same plan as the CPU backend (:mod:`fmm_attention.tree`), executed by these kernels:

* **upward pass** (coarsening), one launch per far level, one thread per
  ``(batch, coarse row, channel)``: :func:`mean_upward_level` (level 1 averages tokens,
  later levels merge the two child sub-boxes by their counts, O(n d) in all) or
  :func:`learned_upward_level` (the grouped convolution of
  :class:`~fmm_attention.LearnedCoarsening`);
* **near + far field**, fused per query block: the attention kernel of :mod:`._attention`
  walks the block's key plan (exact tokens, then coarse rows of every level) with one online
  softmax, so every level shares one maximum and one denominator;
* **coarse queries** (``query_coarsening=True``, O(n)): :func:`coarse_queries_level` (box
  mean queries, bottom-up), :func:`far_partials` (one far-field softmax partial per box),
  :func:`downward_level` (parents' partials merged into their children, top-down), then the
  attention kernel on the near plan starting from each block's inherited partial.

Every thread writes its own outputs and sums in a fixed order: results are deterministic.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np

from . import _device
from ._attention import attend

cuda = _device.cuda_module()  # a module global, so that the CUDA simulator can swap it


@functools.cache
def kernels(dtype_str):
    """The FMA kernels compiled for one float dtype (``"float32"`` or ``"float64"``)."""
    dtype = np.dtype(dtype_str)
    cast = dtype.type
    neg_inf = dtype.type(-np.inf)
    zero = dtype.type(0)

    @cuda.jit
    def mean_upward_level(k, v, valid, has_mask, level, size, start, n_rows, prev_size, prev_start,
                          count_scaling, kc, vc, cbias, counts):
        """Mean coarsening of one level: rows ``start : start + n_rows`` of ``kc``, ``vc``.

        Level 0 averages the valid tokens of each sub-box of ``size`` tokens; a later level
        copies the previous level's row (same sub-box size) or merges its two children
        weighted by their counts. Rows without a valid token get zeros and bias ``-inf``.
        """
        n_batch = k.shape[0]
        n = k.shape[1]
        d = k.shape[2]
        width = d + v.shape[2]
        per_batch = n_rows * width
        for job in range(cuda.grid(1), n_batch * per_batch, cuda.gridsize(1)):
            b = job // per_batch
            g = (job % per_batch) // width
            ch = job % width
            row = start + g
            value = zero
            if level == 0:
                lo = g * size
                hi = lo + size
                if hi > n:
                    hi = n
                count = 0
                for t in range(lo, hi):
                    if has_mask and not valid[b, t]:
                        continue
                    count += 1
                    if ch < d:
                        value += k[b, t, ch]
                    else:
                        value += v[b, t, ch - d]
                total = cast(count)
                if count > 0:
                    value = value / total
            elif prev_size == size:
                prev = prev_start + g
                total = counts[b, prev]
                if ch < d:
                    value = kc[b, prev, ch]
                else:
                    value = vc[b, prev, ch - d]
            else:
                left = prev_start + 2 * g
                c0 = counts[b, left]
                c1 = counts[b, left + 1]
                total = c0 + c1
                if total > zero:
                    w0 = c0 / total
                    w1 = c1 / total
                    if ch < d:
                        value = w0 * kc[b, left, ch] + w1 * kc[b, left + 1, ch]
                    else:
                        value = w0 * vc[b, left, ch - d] + w1 * vc[b, left + 1, ch - d]
            if ch < d:
                kc[b, row, ch] = value
            else:
                vc[b, row, ch - d] = value
            if ch == 0:
                counts[b, row] = total
                if total == zero:
                    cbias[b, row] = neg_inf
                elif count_scaling:
                    cbias[b, row] = math.log(total)
                else:
                    cbias[b, row] = zero

    @cuda.jit
    def learned_upward_level(k, v, valid, has_mask, key_w, key_b, value_w, value_b, box_size, rank,
                             offset, n_boxes, count_scaling, kc, vc, cbias):
        """Grouped-convolution coarsening of one level, keys and values together.

        ``kc[b, offset + c*rank + t, e] = key_b[e*rank + t] + sum_u key_w[e*rank + t, u] *
        k[b, c*box_size + u, e]`` over valid tokens (likewise for values). A box with no
        valid token gets zero rows and bias ``-inf``; otherwise the bias is
        ``log(valid / rank)`` with count scaling, else 0.
        """
        n_batch = k.shape[0]
        n = k.shape[1]
        d = k.shape[2]
        width = d + v.shape[2]
        per_batch = n_boxes * rank * width
        for job in range(cuda.grid(1), n_batch * per_batch, cuda.gridsize(1)):
            b = job // per_batch
            slot = (job % per_batch) // width  # c * rank + t
            ch = job % width
            c = slot // rank
            t = slot % rank
            first = c * box_size
            last = first + box_size
            if last > n:
                last = n
            count = 0
            for u in range(first, last):
                if not has_mask or valid[b, u]:
                    count += 1
            row = offset + slot
            value = zero
            if count > 0:
                if ch < d:
                    w_row = ch * rank + t
                    value = key_b[w_row]
                    for u in range(last - first):
                        if not has_mask or valid[b, first + u]:
                            value += key_w[w_row, u] * k[b, first + u, ch]
                else:
                    w_row = (ch - d) * rank + t
                    value = value_b[w_row]
                    for u in range(last - first):
                        if not has_mask or valid[b, first + u]:
                            value += value_w[w_row, u] * v[b, first + u, ch - d]
            if ch < d:
                kc[b, row, ch] = value
            else:
                vc[b, row, ch - d] = value
            if ch == 0:
                if count == 0:
                    cbias[b, row] = neg_inf
                elif count_scaling:
                    cbias[b, row] = math.log(cast(count) / cast(rank))
                else:
                    cbias[b, row] = zero

    @cuda.jit
    def coarse_queries_level(q, valid, has_mask, level, size, start, n_boxes, prev_start, qc, q_count):
        """Mean of the valid queries of every box of one level (bottom-up, count-weighted merge).

        Valid queries are the real positions (``< n``) that ``valid`` marks; ``q_count``
        receives each box's number of them (a box with none gets a zero query and is skipped
        by :func:`far_partials`), as on the CPU.
        """
        n_batch = q.shape[0]
        n = q.shape[1]
        d = q.shape[2]
        per_batch = n_boxes * d
        for job in range(cuda.grid(1), n_batch * per_batch, cuda.gridsize(1)):
            b = job // per_batch
            c = (job % per_batch) // d
            e = job % d
            row = start + c
            end = (c + 1) * size
            if end > n:
                end = n
            value = zero
            count = 0
            if level == 0:
                for t in range(c * size, end):
                    if has_mask and not valid[b, t]:
                        continue
                    count += 1
                    value += q[b, t, e]
                if count > 0:
                    value = value / cast(count)
            else:
                left = prev_start + 2 * c
                c0 = q_count[b, left]
                c1 = q_count[b, left + 1]
                count = c0 + c1
                if count > 0:
                    value = (cast(c0) * qc[b, left, e] + cast(c1) * qc[b, left + 1, e]) / cast(count)
            qc[b, row, e] = value
            if e == 0:
                q_count[b, row] = count

    @cuda.jit
    def far_partials(qc, q_count, kc, vc, cbias, box_offset, box_ranks, interactions, scale, part_max, part_sum,
                     part_num):
        """Far-field softmax partial ``(max, sum, numerator)`` of every coarse query box.

        A box with no valid query (``q_count == 0``) gets the empty partial ``(-inf, 0, 0)``.
        """
        n_batch = qc.shape[0]
        d = qc.shape[2]
        dv = vc.shape[2]
        n_total = interactions.shape[0]
        for job in range(cuda.grid(1), n_batch * n_total, cuda.gridsize(1)):
            b = job // n_total
            row = job % n_total
            level = 0
            while box_offset[level + 1] <= row:
                level += 1
            rank = box_ranks[level]
            top = neg_inf
            for slot in range(3 if q_count[b, row] > 0 else 0):
                first = interactions[row, slot]
                if first < 0:
                    continue
                for t in range(rank):
                    dot = zero
                    for e in range(d):
                        dot += qc[b, row, e] * kc[b, first + t, e]
                    x = scale * dot + cbias[b, first + t]
                    if x > top:
                        top = x
            part_max[b, row] = top
            total = zero
            for e in range(dv):
                part_num[b, row, e] = zero
            if top != neg_inf:
                for slot in range(3):
                    first = interactions[row, slot]
                    if first < 0:
                        continue
                    for t in range(rank):
                        dot = zero
                        for e in range(d):
                            dot += qc[b, row, e] * kc[b, first + t, e]
                        x = scale * dot + cbias[b, first + t]
                        if x != neg_inf:
                            w = math.exp(x - top)
                            total += w
                            for e in range(dv):
                                part_num[b, row, e] += w * vc[b, first + t, e]
            part_sum[b, row] = total

    @cuda.jit
    def downward_level(start, parent_start, n_boxes, part_max, part_sum, part_num):
        """Merge each box's partial of one level with its parent's accumulated partial."""
        n_batch = part_max.shape[0]
        dv = part_num.shape[2]
        for job in range(cuda.grid(1), n_batch * n_boxes, cuda.gridsize(1)):
            b = job // n_boxes
            c = job % n_boxes
            row = start + c
            parent = parent_start + c // 2
            inherited_max = part_max[b, parent]
            if inherited_max == neg_inf:
                continue
            own_max = part_max[b, row]
            top = own_max
            if inherited_max > top:
                top = inherited_max
            own = zero
            if own_max != neg_inf:
                own = math.exp(own_max - top)
            inherited = math.exp(inherited_max - top)
            part_sum[b, row] = own * part_sum[b, row] + inherited * part_sum[b, parent]
            for e in range(dv):
                part_num[b, row, e] = own * part_num[b, row, e] + inherited * part_num[b, parent, e]
            part_max[b, row] = top

    return SimpleNamespace(
        mean_upward_level=mean_upward_level,
        learned_upward_level=learned_upward_level,
        coarse_queries_level=coarse_queries_level,
        far_partials=far_partials,
        downward_level=downward_level,
    )


def _launch(kernel, n_jobs):
    threads = _device.threads_per_block()
    return kernel[_device.grid(n_jobs, threads), threads]


def coarse_buffers(batch, tree, coarsening, count_scaling):
    """The upward pass: coarse keys ``(B, C, d)``, values ``(B, C, dv)`` and biases ``(B, C)``.

    ``coarsening``'s ``"cuda"`` kernel (:attr:`fmm_attention.coarsening.Coarsening.kernels`)
    writes every row of the (uninitialised) buffers.
    """
    B, d, dv, dtype = batch.batch, batch.d, batch.dv, batch.dtype
    C = tree.n_coarse
    kc = _device.empty((B, C, d), dtype)
    vc = _device.empty((B, C, dv), dtype)
    cbias = _device.empty((B, C), dtype)
    has_mask = batch.valid is not None
    valid = batch.valid if has_mask else _device.dummy(2, np.bool_)
    coarsening.kernel("cuda")(coarsening, batch, tree, valid=valid, has_mask=has_mask, count_scaling=count_scaling,
                              kc=kc, vc=vc, cbias=cbias)
    return kc, vc, cbias


def mean_upward(coarsening, batch, tree, *, valid, has_mask, count_scaling, kc, vc, cbias):
    """Mean coarsening, one launch per level (the CUDA kernel of :class:`~fmm_attention.MeanCoarsening`)."""
    B, dtype = batch.batch, batch.dtype
    kern = kernels(dtype.name)
    width = batch.d + batch.dv
    counts = _device.empty(cbias.shape, dtype)
    prev_size = prev_start = 0
    for i, level in enumerate(tree.levels):
        n_rows = level.n_boxes * level.rank
        _launch(kern.mean_upward_level, B * n_rows * width)(
            batch.k, batch.v, valid, has_mask, i, level.sub_box_size, level.offset, n_rows,
            prev_size, prev_start, count_scaling, kc, vc, cbias, counts,
        )
        prev_size, prev_start = level.sub_box_size, level.offset


def learned_upward(coarsening, batch, tree, *, valid, has_mask, count_scaling, kc, vc, cbias):
    """One grouped convolution per level (the CUDA kernel of :class:`~fmm_attention.LearnedCoarsening`)."""
    B, dtype = batch.batch, batch.dtype
    kern = kernels(dtype.name)
    width = batch.d + batch.dv
    kw, vw, kb, vb = _device.coarsening_arrays(coarsening, dtype)
    for i, level in enumerate(tree.levels):
        _launch(kern.learned_upward_level, B * level.n_boxes * level.rank * width)(
            batch.k, batch.v, valid, has_mask, kw[i], kb[i], vw[i], vb[i], level.box_size,
            level.rank, level.offset, level.n_boxes, count_scaling, kc, vc, cbias,
        )


def _box_arrays(tree):
    box_offset, interactions = tree.box_tables
    box_ranks = np.array([lv.rank for lv in tree.levels], dtype=np.int64)
    return box_offset, interactions, box_ranks


def far_field_partials(batch, tree, coarse):
    """Coarse-query pass: each level-1 box's (= query block's) inherited far-field partial."""
    B, d, dv, dtype = batch.batch, batch.d, batch.dv, batch.dtype
    box_offset_host = tree.box_tables[0]
    box_offset, interactions, box_ranks = _device.tree_arrays(tree, "boxes", lambda: _box_arrays(tree))
    total = int(box_offset_host[-1])
    kern = kernels(dtype.name)
    qc = _device.empty((B, total, d), dtype)
    q_count = _device.empty((B, total), np.int64)
    has_mask = batch.valid is not None
    valid = batch.valid if has_mask else _device.dummy(2, np.bool_)
    prev_start = 0
    for i, level in enumerate(tree.levels):
        start = int(box_offset_host[i])
        # one launch per level: a level reads the counts and means its children's launch wrote
        _launch(kern.coarse_queries_level, B * level.n_boxes * d)(
            batch.q, valid, has_mask, i, level.box_size, start, level.n_boxes, prev_start, qc, q_count,
        )
        prev_start = start
    part_max = _device.empty((B, total), dtype)
    part_sum = _device.empty((B, total), dtype)
    part_num = _device.empty((B, total, dv), dtype)
    kc, vc, cbias = coarse
    _launch(kern.far_partials, B * total)(
        qc, q_count, kc, vc, cbias, box_offset, box_ranks, interactions, dtype.type(batch.scale), part_max, part_sum, part_num,
    )
    for i in range(tree.n_levels - 2, -1, -1):
        n_boxes = tree.levels[i].n_boxes
        _launch(kern.downward_level, B * n_boxes)(
            int(box_offset_host[i]), int(box_offset_host[i + 1]), n_boxes, part_max, part_sum, part_num,
        )
    return part_max, part_sum, part_num  # rows 0 .. n_boxes(level 1) - 1 are the query blocks


def fmm(batch, tree, options):
    """FMA of a :class:`~._inputs.DeviceBatch` along ``tree``; ``(out, lse)`` device arrays.

    The key plan is copied to the device once per tree and plan key
    (:meth:`~fmm_attention.options.FMMOptions.plan_key`).
    """
    coarse = coarse_buffers(batch, tree, options.coarsening, options.count_scaling)
    inherit = far_field_partials(batch, tree, coarse) if options.query_coarsening else None
    plan = _device.tree_arrays(tree, options.plan_key(tree.n), lambda: tree.plan_of(options)[:2])
    return attend(
        batch, causal=tree.causal, scale=batch.scale, exact=False, plan_block=tree.block_size,
        plan=plan, coarse=coarse, inherit=inherit,
    )
