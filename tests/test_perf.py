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
