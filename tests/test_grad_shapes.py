"""FMA's VJP on the shapes its forward takes (shared/spec/shapes-and-decoding.md): broadcast
leading dims, grouped heads (``Hq = g * Hk``) and ``n_q != n_k`` with ``query_offset``.

Each against central finite differences of the library's own forward in float64 (one
random direction per check, as in test_grad.py), grouped heads also against the VJP of the
same call with ``k``/``v`` repeated over the group (its gradients summed over the group),
and the sums over a group bitwise the same across thread counts.
"""

import numba
import numpy as np
import pytest

from fmm_attention import LearnedCoarsening, build_tree, fmm_attention
from fmm_attention.grad import fmm_attention_vjp

H = 1e-5
RTOL = 1e-6


def arrays(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


def check(q, k, v, *, with_lse=True, seed=3, **options):
    """The pullback's gradients against central differences of ``fmm_attention``."""
    rng = np.random.default_rng(seed)
    (out, lse), pullback = fmm_attention_vjp(q, k, v, return_lse=True, **options)
    np.testing.assert_array_equal(out, fmm_attention(q, k, v, **options))  # the forward itself
    g = rng.standard_normal(out.shape)
    g_lse = rng.standard_normal(lse.shape) if with_lse else None
    grads = pullback(g, g_lse)
    for grad, x in zip(grads[:3], (q, k, v)):
        assert grad.shape == x.shape

    def loss(params):
        o, s = fmm_attention(*params, return_lse=True, **options)
        return float(np.sum(g * o) + (np.sum(g_lse * s) if with_lse else 0.0))

    params = [q, k, v]
    u = [rng.standard_normal(p.shape) for p in params]
    fd = (loss([p + H * x for p, x in zip(params, u)]) - loss([p - H * x for p, x in zip(params, u)])) / (2 * H)
    an = sum(float(np.sum(gr * x)) for gr, x in zip(grads[:3], u))
    assert abs(fd - an) <= RTOL * max(abs(an), 1.0), (fd, an)
    assert abs(an) > 1e-3
    return grads


def grouped_inputs(n=45, *, batch=2, hq=4, hk=2, d=4, dv=3, seed=0):
    return arrays((batch, hq, n, d), (batch, hk, n, d), (batch, hk, n, dv), seed=seed)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_heads_match_finite_differences(causal, masked):
    q, k, v = grouped_inputs()
    mask = None
    if masked:  # one mask per key head (a group shares its coarse keys), broadcast over the heads
        mask = np.random.default_rng(1).random((2, 1, 45)) > 0.3
        mask[..., 0] = True
    check(q, k, v, causal=causal, block_size=4, rank=2, key_padding_mask=mask)


@pytest.mark.parametrize("options", [
    dict(block_size=4, rank=2, causal=True),
    dict(block_size=4, rank=2, global_tokens=[0, 9]),
    dict(block_size=8, rank=2, coarsening="cluster"),
    dict(block_size=4, rank=2, refine=5),
    dict(block_size=4, rank=2, query_coarsening=True),
])
def test_grouped_heads_equal_repeated_keys_summed_over_the_group(options):
    q, k, v = grouped_inputs(seed=4)
    g_heads = q.shape[1] // k.shape[1]
    out, pullback = fmm_attention_vjp(q, k, v, **options)
    rep_out, rep_pullback = fmm_attention_vjp(q, np.repeat(k, g_heads, axis=1), np.repeat(v, g_heads, axis=1),
                                              **options)
    np.testing.assert_allclose(out, rep_out, rtol=1e-13, atol=1e-15)
    g = np.random.default_rng(7).standard_normal(out.shape)
    got, want = pullback(g), rep_pullback(g)
    np.testing.assert_allclose(got.q, want.q, rtol=1e-12, atol=1e-14)
    for grad, full in ((got.k, want.k), (got.v, want.v)):
        summed = full.reshape(full.shape[0], -1, g_heads, *full.shape[2:]).sum(axis=2)
        np.testing.assert_allclose(grad, summed, rtol=1e-12, atol=1e-14)


def test_grouped_learned_coarsening_weights():
    n, m, p = 40, 4, 2
    q, k, v = grouped_inputs(n, d=3, dv=3, seed=8)
    tree = build_tree(n, block_size=m, rank=p)
    rng = np.random.default_rng(2)
    kw = [rng.standard_normal((lv.rank * 3, 1, lv.box_size)) / lv.box_size for lv in tree.levels]
    vw = [rng.standard_normal((lv.rank * 3, 1, lv.box_size)) / lv.box_size for lv in tree.levels]
    opts = dict(block_size=m, rank=p, coarsening=LearnedCoarsening(kw, vw))
    grads = check(q, k, v, **opts)
    # the weights see each key head once, however many query heads read it
    rep = fmm_attention_vjp(q, np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1), **opts)[1]
    g = np.random.default_rng(9).standard_normal(q.shape[:-1] + (3,))
    got, want = fmm_attention_vjp(q, k, v, **opts)[1](g).coarsening, rep(g).coarsening
    for a_list, b_list in zip(got, want):
        for a, b in zip(a_list, b_list):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)
    assert grads.coarsening is not None


@pytest.mark.parametrize("shapes", [
    ((3, 45, 4), (1, 45, 4), (1, 45, 3)),        # one key set for every batch entry
    ((1, 45, 4), (3, 45, 4), (3, 45, 3)),        # one query set against three key sets
    ((2, 1, 45, 4), (1, 3, 45, 4), (1, 3, 45, 3)),  # both broadcast
    ((2, 45, 4), (45, 4), (45, 3)),              # k, v with fewer dims
])
@pytest.mark.parametrize("causal", [False, True])
def test_broadcast_leading_dims_match_finite_differences(shapes, causal):
    q, k, v = arrays(*shapes, seed=5)
    check(q, k, v, causal=causal, block_size=4, rank=2)


def test_broadcast_with_refine_matches_finite_differences():
    q, k, v = arrays((3, 45, 4), (1, 45, 4), (1, 45, 3), seed=6)
    check(q, k, v, block_size=4, rank=2, refine=4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q, offset", [(13, None), (13, 7), (1, None), (1, 0), (45, None)])
def test_cross_lengths_match_finite_differences(causal, n_q, offset):
    # queries at key positions offset + i (default n_k - n_q): the rows of self-attention
    q, k, v = arrays((2, n_q, 4), (2, 45, 4), (2, 45, 3), seed=10 + n_q)
    mask = np.random.default_rng(2).random((2, 45)) > 0.3
    mask[:, 0] = True
    check(q, k, v, causal=causal, block_size=4, rank=2, query_offset=offset, key_padding_mask=mask)


def test_cross_lengths_are_rows_of_the_self_attention_gradient():
    # query rows q[:, a:b] at offset a: with a cotangent only on those rows, the gradient
    # of self-attention is exactly that of the chunk (k, v) plus dq on the rows
    q, k, v = arrays((2, 2, 45, 4), (2, 1, 45, 4), (2, 1, 45, 3), seed=12)
    opts = dict(block_size=4, rank=2, causal=True)
    g = np.zeros(q.shape[:-1] + (3,))
    g[..., 20:31, :] = np.random.default_rng(3).standard_normal(g[..., 20:31, :].shape)
    full = fmm_attention_vjp(q, k, v, **opts)[1](g)
    part = fmm_attention_vjp(q[..., 20:31, :], k, v, query_offset=20, **opts)[1](g[..., 20:31, :])
    np.testing.assert_allclose(part.q, full.q[..., 20:31, :], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(part.k, full.k, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(part.v, full.v, rtol=1e-12, atol=1e-14)
    assert np.all(full.q[..., :20, :] == 0)


def test_cross_lengths_refuse_what_the_forward_refuses():
    q, k, v = arrays((2, 13, 4), (2, 45, 4), (2, 45, 3), seed=13)
    for opts in (dict(refine=4), dict(query_coarsening=True)):
        with pytest.raises(ValueError, match="n_q != n_k"):
            fmm_attention_vjp(q, k, v, block_size=4, rank=2, **opts)
    with pytest.raises(NotImplementedError, match="per-sequence global_tokens"):
        fmm_attention_vjp(q, k, v, block_size=4, rank=2, global_tokens=np.zeros((2, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="Hq"):
        fmm_attention_vjp(*arrays((2, 3, 8, 4), (2, 2, 8, 4), (2, 2, 8, 3)), block_size=4, rank=2)


def test_grouped_sums_bitwise_deterministic_across_threads():
    q, k, v = grouped_inputs(70, seed=14)
    mask = np.random.default_rng(5).random((2, 2, 1, 70)) > 0.3  # per key head
    mask = np.broadcast_to(mask, (2, 2, 2, 70)).reshape(2, 4, 70)
    g = np.random.default_rng(4).standard_normal(q.shape[:-1] + (3,))
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS), 1):
            numba.set_num_threads(threads)
            results.append(fmm_attention_vjp(q, k, v, block_size=4, rank=2, causal=True, key_padding_mask=mask,
                                             query_offset=None)[1](g))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0][:3], other[:3]):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- Fastformer
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shapes", [((2, 3, 20, 4), (1, 3, 20, 4)), ((3, 20, 4), (2, 1, 20, 4))])
def test_fastformer_broadcast_leading_dims(shapes, causal):
    # The forward broadcasts q against k, v (copying the rows once); the VJP sums the
    # gradients back onto each input's own rows. Against finite differences, and against
    # the call on explicitly broadcast inputs whose gradients are summed by hand.
    from fmm_attention import fastformer_attention
    from fmm_attention.grad import fastformer_attention_vjp

    q_shape, kv_shape = shapes
    q, k, v = arrays(q_shape, kv_shape, kv_shape, seed=5)
    w_q, w_k = arrays((4,), (4,), seed=6)
    rng = np.random.default_rng(7)
    out, pullback = fastformer_attention_vjp(q, k, v, w_q, w_k, causal=causal)
    np.testing.assert_array_equal(out, fastformer_attention(q, k, v, w_q, w_k, causal=causal))
    g = rng.standard_normal(out.shape)
    grads = pullback(g)
    for grad, x in zip(grads[:3], (q, k, v)):
        assert grad.shape == x.shape

    full = np.broadcast_shapes(q.shape, k.shape)
    qb, kb, vb = (np.ascontiguousarray(np.broadcast_to(x, full)) for x in (q, k, v))
    ref = fastformer_attention_vjp(qb, kb, vb, w_q, w_k, causal=causal)[1](g)
    for grad, x, r in zip(grads[:3], (q, k, v), ref[:3]):
        axes = tuple(i for i in range(len(full)) if i < len(full) - x.ndim or x.shape[i - len(full) + x.ndim] == 1)
        np.testing.assert_allclose(grad, r.sum(axis=axes).reshape(x.shape), rtol=1e-12, atol=1e-12)

    def loss(params):
        return float(np.sum(g * fastformer_attention(*params, w_q, w_k, causal=causal)))

    u = [rng.standard_normal(x.shape) for x in (q, k, v)]
    fd = (loss([x + H * e for x, e in zip((q, k, v), u)]) - loss([x - H * e for x, e in zip((q, k, v), u)])) / (2 * H)
    an = sum(float(np.sum(gr * e)) for gr, e in zip(grads[:3], u))
    assert abs(fd - an) <= RTOL * max(abs(an), 1.0), (fd, an)
