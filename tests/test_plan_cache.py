"""The plan caches: keyed by ``(n, FMMOptions.plan_key)``, sized by ``_config`` at call time."""

import numpy as np
import pytest

from fmm_attention import _config, build_tree, fmm_attention, tree as tree_module
from fmm_attention.options import FMMOptions


@pytest.fixture
def empty_caches():
    tree_module._plan.cache_clear()
    tree_module._build_tree.cache_clear()
    yield
    tree_module._plan.cache_clear()
    tree_module._build_tree.cache_clear()


def test_plan_key_holds_what_the_plan_depends_on():
    base = FMMOptions.create(block_size=8, rank=2, causal=True)
    assert base.plan_key(100) == (100, 8, 2, True, True, ())
    # the arithmetic options share the plan
    for other in (dict(scale=0.5), dict(coarsening="cluster"), dict(count_scaling=False), dict(refine=3)):
        assert FMMOptions.create(block_size=8, rank=2, causal=True, **other).plan_key(100) == base.plan_key(100)
    assert FMMOptions.create(block_size=8, rank=2, global_tokens=[3]).plan_key(100)[-1] == (3,)
    assert FMMOptions.create(block_size=8, rank=2, query_coarsening=True).plan_key(100)[4] is False
    assert FMMOptions.create(block_size=64).plan_key(10)[1] == 16  # clamped like build_tree


def test_calls_fill_the_cache_under_their_plan_keys(empty_caches):
    q, k, v = np.random.default_rng(0).standard_normal((3, 40, 4))
    fmm_attention(q, k, v, block_size=4, rank=2)
    fmm_attention(q, k, v, block_size=4, rank=2, coarsening="cluster", scale=0.3)  # same plan
    fmm_attention(q, k, v, block_size=4, rank=2, global_tokens=[0])
    assert tree_module._plan.keys() == [FMMOptions.create(block_size=4, rank=2).plan_key(40),
                                        FMMOptions.create(block_size=4, rank=2, global_tokens=[0]).plan_key(40)]
    tree = build_tree(40, block_size=4, rank=2)
    opts = FMMOptions.create(block_size=4, rank=2)
    assert tree.plan_of(opts)[0] is tree.key_plan[0]  # one cache behind both
    with pytest.raises(ValueError, match="do not describe this tree"):
        tree.plan_of(FMMOptions.create(block_size=8, rank=2))


def test_cache_sizes_are_read_at_call_time(empty_caches, monkeypatch):
    monkeypatch.setattr(_config, "PLAN_CACHE_SIZE", 1)
    monkeypatch.setattr(_config, "TREE_CACHE_SIZE", 2)
    for n in (30, 40, 50):
        build_tree(n, block_size=4, rank=2).plan()
    assert tree_module._plan.keys() == [(50, 4, 2, False, True, ())]
    assert [key[0] for key in tree_module._build_tree.keys()] == [40, 50]
    monkeypatch.setattr(_config, "PLAN_CACHE_SIZE", 0)
    build_tree(60, block_size=4, rank=2).plan()
    assert tree_module._plan.keys() == []
    # evicted plans are rebuilt equal
    ptr, segments, max_keys = build_tree(30, block_size=4, rank=2).key_plan
    monkeypatch.setattr(_config, "PLAN_CACHE_SIZE", 8)
    again = build_tree(30, block_size=4, rank=2).key_plan
    np.testing.assert_array_equal(ptr, again[0])
    np.testing.assert_array_equal(segments, again[1])
    assert max_keys == again[2]
