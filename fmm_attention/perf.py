"""Measuring helpers: one input generator, one timer, one memory probe, FLOP counts, studies.

These functions back the ``bench`` and ``demo`` commands, the asv suite
(``asv_benchmarks/``) and the figures of :doc:`performance`. They measure the public
functions exactly as a user calls them; nothing here changes how a kernel runs.

* **Inputs**: :func:`random_inputs` is the one generator: the same ``seed`` gives the same
  ``q, k, v`` (and Fastformer vectors, and a cotangent) in every command, benchmark and figure.
* **Time**: :func:`best_time` is the one timer (best of a few runs; CUDA calls are
  synchronized before the clock is read). Ratios between figures taken in one process are
  meaningful on a noisy machine; absolute times depend on the machine and its load.
* **Memory**: :func:`peak_memory` is the one probe: the rise of the process's resident set
  during a call at its peak, which counts every allocation (NumPy arrays, the arrays of
  Numba's runtime, the plan, Python objects, and what ``tracemalloc`` cannot see: memory
  taken outside Python's allocators by BLAS, the threading layer or C's ``malloc``).
  :func:`memory_study` runs it in a fresh interpreter.
* **Progress**: every ``progress=`` option of the package (:func:`scaling_study`,
  :func:`fmm_attention.analysis.compare`, :func:`fmm_attention.accuracy.accuracy_vs_cost`)
  follows one contract: a callable called once after each step with one ``str`` argument
  saying which step ended.

FMA's ``block_size`` and ``rank`` default to the library's (``fmm_attention``'s own
defaults); the performance targets' 32/2 is passed explicitly where it is measured.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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

__all__ = [
    "DEFAULT_SCALING_NS",
    "METHODS",
    "random_inputs",
    "method_call",
    "best_time",
    "matmul_rate",
    "peak_memory",
    "memory_study",
    "PeakMemory",
    "exact_logits",
    "fma_logits",
    "attention_flops",
    "loglog_slope",
    "crossover",
    "scaling_study",
    "Scaling",
    "profile_phases",
    "format_table",
]

#: Sequence lengths of the scaling target: 16,384 to 1,048,576, doubling.
DEFAULT_SCALING_NS = tuple(2**e for e in range(14, 21))

#: Methods known to :func:`method_call`, :func:`scaling_study`, :func:`memory_study` and
#: :func:`attention_flops`.
METHODS = ("exact", "fma", "fastformer")


def _progress(progress):
    """``progress`` checked against the package's one contract; a no-op for ``None``.

    The contract: ``progress`` is ``None`` or a callable taking one ``str``, called once
    after each step of the work with a short description of the step that ended.
    """
    if progress is None:
        return lambda label: None
    if not callable(progress):
        raise TypeError("progress must be None or a callable called as progress(label) after each step, "
                        f"got {type(progress).__name__}")
    return progress


# ---------------------------------------------------------------- inputs and calls
def random_inputs(n, d=64, *, dv=None, heads=None, dtype=np.float32, seed=0, fastformer=False, cotangent=False):
    """Standard-normal ``q, k, v``: the one input generator of the commands, asv and the docs.

    Drawn directly in ``dtype`` (no float64 temporaries), ``q``, ``k`` then ``v`` from
    ``numpy.random.default_rng(seed)``; the same ``seed`` gives the same arrays whatever
    the other options, and ``heads=1`` gives the same numbers as ``heads=None`` with a
    leading dim of 1. Fastformer's vectors and the cotangent come from their own streams
    (seeded ``[seed, 1]`` and ``[seed, 2]``), so asking for them changes no other array.

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
        Seed of the generator.
    fastformer : bool, optional
        Also return Fastformer's attention vectors ``w_q, w_k`` of shape ``(d,)``, drawn
        with standard deviation ``1 / sqrt(d)`` (logits ``q . w`` of unit variance).
    cotangent : bool, optional
        Also return a standard-normal output cotangent ``g`` shaped like ``v`` (for the
        pullbacks of :mod:`fmm_attention.grad`).

    Returns
    -------
    tuple of ndarray
        ``q, k, v``, then ``w_q, w_k`` if ``fastformer``, then ``g`` if ``cotangent``.

    Examples
    --------
    >>> from fmm_attention.perf import random_inputs
    >>> q, k, v = random_inputs(128, 16, heads=2)
    >>> q.shape, q.dtype.name
    ((2, 128, 16), 'float32')
    >>> bool((random_inputs(128, 16)[0] == q[0]).all())    # heads=1 or None: the same numbers
    True
    """
    dtype = np.dtype(dtype)
    lead = () if heads is None else (int(heads),)
    dv = d if dv is None else dv
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(lead + (n, d), dtype=dtype), rng.standard_normal(lead + (n, d), dtype=dtype),
              rng.standard_normal(lead + (n, dv), dtype=dtype)]
    if fastformer:
        w = np.random.default_rng([seed, 1]).standard_normal((2, d), dtype=dtype)
        w *= dtype.type(1.0 / math.sqrt(d))
        arrays += [w[0], w[1]]
    if cotangent:
        arrays.append(np.random.default_rng([seed, 2]).standard_normal(lead + (n, dv), dtype=dtype))
    return tuple(arrays)


def method_call(method, q, k, v, *, causal=False, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
                query_coarsening=False, backend="cpu", seed=0):
    """A no-argument callable running one public function on ``q, k, v``.

    Parameters
    ----------
    method : {"exact", "fma", "fastformer"}
        :func:`~fmm_attention.exact_attention`, :func:`~fmm_attention.fmm_attention` or
        :func:`~fmm_attention.fastformer_attention` (with the attention vectors of
        :func:`random_inputs` for ``seed``).
    q, k, v : array_like
        Inputs (host arrays, or device arrays for ``backend="cuda"``).
    causal : bool, optional
        Causal attention.
    block_size, rank, query_coarsening : optional
        FMA options (ignored by the other methods).
    backend : {"cpu", "cuda", "auto"}, optional
        Where the kernels run.
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
    """
    from . import api

    if method == "exact":
        return lambda: api.exact_attention(q, k, v, causal=causal, backend=backend)
    if method == "fma":
        return lambda: api.fmm_attention(q, k, v, causal=causal, block_size=block_size, rank=rank,
                                         query_coarsening=query_coarsening, backend=backend)
    if method == "fastformer":
        d = q.shape[-1]
        w_q, w_k = random_inputs(1, d, dtype=q.dtype, seed=seed, fastformer=True)[3:5]
        return lambda: api.fastformer_attention(q, k, v, w_q, w_k, causal=causal, backend=backend)
    raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")


#: Clocks of :func:`best_time`: elapsed time, or CPU time of this process (all its threads).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_time(fn, *, repeat=3, min_time=0.0, max_runs=100, clock="wall", max_time=math.inf, backend="cpu"):
    """Best time (seconds) of ``fn()`` over at least ``repeat`` runs: the one timer.

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
    backend : {"cpu", "cuda"}, optional
        ``"cuda"``: wait for the GPU after each call, before the clock is read, so that
        the time covers the kernels and not only their launch.

    Returns
    -------
    float

    Examples
    --------
    >>> from fmm_attention.perf import best_time
    >>> best_time(lambda: sum(range(1000)), repeat=5) > 0
    True
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(map(repr, CLOCKS))}; got {clock!r}")
    timer = CLOCKS[clock]
    fn = _synchronized(fn, backend)
    best, spent, runs = math.inf, 0.0, 0
    while runs == 0 or (spent < max_time and (runs < int(repeat) or (spent < min_time and runs < max_runs))):
        t0 = timer()
        fn()
        elapsed = timer() - t0
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def _synchronized(fn, backend):
    if backend != "cuda":
        return fn

    def call():
        from . import cuda

        out = fn()
        cuda.synchronize()
        return out

    return call


def matmul_rate(n=2048, *, dtype=np.float32, repeat=5, min_time=0.2):
    """NumPy's matrix-product rate (FLOP/s) on an ``n x n`` product: the yardstick of ``bench``.

    Parameters
    ----------
    n : int, optional
        Size of the square matrices.
    dtype : numpy dtype, optional
        ``float32`` (SGEMM) or ``float64`` (DGEMM).
    repeat, min_time : optional
        As :func:`best_time`.

    Returns
    -------
    float
        ``2 n**3`` divided by the best time of ``a @ a``.
    """
    a = random_inputs(n, n, dtype=dtype, seed=1)[0]
    a @ a
    return 2.0 * n**3 / best_time(lambda: a @ a, repeat=repeat, min_time=min_time)


def format_table(rows, headers):
    """Rows of values as an aligned, right-justified text table under ``headers``.

    Parameters
    ----------
    rows : sequence of sequence
        One sequence of values (formatted with ``str``) per row.
    headers : sequence of str
        Column titles.

    Returns
    -------
    str
        The header line, a rule of dashes and one line per row.

    Examples
    --------
    >>> from fmm_attention.perf import format_table
    >>> print(format_table([[1024, "0.5"], [4096, "2.1"]], ["n", "ms"]))
       n   ms
    ----  ---
    1024  0.5
    4096  2.1
    """
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(row):
        return "  ".join(str(x).rjust(w) for x, w in zip(row, widths))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


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
    >>> from fmm_attention.perf import fma_logits
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
        Called as ``progress(label)`` after each ``n`` (the package's one progress
        contract), ``label`` naming the method, ``n`` and its time.

    Returns
    -------
    Scaling
        ``(ns, times, slope)``.

    Examples
    --------
    >>> from fmm_attention.perf import scaling_study
    >>> ns, times, slope = scaling_study([4096, 8192, 16384], repeat=1)  # doctest: +SKIP
    """
    ns = tuple(int(n) for n in ns)
    progress = _progress(progress)
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
        t = best_time(fn, repeat=repeat, min_time=min_time, clock=clock, backend=backend)
        times.append(t)
        progress(f"{method} n={n}: {t * 1e3:.1f} ms")
        del q, k, v, fn
    times = np.array(times)
    return Scaling(ns, times, loglog_slope(ns, times))


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
def _status_bytes(field):
    """A ``kB`` field of ``/proc/self/status`` in bytes (``VmRSS``, ``VmHWM``), or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_high_water():
    """Reset the resident-set high-water mark to the current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _lifetime_max_rss():
    """The process's lifetime resident-set high-water mark in bytes (``getrusage``)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _release_free_heap():
    """Give freed heap memory back to the system (glibc ``malloc_trim``), so that a call
    reusing what earlier work freed has to fault it in again and is counted."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass


def peak_memory(fn):
    """Peak memory of ``fn()`` in bytes: how far the resident set rose above its start.

    The one memory probe of the package. It reads the operating system's account of the
    process's resident memory, so it counts every allocation the call touches: NumPy
    arrays, the arrays Numba's runtime allocates inside compiled kernels, the plan, Python
    objects, and memory taken outside Python's allocators (BLAS workspaces, the threading
    layer, C's ``malloc``), which ``tracemalloc`` does not see. Before the call the garbage
    collector runs, freed heap memory is returned to the system (glibc) and the
    high-water mark is reset to the current resident set; the result is the high-water
    mark after the call minus the resident set before it. Pages allocated but never
    written are not resident and not counted; the call's output is counted (it was
    allocated during the call).

    On Linux the high-water mark is reset through ``/proc/self/clear_refs``. Elsewhere it
    cannot be reset, and the figure is the growth of the process's lifetime high-water
    mark: exact in a fresh process (as :func:`memory_study` runs it), a lower bound after
    larger earlier work.

    Parameters
    ----------
    fn : callable
        Called once with no arguments.

    Returns
    -------
    int
        Bytes, at least 0.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention.perf import peak_memory
    >>> round(peak_memory(lambda: np.ones(2**22)) / 2**20)   # MiB: 2**22 float64 written
    32
    """
    gc.collect()
    _release_free_heap()
    if _reset_high_water():
        start = _status_bytes("VmRSS")
        fn()
        peak = _status_bytes("VmHWM")
    else:
        start = _lifetime_max_rss()
        fn()
        peak = _lifetime_max_rss()
    return max(0, peak - start)


class PeakMemory(NamedTuple):
    """Result of :func:`memory_study` (bytes)."""

    #: :func:`peak_memory` of the call: the resident set's rise while it ran, its output included.
    peak: int
    #: Bytes of the call's output (and ``lse`` where the method returns one).
    out_bytes: int
    #: Bytes of ``q``, ``k``, ``v`` and the output together.
    io_bytes: int

    @property
    def extra(self):
        """Working memory of the call beyond its inputs and output (bytes)."""
        return self.peak - self.out_bytes

    @property
    def ratio(self):
        """``extra / io_bytes``: the memory target of the performance page is at most 2."""
        return self.extra / self.io_bytes


def _memory_study_here(n, method, d, dtype, causal, block_size, rank, query_coarsening, seed):
    """Child side of :func:`memory_study` (a fresh interpreter): returns a dict of bytes."""
    options = dict(causal=causal, block_size=block_size, rank=rank, query_coarsening=query_coarsening,
                   backend="cpu", seed=seed)
    method_call(method, *random_inputs(256, d, dtype=dtype, seed=seed), **options)()  # JIT warm-up
    q, k, v = random_inputs(n, d, dtype=dtype, seed=seed)
    fn = method_call(method, q, k, v, **options)
    result = {}
    peak = peak_memory(lambda: result.setdefault("out", fn()))  # cold: the plan is built inside
    out = result["out"]
    out_bytes = sum(x.nbytes for x in out) if isinstance(out, tuple) else out.nbytes
    return {"peak": peak, "out_bytes": out_bytes, "io_bytes": q.nbytes + k.nbytes + v.nbytes + out_bytes}


def memory_study(n, *, method="fma", d=64, dtype=np.float32, query_coarsening=False, causal=False,
                 block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK, seed=0, python=None,
                 timeout=None):
    """:func:`peak_memory` of one cold call of one head, measured in a fresh interpreter.

    The child process warms the JIT on a small input, draws one head of ``q, k, v`` with
    :func:`random_inputs` and measures the call with :func:`peak_memory` (cold: its plan is
    built inside the call). A fresh process keeps memory freed by earlier work out of
    the figure.

    Parameters
    ----------
    n : int
        Sequence length.
    method : {"fma", "exact", "fastformer"}, optional
        The public function measured.
    d : int, optional
        Head dim (``dv = d``).
    dtype : numpy dtype, optional
        Dtype of the inputs.
    query_coarsening, causal : bool, optional
        FMA's O(n) variant; causal attention.
    block_size, rank : int, optional
        FMA's ``m`` and ``p``.
    seed : int, optional
        Seed of :func:`random_inputs`.
    python : str, optional
        Interpreter of the child; ``sys.executable`` by default.
    timeout : float, optional
        Seconds before the child is killed.

    Returns
    -------
    PeakMemory
        ``peak``, ``out_bytes``, ``io_bytes``; ``extra`` and ``ratio`` as properties.

    Raises
    ------
    RuntimeError
        The child failed (its stderr is in the message).

    Examples
    --------
    >>> from fmm_attention.perf import memory_study
    >>> mem = memory_study(1 << 20, query_coarsening=True)  # doctest: +SKIP
    >>> mem.ratio <= 2.0  # doctest: +SKIP
    True
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    args = dict(n=int(n), method=method, d=int(d), dtype=np.dtype(dtype).name, causal=bool(causal),
                block_size=int(block_size), rank=int(rank), query_coarsening=bool(query_coarsening), seed=int(seed))
    code = (
        "import json, sys\n"
        "from fmm_attention.perf import _memory_study_here\n"
        "print(json.dumps(_memory_study_here(**json.loads(sys.argv[1]))))\n"
    )
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])  # import this very copy of the package
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    proc = subprocess.run([python or sys.executable, "-c", code, json.dumps(args)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory_study child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return PeakMemory(result["peak"], result["out_bytes"], result["io_bytes"])


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
    # the plans are cached properties: reading them builds them, inside the timed span
    _ = (tree.near_plan, tree.box_tables) if query_coarsening else tree.key_plan
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

