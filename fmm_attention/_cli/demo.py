"""``python -m fmm_attention demo``: the library's main job on a built-in workload.

Random inputs up to n = 65536 and a real sample (three MiniLM heads shipped with the
package): for each method, its best time over a few runs, its peak memory
(:func:`fmm_attention.perf.peak_memory`: the resident set's rise during the call, Numba's
buffers included) and its relative error against exact attention.
"""

from __future__ import annotations

import numpy as np

from .. import _config, api
from ..accuracy import ACCURATE
from ..perf import best_time, format_table, peak_memory, random_inputs
from ._common import Progress, check_fma_options, positive_float, positive_int, real_sample

#: Length of the real sample shipped with the package.
REAL_N = 512
HEADERS = ["method", "n", "time ms", "runs", "peak MiB", "rel. error"]


def add_arguments(parser):
    """Add the ``demo`` options to ``parser``."""
    parser.add_argument("--n", type=positive_int, nargs="+", default=[1024, 4096, 16384, 65536],
                        help="random sequence lengths")
    parser.add_argument("--d", type=positive_int, default=64, help="head dim of the random inputs")
    parser.add_argument("--block-size", type=int, default=_config.DEFAULT_BLOCK_SIZE,
                        help="FMA's finest box size m, a power of two")
    parser.add_argument("--rank", type=int, default=_config.DEFAULT_RANK,
                        help="FMA's coarse keys per far box p, a power of two")
    parser.add_argument("--causal", action="store_true", help="causal attention")
    parser.add_argument("--repeat", type=positive_int, default=3,
                        help="timed runs per row, the best kept (fewer for a row once --max-time is spent)")
    parser.add_argument("--max-time", type=positive_float, default=2.0, metavar="SECONDS",
                        help="start no further timed run of a row after this many seconds")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress on stderr")


def _rel_error(out, ref):
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _methods(args, *, real=False):
    fmm_kw = dict(block_size=args.block_size, rank=args.rank, causal=args.causal)
    methods = [
        ("exact", lambda q, k, v: api.exact_attention(q, k, v, causal=args.causal)),
        (f"fma m={args.block_size} p={args.rank}", lambda q, k, v: api.fmm_attention(q, k, v, **fmm_kw)),
    ]
    if not args.causal:
        methods.append(("fma coarse queries", lambda q, k, v: api.fmm_attention(q, k, v, query_coarsening=True, **fmm_kw)))
    if real:  # its gain shows on real attention; random inputs' attention is nearly uniform
        methods.append(("fma accurate (docs: accuracy)", lambda q, k, v: api.fmm_attention(
            q, k, v, causal=args.causal, **ACCURATE)))

    def fastformer(q, k, v):
        w_q, w_k = random_inputs(1, q.shape[-1], dtype=q.dtype, fastformer=True)[3:5]
        return api.fastformer_attention(q, k, v, w_q, w_k, causal=args.causal)

    methods.append(("fastformer", fastformer))
    return methods


def _measure(args, name, fn, q, k, v, ref):
    """One table row: the best of up to ``args.repeat`` runs (within ``args.max_time``)."""
    result = {}
    runs = [0]

    def call():
        runs[0] += 1
        result["out"] = fn(q, k, v)

    seconds = best_time(call, repeat=args.repeat, max_time=args.max_time)
    out = result["out"]
    peak = peak_memory(lambda: fn(q, k, v))
    if ref is None:
        err = "0 (reference)"
    elif name == "fastformer":
        err = "n/a (another model)"
    else:
        err = f"{_rel_error(out, ref):.2e}"
    return out, [name, q.shape[-2], f"{seconds * 1e3:.2f}", runs[0], f"{peak / 2**20:.1f}", err]


def check(args):
    """Reject bad options before any work (:class:`~fmm_attention._cli._common.UsageError`)."""
    for n in sorted(set(args.n) | {REAL_N}):
        check_fma_options(n, block_size=args.block_size, rank=args.rank, causal=args.causal)


def run(args):
    """Run the ``demo`` command; returns the exit status."""
    check(args)
    methods = _methods(args)
    real_methods = _methods(args, real=True)
    print("fmm_attention demo: relative error = ||out - exact|| / ||exact|| (Frobenius); "
          f"time = best of up to {args.repeat} runs (the runs column; no run starts after "
          f"{args.max_time:g} s on a row); peak = the resident set's rise during one call, output and "
          "Numba's buffers included")
    progress = Progress(len(real_methods) + len(args.n) * len(methods) + len(real_methods), "demo",
                        enabled=args.progress)
    # compiles once, then Numba's on-disk cache makes this fast (python -m fmm_attention compile)
    wq, wk, wv = random_inputs(128, args.d, heads=1)
    for name, fn in real_methods:
        fn(wq, wk, wv)
        progress.update(f"warm-up {name}")

    def measure_all(methods, q, k, v, label):
        # the first method (exact attention) is the reference of the others
        rows, ref = [], None
        for name, fn in methods:
            out, row = _measure(args, name, fn, q, k, v, ref)
            ref = out if ref is None else ref
            rows.append(row)
            progress.update(f"{name} {label}")
        return rows

    rows = []
    for n in args.n:
        rows += measure_all(methods, *random_inputs(n, args.d, heads=1), f"n={n}")
    q, k, v, provenance = real_sample()
    real_rows = measure_all(real_methods, q, k, v, "real sample")
    progress.close()
    print(f"\nRandom Gaussian inputs, one head, d={args.d}, float32 (attention is nearly uniform):")
    print(format_table(rows, HEADERS))
    print(f"\nReal attention inputs: {provenance}, n={q.shape[-2]}, d={q.shape[-1]}, float32:")
    print(format_table(real_rows, HEADERS))
    return 0
