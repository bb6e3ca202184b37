"""Decode targets of issue 16 (docs/decoding.rst): FMA decode step vs exact KV-cache step.

One head, d = 64, float32, default block_size / rank, in one process, side by side:

* time per decode step (one token) at T = 2**10 .. 2**20, FMA and exact;
* state bytes at each T (FMA state vs the exact KV cache);
* prefill of T tokens then 1,000 single-token steps vs one ``fmm_attention`` over T + 1,000.

The exact decoder's cache is filled directly (its prefill would run an O(T^2) exact
attention for the prompt's outputs, hours at T = 2**20); its steps are the real ones.
Run from the repository root: ``python docs/make_decode_table.py [max_log2_T]``.
"""

import sys
import time

import numpy as np

from fmm_attention import FMMDecoder, fmm_attention
from fmm_attention.perf import format_table

D = 64
N_STEPS = 1000


def tokens(rng, n):
    return [rng.standard_normal((n, D), dtype=np.float32) for _ in range(3)]


def per_step(dec, q, k, v, n):
    t0 = time.perf_counter()
    for t in range(n):
        dec.step(q[t : t + 1], k[t : t + 1], v[t : t + 1])
    return (time.perf_counter() - t0) / n


def exact_filled(k, v):
    """An exact decoder holding ``k, v`` as its KV cache (no O(T^2) prompt outputs)."""
    dec = FMMDecoder(d=D, dtype=np.float32, method="exact")
    T = k.shape[0]
    dec._grow_cache(T)
    dec._kv[0, :T], dec._vv[0, :T], dec._ok[0, :T] = k, v, True
    dec._position = T
    return dec


def main(max_log2=20):
    rng = np.random.default_rng(0)
    warm = tokens(rng, 300)
    FMMDecoder(d=D, dtype=np.float32).prefill(*warm)  # compile
    d0 = FMMDecoder(d=D, dtype=np.float32)
    d0.prefill(*(a[:200] for a in warm))
    per_step(d0, *(a[200:] for a in warm), 100)
    per_step(exact_filled(warm[1][:200], warm[2][:200]), *(a[200:] for a in warm), 100)
    rows, first = [], None
    for log2 in [x for x in (10, 14, 17, 20) if x <= max_log2]:
        T = 2**log2
        q, k, v = tokens(rng, T + N_STEPS)
        # best of 3 for the one-shot call and for the prefill (a fresh decoder each time)
        t_forward = t_prefill = np.inf
        for _ in range(3):
            t0 = time.perf_counter()
            fmm_attention(q, k, v, causal=True, check_finite=False)
            t_forward = min(t_forward, time.perf_counter() - t0)
            dec = FMMDecoder(d=D, dtype=np.float32)
            t0 = time.perf_counter()
            dec.prefill(q[:T], k[:T], v[:T])
            t_prefill = min(t_prefill, time.perf_counter() - t0)
        t_fma = per_step(dec, q[T:], k[T:], v[T:], N_STEPS)
        t_total = t_prefill + t_fma * N_STEPS
        fma_bytes = dec.state_bytes
        ex = exact_filled(k[:T], v[:T])
        n_exact = max(5, min(N_STEPS, 2**24 // T))
        t_exact = per_step(ex, q[T:], k[T:], v[T:], n_exact)
        kv_bytes = ex.state_bytes
        first = first or t_fma
        rows.append([
            f"2**{log2}", f"{t_fma * 1e6:.1f}", f"{t_fma / first:.2f}", f"{t_exact * 1e6:.0f}",
            f"{t_exact / t_fma:.0f}", f"{fma_bytes / 1024:.0f}", f"{kv_bytes / 2**20:.1f}",
            f"{kv_bytes / fma_bytes:.0f}", f"{t_total * 1e3:.0f}", f"{t_forward * 1e3:.0f}",
            f"{t_total / t_forward:.2f}",
        ])
        del q, k, v, dec, ex
    print(format_table(rows, [
        "T", "FMA step us", "vs T=2**10", "exact step us", "exact/FMA", "FMA state KiB", "KV cache MiB",
        "KV/FMA bytes", "prefill+1k steps ms", "fmm(T+1k) ms", "ratio",
    ]))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
