"""fmm_attention (Fast Multipole Attention) against oracles and the six exactness properties.

Oracles, from slowest and plainest to fastest:

* ``reference.fma_reference``: per query, enumerates every logit (shared with the project);
* ``coarse_query_reference`` below: the same enumeration for ``query_coarsening=True``;
* ``dense_fma`` below: the FMA implied attention matrix built with NumPy broadcasting (one
  ``(n, n)`` logit matrix per level), fast enough for n = 1000. It is checked against the two
  loop oracles first (``test_dense_oracle_matches_loop_oracles``) and then carries the full
  grid of the issue: m in {4, 16, 32}, rank in {1, 2, 4}, n in {1, 7, 100, 512, 1000}, causal
  and not, with and without key padding masks, float32 and float64, dv != d.
"""

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from fmm_attention import LearnedCoarsening, build_tree, exact_attention, fmm_attention


# --------------------------------------------------------------------------- oracles
def spec_padded_length(n, m):
    N = 4 * m
    while N < n:
        N *= 2
    return N


@functools.lru_cache(maxsize=64)
def dense_level_map(n, m, causal):
    """(n, n) level serving each pair, by the spec's rules with broadcasting (-1: never).

    Asserts on the way that the lists partition the allowed pairs.
    """
    N = spec_padded_length(n, m)
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    I, J = i // m, j // m
    allowed = (j <= i) if causal else np.ones((n, n), bool)
    served = [((J >= I - 1) & (J <= I) if causal else np.abs(I - J) <= 1) & allowed]
    for level in range(1, int(np.log2(N // m))):
        w = m * 2 ** (level - 1)
        b, c = i // w, j // w
        if causal:
            listed = np.where(b % 2 == 0, c == b - 2, (c == b - 3) | (c == b - 2))
        else:
            listed = np.where(b % 2 == 0, (c == b - 2) | (c == b + 2) | (c == b + 3),
                              (c == b - 3) | (c == b - 2) | (c == b + 2))
        served.append(listed)
    served = np.array(served)
    assert (served.sum(0) == allowed).all()
    out = np.where(allowed, served.argmax(0), -1)
    out.setflags(write=False)
    return out


def dense_fma(q, k, v, *, block_size, rank, causal=False, valid=None, scale=None, count_scaling=True,
              query_coarsening=False):
    """FMA (mean coarsening) of one head through its implied (n, n) attention matrix, float64.

    Seen from query ``i``, key ``j`` served at far level ``l`` is replaced by the mean of the
    valid keys of its sub-box (size ``w_l / min(p, w_l)``); with count scaling each token of
    the sub-box carries the sub-box logit (so the sub-box weighs ``count * exp(logit)``),
    without it the sub-box weight is shared among its tokens. With ``query_coarsening`` the far
    logits of query ``i`` at level ``l`` use the mean of the valid queries of its box (none:
    no far logits at that level).
    Returns ``(out, lse)``.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    n, d = q.shape
    m, p = block_size, rank
    scale = 1 / np.sqrt(d) if scale is None else scale
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    levels = dense_level_map(n, m, causal)
    logits = np.full((n, n), -np.inf)
    near = levels == 0
    logits[near] = (scale * q @ k.T)[near]
    for level in range(1, levels.max(initial=0) + 1):
        w = m * 2 ** (level - 1)
        sub = w // min(p, w)
        group = np.arange(n) // sub
        counts = np.bincount(group, weights=valid, minlength=group[-1] + 1)
        sums = np.zeros((group[-1] + 1, d))
        np.add.at(sums, group[valid], k[valid])
        with np.errstate(invalid="ignore", divide="ignore"):
            coarse = (sums / counts[:, None])[group]  # each token's sub-box mean key
            log_count = np.log(counts)[group]
        empty = np.zeros(n, bool)
        if query_coarsening:  # mean of the box's valid queries; none: no far field here
            box = np.arange(n) // w
            qsum = np.zeros((box[-1] + 1, d))
            np.add.at(qsum, box[valid], q[valid])
            qcount = np.bincount(box, weights=valid, minlength=box[-1] + 1)
            queries = (qsum / np.maximum(qcount, 1)[:, None])[box]
            empty = (qcount == 0)[box]
        else:
            queries = q
        x = scale * queries @ np.where(valid[:, None], coarse, 0).T
        if not count_scaling:
            x = x - log_count[None, :]
        x[empty] = -np.inf
        sel = levels == level
        logits[sel] = x[sel]
    logits[:, ~valid] = -np.inf
    probs, lse = reference.softmax_rows(logits)
    return probs @ v, lse


def far_boxes(b, n_boxes, causal):
    if causal:
        listed = [b - 2] if b % 2 == 0 else [b - 3, b - 2]
    else:
        listed = [b - 2, b + 2, b + 3] if b % 2 == 0 else [b - 3, b - 2, b + 2]
    return [c for c in listed if 0 <= c < n_boxes]


def coarse_query_reference(q, k, v, *, block_size, rank, valid=None, scale=None, count_scaling=True,
                           learned=None):
    """FMA with coarse queries (bidirectional), one head, by enumerating each query's logits.

    Near field: exact ``scale * q_i . k_j`` over the valid keys of blocks ``I-1, I, I+1``.
    Far level ``l``: the query is the mean of the valid queries of box ``b = i // w_l``
    (real positions ``< n`` that the key padding mask marks: the mask marks tokens); a box
    with no valid query has no far field at that level. The keys are the coarse keys of the
    listed boxes (mean or ``learned`` as in ``reference.fma_reference``), with count bias.
    One joint softmax over everything. Returns ``(out, lse)``.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    n, d = q.shape
    dv = v.shape[1]
    m, p = block_size, rank
    scale = 1 / np.sqrt(d) if scale is None else scale
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    N = spec_padded_length(n, m)
    out, lse = np.zeros((n, dv)), np.full(n, -np.inf)
    for i in range(n):
        I = i // m
        logits, values = [], []
        for j in range(max(0, (I - 1) * m), min(n, (I + 2) * m)):
            if valid[j]:
                logits.append(scale * q[i] @ k[j])
                values.append(v[j])
        for level in range(1, int(np.log2(N // m))):
            w = m * 2 ** (level - 1)
            r = min(p, w)
            b = i // w
            own = np.arange(b * w, min(n, (b + 1) * w))
            own = own[valid[own]]
            if own.size == 0:
                continue
            qc = q[own].mean(0)
            for c in far_boxes(b, N // w, causal=False):
                tokens = np.arange(c * w, min(n, (c + 1) * w))
                ok = tokens[valid[tokens]]
                if learned is None:
                    sub = w // r
                    for t in range(r):
                        members = ok[(ok - c * w) // sub == t]
                        if len(members):
                            logits.append(scale * qc @ k[members].mean(0)
                                          + (np.log(len(members)) if count_scaling else 0.0))
                            values.append(v[members].mean(0))
                elif len(ok):
                    kw, vw, kb, vb = (x[level - 1] for x in learned)
                    kpad, vpad = np.zeros((w, d)), np.zeros((w, dv))
                    kpad[ok - c * w], vpad[ok - c * w] = k[ok], v[ok]
                    for t in range(r):
                        kc = np.array([kw[e * r + t, 0] @ kpad[:, e] + kb[e * r + t] for e in range(d)])
                        vc = np.array([vw[e * r + t, 0] @ vpad[:, e] + vb[e * r + t] for e in range(dv)])
                        logits.append(scale * qc @ kc + (np.log(len(ok) / r) if count_scaling else 0.0))
                        values.append(vc)
        if logits:
            x = np.array(logits)
            wgt = np.exp(x - x.max())
            out[i] = wgt @ np.array(values) / wgt.sum()
            lse[i] = x.max() + np.log(wgt.sum())
    return out, lse


# --------------------------------------------------------------------------- helpers
def inputs(seed, n, d=6, dv=5, lead=(), dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(lead + (n, d))
    k = rng.standard_normal(lead + (n, d))
    v = rng.standard_normal(lead + (n, dv))
    return tuple(x.astype(dtype) for x in (q, k, v))


def make_mask(seed, n, lead=()):
    """Random validity with a long invalid run (whole far boxes empty) and key 0 invalid
    (with causal attention query 0 then has no valid key at all)."""
    rng = np.random.default_rng(seed + 1000)
    valid = rng.random(lead + (n,)) > 0.25
    valid[..., 0] = False
    if n >= 40:
        valid[..., n // 3 : n // 3 + n // 4] = False
    return valid


def assert_out_close(got, want, dtype, what=""):
    assert got.dtype == dtype
    assert np.isfinite(got).all(), what
    if dtype == np.float64:
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11, err_msg=what)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * max(1.0, np.abs(want).max()), err_msg=what)


def assert_lse_close(got, want, dtype, what=""):
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=what)
    fin = np.isfinite(want)
    tol = 1e-10 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(got[fin], want[fin], rtol=tol, atol=tol, err_msg=what)


def relative_error(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# --------------------------------------------------------------------------- the oracles agree
@pytest.mark.parametrize("n, m, p, causal", [(1, 4, 2, False), (7, 2, 1, True), (37, 4, 2, False),
                                             (37, 4, 2, True), (80, 4, 4, False), (70, 8, 16, True)])
def test_dense_oracle_matches_loop_oracles(n, m, p, causal):
    q, k, v = inputs(n + m, n)
    np.testing.assert_array_equal(dense_level_map(n, m, causal), reference.level_map_reference(n, m, causal))
    for valid in (None, make_mask(n, n)):
        for count_scaling in (True, False):
            kwargs = dict(block_size=m, rank=p, valid=valid, count_scaling=count_scaling)
            want = reference.fma_reference(q, k, v, causal=causal, **kwargs)
            got = dense_fma(q, k, v, causal=causal, **kwargs)
            np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-13)
            assert_lse_close(got[1], want[1], np.float64)
            implied = reference.fma_implied_matrix(q, k, causal=causal, **kwargs)
            np.testing.assert_allclose(got[0], implied @ v, rtol=1e-12, atol=1e-13)
            if not causal:
                want = coarse_query_reference(q, k, v, **kwargs)
                got = dense_fma(q, k, v, query_coarsening=True, **kwargs)
                np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-13)
                assert_lse_close(got[1], want[1], np.float64)


# --------------------------------------------------------------------------- FMA vs oracles
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 7, 100])
@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("m", [4, 16, 32])
def test_small_n_against_fma_reference(m, p, n, causal):
    """The full (m, p, causal, mask, dtype) grid at small n, against the shared loop oracle."""
    q, k, v = inputs(1 + n + m + p, n, d=6, dv=3)
    for valid in (None, make_mask(n, n)):
        want, want_lse = reference.fma_reference(q, k, v, block_size=m, rank=p, causal=causal, valid=valid)
        for dtype in (np.float64, np.float32):
            args = (x.astype(dtype) for x in (q, k, v))
            out, lse = fmm_attention(*args, block_size=m, rank=p, causal=causal, key_padding_mask=valid,
                                     return_lse=True)
            what = f"m={m} p={p} n={n} causal={causal} masked={valid is not None} {dtype.__name__}"
            assert_out_close(out, want, dtype, what)
            assert_lse_close(lse, want_lse, dtype, what)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [512, 1000])
@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("m", [4, 16, 32])
def test_large_n_against_dense_oracle(m, p, n, causal):
    """The full grid at n = 512 and 1000, two heads, against the dense oracle."""
    q, k, v = inputs(2 + n + m + p, n, d=8, dv=5, lead=(2,))
    valid = make_mask(n, n, lead=(2,))
    valid[1] = True  # head 0 masked, head 1 not
    ref = [dense_fma(q[h], k[h], v[h], block_size=m, rank=p, causal=causal, valid=valid[h]) for h in range(2)]
    want, want_lse = np.array([r[0] for r in ref]), np.array([r[1] for r in ref])
    for dtype in (np.float64, np.float32):
        out, lse = fmm_attention(*(x.astype(dtype) for x in (q, k, v)), block_size=m, rank=p, causal=causal,
                                 key_padding_mask=valid, return_lse=True)
        assert_out_close(out, want, dtype)
        assert_lse_close(lse, want_lse, dtype)


def test_large_n_against_fma_reference_directly():
    """One large case against the shared loop oracle itself (slow oracle, so only one)."""
    n, m, p = 300, 16, 2
    q, k, v = inputs(3, n, d=4, dv=7)
    valid = make_mask(3, n)
    want, want_lse = reference.fma_reference(q, k, v, block_size=m, rank=p, causal=True, valid=valid)
    out, lse = fmm_attention(q, k, v, block_size=m, rank=p, causal=True, key_padding_mask=valid, return_lse=True)
    assert_out_close(out, want, np.float64)
    assert_lse_close(lse, want_lse, np.float64)


@pytest.mark.parametrize("causal", [False, True])
def test_without_count_scaling(causal):
    n, m, p = 200, 8, 2
    q, k, v = inputs(4, n)
    valid = make_mask(4, n)
    want, want_lse = dense_fma(q, k, v, block_size=m, rank=p, causal=causal, valid=valid, count_scaling=False)
    out, lse = fmm_attention(q, k, v, block_size=m, rank=p, causal=causal, key_padding_mask=valid,
                             count_scaling=False, return_lse=True)
    assert_out_close(out, want, np.float64)
    assert_lse_close(lse, want_lse, np.float64)
    # and the flag matters
    assert relative_error(fmm_attention(q, k, v, block_size=m, rank=p, causal=causal, key_padding_mask=valid),
                          out) > 1e-3


def test_custom_scale():
    n, m, p = 150, 4, 2
    q, k, v = inputs(5, n)
    for scale in (0.1, 2.0):
        want, _ = dense_fma(q, k, v, block_size=m, rank=p, scale=scale)
        assert_out_close(fmm_attention(q, k, v, block_size=m, rank=p, scale=scale), want, np.float64)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 90), log_m=st.integers(0, 4), log_p=st.integers(0, 4), causal=st.booleans(),
       masked=st.booleans(), count_scaling=st.booleans(), seed=st.integers(0, 2**16))
def test_random_trees_against_fma_reference(n, log_m, log_p, causal, masked, count_scaling, seed):
    m, p = 2**log_m, 2**log_p
    q, k, v = inputs(seed, n, d=3, dv=2)
    valid = np.random.default_rng(seed).random(n) > 0.3 if masked else None
    want, want_lse = reference.fma_reference(q, k, v, block_size=m, rank=p, causal=causal, valid=valid,
                                             count_scaling=count_scaling)
    out, lse = fmm_attention(q, k, v, block_size=m, rank=p, causal=causal, key_padding_mask=valid,
                             count_scaling=count_scaling, return_lse=True)
    assert_out_close(out, want, np.float64)
    assert_lse_close(lse, want_lse, np.float64)


# --------------------------------------------------------------------------- property 2: rank >= N/4
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, m", [(1, 1), (5, 4), (37, 2), (100, 8), (128, 4), (129, 4), (300, 16)])
def test_full_rank_is_exact(n, m, causal):
    N = spec_padded_length(n, m)
    q, k, v = inputs(6 + n, n, lead=(2,))
    valid = make_mask(n, n, lead=(2,))
    valid[1] = True
    want, want_lse = exact_attention(q, k, v, causal=causal, key_padding_mask=valid, return_lse=True)
    for p in (N // 4, 4 * N):
        out, lse = fmm_attention(q, k, v, block_size=m, rank=p, causal=causal, key_padding_mask=valid,
                                 return_lse=True)
        assert_out_close(out, want, np.float64)
        assert_lse_close(lse, want_lse, np.float64)
    # and the oracle of the oracle: exact_attention is itself the dense reference here
    np.testing.assert_allclose(want[1], reference.exact_reference(q[1], k[1], v[1], causal=causal)[0],
                               rtol=1e-11, atol=1e-12)
    if n > 4 * m:  # far field in use: one rank below the limit is no longer exact (the test can fail)
        out = fmm_attention(q, k, v, block_size=m, rank=N // 8, causal=causal, key_padding_mask=valid)
        assert np.abs(out - want).max() > 1e-6


# --------------------------------------------------------------------------- property 3: piecewise-constant keys
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, m, p", [(64, 4, 1), (100, 4, 2), (128, 8, 4), (200, 4, 4), (333, 16, 2), (60, 2, 8)])
def test_keys_constant_on_segments_give_exact_attention(n, m, p, causal):
    N = spec_padded_length(n, m)
    seg = N // (4 * p)
    rng = np.random.default_rng(n + p)
    k = np.repeat(rng.standard_normal((N // seg, 6)) * 2, seg, axis=0)[:n]
    q = rng.standard_normal((n, 6)) * 2
    v = rng.standard_normal((n, 3)) ** 3  # any values
    valid = make_mask(n, n)
    for mask in (None, valid):
        want, want_lse = exact_attention(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True)
        out, lse = fmm_attention(q, k, v, block_size=m, rank=p, causal=causal, key_padding_mask=mask,
                                 return_lse=True)
        assert_out_close(out, want, np.float64)
        assert_lse_close(lse, want_lse, np.float64)
        # without count scaling a coarse key counts as one token: no longer exact
        off = fmm_attention(q, k, v, block_size=m, rank=p, causal=causal, key_padding_mask=mask,
                            count_scaling=False)
        assert np.abs(off - want).max() > 1e-4
    if seg >= 2:  # keys constant on shorter segments only: not exact
        k2 = np.repeat(rng.standard_normal((2 * N // seg, 6)) * 2, seg // 2, axis=0)[:n]
        out = fmm_attention(q, k2, v, block_size=m, rank=p, causal=causal)
        assert np.abs(out - exact_attention(q, k2, v, causal=causal)).max() > 1e-6


# --------------------------------------------------------------------------- property 4: causality
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n, m, p", [(130, 4, 2), (64, 16, 1), (300, 8, 4)])
def test_causality(n, m, p, masked):
    q, k, v = inputs(7, n, lead=(2,))
    valid = make_mask(7, n, lead=(2,)) if masked else None
    base = fmm_attention(q, k, v, causal=True, block_size=m, rank=p, key_padding_mask=valid)
    for t in sorted({0, 1, m - 1, m, 2 * m + 3, n // 2, n - 1}):
        q2, k2, v2 = q.copy(), k.copy(), v.copy()
        rng = np.random.default_rng(t)
        for x in (q2, k2, v2):
            x[:, t] = 30 * rng.standard_normal(x[:, t].shape)
        valid2 = None
        if masked:
            valid2 = valid.copy()
            valid2[:, t] = True  # un-masking key t is a change at position t as well
        out = fmm_attention(q2, k2, v2, causal=True, block_size=m, rank=p, key_padding_mask=valid2)
        np.testing.assert_array_equal(out[:, :t], base[:, :t], err_msg=f"t={t}")
        assert not np.allclose(out[:, t:], base[:, t:])


def test_bidirectional_is_not_causal():
    """The causality test can fail: without causal=True the past sees position t."""
    q, k, v = inputs(8, 100)
    base = fmm_attention(q, k, v, block_size=4, rank=2)
    k2 = k.copy()
    k2[90] *= 10
    assert not np.allclose(fmm_attention(q, k2, v, block_size=4, rank=2)[:90], base[:90])


# --------------------------------------------------------------------------- property 5: batch = stack
@pytest.mark.parametrize("causal, query_coarsening", [(False, False), (True, False), (False, True)])
def test_batch_is_stack_of_members(causal, query_coarsening):
    n, m, p = 150, 8, 2
    q, k, v = inputs(9, n, d=4, dv=7, lead=(2, 3))
    valid = make_mask(9, n, lead=(2, 3))
    valid[0, 1] = True
    valid[1, 2] = False  # a member with no valid key
    kwargs = dict(block_size=m, rank=p, causal=causal, query_coarsening=query_coarsening, return_lse=True)
    out, lse = fmm_attention(q, k, v, key_padding_mask=valid, **kwargs)
    assert out.shape == (2, 3, n, 7) and lse.shape == (2, 3, n)
    for a in range(2):
        for b in range(3):
            o, s = fmm_attention(q[a, b], k[a, b], v[a, b], key_padding_mask=valid[a, b], **kwargs)
            np.testing.assert_allclose(out[a, b], o, rtol=1e-14, atol=0)
            np.testing.assert_allclose(lse[a, b], s, rtol=1e-14, atol=0)
    np.testing.assert_array_equal(out[1, 2], 0)
    assert np.isneginf(lse[1, 2]).all()
    # members are not mixed: changing one member changes only its own rows
    k2 = k.copy()
    k2[0, 0, np.flatnonzero(valid[0, 0])[5]] += 3  # one valid key (a shift of all keys changes no softmax)
    out2 = fmm_attention(q, k2, v, key_padding_mask=valid, **kwargs)[0]
    assert not np.allclose(out2[0, 0], out[0, 0])
    np.testing.assert_array_equal(out2[0, 1:], out[0, 1:])
    np.testing.assert_array_equal(out2[1], out[1])


# --------------------------------------------------------------------------- property 6: float32
@pytest.mark.parametrize("causal, query_coarsening", [(False, False), (True, False), (False, True)])
def test_float32_within_1e5_of_float64(causal, query_coarsening):
    q, k, v = inputs(10, 1000, d=32, dv=32, lead=(2,), dtype=np.float32)
    valid = make_mask(10, 1000, lead=(2,))
    kwargs = dict(block_size=16, rank=4, causal=causal, query_coarsening=query_coarsening,
                  key_padding_mask=valid, return_lse=True)
    out32, lse32 = fmm_attention(q, k, v, **kwargs)
    out64, lse64 = fmm_attention(*(x.astype(np.float64) for x in (q, k, v)), **kwargs)
    assert out32.dtype == np.float32 and lse32.dtype == np.float32 and out64.dtype == np.float64
    assert relative_error(out32, out64) <= 1e-5
    assert np.abs(out32 - out64).max() <= 1e-5 * np.abs(out64).max()
    assert_lse_close(lse32, lse64, np.float32)


def test_float32_within_1e5_of_float64_real_heads(real_qkv):
    q, k, v = real_qkv
    for causal in (False, True):
        out32 = fmm_attention(q, k, v, block_size=16, rank=2, causal=causal)
        out64 = fmm_attention(*(x.astype(np.float64) for x in (q, k, v)), block_size=16, rank=2, causal=causal)
        assert out32.dtype == np.float32
        assert relative_error(out32, out64) <= 1e-5


# --------------------------------------------------------------------------- coarse queries (O(n))
@pytest.mark.parametrize("n, m, p", [(1, 4, 2), (7, 2, 1), (13, 4, 2), (64, 4, 4), (100, 8, 2), (60, 2, 16)])
def test_query_coarsening_against_reference(n, m, p):
    q, k, v = inputs(11 + n, n, d=5, dv=3)
    for valid in (None, make_mask(n, n)):
        for count_scaling in (True, False):
            want, want_lse = coarse_query_reference(q, k, v, block_size=m, rank=p, valid=valid,
                                                    count_scaling=count_scaling)
            for dtype in (np.float64, np.float32):
                out, lse = fmm_attention(*(x.astype(dtype) for x in (q, k, v)), block_size=m, rank=p,
                                         query_coarsening=True, key_padding_mask=valid,
                                         count_scaling=count_scaling, return_lse=True)
                what = f"masked={valid is not None} count_scaling={count_scaling} {dtype.__name__}"
                assert_out_close(out, want, dtype, what)
                assert_lse_close(lse, want_lse, dtype, what)


@pytest.mark.parametrize("n, m, p", [(512, 4, 1), (1000, 16, 4), (1000, 32, 2)])
def test_query_coarsening_large_n(n, m, p):
    q, k, v = inputs(12, n, d=8, dv=4, lead=(2,))
    valid = make_mask(12, n, lead=(2,))
    ref = [dense_fma(q[h], k[h], v[h], block_size=m, rank=p, valid=valid[h], query_coarsening=True)
           for h in range(2)]
    out, lse = fmm_attention(q, k, v, block_size=m, rank=p, query_coarsening=True, key_padding_mask=valid,
                             return_lse=True)
    assert_out_close(out, np.array([r[0] for r in ref]), np.float64)
    assert_lse_close(lse, np.array([r[1] for r in ref]), np.float64)
    # it differs from fine queries (the variant is really used)
    assert relative_error(fmm_attention(q, k, v, block_size=m, rank=p, key_padding_mask=valid), out) > 1e-3


def test_query_coarsening_averages_valid_queries_only():
    """A coarse query is the mean of its box's valid queries (the mask marks tokens): a masked
    position's query moves no far field, only its own output."""
    n, m, p = 64, 4, 2
    q, k, v = inputs(13, n)
    valid = np.ones(n, bool)
    valid[40:44] = False
    out = fmm_attention(q, k, v, block_size=m, rank=p, query_coarsening=True, key_padding_mask=valid)
    assert_out_close(out, coarse_query_reference(q, k, v, block_size=m, rank=p, valid=valid)[0], np.float64)
    q2 = q.copy()
    q2[41] += 3.0
    out2 = fmm_attention(q2, k, v, block_size=m, rank=p, query_coarsening=True, key_padding_mask=valid)
    assert_out_close(out2, coarse_query_reference(q2, k, v, block_size=m, rank=p, valid=valid)[0], np.float64)
    others = np.arange(n) != 41
    np.testing.assert_array_equal(out2[others], out[others])


def test_issue13_coarse_queries_ignore_what_padding_holds():
    # issue 13, item 1: padded queries were averaged into the coarse queries (diff 0.31)
    q, k, v = np.random.default_rng(0).standard_normal((3, 512, 32))
    mask = np.arange(512) < 200
    q2 = q.copy()
    q2[200:] = 50 * np.random.default_rng(1).standard_normal((312, 32))
    a = fmm_attention(q, k, v, key_padding_mask=mask, query_coarsening=True)
    b = fmm_attention(q2, k, v, key_padding_mask=mask, query_coarsening=True)
    np.testing.assert_array_equal(a[:200], b[:200])
    q2[200:], k2, v2 = np.nan, k.copy(), v.copy()  # garbage of any kind, in every input
    k2[200:], v2[200:] = np.inf, np.nan
    c = fmm_attention(q2, k2, v2, key_padding_mask=mask, query_coarsening=True)
    np.testing.assert_array_equal(c[:200], a[:200])
    # boxes of padding only contribute nothing: the padded sequence is the unpadded one
    np.testing.assert_allclose(a[:200], fmm_attention(q[:200], k[:200], v[:200], query_coarsening=True),
                               rtol=0, atol=1e-14)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("refine", [0, 16, 100])
def test_issue13_refined_padded_sequence_equals_unpadded(causal, refine):
    # issue 13, item 2: the budget was charged for masked tokens and fully masked boxes, and
    # padded queries took part in the scoring (diff 0.105 at refine=16)
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 512, 32))
    mask = np.arange(512) < 200
    o = dict(block_size=16, rank=4, refine=refine, causal=causal)
    want = fmm_attention(q[:200], k[:200], v[:200], **o)
    np.testing.assert_allclose(fmm_attention(q, k, v, key_padding_mask=mask, **o)[:200], want, rtol=0, atol=1e-14)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[200:], k2[200:], v2[200:] = np.nan, 1e300, np.inf
    np.testing.assert_allclose(fmm_attention(q2, k2, v2, key_padding_mask=mask, **o)[:200], want, rtol=0, atol=1e-14)


def test_issue13_refinement_ignores_masked_positions_inside_the_sequence():
    # masked tokens in the middle: what they hold changes no valid output, refined or not
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((3, 300, 8))
    mask = rng.random(300) > 0.3
    o = dict(block_size=8, rank=2, refine=24, key_padding_mask=mask)
    want = fmm_attention(q, k, v, **o)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[~mask], k2[~mask], v2[~mask] = 40.0, np.nan, np.nan
    np.testing.assert_array_equal(fmm_attention(q2, k2, v2, **o)[mask], want[mask])


def test_query_coarsening_with_causal_raises():
    q, k, v = inputs(14, 20)
    with pytest.raises(ValueError, match="query_coarsening.*causal"):
        fmm_attention(q, k, v, block_size=4, rank=2, causal=True, query_coarsening=True)


def test_query_coarsening_with_learned_coarsening():
    n, m, p, d, dv = 60, 4, 2, 3, 2
    q, k, v = inputs(15, n, d=d, dv=dv)
    tree = build_tree(n, block_size=m, rank=p)
    rng = np.random.default_rng(15)
    learned = (
        [rng.standard_normal((lv.rank * d, 1, lv.box_size)) / lv.box_size for lv in tree.levels],
        [rng.standard_normal((lv.rank * dv, 1, lv.box_size)) / lv.box_size for lv in tree.levels],
        [rng.standard_normal(lv.rank * d) for lv in tree.levels],
        [rng.standard_normal(lv.rank * dv) for lv in tree.levels],
    )
    valid = make_mask(15, n)
    want, want_lse = coarse_query_reference(q, k, v, block_size=m, rank=p, valid=valid, learned=learned)
    out, lse = fmm_attention(q, k, v, block_size=m, rank=p, query_coarsening=True, key_padding_mask=valid,
                             coarsening=LearnedCoarsening(*learned), return_lse=True)
    assert_out_close(out, want, np.float64)
    assert_lse_close(lse, want_lse, np.float64)


# --------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("query_coarsening", [False, True])
def test_no_valid_key_gives_zero_and_minus_inf(query_coarsening):
    q, k, v = inputs(16, 90, lead=(2,), dtype=np.float32)
    valid = np.zeros((2, 90), bool)
    valid[1, 50] = True  # head 1: one valid key, seen (near or far) by every query
    out, lse = fmm_attention(q, k, v, block_size=4, rank=2, key_padding_mask=valid, return_lse=True,
                             query_coarsening=query_coarsening)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(out[0], 0)
    assert np.isneginf(lse[0]).all()
    # fine queries: every query sees key 50 (near or far); coarse queries: a box with no
    # valid query has no far field, so only the valid query and its near field do
    seen = slice(None) if not query_coarsening else slice(44, 56)
    np.testing.assert_allclose(out[1, seen], np.broadcast_to(v[1, 50], out[1, seen].shape), rtol=1e-6)


def test_causal_first_query_with_masked_first_key():
    q, k, v = inputs(17, 40)
    valid = np.ones(40, bool)
    valid[:3] = False
    out, lse = fmm_attention(q, k, v, block_size=4, rank=2, causal=True, key_padding_mask=valid, return_lse=True)
    np.testing.assert_array_equal(out[:3], 0)
    assert np.isneginf(lse[:3]).all() and np.isfinite(lse[3:]).all()


def test_masked_keys_change_nothing():
    """Invalid keys leave every near field and coarse mean, whatever they hold."""
    n = 200
    q, k, v = inputs(18, n)
    valid = make_mask(18, n)
    k2, v2 = k.copy(), v.copy()
    k2[~valid] = 1e4
    v2[~valid] = -1e4
    for kwargs in (dict(), dict(causal=True), dict(query_coarsening=True)):
        a = fmm_attention(q, k, v, block_size=8, rank=2, key_padding_mask=valid, **kwargs)
        b = fmm_attention(q, k2, v2, block_size=8, rank=2, key_padding_mask=valid, **kwargs)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- real inputs
@pytest.mark.parametrize("n, m, p, causal", [(128, 16, 2, False), (200, 8, 4, True)])
def test_real_heads_against_implied_matrix(real_qkv, n, m, p, causal):
    q, k, v = (x[::2, :n] for x in real_qkv)  # two heads: the loop oracle is slow
    out = fmm_attention(q, k, v, block_size=m, rank=p, causal=causal)
    for h in range(q.shape[0]):
        implied = reference.fma_implied_matrix(q[h], k[h], block_size=m, rank=p, causal=causal)
        want = implied @ v[h].astype(np.float64)
        assert relative_error(out[h], want) <= 1e-5
        np.testing.assert_allclose(out[h], want, rtol=1e-4, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("causal", [False, True])
def test_real_heads_n512_against_dense_oracle(real_qkv, causal):
    q, k, v = real_qkv
    valid = np.ones(512, bool)
    valid[300:380] = False
    out64 = fmm_attention(*(x.astype(np.float64) for x in (q, k, v)), block_size=32, rank=4, causal=causal,
                          key_padding_mask=np.broadcast_to(valid, (q.shape[0], 512)))
    for h in range(q.shape[0]):
        want, _ = dense_fma(q[h], k[h], v[h], block_size=32, rank=4, causal=causal, valid=valid)
        assert_out_close(out64[h], want, np.float64)
    # real attention is sharp: FMA is an approximation whose error shrinks with the rank
    exact = exact_attention(q.astype(np.float64), k, v, causal=causal)
    errors = [relative_error(fmm_attention(q.astype(np.float64), k, v, block_size=32, rank=p, causal=causal), exact)
              for p in (1, 8, 128)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-12
