"""Training-free accuracy options of FMA: cluster coarsening, adaptive refinement, global tokens, stats."""

import sys
from pathlib import Path

import numba
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from reference import exact_reference, fma_reference  # noqa: E402

from fmm_attention import FMMStats, exact_attention, fmm_attention  # noqa: E402

RNG = np.random.default_rng(7)


def qkv(n, d=6, dv=5, seed=0, batch=()):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(batch + (n, d)), rng.standard_normal(batch + (n, d)), rng.standard_normal(batch + (n, dv)))


OPTIONS = {
    "cluster": dict(coarsening="cluster", cluster_iters=3),
    "refine": dict(refine=12),
    "global": dict(global_tokens=[0, 3, 40, 41]),
    "all": dict(coarsening="cluster", refine=12, global_tokens=[0, 40]),
}


# ---------------------------------------------------------------- exact limits
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [7, 100])
def test_refinement_with_large_budget_is_exact(causal, n):
    q, k, v = qkv(n)
    out, stats = fmm_attention(q, k, v, block_size=4, rank=1, causal=causal, refine=10 * n, return_stats=True)
    ref, _ = exact_reference(q, k, v, causal=causal)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    # every allowed key is attended exactly once: n keys per query, (n + 1) / 2 causal
    assert stats.keys_per_query_mean == pytest.approx((n + 1) / 2 if causal else n)


@pytest.mark.parametrize("causal", [False, True])
def test_cluster_with_rank_at_least_box_size_is_exact(causal):
    q, k, v = qkv(100)
    out = fmm_attention(q, k, v, block_size=4, rank=64, causal=causal, coarsening="cluster", cluster_iters=4)
    np.testing.assert_allclose(out, exact_reference(q, k, v, causal=causal)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_cluster_without_iterations_is_mean_coarsening(causal):
    q, k, v = qkv(100)
    mask = RNG.random(100) > 0.2
    a = fmm_attention(q, k, v, block_size=4, rank=2, causal=causal, coarsening="cluster", cluster_iters=0, key_padding_mask=mask)
    b = fmm_attention(q, k, v, block_size=4, rank=2, causal=causal, key_padding_mask=mask)
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


def test_cluster_groups_identical_keys_exactly():
    # n=16, m=4: one far level of 4-token boxes. Keys follow A,B,B,B in every box: the
    # positional halves average (A+B)/2 and B, which blurs A; Lloyd steps started from them
    # separate {A} from {B,B,B}, and groups of identical keys are exact.
    rng = np.random.default_rng(3)
    n, d = 16, 4
    a, b = rng.standard_normal((2, d)) * 2
    k = np.array([a if j % 4 == 0 else b for j in range(n)])
    q, v = rng.standard_normal((n, d)), rng.standard_normal((n, 3))
    ref = exact_reference(q, k, v)[0]
    mean = fmm_attention(q, k, v, block_size=4, rank=2)
    cluster = fmm_attention(q, k, v, block_size=4, rank=2, coarsening="cluster", cluster_iters=2)
    assert np.abs(mean - ref).max() > 1e-3
    np.testing.assert_allclose(cluster, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_global_tokens_covering_everything_is_exact(causal):
    q, k, v = qkv(50)
    out = fmm_attention(q, k, v, block_size=4, rank=1, causal=causal, global_tokens=np.arange(50))
    np.testing.assert_allclose(out, exact_reference(q, k, v, causal=causal)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_global_tokens_match_an_oracle(causal):
    # oracle: FMA of the keys minus the globals (masked out of coarsening and fields), merged
    # with exact attention to the globals, via log-sum-exp of the two partial softmaxes
    n = 60
    q, k, v = qkv(n, seed=4)
    g = np.array([0, 1, 33])
    rest = np.ones(n, bool)
    rest[g] = False
    o1, l1 = fma_reference(q, k, v, block_size=4, rank=2, causal=causal, valid=rest)
    only_g = ~rest
    # globals are attended exactly by every query, whatever level would serve them
    o2, l2 = exact_reference(q, k, v, causal=causal, valid=only_g)
    lse = np.logaddexp(l1, l2)
    expected = (np.exp(l1 - lse)[:, None] * o1) + (np.nan_to_num(np.exp(l2 - lse))[:, None] * o2)
    out, lse_out = fmm_attention(q, k, v, block_size=4, rank=2, causal=causal, global_tokens=g, return_lse=True)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse_out, lse, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_causality_is_kept(name):
    n, t = 80, 45
    q, k, v = qkv(n, seed=5)
    base = fmm_attention(q, k, v, block_size=4, rank=2, causal=True, **OPTIONS[name])
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[t:] += 3.0
    k2[t:] -= 2.0
    v2[t:] *= -5.0
    moved = fmm_attention(q2, k2, v2, block_size=4, rank=2, causal=True, **OPTIONS[name])
    np.testing.assert_array_equal(moved[:t], base[:t])
    assert not np.allclose(moved[t:], base[t:])


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_repeatable_and_independent_of_thread_count(name):
    q, k, v = qkv(96, seed=6, batch=(3,))
    first = fmm_attention(q, k, v, block_size=4, rank=2, **OPTIONS[name])
    again = fmm_attention(q, k, v, block_size=4, rank=2, **OPTIONS[name])
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        serial = fmm_attention(q, k, v, block_size=4, rank=2, **OPTIONS[name])
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, serial)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_batch_is_the_stack_of_its_members(name):
    q, k, v = qkv(70, seed=8, batch=(2,))
    batch = fmm_attention(q, k, v, block_size=4, rank=2, **OPTIONS[name])
    for b in range(2):
        np.testing.assert_allclose(batch[b], fmm_attention(q[b], k[b], v[b], block_size=4, rank=2, **OPTIONS[name]), rtol=1e-13, atol=1e-14)


def test_refinement_lowers_error_and_spends_at_most_its_budget():
    q, k, v = qkv(256, d=8, seed=9)
    q *= 3  # peaked attention: mass concentrates on a few far boxes
    ref = exact_reference(q, k, v)[0]
    errors, keys = [], []
    for budget in (0, 16, 64, 256):
        out, stats = fmm_attention(q, k, v, block_size=8, rank=1, refine=budget, return_stats=True)
        errors.append(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        keys.append(stats.keys_per_query_max)
    # not monotone in general (a split can undo a lucky cancellation), but a quarter of the
    # far keys must help on peaked attention, and the full budget is exact
    assert errors[2] < 0.9 * errors[0]
    assert errors[3] < 1e-12
    base_max = keys[0]
    for budget, kmax in zip((16, 64, 256), keys[1:]):
        assert kmax <= base_max + budget


def test_stats_count_keys_exactly():
    n, m, p = 64, 4, 2
    q, k, v = qkv(n)
    _, stats = fmm_attention(q, k, v, block_size=m, rank=p, return_stats=True)
    assert isinstance(stats, FMMStats)
    # level map: near field tokens + coarse keys of each far box; count by brute force
    from fmm_attention import build_tree

    tree = build_tree(n, block_size=m, rank=p)
    lm = tree.level_map()
    per_query = (lm == 0).sum(1).astype(float)
    for level in tree.levels:
        boxes = [len({j // level.box_size for j in np.flatnonzero(lm[i] == level.index)}) for i in range(n)]
        per_query += np.array(boxes) * level.rank
    assert stats.keys_per_query_mean == pytest.approx(per_query.mean())
    assert stats.keys_per_query_max == per_query.max()
    assert stats.flops["near"] == 2 * (6 + 5) * (lm == 0).sum()
    assert set(stats.to_dict()) == {"keys_per_query_mean", "keys_per_query_max", "keys_fraction", "flops"}


def test_return_lse_and_stats_order():
    q, k, v = qkv(20)
    out, lse, stats = fmm_attention(q, k, v, block_size=4, rank=1, return_lse=True, return_stats=True)
    assert out.shape == (20, 5) and lse.shape == (20,) and isinstance(stats, FMMStats)


# ---------------------------------------------------------------- bad options
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(refine=-1), ValueError, "refine"),
        (dict(refine=2.5), TypeError, "refine"),
        (dict(cluster_iters=-2, coarsening="cluster"), ValueError, "cluster_iters"),
        (dict(coarsening="kmeans"), ValueError, "coarsening"),
        (dict(global_tokens=[0, 20]), ValueError, "global_tokens"),
        (dict(global_tokens=[-1]), ValueError, "global_tokens"),
        (dict(global_tokens=[0.5]), TypeError, "global_tokens"),
        (dict(refine=4, query_coarsening=True), ValueError, "refine"),
        (dict(return_stats="yes"), TypeError, "return_stats"),
    ],
)
def test_bad_options(kwargs, error, match):
    q, k, v = qkv(20)
    with pytest.raises(error, match=match):
        fmm_attention(q, k, v, block_size=4, rank=1, **kwargs)


def test_float32_stays_float32_with_options():
    q, k, v = (x.astype(np.float32) for x in qkv(64))
    out = fmm_attention(q, k, v, block_size=4, rank=2, coarsening="cluster", refine=8, global_tokens=[0])
    ref = fmm_attention(*(x.astype(np.float64) for x in (q, k, v)), block_size=4, rank=2, coarsening="cluster", refine=8, global_tokens=[0])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_masks_with_options_match_exact_at_the_limit():
    q, k, v = qkv(50)
    mask = RNG.random(50) > 0.3
    out = fmm_attention(q, k, v, block_size=4, rank=1, refine=1000, key_padding_mask=mask, global_tokens=[2])
    np.testing.assert_allclose(out, exact_attention(q, k, v, key_padding_mask=mask), rtol=1e-12, atol=1e-12)
