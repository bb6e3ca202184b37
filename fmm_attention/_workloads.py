"""Shared pieces of the ``demo`` and ``bench`` commands: inputs, baselines, timers, counts."""

from __future__ import annotations

import sys
import time
import tracemalloc
from importlib import resources

import numpy as np

from .tree import COARSE, build_tree


def random_qkv(n, d=64, *, heads=1, dtype=np.float32, seed=0):
    """Standard-normal ``q, k, v`` of shape ``(heads, n, d)``."""
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((heads, n, d), dtype=np.float64).astype(dtype) for _ in range(3))


def real_sample():
    """The shipped real sample: ``q, k, v`` (3, 512, 32) float32 from MiniLM, and its provenance."""
    with resources.files("fmm_attention").joinpath("data/minilm_sample.npz").open("rb") as fh:
        data = np.load(fh)
        return data["q"], data["k"], data["v"], f"all-MiniLM-L6-v2 on {data['source']} (layer, head) {data['layer_head'].tolist()}"


def numpy_attention(q, k, v, *, tile=1024):
    """Plain NumPy exact attention in query tiles: ``q @ k.T``, max, exp, ``@ v`` (the baseline)."""
    scale = q.dtype.type(1.0 / np.sqrt(q.shape[-1]))
    out = np.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    for h in range(q.shape[0]):
        for i0 in range(0, q.shape[1], tile):
            s = (q[h, i0 : i0 + tile] * scale) @ k[h].T
            s -= s.max(axis=1, keepdims=True)
            np.exp(s, out=s)
            out[h, i0 : i0 + tile] = (s @ v[h]) / s.sum(axis=1, keepdims=True)
    return out


def best_time(fn, *, repeat=3, min_total=0.2):
    """Best wall time of ``fn()`` over ``repeat`` runs (more runs for fast functions)."""
    best = float("inf")
    runs, spent = 0, 0.0
    while runs < repeat or (spent < min_total and runs < 50):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, runs, spent = min(best, dt), runs + 1, spent + dt
    return best


def peak_memory(fn):
    """Peak bytes of NumPy allocations made while ``fn()`` runs (``tracemalloc``).

    Counts arrays allocated through NumPy (outputs, coarse buffers, plans); the kernels'
    per-thread scratch (a few blocks' keys) is allocated by Numba's runtime and not seen.
    """
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def matmul_rate(n=2048, dtype=np.float32):
    """NumPy's matmul FLOP rate (flop/s) on an ``n x n`` product."""
    a = np.random.default_rng(1).standard_normal((n, n)).astype(dtype)
    a @ a
    return 2.0 * n**3 / best_time(lambda: a @ a, repeat=5)


def fma_logits(n, *, block_size, rank, causal=False, query_coarsening=False):
    """Exact number of logits FMA computes for one head (for FLOP rates: 4 d flops each).

    Fine queries: every query of a block scores every key of the block's plan, causal near
    fields counting only ``j <= i``. Coarse queries: near fields per query, far fields once
    per box.
    """
    tree = build_tree(n, block_size=block_size, rank=rank, causal=causal)
    ptr, seg, _ = tree.near_plan if query_coarsening else tree.key_plan
    m = block_size
    total = 0
    for blk in range(tree.n_blocks):
        rows = min(n, (blk + 1) * m) - blk * m
        for kind, start, count in seg[ptr[blk] : ptr[blk + 1]]:
            if kind == COARSE or not causal:
                total += rows * count
            else:  # causal near field: previous block whole, own block up to the diagonal
                first = blk * m
                for i in range(first, first + rows):
                    total += max(0, min(start + count, i + 1) - start)
    if query_coarsening:
        _, inter = tree.box_tables
        ranks = np.concatenate([np.full(lv.n_boxes, lv.rank) for lv in tree.levels])
        total += int(((inter >= 0).sum(axis=1) * ranks).sum())
    return total


class Progress:
    """A minimal progress line on stderr (tqdm when installed)."""

    def __init__(self, total, desc):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
        except ImportError:
            self._bar = None
        self.total, self.desc, self.done = total, desc, 0

    def update(self, label=""):
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label)
            self._bar.update()
        elif sys.stderr.isatty():
            print(f"\r{self.desc}: {self.done}/{self.total} {label}   ", end="", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        elif sys.stderr.isatty():
            print(file=sys.stderr)


def table(rows, headers):
    """Format rows (lists of str) as an aligned text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])
