"""Content-grouped (cluster) coarsening on the CPU: k-means of each box's keys."""

import numpy as np
from numba import prange

from ._blocks import jit


@jit(parallel=True)
def cluster_upward_level(k, v, valid, has_mask, box_size, rank, iters, offset, count_scaling, kc, vc, cbias):
    """Content-grouped coarsening of one level: k-means of each box's valid keys.

    Groups start as the positional sub-boxes (so ``iters=0`` is mean coarsening), then
    ``iters`` Lloyd steps reassign each key to its nearest group mean (ties: lowest group).
    Coarse key and value are the group means, the bias ``log(group size)``. Deterministic,
    and causal-safe: a box's groups use only its own keys.
    """
    n_batch, n, d = k.shape
    n_boxes = (n + box_size - 1) // box_size
    sub = box_size // rank
    for job in prange(n_batch * n_boxes):
        b = job // n_boxes
        c = job % n_boxes
        first = c * box_size
        last = min(n, first + box_size)
        tokens = np.empty(last - first, dtype=np.int64)
        nt = 0
        for t in range(first, last):
            if not has_mask or valid[b, t]:
                tokens[nt] = t
                nt += 1
        group = np.empty(nt, dtype=np.int64)
        for i in range(nt):
            group[i] = (tokens[i] - first) // sub
        centre = np.zeros((rank, d), dtype=k.dtype)
        size = np.zeros(rank, dtype=np.int64)
        for step in range(iters + 1):
            centre[:] = 0
            size[:] = 0
            for i in range(nt):
                centre[group[i]] += k[b, tokens[i]]
                size[group[i]] += 1
            for g in range(rank):
                if size[g] > 0:
                    centre[g] /= size[g]
            if step == iters:
                break
            for i in range(nt):
                best = -1
                best_dist = np.inf
                for g in range(rank):
                    if size[g] == 0:
                        continue
                    dist = 0.0
                    for e in range(d):
                        diff = k[b, tokens[i], e] - centre[g, e]
                        dist += diff * diff
                    if dist < best_dist:
                        best_dist = dist
                        best = g
                group[i] = best
        for g in range(rank):
            row = offset + c * rank + g
            kc[b, row] = centre[g]
            vc[b, row] = 0
        for i in range(nt):
            vc[b, offset + c * rank + group[i]] += v[b, tokens[i]]
        for g in range(rank):
            row = offset + c * rank + g
            if size[g] == 0:
                cbias[b, row] = -np.inf
            else:
                vc[b, row] /= size[g]
                cbias[b, row] = np.log(size[g]) if count_scaling else 0
