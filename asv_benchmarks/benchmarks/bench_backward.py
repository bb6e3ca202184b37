"""Backward passes (fmm_attention.grad): time of one pullback, and its ratio to the forward.

``time_backward_*`` times the pullback alone (the VJP's forward runs in setup);
``peakmem_backward_*`` measures forward + backward. Run as a script for the ratio table
of the issue's targets (backward at most 2.5x the forward)::

    python asv_benchmarks/benchmarks/bench_backward.py [--repeat 3] [--quick] [--large] [--grouped]
    python asv_benchmarks/benchmarks/bench_backward.py --memory 1048576
"""

import sys

import numpy as np

try:
    from . import _common as c  # noqa: F401  (puts the checkout on sys.path when not installed)
except ImportError:  # run as a script
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fmm_attention import exact_attention, fmm_attention
from fmm_attention.grad import exact_attention_vjp, fmm_attention_vjp
from fmm_attention.perf import best_time, peak_memory, random_inputs

D = 64


def _inputs(n, dtype="float32", seed=0):
    """``q, k, v`` and a cotangent ``g`` from the package's one input generator."""
    return random_inputs(n, D, dtype=dtype, seed=seed, cotangent=True)


class ExactBackward:
    params = [[1024, 4096], [False, True]]
    param_names = ["n", "causal"]

    def setup(self, n, causal):
        q, k, v, self.g = _inputs(n)
        _, self.pullback = exact_attention_vjp(q, k, v, causal=causal)
        self.pullback(self.g)  # compile

    def time_backward_exact(self, n, causal):
        self.pullback(self.g)

    def peakmem_backward_exact(self, n, causal):
        self.pullback(self.g)


class FMMBackward:
    params = [[4096, 16384], [(64, 4), (32, 2)], [False, True]]
    param_names = ["n", "block_rank", "causal"]

    def setup(self, n, block_rank, causal):
        q, k, v, self.g = _inputs(n)
        m, p = block_rank
        _, self.pullback = fmm_attention_vjp(q, k, v, block_size=m, rank=p, causal=causal)
        self.pullback(self.g)

    def time_backward_fma(self, n, block_rank, causal):
        self.pullback(self.g)

    def peakmem_backward_fma(self, n, block_rank, causal):
        self.pullback(self.g)


def _grouped_inputs(n, heads=(8, 2), seed=0):
    """``q`` of ``heads[0]`` query heads, ``k``, ``v`` of ``heads[1]`` (grouped heads), and a cotangent."""
    hq, hk = heads
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((hq, n, D), dtype=np.float32)
    k, v = (rng.standard_normal((hk, n, D), dtype=np.float32) for _ in range(2))
    return q, k, v, rng.standard_normal((hq, n, D), dtype=np.float32)


class GroupedBackward:
    """Grouped heads (8 query heads on 2 key/value heads, no copy of k, v), FMA 32/2."""

    params = [[4096], [False, True]]
    param_names = ["n", "causal"]

    def setup(self, n, causal):
        q, k, v, self.g = _grouped_inputs(n)
        _, self.pullback = fmm_attention_vjp(q, k, v, block_size=32, rank=2, causal=causal)
        self.pullback(self.g)

    def time_backward_grouped(self, n, causal):
        self.pullback(self.g)


def _learned(n, block_size=32, rank=2, seed=1):
    """A LearnedCoarsening with random Conv1d-layout weights for sequences of length n."""
    from fmm_attention import LearnedCoarsening, build_tree

    tree = build_tree(n, block_size=block_size, rank=rank)
    rng = np.random.default_rng(seed)
    kw = [(rng.standard_normal((lv.rank * D, 1, lv.box_size)) / lv.box_size) for lv in tree.levels]
    return LearnedCoarsening(kw, kw)


class CoarseningBackward:
    """The learned and cluster coarsening adjoints (target: learned at most 3x its forward), 32/2."""

    params = [[16384], ["learned", "cluster"]]
    param_names = ["n", "coarsening"]

    def setup(self, n, coarsening):
        q, k, v, self.g = _inputs(n)
        coarsening = _learned(n) if coarsening == "learned" else coarsening
        _, self.pullback = fmm_attention_vjp(q, k, v, block_size=32, rank=2, coarsening=coarsening)
        self.pullback(self.g)

    def time_backward_coarsening(self, n, coarsening):
        self.pullback(self.g)

    def peakmem_backward_coarsening(self, n, coarsening):
        self.pullback(self.g)


def _minor_faults():
    """Minor page faults of this process so far (``None`` where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(f):
    """``(seconds, minor page faults)`` of one call of ``f``."""
    faults = _minor_faults()
    seconds = best_time(f, repeat=1)
    after = _minor_faults()
    return seconds, None if faults is None else after - faults


def _row(name, forward, vjp, repeat):
    """``(name, forward s, backward s, ratio, forward faults, backward faults)``: best of
    ``repeat`` runs of each, and the median minor page faults per call of each.

    The faults are there because they move the ratio: fresh memory that the allocator
    returned to the system between calls costs a fault per page on its first write, and on
    some virtual machines that costs about 16 us per 4 KiB page (docs/performance.rst,
    "Page faults").
    """
    _, pullback = vjp()
    g = np.ones_like(forward())
    pullback(g)  # compiled and warm
    # interleaved, so that a change of the machine's load hits both alike
    tf, tb = [], []
    for _ in range(repeat):
        tf.append(_timed(forward))
        tb.append(_timed(lambda: pullback(g)))
    best_f, best_b = min(t for t, _ in tf), min(t for t, _ in tb)
    faults = [None if tf[0][1] is None else int(np.median([f for _, f in x])) for x in (tf, tb)]
    return name, best_f, best_b, best_b / best_f, *faults


def ratio_table(repeat=3, quick=False, large=False, grouped=False):
    """Rows ``(name, forward s, backward s, ratio, forward faults, backward faults)`` of the
    issue's configurations
    (``large``: FMA at n = 65536 too; ``grouped``: also 8 query heads on 2 key/value heads).
    """
    from functools import partial

    rows = []
    if grouped:
        n = 4096 if quick else 16384
        q, k, v, _ = _grouped_inputs(n)
        for causal in (False, True):
            opts = dict(block_size=32, rank=2, causal=causal)
            rows.append((_row(f"fma n={n} 8q/2kv heads m=32 p=2 causal={causal}",
                              partial(fmm_attention, q, k, v, **opts), partial(fmm_attention_vjp, q, k, v, **opts),
                              repeat)))
    exact_sizes = [1024, 4096] if quick else [4096, 16384]
    fma_sizes = [4096] if quick else [16384, 65536] if large else [16384]
    for n in exact_sizes:
        q, k, v, _ = _inputs(n)
        for causal in (False, True):
            rows.append(_row(f"exact n={n} causal={causal}", partial(exact_attention, q, k, v, causal=causal),
                             partial(exact_attention_vjp, q, k, v, causal=causal), repeat))
    for n in fma_sizes:
        q, k, v, _ = _inputs(n)
        configs = [dict(block_size=m, rank=p, causal=c) for m, p in ((64, 4), (32, 2)) for c in (False, True)]
        configs.append(dict(block_size=32, rank=2, coarsening=_learned(n)))  # random Conv1d weights
        configs.append(dict(block_size=32, rank=2, coarsening="cluster"))
        for opts in configs:
            kind = opts.get("coarsening", "mean")
            name = f"fma n={n} m={opts['block_size']} p={opts['rank']} " + (
                f"causal={opts['causal']}" if kind == "mean" else "learned" if not isinstance(kind, str) else kind)
            rows.append(_row(name, partial(fmm_attention, q, k, v, **opts), partial(fmm_attention_vjp, q, k, v, **opts),
                             repeat))
    return rows


def memory_ratio(n, block_size=32, rank=2):
    """:func:`fmm_attention.perf.peak_memory` of FMA forward + backward, plus the inputs and
    cotangent, over the bytes of ``q, k, v, out``, the cotangent and the three gradients
    (the issue's target: at most 3). Run it in a fresh process with the kernels already
    compiled (the cache), so that memory freed by earlier work stays out of the figure.
    """
    opts = dict(block_size=block_size, rank=rank)
    q, k, v, g = _inputs(4096)
    fmm_attention_vjp(q, k, v, **opts)[1](g)  # load the compiled kernels
    q, k, v, g = _inputs(n)
    peak = peak_memory(lambda: fmm_attention_vjp(q, k, v, **opts)[1](g))
    return (4 * q.nbytes + peak) / (8 * q.nbytes)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--large", action="store_true", help="FMA at n = 65536 too")
    parser.add_argument("--grouped", action="store_true", help="also grouped heads (8 query on 2 key/value heads)")
    parser.add_argument("--memory", type=int, metavar="N", help="only the peak-memory ratio of FMA at n = N")
    args = parser.parse_args()
    if args.memory:
        print(f"FMA n={args.memory} m=32 p=2: peak / (q, k, v, out, g, dq, dk, dv) = {memory_ratio(args.memory):.2f}")
        sys.exit()
    print(f"{'case':40s} {'forward ms':>11s} {'backward ms':>12s} {'ratio':>6s} {'faults fwd / bwd':>17s}")
    for name, tf, tb, r, ff, fb in ratio_table(args.repeat, args.quick, args.large, args.grouped):
        print(f"{name:40s} {tf * 1e3:11.1f} {tb * 1e3:12.1f} {r:6.2f} {ff!s:>8s} {fb!s:>8s}", flush=True)
