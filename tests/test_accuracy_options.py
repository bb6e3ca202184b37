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


# ---------------------------------------------------------------- cluster: the upward pass
def _lloyd_reference(points, weights, group, rank, iters):
    """Weighted Lloyd steps (NumPy): nearest non-empty mean, ties to the lowest group, stop when stable."""
    for _ in range(iters):
        total = np.bincount(group, weights, minlength=rank)
        centre = np.zeros((rank, points.shape[1]))
        for g in np.flatnonzero(total > 0):
            centre[g] = (weights[group == g, None] * points[group == g]).sum(0) / total[g]
        dist = ((points[:, None, :] - centre[None]) ** 2).sum(-1)
        dist[:, total == 0] = np.inf
        new = np.argmin(dist, axis=1)  # first minimum: the lowest group
        if np.array_equal(new, group):
            break
        group = new
    return group


def cluster_reference(k, v, valid, tree, iters, flat_size, count_scaling=True):
    """The documented cluster upward pass of one sequence, in plain NumPy (float64).

    Levels up to ``flat_size`` (and level 1) run k-means over each box's valid tokens, started
    from the children's groups side by side; later levels over the children's non-empty
    groups, weighted by their counts. Returns ``kc, vc, cbias`` in the tree's row layout.
    """
    n = k.shape[0]
    kc = np.zeros((tree.n_coarse, k.shape[1]))
    vc = np.zeros((tree.n_coarse, v.shape[1]))
    cbias = np.full(tree.n_coarse, -np.inf)
    counts = np.zeros(tree.n_coarse)
    label = np.zeros(n, dtype=np.int64)
    flat = True
    for i, lv in enumerate(tree.levels):
        w, r = lv.box_size, lv.rank
        flat = flat and (i == 0 or w <= flat_size)
        prev = tree.levels[i - 1] if i > 0 else None
        for c in range(-(-n // w)):
            if flat:
                tokens = np.array([t for t in range(c * w, min(n, (c + 1) * w)) if valid[t]], dtype=np.int64)
                points, values, weights = k[tokens], v[tokens], np.ones(len(tokens))
                if prev is None:
                    start = (tokens - c * w) // (w // r)
                else:
                    start = (((tokens - c * w) // (w // 2)) * prev.rank + label[tokens]) // (2 * prev.rank // r)
            else:
                slots = np.arange(2 * prev.rank)
                rows = prev.offset + 2 * c * prev.rank + slots
                keep = counts[rows] > 0
                rows, slots = rows[keep], slots[keep]
                points, values, weights = kc[rows], vc[rows], counts[rows]
                start = slots // (2 * prev.rank // r)
            group = _lloyd_reference(points, weights, start.astype(np.int64), r, iters if w > r else 0)
            for g in range(r):
                row = lv.offset + c * r + g
                members = group == g
                total = weights[members].sum()
                if total > 0:
                    kc[row] = (weights[members, None] * points[members]).sum(0) / total
                    vc[row] = (weights[members, None] * values[members]).sum(0) / total
                    counts[row] = total
                    cbias[row] = np.log(total) if count_scaling else 0.0
            if flat:
                label[tokens] = group
    return kc, vc, cbias


def _coarse(q, k, v, tree, coarsening, *, iters=0, mask=None, coarse_valid=None, count_scaling=True):
    from fmm_attention import cpu
    from fmm_attention._validate import attention_inputs

    batch = attention_inputs(q, k, v, scale=None, key_padding_mask=mask, check_finite=True)
    return cpu.coarse_buffers(batch, tree, coarsening, count_scaling, cluster_iters=iters, coarse_valid=coarse_valid)


@pytest.fixture
def flat_size(request, monkeypatch):
    """Set the largest box that clusters tokens (``None``: the shipped default)."""
    from fmm_attention import _config

    if request.param is not None:
        monkeypatch.setattr(_config, "CLUSTER_FLAT_SIZE", request.param)
    return _config.CLUSTER_FLAT_SIZE


@pytest.mark.parametrize("flat_size", [0, 16, None], indirect=True)
@pytest.mark.parametrize("rank", [1, 2, 16])
@pytest.mark.parametrize("iters", [0, 1, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_cluster_upward_matches_numpy_reference(flat_size, rank, iters, masked):
    from fmm_attention import build_tree

    n, m = 300, 4  # N = 512: levels of 4 .. 128 tokens
    rng = np.random.default_rng(rank + 10 * iters)
    k, v = rng.standard_normal((2, n, 6)), rng.standard_normal((2, n, 5))
    k[:, 40:48] = k[:, 40:41]  # a run of identical keys: groups merge them exactly
    mask = rng.random((2, n)) > 0.3 if masked else None
    mask_b = np.ones((2, n), bool) if mask is None else mask
    if masked:
        mask_b[1, 64:200] = False  # whole boxes without a valid token
        mask = mask_b
    tree = build_tree(n, block_size=m, rank=rank)
    kc, vc, cbias = _coarse(k, k, v, tree, "cluster", iters=iters, mask=mask)
    for b in range(2):
        rk, rv, rb = cluster_reference(k[b], v[b], mask_b[b], tree, iters, flat_size)
        np.testing.assert_array_equal(np.isinf(cbias[b]), np.isinf(rb))
        np.testing.assert_allclose(cbias[b], rb, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(kc[b], rk, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(vc[b], rv, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("flat_size", [0, None], indirect=True)
@pytest.mark.parametrize("rank", [1, 4, 64])
def test_cluster_upward_without_iterations_is_mean_coarsening(flat_size, rank):
    from fmm_attention import build_tree

    n = 700
    k, v = RNG.standard_normal((2, n, 6)), RNG.standard_normal((2, n, 3))
    mask = RNG.random((2, n)) > 0.25
    tree = build_tree(n, block_size=4, rank=rank)
    cluster = _coarse(k, k, v, tree, "cluster", mask=mask)
    mean = _coarse(k, k, v, tree, "mean", mask=mask)
    for a, b in zip(cluster, mean):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("flat_size", [0, None], indirect=True)
def test_cluster_upward_excludes_global_tokens(flat_size):
    from fmm_attention import build_tree

    n = 600
    k, v = RNG.standard_normal((1, n, 6)), RNG.standard_normal((1, n, 3))
    k[0, [0, 300, 599]] = 50.0  # far outliers: if they entered any group it would show
    coarse_valid = np.ones((1, n), bool)
    coarse_valid[0, [0, 300, 599]] = False
    tree = build_tree(n, block_size=4, rank=2)
    kc, vc, cbias = _coarse(k, k, v, tree, "cluster", iters=3, coarse_valid=coarse_valid)
    rk, rv, rb = cluster_reference(k[0], v[0], coarse_valid[0], tree, 3, flat_size)
    np.testing.assert_allclose(kc[0], rk, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(vc[0], rv, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cbias[0], rb, rtol=1e-12, atol=1e-12)
    assert np.abs(kc).max() < 10


@pytest.mark.slow
@pytest.mark.parametrize("flat_size", [0, None], indirect=True)
def test_cluster_upward_is_deterministic(flat_size):
    from fmm_attention import build_tree

    n = 2000
    k, v = (x.astype(np.float32) for x in (RNG.standard_normal((3, n, 16)), RNG.standard_normal((3, n, 8))))
    tree = build_tree(n, block_size=8, rank=4)
    first = _coarse(k, k, v, tree, "cluster", iters=5)
    again = _coarse(k, k, v, tree, "cluster", iters=5)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        serial = _coarse(k, k, v, tree, "cluster", iters=5)
    finally:
        numba.set_num_threads(threads)
    for a, b, c in zip(first, again, serial):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("flat_size", [0], indirect=True)
@pytest.mark.parametrize("causal", [False, True])
def test_cluster_with_group_levels_keeps_exact_limit_and_causality(flat_size, causal):
    q, k, v = qkv(100)
    out = fmm_attention(q, k, v, block_size=4, rank=64, causal=causal, coarsening="cluster", cluster_iters=4)
    np.testing.assert_allclose(out, exact_reference(q, k, v, causal=causal)[0], rtol=1e-12, atol=1e-12)
    if causal:
        options = dict(block_size=4, rank=2, causal=True, coarsening="cluster", cluster_iters=3, global_tokens=[0, 40])
        base = fmm_attention(q, k, v, **options)
        k2, v2 = k.copy(), v.copy()
        k2[45:] -= 2.0
        v2[45:] *= -5.0
        np.testing.assert_array_equal(fmm_attention(q, k2, v2, **options)[:45], base[:45])


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


@pytest.mark.slow
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


# ---------------------------------------------------------------- issue 13
def test_issue13_stats_count_only_valid_keys():
    # issue 13, item 3: return_stats ignored the mask (191 keys per query with 150 valid)
    n = 200
    q, k, v = qkv(n)
    mask = np.arange(n) < 150
    _, stats = fmm_attention(q, k, v, block_size=4, rank=1, refine=10 * n, key_padding_mask=mask, return_stats=True)
    assert stats.keys_per_query_mean == 150 and stats.keys_per_query_max == 150 and stats.keys_fraction == 1.0
    for causal in (False, True):
        for o in (dict(block_size=8, rank=2), dict(block_size=8, rank=2, refine=16),
                  dict(block_size=8, rank=2, query_coarsening=not causal)):
            # a padded sequence costs what the unpadded one does
            _, a = fmm_attention(q, k, v, key_padding_mask=mask, causal=causal, return_stats=True, **o)
            _, b = fmm_attention(q[:150], k[:150], v[:150], causal=causal, return_stats=True, **o)
            assert (a.keys_per_query_mean, a.keys_per_query_max) == (b.keys_per_query_mean, b.keys_per_query_max)
            assert a.keys_fraction == pytest.approx(b.keys_fraction)


def test_issue13_stats_with_a_mask_inside_the_sequence_by_brute_force():
    n, m, p = 64, 4, 2
    q, k, v = qkv(n, batch=(2,))
    mask = np.random.default_rng(5).random((2, n)) > 0.4
    mask[1] = True
    _, stats = fmm_attention(q, k, v, block_size=m, rank=p, key_padding_mask=mask, return_stats=True)
    from fmm_attention import build_tree

    tree = build_tree(n, block_size=m, rank=p)
    lm = tree.level_map()
    per_query = []
    for b in range(2):
        for i in np.flatnonzero(mask[b]):
            keys = (mask[b] & (lm[i] == 0)).sum()
            for level in tree.levels:
                sub = level.box_size // level.rank
                # a coarse key counts when its sub-box holds a valid key
                keys += len({j // sub for j in np.flatnonzero((lm[i] == level.index) & mask[b])})
            per_query.append(keys)
    assert stats.keys_per_query_mean == pytest.approx(np.mean(per_query))
    assert stats.keys_per_query_max == max(per_query)


def test_issue13_refine_beyond_n_is_clamped():
    # refine=10**9 asked for 626 GiB; a budget of n already splits every far box
    q, k, v = qkv(100)
    for causal in (False, True):
        want = fmm_attention(q, k, v, block_size=4, rank=1, refine=100, causal=causal)
        np.testing.assert_array_equal(fmm_attention(q, k, v, block_size=4, rank=1, refine=10**9, causal=causal), want)
        np.testing.assert_allclose(want, exact_reference(q, k, v, causal=causal)[0], rtol=1e-12, atol=1e-12)
