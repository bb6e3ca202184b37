r"""JAX adapter (extra ``[jax]``): differentiable attention under ``jax.jit`` and ``jax.grad``.

The three functions have the names and keywords of the NumPy API and take and return JAX
arrays. Each is a ``jax.custom_vjp`` whose forward and backward are ``jax.pure_callback``\\ s
into :mod:`fmm_attention.grad`: the forward runs the library's forward on the host and
saves ``out`` and ``lse`` (O(n d)); the backward rebuilds the pullback from them and runs
the library's backward kernels. So they compose with ``jax.jit``, ``jax.grad``,
``jax.vjp`` and ``jax.vmap`` (one host call per mapped entry), and
``jax.test_util.check_grads(..., modes=["rev"])`` passes. They take every shape the NumPy
API takes (broadcast leading dims, grouped heads, ``n_q != n_k`` with ``query_offset``),
resolved at trace time by the library's own rules; the gradients of ``k``, ``v`` come back
in their own shapes.

:func:`fmm_attention` trains a learned coarsening when ``coarsening`` is a
:class:`LearnedParams` (a pytree of JAX arrays in the ``torch.nn.Conv1d`` layout of the
paper's code, see :func:`init_learned`); a
:class:`~fmm_attention.LearnedCoarsening` is a constant.

Not supported (each raises a clear error): forward-mode differentiation (``jax.jvp``,
``jax.jacfwd``: ``custom_vjp`` functions have none) and derivatives of second order (the
backward is a host call); dtypes other than float32 / float64 (float64 needs
``jax.config.update("jax_enable_x64", True)``). Arrays on an accelerator are copied to
the host for each call: the kernels are the CPU backend's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _config, _shapes
from .. import grad as _grad
from .._validate import check_bool
from ..coarsening import LearnedCoarsening
from ..options import FMMOptions
from ..tree import build_tree

__all__ = ["LearnedParams", "exact_attention", "fastformer_attention", "fmm_attention", "init_learned"]


class LearnedParams(NamedTuple):
    """Trainable learned-coarsening parameters, a pytree of JAX arrays (one per far level).

    Attributes
    ----------
    key_weights, value_weights : tuple of jax.Array
        ``(r_l*d, 1, w_l)`` and ``(r_l*dv, 1, w_l)`` per level (``torch.nn.Conv1d``'s
        ``weight`` layout).
    key_bias, value_bias : tuple of jax.Array
        ``(r_l*d,)`` and ``(r_l*dv,)`` per level.
    """

    key_weights: tuple
    value_weights: tuple
    key_bias: tuple
    value_bias: tuple


def init_learned(seq_len, d, dv=None, *, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
                 causal=False, dtype=jnp.float32):
    """:class:`LearnedParams` for sequences of length ``seq_len``, starting as sub-box means.

    Parameters
    ----------
    seq_len : int
        ``n`` the parameters are built for (it fixes the tree).
    d, dv : int
        Feature dims of keys and values (``dv = d`` by default).
    block_size, rank, causal : optional
        As for :func:`fmm_attention` (they fix the tree too).
    dtype : optional
        Of the arrays (float32 by default, as JAX computes without x64).

    Returns
    -------
    LearnedParams
        Weights that make every slot the mean of its sub-box and zero biases: the
        training-free ``"mean"`` coarsening when no key is masked.
    """
    dv = d if dv is None else dv
    tree = build_tree(seq_len, block_size=block_size, rank=rank, causal=causal)

    def means(channels, level):
        w = np.zeros((level.rank * channels, 1, level.box_size))
        sub = level.sub_box_size
        for t in range(level.rank):
            w[t :: level.rank, 0, t * sub : (t + 1) * sub] = 1.0 / sub
        return jnp.asarray(w, dtype=dtype)

    def zeros(channels, level):
        return jnp.zeros(level.rank * channels, dtype=dtype)

    return LearnedParams(*(tuple(f(c, lv) for lv in tree.levels) for f, c in
                           ((means, d), (means, dv), (zeros, d), (zeros, dv))))


# ---------------------------------------------------------------- shared pieces
def _float(x, name):
    """``x`` as a float32/float64 JAX array (a ``TypeError`` otherwise)."""
    if x is None:
        raise TypeError(f"{name} is required")
    arr = x if isinstance(x, jax.Array) else jnp.asarray(x)
    if arr.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(
            f"{name} must be float32 or float64, got {arr.dtype} (float64 needs "
            "jax.config.update('jax_enable_x64', True))"
        )
    return arr


def _mask(mask, layout):
    """``key_padding_mask`` as a bool JAX array broadcastable to ``lead + (n_k,)`` (checked here, at trace time)."""
    if mask is None:
        return None
    arr = mask if isinstance(mask, jax.Array) else jnp.asarray(mask)
    if arr.dtype != jnp.bool_:
        raise TypeError(f"key_padding_mask must be a boolean array, got {arr.dtype}")
    # the library's own shape check, on a zero-stride stand-in (the mask may be a tracer)
    _shapes.padding_masks(np.broadcast_to(np.True_, arr.shape), layout)
    return arr


def _qkv(q, k, v, **resolve):
    """``q, k, v`` as float JAX arrays of one dtype and the call's :class:`~fmm_attention._shapes.Layout`.

    The shapes are resolved by the NumPy API's own rules (broadcast leading dims, grouped
    heads, ``n_q != n_k``) at trace time, so their errors are readable (inside a callback
    they would arrive wrapped in the runtime's error).
    """
    q, k, v = _float(q, "q"), _float(k, "k"), _float(v, "v")
    if not (q.dtype == k.dtype == v.dtype):
        # one dtype: a cotangent has its primal's dtype, and the kernels compute in one
        raise TypeError(f"q, k, v must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    return q, k, v, _shapes.resolve(q.shape, k.shape, v.shape, **resolve)


def _out_shapes(layout, dtype, features):
    """The result shapes for ``jax.pure_callback``: ``out`` (lead, n_q, features), ``lse`` (lead, n_q)."""
    lead = layout.lead_shape + (layout.n_q,)
    return jax.ShapeDtypeStruct(lead + (features,), dtype), jax.ShapeDtypeStruct(lead, dtype)


def _host(x, dtype=None):
    return np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)


def _callback(fn, shapes, *args):
    # "sequential": under vmap, one host call per entry (always right: learned weights and
    # Fastformer's vectors do not share the mapped dim of q, k, v)
    return jax.pure_callback(fn, shapes, *args, vmap_method="sequential")


def _split(operands, with_mask):
    q, k, v, *rest = operands
    mask = rest.pop(0) if with_mask else None
    return q, k, v, mask, rest


def _cotangents(backward_host, operands, extra, with_mask):
    """The operands' cotangents from one host call of ``backward_host(*operands, *extra)``.

    The operands are ``q, k, v[, mask], *params``: every one but the mask is differentiable
    (its cotangent is ``None``); the host returns the gradients in that order, mask left out.
    """
    differentiable = operands[:3] + operands[3 + with_mask :]
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in differentiable)
    grads = _callback(backward_host, shapes, *operands, *extra)
    return tuple(grads[:3]) + ((None,) if with_mask else ()) + tuple(grads[3:])


def _with_lse_vjp(forward_host, backward_host, out_shape, with_mask):
    """A ``custom_vjp`` function of the operands returning ``(out, lse)`` through host calls.

    The forward saves the operands, ``out`` and ``lse`` (O(n d) residuals); the backward
    hands them and both cotangents to ``backward_host``.
    """

    @jax.custom_vjp
    def f(*operands):
        return _callback(forward_host, out_shape, *operands)

    def f_fwd(*operands):
        out, lse = f(*operands)
        return (out, lse), (operands, out, lse)

    def f_bwd(saved, cotangents):
        operands, out, lse = saved
        return _cotangents(backward_host, operands, (out, lse, *cotangents), with_mask)

    f.defvjp(f_fwd, f_bwd)
    return f


# ---------------------------------------------------------------- exact attention
def exact_attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None, attn_mask=None, attn_bias=None,
                    window=None, query_offset=None, return_lse=False, check_finite=True):
    """Differentiable :func:`fmm_attention.exact_attention` on JAX arrays.

    Same keywords, shapes and results as the NumPy function (broadcast leading dims,
    grouped heads, ``n_q != n_k`` with ``query_offset``; the backend is always the CPU);
    differentiable in ``q``, ``k``, ``v`` (and through ``lse`` with ``return_lse=True``),
    whose gradients come back in their own shapes. ``attn_mask``, ``attn_bias`` and
    ``window`` have no backward yet (``NotImplementedError``, as
    :func:`~fmm_attention.exact_attention_vjp`).
    """
    _grad._refuse_pairwise("exact_attention", attn_mask=attn_mask, attn_bias=attn_bias, window=window)
    causal = check_bool(causal, "causal")
    q, k, v, layout = _qkv(q, k, v, causal=causal, query_offset=query_offset)
    mask = _mask(key_padding_mask, layout)
    options = dict(causal=causal, scale=scale, check_finite=check_finite, backend="cpu", query_offset=query_offset)
    with_mask = mask is not None

    def setup(q, k, v, mask, rest):
        return _grad._exact_setup(_host(q), _host(k), _host(v), key_padding_mask=None if mask is None else _host(mask),
                                  **options)

    def forward_host(*operands):
        cpu, batch, causal_ = setup(*_split(operands, with_mask))
        out, lse = cpu.exact(batch, causal=causal_)
        return batch.restore(out), batch.restore(lse, last_dim=False)

    def backward_host(*operands):
        out, lse, g, g_lse = operands[-4:]
        _, batch, causal_ = setup(*_split(operands[:-4], with_mask))
        pullback = _grad._exact_pullback(batch, causal_, _internal(batch, out), _internal(batch, lse, last_dim=False))
        return tuple(pullback(_host(g), _host(g_lse)))

    f = _with_lse_vjp(forward_host, backward_host, _out_shapes(layout, q.dtype, layout.dv), with_mask)
    out, lse = f(q, k, v, *((mask,) if with_mask else ()))
    return (out, lse) if return_lse else out


def _internal(batch, x, last_dim=True):
    """A saved output in the caller's shape back to the kernels' ``(B, n_q[, x])``, ``B`` the
    output entries (more than ``q`` has row sets when it is broadcast or grouped)."""
    tail = x.shape[-1:] if last_dim else ()
    return np.ascontiguousarray(x, dtype=batch.dtype).reshape((-1, batch.n) + tail)


# ---------------------------------------------------------------- FMA
def fmm_attention(q, k, v, *, causal=False, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
                  coarsening="mean", count_scaling=True, query_coarsening=False, scale=None, key_padding_mask=None,
                  return_lse=False, check_finite=True, cluster_iters=3, refine=0, global_tokens=None,
                  query_offset=None):
    """Differentiable :func:`fmm_attention.fmm_attention` on JAX arrays.

    Same keywords, shapes and results as the NumPy function (broadcast leading dims,
    grouped heads, ``n_q != n_k`` with ``query_offset``; the backend is always the CPU; no
    ``return_stats``); the gradients of ``q``, ``k``, ``v`` come back in their own shapes.
    ``coarsening`` is ``"mean"``, ``"cluster"``, a
    :class:`~fmm_attention.LearnedCoarsening` (constant weights) or a
    :class:`LearnedParams` (trainable: ``jax.grad`` returns gradients of its arrays in
    their own layout). ``refine``'s plan and ``"cluster"``'s groups are held fixed in the
    backward (the branch the forward took).
    """
    params = None
    if isinstance(coarsening, LearnedParams):
        params = coarsening
        coarsening = "mean"  # a placeholder for the option checks; the host rebuilds the weights
    options = dict(causal=causal, block_size=block_size, rank=rank, coarsening=coarsening,
                   count_scaling=count_scaling, query_coarsening=query_coarsening, scale=scale,
                   check_finite=check_finite, backend="cpu", cluster_iters=cluster_iters, refine=refine,
                   global_tokens=global_tokens, query_offset=query_offset)
    # the option errors at trace time, where they are readable (inside a callback they
    # would arrive wrapped in the runtime's error)
    checked = FMMOptions.create(**{key: options[key] for key in ("causal", "block_size", "rank", "coarsening",
                                                                 "count_scaling", "query_coarsening", "scale",
                                                                 "cluster_iters", "refine", "global_tokens")})
    q, k, v, layout = _qkv(q, k, v, causal=checked.causal, query_offset=query_offset, positions=True)
    _grad._check_cross(layout, checked)
    mask = _mask(key_padding_mask, layout)
    with_mask = mask is not None
    n_levels = 0
    flat = []
    if params is not None:
        if len(params.key_weights) != len(params.value_weights):
            raise ValueError("coarsening: LearnedParams needs one key and one value weight per level")
        n_levels = len(params.key_weights)
        flat = [_float(a, "coarsening parameter") for group in params for a in group]
        if len(flat) != 4 * n_levels:
            raise ValueError("coarsening: LearnedParams needs one weight and one bias per level for keys and values")
        tree = build_tree(layout.n_k, block_size=block_size, rank=rank, causal=causal)  # the keys' tree
        LearnedCoarsening(*_groups([np.zeros(a.shape) for a in flat], n_levels)).check_tree(tree, layout.d, layout.dv)

    def setup(q, k, v, mask, rest):
        opts = dict(options)
        if n_levels:
            opts["coarsening"] = LearnedCoarsening(*_groups([_host(a, np.float64) for a in rest], n_levels))
        return _grad._fmm_setup(_host(q), _host(k), _host(v), key_padding_mask=None if mask is None else _host(mask),
                                **opts)

    def forward_host(*operands):
        cpu, batch, tree, opts = setup(*_split(operands, with_mask))
        out, lse, _ = cpu.fmm(batch, tree, opts)
        return batch.restore(out), batch.restore(lse, last_dim=False)

    def backward_host(*operands):
        out, lse, g, g_lse = operands[-4:]
        cpu, batch, tree, opts = setup(*_split(operands[:-4], with_mask))
        plan = None
        if opts.refine > 0:  # the plan is data-dependent: rerun the (deterministic) forward for it
            _, _, plan = cpu.fmm(batch, tree, opts)
        pullback = _grad._fmm_pullback(batch, tree, opts, _internal(batch, out), _internal(batch, lse, last_dim=False),
                                       plan)
        grads = pullback(_host(g), _host(g_lse))
        extra = []
        if grads.coarsening is not None:
            extra = [np.asarray(a, dtype=p.dtype) for a, p in
                     zip([a for group in grads.coarsening for a in group], operands[3 + with_mask : -4])]
        return (grads.q, grads.k, grads.v, *extra)

    f = _with_lse_vjp(forward_host, backward_host, _out_shapes(layout, q.dtype, layout.dv), with_mask)
    out, lse = f(q, k, v, *((mask,) if with_mask else ()), *flat)
    return (out, lse) if return_lse else out


def _groups(flat, n_levels):
    return [flat[i * n_levels : (i + 1) * n_levels] for i in range(4)]


# ---------------------------------------------------------------- Fastformer
def fastformer_attention(q, k, v, w_q, w_k, *, causal=False, scale=None, key_padding_mask=None, check_finite=True):
    """Differentiable :func:`fmm_attention.fastformer_attention` on JAX arrays (no
    ``return_pools``); the leading dims of ``q`` and ``k``, ``v`` broadcast (grouped heads
    included) and ``w_q``, ``w_k`` broadcast against them as there; every gradient comes
    back in its input's own shape.
    """
    causal = check_bool(causal, "causal")
    q, k, v, layout = _qkv(q, k, v, same_length=True)
    w_q, w_k = _float(w_q, "w_q"), _float(w_k, "w_k")
    mask = _mask(key_padding_mask, layout)
    with_mask = mask is not None
    options = dict(causal=causal, scale=scale, check_finite=check_finite, backend="cpu")

    def setup(q, k, v, mask, rest):
        return _grad._fastformer_setup(_host(q), _host(k), _host(v), _host(rest[0]), _host(rest[1]),
                                       key_padding_mask=None if mask is None else _host(mask), **options)

    def forward_host(*operands):
        cpu, batch, causal_, wq, wk, _ = setup(*_split(operands, with_mask))
        out, _, _ = cpu.fastformer(batch, wq, wk, causal=causal_, return_pools=False)
        return batch.restore(out)

    def backward_host(*operands):
        g = operands[-1]
        _, batch, causal_, wq, wk, shapes = setup(*_split(operands[:-1], with_mask))
        grads = _grad._fastformer_pullback(batch, causal_, wq, wk, shapes)(_host(g))
        return (grads.q, grads.k, grads.v, np.asarray(grads.w_q, dtype=operands[-3].dtype),
                np.asarray(grads.w_k, dtype=operands[-2].dtype))

    @jax.custom_vjp
    def f(*operands):
        return _callback(forward_host, _out_shapes(layout, q.dtype, layout.dv)[0], *operands)

    def f_fwd(*operands):
        return f(*operands), operands

    def f_bwd(operands, g):
        return _cotangents(backward_host, operands, (g,), with_mask)

    f.defvjp(f_fwd, f_bwd)
    return f(q, k, v, *((mask,) if with_mask else ()), w_q, w_k)
