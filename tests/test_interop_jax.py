"""The JAX adapter: check_grads in float64, use under jax.jit / jax.grad / jax.vmap, the
same gradients as the NumPy VJPs, a two-step optimisation that lowers a loss, clear
errors. Skipped without jax (extra ``[jax]``).

float64 needs JAX's x64 mode; it is switched on for this module (it only widens what JAX
may compute, no other test file imports JAX).
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import fmm_attention  # noqa: E402
from fmm_attention.grad import exact_attention_vjp, fastformer_attention_vjp, fmm_attention_vjp  # noqa: E402
from fmm_attention.interop import jax as fj  # noqa: E402


def arrays(*shapes, seed=0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]


def mask_of(lead_n, seed=1):
    m = np.random.default_rng(seed).random(lead_n) > 0.3
    m[..., 0] = True
    return jnp.asarray(m)


def rev(f, args):
    check_grads(f, args, order=1, modes=["rev"])


@pytest.mark.parametrize("causal", [False, True])
def test_exact_check_grads(causal):
    q, k, v = arrays((2, 21, 3), (2, 21, 3), (2, 21, 2))
    mask = mask_of((2, 21))
    rev(lambda q, k, v: fj.exact_attention(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True),
        (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("coarsening", ["mean", "cluster"])
def test_fmm_check_grads(causal, coarsening):
    q, k, v = arrays((2, 37, 3), (2, 37, 3), (2, 37, 2), seed=1)
    rev(lambda q, k, v: fj.fmm_attention(q, k, v, causal=causal, block_size=4, rank=2, coarsening=coarsening,
                                         return_lse=True), (q, k, v))


def test_fmm_options_check_grads():
    q, k, v = arrays((2, 40, 3), (2, 40, 3), (2, 40, 3), seed=2)
    mask = mask_of((2, 40))
    rev(lambda q, k, v: fj.fmm_attention(q, k, v, block_size=4, rank=2, query_coarsening=True, key_padding_mask=mask,
                                         global_tokens=[3]), (q, k, v))
    rev(lambda q, k, v: fj.fmm_attention(q, k, v, block_size=4, rank=2, refine=6, causal=True), (q, k, v))


def test_learned_params_check_grads():
    n, d, dv = 30, 3, 2
    params = fj.init_learned(n, d, dv, block_size=4, rank=2, dtype=jnp.float64)
    assert [w.shape for w in params.key_weights] == [(2 * d, 1, 4), (2 * d, 1, 8)]
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map(lambda a: a + 0.1 * rng.standard_normal(a.shape), params)
    q, k, v = arrays((n, d), (n, d), (n, dv), seed=4)
    rev(lambda q, k, v, p: fj.fmm_attention(q, k, v, block_size=4, rank=2, coarsening=p), (q, k, v, params))


@pytest.mark.parametrize("causal", [False, True])
def test_fastformer_check_grads(causal):
    q, k, v = arrays((2, 3, 17, 4), (2, 3, 17, 4), (2, 3, 17, 4), seed=5)
    w_q, w_k = arrays((3, 4), (4,), seed=6)
    mask = mask_of((2, 3, 17))
    rev(lambda *x: fj.fastformer_attention(*x, causal=causal, key_padding_mask=mask), (q, k, v, w_q, w_k))


def test_jit_grad_equals_the_numpy_vjps():
    q, k, v = arrays((2, 33, 4), (2, 33, 4), (2, 33, 3), seed=7)
    g = arrays((2, 33, 3), seed=8)[0]
    mask = mask_of((2, 33))
    for fn, vjp, options in (
        (fj.exact_attention, exact_attention_vjp, dict(causal=True)),
        (fj.fmm_attention, fmm_attention_vjp, dict(block_size=4, rank=2, coarsening="cluster")),
    ):
        loss = jax.jit(jax.grad(lambda q, k, v, fn=fn, options=options: jnp.sum(
            g * fn(q, k, v, key_padding_mask=mask, **options)), argnums=(0, 1, 2)))
        got = loss(q, k, v)
        out, pullback = vjp(*(np.asarray(x) for x in (q, k, v)), key_padding_mask=np.asarray(mask), **options)
        np.testing.assert_array_equal(np.asarray(fn(q, k, v, key_padding_mask=mask, **options)), out)
        for a, b in zip(got, pullback(np.asarray(g))[:3]):
            np.testing.assert_array_equal(np.asarray(a), b)


# the NumPy API's shapes (shared/spec/shapes-and-decoding.md): (q, k, v shapes, mask shape, options)
SHAPES = {
    "grouped": (((2, 4, 13, 3), (2, 2, 13, 3), (2, 2, 13, 2)), (2, 1, 13), {}),  # Hq = 4 over Hk = 2
    "broadcast": (((2, 1, 13, 3), (3, 13, 3), (3, 13, 2)), (3, 13), {}),  # output lead (2, 3)
    "cross": (((2, 7, 3), (2, 19, 3), (2, 19, 2)), (2, 19), dict(causal=True, query_offset=5)),
}
METHODS = {
    "exact": (fj.exact_attention, fmm_attention.exact_attention, exact_attention_vjp, {}),
    "fmm": (fj.fmm_attention, fmm_attention.fmm_attention, fmm_attention_vjp, dict(block_size=4, rank=2)),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", SHAPES)
def test_shapes_check_grads_jit_and_the_numpy_api(case, method):
    shapes, mask_shape, options = SHAPES[case]
    fn, np_fn, vjp, method_options = METHODS[method]
    options = dict(options, **method_options, key_padding_mask=mask_of(mask_shape, seed=12))
    q, k, v = arrays(*shapes, seed=13)

    def f(q, k, v):
        return fn(q, k, v, return_lse=True, **options)

    rev(f, (q, k, v))
    host = [np.asarray(x) for x in (q, k, v)]
    np_options = dict(options, key_padding_mask=np.asarray(options["key_padding_mask"]))
    out, lse = jax.jit(f)(q, k, v)
    want_out, want_lse = np_fn(*host, return_lse=True, **np_options)
    np.testing.assert_array_equal(np.asarray(out), want_out)
    np.testing.assert_array_equal(np.asarray(lse), want_lse)
    g, g_lse = arrays(want_out.shape, want_lse.shape, seed=14)
    def loss(q, k, v):
        out, lse = f(q, k, v)
        return jnp.sum(g * out) + jnp.sum(g_lse * lse)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    _, pullback = vjp(*host, return_lse=True, **np_options)
    for got, want, x in zip(grads, pullback(np.asarray(g), np.asarray(g_lse))[:3], (q, k, v)):
        assert got.shape == x.shape  # k, v's cotangents in their own (smaller) shapes
        np.testing.assert_array_equal(np.asarray(got), want)


def test_fastformer_grouped_and_broadcast_check_grads():
    q, k, v = arrays((2, 4, 9, 3), (2, 9, 3), (2, 9, 3), seed=15)  # Hq = 4 over Hk = 2
    w_q, w_k = arrays((4, 3), (3,), seed=16)

    def f(*x):
        return fj.fastformer_attention(*x, causal=True)

    rev(f, (q, k, v, w_q, w_k))
    host = [np.asarray(x) for x in (q, k, v, w_q, w_k)]
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(q, k, v, w_q, w_k)),
                                  fmm_attention.fastformer_attention(*host, causal=True))
    g = arrays((2, 4, 9, 3), seed=17)[0]
    grads = jax.grad(lambda *x: jnp.sum(g * f(*x)), argnums=(0, 1, 2, 3, 4))(q, k, v, w_q, w_k)
    _, pullback = fastformer_attention_vjp(*host, causal=True)
    for got, want, x in zip(grads, pullback(np.asarray(g)), (q, k, v, w_q, w_k)):
        assert got.shape == x.shape
        np.testing.assert_array_equal(np.asarray(got), want)


def test_vmap_and_float32():
    q, k, v = arrays((3, 20, 4), (20, 4), (20, 4), seed=9, dtype=jnp.float32)
    out = jax.vmap(lambda q: fj.fmm_attention(q, k, v, block_size=4, rank=2))(q)
    assert out.dtype == jnp.float32
    want = np.stack([np.asarray(fj.fmm_attention(q[i], k, v, block_size=4, rank=2)) for i in range(3)])
    np.testing.assert_array_equal(np.asarray(out), want)
    dq = jax.grad(lambda q: jnp.sum(jax.vmap(lambda x: fj.exact_attention(x, k, v))(q)))(q)
    assert dq.dtype == jnp.float32 and dq.shape == q.shape


def test_two_steps_of_gradient_descent_lower_the_loss():
    n, d = 40, 4
    params = fj.init_learned(n, d, block_size=4, rank=2, dtype=jnp.float32)
    q, k, v, target = arrays((2, n, d), (2, n, d), (2, n, d), (2, n, d), seed=10, dtype=jnp.float32)

    @jax.jit
    def step(params):
        def loss(p):
            return jnp.mean((fj.fmm_attention(q, k, v, block_size=4, rank=2, coarsening=p) - target) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads)

    losses = []
    for _ in range(3):
        value, params = step(params)
        losses.append(float(value))
    assert losses[2] < losses[1] < losses[0]


def test_errors_are_clear():
    q, k, v = arrays((9, 2), (9, 2), (9, 2), seed=11)
    with pytest.raises(TypeError, match="q must be float32 or float64"):
        fj.exact_attention(q.astype(jnp.int32), k, v)
    with pytest.raises(TypeError, match="key_padding_mask"):
        fj.exact_attention(q, k, v, key_padding_mask=jnp.ones(9))
    with pytest.raises(ValueError, match="same sequence length"):
        fj.exact_attention(q, k[:5], v)
    # the NumPy API's shape errors, raised at trace time
    q3, k3 = arrays((3, 9, 2), (2, 9, 2), seed=12)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        jax.jit(lambda q: fj.fmm_attention(q, k3, k3, block_size=2, rank=1))(q3)
    with pytest.raises(ValueError, match="query_offset"):
        fj.exact_attention(q[:4], k, v, causal=True, query_offset=6)
    with pytest.raises(ValueError, match="key_padding_mask"):
        fj.exact_attention(q, k, v, key_padding_mask=jnp.ones((2, 9), bool))
    with pytest.raises(NotImplementedError, match="attn_bias"):
        fj.exact_attention(q, k, v, attn_bias=jnp.zeros((9, 9)))
    with pytest.raises(ValueError, match="block_size"):
        jax.jit(lambda q: fj.fmm_attention(q, k, v, block_size=0, rank=1))(q)
    with pytest.raises(ValueError, match="coarsening"):
        fj.fmm_attention(q, k, v, block_size=2, rank=1, coarsening=fj.init_learned(30, 2, block_size=2, rank=1))
    # forward mode: custom_vjp functions have none (JAX's own error names it)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda q: fj.exact_attention(q, k, v), (q,), (q,))
    # second order: the backward is a host call
    with pytest.raises(ValueError, match="callback"):
        jax.grad(lambda q: jnp.sum(jax.grad(lambda x: jnp.sum(fj.exact_attention(x, k, v)))(q)))(q)
