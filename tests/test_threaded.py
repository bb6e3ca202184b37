"""Serial kernels on Python threads (cpu/_launch.Threaded): FMA's block kernel and mean upward pass.

They replaced ``prange`` loops whose parfor lowering was two thirds of a cold first call.
What the parallel loops guaranteed must hold: the result does not depend on the thread
count or on whether a call is split, ``numba.set_num_threads`` is honoured, an error in any
range reaches the caller, the outputs are complete before the call returns (also when it is
interrupted), and a forked child runs them.
"""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numba
import numpy as np
import pytest

import fmm_attention
from fmm_attention import _config, fmm_attention as fma
from fmm_attention.cpu import _launch

ROOT = Path(fmm_attention.__file__).resolve().parents[1]


def run_script(code, *, env=None, timeout=600):
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=timeout)


class Recorder:
    """A plain-Python kernel: records each range and the thread that ran it."""

    def __init__(self, fail_from=None, sleep=0.0):
        self.calls = []
        self.fail_from = fail_from
        self.sleep = sleep
        self.lock = threading.Lock()

    def __call__(self, lo, hi, out):
        time.sleep(self.sleep if lo > 0 else 0.0)
        with self.lock:
            self.calls.append((lo, hi, threading.get_ident()))
        if self.fail_from is not None and lo >= self.fail_from:
            raise ValueError(f"range {lo}..{hi} failed")
        out[lo:hi] += 1


def threaded(kernel):
    return _launch.Threaded(kernel, lambda out: (out.size, 10**9))


@pytest.fixture
def two_threads():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two Numba threads")
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    yield
    numba.set_num_threads(before)


def test_jobs_split_in_contiguous_ranges_one_per_thread(two_threads):
    kernel = Recorder()
    out = np.zeros(11, dtype=np.int64)
    threaded(kernel)(out)
    assert sorted(c[:2] for c in kernel.calls) == [(0, 5), (5, 11)]
    assert len({c[2] for c in kernel.calls}) == 2  # the second range ran on another thread
    assert (out == 1).all()  # every job once


def test_set_num_threads_is_honoured(two_threads):
    kernel = Recorder()
    numba.set_num_threads(1)
    threaded(kernel)(np.zeros(8, dtype=np.int64))
    assert [c[:2] for c in kernel.calls] == [(0, 8)]
    assert kernel.calls[0][2] == threading.get_ident()


def test_small_work_runs_in_the_calling_thread(two_threads, monkeypatch):
    kernel = Recorder()
    monkeypatch.setattr(_config, "THREADED_MIN_WORK", 10**10)  # read at call time
    threaded(kernel)(np.zeros(8, dtype=np.int64))
    assert [c[:2] for c in kernel.calls] == [(0, 8)]


def test_an_error_in_a_worker_range_reaches_the_caller(two_threads):
    kernel = Recorder(fail_from=1)
    with pytest.raises(ValueError, match="range 4..8 failed"):
        threaded(kernel)(np.zeros(8, dtype=np.int64))
    out = np.zeros(8, dtype=np.int64)  # the worker survived: the next call works
    threaded(Recorder())(out)
    assert (out == 1).all()


def test_interrupt_waits_for_the_other_ranges(two_threads):
    """A KeyboardInterrupt in the caller's range is raised only once the workers are done
    writing (else they would still write into outputs the caller may reuse)."""
    worker = Recorder(sleep=0.3)

    def kernel(lo, hi, out):
        if lo == 0:
            raise KeyboardInterrupt
        worker(lo, hi, out)

    out = np.zeros(8, dtype=np.int64)
    with pytest.raises(KeyboardInterrupt):
        _launch.Threaded(kernel, lambda out: (out.size, 10**9))(out)
    assert [c[:2] for c in worker.calls] == [(4, 8)] and (out[4:] == 1).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["plain", "mask-causal", "coarse-queries", "grouped"])
def test_fma_bits_do_not_depend_on_threads_or_splitting(dtype, case, two_threads, monkeypatch):
    rng = np.random.default_rng(3)
    n = 300
    q, k, v = (rng.standard_normal((3, n, 8)).astype(dtype) for _ in range(3))
    options = dict(block_size=16, rank=2, return_lse=True)
    if case == "mask-causal":
        options.update(causal=True, key_padding_mask=rng.random((3, n)) > 0.3)
    elif case == "coarse-queries":
        options.update(query_coarsening=True)
    elif case == "grouped":
        q = rng.standard_normal((3, 2, n, 8)).astype(dtype)  # two query heads per key head
        k, v = k[:, None], v[:, None]
    results = []
    for threads, min_work in ((1, 0), (2, 0), (2, 10**15)):
        numba.set_num_threads(threads)
        monkeypatch.setattr(_config, "THREADED_MIN_WORK", min_work)
        results.append(fma(q, k, v, **options))
    for out, lse in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(lse, results[0][1])


@pytest.mark.parametrize("case", ["plain", "mask-causal-globals", "grouped"])
def test_fma_gradients_do_not_depend_on_threads_or_splitting(case, two_threads, monkeypatch):
    """The backward's kernels (delta, block kernel, reduction of the partials, mean
    downward pass) run on the same threads: its gradients are bitwise the same for one
    thread, two threads and an unsplit call (float32: rounding would show)."""
    from fmm_attention.grad import fmm_attention_vjp

    rng = np.random.default_rng(4)
    n = 150
    q, k, v = (rng.standard_normal((3, n, 8)).astype(np.float32) for _ in range(3))
    options = dict(block_size=8, rank=2)
    if case == "mask-causal-globals":
        options.update(causal=True, key_padding_mask=rng.random((3, n)) > 0.3, global_tokens=(5, 90))
    elif case == "grouped":
        q = rng.standard_normal((3, 2, n, 8)).astype(np.float32)
        k, v = k[:, None], v[:, None]
    out, pullback = fmm_attention_vjp(q, k, v, **options)
    g = rng.standard_normal(out.shape).astype(np.float32)
    results = []
    for threads, min_work in ((1, 0), (2, 0), (2, 10**15)):
        numba.set_num_threads(threads)
        monkeypatch.setattr(_config, "THREADED_MIN_WORK", min_work)
        results.append(pullback(g))
    for grads in results[1:]:
        for a, b in zip(grads[:3], results[0][:3]):
            np.testing.assert_array_equal(a, b)


def test_forked_child_starts_its_own_workers():
    """The parent's worker threads do not exist in a forked child: it starts new ones."""
    proc = run_script("""
        import multiprocessing as mp
        import numpy as np
        from fmm_attention import _config, fmm_attention
        from fmm_attention.cpu import _launch

        _config.THREADED_MIN_WORK = 0  # every launch uses the worker threads
        q, k, v = np.random.default_rng(0).standard_normal((3, 2, 300, 8))

        def work(_):
            return fmm_attention(q, k, v, block_size=8, rank=2)

        if __name__ == "__main__":
            serial = work(0)
            assert _launch._team, "the parent started no worker"
            with mp.get_context("fork").Pool(2) as pool:
                got = pool.map_async(work, range(2)).get(timeout=300)
            for x in got:
                np.testing.assert_array_equal(x, serial)
            print("forked results match")
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "forked results match" in proc.stdout


COLD_CALL = """
    import json, os, tempfile
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp()
    import numpy as np
    from numba.core import event
    import fmm_attention

    compiled = []

    class Listener(event.Listener):
        def on_start(self, ev):
            compiled.append([ev.data["dispatcher"].py_func.__qualname__, str(ev.data["args"])])

        def on_end(self, ev):
            pass

    event.register("numba:compile", Listener())
    q = np.random.default_rng(0).standard_normal((1, 256, 16)).astype(np.float32)
    fmm_attention.fmm_attention(q, q, q)
    from fmm_attention.cpu import blocks, upward
    parallel = [d.py_func.__name__ for d in (blocks._block_jobs, upward._mean_levels)
                if d.targetoptions.get("parallel")]
    print(json.dumps({"compiled": compiled, "parallel": parallel}))
"""


@pytest.mark.slow
def test_cold_first_fma_call_compiles_each_kernel_once():
    """In a fresh process with an empty cache: no parfor in the FMA path's two big kernels,
    one variant of the softmax helper (type inference had also compiled it for a literal
    key count), and no string formatting (row assignments compile a shape-mismatch error
    whose message Numba builds with its string routines)."""
    proc = run_script(COLD_CALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["parallel"] == []
    names = [name for name, _ in report["compiled"]]
    assert names.count("softmax_columns") == 1, [c for c in report["compiled"] if c[0] == "softmax_columns"]
    assert not [name for name in names if "raise_with_shape" in name or "str" in name or "unicode" in name], names
