"""Grouped heads (g = 8) against the same call with k, v repeated: time and peak memory.

The issue-16 target: grouping costs no more time than the repeated call and makes no copy
of ``k``, ``v`` (the peak memory of the grouped call holds one key head per group).

As a script it times the two calls side by side in one process (interleaved rounds, the
order alternating, the minimum of each) and prints the ratio, the peak memory of each call
and the load average::

    python asv_benchmarks/benchmarks/bench_shapes.py --n 2048 4096 --rounds 5
"""

import os
import sys
import time

import numpy as np

try:
    import fmm_attention
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    import fmm_attention
from fmm_attention.perf import peak_memory

G = 8  # query heads per key/value head
HK = 2
D = 64


def _inputs(n, dtype):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((HK * G, n, D)).astype(dtype)
    k, v = rng.standard_normal((2, HK, n, D)).astype(dtype)
    return q, k, v


def _func(method):
    return fmm_attention.exact_attention if method == "exact" else fmm_attention.fmm_attention


class GroupedHeads:
    """``exact_attention`` and ``fmm_attention`` with ``Hq = 8 Hk``, float32, d = 64."""

    params = [["exact", "fmm"], ["grouped", "repeated"], [False, True]]
    param_names = ["method", "kv", "causal"]
    number = 1
    repeat = (1, 3, 30.0)
    warmup_time = 0.0
    timeout = 900

    def setup(self, method, kv, causal):
        n = 4096 if method == "exact" else 16384
        self.q, self.k, self.v = _inputs(n, np.float32)
        if kv == "repeated":
            self.k, self.v = np.repeat(self.k, G, axis=0), np.repeat(self.v, G, axis=0)
        self.func = _func(method)
        self.func(self.q[:, :256], self.k[:, :256], self.v[:, :256], causal=causal)  # compile outside the timing

    def time_call(self, method, kv, causal):
        self.func(self.q, self.k, self.v, causal=causal)

    def peakmem_call(self, method, kv, causal):
        self.func(self.q, self.k, self.v, causal=causal)


def side_by_side(method, n, causal, rounds=5):
    """Seconds of the grouped call and of the repeated-k/v call, timed in alternating order
    for ``rounds`` rounds (the minimum of each), and whether the two outputs are equal bitwise.

    Returns ``{name: (wall seconds, CPU seconds of the process)}`` for ``"grouped"`` and
    ``"repeated"``, and the equality. On a loaded machine the CPU time (all threads) moves
    less than the wall time, which also counts the time the threads waited for a core.
    """
    q, k, v = _inputs(n, np.float32)
    kr, vr = np.repeat(k, G, axis=0), np.repeat(v, G, axis=0)
    func = _func(method)
    calls = {"grouped": lambda: func(q, k, v, causal=causal), "repeated": lambda: func(q, kr, vr, causal=causal)}
    func(q[:, :256], k[:, :256], v[:, :256], causal=causal)  # compile outside the timing
    best, outs = {"grouped": (np.inf, np.inf), "repeated": (np.inf, np.inf)}, {}
    for r in range(rounds):
        for name in (("grouped", "repeated") if r % 2 == 0 else ("repeated", "grouped")):
            wall, cpu = time.perf_counter(), time.process_time()
            outs[name] = calls[name]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best, np.array_equal(outs["grouped"], outs["repeated"])


def peak_bytes(method, n, causal):
    """Peak memory (bytes above the start) of the grouped and of the repeated call."""
    q, k, v = _inputs(n, np.float32)
    kr, vr = np.repeat(k, G, axis=0), np.repeat(v, G, axis=0)
    func = _func(method)
    func(q[:, :256], k[:, :256], v[:, :256], causal=causal)
    return (peak_memory(lambda: func(q, k, v, causal=causal)), peak_memory(lambda: func(q, kr, vr, causal=causal)),
            kr.nbytes + vr.nbytes)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--method", choices=["exact", "fmm"], nargs="+", default=["exact"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"Hq={HK * G} Hk={HK} d={D} float32, {args.rounds} interleaved rounds, min of each")
    print("wall/cpu: min wall seconds, min CPU seconds (all threads); ratio = grouped / repeated")
    print(f"{'case':26s} {'grouped wall/cpu':>17s} {'repeated wall/cpu':>18s} {'ratio wall/cpu':>15s} {'bitwise':>8s} "
          f"{'peak g MB':>10s} {'peak r MB':>10s} {'k,v rep MB':>11s} {'load':>5s}")
    for method in args.method:
        for n in args.n:
            for causal in (False, True):
                best, equal = side_by_side(method, n, causal, args.rounds)
                load = os.getloadavg()[0]
                pg, pr, copy = peak_bytes(method, n, causal)
                (gw, gc), (rw, rc) = best["grouped"], best["repeated"]
                print(f"{method} n={n} causal={causal!s:5s} {gw:8.3f}/{gc:8.3f} {rw:9.3f}/{rc:8.3f} "
                      f"{gw / rw:7.3f}/{gc / rc:7.3f} {equal!s:>8s} "
                      f"{pg / 2**20:10.1f} {pr / 2**20:10.1f} {copy / 2**20:11.1f} {load:5.2f}", flush=True)
