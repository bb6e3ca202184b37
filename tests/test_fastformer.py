"""Fastformer additive attention: against the dense oracle and the spec's properties.

``shared/spec/fastformer.md`` lists the properties; each has a test here. Sizes are tiny;
the bidirectional chunk length is patched small (it is a runtime argument of the kernels,
read from ``_config`` at call time) so short sequences still span several chunks.
"""

import numpy as np
import pytest

from fmm_attention import _config, fastformer_attention
from reference import fastformer_reference

SMALL_CHUNK = 3


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=[SMALL_CHUNK, None], ids=["chunk3", "chunk_default"])
def chunk(request, monkeypatch):
    """Run each test with many small chunks and with the default chunk length."""
    if request.param is not None:
        monkeypatch.setattr(_config, "FASTFORMER_CHUNK", request.param)
    return request.param


def make_inputs(rng, lead, n, d, dtype=np.float64):
    q, k, v = (rng.standard_normal(lead + (n, d)).astype(dtype) for _ in range(3))
    w_q, w_k = (rng.standard_normal(d).astype(dtype) for _ in range(2))
    return q, k, v, w_q, w_k


def rel_err(actual, expected):
    return np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected)


def check_against_reference(q, k, v, w_q, w_k, *, causal, valid=None, scale=None, rtol=1e-12):
    u, qg, kg = fastformer_attention(q, k, v, w_q, w_k, causal=causal, key_padding_mask=valid, scale=scale,
                                     return_pools=True)
    ru, rqg, rkg = fastformer_reference(q, k, v, w_q, w_k, causal=causal, valid=valid, scale=scale)
    for name, got, want in (("u", u, ru), ("qg", qg, rqg), ("kg", kg, rkg)):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=name)


# --- the dense oracle ------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("n", [1, 2, 7, 16, 31])
def test_matches_reference(rng, chunk, n, causal):
    q, k, v, w_q, w_k = make_inputs(rng, (), n, 5)
    check_against_reference(q, k, v, w_q, w_k, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_matches_reference_masked_and_scaled(rng, chunk, causal):
    n = 13
    q, k, v, w_q, w_k = make_inputs(rng, (), n, 4)
    valid = rng.random(n) < 0.6
    valid[[0, 5, 6, 7]] = False  # a masked start and a masked run across a chunk boundary
    check_against_reference(q, k, v, w_q, w_k, causal=causal, valid=valid, scale=0.7)


def test_output_is_global_key_times_values(rng, chunk):
    q, k, v, w_q, w_k = make_inputs(rng, (2,), 9, 3)
    u, qg, kg = fastformer_attention(q, k, v, w_q, w_k, return_pools=True)
    assert qg.shape == kg.shape == (2, 3)
    np.testing.assert_allclose(u, kg[:, None, :] * v, rtol=1e-14)
    u, qg, kg = fastformer_attention(q, k, v, w_q, w_k, causal=True, return_pools=True)
    assert qg.shape == kg.shape == (2, 9, 3)
    np.testing.assert_allclose(u, kg * v, rtol=1e-14)


def test_chunk_length_does_not_change_the_result(rng, monkeypatch):
    q, k, v, w_q, w_k = make_inputs(rng, (2,), 23, 4)
    results = []
    for chunk in (1, 2, 5, 23, 4096):
        monkeypatch.setattr(_config, "FASTFORMER_CHUNK", chunk)
        results.append(fastformer_attention(q, k, v, w_q, w_k, return_pools=True))
    for result in results[1:]:
        for got, want in zip(result, results[0]):
            np.testing.assert_allclose(got, want, rtol=1e-13)


def test_causal_scan_chunks_do_not_change_the_result(rng, monkeypatch):
    """The causal scan carries each pool's state across chunk boundaries, masked runs too."""
    q, k, v, w_q, w_k = make_inputs(rng, (2,), 29, 4)
    valid = rng.random((2, 29)) < 0.6
    valid[0, :7] = False  # chunks (of 1, 2, 5) that start masked, before any valid position
    valid[1, 9:17] = False  # a masked run across chunk boundaries after valid positions
    want = fastformer_reference(q[0], k[0], v[0], w_q, w_k, causal=True, valid=valid[0])
    results = []
    for chunk in (1, 2, 5, 29, 4096):
        monkeypatch.setattr(_config, "FASTFORMER_CHUNK", chunk)
        results.append(fastformer_attention(q, k, v, w_q, w_k, causal=True, key_padding_mask=valid,
                                            return_pools=True))
    for result in results:
        for got, ref in zip(result, want):
            np.testing.assert_allclose(got[0], ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
        for got, first in zip(result, results[0]):
            np.testing.assert_allclose(got, first, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_result_does_not_depend_on_the_thread_count(rng, monkeypatch, causal):
    """Chunks are fixed by the chunk length, not by the threads: bitwise the same results."""
    import numba

    monkeypatch.setattr(_config, "FASTFORMER_CHUNK", 4)
    q, k, v, w_q, w_k = make_inputs(rng, (3,), 37, 4, dtype=np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            results.append(fastformer_attention(q, k, v, w_q, w_k, causal=causal, return_pools=True))
    finally:
        numba.set_num_threads(before)
    for result in results[1:]:
        for got, want in zip(result, results[0]):
            np.testing.assert_array_equal(got, want)


# --- leading dims ----------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_one_vector_per_head(rng, chunk, causal):
    b, h, n, d = 2, 3, 8, 4
    q, k, v, _, _ = make_inputs(rng, (b, h), n, d)
    w_q, w_k = rng.standard_normal((2, h, d))
    u, qg, kg = fastformer_attention(q, k, v, w_q, w_k, causal=causal, return_pools=True)
    assert u.shape == (b, h, n, d)
    assert qg.shape == kg.shape == ((b, h, n, d) if causal else (b, h, d))
    for i in range(b):
        for j in range(h):
            ru, rqg, rkg = fastformer_reference(q[i, j], k[i, j], v[i, j], w_q[j], w_k[j], causal=causal)
            np.testing.assert_allclose(u[i, j], ru, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(qg[i, j], rqg, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(kg[i, j], rkg, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("w_shape", [(4,), (1, 4), (3, 4), (2, 1, 4), (2, 3, 4)])
def test_vectors_broadcast_like_numpy(rng, w_shape):
    q, k, v, _, _ = make_inputs(rng, (2, 3), 6, 4)
    w_q, w_k = rng.standard_normal((2,) + w_shape)
    u = fastformer_attention(q, k, v, w_q, w_k)
    full_q, full_k = (np.broadcast_to(w, (2, 3, 4)) for w in (w_q, w_k))
    for i in range(2):
        for j in range(3):
            ru, _, _ = fastformer_reference(q[i, j], k[i, j], v[i, j], full_q[i, j], full_k[i, j])
            np.testing.assert_allclose(u[i, j], ru, rtol=1e-12, atol=1e-14)


# --- causality -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_causal_future_changes_no_past_output(rng, name):
    n, t = 12, 7
    q, k, v, w_q, w_k = make_inputs(rng, (), n, 4)
    before = fastformer_attention(q, k, v, w_q, w_k, causal=True, return_pools=True)
    inputs = {"q": q.copy(), "k": k.copy(), "v": v.copy()}
    inputs[name][t:] += 3 * rng.standard_normal(inputs[name][t:].shape)
    after = fastformer_attention(inputs["q"], inputs["k"], inputs["v"], w_q, w_k, causal=True, return_pools=True)
    for got, want in zip(after, before):
        np.testing.assert_array_equal(got[:t], want[:t])
    assert not np.allclose(after[0][t:], before[0][t:])  # the perturbation did reach the output


def test_causal_prefix_pools_are_bidirectional_pools_of_the_prefix(rng, chunk):
    n, d = 11, 4
    q, k, v, w_q, w_k = make_inputs(rng, (), n, d)
    _, qg, kg = fastformer_attention(q, k, v, w_q, w_k, causal=True, return_pools=True)
    p = qg * k  # p_j = qg(j) * k_j, each with its own prefix global query
    ones = np.ones((n, d))
    for i in range(n):
        _, qg_prefix, _ = fastformer_attention(q[: i + 1], k[: i + 1], v[: i + 1], w_q, w_k, return_pools=True)
        np.testing.assert_allclose(qg[i], qg_prefix, rtol=1e-12)
        # The key pool of the prefix, pooled from the prefix's own p_j: with all-ones queries
        # the global query is all ones, so the bidirectional key pool of keys p_j is kg(i).
        _, _, kg_prefix = fastformer_attention(ones[: i + 1], p[: i + 1], v[: i + 1], w_q, w_k, return_pools=True)
        np.testing.assert_allclose(kg[i], kg_prefix, rtol=1e-12)


# --- softmax shift invariance and huge logits ------------------------------------------


def shifted(q, k, v, w_q, w_k, scale, alpha_shift, beta_shift):
    """Inputs with one extra feature that adds the given constants to every alpha / beta logit.

    The extra query feature is 1 everywhere, so the global query's extra feature is 1 and
    the extra feature of every ``p_j`` is the extra key feature, 1. The extra value feature
    is 0, so the first ``d`` output features are those of the original inputs.
    """
    lead = q.shape[:-1]
    one = np.ones(lead + (1,), q.dtype)
    q2 = np.concatenate([q, one], axis=-1)
    k2 = np.concatenate([k, one], axis=-1)
    v2 = np.concatenate([v, 0 * one], axis=-1)
    w_q2 = np.append(w_q, alpha_shift / scale).astype(q.dtype)
    w_k2 = np.append(w_k, beta_shift / scale).astype(q.dtype)
    return q2, k2, v2, w_q2, w_k2


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shifts", [(1e4, -1e4), (-1e4, 1e4), (37.0, 0.0), (0.0, -37.0)])
def test_shifting_the_logits_changes_nothing(rng, chunk, causal, shifts):
    q, k, v, w_q, w_k = make_inputs(rng, (2,), 10, 4)
    scale = 0.5
    want = fastformer_attention(q, k, v, w_q, w_k, causal=causal, scale=scale)
    got = fastformer_attention(*shifted(q, k, v, w_q, w_k, scale, *shifts), causal=causal, scale=scale)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[..., :4], want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shifts", [(1e4, 1e4), (-1e4, -1e4), (1e4, -1e4)])
def test_logits_of_size_1e4_in_float32(rng, chunk, causal, shifts):
    q, k, v, w_q, w_k = make_inputs(rng, (2,), 40, 4, np.float32)
    scale = 0.5
    inputs = shifted(q, k, v, w_q, w_k, scale, *shifts)
    u, qg, kg = fastformer_attention(*inputs, causal=causal, scale=scale, return_pools=True)
    assert u.dtype == qg.dtype == kg.dtype == np.float32
    assert np.isfinite(u).all() and np.isfinite(qg).all() and np.isfinite(kg).all()
    for i in range(2):
        ru, _, _ = fastformer_reference(*(x[i] for x in inputs[:3]), *inputs[3:], causal=causal, scale=scale)
        # A float32 logit near 1e4 carries an absolute rounding error of ~1e-3 (its ulp),
        # which perturbs the softmax weights by ~1e-3 relative: that is the conditioning.
        assert rel_err(u[i], ru) < 5e-3


# --- masks -----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_masked_positions_change_nothing(rng, chunk, causal):
    n = 14
    q, k, v, w_q, w_k = make_inputs(rng, (2,), n, 4)
    valid = rng.random((2, n)) < 0.6
    valid[:, [0, 6]] = [[False, True], [True, False]]
    before = fastformer_attention(q, k, v, w_q, w_k, causal=causal, key_padding_mask=valid, return_pools=True)
    q2, k2 = q.copy(), k.copy()
    q2[~valid] = 1e3 * rng.standard_normal(q2[~valid].shape)
    k2[~valid] = 1e3 * rng.standard_normal(k2[~valid].shape)
    after = fastformer_attention(q2, k2, v, w_q, w_k, causal=causal, key_padding_mask=valid, return_pools=True)
    for got, want in zip(after, before):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_padding_equals_the_unpadded_sequence(rng, chunk, causal):
    n = 15
    q, k, v, w_q, w_k = make_inputs(rng, (), n, 4)
    valid = rng.random(n) < 0.5
    valid[[2, 9]] = True
    u, qg, kg = fastformer_attention(q, k, v, w_q, w_k, causal=causal, key_padding_mask=valid, return_pools=True)
    cu, cqg, ckg = fastformer_attention(q[valid], k[valid], v[valid], w_q, w_k, causal=causal, return_pools=True)
    np.testing.assert_allclose(u[valid], cu, rtol=1e-12)
    np.testing.assert_allclose((qg[valid], kg[valid]) if causal else (qg, kg), (cqg, ckg), rtol=1e-12)
    # A masked position's output is still the (prefix) global key times its own value.
    np.testing.assert_allclose(u[~valid], (kg[~valid] if causal else kg) * v[~valid], rtol=1e-14)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_no_valid_position_gives_zeros(rng, chunk, causal):
    n = 8
    q, k, v, w_q, w_k = make_inputs(rng, (2,), n, 3)
    valid = np.ones((2, n), bool)
    valid[0] = False  # a sequence with no valid position at all
    valid[1, :5] = False  # causally, positions 0..4 see none
    u, qg, kg = fastformer_attention(q, k, v, w_q, w_k, causal=causal, key_padding_mask=valid, return_pools=True)
    assert np.isfinite(u).all() and np.isfinite(qg).all() and np.isfinite(kg).all()
    assert not u[0].any() and not qg[0].any() and not kg[0].any()
    if causal:
        assert not u[1, :5].any() and not qg[1, :5].any() and not kg[1, :5].any()
        assert u[1, 5:].all()
    else:
        assert u[1].all()


# --- dtypes ----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_float32_matches_float64(rng, chunk, causal):
    q, k, v, w_q, w_k = make_inputs(rng, (2,), 50, 8)
    u64, qg64, kg64 = fastformer_attention(q, k, v, w_q, w_k, causal=causal, return_pools=True)
    single = [x.astype(np.float32) for x in (q, k, v, w_q, w_k)]
    u32, qg32, kg32 = fastformer_attention(*single, causal=causal, return_pools=True)
    assert u32.dtype == qg32.dtype == kg32.dtype == np.float32
    for got, want in ((u32, u64), (qg32, qg64), (kg32, kg64)):
        assert rel_err(got, want) < 1e-5


def test_float16_computes_in_float32_and_vectors_take_the_input_dtype(rng):
    q, k, v, w_q, w_k = make_inputs(rng, (), 6, 4)
    half = [x.astype(np.float16) for x in (q, k, v)]
    assert fastformer_attention(*half, w_q, w_k).dtype == np.float32
    assert fastformer_attention(*(x.astype(np.float32) for x in (q, k, v)), w_q, w_k).dtype == np.float32
    assert fastformer_attention(q, k, v, w_q.astype(np.float32), w_k.astype(np.float16)).dtype == np.float64


def test_array_likes_are_accepted(rng):
    q, k, v, w_q, w_k = make_inputs(rng, (), 5, 3)
    got = fastformer_attention(q.tolist(), k.tolist(), v.tolist(), w_q.tolist(), w_k.tolist())
    np.testing.assert_array_equal(got, fastformer_attention(q, k, v, w_q, w_k))


# --- bad inputs and side effects -------------------------------------------------------


def _nan(x):
    x = x.copy()
    x.flat[1] = np.nan
    return x


BAD = {
    "w_q integer": (dict(w_q=lambda a: a["w_q"].astype(int)), TypeError, "w_q"),
    "w_k complex": (dict(w_k=lambda a: a["w_k"] + 0j), TypeError, "w_k"),
    "w_q 0-d": (dict(w_q=lambda a: np.float64(1.0)), ValueError, "w_q"),
    "w_q wrong d": (dict(w_q=lambda a: np.ones(5)), ValueError, "w_q"),
    "w_k no broadcast": (dict(w_k=lambda a: np.ones((4, 4))), ValueError, "w_k"),
    "w_q too many dims": (dict(w_q=lambda a: np.ones((5, 2, 3, 4))), ValueError, "w_q"),
    "w_q nan": (dict(w_q=lambda a: _nan(a["w_q"])), ValueError, "w_q"),
    "w_k inf": (dict(w_k=lambda a: a["w_k"] * np.inf), ValueError, "w_k"),
    "v other d": (dict(v=lambda a: a["v"][..., :3]), ValueError, "v must have the feature dim"),
    "q integer": (dict(q=lambda a: a["q"].astype(int)), TypeError, "q"),
    "k nan": (dict(k=lambda a: _nan(a["k"])), ValueError, "k contains NaN"),
    "k shorter": (dict(k=lambda a: a["k"][..., :4, :]), ValueError, "sequence length"),
    "mask not bool": (dict(key_padding_mask=lambda a: np.ones((2, 3, 6), int)), TypeError, "key_padding_mask"),
    "mask shape": (dict(key_padding_mask=lambda a: np.ones((4, 6), bool)), ValueError, "key_padding_mask"),
    "causal not bool": (dict(causal=lambda a: "yes"), TypeError, "causal"),
    "return_pools not bool": (dict(return_pools=lambda a: 1), TypeError, "return_pools"),
    "check_finite not bool": (dict(check_finite=lambda a: None), TypeError, "check_finite"),
    "scale not a number": (dict(scale=lambda a: "big"), TypeError, "scale"),
    "scale nan": (dict(scale=lambda a: np.nan), ValueError, "scale"),
    "backend unknown": (dict(backend=lambda a: "gpu"), ValueError, "backend"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_inputs_raise_clear_errors(rng, case):
    changes, error, message = BAD[case]
    q, k, v, _, _ = make_inputs(rng, (2, 3), 6, 4)
    args = dict(q=q, k=k, v=v, w_q=rng.standard_normal((3, 4)), w_k=rng.standard_normal(4))
    args.update({name: make(args) for name, make in changes.items()})
    with pytest.raises(error, match=message):
        fastformer_attention(**args)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inputs_are_never_modified(rng, causal, dtype):
    q, k, v, w_q, w_k = make_inputs(rng, (2,), 9, 4, dtype)
    valid = rng.random((2, 9)) < 0.7
    args = (q, k, v, w_q, w_k, valid)
    copies = [x.copy() for x in args]
    fastformer_attention(*args[:5], causal=causal, key_padding_mask=valid, return_pools=True)
    for got, want in zip(args, copies):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_unchecked_nan_returns_instead_of_crashing(rng, causal):
    q, k, v, w_q, w_k = make_inputs(rng, (), 6, 3)
    u = fastformer_attention(_nan(q), k, v, w_q, w_k, causal=causal, check_finite=False)
    assert u.shape == (6, 3)


def test_empty_leading_dims_give_empty_results(rng):
    q = np.zeros((0, 3, 5, 4))
    w = rng.standard_normal((3, 4))
    u, qg, kg = fastformer_attention(q, q, q, w, w, return_pools=True)
    assert u.shape == (0, 3, 5, 4) and qg.shape == kg.shape == (0, 3, 4)
    u, qg, kg = fastformer_attention(q, q, q, w, w, causal=True, return_pools=True)
    assert u.shape == qg.shape == kg.shape == (0, 3, 5, 4)


# --------------------------------------------------------------------------- the fused check_finite
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_fused_check_finds_one_bad_element_anywhere(rng, dtype, causal, which, monkeypatch):
    """The CPU kernels check finiteness as they read (no separate pass): one NaN or
    infinity at any position of any chunk, masked or not, first or last row, is found and
    named, as the separate check found it; a finite call gives the bits of an unchecked one."""
    monkeypatch.setattr(_config, "FASTFORMER_CHUNK", 4)
    q, k, v, w_q, w_k = make_inputs(rng, (2,), 11, 5, dtype)
    valid = rng.random((2, 11)) < 0.6
    valid[:, 0] = True
    masked = tuple(np.argwhere(~valid)[0])
    args = dict(q=q, k=k, v=v)
    for mask in (None, valid):
        want = fastformer_attention(q, k, v, w_q, w_k, causal=causal, key_padding_mask=mask, return_pools=True,
                                    check_finite=False)
        got = fastformer_attention(q, k, v, w_q, w_k, causal=causal, key_padding_mask=mask, return_pools=True)
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)
        for where in ((0, 0, 0), (1, 10, 4), (1, 6, 2), masked + (3,)):
            for bad in (np.nan, np.inf, -np.inf):
                arrays = {name: x.copy() for name, x in args.items()}
                arrays[which][where] = bad
                with pytest.raises(ValueError, match=f"^{which} contains NaN or infinity"):
                    fastformer_attention(arrays["q"], arrays["k"], arrays["v"], w_q, w_k, causal=causal,
                                         key_padding_mask=mask)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_fused_check_names_the_first_bad_input_and_reads_no_extra_pass(rng, causal, monkeypatch):
    from fmm_attention import _validate

    q, k, v, w_q, w_k = make_inputs(rng, (), 9, 4)
    checked = []
    real = _validate.check_finite_array
    monkeypatch.setattr(_validate, "check_finite_array", lambda arr, name, valid=None: (checked.append(name),
                                                                                         real(arr, name, valid)))
    import fmm_attention._shapes as shapes

    monkeypatch.setattr(shapes, "check_finite_array", _validate.check_finite_array)
    fastformer_attention(q, k, v, w_q, w_k, causal=causal)
    assert checked == ["w_q", "w_k"]  # the vectors alone: the kernels checked q, k and v
    for names in (("k", "v"), ("q", "v"), ("q", "k", "v")):
        arrays = dict(q=q.copy(), k=k.copy(), v=v.copy())
        for name in names:
            arrays[name][4, 1] = np.inf
        with pytest.raises(ValueError, match=f"^{names[0]} contains"):
            fastformer_attention(arrays["q"], arrays["k"], arrays["v"], w_q, w_k, causal=causal)
