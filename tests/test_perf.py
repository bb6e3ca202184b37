"""Benchmark helpers: FLOP counts agree with the executed plan, the slope fit is exact on power laws."""

import numpy as np
import pytest

from fmm_attention import fmm_attention
from fmm_attention._perf import fma_logits, loglog_slope


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

    from fmm_attention import _config, _perf

    for fn in (_perf.method_call, _perf.fma_logits, _perf.attention_flops, _perf.scaling_study, _perf.peak_memory,
               _perf.profile_phases):
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
