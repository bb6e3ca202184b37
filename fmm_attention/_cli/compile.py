"""``python -m fmm_attention compile``: compile every CPU kernel variant ahead of use.

Each variant is a few calls of the public functions on tiny inputs, one per code path
(exact attention, FMA with fine and coarse queries, causal or not, masks, mean, cluster
and learned coarsening, refinement, global tokens, Fastformer, the analysis), in float32
and float64. Calling the public functions compiles exactly the signatures that later
calls dispatch to. Numba writes the machine code to its on-disk cache, so later processes
load it in a fraction of the time; ``NUMBA_CACHE_DIR`` sets where that cache lives.

Compiling is single-threaded, so ``--jobs`` runs the dtypes in separate processes at once
(each dtype's kernels are their own specialisations: the processes share almost no work);
they write to the same on-disk cache. ``--jobs 1`` compiles in this process.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .. import _config
from ..perf import format_table, random_inputs
from ._common import Progress, UsageError

DTYPES = ("float32", "float64")

# Tiny sizes that still reach every branch: n = 64 with m = 8 gives three far levels, so
# the coarse-query, refinement and multi-level paths all run.
_N, _D, _M, _P = 64, 8, 8, 2


def _inputs(dtype):
    # One generator for every command (perf.random_inputs): here a leading dim of 2 heads.
    return random_inputs(_N, _D, heads=2, dtype=dtype, seed=0)


def _mask():
    mask = np.ones((2, _N), dtype=bool)
    mask[1, _N // 2 :] = False  # one padded head, one full
    return mask


def _exact(dtype):
    from ..api import exact_attention

    q, k, v = _inputs(dtype)
    exact_attention(q, k, v)
    exact_attention(q, k, v, causal=True, return_lse=True)
    exact_attention(q, k, v, key_padding_mask=_mask(), check_finite=False)
    exact_attention(q, k[:1], v[:1])  # k, v broadcast over the heads: the same kernel variant


def _fma_calls(**options):
    def run(dtype):
        from ..api import fmm_attention

        q, k, v = _inputs(dtype)
        for causal in (False, True) if not options.get("query_coarsening") else (False,):
            for mask in (None, _mask()):
                fmm_attention(q, k, v, causal=causal, block_size=_M, rank=_P, key_padding_mask=mask, **options)

    return run


def _cluster(dtype):
    # At n = 64 every box holds at most CLUSTER_FLAT_SIZE tokens, so only the token-level
    # kernel would run; with the size at 0 the levels above level 1 group groups, which
    # reaches the group-level kernel too (its types do not depend on the size).
    saved = _config.CLUSTER_FLAT_SIZE
    try:
        for flat_size in (saved, 0):
            _config.CLUSTER_FLAT_SIZE = flat_size
            _fma_calls(coarsening="cluster", cluster_iters=2)(dtype)
    finally:
        _config.CLUSTER_FLAT_SIZE = saved


def _learned(dtype):
    from ..api import fmm_attention
    from ..coarsening import LearnedCoarsening
    from ..tree import build_tree

    q, k, v = _inputs(dtype)
    tree = build_tree(_N, block_size=_M, rank=_P)
    weights = [np.full((lv.rank * _D, 1, lv.box_size), 1.0 / lv.box_size) for lv in tree.levels]
    coarse = LearnedCoarsening(weights, weights)
    for causal in (False, True):
        fmm_attention(q, k, v, causal=causal, block_size=_M, rank=_P, coarsening=coarse, key_padding_mask=_mask())


def _fastformer(dtype):
    from ..api import fastformer_attention

    q, k, v = _inputs(dtype)
    w_q, w_k = random_inputs(_N, _D, dtype=dtype, fastformer=True)[3:5]
    for causal in (False, True):
        fastformer_attention(q, k, v, w_q, w_k, causal=causal)
        fastformer_attention(q, k, v, w_q, w_k, causal=causal, key_padding_mask=_mask(), return_pools=True)


def _analysis(dtype):
    # The analysis computes in float64 whatever the input dtype: one variant covers both.
    from ..analysis import compare

    q, k, v = _inputs(dtype)
    compare(q, k, v, block_size=_M, rank=_P, key_padding_mask=_mask())


def _finite(dtype):
    # Arrays above _config.FINITE_PARALLEL_MIN_BYTES take a parallel kernel; reach it on a
    # small array by lowering the threshold for this one call.
    from .. import _config
    from ..cpu.finite import all_finite

    saved = _config.FINITE_PARALLEL_MIN_BYTES
    _config.FINITE_PARALLEL_MIN_BYTES = 0
    try:
        all_finite(np.ones(1000, dtype=dtype))
    finally:
        _config.FINITE_PARALLEL_MIN_BYTES = saved


def _gradients(dtype):
    from ..coarsening import LearnedCoarsening
    from ..grad import exact_attention_vjp, fastformer_attention_vjp, fmm_attention_vjp
    from ..tree import build_tree

    q, k, v = _inputs(dtype)
    tree = build_tree(_N, block_size=_M, rank=_P)
    weights = [np.full((lv.rank * _D, 1, lv.box_size), 1.0 / lv.box_size) for lv in tree.levels]
    fma_options = [dict(), dict(coarsening=LearnedCoarsening(weights, weights)),
                   dict(coarsening="cluster", cluster_iters=2)]
    for causal in (False, True):
        for mask in (None, _mask()):
            out, pullback = exact_attention_vjp(q, k, v, causal=causal, key_padding_mask=mask)
            pullback(np.ones_like(out))
            for options in fma_options:
                out, pullback = fmm_attention_vjp(q, k, v, causal=causal, block_size=_M, rank=_P,
                                                  key_padding_mask=mask, **options)
                pullback(np.ones_like(out))
    out, pullback = fmm_attention_vjp(q, k, v, block_size=_M, rank=_P, query_coarsening=True)
    pullback(np.ones_like(out))
    w_q, w_k = random_inputs(_N, _D, dtype=dtype, fastformer=True)[3:5]
    for causal in (False, True):
        out, pullback = fastformer_attention_vjp(q, k, v, w_q, w_k, causal=causal, key_padding_mask=_mask())
        pullback(np.ones_like(out))


def _decode(dtype):
    from .. import _config
    from ..coarsening import LearnedCoarsening
    from ..decode import FMMDecoder
    from ..tree import build_tree

    q, k, v = _inputs(dtype)
    tree = build_tree(_N, block_size=_M, rank=_P)
    weights = [np.full((lv.rank * _D, 1, lv.box_size), 1.0 / lv.box_size) for lv in tree.levels]
    saved = _config.DECODE_PARALLEL_MIN_WORK
    for parallel_min_work in (saved, 0):  # the serial step kernels and their parallel twins
        _config.DECODE_PARALLEL_MIN_WORK = parallel_min_work
        try:
            for method, coarsening in (("fmm", "mean"), ("fmm", LearnedCoarsening(weights, weights)),
                                       ("exact", "mean")):
                dec = FMMDecoder(batch_shape=(2,), d=_D, block_size=_M, rank=_P, coarsening=coarsening,
                                 dtype=np.dtype(dtype), method=method)
                dec.prefill(q[:, :40], k[:, :40], v[:, :40], key_padding_mask=_mask()[:, :40])
                for t in range(40, 44):
                    dec.step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
        finally:
            _config.DECODE_PARALLEL_MIN_WORK = saved


#: Variant name -> (function of the dtype, dtypes it is compiled for).
VARIANTS = {
    "exact": (_exact, DTYPES),
    "fma": (_fma_calls(), DTYPES),
    "fma-coarse-queries": (_fma_calls(query_coarsening=True), DTYPES),
    "fma-cluster": (_cluster, DTYPES),
    "fma-learned": (_learned, DTYPES),
    "fma-refine": (_fma_calls(refine=8), DTYPES),
    "fma-global-tokens": (_fma_calls(global_tokens=[0, _N - 1]), DTYPES),
    "fastformer": (_fastformer, DTYPES),
    "finite-check": (_finite, DTYPES),
    "gradients": (_gradients, DTYPES),
    "decode": (_decode, DTYPES),
    "analysis": (_analysis, ("float64",)),
}

_DESCRIPTIONS = {
    "exact": "exact attention: causal or not, masked, with lse",
    "fma": "FMA, fine queries, mean coarsening: causal or not, masked",
    "fma-coarse-queries": "FMA, coarse queries (the O(n) variant), masked",
    "fma-cluster": "FMA, cluster coarsening: causal or not, masked",
    "fma-learned": "FMA, learned coarsening: causal or not",
    "fma-refine": "FMA, adaptive refinement: causal or not, masked",
    "fma-global-tokens": "FMA with global tokens: causal or not, masked",
    "fastformer": "Fastformer: causal or not, masked, with pools",
    "finite-check": "the check_finite pass of large arrays (parallel)",
    "gradients": "the VJPs: exact, FMA (mean, learned, coarse queries), Fastformer; masked",
    "decode": "FMMDecoder: FMA (mean, learned) and exact decode, serial and parallel steps",
    "analysis": "the analysis of the analyze command (float64 only)",
}


def add_arguments(parser):
    """Add the ``compile`` options to ``parser``."""
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES),
                        help="dtypes to compile for")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), metavar="VARIANT",
                        help="compile only these variants (default: all): " + ", ".join(VARIANTS))
    parser.add_argument("--list", action="store_true", help="list the variants and exit, compiling nothing")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress on stderr")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="processes compiling at once, one dtype each (default: one per dtype, at most the "
                             "CPU count; 1 compiles in this process)")


def _cache_location():
    from numba.core import config

    if not _config.CACHE:
        return "none: on-disk caching is off (fmm_attention._config.CACHE), compiled code lasts this process only"
    if os.environ.get("NUMBA_CACHE_DIR") or getattr(config, "CACHE_DIR", ""):
        return f"NUMBA_CACHE_DIR={config.CACHE_DIR or os.environ['NUMBA_CACHE_DIR']}"
    return "__pycache__ beside the package's modules (or numba's per-user cache if not writable); set NUMBA_CACHE_DIR to move it"


def jobs(names, dtypes):
    """``(variant, dtype)`` pairs to compile, in order."""
    return [(name, dtype) for name in names for dtype in dtypes if dtype in VARIANTS[name][1]]


def _compile_group(todo):
    """Compile ``(variant, dtype)`` jobs in order; returns ``[(variant, dtype, seconds)]``.

    Module level, so a worker process of :func:`run` can call it.
    """
    done = []
    for name, dtype in todo:
        t0 = time.perf_counter()
        VARIANTS[name][0](np.dtype(dtype))
        done.append((name, dtype, time.perf_counter() - t0))
    return done


def _in_processes(groups, n_jobs, progress):
    """Run each group of jobs in a fresh (spawned) process, ``n_jobs`` at once."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    rows = []
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_compile_group, group) for group in groups]
        for future in as_completed(futures):
            for name, dtype, seconds in future.result():
                rows.append((name, dtype, seconds))
                progress.update(f"{name} {dtype}: {seconds:.1f} s")
    order = {job: i for i, job in enumerate(job for group in groups for job in group)}
    return sorted(rows, key=lambda row: order[row[:2]])


def run(args):
    """Run the ``compile`` command; returns the exit status."""
    names = list(VARIANTS) if args.only is None else list(dict.fromkeys(args.only))
    todo = jobs(names, list(dict.fromkeys(args.dtype)))
    if args.list:
        print(format_table([[name, _DESCRIPTIONS[name], ", ".join(VARIANTS[name][1])] for name in VARIANTS],
                    ["variant", "what it compiles", "dtypes"]))
        return 0
    if not todo:
        raise UsageError(f"nothing to compile: variant(s) {', '.join(names)} have no {'/'.join(args.dtype)} variant")
    print(f"compiling {len(todo)} variant(s); cache: {_cache_location()}", flush=True)
    groups = [[job for job in todo if job[1] == dtype] for dtype in dict.fromkeys(dtype for _, dtype in todo)]
    n_jobs = min(len(groups), os.cpu_count() or 1) if args.jobs is None else args.jobs
    if n_jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {n_jobs}")
    progress = Progress(len(todo), "compile", unit="variant", enabled=args.progress)
    start = time.perf_counter()
    if n_jobs == 1 or len(groups) == 1:
        done = []
        for name, dtype in todo:
            done += _compile_group([(name, dtype)])
            progress.update(f"{name} {dtype}: {done[-1][2]:.1f} s")
    else:
        done = _in_processes(groups, n_jobs, progress)
    progress.close()
    print(format_table([[name, dtype, f"{seconds:.1f}"] for name, dtype, seconds in done], ["variant", "dtype", "seconds"]))
    print(f"done in {time.perf_counter() - start:.1f} s. A variant's seconds count what the variants above it had "
          "not compiled yet (kernels are shared), or the time to load it when it was cached already.")
    return 0
