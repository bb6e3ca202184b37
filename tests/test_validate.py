"""Input checking of the public functions: clear errors naming the argument, array-likes,
dtype rules, and inputs that are never modified."""

import numpy as np
import pytest

from fmm_attention import exact_attention, fmm_attention

N, D, DV = 24, 4, 3


def fma(q, k, v, **kwargs):
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("rank", 2)
    return fmm_attention(q, k, v, **kwargs)


FUNCS = pytest.mark.parametrize("func", [exact_attention, fma], ids=["exact", "fmm"])


def qkv(dtype=np.float64, lead=(2,), n=N):
    rng = np.random.default_rng(0)
    return (rng.standard_normal(lead + (n, D)).astype(dtype), rng.standard_normal(lead + (n, D)).astype(dtype),
            rng.standard_normal(lead + (n, DV)).astype(dtype))


# --------------------------------------------------------------------------- shapes
@FUNCS
@pytest.mark.parametrize(
    "shapes, match",
    [
        (((N,), (N, D), (N, DV)), "q must have at least 2 dims"),
        (((N, D), (N, D), (DV,)), "v must have at least 2 dims"),
        (((N, D), (), (N, DV)), "k must have at least 2 dims"),
        (((2, N, D), (3, N, D), (2, N, DV)), "leading dims"),
        (((2, N, D), (2, N, D), (N, DV)), "leading dims"),
        (((N, D), (N + 1, D), (N, DV)), "sequence length n"),
        (((N, D), (N, D), (N - 1, DV)), "sequence length n"),
        (((N, D), (N, D + 1), (N, DV)), "q and k must have the same feature dim"),
        (((0, D), (0, D), (0, DV)), "sequence length n must be at least 1"),
        (((N, 0), (N, 0), (N, DV)), "feature dims"),
        (((N, D), (N, D), (N, 0)), "feature dims"),
    ],
)
def test_shape_errors(func, shapes, match):
    arrays = [np.ones(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        func(*arrays)


# --------------------------------------------------------------------------- dtypes
@FUNCS
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object])
def test_non_float_dtypes_rejected(func, which, dtype):
    arrays = list(qkv())
    arrays[which] = arrays[which].astype(dtype)
    name = "qkv"[which]
    with pytest.raises(TypeError, match=f"{name} must have a real floating dtype"):
        func(*arrays)


@FUNCS
def test_strings_rejected(func):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k must have a real floating dtype"):
        func(q, np.full(k.shape, "a"), v)


@FUNCS
@pytest.mark.parametrize("dtype, want", [(np.float16, np.float32), (np.float32, np.float32),
                                         (np.float64, np.float64), (np.longdouble, np.float64)])
def test_float_dtypes(func, dtype, want):
    q, k, v = qkv(dtype)
    out, lse = func(q, k, v, return_lse=True)
    assert out.dtype == want and lse.dtype == want
    ref = func(*(x.astype(want) for x in (q, k, v)))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)


@FUNCS
def test_mixed_float_dtypes_promote(func):
    q, k, v = qkv(np.float32)
    assert func(q, k.astype(np.float64), v).dtype == np.float64
    assert func(q, k, v.astype(np.float16)).dtype == np.float32


# --------------------------------------------------------------------------- finiteness
@FUNCS
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected(func, which, bad):
    arrays = [x.copy() for x in qkv()]
    arrays[which][1, 5, 0] = bad
    with pytest.raises(ValueError, match=f"{'qkv'[which]} contains NaN or infinity"):
        func(*arrays)
    with pytest.raises(ValueError, match="check_finite=False"):
        func(*arrays, check_finite=True)
    out = func(*arrays, check_finite=False)  # the check is skipped: no error
    assert out.shape == (2, N, DV)
    assert np.isfinite(out[0]).all()  # other batch members are untouched


@FUNCS
def test_non_finite_float16(func):
    q, k, v = qkv(np.float16)
    k[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="k contains NaN or infinity"):
        func(q, k, v)


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("name", ["block_size", "rank"])
@pytest.mark.parametrize("value, error", [(3, ValueError), (6, ValueError), (0, ValueError), (-2, ValueError),
                                          (4.0, TypeError), ("4", TypeError), (None, TypeError), (True, TypeError),
                                          (np.float64(2), TypeError)])
def test_block_size_and_rank(name, value, error):
    q, k, v = qkv()
    with pytest.raises(error, match=name):
        fma(q, k, v, **{name: value})


@pytest.mark.parametrize("name", ["block_size", "rank"])
def test_block_size_and_rank_numpy_integers(name):
    q, k, v = qkv()
    np.testing.assert_array_equal(fma(q, k, v, **{name: np.int64(8)}), fma(q, k, v, **{name: 8}))


@pytest.mark.parametrize("value", ["max", "Mean", "", None, 1, object()])
def test_unknown_coarsening(value):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="coarsening must be 'mean'.*LearnedCoarsening.*got"):
        fma(q, k, v, coarsening=value)


@FUNCS
@pytest.mark.parametrize("value", ["gpu", "CPU", "", None, 0])
def test_unknown_backend(func, value):
    with pytest.raises(ValueError, match="backend must be one of"):
        func(*qkv(), backend=value)


@FUNCS
def test_cpu_backend_explicit(func):
    q, k, v = qkv()
    np.testing.assert_array_equal(func(q, k, v, backend="cpu"), func(q, k, v))


@pytest.mark.parametrize("flag", ["causal", "return_lse", "check_finite", "count_scaling", "query_coarsening"])
@pytest.mark.parametrize("value", [1, 0, "yes", None, np.array([True])])
def test_non_bool_flags(flag, value):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=f"{flag} must be True or False"):
        fma(q, k, v, **{flag: value})
    if flag in ("causal", "return_lse", "check_finite"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False"):
            exact_attention(q, k, v, **{flag: value})


@FUNCS
def test_numpy_bool_flags_accepted(func):
    q, k, v = qkv()
    out, lse = func(q, k, v, causal=np.bool_(True), return_lse=np.bool_(True))
    np.testing.assert_array_equal(out, func(q, k, v, causal=True))


@FUNCS
@pytest.mark.parametrize("value, error, match", [("0.5", TypeError, "scale must be a real number"),
                                                  (True, TypeError, "scale must be a real number"),
                                                  (1j, TypeError, "scale must be a real number"),
                                                  (np.nan, ValueError, "scale must be finite"),
                                                  (np.inf, ValueError, "scale must be finite")])
def test_bad_scale(func, value, error, match):
    with pytest.raises(error, match=match):
        func(*qkv(), scale=value)


# --------------------------------------------------------------------------- masks
@FUNCS
@pytest.mark.parametrize("mask, error, match", [
    (np.ones((2, N), dtype=np.int64), TypeError, "key_padding_mask must be a bool array"),
    (np.ones((2, N), dtype=np.float64), TypeError, "key_padding_mask must be a bool array"),
    (np.ones(N, dtype=bool), ValueError, r"key_padding_mask must have shape \(2, 24\)"),
    (np.ones((2, N + 1), dtype=bool), ValueError, "key_padding_mask must have shape"),
    (np.ones((1, N), dtype=bool), ValueError, "key_padding_mask must have shape"),
    (np.ones((2, N, 1), dtype=bool), ValueError, "key_padding_mask must have shape"),
    (True, ValueError, "key_padding_mask must have shape"),
])
def test_bad_masks(func, mask, error, match):
    with pytest.raises(error, match=match):
        func(*qkv(), key_padding_mask=mask)


@FUNCS
def test_mask_as_list(func):
    q, k, v = qkv()
    mask = np.random.default_rng(1).random((2, N)) > 0.3
    np.testing.assert_array_equal(func(q, k, v, key_padding_mask=mask.tolist()),
                                  func(q, k, v, key_padding_mask=mask))


# --------------------------------------------------------------------------- array-likes
class WithArray:
    def __init__(self, arr):
        self._arr = arr

    def __array__(self, dtype=None, copy=None):
        return self._arr if dtype is None else self._arr.astype(dtype)


class DLPackOnly:
    """Exposes DLPack and nothing else (no __array__, no buffer protocol)."""

    def __init__(self, arr):
        self._arr = arr

    def __dlpack__(self, **kwargs):
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


@FUNCS
@pytest.mark.parametrize("wrap", [lambda x: x.tolist(), WithArray, DLPackOnly, lambda x: list(x)],
                         ids=["list", "__array__", "dlpack", "list-of-arrays"])
def test_array_likes(func, wrap):
    q, k, v = qkv()
    want = func(q, k, v)
    got = func(wrap(q), wrap(k), wrap(v))
    assert type(got) is np.ndarray
    np.testing.assert_array_equal(got, want)
    got32 = func(wrap(q.astype(np.float32)), wrap(k.astype(np.float32)), wrap(v.astype(np.float32)))
    # nested lists hold Python floats, which are float64; the array protocols keep float32
    assert got32.dtype == (np.float64 if isinstance(wrap(q), list) and not isinstance(wrap(q)[0], np.ndarray)
                           else np.float32)


@FUNCS
def test_ragged_list_rejected(func):
    q, k, v = qkv(lead=())
    ragged = [[1.0, 2.0], [1.0]]
    with pytest.raises(TypeError, match="q must be an array-like"):
        func(ragged, k, v)


@FUNCS
def test_non_contiguous_inputs(func):
    q, k, v = qkv(lead=(3,))
    qt = np.ascontiguousarray(q.transpose(1, 0, 2)).transpose(1, 0, 2)  # same values, other strides
    assert not qt.flags.c_contiguous
    np.testing.assert_array_equal(func(qt, k[:, ::1], v), func(q, k, v))
    np.testing.assert_array_equal(func(q[::2], k[::2], v[::2]), func(q[[0, 2]], k[[0, 2]], v[[0, 2]]))


# --------------------------------------------------------------------------- inputs never modified
@FUNCS
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("readonly", [False, True])
def test_inputs_never_modified(func, dtype, readonly):
    q, k, v = qkv(dtype)
    mask = np.random.default_rng(2).random((2, N)) > 0.3
    mask[0, :5] = False
    copies = [x.copy() for x in (q, k, v, mask)]
    if readonly:
        for x in (q, k, v, mask):
            x.setflags(write=False)
    for causal in (False, True):
        out = func(q, k, v, causal=causal, key_padding_mask=mask)
        out[...] = 123.0  # the output is the caller's own array, not a view of an input
        for x, c in zip((q, k, v, mask), copies):
            np.testing.assert_array_equal(x, c)
    if func is fma:
        out = func(q, k, v, key_padding_mask=mask, query_coarsening=True)
        for x, c in zip((q, k, v, mask), copies):
            np.testing.assert_array_equal(x, c)


@FUNCS
def test_readonly_inputs_same_result(func):
    q, k, v = qkv(np.float32)
    want = func(q, k, v)
    for x in (q, k, v):
        x.setflags(write=False)
    np.testing.assert_array_equal(func(q, k, v), want)


@FUNCS
def test_output_does_not_alias_inputs(func):
    q, k, v = qkv()
    out = func(q, k, v)
    for x in (q, k, v):
        assert not np.shares_memory(out, x)


@FUNCS
def test_zero_size_leading_dim(func):
    q, k, v = qkv(lead=(0, 3))
    out, lse = func(q, k, v, return_lse=True)
    assert out.shape == (0, 3, N, DV) and lse.shape == (0, 3, N)


def test_readonly_inputs_compile_no_new_kernel_variant():
    """Read-only arrays are a distinct Numba type: they must not trigger a second compilation
    of every kernel (tens of seconds), the inputs are copied instead."""
    from fmm_attention.cpu.exact import exact_kernel
    from fmm_attention.cpu.blocks import block_attention
    from fmm_attention.cpu.upward import mean_upward

    q, k, v = qkv(np.float64)
    mask = np.ones((2, N), bool)
    exact_attention(q, k, v, key_padding_mask=mask)
    fma(q, k, v, key_padding_mask=mask)
    kernels = (exact_kernel, block_attention, mean_upward)
    before = [set(kernel.signatures) for kernel in kernels]
    for x in (q, k, v, mask):
        x.setflags(write=False)
    exact_attention(q, k, v, key_padding_mask=mask)
    fma(q, k, v, key_padding_mask=mask)
    assert [set(kernel.signatures) for kernel in kernels] == before


# --------------------------------------------------------------------------- issue 13: masked garbage, sizes
@FUNCS
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38])
def test_issue13_non_finite_at_masked_positions_accepted(func, which, bad):
    # padding may hold anything: check_finite looks only at valid positions, and no valid
    # output depends on what a masked position holds
    q, k, v = (x.astype(np.float32) for x in qkv())
    mask = np.ones((2, N), bool)
    mask[:, 17:] = False
    mask[1, 3] = False
    arrays = [q.copy(), k.copy(), v.copy()]
    arrays[which][~mask] = bad
    for causal in (False, True):
        want = func(q, k, v, key_padding_mask=mask, causal=causal)
        for check in (True, False):
            got = func(*arrays, key_padding_mask=mask, causal=causal, check_finite=check)
            np.testing.assert_array_equal(got[mask], want[mask])


@FUNCS
@pytest.mark.parametrize("which", [0, 1, 2])
def test_issue13_non_finite_at_valid_positions_still_rejected(func, which):
    arrays = [x.copy() for x in qkv()]
    mask = np.ones((2, N), bool)
    mask[:, 17:] = False
    arrays[which][~mask] = np.nan
    arrays[which][1, 5, 0] = np.inf  # a valid position
    with pytest.raises(ValueError, match=f"{'qkv'[which]} contains NaN or infinity"):
        func(*arrays, key_padding_mask=mask)


@pytest.mark.parametrize("block_size", [2**24, 2**40, 2**60, 2**61, 2**62])
def test_issue13_block_size_beyond_the_sequence_is_clamped(block_size):
    # used to allocate by block_size (8 GiB at 2**24), raise SystemError or segfault
    q, k, v = qkv()
    for causal in (False, True):
        out = fma(q, k, v, block_size=block_size, causal=causal)
        np.testing.assert_allclose(out, exact_attention(q, k, v, causal=causal), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kwargs, match", [
    (dict(refine=10**9, block_size=4, rank=1), r"refine=1000000000 \(clamped to n = 4096\)"),  # still too big
    (dict(block_size=2048), "block_size=2048"),
])
def test_issue13_memory_estimate_names_the_argument(monkeypatch, kwargs, match):
    from fmm_attention import _config

    monkeypatch.setattr(_config, "MAX_CALL_BYTES", 20 * 2**20)
    q, k, v = (np.ones((4096, 2)),) * 3
    with pytest.raises(ValueError, match=match):
        fmm_attention(q, k, v, **kwargs)


def test_issue13_build_tree_bounded_by_memory():
    from fmm_attention import build_tree

    with pytest.raises(ValueError, match="n=1099511627776 needs about"):
        build_tree(2**40, block_size=1, rank=1)


def test_issue13_topk_causal_must_be_bool():
    from fmm_attention.accuracy import topk_attention

    q, k, v = qkv(lead=())
    with pytest.raises(TypeError, match="causal"):
        topk_attention(q, k, v, keys=4, causal="no")
    for keys in (0, [1, 2], np.ones(N + 1, int), 2.5):
        with pytest.raises(ValueError, match="keys"):
            topk_attention(q, k, v, keys=keys)


@FUNCS
@pytest.mark.parametrize("scale", [10**400, -(10**400)])
def test_scale_beyond_float_range(func, scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be finite"):
        func(q, k, v, scale=scale)


@FUNCS
def test_torch_tensor_that_requires_grad(func):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.tensor(x, requires_grad=name == "k") for name, x in zip("qkv", qkv()))
    with pytest.raises(TypeError, match=r"k is a tensor that requires grad.*k\.detach\(\)"):
        func(q, k, v)
    out = func(q, k.detach(), v)  # the remedy the message names
    np.testing.assert_allclose(out, func(*qkv()), rtol=1e-12)


@FUNCS
def test_torch_tensor_of_a_dtype_numpy_lacks(func):
    torch = pytest.importorskip("torch")
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"v must be .* got Tensor of dtype torch\.bfloat16"):
        func(q, k, torch.tensor(v, dtype=torch.bfloat16))
