"""FMMDecoder: streaming causal decode equals the rows of the one-shot forward.

Small trees (block 4, rank 2) and up to 128 tokens, so boxes close at every level and
levels are added while decoding (a level-l box is first listed at position 2 * w_l).
"""

import numpy as np
import pytest

from fmm_attention import (
    FMMDecoder,
    LearnedCoarsening,
    build_tree,
    exact_attention,
    fmm_attention,
)

M, P, D, DV = 4, 2, 4, 3
TOL = {"rtol": 1e-12, "atol": 1e-12}


def qkv(lead, n, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(lead + (n, D))
    k = rng.standard_normal(lead + (n, D))
    v = rng.standard_normal(lead + (n, DV))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def learned(n_levels, seed=3):
    """Random Conv1d-layout weights and biases for ``n_levels`` far levels of block M, rank P."""
    tree = build_tree(M << (n_levels + 1), block_size=M, rank=P, causal=True)
    assert tree.n_levels == n_levels
    rng = np.random.default_rng(seed)
    kw = [rng.standard_normal((lv.rank * D, 1, lv.box_size)) / lv.box_size for lv in tree.levels]
    vw = [rng.standard_normal((lv.rank * DV, 1, lv.box_size)) / lv.box_size for lv in tree.levels]
    kb = [rng.standard_normal(lv.rank * D) * 0.5 for lv in tree.levels]
    vb = [rng.standard_normal(lv.rank * DV) * 0.5 for lv in tree.levels]
    return LearnedCoarsening(kw, vw, kb, vb)


def decode(dec, q, k, v, *, prompt=0, chunk=1, valid=None):
    """Outputs and lse of a prefill of ``prompt`` tokens, then steps of ``chunk`` tokens."""
    n = q.shape[-2]
    outs, lses = [], []
    if prompt:
        mask = None if valid is None else valid[..., :prompt]
        o, s = dec.prefill(q[..., :prompt, :], k[..., :prompt, :], v[..., :prompt, :], key_padding_mask=mask,
                           return_lse=True)
        outs.append(o)
        lses.append(s)
    t = prompt
    while t < n:
        sl = slice(t, min(n, t + chunk))
        mask = None if valid is None else valid[..., sl]
        o, s = dec.step(q[..., sl, :], k[..., sl, :], v[..., sl, :], valid=mask, return_lse=True)
        outs.append(o)
        lses.append(s)
        t = sl.stop
    assert dec.position == n
    return np.concatenate(outs, axis=-2), np.concatenate(lses, axis=-1)


def forward(q, k, v, T, *, valid=None, global_tokens=(), coarsening="mean"):
    g = [x for x in global_tokens if x < T]
    return fmm_attention(
        q[..., :T, :], k[..., :T, :], v[..., :T, :], causal=True, block_size=M, rank=P, coarsening=coarsening,
        key_padding_mask=None if valid is None else valid[..., :T], global_tokens=g or None, return_lse=True,
    )


def test_forward_rows_do_not_depend_on_the_length():
    """The premise of decoding: row t of the causal forward is the same for every T > t."""
    q, k, v = qkv((2,), 70)
    full, _ = forward(q, k, v, 70)
    for T in (1, 3, 8, 9, 16, 17, 31, 33, 47, 64, 65):
        np.testing.assert_allclose(forward(q, k, v, T)[0], full[:, :T], **TOL)


@pytest.mark.parametrize("prompt, chunk", [(0, 1), (0, 7), (1, 1), (5, 3), (16, 1), (33, 2), (64, 1)])
def test_mean_decode_equals_forward_rows(prompt, chunk):
    n = 70
    q, k, v = qkv((2,), n)
    dec = FMMDecoder(batch_shape=(2,), d=D, dv=DV, block_size=M, rank=P)
    out, lse = decode(dec, q, k, v, prompt=prompt, chunk=chunk)
    # each row against the forward that ends at it (the shortest tree holding it) ...
    for t in range(n):
        ref, ref_lse = forward(q, k, v, t + 1)
        np.testing.assert_allclose(out[:, t], ref[:, t], **TOL)
        np.testing.assert_allclose(lse[:, t], ref_lse[:, t], **TOL)
    # ... and all rows against one longer forward
    np.testing.assert_allclose(out, forward(q, k, v, n)[0], **TOL)


def test_levels_added_past_the_first_tree():
    """130 tokens: level 5 (w = 64) is first listed at position 128."""
    n = 131
    q, k, v = qkv((), n, seed=5)
    dec = FMMDecoder(d=D, dv=DV, block_size=M, rank=P)
    out, _ = decode(dec, q, k, v, prompt=100, chunk=1)
    for T in (101, 128, 129, 131):
        ref, _ = forward(q, k, v, T)
        np.testing.assert_allclose(out[:T], ref, **TOL)


@pytest.mark.parametrize("prompt", [0, 37])
def test_padding_and_global_tokens(prompt):
    n = 70
    q, k, v = qkv((2, 2), n, seed=1)
    rng = np.random.default_rng(2)
    valid = rng.random((2, 2, n)) > 0.25
    valid[0, 1, :3] = False  # the first queries of one sequence have no valid key at all
    valid[1, 0, 9] = False  # an invalid global token
    globals_ = [0, 9, 37, 38, 66]
    dec = FMMDecoder(batch_shape=(2, 2), d=D, dv=DV, block_size=M, rank=P, global_tokens=globals_)
    out, lse = decode(dec, q, k, v, prompt=prompt, chunk=1, valid=valid)
    assert np.all(out[0, 1, :3] == 0) and np.all(lse[0, 1, :3] == -np.inf)
    for t in range(prompt, n):
        ref, ref_lse = forward(q, k, v, t + 1, valid=valid, global_tokens=globals_)
        np.testing.assert_allclose(out[..., t, :], ref[..., t, :], **TOL)
        np.testing.assert_allclose(lse[..., t], ref_lse[..., t], **TOL)
    ref, _ = forward(q, k, v, n, valid=valid, global_tokens=globals_)
    np.testing.assert_allclose(out, ref, **TOL)
    # the global tokens matter: without them the rows differ
    plain, _ = forward(q, k, v, n, valid=valid)
    assert np.abs(plain - out).max() > 1e-3


@pytest.mark.parametrize("prompt, chunk", [(0, 1), (5, 3), (37, 1), (64, 5), (90, 1)])
def test_learned_decode_equals_forward_rows(prompt, chunk):
    n = 128  # 4 levels of weights serve positions below M * 2**5 = 128
    coarse = learned(4)
    q, k, v = qkv((2,), n, seed=4)
    dec = FMMDecoder(batch_shape=(2,), d=D, dv=DV, block_size=M, rank=P, coarsening=coarse)
    out, lse = decode(dec, q, k, v, prompt=prompt, chunk=chunk)
    for T in (65, 70, 100, 128):  # every length whose tree has the weights' 4 levels
        ref, ref_lse = forward(q, k, v, T, coarsening=coarse)
        np.testing.assert_allclose(out[:, :T], ref, **TOL)
        np.testing.assert_allclose(lse[:, :T], ref_lse, **TOL)
    with pytest.raises(ValueError, match="LearnedCoarsening has 4 levels"):
        dec.step(q[:, :1], k[:, :1], v[:, :1])


@pytest.mark.parametrize("prompt", [0, 50])
def test_learned_with_padding_and_global_tokens(prompt):
    n = 128
    coarse = learned(4, seed=7)
    q, k, v = qkv((3,), n, seed=8)
    valid = np.random.default_rng(9).random((3, n)) > 0.3
    valid[2, 32:64] = False  # whole boxes with no valid token are masked
    globals_ = [2, 20, 21, 90]
    dec = FMMDecoder(batch_shape=(3,), d=D, dv=DV, block_size=M, rank=P, coarsening=coarse,
                     global_tokens=globals_)
    out, lse = decode(dec, q, k, v, prompt=prompt, chunk=1, valid=valid)
    for T in (66, 128):
        ref, ref_lse = forward(q, k, v, T, valid=valid, global_tokens=globals_, coarsening=coarse)
        np.testing.assert_allclose(out[:, :T], ref, **TOL)
        np.testing.assert_allclose(lse[:, :T], ref_lse, **TOL)


def test_learned_differs_from_mean():
    """The learned path really uses the weights (a decoder that ignored them would match mean)."""
    q, k, v = qkv((), 100, seed=4)
    mean = decode(FMMDecoder(d=D, dv=DV, block_size=M, rank=P), q, k, v)[0]
    lrn = decode(FMMDecoder(d=D, dv=DV, block_size=M, rank=P, coarsening=learned(4)), q, k, v)[0]
    assert np.abs(mean - lrn).max() > 1e-3


@pytest.mark.parametrize("prompt, chunk", [(0, 1), (20, 3)])
def test_exact_decoder_equals_exact_attention(prompt, chunk):
    n = 60
    q, k, v = qkv((2,), n, seed=6)
    valid = np.random.default_rng(1).random((2, n)) > 0.2
    valid[1, :2] = False
    dec = FMMDecoder(batch_shape=(2,), d=D, dv=DV, method="exact")
    out, lse = decode(dec, q, k, v, prompt=prompt, chunk=chunk, valid=valid)
    ref, ref_lse = exact_attention(q, k, v, causal=True, key_padding_mask=valid, return_lse=True)
    np.testing.assert_allclose(out, ref, **TOL)
    np.testing.assert_allclose(lse, ref_lse, **TOL)
    assert np.all(out[1, :2] == 0)


def test_state_does_not_grow_linearly():
    q, k, v = qkv((), 4100, seed=11)
    sizes = {}
    for method in ("fmm", "exact"):
        for T in (64, 4096):
            dec = FMMDecoder(d=D, dv=DV, block_size=M, rank=P, method=method)
            dec.prefill(q[:T], k[:T], v[:T])
            sizes[method, T] = dec.state_bytes
    assert sizes["fmm", 4096] < 3 * sizes["fmm", 64]  # 64x the tokens: a few levels more
    assert sizes["exact", 4096] >= 60 * sizes["exact", 64]  # the KV cache: linear
    # the state after a long prompt (11 levels) still decodes the forward's rows
    dec = FMMDecoder(d=D, dv=DV, block_size=M, rank=P)
    dec.prefill(q[:4096], k[:4096], v[:4096])
    out = np.concatenate([dec.step(q[t : t + 1], k[t : t + 1], v[t : t + 1]) for t in range(4096, 4100)])
    ref, _ = forward(q, k, v, 4100)
    np.testing.assert_allclose(out, ref[4096:], **TOL)


def test_float32_state_follows_float64():
    q, k, v = qkv((2,), 70, seed=12)
    dec = FMMDecoder(batch_shape=(2,), d=D, dv=DV, block_size=M, rank=P, dtype=np.float32)
    out, _ = decode(dec, q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), prompt=10)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, forward(q, k, v, 70)[0], rtol=1e-5, atol=1e-5)


def test_inputs_not_modified():
    q, k, v = qkv((2,), 20, seed=13)
    valid = np.ones((2, 20), dtype=bool)
    copies = [a.copy() for a in (q, k, v, valid)]
    dec = FMMDecoder(batch_shape=(2,), d=D, dv=DV, block_size=M, rank=P, global_tokens=[1])
    decode(dec, q, k, v, prompt=9, chunk=4, valid=valid)
    for a, b in zip((q, k, v, valid), copies):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["fmm", "exact"])
def test_step_inputs_of_every_kind_give_the_same_rows(method):
    # a step whose arrays need no conversion takes them as they are; every other kind
    # (list, other dtype, strided, read-only, grouped leading dims) goes the general way
    q, k, v = qkv((2,), 40, seed=14)
    outs = []
    for kind in ("plain", "list", "float32", "strided", "readonly"):
        dec = FMMDecoder(batch_shape=(2,), d=D, dv=DV, block_size=M, rank=P, method=method)
        dec.prefill(q[:, :30], k[:, :30], v[:, :30])
        rows = []
        for t in range(30, 40):
            toks = [a[:, t:t + 1] for a in (q, k, v)]
            if kind == "list":
                toks = [a.tolist() for a in toks]
            elif kind == "float32":
                toks = [a.astype(np.float32) for a in toks]
            elif kind == "strided":
                toks = [np.repeat(a, 2, axis=-1)[..., ::2] for a in toks]
                assert not toks[0].flags.c_contiguous
            elif kind == "readonly":
                toks = [a.copy() for a in toks]
                for a in toks:
                    a.flags.writeable = False
            rows.append(dec.step(*toks))
        outs.append(np.concatenate(rows, axis=-2))
    for kind, out in zip(("list", "float32", "strided", "readonly"), outs[1:]):
        tol = 1e-6 if kind == "float32" else 0
        np.testing.assert_allclose(out, outs[0], rtol=tol, atol=tol, err_msg=kind)
    ref = forward(q, k, v, 40)[0] if method == "fmm" else None
    if ref is not None:
        np.testing.assert_allclose(outs[0], ref[:, 30:40], rtol=1e-12, atol=1e-12)
    dec = FMMDecoder(batch_shape=(2,), d=D, dv=DV, block_size=M, rank=P, method=method)
    with pytest.raises(ValueError, match="k must have shape"):
        dec.step(q[:, :1], k[:1, :1], v[:, :1])
    with pytest.raises(TypeError, match="q must have a real floating dtype"):
        dec.step(q[:, :1].astype(np.int64), k[:, :1], v[:, :1])


@pytest.mark.parametrize("method", ["fmm", "exact"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nonfinite_tokens_are_refused_by_name(monkeypatch, method, bad_value):
    # a step's few tokens take one serial check of all three arrays, a prompt above
    # _config.DECODE_PARALLEL_MIN_WORK elements the parallel check per array: both name it
    from fmm_attention import _config

    monkeypatch.setattr(_config, "DECODE_PARALLEL_MIN_WORK", 64)
    for n_tokens in (1, 20):
        for which in range(3):
            dec = FMMDecoder(d=D, dv=DV, block_size=M, rank=P, method=method)
            arrays = list(qkv((), n_tokens, seed=which))
            arrays[which][n_tokens // 2, 1] = bad_value
            call = dec.step if n_tokens == 1 else dec.prefill
            with pytest.raises(ValueError, match=f"{'qkv'[which]} contains NaN or infinity"):
                call(*arrays)
            assert dec.position == 0
            call(*arrays, check_finite=False)  # the check is what refused them
            assert dec.position == n_tokens


def test_bad_inputs():
    dec = FMMDecoder(batch_shape=(2,), d=D, dv=DV, block_size=M, rank=P)
    q, k, v = qkv((2,), 1)
    with pytest.raises(ValueError, match=r"q must have shape \(\*batch_shape, t, d\)"):
        dec.step(q[..., :3], k, v)
    with pytest.raises(ValueError, match=r"v must have shape \(\*batch_shape, t, dv\)"):
        dec.step(q, k, q)
    with pytest.raises(ValueError, match="batch_shape"):
        dec.step(q[:1], k[:1], v[:1])
    with pytest.raises(ValueError, match="same number of tokens"):
        dec.step(np.concatenate([q, q], axis=1), k, v)
    with pytest.raises(ValueError, match="at least one token"):
        dec.step(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(TypeError, match="k must have a real floating dtype"):
        dec.step(q, k.astype(np.int64), v)
    bad = k.copy()
    bad[1, 0, 2] = np.nan
    with pytest.raises(ValueError, match="k contains NaN"):
        dec.step(q, bad, v)
    with pytest.raises(TypeError, match="valid must be a bool array"):
        dec.step(q, k, v, valid=np.ones((2, 1)))
    with pytest.raises(ValueError, match=r"valid must have shape \(\*batch_shape, t\)"):
        dec.step(q, k, v, valid=np.ones((2, 2), dtype=bool))
    assert dec.position == 0  # nothing was appended by the rejected calls
    with pytest.raises(TypeError, match="d must be a positive integer"):
        FMMDecoder(d=4.0)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        FMMDecoder(d=4, block_size=3)
    with pytest.raises(ValueError, match="coarsening must be 'mean' or a LearnedCoarsening"):
        FMMDecoder(d=4, coarsening="cluster")
    with pytest.raises(ValueError, match="method must be one of"):
        FMMDecoder(d=4, method="flash")
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        FMMDecoder(d=4, dtype=np.float16)
    with pytest.raises(ValueError, match="batch_shape\\[1\\] must be at least 1"):
        FMMDecoder(d=4, batch_shape=(2, 0))
    with pytest.raises(ValueError, match="global_tokens must be non-negative"):
        FMMDecoder(d=4, global_tokens=[-1])
    with pytest.raises(ValueError, match="coarsening: level 1 expects key weights"):
        FMMDecoder(d=D + 1, dv=DV, block_size=M, rank=P, coarsening=learned(3))
    dec = FMMDecoder(d=D, dv=DV, block_size=M, rank=P, coarsening=learned(3))  # positions < 64
    q, k, v = qkv((), 65)
    with pytest.raises(ValueError, match="serve positions below 64"):
        dec.prefill(q, k, v)


@pytest.mark.parametrize("coarsening", ["mean", "learned"])
def test_parallel_kernel_equals_forward(monkeypatch, coarsening):
    """Batches large enough run the parallel kernel (forced here): same rows."""
    from fmm_attention import _config

    monkeypatch.setattr(_config, "DECODE_PARALLEL_MIN_WORK", 0)
    coarse = learned(4) if coarsening == "learned" else "mean"
    q, k, v = qkv((5,), 100, seed=14)
    valid = np.random.default_rng(15).random((5, 100)) > 0.2
    dec = FMMDecoder(batch_shape=(5,), d=D, dv=DV, block_size=M, rank=P, coarsening=coarse, global_tokens=[3, 50])
    out, lse = decode(dec, q, k, v, prompt=30, chunk=3, valid=valid)
    ref, ref_lse = forward(q, k, v, 100, valid=valid, global_tokens=[3, 50], coarsening=coarse)
    np.testing.assert_allclose(out, ref, **TOL)
    np.testing.assert_allclose(lse, ref_lse, **TOL)


@pytest.mark.parametrize("method, coarsening", [("fmm", "mean"), ("fmm", "learned"), ("exact", "mean")])
def test_parallel_kernel_changes_no_bit(monkeypatch, method, coarsening):
    """The parallel decode kernels (one job per state for FMA, per (query, key chunk) for
    exact) give the bits of the serial ones."""
    from fmm_attention import _config

    coarse = learned(4) if coarsening == "learned" else "mean"
    q, k, v = qkv((5,), 100, seed=21)
    valid = np.random.default_rng(22).random((5, 100)) > 0.2
    results = []
    for least in (0, 10**15):
        monkeypatch.setattr(_config, "DECODE_PARALLEL_MIN_WORK", least)
        dec = FMMDecoder(batch_shape=(5,), d=D, dv=DV, block_size=M, rank=P, coarsening=coarse, global_tokens=[3],
                         method=method)
        results.append(decode(dec, q, k, v, prompt=30, chunk=7, valid=valid))
    for x, y in zip(*results):
        np.testing.assert_array_equal(x, y)


def test_exact_decoder_over_key_chunks(monkeypatch):
    """A long cache is split over key chunks merged by log-sum-exp (parallel kernel)."""
    from fmm_attention import _config

    monkeypatch.setattr(_config, "DECODE_PARALLEL_MIN_WORK", 0)
    n = 9000  # two chunks of 4096 keys or more
    q, k, v = qkv((2,), n, seed=16)
    dec = FMMDecoder(batch_shape=(2,), d=D, dv=DV, method="exact")
    out, lse = decode(dec, q, k, v, prompt=n - 5, chunk=2)
    ref, ref_lse = exact_attention(q, k, v, causal=True, return_lse=True)
    np.testing.assert_allclose(out[:, -5:], ref[:, -5:], **TOL)
    np.testing.assert_allclose(lse[:, -5:], ref_lse[:, -5:], **TOL)


def test_exact_decode_runs_one_job_on_the_calling_thread(monkeypatch):
    """A single query over a cache of one key chunk is one job: above the work threshold it
    still takes the serial kernel (a parallel launch would only add its cost), and two
    sequences take the parallel one."""
    from fmm_attention import _config
    from fmm_attention.cpu import decode as kernels

    monkeypatch.setattr(_config, "DECODE_PARALLEL_MIN_WORK", 0)
    ran = []
    for name in ("exact_decode", "exact_decode_serial"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, _k=kernel, _n=name: (ran.append(_n), _k(*args))[1])
    for batch, expected in ((1, "exact_decode_serial"), (2, "exact_decode")):
        q, k, v = qkv((batch,), 40, seed=17)
        dec = FMMDecoder(batch_shape=(batch,), d=D, dv=DV, method="exact")
        dec.prefill(q[:, :39], k[:, :39], v[:, :39])
        ran.clear()
        out = dec.step(q[:, 39:], k[:, 39:], v[:, 39:])
        assert ran == [expected]
        ref = exact_attention(q, k, v, causal=True)[:, 39:]
        np.testing.assert_allclose(out, ref, **TOL)


# ------------------------------------------------------------------ grouped heads (Hq = g * Hk)
@pytest.mark.parametrize("method, coarsening", [("fmm", "mean"), ("fmm", "learned"), ("exact", "mean")])
@pytest.mark.parametrize("prompt", [0, 37])
def test_grouped_heads_equal_the_grouped_forward_rows(method, coarsening, prompt):
    """Issue 16: 6 query heads over 2 key/value heads (g = 3), padding and global tokens: the
    rows of the grouped one-shot call, the bits of the decoder fed k, v repeated, and a
    state a third of that decoder's."""
    n, g = 70 if coarsening == "mean" else 128, 3
    coarse = learned(4, seed=12) if coarsening == "learned" else "mean"
    rng = np.random.default_rng(13)
    q = rng.standard_normal((2, 2 * g, n, D))
    k, v = rng.standard_normal((2, 2, n, D)), rng.standard_normal((2, 2, n, DV))
    valid = rng.random((2, 2, n)) > 0.25
    globals_ = [0, 9, 38]
    opts = dict(d=D, dv=DV, block_size=M, rank=P, coarsening=coarse, method=method)
    if method == "fmm":
        opts["global_tokens"] = globals_
    dec = FMMDecoder(batch_shape=(2, 2 * g), kv_heads=2, **opts)
    out, lse = decode(dec, q, k, v, prompt=prompt, chunk=1, valid=valid)
    assert out.shape == (2, 2 * g, n, DV) and lse.shape == (2, 2 * g, n)
    valid_q = np.repeat(valid, g, axis=1)
    if method == "exact":
        ref, ref_lse = exact_attention(q, k, v, causal=True, key_padding_mask=valid_q, return_lse=True)
    else:
        ref, ref_lse = forward(q, k, v, n, valid=valid_q, global_tokens=globals_, coarsening=coarse)
    np.testing.assert_allclose(out, ref, **TOL)
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], **TOL)
    rep = FMMDecoder(batch_shape=(2, 2 * g), **opts)
    kr, vr = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    want, want_lse = decode(rep, q, kr, vr, prompt=prompt, chunk=1, valid=valid_q)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lse, want_lse)
    assert dec.state_bytes * g == rep.state_bytes


def test_grouped_heads_bad_input():
    with pytest.raises(ValueError, match="kv_heads must divide"):
        FMMDecoder(batch_shape=(2, 6), d=D, kv_heads=4)
    with pytest.raises(ValueError, match="kv_heads must divide"):
        FMMDecoder(d=D, kv_heads=1)
    with pytest.raises((TypeError, ValueError), match="kv_heads"):
        FMMDecoder(batch_shape=(6,), d=D, kv_heads=0)
    dec = FMMDecoder(batch_shape=(6,), d=D, dv=DV, kv_heads=2, block_size=M, rank=P)
    q, k, v = qkv((6,), 5)
    with pytest.raises(ValueError, match=r"k must have shape \(\*batch_shape\[:-1\], kv_heads, t, d\)"):
        dec.prefill(q, k, v)  # k, v repeated to the query heads
    q, k, v = np.zeros((6, 5, D)), np.zeros((2, 5, D)), np.zeros((2, 5, DV))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        dec.prefill(q, k, v, key_padding_mask=np.ones((6, 5), bool))
    assert dec.prefill(q, k, v).shape == (6, 5, DV)
