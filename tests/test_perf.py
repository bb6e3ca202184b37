"""Benchmark helpers: FLOP counts agree with the executed plan, the slope fit is exact on power laws."""

import numpy as np
import pytest

from fmm_attention import fmm_attention
from fmm_attention.perf import fma_logits, loglog_slope


@pytest.mark.parametrize("n, m, p, causal, coarse", [(100, 4, 2, False, False), (100, 4, 2, True, False),
                                                     (64, 8, 1, False, True), (37, 2, 4, False, False)])
def test_fma_logits_equal_the_stats_of_a_call(n, m, p, causal, coarse):
    x = np.random.default_rng(0).standard_normal((n, 4))
    _, stats = fmm_attention(x, x, x, block_size=m, rank=p, causal=causal, query_coarsening=coarse, return_stats=True)
    # stats count 2 (d + dv) flops per logit; coarse queries count far logits once per box
    expected = (stats.flops["near"] + stats.flops["far"]) / (2 * (4 + 4))
    assert fma_logits(n, block_size=m, rank=p, causal=causal, query_coarsening=coarse) == pytest.approx(expected)


def test_loglog_slope_recovers_a_power_law():
    ns = np.array([1e3, 1e4, 1e5])
    assert loglog_slope(ns, 3.0 * ns**1.25) == pytest.approx(1.25)


def test_perf_helpers_default_to_the_library_configuration():
    import inspect

    from fmm_attention import _config, perf

    for fn in (perf.method_call, perf.fma_logits, perf.attention_flops, perf.scaling_study, perf.memory_study,
               perf.profile_phases):
        params = inspect.signature(fn).parameters
        assert (params["block_size"].default, params["rank"].default) == (
            _config.DEFAULT_BLOCK_SIZE, _config.DEFAULT_RANK), fn.__name__
    assert (inspect.signature(fmm_attention).parameters["block_size"].default,
            inspect.signature(fmm_attention).parameters["rank"].default) == (
        _config.DEFAULT_BLOCK_SIZE, _config.DEFAULT_RANK)


def test_asv_tracks_the_default_and_the_targets_configuration(monkeypatch):
    import sys
    from pathlib import Path

    from fmm_attention import _config

    root = Path(__file__).resolve().parents[1] / "asv_benchmarks"
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    from benchmarks import bench_accuracy, bench_fma

    default = (_config.DEFAULT_BLOCK_SIZE, _config.DEFAULT_RANK)
    for base, tracked in [(bench_fma.FMMAttention, bench_fma.FMMAttentionDefault),
                          (bench_fma.FMMAttentionMemory, bench_fma.FMMAttentionMemoryDefault),
                          (bench_fma.BuildTree, bench_fma.BuildTreeDefault)]:
        assert (base.block_size, base.rank) == (32, 2)
        assert (tracked.block_size, tracked.rank) == default
        assert tracked.params == base.params  # same grid, another configuration
    assert bench_accuracy.RealDataAccuracy.block_size == 32
    assert bench_accuracy.RealDataAccuracyDefault.block_size == _config.DEFAULT_BLOCK_SIZE
    assert _config.DEFAULT_RANK in bench_accuracy.RealDataAccuracy.params[-1]


# --------------------------------------------------------------------------- one input generator
def _asv_module(monkeypatch, name):
    import importlib
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "asv_benchmarks"
    monkeypatch.syspath_prepend(str(root))
    for mod in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, mod)
    return importlib.import_module(f"benchmarks.{name}")


def test_one_input_generator_gives_the_same_data_everywhere(monkeypatch):
    from fmm_attention.perf import random_inputs

    q, k, v = random_inputs(64, 8, seed=3)
    q1, k1, v1 = random_inputs(64, 8, heads=1, seed=3)
    assert all(np.array_equal(a, b[0]) for a, b in zip((q, k, v), (q1, k1, v1)))
    # the extra pieces come from their own streams: asking for them changes no other array
    q2, k2, v2, w_q, w_k, g = random_inputs(64, 8, seed=3, fastformer=True, cotangent=True)
    assert all(np.array_equal(a, b) for a, b in zip((q, k, v), (q2, k2, v2)))
    assert w_q.shape == w_k.shape == (8,) and g.shape == v.shape and g.dtype == np.float32
    assert not np.array_equal(random_inputs(64, 8, seed=4)[0], q)
    # the asv suite's inputs (time, memory, backward, decode) are the generator's
    common = _asv_module(monkeypatch, "_common")
    backward = _asv_module(monkeypatch, "bench_backward")
    decode = _asv_module(monkeypatch, "bench_decode")
    asv_q, asv_k, asv_v = common.inputs(256, "float32")
    bq, bk, bv, _ = backward._inputs(256)
    dq, dk, dv = decode._tokens(256)
    ref = random_inputs(256, common.D)
    for arrays in ((asv_q, asv_k, asv_v), (bq, bk, bv), (dq, dk, dv)):
        assert all(np.array_equal(a, b) for a, b in zip(arrays, ref))


def test_method_call_uses_the_generators_fastformer_vectors(monkeypatch):
    from fmm_attention import api, perf

    seen = {}
    monkeypatch.setattr(api, "fastformer_attention", lambda q, k, v, w_q, w_k, **kw: seen.update(w_q=w_q, w_k=w_k))
    q, k, v, w_q, w_k = perf.random_inputs(32, 8, seed=2, fastformer=True)
    perf.method_call("fastformer", q, k, v, seed=2)()
    assert np.array_equal(seen["w_q"], w_q) and np.array_equal(seen["w_k"], w_k)


# --------------------------------------------------------------------------- one memory probe
def test_peak_memory_counts_numba_and_foreign_allocations():
    """The probe sees what a kernel allocates, and what tracemalloc cannot: memory from C's malloc."""
    import ctypes
    import ctypes.util
    import sys
    import tracemalloc

    from numba import njit

    from fmm_attention.perf import peak_memory

    # One serial buffer: with a buffer per prange iteration the peak depended on whether the
    # threads' buffers happened to be alive at once (a loaded machine ran them one by one).
    @njit(cache=False)
    def scratch(n):
        buf = np.ones(n)  # allocated by Numba's runtime inside the kernel, freed before returning
        return buf.sum()

    n = 2**23  # 64 MiB of float64
    scratch(16)
    assert peak_memory(lambda: scratch(n)) >= 0.9 * 8 * n
    assert peak_memory(lambda: np.ones(n)) >= 0.9 * 8 * n
    assert peak_memory(lambda: None) < 8 * n // 4
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def foreign():  # like a BLAS workspace: written, then freed, never seen by Python's allocators
        ptr = libc.malloc(8 * n)
        ctypes.memset(ptr, 1, 8 * n)
        libc.free(ptr)

    tracemalloc.start()
    foreign()
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert traced < 2**20  # the demo's former probe (tracemalloc) saw nothing of it
    assert peak_memory(foreign) >= 0.9 * 8 * n


def test_peak_memory_is_the_rise_of_this_call_only():
    from fmm_attention.perf import peak_memory

    held = np.ones(2**23)  # resident before the call: not counted
    assert peak_memory(lambda: held.sum()) < held.nbytes // 4


def test_format_table_aligns_columns():
    from fmm_attention.perf import format_table

    lines = format_table([[1, "abc"], [12345, "d"]], ["n", "x"]).splitlines()
    assert len({len(line) for line in lines}) == 1 and lines[1].split() == ["-----", "---"]
