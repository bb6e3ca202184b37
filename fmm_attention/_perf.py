"""Performance studies: FLOP counts, time scaling, peak memory and a per-phase profile.

These functions back ``python -m fmm_attention bench --scaling``, the asv suite
(``asv_benchmarks/``) and the figures of ``docs/performance.rst``. They measure the public
functions exactly as a user calls them; nothing here changes how a kernel runs.

Timings are the best of a few runs in one process, so that ratios between figures taken in
one call are meaningful on a noisy machine; absolute times depend on the machine and its load.
Peak memory is measured in a fresh interpreter per figure (the process's resident-set high
water mark), so that it covers every allocation: NumPy arrays, Numba's runtime buffers, the
plan, and the Python objects built while planning.

FMA's ``block_size`` and ``rank`` default to the library's (``fmm_attention``'s own
defaults); the performance targets' 32/2 is passed explicitly where it is measured.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import _config

#: Sequence lengths of the scaling target: 16,384 to 1,048,576, doubling.
DEFAULT_SCALING_NS = tuple(2**e for e in range(14, 21))

#: Methods known to :func:`scaling_study`, :func:`peak_memory` and :func:`attention_flops`.
METHODS = ("exact", "fma", "fastformer")


# ---------------------------------------------------------------- inputs and calls
def random_inputs(n, d=64, *, dv=None, heads=None, dtype=np.float32, seed=0):
    """Standard-normal ``q, k, v`` drawn directly in ``dtype`` (no float64 temporaries).

    Parameters
    ----------
    n : int
        Sequence length.
    d : int, optional
        Feature dim of ``q`` and ``k``.
    dv : int, optional
        Feature dim of ``v``; ``d`` by default.
    heads : int, optional
        Leading dim; ``None`` gives arrays of shape ``(n, d)`` (one head).
    dtype : numpy dtype, optional
        ``float32`` or ``float64``.
    seed : int, optional

    Returns
    -------
    q, k, v : ndarray
    """
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    lead = () if heads is None else (heads,)
    dv = d if dv is None else dv
    q = rng.standard_normal(lead + (n, d), dtype=dtype)
    k = rng.standard_normal(lead + (n, d), dtype=dtype)
    v = rng.standard_normal(lead + (n, dv), dtype=dtype)
    return q, k, v


def method_call(method, q, k, v, *, causal=False, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
                query_coarsening=False, backend="cpu", seed=0):
    """A no-argument callable running one public function on ``q, k, v``.

    Parameters
    ----------
    method : {"exact", "fma", "fastformer"}
        :func:`~fmm_attention.exact_attention`, :func:`~fmm_attention.fmm_attention` or
        ``fastformer_attention`` (with random attention vectors ``w_q, w_k`` drawn once).
    q, k, v : ndarray
    causal : bool, optional
    block_size, rank, query_coarsening : optional
        FMA options (ignored by the other methods).
    backend : {"cpu", "cuda", "auto"}, optional
    seed : int, optional
        Seed of Fastformer's attention vectors.

    Returns
    -------
    callable
        ``fn()`` returns the attention output.

    Raises
    ------
    ValueError
        Unknown ``method``.
    NotImplementedError
        ``"fastformer"`` when this build has no ``fastformer_attention``.
    """
    from . import api

    if method == "exact":
        return lambda: api.exact_attention(q, k, v, causal=causal, backend=backend)
    if method == "fma":
        return lambda: api.fmm_attention(q, k, v, causal=causal, block_size=block_size, rank=rank,
                                         query_coarsening=query_coarsening, backend=backend)
    if method == "fastformer":
        fastformer = getattr(api, "fastformer_attention", None)
        if fastformer is None:
            raise NotImplementedError("fastformer_attention is not available in this build")
        rng = np.random.default_rng(seed)
        w_q, w_k = (rng.standard_normal(q.shape[-1]).astype(q.dtype) for _ in range(2))
        return lambda: fastformer(q, k, v, w_q, w_k, causal=causal, backend=backend)
    raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")


#: Clocks of :func:`best_time`: elapsed time, or CPU time of this process (all its threads).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_time(fn, *, repeat=3, min_time=0.0, max_runs=100, clock="wall", max_time=math.inf):
    """Best time (seconds) of ``fn()`` over at least ``repeat`` runs.

    Fast functions run more often: runs continue until ``min_time`` seconds have been spent
    (at most ``max_runs`` runs), which makes the best time robust on a loaded machine. Slow
    ones run less: once ``max_time`` seconds have been spent, no further run starts (there
    is always one).

    Parameters
    ----------
    fn : callable
        Called with no arguments.
    repeat : int, optional
        Minimum number of timed runs, at least 1.
    min_time : float, optional
        Keep running until this many seconds have been spent in total.
    max_runs : int, optional
        Upper bound on the runs that ``min_time`` may ask for.
    clock : {"wall", "cpu"}, optional
        ``"wall"``: elapsed time (what a caller waits). ``"cpu"``: CPU time of this process
        summed over its threads, which other processes on the machine barely disturb: with
        one worker thread (``NUMBA_NUM_THREADS=1``) it is the work a call does.
    max_time : float, optional
        Start no run after this many seconds have been spent (overrides ``repeat``).

    Returns
    -------
    float
    """
    timer = CLOCKS[clock]
    best, spent, runs = math.inf, 0.0, 0
    while runs == 0 or (spent < max_time and (runs < int(repeat) or (spent < min_time and runs < max_runs))):
        t0 = timer()
        fn()
        elapsed = timer() - t0
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


# ---------------------------------------------------------------- FLOP counts
def exact_logits(n, *, causal=False):
    """Number of logits exact attention computes for one head: ``n**2``, or ``n (n + 1) / 2`` causal.

    Parameters
    ----------
    n : int
    causal : bool, optional

    Returns
    -------
    int
    """
    return n * (n + 1) // 2 if causal else n * n


def fma_logits(n, *, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK, causal=False,
               query_coarsening=False):
    """Exact number of logits FMA computes for one head, counted from its tree.

    Fine queries: every query scores the near-field keys of its block (causal: only keys
    ``j <= i``) and every coarse key of its block's far field
    (:attr:`~fmm_attention.FMMTree.key_plan`). Coarse queries: the near field per query
    (:attr:`~fmm_attention.FMMTree.near_plan`), the far field once per box
    (:attr:`~fmm_attention.FMMTree.box_tables`).

    Parameters
    ----------
    n : int
    block_size, rank : int, optional
    causal, query_coarsening : bool, optional

    Returns
    -------
    int

    Examples
    --------
    >>> from fmm_attention._perf import fma_logits
    >>> fma_logits(256, block_size=64, rank=64) == 256 * 256   # rank >= N/4: FMA is exact
    True
    """
    from .tree import COARSE, build_tree

    tree = build_tree(n, block_size=block_size, rank=rank, causal=causal)
    ptr, seg, _ = tree.near_plan if query_coarsening else tree.key_plan
    m = block_size
    blocks = np.repeat(np.arange(tree.n_blocks), np.diff(ptr))
    first = blocks * m  # first query of the segment's block
    rows = np.minimum(n, first + m) - first
    kind, start, count = seg[:, 0], seg[:, 1], seg[:, 2]
    per_row = rows * count
    if causal:
        # query i sees keys start .. min(start + count, i + 1) - 1: sum over the block's rows
        near = kind != COARSE
        i = first[near, None] + np.arange(m)[None, :]
        seen = np.clip(np.minimum(start[near, None] + count[near, None], i + 1) - start[near, None], 0, None)
        seen[i >= np.minimum(n, first[near] + m)[:, None]] = 0
        per_row = per_row.copy()
        per_row[near] = seen.sum(axis=1)
    total = int(per_row.sum())
    if query_coarsening:
        _, inter = tree.box_tables
        ranks = np.concatenate([np.full(level.n_boxes, level.rank) for level in tree.levels])
        total += int(((inter >= 0).sum(axis=1) * ranks).sum())
    return total


def attention_flops(method, n, *, d=64, dv=None, causal=False, block_size=_config.DEFAULT_BLOCK_SIZE,
                    rank=_config.DEFAULT_RANK, query_coarsening=False):
    """Floating-point operations of one head: ``2 d + 2 dv`` per logit (``q.k`` and ``p.v``).

    Parameters
    ----------
    method : {"exact", "fma"}
    n, d : int
    dv : int, optional
        ``d`` by default.
    causal : bool, optional
    block_size, rank, query_coarsening : optional
        FMA options.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        For ``"fastformer"`` (no logits) or an unknown method.
    """
    dv = d if dv is None else dv
    if method == "exact":
        logits = exact_logits(n, causal=causal)
    elif method == "fma":
        logits = fma_logits(n, block_size=block_size, rank=rank, causal=causal, query_coarsening=query_coarsening)
    else:
        raise ValueError(f"FLOPs are counted per logit for 'exact' and 'fma' only; got {method!r}")
    return (2 * d + 2 * dv) * logits


# ---------------------------------------------------------------- scaling
def loglog_slope(ns, times):
    """Least-squares slope of ``log(time)`` against ``log(n)``.

    A slope of 1 is linear scaling, 2 quadratic; ``n log n`` shows as slightly above 1.

    Parameters
    ----------
    ns, times : sequence of float
        At least two points, all positive.

    Returns
    -------
    float
    """
    x = np.log(np.asarray(ns, dtype=np.float64))
    y = np.log(np.asarray(times, dtype=np.float64))
    if x.size < 2 or np.any(~np.isfinite(y)):
        raise ValueError("loglog_slope needs at least two points with positive times")
    return float(np.polyfit(x, y, 1)[0])


class Scaling(NamedTuple):
    """Result of :func:`scaling_study`: unpacks as ``ns, times, slope``."""

    #: Sequence lengths measured.
    ns: tuple
    #: Best time per call (seconds) at each ``n``.
    times: np.ndarray
    #: Fitted log-log slope of ``times`` against ``ns``.
    slope: float


def _clear_plan_caches():
    """Forget every cached tree and plan, so that the next call plans from scratch."""
    from . import tree as tree_module

    for name in ("_build_tree", "_plan"):
        cache_clear = getattr(getattr(tree_module, name, None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


def scaling_study(ns=DEFAULT_SCALING_NS, *, method="fma", query_coarsening=False, causal=False, d=64,
                  dtype=np.float32, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK, repeat=3,
                  min_time=1.0, clock="wall",
                  backend="cpu", include_plan=False, seed=0, progress=None):
    """Time one method over a range of ``n`` and fit the log-log slope.

    One head of standard-normal ``q, k, v`` per ``n``; the JIT is warmed on a small input
    first. Each ``n`` is called once untimed (building and caching its plan), then timed
    at least ``repeat`` times and for at least ``min_time`` seconds; the best time is kept.

    Parameters
    ----------
    ns : sequence of int, optional
        Sequence lengths, 16,384 to 1,048,576 (doubling) by default.
    method : {"fma", "exact", "fastformer"}, optional
    query_coarsening : bool, optional
        FMA's O(n) variant.
    causal : bool, optional
    d : int, optional
        Head dim (``dv = d``).
    dtype : numpy dtype, optional
    block_size, rank : int, optional
        FMA's ``m`` and ``p``.
    repeat : int, optional
        Minimum number of timed runs per ``n``.
    min_time : float, optional
        Seconds of timed runs per ``n`` at least (more runs for small ``n``: on a loaded
        machine a single run is often slowed down by a descheduled worker thread).
    clock : {"wall", "cpu"}, optional
        Elapsed time, or CPU time of the process (see :func:`best_time`); run with
        ``NUMBA_NUM_THREADS=1`` for a slope that the machine's other load barely moves.
    backend : {"cpu", "cuda"}, optional
    include_plan : bool, optional
        Time cold calls instead: the tree and plan caches are cleared before every timed
        run, so the times include planning (``fmm_attention.build_tree``).
    seed : int, optional
    progress : callable, optional
        Called as ``progress(n, seconds)`` after each ``n``.

    Returns
    -------
    Scaling
        ``(ns, times, slope)``.

    Examples
    --------
    >>> from fmm_attention._perf import scaling_study
    >>> ns, times, slope = scaling_study([4096, 8192, 16384], repeat=1)  # doctest: +SKIP
    """
    ns = tuple(int(n) for n in ns)
    options = dict(causal=causal, block_size=block_size, rank=rank, query_coarsening=query_coarsening,
                   backend=backend, seed=seed)
    warm = random_inputs(min(256, min(ns)), d, dtype=dtype, seed=seed)
    method_call(method, *warm, **options)()
    times = []
    for n in ns:
        q, k, v = random_inputs(n, d, dtype=dtype, seed=seed)
        fn = method_call(method, q, k, v, **options)
        fn()
        if include_plan:
            def fn(_call=fn):
                _clear_plan_caches()
                return _call()
        t = best_time(_synchronized(fn, backend), repeat=repeat, min_time=min_time, clock=clock)
        times.append(t)
        if progress is not None:
            progress(n, t)
        del q, k, v, fn
    times = np.array(times)
    return Scaling(ns, times, loglog_slope(ns, times))


def _synchronized(fn, backend):
    if backend != "cuda":
        return fn

    def call():
        from . import cuda

        out = fn()
        cuda.synchronize()
        return out

    return call


def crossover(ns, slow, fast):
    """Smallest ``n`` at which ``fast`` becomes faster than ``slow``, interpolated in log-log.

    Parameters
    ----------
    ns : sequence of int
        Increasing sequence lengths.
    slow, fast : sequence of float
        Times of the two methods at ``ns`` (e.g. exact attention and FMA).

    Returns
    -------
    float or None
        ``ns[0]`` if ``fast`` wins already there, ``None`` if it never wins in range.
    """
    ratio = np.log(np.asarray(slow, dtype=np.float64) / np.asarray(fast, dtype=np.float64))
    x = np.log(np.asarray(ns, dtype=np.float64))
    if ratio[0] >= 0:
        return float(ns[0])
    for i in range(1, len(ns)):
        if ratio[i] >= 0:
            t = -ratio[i - 1] / (ratio[i] - ratio[i - 1])
            return float(np.exp(x[i - 1] + t * (x[i] - x[i - 1])))
    return None


# ---------------------------------------------------------------- memory
class PeakMemory(NamedTuple):
    """Result of :func:`peak_memory` (bytes)."""

    #: Resident set after allocating the inputs and an output-sized array (and the JIT warm-up).
    baseline: int
    #: Resident-set high-water mark once the call has run.
    peak: int
    #: Bytes of ``q``, ``k``, ``v`` and the output together.
    io_bytes: int

    @property
    def extra(self):
        """Peak memory above the baseline (bytes): what the call needs beyond its inputs and output."""
        return self.peak - self.baseline

    @property
    def ratio(self):
        """``extra / io_bytes``: the memory target of issue 6 is at most 2."""
        return self.extra / self.io_bytes


def _max_rss():
    """The process's resident-set high-water mark in bytes."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _peak_memory_here(n, method, d, dtype, causal, block_size, rank, query_coarsening, seed):
    """Child side of :func:`peak_memory` (a fresh interpreter): returns a dict of bytes."""
    options = dict(causal=causal, block_size=block_size, rank=rank, query_coarsening=query_coarsening,
                   backend="cpu", seed=seed)
    method_call(method, *random_inputs(256, d, dtype=dtype, seed=seed), **options)()  # JIT warm-up
    q, k, v = random_inputs(n, d, dtype=dtype, seed=seed)
    reference_out = np.empty_like(v)
    reference_out.fill(0)  # touch every page, as the call will for its output
    baseline = _max_rss()
    del reference_out
    fn = method_call(method, q, k, v, **options)
    out = fn()
    peak = _max_rss()
    io_bytes = q.nbytes + k.nbytes + v.nbytes + out.nbytes
    return {"baseline": baseline, "peak": peak, "io_bytes": io_bytes}


def peak_memory(n, *, method="fma", d=64, dtype=np.float32, query_coarsening=False, causal=False,
                block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK, seed=0, python=None, timeout=None):
    """Peak memory of one call above a baseline of its inputs and output, in a fresh interpreter.

    The child process warms the JIT on a small input, allocates one head of ``q, k, v``
    and an output-sized array (written, so that its pages are resident), records the
    resident-set high-water mark as the baseline, frees the output-sized array and makes the
    call (cold: its plan is built inside the call). The call's own output replaces the
    freed array, so ``peak - baseline`` is the working memory the call needs beyond its
    inputs and output. Linux reads ``VmHWM``; other systems ``ru_maxrss``.

    Parameters
    ----------
    n : int
        Sequence length.
    method : {"fma", "exact", "fastformer"}, optional
    d : int, optional
        Head dim (``dv = d``).
    dtype : numpy dtype, optional
    query_coarsening, causal : bool, optional
    block_size, rank : int, optional
        FMA's ``m`` and ``p``.
    seed : int, optional
    python : str, optional
        Interpreter of the child; ``sys.executable`` by default.
    timeout : float, optional
        Seconds before the child is killed.

    Returns
    -------
    PeakMemory
        ``baseline``, ``peak``, ``io_bytes``; ``extra`` and ``ratio`` as properties.

    Raises
    ------
    RuntimeError
        The child failed (its stderr is in the message).

    Examples
    --------
    >>> from fmm_attention._perf import peak_memory
    >>> mem = peak_memory(1 << 20, query_coarsening=True)  # doctest: +SKIP
    >>> mem.ratio <= 2.0  # doctest: +SKIP
    True
    """
    args = dict(n=int(n), method=method, d=int(d), dtype=np.dtype(dtype).name, causal=bool(causal),
                block_size=int(block_size), rank=int(rank), query_coarsening=bool(query_coarsening), seed=int(seed))
    code = (
        "import json, sys\n"
        "from fmm_attention._perf import _peak_memory_here\n"
        "print(json.dumps(_peak_memory_here(**json.loads(sys.argv[1]))))\n"
    )
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])  # import this very copy of the package
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    proc = subprocess.run([python or sys.executable, "-c", code, json.dumps(args)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"peak_memory child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return PeakMemory(result["baseline"], result["peak"], result["io_bytes"])


# ---------------------------------------------------------------- profile
def profile_phases(n, *, query_coarsening=False, causal=False, d=64, dtype=np.float32,
                   block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK, repeat=3, seed=0):
    """Where one CPU FMA call spends its time: planning, each kernel, and the rest.

    Planning is timed cold (tree and plan caches cleared). The call is then timed
    ``repeat`` times with its plan cached, each compiled kernel of the CPU backend wrapped
    in a timer; the fastest run's breakdown is returned.

    Parameters
    ----------
    n : int
    query_coarsening, causal : bool, optional
    d : int, optional
    dtype : numpy dtype, optional
    block_size, rank : int, optional
    repeat : int, optional
    seed : int, optional

    Returns
    -------
    dict of str to float
        Seconds: ``"plan"`` (``build_tree`` plus its key plan, cold), one entry per kernel
        that ran (``"mean_upward"``, ``"block_attention"``, ...), ``"other"`` (validation,
        allocation, the BLAS thread limit: the call minus its kernels) and ``"total"`` (the
        call with its plan cached).
    """
    from . import cpu
    from .tree import build_tree

    q, k, v = random_inputs(n, d, dtype=dtype, seed=seed)
    options = dict(causal=causal, block_size=block_size, rank=rank, query_coarsening=query_coarsening, backend="cpu")
    method_call("fma", *random_inputs(256, d, dtype=dtype, seed=seed), **options)()
    _clear_plan_caches()
    t0 = time.perf_counter()
    tree = build_tree(n, block_size=block_size, rank=rank, causal=causal)
    if query_coarsening:
        tree.near_plan, tree.box_tables
    else:
        tree.key_plan
    plan = time.perf_counter() - t0
    fn = method_call("fma", q, k, v, **options)
    fn()
    spent = {}
    originals = {name: obj for name, obj in vars(cpu).items() if hasattr(obj, "py_func")}

    def timed(name, kernel):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return kernel(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return run

    best = None
    try:
        for name, kernel in originals.items():
            setattr(cpu, name, timed(name, kernel))
        for _ in range(max(1, int(repeat))):
            spent.clear()
            t0 = time.perf_counter()
            fn()
            total = time.perf_counter() - t0
            if best is None or total < best["total"]:
                best = dict(spent, total=total)
    finally:
        for name, kernel in originals.items():
            setattr(cpu, name, kernel)
    best["other"] = best["total"] - sum(t for key, t in best.items() if key != "total")
    return {"plan": plan, **best}

