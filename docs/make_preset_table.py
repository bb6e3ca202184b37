"""The presets table of docs/accuracy.rst: held-out error and time against exact attention.

Protocol: the presets of :mod:`fmm_attention.accuracy` were chosen on
``../shared/data/minilm_Apache-2_0.npz`` (72 heads: 6 layers x 12 heads, n = 512); this
script measures them on the held-out file ``minilm_MPL-2_0.npz`` (float32, the data's
dtype), bidirectional or causal, with times relative to ``exact_attention`` in the same
process (interleaved rounds, best of 3). Then it times them on random inputs (d = 64,
float32, one head) at larger n.
``frontier`` prints the grid the presets were chosen from, on the tuning file
``minilm_Apache-2_0.npz`` only: error against time relative to exact attention.
Run from the repository root: ``python docs/make_preset_table.py [b|c|scale|frontier [c]]``.
"""

import sys
import time
from pathlib import Path

import numpy as np

from fmm_attention import exact_attention, fmm_attention
from fmm_attention.accuracy import PRESETS, accuracy_vs_cost, format_rows

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def held_out(causal):
    z = np.load(DATA / "minilm_MPL-2_0.npz")
    q, k, v = (z[x].reshape(-1, 512, 32) for x in "qkv")
    settings = [(name, dict(o)) for name, o in PRESETS.items()]
    settings += [(name + " auto sinks", dict(o, global_tokens="auto")) for name, o in PRESETS.items()]
    settings += [("mean m=16 p=4", dict(block_size=16, rank=4))]
    rows = accuracy_vs_cost(q, k, v, settings, causal=causal, dtype=np.float32, repeats=3)
    print("minilm_MPL-2_0", "causal" if causal else "bidirectional")
    print(format_rows(rows))


def frontier(causal):
    """Token 0 as a sink: block size, rank, coarsening, Lloyd steps and refinement, by time."""
    z = np.load(DATA / "minilm_Apache-2_0.npz")
    q, k, v = (z[x].reshape(-1, 512, 32) for x in "qkv")
    settings = [(f"mean m={m} p={p}", dict(block_size=m, rank=p, global_tokens=(0,)))
                for m in (16, 32, 64, 128) for p in (4, 8, 16)]
    settings += [(f"cluster m={m} p=8 2 steps", dict(block_size=m, rank=8, coarsening="cluster", cluster_iters=2,
                                                      global_tokens=(0,))) for m in (32, 64, 128)]
    settings += [(f"cluster m=16 p=4 2 steps refine {r}",
                  dict(block_size=16, rank=4, coarsening="cluster", cluster_iters=2, refine=r, global_tokens=(0,)))
                 for r in (32, 64)]
    settings += [("mean m=64 p=4 refine 64", dict(block_size=64, rank=4, refine=64, global_tokens=(0,)))]
    rows = accuracy_vs_cost(q, k, v, settings, causal=causal, dtype=np.float32, repeats=3)
    print("minilm_Apache-2_0 (tuning file)", "causal" if causal else "bidirectional")
    print(format_rows(rows))


def scale(ns=(4096, 65536)):
    rng = np.random.default_rng(0)
    for n in ns:
        q, k, v = rng.standard_normal((3, n, 64), dtype=np.float32)
        for options in PRESETS.values():
            fmm_attention(q, k, v, **options)  # compile, warm
        best_exact, best = np.inf, dict.fromkeys(PRESETS, np.inf)
        for _ in range(2 if n > 10000 else 3):
            t = time.perf_counter()
            exact_attention(q, k, v)
            best_exact = min(best_exact, time.perf_counter() - t)
            for name, options in PRESETS.items():
                t = time.perf_counter()
                fmm_attention(q, k, v, **options)
                best[name] = min(best[name], time.perf_counter() - t)
        print(n, f"exact {1e3 * best_exact:.1f} ms",
              " ".join(f"{x} {1e3 * t:.1f} ms ({t / best_exact:.4f}x)" for x, t in best.items()))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "b"
    if what == "scale":
        scale()
    elif what == "frontier":
        frontier(sys.argv[2:] == ["c"])
    else:
        held_out(what == "c")
