"""Shared pieces of the ``demo`` and ``bench`` commands: inputs, baselines, timers, counts."""

from __future__ import annotations

import sys
import tracemalloc
from importlib import resources

import numpy as np

from ._perf import best_time, fma_logits  # noqa: F401  (one timer and one logit count for every command)


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
    return 2.0 * n**3 / best_time(lambda: a @ a, repeat=5, min_time=0.2)


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
