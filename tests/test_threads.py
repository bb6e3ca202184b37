"""Several Python threads calling the kernels at once give the serial results.

Numba's OpenMP and TBB threading layers accept parallel launches from several threads; the
fallback ``workqueue`` layer would abort, and the CPU backend serialises launches then. Either
way the results must not depend on the concurrency.
"""

import threading

import numpy as np
import pytest

from fmm_attention import LearnedCoarsening, build_tree, exact_attention, fmm_attention

N_THREADS = 4


def jobs():
    """Eight different calls (dtypes, masks, causal, coarse queries, learned weights)."""
    out = []
    for i in range(8):
        rng = np.random.default_rng(i)
        n = 300 + 37 * i
        dtype = np.float32 if i % 2 else np.float64
        q, k, v = (rng.standard_normal((2, n, 8)).astype(dtype) for _ in range(3))
        mask = rng.random((2, n)) > 0.2 if i % 3 == 0 else None
        if i == 6:
            out.append((exact_attention, (q, k, v), dict(causal=True, key_padding_mask=mask, return_lse=True)))
        elif i == 7:
            tree = build_tree(n, block_size=16, rank=2)
            kw = [rng.standard_normal((lv.rank * 8, 1, lv.box_size)) / lv.box_size for lv in tree.levels]
            out.append((fmm_attention, (q, k, v), dict(block_size=16, rank=2,
                                                       coarsening=LearnedCoarsening(kw, kw))))
        else:
            out.append((fmm_attention, (q, k, v), dict(block_size=8 * (1 + i % 2), rank=2 ** (i % 3),
                                                       causal=i % 4 == 1, query_coarsening=i % 4 == 2,
                                                       key_padding_mask=mask, return_lse=True)))
    return out


def as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("rounds", [3])
def test_concurrent_calls_match_serial(rounds):
    work = jobs()
    serial = [as_tuple(f(*args, **kwargs)) for f, args, kwargs in work]  # also compiles everything
    results = {}
    errors = []
    barrier = threading.Barrier(N_THREADS)

    def worker(tid):
        try:
            for r in range(rounds):
                barrier.wait()  # start every round together
                for j in range(tid, tid + len(work)):  # each thread walks all jobs, staggered
                    j %= len(work)
                    f, args, kwargs = work[j]
                    results[tid, r, j] = as_tuple(f(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    assert len(results) == N_THREADS * rounds * len(work)
    for (tid, r, j), got in results.items():
        for a, b in zip(got, serial[j]):
            np.testing.assert_array_equal(a, b, err_msg=f"thread {tid} round {r} job {j}")


def test_concurrent_calls_with_distinct_inputs_do_not_mix():
    """Threads on different inputs of the same shape: each gets its own answer."""
    rng = np.random.default_rng(42)
    inputs = [tuple(rng.standard_normal((3, 256, 8)) for _ in range(3)) for _ in range(N_THREADS)]
    serial = [fmm_attention(*x, block_size=8, rank=2) for x in inputs]
    got = [None] * N_THREADS
    barrier = threading.Barrier(N_THREADS)

    def worker(i):
        barrier.wait()
        for _ in range(5):
            got[i] = fmm_attention(*inputs[i], block_size=8, rank=2)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i in range(N_THREADS):
        np.testing.assert_array_equal(got[i], serial[i])


def test_compare_from_threads_under_workqueue():
    """analysis.compare from 4 threads under the workqueue layer (which aborts the process on
    concurrent launches): every parallel kernel it runs goes through the launch guard.
    """
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    import fmm_attention

    code = """
        import threading
        import numpy as np, numba
        from fmm_attention.analysis import compare

        q, k, v = np.random.default_rng(0).standard_normal((3, 2, 128, 8))
        serial = compare(q, k, v, block_size=8, rank=2).summary()
        assert numba.threading_layer() == "workqueue"
        got, barrier = [], threading.Barrier(4)

        def worker():
            barrier.wait()
            for _ in range(3):
                got.append(compare(q, k, v, block_size=8, rank=2).summary())

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 12 and all(repr(g) == repr(serial) for g in got)  # repr: NaN == NaN
        print("ok")
    """
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(fmm_attention.__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-3000:])


# ----------------------------------------------------------- exact attention's work split
def test_causal_exact_jobs_split_the_triangle_evenly():
    """Issue 18: every prefix of the causal job order holds its share of the work.

    Each prange thread runs one contiguous run of jobs; in query-tile order the first half
    of the jobs held a quarter of the work, and two threads sped causal attention up 1.34x.
    """
    from fmm_attention.cpu import exact as cpu_exact

    for n in (64 * 7, 4096, 16384 + 17):
        q = np.zeros((1, n, 64), np.float32)
        ids, no = np.zeros(1, np.int64), np.zeros(1)
        # self-attention (offset 0), causal, no window (left/right beyond any distance), no mask or bias
        (query_tile, *_), n_jobs, total_work, cumulative_work = cpu_exact._layout(
            q, q, q, ids, ids, None, False, no, ids, 0, 0, False, no, ids, 0, 0, False, 1.0, True, 0, n, n)
        cumulative = cumulative_work()
        n_tiles = -(-n // query_tile)
        assert n_jobs == n_tiles and np.isclose(total_work, cumulative[-1])
        order = cpu_exact._tile_order(n_tiles)
        assert sorted(order) == list(range(n_tiles))  # every tile exactly once
        assert [cpu_exact._tile_of(s, n_tiles) for s in range(n_tiles)] == list(order)  # compiled == NumPy
        total, tile_cost = cumulative[-1], cumulative[-1] / n_tiles * 2  # the largest tile's cost
        for parts in (2, 4):
            for p in range(1, parts):
                share = cumulative[round(p * n_tiles / parts)]
                assert abs(share - p * total / parts) <= tile_cost, (n, parts, p, share / total)


@pytest.mark.parametrize("causal", [True, False])
def test_exact_results_do_not_depend_on_threads_or_launch_chunks(causal, monkeypatch):
    """The job order and the launch chunks change no bit of the result, at any thread count."""
    import numba

    from fmm_attention import _config

    rng = np.random.default_rng(5)
    for n in (1, 63, 64 * 5 + 3, 1100):
        q, k, v = (rng.standard_normal((2, n, 8)).astype(np.float32) for _ in range(3))
        mask = rng.random((2, n)) > 0.3
        want = exact_attention(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True)
        before = numba.get_num_threads()
        try:
            for threads in range(1, before + 1):
                numba.set_num_threads(threads)
                for seconds in (_config.INTERRUPT_SECONDS, 0.0):  # 0: one launch per thread's job
                    monkeypatch.setattr(_config, "INTERRUPT_SECONDS", seconds)
                    got = exact_attention(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True)
                    for a, b in zip(got, want):
                        np.testing.assert_array_equal(a, b, err_msg=f"n={n} threads={threads} s={seconds}")
        finally:
            numba.set_num_threads(before)


@pytest.mark.parametrize("group", [1, 2, 3])
def test_chunked_launch_boundaries_hold_whole_groups(group, monkeypatch):
    """Chunk boundaries fall on multiples of group * threads jobs (the last on the last job).

    Each thread's static share of a chunk then holds whole groups.
    """
    import numba

    from fmm_attention import _config
    from fmm_attention.cpu._launch import Chunked

    monkeypatch.setattr(_config, "INTERRUPT_SECONDS", 0.0)  # the shortest chunks allowed
    launches = []
    chunked = Chunked(lambda lo, hi, *args: launches.append((lo, hi)), lambda n_jobs: ((), n_jobs, float(n_jobs), lambda: np.arange(n_jobs + 1.0)),
                      group=group)
    step = group * numba.get_num_threads()
    for n_jobs in (1, step, 5 * step + 1, 37):
        launches.clear()
        chunked(n_jobs)
        assert [lo for lo, _ in launches] == [0] + [hi for _, hi in launches[:-1]]  # contiguous
        assert launches[-1][1] == n_jobs
        assert all(hi % step == 0 for _, hi in launches[:-1]) and all(hi > lo for lo, hi in launches)
