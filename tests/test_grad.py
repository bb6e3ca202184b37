"""Gradients (shared/spec/gradients.md): every VJP against central finite differences of
the library's own forward in float64, exact zeros, float32 against float64, determinism
across calls and thread counts, untouched inputs and clear errors.

Finite differences are taken along random directions (one forward pair per check tests
the whole gradient): ``(f(x + h u) - f(x - h u)) / 2h`` against ``<grad, u>``, with
``f = sum(g * out) (+ sum(g_lse * lse))``. Sizes are tiny (n ~ 40-70, so the last block is
padded, block 4 or 8, rank 2, so several far levels exist).
"""

import numba
import numpy as np
import pytest

from fmm_attention import (
    LearnedCoarsening,
    _config,
    build_tree,
    exact_attention,
    fastformer_attention,
    fmm_attention,
)
from fmm_attention.grad import (
    exact_attention_vjp,
    fastformer_attention_vjp,
    fmm_attention_vjp,
)

H = 1e-5
RTOL = 1e-6


def qkv(n, *, d=4, dv=3, lead=(2,), seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(lead + (n, d))
    k = rng.standard_normal(lead + (n, d))
    v = rng.standard_normal(lead + (n, dv))
    return tuple(x.astype(dtype) for x in (q, k, v))


def random_mask(lead, n, seed=1):
    mask = np.random.default_rng(seed).random(lead + (n,)) > 0.3
    mask[..., 0] = True  # every causal query keeps a valid key
    return mask


def directional(loss, grads, params, seed=5):
    """Central difference of ``loss(params)`` along a random direction vs ``<grads, u>``."""
    rng = np.random.default_rng(seed)
    u = [rng.standard_normal(p.shape) for p in params]
    plus = loss([p + H * x for p, x in zip(params, u)])
    minus = loss([p - H * x for p, x in zip(params, u)])
    fd = (plus - minus) / (2 * H)
    an = sum(float(np.sum(gr * x)) for gr, x in zip(grads, u))
    assert abs(fd - an) <= RTOL * max(abs(an), 1.0), (fd, an)
    assert abs(an) > 1e-3  # the check is not vacuous


def check_qkv(forward, vjp, q, k, v, *, with_lse=False, **options):
    rng = np.random.default_rng(11)
    result, pullback = vjp(q, k, v, return_lse=with_lse, **options)
    out = result[0] if with_lse else result
    g = rng.standard_normal(out.shape)
    g_lse = rng.standard_normal(out.shape[:-1]) if with_lse else None
    grads = pullback(g, g_lse) if with_lse else pullback(g)

    def loss(params):
        res = forward(*params, return_lse=with_lse, **options)
        if with_lse:
            return float(np.sum(g * res[0]) + np.sum(g_lse * res[1]))
        return float(np.sum(g * res))

    directional(loss, grads[:3], [q, k, v])
    # the forward half is the forward itself
    np.testing.assert_array_equal(out, forward(q, k, v, **options))
    return grads


# ---------------------------------------------------------------- exact attention
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_lse", [False, True])
def test_exact_matches_finite_differences(causal, masked, with_lse):
    q, k, v = qkv(45)
    mask = random_mask((2,), 45) if masked else None
    check_qkv(exact_attention, exact_attention_vjp, q, k, v, causal=causal, key_padding_mask=mask,
              with_lse=with_lse)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_on_a_grid_of_partial_sums(causal):
    # n >= 4096 with one entry: the backward splits the (query, key) square into a 4 x 4
    # grid (query ranges in paired order) whose partial sums are added in a fixed order
    q, k, v = qkv(4100, d=3, dv=2, lead=(1,), seed=21)
    mask = random_mask((1,), 4100)
    grads = check_qkv(exact_attention, exact_attention_vjp, q, k, v, causal=causal, key_padding_mask=mask)
    assert np.all(grads.k[~mask] == 0)
    g = np.random.default_rng(0).standard_normal(v.shape)
    before = numba.get_num_threads()
    try:
        runs = []
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            runs.append(exact_attention_vjp(q, k, v, causal=causal)[1](g))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_feature_dims_filling_whole_panels(causal):
    # d and dv multiples of the micro-kernel's panel width (8 in float64, 16 in float32):
    # the backward reads q and g in place instead of padded copies; n = 1100 gives a 2 x 2
    # grid and a last query tile past n
    q, k, v = qkv(1100, d=16, dv=32, lead=(1,), seed=22)
    mask = random_mask((1,), 1100)
    want = check_qkv(exact_attention, exact_attention_vjp, q, k, v, causal=causal, key_padding_mask=mask)
    assert np.all(want.k[~mask] == 0) and np.all(want.v[~mask] == 0)
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    g = np.random.default_rng(2).standard_normal(v.shape).astype(np.float32)
    want = exact_attention_vjp(q, k, v, causal=causal, key_padding_mask=mask)[1](g.astype(np.float64))
    before = numba.get_num_threads()
    try:
        runs = []
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            runs.append(exact_attention_vjp(q32, k32, v32, causal=causal, key_padding_mask=mask)[1](g))
    finally:
        numba.set_num_threads(before)
    for a, b, w in zip(*runs, want):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
        assert np.linalg.norm(a - w) <= 1e-4 * np.linalg.norm(w)


def test_exact_scale_and_long_tiles():
    q, k, v = qkv(300, d=5, dv=2, lead=(), seed=3)  # several tiles of both passes
    check_qkv(exact_attention, exact_attention_vjp, q, k, v, causal=True, scale=0.7)


# ---------------------------------------------------------------- FMA, mean coarsening
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n, m, p", [(45, 4, 2), (70, 8, 2)])
def test_fma_mean_matches_finite_differences(causal, masked, n, m, p):
    q, k, v = qkv(n, seed=n)
    mask = random_mask((2,), n) if masked else None
    check_qkv(fmm_attention, fmm_attention_vjp, q, k, v, causal=causal, key_padding_mask=mask, block_size=m,
              rank=p)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("count_scaling", [False, True])
def test_fma_value_gradient_is_the_dense_implied_matrix_transposed(causal, count_scaling):
    # an independent dense reference: mean-coarsened FMA is out = A(q, k) @ v, so dv = A^T g
    from reference import fma_implied_matrix

    n, m, p = 45, 4, 2
    q, k, v = qkv(n, seed=31)
    mask = random_mask((2,), n, seed=9)
    out, pullback = fmm_attention_vjp(q, k, v, block_size=m, rank=p, causal=causal, key_padding_mask=mask,
                                      count_scaling=count_scaling)
    g = np.random.default_rng(6).standard_normal(out.shape)
    dv = pullback(g).v
    for h in range(2):
        implied = fma_implied_matrix(q[h], k[h], block_size=m, rank=p, causal=causal, valid=mask[h],
                                     count_scaling=count_scaling)
        np.testing.assert_allclose(dv[h], implied.T @ g[h], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_fma_without_count_scaling_with_lse_and_scale(causal):
    q, k, v = qkv(53, seed=2)
    check_qkv(fmm_attention, fmm_attention_vjp, q, k, v, causal=causal, block_size=4, rank=2,
              count_scaling=False, scale=0.8, with_lse=True, key_padding_mask=random_mask((2,), 53))


@pytest.mark.parametrize("masked", [False, True])
def test_fma_query_coarsening_matches_finite_differences(masked):
    q, k, v = qkv(61, seed=4)
    mask = random_mask((2,), 61) if masked else None
    check_qkv(fmm_attention, fmm_attention_vjp, q, k, v, query_coarsening=True, block_size=4, rank=2,
              key_padding_mask=mask, with_lse=masked)


@pytest.mark.parametrize("causal", [False, True])
def test_fma_global_tokens_match_finite_differences(causal):
    q, k, v = qkv(50, seed=6)
    check_qkv(fmm_attention, fmm_attention_vjp, q, k, v, causal=causal, block_size=4, rank=2,
              global_tokens=[0, 21, 22], key_padding_mask=random_mask((2,), 50))


def test_fma_global_tokens_with_query_coarsening():
    q, k, v = qkv(50, seed=7)
    check_qkv(fmm_attention, fmm_attention_vjp, q, k, v, query_coarsening=True, block_size=4, rank=2,
              global_tokens=[3, 40])


@pytest.mark.parametrize("causal", [False, True])
def test_fma_refine_holds_its_plan(causal):
    # the gradient is that of the plan the forward chose (piecewise smooth: a step of H
    # does not change the choice here)
    q, k, v = qkv(64, seed=8)
    check_qkv(fmm_attention, fmm_attention_vjp, q, k, v, causal=causal, block_size=4, rank=2, refine=12,
              key_padding_mask=random_mask((2,), 64))


# ---------------------------------------------------------------- FMA, learned coarsening
def random_learned(tree, d, dv, seed):
    rng = np.random.default_rng(seed)
    out = ([], [], [], [])
    for lv in tree.levels:
        r, w = lv.rank, lv.box_size
        out[0].append(rng.standard_normal((r * d, 1, w)) / w)
        out[1].append(rng.standard_normal((r * dv, 1, w)) / w)
        out[2].append(0.1 * rng.standard_normal(r * d))
        out[3].append(0.1 * rng.standard_normal(r * dv))
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_fma_learned_matches_finite_differences(causal, masked):
    n, m, p, d, dv = 45, 4, 2, 4, 3
    q, k, v = qkv(n, seed=9)
    tree = build_tree(n, block_size=m, rank=p, causal=causal)
    params = random_learned(tree, d, dv, seed=3)
    sizes = [len(x) for x in params]
    mask = random_mask((2,), n) if masked else None
    if masked:
        mask[1, 8:16] = False  # a whole level-1 box (and a level-2 half) empty
    options = dict(causal=causal, block_size=m, rank=p, key_padding_mask=mask)
    out, pullback = fmm_attention_vjp(q, k, v, coarsening=LearnedCoarsening(*params), **options)
    g = np.random.default_rng(2).standard_normal(out.shape)
    grads = pullback(g)
    flat = [a for group in params for a in group]
    glearned = grads.coarsening
    gflat = [a for group in glearned for a in group]
    for a, ga in zip(flat, gflat):
        assert ga.shape == a.shape

    def loss(values):
        q_, k_, v_, *rest = values
        groups, i = [], 0
        for size in sizes:
            groups.append(rest[i : i + size])
            i += size
        return float(np.sum(g * fmm_attention(q_, k_, v_, coarsening=LearnedCoarsening(*groups), **options)))

    directional(loss, list(grads[:3]) + gflat, [q, k, v] + flat)


def test_learned_weight_gradient_is_conv1d_layout():
    # a loss that reads one coarse key: its weight gradient is the box's token values,
    # placed where torch.nn.Conv1d(d, r*d, w, stride=w, groups=d).weight.grad puts it
    n, m, p, d = 16, 4, 2, 1
    tree = build_tree(n, block_size=m, rank=p)
    params = random_learned(tree, d, d, seed=4)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((n, d)) for _ in range(3))
    out, pullback = fmm_attention_vjp(q, k, v, block_size=m, rank=p, coarsening=LearnedCoarsening(*params))
    grads = pullback(rng.standard_normal(out.shape)).coarsening
    assert [w.shape for w in grads.key_weights] == [(lv.rank * d, 1, lv.box_size) for lv in tree.levels]
    assert [b.shape for b in grads.value_bias] == [(lv.rank * d,) for lv in tree.levels]


# ---------------------------------------------------------------- FMA, cluster coarsening
@pytest.fixture(params=[128, 4], ids=["token-levels", "group-levels"])
def cluster_flat_size(request, monkeypatch):
    """Largest box whose level groups tokens; above it whole groups move (4: from level 2)."""
    monkeypatch.setattr(_config, "CLUSTER_FLAT_SIZE", request.param)
    return request.param


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_fma_cluster_matches_finite_differences(cluster_flat_size, causal, masked):
    # the groups are piecewise constant in k: a step of H does not move any token here,
    # so the difference quotient is that of the branch the forward took
    q, k, v = qkv(70, seed=22)
    mask = random_mask((2,), 70) if masked else None
    check_qkv(fmm_attention, fmm_attention_vjp, q, k, v, causal=causal, key_padding_mask=mask, block_size=4,
              rank=2, coarsening="cluster", cluster_iters=3, with_lse=masked)


def test_fma_cluster_with_query_coarsening_global_tokens_and_refine(cluster_flat_size):
    q, k, v = qkv(66, seed=23)
    check_qkv(fmm_attention, fmm_attention_vjp, q, k, v, block_size=4, rank=2, coarsening="cluster",
              query_coarsening=True, global_tokens=[2, 40], key_padding_mask=random_mask((2,), 66))
    check_qkv(fmm_attention, fmm_attention_vjp, q, k, v, block_size=4, rank=2, coarsening="cluster", refine=8,
              count_scaling=False)


def cluster_labels(q, k, v, mask, tree, iters):
    """Each key's group at every far level, ``(L, n)`` per entry, from the recorded groups."""
    from fmm_attention._validate import attention_inputs
    from fmm_attention.cpu.backward_ops import _cluster_buffers

    batch = attention_inputs(q, k, v, scale=None, key_padding_mask=mask, check_finite=True)
    kc, _, _, (labels, parents, counts) = _cluster_buffers(batch, tree, True, iters, None)
    B, n = q.shape[:2]
    out = np.full((B, len(tree.levels), n), -1)
    for b in range(B):
        for t in range(n):
            if not mask[b, t]:
                continue
            row = 0
            for li, lv in enumerate(tree.levels):
                if li < labels.shape[1]:
                    row = lv.offset + (t // lv.box_size) * lv.rank + labels[b, li, t]
                else:
                    row = parents[b, row]
                out[b, li, t] = row
    return out, kc, counts


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("count_scaling", [False, True])
def test_fma_cluster_value_gradient_is_the_dense_implied_matrix_transposed(cluster_flat_size, causal,
                                                                            count_scaling):
    # with its groups fixed, cluster-coarsened FMA is out = A(q, k) @ v for the dense A of
    # reference.fma_grouped_implied_matrix; the recorded groups are the forward's (their
    # key means are its coarse keys, and A @ v is its output), and dv = A^T g
    from reference import fma_grouped_implied_matrix

    n, m, p, iters = 45, 4, 2, 3
    q, k, v = qkv(n, seed=33)
    mask = random_mask((2,), n, seed=9)
    tree = build_tree(n, block_size=m, rank=p, causal=causal)
    options = dict(block_size=m, rank=p, causal=causal, key_padding_mask=mask, count_scaling=count_scaling,
                   coarsening="cluster", cluster_iters=iters)
    out, pullback = fmm_attention_vjp(q, k, v, **options)
    g = np.random.default_rng(6).standard_normal(out.shape)
    dv = pullback(g).v
    labels, kc, counts = cluster_labels(q, k, v, mask, tree, iters)
    moved = 0
    for h in range(2):
        for li, lv in enumerate(tree.levels):
            for row in np.unique(labels[h, li][labels[h, li] >= 0]):
                members = labels[h, li] == row
                assert counts[h, row] == members.sum()
                np.testing.assert_allclose(kc[h, row], k[h, members].mean(0), rtol=1e-12, atol=1e-13)
            sub = (np.arange(n) % lv.box_size) // lv.sub_box_size
            moved += np.sum(mask[h] & (labels[h, li] != lv.offset + (np.arange(n) // lv.box_size) * lv.rank + sub))
        implied = fma_grouped_implied_matrix(q[h], k[h], labels[h], block_size=m, rank=p, causal=causal,
                                             valid=mask[h], count_scaling=count_scaling)
        np.testing.assert_allclose(implied @ v[h], out[h], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dv[h], implied.T @ g[h], rtol=1e-10, atol=1e-12)
    assert moved > 0  # k-means moved tokens away from the positional sub-boxes


def test_fma_cluster_without_iterations_is_mean_coarsening():
    q, k, v = qkv(45, seed=34)
    mask = random_mask((2,), 45)
    g = np.random.default_rng(7).standard_normal(v.shape)
    options = dict(block_size=4, rank=2, key_padding_mask=mask)
    want = fmm_attention_vjp(q, k, v, **options)[1](g)
    got = fmm_attention_vjp(q, k, v, coarsening="cluster", cluster_iters=0, **options)[1](g)
    for a, b in zip(got[:3], want[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- exact zeros
@pytest.mark.parametrize("vjp", [exact_attention_vjp, fmm_attention_vjp])
def test_causal_future_inputs_get_exact_zeros(vjp):
    n, t = 50, 23
    q, k, v = qkv(n, seed=12)
    options = dict(causal=True) if vjp is exact_attention_vjp else dict(causal=True, block_size=4, rank=2)
    out, pullback = vjp(q, k, v, **options)
    g = np.random.default_rng(0).standard_normal(out.shape)
    g[:, t + 1 :] = 0  # only outputs at positions <= t
    grads = pullback(g)
    for grad in grads[:3]:
        assert np.all(grad[:, t + 1 :] == 0)
        assert np.any(grad[:, : t + 1] != 0)


@pytest.mark.parametrize("vjp, options", [
    (exact_attention_vjp, {}),
    (exact_attention_vjp, dict(causal=True)),
    (fmm_attention_vjp, dict(block_size=4, rank=2)),
    (fmm_attention_vjp, dict(block_size=4, rank=2, causal=True, global_tokens=[5])),
    (fmm_attention_vjp, dict(block_size=4, rank=2, query_coarsening=True)),
    (fmm_attention_vjp, dict(block_size=4, rank=2, causal=True, coarsening="cluster")),
])
def test_masked_keys_get_exact_zeros(vjp, options):
    n = 47
    q, k, v = qkv(n, seed=13)
    mask = random_mask((2,), n, seed=4)
    mask[1] = False  # one entry has no valid key at all: zero output, lse = -inf
    k[~mask] = 1e3  # masked keys change nothing, however large
    (out, lse), pullback = vjp(q, k, v, key_padding_mask=mask, return_lse=True, **options)
    assert np.all(np.isneginf(lse[1]))
    rng = np.random.default_rng(1)
    grads = pullback(rng.standard_normal(out.shape), rng.standard_normal(lse.shape))
    for grad in grads[:3]:
        assert np.all(np.isfinite(grad))
    assert np.all(grads.k[~mask] == 0) and np.all(grads.v[~mask] == 0)
    assert np.all(grads.q[1] == 0)
    assert np.any(grads.k[mask] != 0)


# ---------------------------------------------------------------- float32, determinism, inputs
CASES = [
    (exact_attention_vjp, dict(causal=True)),
    (fmm_attention_vjp, dict(block_size=4, rank=2)),
    (fmm_attention_vjp, dict(block_size=8, rank=2, causal=True)),
    (fmm_attention_vjp, dict(block_size=4, rank=2, query_coarsening=True)),
    (fmm_attention_vjp, dict(block_size=4, rank=2, coarsening="cluster")),
]


@pytest.mark.parametrize("vjp, options", CASES)
def test_float32_within_1e4_of_float64(vjp, options):
    q, k, v = qkv(70, seed=14)
    mask = random_mask((2,), 70)
    g = np.random.default_rng(3).standard_normal(v.shape)
    want = vjp(q, k, v, key_padding_mask=mask, **options)[1](g)
    got = vjp(*(x.astype(np.float32) for x in (q, k, v)), key_padding_mask=mask, **options)[1](g.astype(np.float32))
    for a, b in zip(got[:3], want[:3]):
        assert a.dtype == np.float32
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


@pytest.mark.parametrize("vjp, options", CASES)
def test_bitwise_deterministic_across_calls_and_threads(vjp, options):
    q, k, v = qkv(70, seed=15)
    g = np.random.default_rng(4).standard_normal(v.shape)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS), 1):
            numba.set_num_threads(threads)
            results.append(vjp(q, k, v, **options)[1](g))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0][:3], other[:3]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("vjp, options", CASES)
def test_inputs_are_never_modified(vjp, options):
    q, k, v = qkv(45, seed=16)
    mask = random_mask((2,), 45)
    g = np.random.default_rng(5).standard_normal(v.shape)
    copies = [x.copy() for x in (q, k, v, mask, g)]
    vjp(q, k, v, key_padding_mask=mask, **options)[1](g)
    for x, c in zip((q, k, v, mask, g), copies):
        np.testing.assert_array_equal(x, c)


@pytest.mark.parametrize("options", [dict(block_size=4, rank=2, causal=True), dict(block_size=4, rank=2, refine=6),
                                     dict(block_size=4, rank=2, global_tokens=(5, 60))])
def test_fma_slabs_of_blocks_change_no_bit(monkeypatch, options):
    # long sequences run the backward in slabs of runs of query blocks (bounded partial
    # buffers); every partial target still sums in one left-to-right chain, and every
    # near-field row of dk, dv adds its blocks' shares in the order of the run grid
    from fmm_attention.cpu import backward_ops
    from fmm_attention.cpu.backward_plan import query_runs

    q, k, v = qkv(90, seed=24)
    mask = random_mask((2,), 90)
    g = np.random.default_rng(8).standard_normal(v.shape)
    monkeypatch.setattr(_config, "BACKWARD_RUN_BLOCKS", 2)  # 11 runs of the 23 blocks
    out, pullback = fmm_attention_vjp(q, k, v, key_padding_mask=mask, **options)
    whole = pullback(g)
    monkeypatch.setattr(_config, "BACKWARD_PARTIAL_BYTES", 1)  # one or two runs per slab
    tree = build_tree(90, block_size=4, rank=2, causal=options.get("causal", False))
    runs = query_runs(0, tree.n_blocks, _config.BACKWARD_RUN_BLOCKS)
    assert runs.size - 1 == 11 and np.all(np.diff(runs) >= 2)
    col_ptr = np.arange(runs.size)[None] * 10  # partial rows per run
    slabs = backward_ops._slabs(col_ptr, 1)
    assert [hi for _, hi in slabs] == [1, 3, 5, 7, 9, 11]  # each ends before an odd run
    sliced = pullback(g)
    for a, b in zip(whole[:3], sliced[:3]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("run_blocks", [2, 3, 100])
def test_fma_run_grid_changes_only_rounding(monkeypatch, run_blocks):
    # near-field key gradients go straight into dk, dv run by run; the run length changes
    # the order of those sums only (and each grid is deterministic across threads)
    q, k, v = qkv(90, seed=25)
    mask = random_mask((2,), 90)
    g = np.random.default_rng(9).standard_normal(v.shape)
    options = dict(block_size=4, rank=2, key_padding_mask=mask, global_tokens=(7,))
    want = fmm_attention_vjp(q, k, v, **options)[1](g)
    monkeypatch.setattr(_config, "BACKWARD_RUN_BLOCKS", run_blocks)
    before = numba.get_num_threads()
    try:
        got = []
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            got.append(fmm_attention_vjp(q, k, v, **options)[1](g))
    finally:
        numba.set_num_threads(before)
    for a, b, c in zip(got[0][:3], got[1][:3], want[:3]):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-14)


def test_fma_near_field_columns_have_no_partial_rows():
    # the transposed plan numbers only the columns that are not added straight into dk, dv,
    # one partial row per (run, target): with the near field gone, what is left are the
    # distinct coarse rows and global tokens the blocks of each run list
    from fmm_attention.cpu.backward_plan import shared_transpose
    from fmm_attention.tree import TOKEN

    tree = build_tree(90, block_size=4, rank=2)
    ptr, segments, _ = tree.plan(global_tokens=(40,))
    plan = shared_transpose(tree, True, (40,), 0, tree.n_blocks, 3)
    runs, col_ptr, seg_col, t_ptr, t_cols = (x[0] if x.ndim > 1 else x for x in plan[4:9])
    assert runs.tolist() == [0, 3, 6, 9, 12, 15, 18, 23]
    row_target = np.empty(col_ptr[-1], dtype=np.int64)
    row_target[t_cols[: col_ptr[-1]]] = np.repeat(np.arange(t_ptr.size - 1), np.diff(t_ptr))
    shared = 0
    for r in range(runs.size - 1):
        targets = set()
        for block in range(runs[r], runs[r + 1]):
            for s in range(ptr[block], ptr[block + 1]):
                kind, start, count = segments[s]
                near = kind == TOKEN and (block - 1) * 4 <= start and start + count <= (block + 2) * 4
                if near:
                    assert seg_col[s] == -1
                    continue
                first = start + (0 if kind == TOKEN else tree.n)
                assert col_ptr[r] <= seg_col[s] and seg_col[s] + count <= col_ptr[r + 1]
                assert row_target[seg_col[s] : seg_col[s] + count].tolist() == list(range(first, first + count))
                targets.update(range(first, first + count))
                shared += count
        assert col_ptr[r + 1] - col_ptr[r] == len(targets)  # one row per distinct target
        assert (np.diff(row_target[col_ptr[r] : col_ptr[r + 1]]) > 0).all()
    assert col_ptr[-1] < shared  # blocks of a run share their coarse rows
    assert (np.diff(t_cols[: col_ptr[-1]])[np.diff(row_target[t_cols[: col_ptr[-1]]]) == 0] > 0).all()


def test_leading_dims_and_pullback_reuse():
    q, k, v = qkv(40, lead=(2, 3), seed=17)
    out, pullback = fmm_attention_vjp(q, k, v, block_size=4, rank=2)
    g = np.ones_like(out)
    first = pullback(g)
    assert first.q.shape == q.shape and first.v.shape == v.shape
    np.testing.assert_array_equal(pullback(g).k, first.k)
    single = fmm_attention_vjp(q[1, 2], k[1, 2], v[1, 2], block_size=4, rank=2)[1](g[1, 2])
    np.testing.assert_allclose(single.k, first.k[1, 2], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- errors
def test_bad_cotangents_raise():
    q, k, v = qkv(20, seed=18)
    (out, _), pullback = exact_attention_vjp(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="g_out"):
        pullback(np.ones(out.shape[:-1] + (out.shape[-1] + 1,)))
    with pytest.raises(TypeError, match="g_out"):
        pullback(np.ones(out.shape, dtype=np.int64))
    with pytest.raises(ValueError, match="g_lse"):
        pullback(np.ones_like(out), np.ones(out.shape))
    with pytest.raises(ValueError, match="g_out"):
        pullback(np.full(out.shape, np.nan))
    _, pullback = fmm_attention_vjp(q, k, v, block_size=4, rank=2)
    with pytest.raises(ValueError, match="g_out"):
        pullback(np.ones((20, 3)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_nonfinite_cotangent_entry_is_named(bad):
    # the finiteness check of g_out is folded into delta = g . out: one bad entry must
    # still be found, also in a row whose output is 0 (a query with no valid key, where
    # inf * 0 is what makes delta non-finite) and in float32
    q, k, v = qkv(20, seed=31)
    mask = np.ones(20, dtype=bool)
    mask[:5] = False
    for dtype in (np.float64, np.float32):
        x = [a.astype(dtype) for a in (q, k, v)]
        for vjp, extra in ((exact_attention_vjp, dict(causal=True)), (fmm_attention_vjp, dict(block_size=4, rank=2))):
            out, pullback = vjp(*x, key_padding_mask=mask, **extra)
            rows = (0, 7) if vjp is exact_attention_vjp else (7,)  # causal: query 0 sees only masked keys
            for row in rows:
                g = np.ones_like(out)
                g[..., row, -1] = bad
                with pytest.raises(ValueError, match="g_out contains NaN or infinity"):
                    pullback(g)
                assert not np.isfinite(g[..., row, -1]).any()  # not modified
            np.testing.assert_array_equal(np.isfinite(pullback(np.ones_like(out)).q), True)


def test_unsupported_backends_and_options_raise():
    q, k, v = qkv(20, seed=19)
    with pytest.raises(ValueError, match="CUDA"):
        exact_attention_vjp(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="CUDA"):
        fmm_attention_vjp(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="causal"):
        fmm_attention_vjp(q, k, v, causal=True, query_coarsening=True)


# ---------------------------------------------------------------- Fastformer
def fastformer_inputs(n, *, lead=(2, 3), vec=(3,), d=4, seed=20, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(lead + (n, d)).astype(dtype) for _ in range(3))
    w_q, w_k = (rng.standard_normal(vec + (d,)).astype(dtype) for _ in range(2))
    return q, k, v, w_q, w_k


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("vec", [(3,), (), (2, 1)])
def test_fastformer_matches_finite_differences(causal, masked, vec):
    lead = (2, 3)
    params = list(fastformer_inputs(23, lead=lead, vec=vec))
    mask = None
    if masked:
        mask = np.random.default_rng(2).random(lead + (23,)) > 0.4
        mask[0, 0, :] = False  # an entry with no valid position
        mask[1, 2, :5] = False  # a causal prefix with none
    options = dict(causal=causal, key_padding_mask=mask, scale=0.9)
    u, pullback = fastformer_attention_vjp(*params, **options)
    np.testing.assert_array_equal(u, fastformer_attention(*params, **options))
    g = np.random.default_rng(3).standard_normal(u.shape)
    grads = pullback(g)
    for grad, x in zip(grads, params):
        assert grad.shape == x.shape
    directional(lambda xs: float(np.sum(g * fastformer_attention(*xs, **options))), list(grads), params)
    if masked:
        assert np.all(grads.q[~mask] == 0) and np.all(grads.k[~mask] == 0)


def test_fastformer_causal_future_zeros_and_large_logits():
    q, k, v, w_q, w_k = fastformer_inputs(30, lead=(2,), vec=())
    q = q * 300  # logits of size 1e3: the suffix sums must neither overflow nor give NaN
    u, pullback = fastformer_attention_vjp(q, k, v, w_q, w_k, causal=True)
    g = np.random.default_rng(0).standard_normal(u.shape)
    g[:, 13:] = 0
    grads = pullback(g)
    for grad in grads[:3]:
        assert np.all(np.isfinite(grad))
        assert np.all(grad[:, 13:] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_fastformer_float32_and_determinism(causal):
    params = fastformer_inputs(40, lead=(3,), vec=())
    g = np.random.default_rng(4).standard_normal(params[0].shape)
    want = fastformer_attention_vjp(*params, causal=causal)[1](g)
    got = fastformer_attention_vjp(*(x.astype(np.float32) for x in params), causal=causal)[1](g.astype(np.float32))
    for a, b in zip(got, want):
        assert a.dtype == np.float32
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)
    before = numba.get_num_threads()
    try:
        runs = []
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            runs.append(fastformer_attention_vjp(*params, causal=causal)[1](g))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_fastformer_errors():
    params = fastformer_inputs(10, lead=(2,), vec=())
    _, pullback = fastformer_attention_vjp(*params)
    with pytest.raises(ValueError, match="g_out"):
        pullback(np.ones((2, 10, 5)))
    with pytest.raises(ValueError, match="CUDA"):
        fastformer_attention_vjp(*params, backend="cuda")


# ---------------------------------------------------------------- memory estimates
def _vjp_call(name, q, k, v):
    if name == "exact":
        return exact_attention_vjp(q, k, v, causal=True)
    if name == "fmm":
        return fmm_attention_vjp(q, k, v, block_size=16, rank=2)
    return fastformer_attention_vjp(q, k, v, np.ones(q.shape[-1]), np.ones(q.shape[-1]))


@pytest.mark.parametrize("name", ["exact", "fmm", "fastformer"])
def test_vjp_refuses_a_huge_n_by_name_before_allocating(name):
    # zero-stride views of 8 bytes: copying one (as the validation would) needs 32 TiB, so
    # only an estimate made from the shapes alone can answer with the ValueError
    n = 2**40
    x = np.broadcast_to(np.zeros(1), (n, 4))
    with pytest.raises(ValueError, match=f"n={n} needs about .* GiB"):
        _vjp_call(name, x, x, x)


@pytest.mark.parametrize("name", ["exact", "fmm", "fastformer"])
def test_vjp_estimate_counts_residuals_and_backward(monkeypatch, name):
    """A call whose forward fits the limit but whose forward + residuals + backward do not
    is refused by the VJP (before its forward runs)."""
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 2, 512, 8))
    monkeypatch.setattr(_config, "MAX_CALL_BYTES", 2 * 4 * q.nbytes)  # twice q, k, v and the output
    forward = {"exact": lambda: exact_attention(q, k, v, causal=True),
               "fmm": lambda: fmm_attention(q, k, v, block_size=16, rank=2),
               "fastformer": lambda: fastformer_attention(q, k, v, np.ones(8), np.ones(8))}[name]
    forward()  # the plain forward fits
    with pytest.raises(ValueError, match="n=512 needs about .*backward buffers"):
        _vjp_call(name, q, k, v)
    monkeypatch.setattr(_config, "MAX_CALL_BYTES", 64 * 4 * q.nbytes)
    out, pullback = _vjp_call(name, q, k, v)
    pullback(np.ones_like(out))
