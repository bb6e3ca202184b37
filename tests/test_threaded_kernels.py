"""Fastformer's kernels and exact attention's kernels as serial kernels on threads.

They were ``prange`` loops; now they are ``nogil`` kernels over a range of jobs run by
``cpu/_launch.Threaded`` (as FMA's block kernels: tests/test_threaded.py). What must hold:
the jobs are independent (each writes only its own entries), so the results are the same
bit for bit for one thread, two threads, an unsplit call and any order of the jobs.
"""

import numba
import numpy as np
import pytest

from fmm_attention import (LearnedCoarsening, _config, exact_attention, exact_attention_vjp, fastformer_attention,
                           fastformer_attention_vjp, fmm_attention, fmm_attention_vjp)
from fmm_attention.cpu import _launch, backward, backward_fastformer, backward_ops, coarse, exact, fastformer, upward
from fmm_attention.tree import build_tree

#: (module, name) of every converted kernel (a ``Threaded``).
KERNELS = [(fastformer, name) for name in ("chunk_partials", "modulate", "causal_queries", "causal_keys")] + [
    (backward_fastformer, "causal_backward")] + [
    (backward_ops, name) for name in ("exact_backward_prepare", "exact_backward_tiles", "exact_backward_reduce")] + [
    (coarse, "learned_upward_level"), (coarse, "box_counts_bias")] + [
    (backward_ops, name) for name in ("cluster_downward", "learned_downward_level", "learned_weight_grad")]
#: The exact forward's kernels (one per product path), dispatchers that ``exact_kernel``
#: splits over the threads at each launch.
EXACT_FORWARD = ("exact_tiles", "exact_tiles_blas")


@pytest.fixture
def small_jobs(monkeypatch):
    # many Fastformer chunks, a 4 x 4 grid of exact attention's backward and many query and
    # key tiles of its forward at small n
    monkeypatch.setattr(_config, "FASTFORMER_CHUNK", 64)
    monkeypatch.setattr(_config, "BACKWARD_MIN_SPAN", 64)
    monkeypatch.setattr(_config, "EXACT_QUERY_TILE", 16)
    monkeypatch.setattr(_config, "EXACT_KEY_TILE", 48)


@pytest.fixture
def two_threads():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two Numba threads")
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


def one_job_at_a_time_backwards(kernel):
    """A kernel that runs its jobs singly, last to first (independent jobs: same result)."""

    def run(job_lo, job_hi, *args):
        for job in range(job_hi - 1, job_lo - 1, -1):
            kernel(job, job + 1, *args)

    return run


def test_every_converted_kernel_is_threaded():
    for module, name in KERNELS:
        kernel = getattr(module, name)
        assert isinstance(kernel, _launch.Threaded), name
        assert kernel.kernel.targetoptions.get("nogil") and not kernel.kernel.targetoptions.get("parallel"), name
    assert backward.exact_backward_tiles is backward_ops.exact_backward_tiles
    assert backward.learned_weight_grad is backward_ops.learned_weight_grad
    assert upward.learned_upward_level is coarse.learned_upward_level
    for name in EXACT_FORWARD:
        kernel = getattr(exact, name)
        assert kernel.targetoptions.get("nogil") and not kernel.targetoptions.get("parallel"), name


def calls(dtype, n, heads, causal, masked):
    rng = np.random.default_rng(7)
    q, k, v, g = (rng.standard_normal((heads, n, 8)).astype(dtype) for _ in range(4))
    w_q, w_k = rng.standard_normal((2, 8)).astype(dtype)
    mask = rng.random((heads, n)) > 0.3 if masked else None
    if masked:
        mask[0, : n // 2] = False  # a long masked stretch: empty chunks, rows without a valid key
    yield "fastformer", lambda: fastformer_attention(q, k, v, w_q, w_k, causal=causal, key_padding_mask=mask,
                                                     return_pools=True)
    if causal:  # the bidirectional backward is NumPy reductions
        yield "fastformer vjp", lambda: fastformer_attention_vjp(q, k, v, w_q, w_k, causal=causal,
                                                                 key_padding_mask=mask)[1](g)
    # learned coarsening (its upward pass, box counts, downward pass and weight gradients)
    # and cluster coarsening (its downward pass), forward and pullback
    m = 16
    tree = build_tree(n, block_size=m, rank=2, causal=causal)
    weights = [[(rng.standard_normal((lv.rank * 8, 1, lv.box_size)) / lv.box_size).astype(dtype) for lv in tree.levels]
               for _ in range(2)]
    biases = [[(0.1 * rng.standard_normal(lv.rank * 8)).astype(dtype) for lv in tree.levels] for _ in range(2)]
    for name, coarsening in (("learned", LearnedCoarsening(*weights, *biases)), ("cluster", "cluster")):
        options = dict(causal=causal, block_size=m, rank=2, key_padding_mask=mask, coarsening=coarsening)
        yield f"fma {name}", lambda options=options: fmm_attention(q, k, v, **options)
        yield f"fma {name} vjp", lambda options=options: fmm_attention_vjp(q, k, v, **options)[1](g)
    yield "exact", lambda: exact_attention(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True)
    yield "exact vjp", lambda: exact_attention_vjp(q, k, v, causal=causal, key_padding_mask=mask)[1](g)


def arrays(result):
    if result is None:  # a gradient the call has none of
        return []
    if isinstance(result, np.ndarray):
        return [result]
    if hasattr(result, "__dataclass_fields__"):
        result = [getattr(result, field) for field in result.__dataclass_fields__]
    return [x for item in result for x in arrays(item)]


def assert_bits_do_not_depend_on_threads(calls, threaded, monkeypatch, dispatchers=()):
    """Each of ``calls`` (``(label, call)`` pairs) gives the same arrays, bit for bit, on one
    thread, on two, unsplit (``THREADED_MIN_WORK`` huge) and with the jobs run one at a time
    in reverse order: the serial kernel of each ``Threaded`` in ``threaded`` replaced on the
    object itself (so every module that imported it sees it), and each ``(module, name)`` of
    ``dispatchers`` (kernels a caller looks up in its module and splits itself) replaced there.
    """
    for label, call in calls:
        results = []
        for threads, min_work in ((1, 0), (2, 0), (2, 10**15)):
            numba.set_num_threads(threads)
            monkeypatch.setattr(_config, "THREADED_MIN_WORK", min_work)
            results.append(arrays(call()))
        with monkeypatch.context() as patch:
            patch.setattr(_config, "THREADED_MIN_WORK", 10**15)
            for kernel in threaded:
                patch.setattr(kernel, "kernel", one_job_at_a_time_backwards(kernel.kernel))
            for module, name in dispatchers:
                patch.setattr(module, name, one_job_at_a_time_backwards(getattr(module, name)))
            results.append(arrays(call()))
        for other, how in zip(results[1:], ("two threads", "unsplit", "jobs in reverse order")):
            assert len(other) == len(results[0])
            for x, y in zip(other, results[0]):
                np.testing.assert_array_equal(x, y, err_msg=f"{label}: {how}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "mask"])
@pytest.mark.parametrize("n, heads", [(300, 3), (600, 1)])
def test_bits_do_not_depend_on_threads_splitting_or_job_order(dtype, causal, masked, n, heads, small_jobs,
                                                               two_threads, monkeypatch):
    """Small chunks and a 4 x 4 backward grid (``small_jobs``), so that every kernel has
    several jobs per thread; the mask leaves the first entry's first half without a valid
    position (empty chunks, causal rows without a key)."""
    assert_bits_do_not_depend_on_threads(calls(dtype, n, heads, causal, masked),
                                         [getattr(module, name) for module, name in KERNELS], monkeypatch,
                                         dispatchers=[(exact, name) for name in EXACT_FORWARD])


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_exact_forward_on_blas_bits_do_not_depend_on_threads(causal, small_jobs, two_threads, monkeypatch):
    """The BLAS path of exact attention's forward (a dtype left out of
    ``EXACT_MICRO_KERNEL_DTYPES``) splits its jobs like the micro-kernel path."""
    monkeypatch.setattr(_config, "EXACT_MICRO_KERNEL_DTYPES", ("float32",))
    assert exact.calls_blas(np.float64)
    exact_calls = [(label, call) for label, call in calls(np.float64, 300, 3, causal, True) if label == "exact"]
    assert_bits_do_not_depend_on_threads(exact_calls, [], monkeypatch,
                                         dispatchers=[(exact, name) for name in EXACT_FORWARD])


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_exact_backward_grid_with_an_empty_query_range(causal, small_jobs):
    """At n = 300 a 4 x 4 grid of 128-query ranges has an empty last range. It used to take
    the previous range's last query tile as its own (queries 256..299 counted twice in
    ``dk`` and ``dv``); the grid may change only the rounding."""
    from fmm_attention.cpu.backward_ops import _grid

    rng = np.random.default_rng(9)
    q, k, v, g = (rng.standard_normal((3, 300, 8)) for _ in range(4))
    assert _grid(3, 300) == 4
    grid = exact_attention_vjp(q, k, v, causal=causal)[1](g)
    _config.BACKWARD_MIN_SPAN = 10**6  # monkeypatched by small_jobs: restored after the test
    assert _grid(3, 300) == 1
    single = exact_attention_vjp(q, k, v, causal=causal)[1](g)
    for x, y in zip(grid, single):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)
