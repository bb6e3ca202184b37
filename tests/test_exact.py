"""exact_attention against the dense NumPy oracle (reference.exact_reference)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from fmm_attention import _config, exact_attention

RTOL64 = 1e-11


def rand(seed, *shape, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def reference_batched(q, k, v, *, causal=False, scale=None, valid=None):
    """exact_reference over flattened leading dims."""
    lead, n = q.shape[:-2], q.shape[-2]
    q2, k2, v2 = (x.reshape(-1, n, x.shape[-1]) for x in (q, k, v))
    valid2 = None if valid is None else np.asarray(valid).reshape(-1, n)
    outs, lses = [], []
    for b in range(q2.shape[0]):
        o, s = reference.exact_reference(q2[b], k2[b], v2[b], causal=causal, scale=scale,
                                         valid=None if valid2 is None else valid2[b])
        outs.append(o)
        lses.append(s)
    return np.array(outs).reshape(lead + (n, v.shape[-1])), np.array(lses).reshape(lead + (n,))


def assert_lse_equal(got, want, rtol=RTOL64, atol=1e-11):
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    assert np.isfinite(got[fin]).all()
    np.testing.assert_allclose(got[fin], want[fin], rtol=rtol, atol=atol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 2, 7, 63, 64, 65, 200])
def test_matches_reference(n, causal):
    q, k, v = rand(n, 3, 2, n, 8)
    out, lse = exact_attention(q, k, v, causal=causal, return_lse=True)
    want, want_lse = reference_batched(q, k, v, causal=causal)
    assert out.dtype == np.float64 and out.shape == (2, n, 8) and lse.shape == (2, n)
    np.testing.assert_allclose(out, want, rtol=RTOL64, atol=1e-12)
    assert_lse_equal(lse, want_lse)


@pytest.mark.parametrize("causal", [False, True])
def test_several_key_tiles(causal):
    """n > EXACT_KEY_TILE: the online softmax merges several key tiles (and query tiles)."""
    n = _config.EXACT_KEY_TILE + 88
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, n, 3)) * 2.0
    k[-5:] *= 4  # the last tile holds the largest logits: the running max must be rescaled
    v = rng.standard_normal((n, 5))
    valid = rng.random(n) > 0.2
    for mask in (None, valid):
        out, lse = exact_attention(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True)
        want, want_lse = reference.exact_reference(q, k, v, causal=causal, valid=mask)
        np.testing.assert_allclose(out, want, rtol=RTOL64, atol=1e-12)
        assert_lse_equal(lse, want_lse)


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(causal):
    n = 150
    q, k, v = rand(5, 3, 3, n, 4)
    valid = np.random.default_rng(6).random((3, n)) > 0.3
    valid[0, 0] = False  # causal: query 0 of head 0 has no valid key
    valid[1, :] = False  # head 1: no valid key at all
    valid[2, 40:] = False
    out, lse = exact_attention(q, k, v, causal=causal, key_padding_mask=valid, return_lse=True)
    want, want_lse = reference_batched(q, k, v, causal=causal, valid=valid)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, rtol=RTOL64, atol=1e-12)
    assert_lse_equal(lse, want_lse)
    np.testing.assert_array_equal(out[1], 0)
    assert np.isneginf(lse[1]).all()
    if causal:
        np.testing.assert_array_equal(out[0, 0], 0)
        assert np.isneginf(lse[0, 0])
    # masked keys change nothing, whatever they hold
    k2, v2 = k.copy(), v.copy()
    k2[~valid] = 1e3
    v2[~valid] = -7e2
    np.testing.assert_array_equal(exact_attention(q, k2, v2, causal=causal, key_padding_mask=valid), out)


def test_all_keys_masked_float32_no_nan():
    q, k, v = rand(7, 3, 1, 70, 4, dtype=np.float32)
    out, lse = exact_attention(q, k, v, key_padding_mask=np.zeros((1, 70), bool), return_lse=True)
    assert out.dtype == np.float32 and not np.isnan(out).any()
    np.testing.assert_array_equal(out, 0)
    assert np.isneginf(lse).all()


@pytest.mark.parametrize("causal", [False, True])
def test_value_dim_differs_and_leading_dims(causal):
    n = 37
    q, k = rand(8, 2, 2, 3, 1, n, 5)
    v = rand(9, 2, 3, 1, n, 11)
    out, lse = exact_attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == (2, 3, 1, n, 11) and lse.shape == (2, 3, 1, n)
    want, want_lse = reference_batched(q, k, v, causal=causal)
    np.testing.assert_allclose(out, want, rtol=RTOL64, atol=1e-12)
    assert_lse_equal(lse, want_lse)


def test_two_dim_inputs_and_return_types():
    q, k, v = rand(10, 3, 20, 4)
    out = exact_attention(q, k, v)
    assert isinstance(out, np.ndarray) and out.shape == (20, 4)
    res = exact_attention(q, k, v, return_lse=True)
    assert isinstance(res, tuple) and len(res) == 2
    np.testing.assert_array_equal(res[0], out)


def test_batch_is_stack_of_members():
    q, k, v = rand(11, 3, 4, 90, 6)
    valid = np.random.default_rng(12).random((4, 90)) > 0.4
    for causal in (False, True):
        out = exact_attention(q, k, v, causal=causal, key_padding_mask=valid)
        for b in range(4):
            single = exact_attention(q[b], k[b], v[b], causal=causal, key_padding_mask=valid[b])
            np.testing.assert_allclose(out[b], single, rtol=1e-14, atol=0)


def test_custom_scale():
    q, k, v = rand(13, 3, 50, 6)
    for scale in (0.05, 1.0, -0.7):
        want, _ = reference.exact_reference(q, k, v, scale=scale)
        np.testing.assert_allclose(exact_attention(q, k, v, scale=scale), want, rtol=RTOL64, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_within_1e5_of_float64(causal):
    q, k, v = rand(14, 3, 2, 700, 16, dtype=np.float32)
    valid = np.random.default_rng(15).random((2, 700)) > 0.1
    out32, lse32 = exact_attention(q, k, v, causal=causal, key_padding_mask=valid, return_lse=True)
    out64, lse64 = exact_attention(*(x.astype(np.float64) for x in (q, k, v)), causal=causal,
                                   key_padding_mask=valid, return_lse=True)
    assert out32.dtype == np.float32 and lse32.dtype == np.float32 and out64.dtype == np.float64
    assert np.linalg.norm(out32 - out64) <= 1e-5 * np.linalg.norm(out64)
    assert np.abs(out32 - out64).max() <= 1e-5 * np.abs(out64).max()
    np.testing.assert_allclose(lse32, lse64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_huge_logits_stay_finite(causal, dtype):
    """Logits of magnitude ~1e3 (exp would overflow without the max shift)."""
    rng = np.random.default_rng(16)
    n = 600
    q = rng.standard_normal((n, 4)) * 25
    k = rng.standard_normal((n, 4)) * 25
    v = rng.standard_normal((n, 3))
    want, want_lse = reference.exact_reference(q, k, v, causal=causal, scale=1.0)
    assert np.abs(want_lse).max() > 1e3
    out, lse = exact_attention(*(x.astype(dtype) for x in (q, k, v)), causal=causal, scale=1.0, return_lse=True)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    # float32 logits of size 1e3 carry absolute errors ~1e-4: weights shift by as much
    tol = 1e-10 if dtype == np.float64 else 2e-3
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, want_lse, rtol=tol, atol=tol)


def test_causality_perturbation():
    q, k, v = rand(17, 3, 2, 130, 4)
    base = exact_attention(q, k, v, causal=True)
    for t in (0, 5, 64, 100, 129):
        q2, k2, v2 = q.copy(), k.copy(), v.copy()
        for x in (q2, k2, v2):
            x[:, t] = 50 * np.random.default_rng(t).standard_normal(x[:, t].shape)
        out = exact_attention(q2, k2, v2, causal=True)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t], base[:, t])


def test_real_heads_match_numpy(real_qkv):
    q, k, v = (x[:, :384] for x in real_qkv)
    for causal in (False, True):
        out32 = exact_attention(q, k, v, causal=causal)
        want = reference_batched(q, k, v, causal=causal)[0]
        assert out32.dtype == np.float32
        assert np.linalg.norm(out32 - want) <= 1e-5 * np.linalg.norm(want)
        out64 = exact_attention(*(x.astype(np.float64) for x in (q, k, v)), causal=causal)
        np.testing.assert_allclose(out64, want, rtol=RTOL64, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 140), d=st.integers(1, 9), dv=st.integers(1, 9), causal=st.booleans(),
       masked=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes_against_reference(n, d, dv, causal, masked, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, n, d))
    v = rng.standard_normal((n, dv))
    valid = rng.random(n) > 0.3 if masked else None
    out, lse = exact_attention(q, k, v, causal=causal, key_padding_mask=valid, return_lse=True)
    want, want_lse = reference.exact_reference(q, k, v, causal=causal, valid=valid)
    np.testing.assert_allclose(out, want, rtol=RTOL64, atol=1e-12)
    assert_lse_equal(lse, want_lse)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_issue13_masked_keys_never_matter_whatever_they_hold(causal, dtype):
    # issue 13, item 4: masked float32 keys of 3e38 passed check_finite and gave errors of
    # 0.45-0.62; NaN in masked keys (check_finite=False) gave finite wrong outputs
    n = 300
    q, k, v = (rand(s, n, 16, dtype=dtype) for s in (1, 2, 3))
    mask = np.random.default_rng(4).random(n) > 0.3
    mask[:2] = True
    want = reference.exact_reference(q, k, v, causal=causal, valid=mask)[0]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=RTOL64, atol=1e-12)
    huge = np.finfo(dtype).max / 2
    for kbad, vbad, check in [(huge, huge, True), (-huge, 1.0, True), (np.nan, np.nan, False),
                              (np.inf, np.nan, True), (-np.inf, np.inf, True)]:
        k2, v2 = k.copy(), v.copy()
        k2[~mask] = kbad
        v2[~mask] = vbad
        got = exact_attention(q, k2, v2, causal=causal, key_padding_mask=mask, check_finite=check)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, **tol)
        np.testing.assert_array_equal(got, exact_attention(q, k, v, causal=causal, key_padding_mask=mask))
