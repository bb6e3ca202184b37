"""LearnedCoarsening: the grouped convolution (torch.nn.Conv1d layout) and its use in FMA."""

import numpy as np
import pytest

import reference
from fmm_attention import LearnedCoarsening, build_tree, fmm_attention
from fmm_attention._validate import attention_inputs
from fmm_attention.cpu import coarse_buffers


def grouped_conv(x, weight, bias, box_size):
    """``Conv1d(C, r*C, kernel_size=w, stride=w, groups=C)`` of ``x`` (n, C) by einsum.

    ``x`` is zero-padded to whole boxes; returns (n_boxes * r, C): row ``c*r + t``, channel
    ``e`` is ``sum_u weight[e*r + t, 0, u] * x[c*w + u, e] + bias[e*r + t]``.
    """
    n, C = x.shape
    w = box_size
    r = weight.shape[0] // C
    n_boxes = -(-n // w)
    xp = np.zeros((n_boxes * w, C))
    xp[:n] = x
    boxes = xp.reshape(n_boxes, w, C)  # [c, u, e]
    kern = weight[:, 0, :].reshape(C, r, w)  # [e, t, u]: output channel e*r + t
    out = np.einsum("cue,etu->cte", boxes, kern) + bias.reshape(C, r).T[None]
    return out.reshape(n_boxes * r, C)


def random_learned(tree, d, dv, seed, with_bias=True):
    rng = np.random.default_rng(seed)
    kw = [rng.standard_normal((lv.rank * d, 1, lv.box_size)) / lv.box_size for lv in tree.levels]
    vw = [rng.standard_normal((lv.rank * dv, 1, lv.box_size)) / lv.box_size for lv in tree.levels]
    if not with_bias:
        return kw, vw, None, None
    kb = [rng.standard_normal(lv.rank * d) * 0.5 for lv in tree.levels]
    vb = [rng.standard_normal(lv.rank * dv) * 0.5 for lv in tree.levels]
    return kw, vw, kb, vb


def zero_bias(tree, d, dv):
    return [np.zeros(lv.rank * d) for lv in tree.levels], [np.zeros(lv.rank * dv) for lv in tree.levels]


def test_grouped_conv_helper_matches_formula():
    """The einsum helper against the spec's formula written as loops (the helper can be wrong too)."""
    rng = np.random.default_rng(0)
    n, C, w, r = 11, 3, 4, 2
    x = rng.standard_normal((n, C))
    W = rng.standard_normal((r * C, 1, w))
    b = rng.standard_normal(r * C)
    got = grouped_conv(x, W, b, w)
    xp = np.vstack([x, np.zeros((1, C))])
    for c in range(3):
        for t in range(r):
            for e in range(C):
                want = sum(W[e * r + t, 0, u] * xp[c * w + u, e] for u in range(w)) + b[e * r + t]
                assert got[c * r + t, e] == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n, m, p", [(1, 4, 2), (37, 4, 2), (100, 8, 4), (64, 2, 16), (130, 16, 1)])
def test_coarse_buffers_are_the_grouped_convolution(n, m, p, masked, dtype):
    d, dv = 3, 5
    rng = np.random.default_rng(n + m + p)
    k = rng.standard_normal((2, n, d)).astype(dtype)
    v = rng.standard_normal((2, n, dv)).astype(dtype)
    valid = rng.random((2, n)) > 0.3 if masked else None
    if masked and n >= 40:
        valid[0, 16:32] = False  # whole boxes of levels 1 and 2 empty
    tree = build_tree(n, block_size=m, rank=p)
    learned = random_learned(tree, d, dv, seed=n)
    batch = attention_inputs(k, k, v, scale=None, key_padding_mask=valid, check_finite=True)
    kc, vc, cbias = coarse_buffers(batch, tree, LearnedCoarsening(*learned), True)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for h in range(2):
        ok = np.ones(n, bool) if valid is None else valid[h]
        kz = np.where(ok[:, None], k[h].astype(np.float64), 0)  # masked tokens enter as zeros
        vz = np.where(ok[:, None], v[h].astype(np.float64), 0)
        for level, kw, vw, kb, vb in zip(tree.levels, *learned):
            w, r = level.box_size, level.rank
            want_k = grouped_conv(kz, kw, kb, w)
            want_v = grouped_conv(vz, vw, vb, w)
            boxes = -(-n // w)  # boxes holding real tokens; the rest are never planned
            rows = slice(level.offset, level.offset + boxes * r)
            count = np.add.reduceat(ok.astype(float), np.arange(0, n, w))
            has = np.repeat(count > 0, r)
            np.testing.assert_allclose(kc[h, rows][has], want_k[has], rtol=tol, atol=tol)
            np.testing.assert_allclose(vc[h, rows][has], want_v[has], rtol=tol, atol=tol)
            with np.errstate(divide="ignore"):
                want_bias = np.repeat(np.log(count / r), r)
            np.testing.assert_allclose(cbias[h, rows], want_bias, rtol=tol, atol=tol)  # -inf: empty box


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, m, p", [(7, 2, 1), (37, 4, 2), (100, 4, 4), (90, 8, 16)])
def test_fma_with_learned_coarsening_matches_reference(n, m, p, causal):
    d, dv = 4, 3
    rng = np.random.default_rng(n * p)
    q, k = rng.standard_normal((2, n, d))
    v = rng.standard_normal((n, dv))
    tree = build_tree(n, block_size=m, rank=p, causal=causal)
    learned = random_learned(tree, d, dv, seed=p)
    coarsening = LearnedCoarsening(*learned)
    valid = rng.random(n) > 0.3
    valid[: min(n, 2 * m)] = False
    for mask in (None, valid):
        for count_scaling in (True, False):
            want, want_lse = reference.fma_reference(q, k, v, block_size=m, rank=p, causal=causal, valid=mask,
                                                     count_scaling=count_scaling, learned=learned)
            for dtype in (np.float64, np.float32):
                out, lse = fmm_attention(*(x.astype(dtype) for x in (q, k, v)), block_size=m, rank=p,
                                         causal=causal, key_padding_mask=mask, coarsening=coarsening,
                                         count_scaling=count_scaling, return_lse=True)
                tol = 1e-10 if dtype == np.float64 else 5e-5
                assert out.dtype == dtype
                np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
                np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
                fin = np.isfinite(want_lse)
                np.testing.assert_allclose(lse[fin], want_lse[fin], rtol=tol, atol=tol)


def test_learned_differs_from_mean():
    """The learned weights are really used: random weights give another result than mean."""
    n, m, p, d = 100, 4, 2, 4
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((3, n, d))
    tree = build_tree(n, block_size=m, rank=p)
    learned = LearnedCoarsening(*random_learned(tree, d, d, seed=3))
    a = fmm_attention(q, k, v, block_size=m, rank=p, coarsening=learned)
    b = fmm_attention(q, k, v, block_size=m, rank=p)
    assert np.abs(a - b).max() > 1e-3


def box_mean_weights(tree, channels):
    """Weights whose output slot t of a box is the mean of sub-box t (w/r tokens)."""
    out = []
    for lv in tree.levels:
        w, r = lv.box_size, lv.rank
        slot = np.zeros((r, w))
        for t in range(r):
            slot[t, t * (w // r) : (t + 1) * (w // r)] = r / w
        out.append(np.tile(slot, (channels, 1))[:, None, :])  # row e*r + t -> slot t
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, m, p", [(64, 4, 1), (256, 8, 1), (128, 4, 2), (256, 16, 4), (128, 2, 8)])
def test_box_mean_weights_reproduce_mean_coarsening(n, m, p, causal):
    """On full boxes (n = N, no mask) mean weights give mean coarsening, bias included:
    the learned bias log(valid(box) / r) equals the mean bias log(count(sub-box))."""
    d, dv = 5, 3
    tree = build_tree(n, block_size=m, rank=p, causal=causal)
    assert tree.padded_length == n
    rng = np.random.default_rng(n + p)
    q, k = rng.standard_normal((2, n, d)) * 1.5
    v = rng.standard_normal((n, dv))
    learned = LearnedCoarsening(box_mean_weights(tree, d), box_mean_weights(tree, dv), *zero_bias(tree, d, dv))
    for count_scaling in (True, False):
        a = fmm_attention(q, k, v, block_size=m, rank=p, causal=causal, coarsening=learned,
                          count_scaling=count_scaling, return_lse=True)
        b = fmm_attention(q, k, v, block_size=m, rank=p, causal=causal, count_scaling=count_scaling,
                          return_lse=True)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-11, atol=1e-12)


def test_box_mean_weights_with_padding_scale_keys_by_valid_fraction():
    """With padding the convolution sums zeros: the documented behaviour, checked against the
    reference, and visibly unlike mean coarsening (which divides by the valid count)."""
    n, m, p, d = 40, 4, 1, 3  # N = 64: the last boxes are partly padding
    tree = build_tree(n, block_size=m, rank=p)
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((3, n, d)) + 1.0
    kw, vw = box_mean_weights(tree, d), box_mean_weights(tree, d)
    kb, vb = zero_bias(tree, d, d)
    got = fmm_attention(q, k, v, block_size=m, rank=p, coarsening=LearnedCoarsening(kw, vw))
    want, _ = reference.fma_reference(q, k, v, block_size=m, rank=p, learned=(kw, vw, kb, vb))
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
    assert np.abs(got - fmm_attention(q, k, v, block_size=m, rank=p)).max() > 1e-4


def test_squeezed_2d_weights_accepted():
    n, m, p, d = 50, 4, 2, 3
    tree = build_tree(n, block_size=m, rank=p)
    kw, vw, kb, vb = random_learned(tree, d, d, seed=7)
    rng = np.random.default_rng(7)
    q, k, v = rng.standard_normal((3, n, d))
    a = fmm_attention(q, k, v, block_size=m, rank=p, coarsening=LearnedCoarsening(kw, vw, kb, vb))
    b = fmm_attention(q, k, v, block_size=m, rank=p,
                      coarsening=LearnedCoarsening([w[:, 0] for w in kw], [w[:, 0] for w in vw], kb, vb))
    np.testing.assert_array_equal(a, b)


def test_weights_are_copied():
    n, m, p, d = 50, 4, 2, 3
    tree = build_tree(n, block_size=m, rank=p)
    kw, vw, kb, vb = random_learned(tree, d, d, seed=8)
    coarse = LearnedCoarsening(kw, vw, kb, vb)
    rng = np.random.default_rng(8)
    q, k, v = rng.standard_normal((3, n, d))
    before = fmm_attention(q, k, v, block_size=m, rank=p, coarsening=coarse)
    kw[0][:] = 0
    kb[1][:] = 100
    np.testing.assert_array_equal(fmm_attention(q, k, v, block_size=m, rank=p, coarsening=coarse), before)
    assert coarse.n_levels == tree.n_levels and "LearnedCoarsening" in repr(coarse)


# --------------------------------------------------------------------------- errors
@pytest.fixture
def tree_and_weights():
    tree = build_tree(50, block_size=4, rank=2)  # N = 64: 3 levels, w = 4, 8, 16
    return tree, random_learned(tree, 3, 2, seed=9)


def call(coarsening, n=50, d=3, dv=2, m=4, p=2):
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, n, d))
    v = rng.standard_normal((n, dv))
    return fmm_attention(q, k, v, block_size=m, rank=p, coarsening=coarsening)


def test_error_wrong_number_of_levels(tree_and_weights):
    _, (kw, vw, kb, vb) = tree_and_weights
    coarse = LearnedCoarsening(kw[:2], vw[:2], kb[:2], vb[:2])
    with pytest.raises(ValueError, match="coarsening: LearnedCoarsening has 2 levels.*needs 3"):
        call(coarse)
    full = LearnedCoarsening(kw, vw, kb, vb)
    with pytest.raises(ValueError, match="coarsening.*levels"):
        call(full, n=200)  # N = 256: 5 levels


def test_error_weights_do_not_fit(tree_and_weights):
    _, (kw, vw, kb, vb) = tree_and_weights
    coarse = LearnedCoarsening(kw, vw, kb, vb)
    with pytest.raises(ValueError, match="coarsening: level 1 expects"):
        call(coarse, d=4)  # feature dim of the weights is 3
    with pytest.raises(ValueError, match="coarsening: level 1 expects"):
        call(coarse, dv=3)
    with pytest.raises(ValueError, match="coarsening: level 1 expects"):
        call(coarse, p=4)  # r_1 = 4 slots, weights have 2
    with pytest.raises(ValueError, match="coarsening"):
        call(coarse, m=8, n=100)  # N = 128: three levels, but w = 8, 16, 32


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda kw, vw, kb, vb: (kw, vw[:2], None, None), ValueError, "one array per level"),
        (lambda kw, vw, kb, vb: ([], [], None, None), ValueError, "key_weights must hold at least one level"),
        (lambda kw, vw, kb, vb: (kw[0], vw, None, None), TypeError, "key_weights must be a sequence"),
        (lambda kw, vw, kb, vb: (kw, 3.0, None, None), TypeError, "value_weights must be a sequence"),
        (lambda kw, vw, kb, vb: ([w[:, :, None] for w in kw], vw, None, None), ValueError, r"key_weights\[0\]"),
        (lambda kw, vw, kb, vb: ([w.reshape(-1) for w in kw], vw, None, None), ValueError, r"key_weights\[0\]"),
        (lambda kw, vw, kb, vb: (kw, [np.tile(w, (1, 2, 1)) for w in vw], None, None), ValueError,
         r"value_weights\[0\].*\(r\*d, 1, w\)"),
        (lambda kw, vw, kb, vb: ([w.astype(complex) for w in kw], vw, None, None), TypeError, r"key_weights\[0\]"),
        (lambda kw, vw, kb, vb: ([w.astype(bool) for w in kw], vw, None, None), TypeError, r"key_weights\[0\]"),
        (lambda kw, vw, kb, vb: ([np.full_like(kw[0], np.nan)] + kw[1:], vw, None, None), ValueError,
         r"key_weights\[0\] contains NaN"),
        (lambda kw, vw, kb, vb: (kw, vw, kb[:2], vb), ValueError, "key_bias must be None or one array per far level"),
        (lambda kw, vw, kb, vb: (kw, vw, kb, vb[0]), ValueError, "value_bias must be None or one array"),
        (lambda kw, vw, kb, vb: (kw, vw, [b[:-1] for b in kb], vb), ValueError, r"key_bias\[0\] must have shape"),
        (lambda kw, vw, kb, vb: (kw, vw, kb, [np.full_like(b, np.inf) for b in vb]), ValueError,
         r"value_bias\[0\] contains NaN or infinity"),
        (lambda kw, vw, kb, vb: (kw, [w[..., :-1] for w in vw], None, None), ValueError, "kernel width"),
    ],
)
def test_constructor_errors(tree_and_weights, mutate, error, match):
    _, weights = tree_and_weights
    with pytest.raises(error, match=match):
        LearnedCoarsening(*mutate(*weights))


def test_torch_conv1d_layout():
    torch = pytest.importorskip("torch")
    n, m, p, d, dv = 64, 4, 2, 3, 2
    tree = build_tree(n, block_size=m, rank=p)
    rng = np.random.default_rng(10)
    k = rng.standard_normal((n, d))
    learned = random_learned(tree, d, dv, seed=10)
    batch = attention_inputs(k, k, k[:, :dv].copy(), scale=None, key_padding_mask=None, check_finite=True)
    kc, _, _ = coarse_buffers(batch, tree, LearnedCoarsening(*learned), True)
    for level, kw, kb in zip(tree.levels, learned[0], learned[2], strict=True):
        # float64 parameters: the comparison is at 1e-10, and torch refuses mixed dtypes
        conv = torch.nn.Conv1d(d, level.rank * d, kernel_size=level.box_size, stride=level.box_size, groups=d,
                               dtype=torch.float64)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(kw))
            conv.bias.copy_(torch.from_numpy(kb))
            y = conv(torch.from_numpy(k.T[None].copy()))[0].numpy()  # (r*d, n_boxes): channel e*r + t
        want = y.reshape(d, level.rank, -1).transpose(2, 1, 0).reshape(-1, d)  # row c*r + t
        rows = slice(level.offset, level.offset + level.n_boxes * level.rank)
        np.testing.assert_allclose(kc[0, rows], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bias_or_no_bias_compile_no_new_kernel_variant(dtype):
    """Given biases and default (zero) biases reach the kernels as the same Numba type."""
    from fmm_attention.cpu.upward import learned_upward_level

    n, m, p, d = 50, 4, 2, 3
    tree = build_tree(n, block_size=m, rank=p)
    kw, vw, kb, vb = random_learned(tree, d, d, seed=11)
    rng = np.random.default_rng(11)
    q, k, v = rng.standard_normal((3, n, d)).astype(dtype)
    with_bias = fmm_attention(q, k, v, block_size=m, rank=p, coarsening=LearnedCoarsening(kw, vw, kb, vb))
    before = set(learned_upward_level.signatures)
    without = fmm_attention(q, k, v, block_size=m, rank=p, coarsening=LearnedCoarsening(kw, vw))
    assert set(learned_upward_level.signatures) == before
    assert np.abs(with_bias - without).max() > 1e-3  # the biases were used


@pytest.mark.parametrize("which", ["key_bias", "value_bias"])
def test_complex_bias_is_rejected(tree_and_weights, which):
    """A cast to float64 would drop the imaginary part silently (complex weights are rejected too)."""
    _, (kw, vw, kb, vb) = tree_and_weights
    biases = {"key_bias": kb, "value_bias": vb}
    biases[which] = [b + 1j for b in biases[which]]
    with pytest.raises(TypeError, match=rf"{which}\[0\] must be real, got dtype complex128"):
        LearnedCoarsening(kw, vw, **biases)
