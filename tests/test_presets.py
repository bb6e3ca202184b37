"""The presets of fmm_attention.accuracy (issue 17): documented keys per query, deterministic."""

from pathlib import Path

import numpy as np
import pytest

from fmm_attention import build_tree, fmm_attention
from fmm_attention.accuracy import ACCURATE, BALANCED, FAST, PRESETS

HELD_OUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "minilm_MPL-2_0.npz"


def test_presets_are_ordered_by_cost_and_are_valid_options():
    assert list(PRESETS) == ["FAST", "BALANCED", "ACCURATE"]
    assert PRESETS["FAST"] is FAST and PRESETS["ACCURATE"] is ACCURATE
    # cost grows with the block (the near field) and the rank (keys per far box)
    assert FAST["block_size"] < BALANCED["block_size"] < ACCURATE["block_size"]
    assert FAST["rank"] <= BALANCED["rank"] <= ACCURATE["rank"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_keys_per_query_follow_the_tree(name):
    # no preset refines: its keys per query are the tree's near and far keys plus the sink
    n = 4096
    preset = PRESETS[name]
    q, k, v = np.random.default_rng(0).standard_normal((3, n, 16), dtype=np.float32)
    _, stats = fmm_attention(q, k, v, return_stats=True, **preset)
    tree = build_tree(n, block_size=preset["block_size"], rank=preset["rank"])
    ptr, segments, _ = tree.plan()
    expected = np.add.reduceat(segments[:, 2], ptr[:-1]).mean() + 1  # + token 0, out of the coarse means
    assert abs(stats.keys_per_query_mean - expected) < 1.0


@pytest.mark.skipif(not HELD_OUT.exists(), reason="needs ../shared/data")
@pytest.mark.parametrize("name, causal, documented", [
    ("FAST", False, 0.231), ("BALANCED", False, 0.404), ("ACCURATE", False, 0.649),
    ("FAST", True, 0.117), ("BALANCED", True, 0.204), ("ACCURATE", True, 0.326),
])
def test_presets_reproduce_their_documented_keys_and_are_deterministic(name, causal, documented):
    # docs/accuracy.rst, "Presets": keys per query (fraction of n) on the held-out heads
    z = np.load(HELD_OUT)
    q, k, v = (z[x].reshape(-1, 512, 32) for x in "qkv")
    out, stats = fmm_attention(q, k, v, causal=causal, return_stats=True, **PRESETS[name])
    again = fmm_attention(q, k, v, causal=causal, **PRESETS[name])
    np.testing.assert_array_equal(out, again)
    assert abs(stats.keys_fraction - documented) < 0.0006  # the table rounds to 0.1%
