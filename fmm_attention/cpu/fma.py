"""Fast Multipole Attention on the CPU: upward pass, block attention, coarse-query pass.

The tree (:mod:`fmm_attention.tree`) hands every query block a *key plan*: segments of
exact tokens and of coarse-buffer rows. The block kernel gathers them, scores the whole
block against all of them with one BLAS product, and takes one joint softmax per query,
so near and far field share a single max and denominator as the spec requires.
"""

import numpy as np
from numba import prange

from ..tree import TOKEN
from ._blocks import exp_inplace, jit, softmax_row


# ---------------------------------------------------------------- upward pass (coarsening)
@jit(parallel=True)
def mean_upward(k, v, valid, has_mask, sub_sizes, offsets, n_rows, count_scaling, kc, vc, cbias, counts):
    """Mean coarsening of every level in one O(n d) upward pass.

    Level 1 averages tokens; each later level either reuses the previous level's sub-boxes
    (same sub-box size, more slots) or merges pairs of them, weighted by their counts.
    Rows with no valid token get zero keys/values and bias ``-inf``.
    """
    n_batch, n, d = k.shape
    dv = v.shape[2]
    for level in range(sub_sizes.size):
        size = sub_sizes[level]
        start = offsets[level]
        for job in prange(n_batch * n_rows[level]):
            b = job // n_rows[level]
            g = job % n_rows[level]
            row = start + g
            if level == 0:
                kc[b, row] = 0
                vc[b, row] = 0
                count = 0
                for t in range(g * size, min(n, (g + 1) * size)):
                    if has_mask and not valid[b, t]:
                        continue
                    count += 1
                    kc[b, row] += k[b, t]
                    vc[b, row] += v[b, t]
                if count > 0:
                    kc[b, row] /= count
                    vc[b, row] /= count
            elif sub_sizes[level - 1] == size:
                prev = offsets[level - 1] + g
                kc[b, row] = kc[b, prev]
                vc[b, row] = vc[b, prev]
                count = counts[b, prev]
            else:
                left = offsets[level - 1] + 2 * g
                c0 = counts[b, left]
                c1 = counts[b, left + 1]
                count = c0 + c1
                if count > 0:
                    w0 = c0 / count
                    w1 = c1 / count
                    kc[b, row] = w0 * kc[b, left] + w1 * kc[b, left + 1]
                    vc[b, row] = w0 * vc[b, left] + w1 * vc[b, left + 1]
                else:
                    kc[b, row] = 0
                    vc[b, row] = 0
            counts[b, row] = count
            if count == 0:
                cbias[b, row] = -np.inf
            elif count_scaling:
                cbias[b, row] = np.log(count)
            else:
                cbias[b, row] = 0


@jit(parallel=True)
def learned_upward_level(x, valid, has_mask, weights, bias, box_size, rank, offset, out):
    """Grouped-convolution coarsening of one level for one of keys or values.

    ``out[b, offset + c*rank + t, e] = sum_u weights[e*rank + t, u] * x[b, c*box_size + u, e]
    + bias[e*rank + t]`` with padded and masked tokens entering as zeros.
    """
    n_batch, n, d = x.shape
    n_boxes = (n + box_size - 1) // box_size  # boxes of padding only are never planned
    for job in prange(n_batch * n_boxes):
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


@jit(parallel=True)
def box_counts_bias(valid, has_mask, n, box_size, rank, offset, count_scaling, kc, vc, cbias):
    """Bias ``log(valid(box) / rank)`` (or 0) of the learned coarse keys; masks empty boxes."""
    n_batch = cbias.shape[0]
    n_boxes = (n + box_size - 1) // box_size
    for job in prange(n_batch * n_boxes):
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
                kc[b, row] = 0  # keep masked rows finite: 0 * nan would poison the products
                vc[b, row] = 0
            elif count_scaling:
                cbias[b, row] = np.log(count / rank)
            else:
                cbias[b, row] = 0


# ---------------------------------------------------------------- block attention
@jit(parallel=True)
def block_attention(
    q, k, v, key_bias, has_mask, kc, vc, cbias, ptr, segments, max_keys, block_size, scale,
    causal, inherit, inh_max, inh_sum, inh_num, out, lse,
):
    """Joint softmax of every query block over its planned keys.

    For block ``I`` the plan segments ``ptr[I]:ptr[I+1]`` name token rows of ``k``/``v``
    and coarse rows of ``kc``/``vc``; they are gathered into one buffer, scored with one
    BLAS product and normalised together. With ``inherit`` (coarse queries) the block's
    far field arrives as a ready partial ``(inh_max, inh_sum, inh_num)`` and is merged into
    the same softmax.
    """
    n_batch, n, d = q.shape
    dv = v.shape[2]
    n_blocks = ptr.size - 1
    for job in prange(n_batch * n_blocks):
        b = job // n_blocks
        blk = job % n_blocks
        i0 = blk * block_size
        i1 = min(n, i0 + block_size)
        rows = i1 - i0
        keys = np.empty((max_keys, d), dtype=q.dtype)
        vals = np.empty((max_keys, dv), dtype=q.dtype)
        bias = np.empty(max_keys, dtype=q.dtype)
        positions = np.empty(max_keys, dtype=np.int64)
        nk = 0
        for s in range(ptr[blk], ptr[blk + 1]):
            kind = segments[s, 0]
            start = segments[s, 1]
            count = segments[s, 2]
            if kind == TOKEN:
                keys[nk : nk + count] = k[b, start : start + count]
                vals[nk : nk + count] = v[b, start : start + count]
                for t in range(count):
                    positions[nk + t] = start + t
                    bias[nk + t] = key_bias[b, start + t] if has_mask else 0
                    if bias[nk + t] == -np.inf:  # masked tokens may hold anything: zero them
                        keys[nk + t] = 0
                        vals[nk + t] = 0
            else:
                keys[nk : nk + count] = kc[b, start : start + count]
                vals[nk : nk + count] = vc[b, start : start + count]
                for t in range(count):
                    positions[nk + t] = -1
                    bias[nk + t] = cbias[b, start + t]
            nk += count
        scores = np.dot(q[b, i0:i1] * scale, keys[:nk].T)
        row_max = np.empty(rows, dtype=q.dtype)
        row_sum = np.empty(rows, dtype=q.dtype)
        for i in range(rows):
            floor_max = inh_max[b, blk] if inherit else -np.inf
            row_max[i], row_sum[i] = softmax_row(scores[i], bias[:nk], positions[:nk], i0 + i, causal, floor_max)
        weighted = np.dot(scores, vals[:nk])
        for i in range(rows):
            total = row_sum[i]
            if inherit and inh_max[b, blk] > -np.inf:
                carry = np.exp(inh_max[b, blk] - row_max[i])
                total += carry * inh_sum[b, blk]
                weighted[i] += carry * inh_num[b, blk]
            if total > 0:
                out[b, i0 + i] = weighted[i] / total
                lse[b, i0 + i] = row_max[i] + np.log(total)
            else:
                out[b, i0 + i] = 0
                lse[b, i0 + i] = -np.inf


# ---------------------------------------------------------------- coarse queries (O(n))
@jit()
def _dot(a, b):
    total = a.dtype.type(0)
    for e in range(a.size):
        total += a[e] * b[e]
    return total


@jit(parallel=True)
def coarse_queries(q, n, box_sizes, box_offset, qc):
    """Mean query of every box at every level (real positions only), by pairwise merging."""
    n_batch = q.shape[0]
    for level in range(box_sizes.size):
        n_boxes = box_offset[level + 1] - box_offset[level]
        size = box_sizes[level]
        for job in prange(n_batch * n_boxes):
            b = job // n_boxes
            c = job % n_boxes
            row = box_offset[level] + c
            real = min(n, (c + 1) * size) - c * size
            if real <= 0:
                qc[b, row] = 0
            elif level == 0:
                qc[b, row] = 0
                for t in range(c * size, c * size + real):
                    qc[b, row] += q[b, t]
                qc[b, row] /= real
            else:
                left = box_offset[level - 1] + 2 * c
                real0 = min(size // 2, real)
                qc[b, row] = (real0 * qc[b, left] + (real - real0) * qc[b, left + 1]) / real


@jit(parallel=True)
def far_partials(qc, kc, vc, cbias, box_offset, box_ranks, interactions, scale, part_max, part_sum, part_num):
    """Far-field softmax partial ``(max, sum, numerator)`` of every coarse query box."""
    n_batch = qc.shape[0]
    n_total = interactions.shape[0]
    for job in prange(n_batch * n_total):
        b = job // n_total
        row = job % n_total
        level = 0
        while box_offset[level + 1] <= row:
            level += 1
        rank = box_ranks[level]
        mx = -np.inf
        for slot in range(3):
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


@jit(parallel=True)
def downward_pass(box_offset, part_max, part_sum, part_num):
    """Merge each box's partial with its parent's accumulated one, top level down."""
    n_batch = part_max.shape[0]
    n_levels = box_offset.size - 1
    for level in range(n_levels - 2, -1, -1):
        n_boxes = box_offset[level + 1] - box_offset[level]
        for job in prange(n_batch * n_boxes):
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
