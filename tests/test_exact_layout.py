"""Exact attention's key-major tile layout (the micro-kernel path): query tiles padded to the micro-kernel's panel
width (16 columns in float32, 8 in float64), key tiles of any length, every feature of the
kernel at once, against the dense float64 oracle; grouped heads bitwise in float32 too."""

import numpy as np
import pytest

from fmm_attention import _config, exact_attention
from test_shapes import assert_matches, oracle

# (query tile, key tile): below, across and at the panel widths; one key tile (512) and many
TILES = [(5, 7), (8, 16), (20, 24), (64, 512)]


def _case(dtype, causal, seed=0):
    """4 query heads on 2 key/value heads, 45 queries at offset 6 over 61 keys, padded keys
    holding NaN and inf, a mask, a transposed bias and a window."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 4, 45, 12)).astype(dtype)
    k = rng.standard_normal((2, 2, 61, 12)).astype(dtype)
    v = rng.standard_normal((2, 2, 61, 9)).astype(dtype)
    pad = rng.random((2, 1, 61)) > 0.25
    k[:, 0][~pad[:, 0]] = np.nan  # masked keys may hold anything (check_finite skips them)
    k[:, 1][~pad[:, 0]] = np.inf
    kw = dict(causal=causal, query_offset=6, key_padding_mask=pad, attn_mask=rng.random((4, 45, 61)) > 0.15,
              attn_bias=rng.standard_normal((61, 45)).T.astype(dtype), window=(40, 0 if causal else 9),
              return_lse=True)
    return q, k, v, kw


def _oracle(q, k, v, kw):
    k = np.where(np.isfinite(k), k, 0.0)  # the oracle multiplies before masking
    return oracle(q, k, v, **{x: y for x, y in kw.items() if x != "return_lse"})


@pytest.mark.parametrize("tiles", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("causal", [False, True])
def test_every_feature_at_tiles_off_the_panel_width_float64(tiles, causal, monkeypatch):
    """The micro-kernel path in float64 (the default), at 1e-12."""
    monkeypatch.setattr(_config, "EXACT_QUERY_TILE", tiles[0])
    monkeypatch.setattr(_config, "EXACT_KEY_TILE", tiles[1])
    q, k, v, kw = _case(np.float64, causal)
    assert_matches(exact_attention(q, k, v, **kw), _oracle(q, k, v, kw))


@pytest.mark.parametrize("tiles", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("causal", [False, True])
def test_every_feature_at_tiles_off_the_panel_width_float32(tiles, causal, monkeypatch):
    monkeypatch.setattr(_config, "EXACT_QUERY_TILE", tiles[0])
    monkeypatch.setattr(_config, "EXACT_KEY_TILE", tiles[1])
    q, k, v, kw = _case(np.float32, causal)
    out, lse = exact_attention(q, k, v, **kw)
    want_out, want_lse = _oracle(q, k, v, kw)
    assert out.dtype == lse.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert np.abs(out - want_out).max() <= 1e-5 * np.abs(want_out).max()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[fin], want_lse[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_heads_bitwise_float32(causal, monkeypatch):
    """Groups of 1, 3 and all 4 query heads per job read the same key tiles in the same
    shapes: float32 bits equal those of k and v repeated per head."""
    monkeypatch.setattr(_config, "EXACT_QUERY_TILE", 20)
    monkeypatch.setattr(_config, "EXACT_KEY_TILE", 24)
    q, k, v, kw = _case(np.float32, causal, seed=1)
    want = exact_attention(q, np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1), **kw)
    for cap in (1, 3, 8):
        monkeypatch.setattr(_config, "EXACT_GROUP_ENTRIES", cap)
        got = exact_attention(q, k, v, **kw)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_rescale_across_key_tiles_with_rising_logits(monkeypatch):
    """Each key tile raises every query's maximum by far more than float32's exponent range
    (the running sums and values are rescaled by exp(old - new) at every tile): the result is
    the softmax of the last keys alone, as in float64."""
    monkeypatch.setattr(_config, "EXACT_KEY_TILE", 16)
    n, d = 80, 16
    rng = np.random.default_rng(5)
    q = np.ones((n, d), np.float32)
    k = (np.repeat(np.arange(n // 16, dtype=np.float32) * 100, 16)[:, None] + rng.random((n, d))).astype(np.float32)
    v = rng.standard_normal((n, d)).astype(np.float32)
    out, lse = exact_attention(q, k, v, scale=1.0, return_lse=True)
    want, want_lse = exact_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), scale=1.0,
                                     return_lse=True)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6)


def test_dtype_picks_the_kernel(monkeypatch):
    """Both dtypes run on the micro-kernel by default; a dtype the knob leaves out calls
    BLAS, and both paths give the same attention."""
    from fmm_attention.cpu import exact as cpu_exact

    assert not cpu_exact.calls_blas(np.float32) and not cpu_exact.calls_blas(np.float64)
    q, k, v, kw = _case(np.float64, True, seed=2)
    micro = exact_attention(q, k, v, **kw)
    monkeypatch.setattr(_config, "EXACT_MICRO_KERNEL_DTYPES", ("float32",))
    assert cpu_exact.calls_blas(np.float64)
    blas = exact_attention(q, k, v, **kw)
    for a, b in zip(micro, blas):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("causal", [False, True])
def test_long_float32_calls_take_the_long_query_tile_and_the_same_bits(causal, monkeypatch):
    """From ``EXACT_LONG_KEYS`` queries and keys float32 uses ``EXACT_LONG_QUERY_TILE`` rows
    per query tile (float64, and fewer queries, keep ``EXACT_QUERY_TILE``); a query's
    arithmetic does not depend on the query tile, so the results are bitwise those of the
    short tile."""
    from fmm_attention.cpu import exact as cpu_exact

    monkeypatch.setattr(_config, "EXACT_KEY_TILE", 48)
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((3, 200, 16)).astype(np.float32) for _ in range(3))
    ids, no = np.arange(3), np.zeros(1)

    def tile(x, keys=None):
        keys = x if keys is None else keys
        args = (x, keys, keys, ids, ids, None, False, no, ids, 0, 0, False, no, ids, 0, 0, False, 1.0, causal,
                keys.shape[1] - x.shape[1], 201, 201)
        return cpu_exact._layout(*args)[0][0]

    short = exact_attention(q, k, v, causal=causal, return_lse=True)
    monkeypatch.setattr(_config, "EXACT_LONG_KEYS", 200)
    monkeypatch.setattr(_config, "EXACT_LONG_QUERY_TILE", 24)
    assert tile(q) == 24 and tile(q.astype(np.float64)) == _config.EXACT_QUERY_TILE
    assert tile(q[:, :100], keys=k) == _config.EXACT_QUERY_TILE  # short queries over long keys: the jobs
    long = exact_attention(q, k, v, causal=causal, return_lse=True)
    for a, b in zip(long, short):
        np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(_config, "EXACT_LONG_KEYS", 201)
    assert tile(q) == _config.EXACT_QUERY_TILE
