"""Shapes beyond self-attention (shared/spec/shapes-and-decoding.md): broadcast leading dims,
grouped heads, n_q != n_k with causal alignment and offsets, pairwise masks, biases and
windows, against the dense oracle (reference.cross_reference) in float64."""

import numpy as np
import pytest

import reference
from fmm_attention import _config, _shapes, exact_attention

RTOL = 1e-12


def rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 queries and 8 keys: every test crosses tile edges (the knobs are read per call)."""
    monkeypatch.setattr(_config, "EXACT_QUERY_TILE", 4)
    monkeypatch.setattr(_config, "EXACT_KEY_TILE", 8)


def oracle(q, k, v, *, key_padding_mask=None, attn_mask=None, attn_bias=None, **kw):
    """cross_reference over every output entry, with the dense forms of every broadcast."""
    qb, kb, vb = reference.broadcast_heads(q, k, v)
    lead, n_q, n_k = qb.shape[:-2], qb.shape[-2], kb.shape[-2]
    pad = None if key_padding_mask is None else np.broadcast_to(key_padding_mask, lead + (n_k,))
    mask = None if attn_mask is None else np.broadcast_to(attn_mask, lead + (n_q, n_k))
    bias = None if attn_bias is None else np.broadcast_to(attn_bias, lead + (n_q, n_k))
    out = np.empty(lead + (n_q, vb.shape[-1]))
    lse = np.empty(lead + (n_q,))
    for idx in np.ndindex(*lead):
        out[idx], lse[idx] = reference.cross_reference(
            qb[idx], kb[idx], vb[idx], valid=None if pad is None else pad[idx],
            attn_mask=None if mask is None else mask[idx], attn_bias=None if bias is None else bias[idx], **kw)
    return out, lse


def assert_matches(got, want):
    out, lse = got
    want_out, want_lse = want
    np.testing.assert_allclose(out, want_out, rtol=RTOL, atol=1e-13)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[fin], want_lse[fin], rtol=RTOL, atol=1e-13)


# ------------------------------------------------------------------ grouped heads, broadcasting
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_heads_equal_repeated_kv_bitwise(causal, small_tiles):
    q = rand(0, 2, 8, 11, 4)
    k, v = rand(1, 2, 2, 11, 4), rand(2, 2, 2, 11, 3)
    mask = np.random.default_rng(3).random((2, 1, 11)) > 0.3  # size-1 head axis
    got = exact_attention(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True)
    want = exact_attention(q, np.repeat(k, 4, axis=1), np.repeat(v, 4, axis=1), causal=causal,
                           key_padding_mask=mask, return_lse=True)
    assert got[0].shape == (2, 8, 11, 3)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert_matches(got, oracle(q, k, v, causal=causal, key_padding_mask=mask))


def test_multi_query_and_broadcast_batch(small_tiles):
    """Hk = 1 (multi-query) and a size-1 batch of keys serving every query batch."""
    q = rand(4, 3, 4, 9, 4)
    k, v = rand(5, 1, 1, 9, 4), rand(6, 1, 1, 9, 2)
    got = exact_attention(q, k, v, return_lse=True)
    kb, vb = np.broadcast_to(k, (3, 4, 9, 4)).copy(), np.broadcast_to(v, (3, 4, 9, 2)).copy()
    want = exact_attention(q, kb, vb, return_lse=True)
    np.testing.assert_array_equal(got[0], want[0])
    assert_matches(got, oracle(q, k, v))
    # and a size-1 batch of queries against several key batches
    out = exact_attention(q[:1], kb, vb)
    assert out.shape == (3, 4, 9, 2)
    np.testing.assert_array_equal(out, exact_attention(np.broadcast_to(q[:1], q.shape).copy(), kb, vb))


def test_no_copy_of_k_and_v():
    """Grouped heads and broadcasting read k and v where they lie."""
    q = rand(7, 2, 8, 16, 4)
    k, v = rand(8, 2, 2, 16, 4), rand(9, 2, 2, 16, 4)
    batch = _shapes.attention_inputs(q, k, v, scale=None, key_padding_mask=None, check_finite=True)
    assert np.shares_memory(batch.k, k) and np.shares_memory(batch.v, v)
    assert batch.k.shape == (4, 16, 4) and batch.layout.groups == 4
    np.testing.assert_array_equal(batch.layout.kv_index, np.repeat(np.arange(4), 4))


def test_exact_jobs_share_each_key_set_across_its_query_heads():
    """Issue 16: a job runs every query head of one key head against each key tile it loads,
    so grouped heads read k and v once per group (one job per query head read them g times)."""
    import numba

    from fmm_attention.cpu import exact as cpu_exact

    n, hq, hk = 64 * 6, 16, 2
    q, k = np.zeros((hq, n, 8)), np.zeros((hk, n, 8))
    q_index, kv_index = np.arange(hq), np.repeat(np.arange(hk), hq // hk)
    no, ids = np.zeros(1), np.zeros(1, np.int64)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        knobs, n_jobs, total, cumulative = cpu_exact._layout(
            q, k, k, q_index, kv_index, None, False, no, ids, 0, 0, False, no, ids, 0, 0, False, 1.0, True, 0, n, n)
    finally:
        numba.set_num_threads(before)
    query_tile, _, members, group_start = knobs
    n_tiles = -(-n // query_tile)
    assert n_jobs == hk * n_tiles and list(group_start) == [0, 8, 16]
    for g in range(hk):
        assert set(kv_index[members[group_start[g]:group_start[g + 1]]]) == {g}
    assert sorted(members) == list(range(hq))  # every entry once
    assert np.isclose(cumulative()[-1], total)


def test_exact_groups_split_evenly_and_keep_threads_busy():
    from fmm_attention.cpu.exact import _groups

    members, start = _groups(np.zeros(20, np.int64), 2, 8, 1)
    assert list(np.diff(start)) == [7, 7, 6]  # at most 8, near-equal
    members, start = _groups(np.zeros(20, np.int64), 1, 8, 1)
    assert list(np.diff(start)) == [5, 5, 5, 5]  # smaller groups: at least 4 * threads jobs
    members, start = _groups(np.repeat(np.arange(2), 8), 1, 8, 4)  # 16 entries, one tile, 4 threads
    assert len(start) - 1 >= 16 and list(members) == list(range(16))  # 4 * threads jobs wanted
    members, start = _groups(np.array([3, 3, 1, 1, 1, 0]), 10, 8, 1)
    assert list(members) == [5, 2, 3, 4, 0, 1] and list(start) == [0, 1, 4, 6]
    members, start = _groups(np.zeros(0, np.int64), 4, 8, 2)
    assert members.size == 0 and list(start) == [0]


@pytest.mark.parametrize("cap", [1, 3, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_exact_bits_do_not_depend_on_group_size(cap, causal, small_tiles, monkeypatch):
    """Groups of 1, 3 (uneven: 5 heads split 2 + 3) or all 5 query heads per job, with a
    broadcast key batch, padding, a mask, a bias and a window: the bits of the repeated call."""
    rng = np.random.default_rng(11)
    q = rand(12, 2, 10, 13, 4)
    k, v = rand(13, 1, 2, 17, 4), rand(14, 1, 2, 17, 3)
    kw = dict(causal=causal, query_offset=4, key_padding_mask=rng.random((2, 1, 17)) > 0.2,
              attn_mask=rng.random((10, 13, 17)) > 0.1, attn_bias=rng.standard_normal((13, 17)),
              window=(6, 0 if causal else 3), return_lse=True)
    kr, vr = (np.repeat(np.broadcast_to(x, (2,) + x.shape[1:]), 5, axis=1) for x in (k, v))
    want = exact_attention(q, kr, vr, **kw)
    monkeypatch.setattr(_config, "EXACT_GROUP_ENTRIES", cap)
    got = exact_attention(q, k, v, **kw)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert_matches(got, oracle(q, k, v, **{x: y for x, y in kw.items() if x != "return_lse"}))


# ------------------------------------------------------------------ n_q != n_k
@pytest.mark.parametrize("n_q, n_k", [(1, 13), (5, 13), (13, 13), (13, 5), (20, 37)])
@pytest.mark.parametrize("causal", [False, True])
def test_cross_lengths_match_oracle(n_q, n_k, causal, small_tiles):
    if causal and n_q > n_k:
        pytest.skip("needs an offset (tested as an error)")
    q, k, v = rand(n_q, 2, n_q, 4), rand(n_k, 2, n_k, 4), rand(n_k + 1, 2, n_k, 3)
    got = exact_attention(q, k, v, causal=causal, return_lse=True)
    assert got[0].shape == (2, n_q, 3)
    assert_matches(got, oracle(q, k, v, causal=causal))


@pytest.mark.parametrize("offset", [0, 3, 8])
def test_query_offset(offset, small_tiles):
    q, k, v = rand(10, 3, 5, 4), rand(11, 3, 13, 4), rand(12, 3, 13, 4)
    valid = np.random.default_rng(1).random((3, 13)) > 0.3
    got = exact_attention(q, k, v, causal=True, query_offset=offset, key_padding_mask=valid, return_lse=True)
    assert_matches(got, oracle(q, k, v, causal=True, query_offset=offset, key_padding_mask=valid))


def test_decode_step_and_chunks_give_rows_of_the_full_causal_attention(small_tiles):
    q, k, v = rand(13, 2, 23, 4), rand(14, 2, 23, 4), rand(15, 2, 23, 4)
    full, full_lse = exact_attention(q, k, v, causal=True, return_lse=True)
    for t in (0, 7, 22):  # a decode step over the keys so far: the last row of the prefix
        step = exact_attention(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], causal=True)
        np.testing.assert_allclose(step[:, 0], full[:, t], rtol=RTOL, atol=1e-14)
    for lo, hi in ((0, 6), (6, 17), (17, 23)):  # prefill in chunks over all the keys
        chunk, chunk_lse = exact_attention(q[:, lo:hi], k, v, causal=True, query_offset=lo, return_lse=True)
        np.testing.assert_allclose(chunk, full[:, lo:hi], rtol=RTOL, atol=1e-14)
        np.testing.assert_allclose(chunk_lse, full_lse[:, lo:hi], rtol=RTOL)


# ------------------------------------------------------------------ masks, biases, windows
MASK_SHAPES = [(7, 12), (1, 12), (7, 1), (4, 7, 12), (2, 1, 1, 12), (2, 4, 7, 12)]


@pytest.mark.parametrize("shape", MASK_SHAPES)
def test_attn_mask_and_bias_broadcast(shape, small_tiles):
    rng = np.random.default_rng(len(shape) * 10 + shape[-1])
    q, k, v = rand(20, 2, 4, 7, 4), rand(21, 2, 2, 12, 4), rand(22, 2, 2, 12, 3)
    mask = rng.random(shape) > 0.3
    bias = rng.standard_normal(shape)
    bias[rng.random(shape) > 0.8] = -np.inf
    pad = rng.random((2, 1, 12)) > 0.2
    for causal in (False, True):
        got = exact_attention(q, k, v, causal=causal, attn_mask=mask, attn_bias=bias, key_padding_mask=pad,
                              return_lse=True)
        want = oracle(q, k, v, causal=causal, attn_mask=mask, attn_bias=bias, key_padding_mask=pad)
        assert_matches(got, want)


def test_mask_and_bias_read_in_place():
    """A broadcast mask or bias is a view of the caller's buffer: nothing of size n_q * n_k."""
    layout = _shapes.resolve((2, 4, 64, 8), (2, 2, 128, 8), (2, 2, 128, 8))
    row = np.ones((1, 128), bool)
    term = _shapes.pair_term(row, "attn_mask", layout)
    assert np.shares_memory(term.flat, row) and term.flat.size == 128 and term.si == 0
    full = np.zeros((4, 64, 128))
    term = _shapes.pair_term(full, "attn_bias", layout, dtype=np.dtype(np.float64))
    assert np.shares_memory(term.flat, full) and term.flat.size == full.size
    np.testing.assert_array_equal(term.offset, np.tile(np.arange(4) * 64 * 128, 2))
    strided = np.zeros((128, 64)).T  # a transposed view: strides read as they are
    term = _shapes.pair_term(strided, "attn_bias", layout, dtype=np.dtype(np.float64))
    assert np.shares_memory(term.flat, strided) and (term.si, term.sj) == (1, 64)


def test_transposed_bias_matches_oracle(small_tiles):
    q, k, v = rand(30, 2, 7, 4), rand(31, 2, 12, 4), rand(32, 2, 12, 4)
    bias = rand(33, 12, 7).T
    assert_matches(exact_attention(q, k, v, attn_bias=bias, return_lse=True), oracle(q, k, v, attn_bias=bias))


@pytest.mark.parametrize("window", [(2, 1), (0, 0), (3, None), (None, 2), (30, 30)])
@pytest.mark.parametrize("causal", [False, True])
def test_window(window, causal, small_tiles):
    q, k, v = rand(40, 2, 9, 4), rand(41, 2, 21, 4), rand(42, 2, 21, 4)
    pad = np.random.default_rng(43).random(21) > 0.3
    for offset in (None, 0, 5):
        got = exact_attention(q, k, v, causal=causal, window=window, query_offset=offset, key_padding_mask=pad,
                              return_lse=True)
        assert_matches(got, oracle(q, k, v, causal=causal, window=window, query_offset=offset,
                                   key_padding_mask=pad))


def test_window_self_attention_equals_band_mask(small_tiles):
    q, k, v = rand(50, 3, 30, 4)
    band = np.abs(np.arange(30)[:, None] - np.arange(30)[None, :]) <= 3
    np.testing.assert_allclose(exact_attention(q, k, v, window=(3, 3)), exact_attention(q, k, v, attn_mask=band),
                               rtol=RTOL, atol=1e-14)


def test_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v = rand(60, 3, 5, 4)
    mask = np.ones((5, 5), bool)
    mask[2] = False
    out, lse = exact_attention(q, k, v, attn_mask=mask, return_lse=True)
    assert np.isneginf(lse[2]) and (out[2] == 0).all() and np.isfinite(lse[[0, 1, 3, 4]]).all()


def test_float32_stays_float32(small_tiles):
    q, k, v = (x.astype(np.float32) for x in (rand(70, 4, 6, 4), rand(71, 2, 9, 4), rand(72, 2, 9, 4)))
    out = exact_attention(q, k, v, causal=True, attn_bias=np.zeros((6, 9)), window=(4, 0))
    assert out.dtype == np.float32
    want, _ = oracle(q, k, v, causal=True, window=(4, 0))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_inputs_not_modified(small_tiles):
    q, k, v = rand(80, 4, 6, 4), rand(81, 2, 9, 4), rand(82, 2, 9, 4)
    k[0, 3] = np.nan  # padded: may hold anything
    pad = np.ones(9, bool)
    pad[3] = False
    mask, bias = np.ones((6, 9), bool), np.zeros((1, 9))
    copies = [x.copy() for x in (q, k, v, pad, mask, bias)]
    exact_attention(q, k, v, key_padding_mask=pad, attn_mask=mask, attn_bias=bias)
    for x, c in zip((q, k, v, pad, mask, bias), copies):
        np.testing.assert_array_equal(x, c)


# ------------------------------------------------------------------ bad input
def test_errors_name_the_argument():
    q, k, v = rand(90, 4, 8, 4), rand(91, 2, 6, 4), rand(92, 2, 6, 4)
    with pytest.raises(ValueError, match="query_offset"):
        exact_attention(q, k, v, causal=True)  # n_q > n_k, causal, no offset
    exact_attention(q, k, v)  # cross-attention without causal needs no offset
    with pytest.raises(ValueError, match="query_offset"):
        exact_attention(q[:, :3], k, v, causal=True, query_offset=4)  # 4 + 3 > 6
    with pytest.raises(ValueError, match="query_offset"):
        exact_attention(q[:, :3], k, v, query_offset=-1)
    with pytest.raises(TypeError, match="query_offset"):
        exact_attention(q[:, :3], k, v, query_offset=1.5)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        exact_attention(rand(93, 3, 6, 4), k, v)  # Hq = 3, Hk = 2
    with pytest.raises(ValueError, match="key_padding_mask"):
        exact_attention(q, k, v, key_padding_mask=np.ones((3, 6), bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        exact_attention(q, k, v, key_padding_mask=np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="attn_mask"):
        exact_attention(q, k, v, attn_mask=np.ones((8, 5), bool))
    with pytest.raises(ValueError, match="attn_bias"):
        exact_attention(q, k, v, attn_bias=np.ones((3, 8, 6)))
    with pytest.raises(TypeError, match="attn_mask"):
        exact_attention(q, k, v, attn_mask=np.ones((8, 6)))
    with pytest.raises(TypeError, match="attn_bias"):
        exact_attention(q, k, v, attn_bias=np.ones((8, 6), bool))
    with pytest.raises(ValueError, match="attn_bias"):
        exact_attention(q, k, v, attn_bias=np.full((8, 6), np.nan))
    with pytest.raises(ValueError, match="window left"):
        exact_attention(q, k, v, window=(-1, 0))
    with pytest.raises(TypeError, match="window"):
        exact_attention(q, k, v, window=3)
    with pytest.raises(ValueError, match="do not broadcast"):
        exact_attention(rand(94, 3, 4, 8, 4), rand(95, 2, 2, 6, 4), rand(96, 2, 2, 6, 4))
    with pytest.raises(ValueError, match="k and v"):
        exact_attention(q, k, v[:, :5])


# ------------------------------------------------------------------ FMA
from fmm_attention import backends, fmm_attention  # noqa: E402

FMA = dict(block_size=8, rank=2)


@pytest.mark.parametrize("causal", [False, True])
def test_fma_grouped_heads_equal_repeated_kv_bitwise(causal):
    q = rand(100, 2, 4, 70, 4)
    k, v = rand(101, 2, 2, 70, 4), rand(102, 2, 2, 70, 3)
    pad = np.ones((2, 1, 70), bool)
    pad[1, 0, 60:] = False  # right-padded second sequence, shared by all its heads
    kw = dict(FMA, causal=causal, key_padding_mask=pad, global_tokens=[0], return_lse=True)
    got = fmm_attention(q, k, v, **kw)
    want = fmm_attention(q, np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1), **kw)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # a size-1 batch of keys serves both query batches
    got = fmm_attention(q, k[:1], v[:1], **FMA, causal=causal)
    np.testing.assert_array_equal(got, fmm_attention(q, np.repeat(k[:1], 2, axis=1).repeat(2, axis=0),
                                                     np.repeat(v[:1], 2, axis=1).repeat(2, axis=0), **FMA,
                                                     causal=causal))


@pytest.mark.parametrize("causal", [False, True])
def test_fma_prefill_chunks_and_decode_give_rows_of_the_one_shot_forward(causal):
    """shapes-and-decoding.md: query i gets row query_offset + i of FMA over the keys."""
    n = 77  # three far levels at m = 8; chunk edges inside and on block boundaries
    q, k, v = rand(110, 2, n, 4), rand(111, 2, n, 4), rand(112, 2, n, 4)
    pad = np.ones((2, n), bool)
    pad[1, 70:] = False
    kw = dict(FMA, causal=causal, key_padding_mask=pad, global_tokens=[3], return_lse=True)
    full, full_lse = fmm_attention(q, k, v, **kw)
    for lo, hi in ((0, 5), (5, 16), (16, 45), (45, 77)):
        out, lse = fmm_attention(q[:, lo:hi], k, v, query_offset=lo, **kw)
        np.testing.assert_allclose(out, full[:, lo:hi], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(lse, full_lse[:, lo:hi], rtol=1e-12)
    last, _ = fmm_attention(q[:, -3:], k, v, **kw)  # default offset: the last positions
    np.testing.assert_allclose(last, full[:, -3:], rtol=1e-12, atol=1e-14)
    if causal:  # a decode step sees only the keys so far: the row of the one-shot forward
        for t in (8, 31, 64):
            step, _ = fmm_attention(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], **dict(kw, key_padding_mask=pad[
                :, : t + 1]))
            np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-12, atol=1e-14)


def test_fma_per_sequence_global_tokens_one_call():
    """A padded batch whose [SEP] tokens sit at different positions: one call equals the
    per-sequence calls with 1-D global_tokens."""
    n = 64
    q, k, v = rand(120, 3, 2, n, 4), rand(121, 3, 2, n, 4), rand(122, 3, 2, n, 4)
    lengths = (64, 50, 37)
    pad = np.arange(n)[None, :] < np.array(lengths)[:, None]
    sep = np.array([[0, 63], [0, 49], [0, 36]])  # [CLS] and [SEP] of each sequence
    table = np.array([[0, 63], [0, 49], [0, 36]])[:, None, :]  # (3, 1, g): shared by the heads
    for causal in (False, True):
        kw = dict(FMA, causal=causal, return_lse=True)
        got = fmm_attention(q, k, v, key_padding_mask=pad[:, None], global_tokens=table, **kw)
        flags = np.zeros((3, 1, n), bool)
        flags[np.arange(3), 0, sep[:, 1]] = True
        flags[:, 0, 0] = True
        as_bool = fmm_attention(q, k, v, key_padding_mask=pad[:, None], global_tokens=flags, **kw)
        np.testing.assert_array_equal(got[0], as_bool[0])
        for b in range(3):
            want = fmm_attention(q[b], k[b], v[b], key_padding_mask=pad[b], global_tokens=list(sep[b]), **kw)
            np.testing.assert_allclose(got[0][b], want[0], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(got[1][b], want[1], rtol=1e-12)
    # an index past a sequence's valid keys (filler in a padded table) is ignored there only
    filler = np.array([[0, 63], [0, 63], [0, 99]])[:, None, :]
    got = fmm_attention(q, k, v, key_padding_mask=pad[:, None], global_tokens=filler, **FMA)
    want = fmm_attention(q[1:2], k[1:2], v[1:2], key_padding_mask=pad[1:2, None], global_tokens=[0], **FMA)
    np.testing.assert_allclose(got[1:2], want, rtol=1e-12, atol=1e-14)


def test_fma_rejects_pairwise_and_bad_shapes():
    q, k, v = rand(130, 4, 16, 4), rand(131, 2, 16, 4), rand(132, 2, 16, 4)
    for name in ("attn_mask", "attn_bias"):
        with pytest.raises(ValueError, match=f"does not take {name}.*no coarse form"):
            fmm_attention(q, k, v, **FMA, **{name: np.ones((16, 16), bool if name == "attn_mask" else float)})
    with pytest.raises(ValueError, match="query_offset"):
        fmm_attention(rand(133, 2, 20, 4), k, v, **FMA)  # more queries than key positions
    with pytest.raises(ValueError, match="query_offset"):
        fmm_attention(q[:, :4], k, v, query_offset=13, **FMA)
    with pytest.raises(ValueError, match="refine > 0"):
        fmm_attention(q[:, :4], k, v, refine=4, **FMA)
    with pytest.raises(ValueError, match="query_coarsening"):
        fmm_attention(q[:, :4], k, v, query_coarsening=True, **FMA)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        fmm_attention(rand(134, 3, 16, 4), k, v, **FMA)
    per_head = np.ones((4, 16), bool)
    per_head[1, 5] = False  # query heads 0 and 1 share key head 0 but not its mask
    with pytest.raises(ValueError, match="key_padding_mask must be the same"):
        fmm_attention(q, k, v, key_padding_mask=per_head, **FMA)
    exact_attention(q, k, v, key_padding_mask=per_head)  # exact attention takes it
    with pytest.raises(ValueError, match="global_tokens must be the same"):
        fmm_attention(q, k, v, global_tokens=np.array([[0], [1], [0], [0]]), **FMA)
    with pytest.raises(ValueError, match="global_tokens must be >= 0"):
        fmm_attention(q, k, v, global_tokens=np.array([[-1]]), **FMA)


def test_cuda_backend_declares_shape_features_unsupported():
    cuda = backends.get_backend("cuda")
    for feature in backends.SHAPE_FEATURES:
        assert cuda.not_supported("exact", features=frozenset({feature})) == backends.SHAPE_FEATURES[feature]
        assert backends.get_backend("cpu").not_supported("exact", features=frozenset({feature})) is None
    with pytest.raises(backends.BackendNotSupportedError, match=r"'cuda'.*grouped heads.*backend='cpu'"):
        exact_attention(rand(140, 4, 8, 4), rand(141, 2, 8, 4), rand(142, 2, 8, 4), backend="cuda")


def test_fastformer_broadcast_leading_dims():
    from fmm_attention import fastformer_attention

    q, k, v = rand(150, 2, 3, 16, 4), rand(151, 1, 3, 16, 4), rand(152, 1, 3, 16, 4)
    w_q, w_k = rand(153, 4), rand(154, 4)
    for causal in (False, True):
        got = fastformer_attention(q, k, v, w_q, w_k, causal=causal)
        want = fastformer_attention(q, np.repeat(k, 2, axis=0), np.repeat(v, 2, axis=0), w_q, w_k, causal=causal)
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ gradients
def _numeric_vjp(f, x, g, eps=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        grad[idx] = ((f(xp) - f(xm)) * g).sum() / (2 * eps)
    return grad


@pytest.mark.parametrize("causal, n_q, offset", [(False, 3, None), (True, 3, None), (True, 2, 1), (False, 7, None)])
def test_exact_vjp_grouped_heads_and_cross_lengths(causal, n_q, offset):
    from fmm_attention import exact_attention_vjp

    q, k, v = rand(160, 1, 4, n_q, 3), rand(161, 1, 2, 5, 3), rand(162, 1, 2, 5, 2)
    pad = np.array([True, True, False, True, True])
    kw = dict(causal=causal, query_offset=offset, key_padding_mask=pad)
    out, pullback = exact_attention_vjp(q, k, v, **kw)
    np.testing.assert_array_equal(out, exact_attention(q, k, v, **kw))
    g = rand(163, *out.shape)
    dq, dk, dv = pullback(g)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    np.testing.assert_allclose(dq, _numeric_vjp(lambda x: exact_attention(x, k, v, **kw), q, g), atol=1e-7)
    np.testing.assert_allclose(dk, _numeric_vjp(lambda x: exact_attention(q, x, v, **kw), k, g), atol=1e-7)
    np.testing.assert_allclose(dv, _numeric_vjp(lambda x: exact_attention(q, k, x, **kw), v, g), atol=1e-7)


def test_vjp_refuses_pairwise_terms():
    from fmm_attention import exact_attention_vjp

    q = rand(170, 4, 3)
    for name, value in (("attn_mask", np.ones((4, 4), bool)), ("attn_bias", np.zeros((4, 4))),
                        ("window", (1, 1))):
        with pytest.raises(NotImplementedError, match=name):
            exact_attention_vjp(q, q, q, **{name: value})


@pytest.mark.parametrize("k_shape", [(2, 3, 8, 4), (1, 3, 8, 4)])  # as given, and broadcast over dim 0
def test_layouts_are_cached_and_read_only(k_shape):
    """A layout is resolved once per shapes and options; its index arrays are read-only
    whether broadcasting copied them or not (one compiled kernel variant either way)."""
    first = _shapes.resolve((2, 3, 8, 4), k_shape, k_shape, causal=True)
    again = _shapes.resolve([2, 3, 8, 4], list(k_shape), k_shape, causal=True, query_offset=None)
    assert again is first
    assert _shapes.resolve((2, 3, 8, 4), k_shape, k_shape) is not first  # another option, another layout
    for index in (first.q_index, first.kv_index):
        assert not index.flags.writeable and index.dtype == np.int64 and index.shape == (6,)
    np.testing.assert_array_equal(first.kv_index, np.arange(6) % (3 if k_shape[0] == 1 else 6))


@pytest.mark.parametrize("offset", [[1], 1.5, True, "1"])
def test_query_offset_of_the_wrong_type_is_a_type_error_naming_it(offset):
    with pytest.raises(TypeError, match="query_offset"):
        _shapes.resolve((8, 4), (8, 4), (8, 4), query_offset=offset)
