"""The launch layer (cpu/_launch.py): knobs read at call time, chunked launches, Ctrl-C, fork.

The process-level behaviours (threading layer, fork, signals) run in a subprocess each, with
a timeout, so that a hang or an abort fails the test instead of the test run.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import fmm_attention
import reference
from fmm_attention import _config, exact_attention
from fmm_attention.cpu import exact as cpu_exact

ROOT = Path(fmm_attention.__file__).resolve().parents[1]


def run_script(code, *, env=None, timeout=240):
    """Run ``code`` in a fresh interpreter importing this checkout; return the process."""
    full_env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=timeout)


class Spy:
    """Records the arguments of each launch of a :class:`Chunked` kernel, then launches it."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args[:4])  # job_lo, job_hi and the two tile sizes
        return self.kernel(*args)

    @property
    def signatures(self):
        return self.kernel.signatures


@pytest.fixture
def exact_spy(monkeypatch):
    spy = Spy(cpu_exact.exact_kernel.kernel)
    monkeypatch.setattr(cpu_exact.exact_kernel, "kernel", spy)
    return spy


def test_changed_exact_tiles_take_effect(monkeypatch, exact_spy):
    """Tile sizes edited in _config reach the (disk-cached) kernel at the next call."""
    q, k, v = np.random.default_rng(0).standard_normal((3, 2, 100, 8))
    monkeypatch.setattr(_config, "EXACT_QUERY_TILE", 16)
    monkeypatch.setattr(_config, "EXACT_KEY_TILE", 32)
    out = exact_attention(q, k, v, causal=True)
    assert {c[2:] for c in exact_spy.calls} == {(16, 32)}
    assert exact_spy.calls[0][0] == 0 and exact_spy.calls[-1][1] == 2 * 7  # ceil(100 / 16) tiles per entry
    for b in range(2):
        np.testing.assert_allclose(out[b], reference.exact_reference(q[b], k[b], v[b], causal=True)[0],
                                   rtol=1e-11, atol=1e-12)
    monkeypatch.setattr(_config, "EXACT_QUERY_TILE", 64)
    exact_attention(q, k, v)
    assert exact_spy.calls[-1][1:] == (2 * 2, 64, 32)


def test_chunked_launches_give_the_single_launch_result(monkeypatch, exact_spy):
    """Many short launches (a zero time target) and one launch: the same bits."""
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((3, 3, 300, 8)).astype(np.float32)
    mask = rng.random((3, 300)) > 0.2
    monkeypatch.setattr(_config, "INTERRUPT_SECONDS", 1e9)
    one = exact_attention(q, k, v, key_padding_mask=mask, return_lse=True)
    assert len(exact_spy.calls) == 1
    exact_spy.calls.clear()
    monkeypatch.setattr(_config, "INTERRUPT_SECONDS", 0.0)
    many = exact_attention(q, k, v, key_padding_mask=mask, return_lse=True)
    ranges = [c[:2] for c in exact_spy.calls]
    assert len(ranges) > 1 and ranges[0][0] == 0 and ranges[-1][1] == 3 * 5
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # consecutive, every job once
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


def test_default_threading_layer_is_fork_safe():
    proc = run_script("""
        import numpy as np, numba
        from fmm_attention import exact_attention
        exact_attention(*np.ones((3, 4, 2)))
        print(numba.threading_layer())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] in ("workqueue", "tbb")


#: First calls that ask Numba for its thread count before any kernel launches (memory
#: estimates, work splits): each must still get the configured layer, not Numba's default.
FIRST_CALLS = {
    "fmm vjp": "from fmm_attention import fmm_attention_vjp as f; f(*np.ones((3, 64, 2)), block_size=16, rank=2)",
    "exact vjp": "from fmm_attention import exact_attention_vjp as f; f(*np.ones((3, 8, 2)))",
    "memory estimate": "from fmm_attention.tree import build_tree, fmm_call_bytes; "
                       "fmm_call_bytes(build_tree(64, block_size=16, rank=2), batch=1, d=2, dv=2, itemsize=8)",
    "thread count": "numba.get_num_threads()",
}


@pytest.mark.parametrize("first_call", FIRST_CALLS.values(), ids=FIRST_CALLS.keys())
def test_threading_layer_is_fork_safe_whatever_runs_first(first_call):
    proc = run_script(f"""
        import numpy as np, numba
        import fmm_attention
        {first_call}
        print(numba.threading_layer())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] in ("workqueue", "tbb")


def test_users_threading_layer_is_kept():
    proc = run_script("""
        import numpy as np, numba
        from fmm_attention import exact_attention
        exact_attention(*np.ones((3, 4, 2)))
        print(numba.threading_layer())
    """, env={"NUMBA_THREADING_LAYER": "omp"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "omp"


FORK_SCRIPT = """
    import multiprocessing as mp, sys
    import numpy as np
    from fmm_attention import exact_attention, fmm_attention

    def work(seed):
        q, k, v = np.random.default_rng(seed).standard_normal((3, 2, 200, 8))
        return exact_attention(q, k, v), fmm_attention(q, k, v, block_size=8, rank=2)

    if __name__ == "__main__":
        serial = [work(s) for s in range(4)]  # the parallel kernels run before the fork
        with mp.get_context("fork").Pool(2) as pool:
            try:
                got = pool.map_async(work, range(4)).get(timeout=120)
            except Exception as exc:
                print(type(exc).__name__, exc)
                sys.exit(3)
        for a, b in zip(got, serial):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
        print("forked results match")
"""


def test_fork_pool_after_parallel_kernels():
    """Multiprocessing's default start method (fork) after the library ran: it works."""
    proc = run_script(FORK_SCRIPT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "forked results match" in proc.stdout


def test_fork_after_gnu_openmp_fails_with_the_remedy():
    """With the OpenMP layer chosen by the user, a forked worker raises a clear error (no hang)."""
    from numba.np.ufunc import omppool

    if omppool.openmp_vendor != "GNU":
        pytest.skip("only GNU OpenMP is unsafe after fork")
    proc = run_script(FORK_SCRIPT, env={"NUMBA_THREADING_LAYER": "omp"})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "RuntimeError" in proc.stdout and "spawn" in proc.stdout and "forked after GNU" in proc.stdout


def test_ctrl_c_interrupts_a_long_exact_call():
    """SIGINT during a call of many seconds raises KeyboardInterrupt within a few seconds."""
    code = """
        import signal, sys, time
        import numpy as np
        from fmm_attention import exact_attention
        # Python's own Ctrl-C handler, even when started from a shell's background job
        # (which starts its children with SIGINT ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        q = np.random.default_rng(0).standard_normal((32, 8192, 64)).astype(np.float32)
        exact_attention(q[:1, :256], q[:1, :256], q[:1, :256])  # compile (or load) first
        print("start", flush=True)
        t = time.perf_counter()
        try:
            exact_attention(q, q, q)  # about 3e11 multiply-adds: tens of seconds on 2 cores
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(0)
        print("finished after", time.perf_counter() - t, flush=True)
        sys.exit(1)
    """
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "start", proc.stderr.read()
        time.sleep(0.5)
        sent = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        waited = time.perf_counter() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0 and "interrupted" in out, out + err
    assert waited < 5.0, f"KeyboardInterrupt took {waited:.1f} s"
