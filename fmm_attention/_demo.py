"""``python -m fmm_attention demo``: the library's main job on a built-in workload.

Random inputs up to n = 65536 and a real sample (three MiniLM heads shipped with the
package): for each method, time, peak memory of its NumPy allocations and relative error
against exact attention.
"""

from __future__ import annotations

import numpy as np

from . import _config, api
from .accuracy import ACCURATE
from ._workloads import Progress, best_time, peak_memory, random_qkv, real_sample, table


def add_arguments(parser):
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384, 65536], help="random sequence lengths")
    parser.add_argument("--d", type=int, default=64, help="head dim of the random inputs")
    parser.add_argument("--block-size", type=int, default=_config.DEFAULT_BLOCK_SIZE)
    parser.add_argument("--rank", type=int, default=_config.DEFAULT_RANK)
    parser.add_argument("--causal", action="store_true", help="causal attention")


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
            q, k, v, causal=args.causal, global_tokens=[0, q.shape[-2] - 1], **ACCURATE)))
    rng = np.random.default_rng(5)
    w = rng.standard_normal((2, 512)) / 8

    def fastformer(q, k, v):
        d = q.shape[-1]
        return api.fastformer_attention(q, k, v, w[0, :d].astype(q.dtype), w[1, :d].astype(q.dtype), causal=args.causal)

    methods.append(("fastformer", fastformer))
    return methods



def _measure(name, fn, q, k, v, ref):
    result = {}
    seconds = best_time(lambda: result.setdefault("out", fn(q, k, v)), repeat=1)
    out = result["out"]
    peak = peak_memory(lambda: fn(q, k, v))
    if ref is None:
        err = "0 (reference)"
    elif name == "fastformer":
        err = "n/a (another model)"
    else:
        err = f"{_rel_error(out, ref):.2e}"
    return out, [name, q.shape[-2], f"{seconds * 1e3:.1f}", f"{peak / 2**20:.1f}", err]


def run(args):
    methods = _methods(args)
    print("fmm_attention demo: relative error = ||out - exact|| / ||exact|| (Frobenius)")
    print("warming up the JIT (compiles once, then cached on disk)...", flush=True)
    wq, wk, wv = random_qkv(128, args.d)
    for _, fn in _methods(args, real=True):
        fn(wq, wk, wv)

    rows = []
    progress = Progress(len(args.n) * len(methods), "demo")
    for n in args.n:
        q, k, v = random_qkv(n, args.d)
        ref = None
        for name, fn in methods:
            out, row = _measure(name, fn, q, k, v, ref)
            ref = out if ref is None else ref
            rows.append(row)
            progress.update(f"{name} n={n}")
    progress.close()
    print(f"\nRandom Gaussian inputs, one head, d={args.d}, float32 (attention is nearly uniform):")
    print(table(rows, ["method", "n", "time ms", "peak MiB", "rel. error"]))

    q, k, v, provenance = real_sample()
    rows = []
    ref = None
    for name, fn in _methods(args, real=True):
        out, row = _measure(name, fn, q, k, v, ref)
        ref = out if ref is None else ref
        rows.append(row)
    print(f"\nReal attention inputs: {provenance}, n=512, d=32, float32:")
    print(table(rows, ["method", "n", "time ms", "peak MiB", "rel. error"]))
    return 0
