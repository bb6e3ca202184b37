"""Gradients: a vector-Jacobian product (VJP) for each public attention function.

Each ``*_vjp`` function runs the forward of its attention function (same arguments, same
result) and returns it with a *pullback*: a function mapping the cotangent of the output
(and optionally of the log-sum-exp) to the gradients of every float input, as fixed in
``shared/spec/gradients.md``::

    out, pullback = fmm_attention_vjp(q, k, v, block_size=16, rank=4)
    grads = pullback(g)            # grads.q, grads.k, grads.v (a named tuple)

The pullback keeps O(n d) residuals only: the validated inputs, the output, ``lse`` (and
FMA's coarse keys and values, O(n d / m) per level); probabilities are recomputed from
``lse`` (FlashAttention's scheme). It may be called any number of times. The inputs are
held by reference: writing into ``q``, ``k``, ``v`` between the forward and a pullback
changes the gradient (as with any saved tensor).

Discrete choices are held fixed at their forward values: ``refine``'s plan,
``coarsening="cluster"``'s group assignments (each coarse row is then the mean of a fixed
set of tokens) and the count scaling bias (it depends on the mask and the groups only).
Only the CPU backend
has a backward; ``backend="cuda"`` and device arrays raise ``ValueError``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _config, backends
from ._validate import (
    as_array,
    attention_vector,
    check_bool,
    check_global_tokens,
    float_dtype,
)
from .options import FMMOptions
from .tree import build_tree

__all__ = [
    "AttentionGradients",
    "FMMGradients",
    "FastformerGradients",
    "LearnedCoarseningGradients",
    "exact_attention_vjp",
    "fastformer_attention_vjp",
    "fmm_attention_vjp",
]


class AttentionGradients(NamedTuple):
    """Gradients of exact attention: ``dq, dk, dv = grads`` unpacks them.

    Attributes
    ----------
    q, k, v : ndarray
        Shapes of ``q``, ``k``, ``v``, in the dtype of the computation.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray


class LearnedCoarseningGradients(NamedTuple):
    """Gradients of the parameters of a :class:`~fmm_attention.LearnedCoarsening`.

    Each entry has the layout of the parameter itself (``(r_l*d, 1, w_l)`` weights,
    ``(r_l*d,)`` biases), so it equals ``torch.nn.Conv1d``'s ``weight.grad`` / ``bias.grad``.

    Attributes
    ----------
    key_weights, value_weights, key_bias, value_bias : tuple of ndarray
        One array per far level.
    """

    key_weights: tuple
    value_weights: tuple
    key_bias: tuple
    value_bias: tuple


class FMMGradients(NamedTuple):
    """Gradients of Fast Multipole Attention.

    Attributes
    ----------
    q, k, v : ndarray
        Shapes of ``q``, ``k``, ``v``, in the dtype of the computation.
    coarsening : LearnedCoarseningGradients or None
        Gradients of the learned coarsening's weights and biases; ``None`` otherwise.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    coarsening: LearnedCoarseningGradients | None


class FastformerGradients(NamedTuple):
    """Gradients of Fastformer attention.

    Attributes
    ----------
    q, k, v : ndarray
        Shapes of ``q``, ``k``, ``v``.
    w_q, w_k : ndarray
        Shapes of the ``w_q``, ``w_k`` passed in (broadcasting undone: summed over the
        leading dims they were broadcast along).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    w_q: np.ndarray
    w_k: np.ndarray


# ---------------------------------------------------------------- shared pieces
def _cpu_only(backend, *arrays, options=None):
    """Select the backend of the forward; it must declare ``"backward"`` in the registry.

    The pullbacks run the CPU backward kernels on the forward's host residuals, so only a
    host backend can serve them; today that is ``"cpu"``.
    """
    chosen = backends.select(backend, arrays, "backward", options)
    if chosen.name != "cpu":
        raise backends.BackendNotSupportedError(
            f"backend {chosen.name!r} ({chosen.title}) declares a backward, but the pullbacks run the CPU "
            "backward kernels; use backend='cpu'"
        )
    return chosen


def _cotangent(value, name, batch, tail, *, required=True, check_finite=True):
    """Validate a cotangent of caller shape ``lead + (n,) + tail``; ``(B, n[, x])`` in the
    batch dtype, or ``None`` when omitted and not required. ``check_finite=False`` leaves the
    NaN/infinity check to the caller (:func:`_pullback_inputs` folds it into ``delta``).
    """
    if value is None:
        if required:
            raise TypeError(f"{name} is required")
        return None
    arr = as_array(value, name)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must have a real floating dtype, got {arr.dtype}")
    want = batch.lead_shape + (batch.n,) + tail
    if arr.shape != want:
        raise ValueError(f"{name} must have the shape of the output {want}, got {arr.shape}")
    if check_finite and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity")
    # -1: the output entries (a broadcast or grouped batch has more of them than q has rows)
    return np.ascontiguousarray(arr, dtype=batch.dtype).reshape((-1, batch.n) + tail)


def _delta(batch, out, g, g_lse):
    """``delta_i = g_i . out_i - g_lse_i`` (B, n), the per-query term of ``dS = P (dP - delta)``.

    One parallel pass (:func:`.cpu.backward.cotangent_delta`) that also checks ``g`` for
    NaN and infinity: ``g`` is scanned again only when some ``delta`` is not finite.
    """
    from .cpu._launch import launch_guard
    from .cpu.backward import cotangent_delta

    rows = g.shape[0] * g.shape[1]
    delta = np.empty(rows, dtype=batch.dtype)
    with launch_guard():
        cotangent_delta(g.reshape(rows, g.shape[2]), np.ascontiguousarray(out).reshape(rows, g.shape[2]), delta)
    if not np.isfinite(delta).all() and not np.isfinite(g).all():
        raise ValueError("g_out contains NaN or infinity")
    delta = delta.reshape(g.shape[:2])
    if g_lse is not None:
        delta -= g_lse
    return delta


def _restore(batch, x):
    return x.reshape(batch.lead_shape + x.shape[1:])


def _pullback_inputs(batch, out, lse, g_out, g_lse):
    g = _cotangent(g_out, "g_out", batch, (batch.dv,), check_finite=False)  # checked by _delta
    gl = _cotangent(g_lse, "g_lse", batch, (), required=False)
    if gl is not None:
        # a query with no valid key has lse = -inf for every input: its gradient is zero
        gl = np.where(np.isneginf(lse), 0, gl).astype(batch.dtype)
    return g, _delta(batch, out, g, gl)


# ---------------------------------------------------------------- memory estimates
# Each VJP's setup estimates what its forward, its residuals and its pullback allocate,
# from the shapes alone, and refuses the call (``tree.check_memory``: the forward's error,
# naming the argument that drives the largest part) before anything is copied. Estimates,
# not strict bounds: at n = 512 to 4096 (float64, grouped and cross-length calls included)
# they came to 0.99x - 2.3x of the measured peak of forward + pullback (caller's cotangent included).
def _layout(q, k, v, **resolve):
    """``(layout, dtype)`` of a call from its shapes and dtypes (nothing is copied)."""
    from . import _shapes

    arrays = {name: as_array(x, name) for name, x in (("q", q), ("k", k), ("v", v))}
    layout = _shapes.resolve(arrays["q"].shape, arrays["k"].shape, arrays["v"].shape, **resolve)
    return layout, float_dtype(*arrays.items())


def _rows(layout):
    """Elements of ``q`` and of ``k`` plus ``v`` as the caller passed them (their own sizes)."""
    n_q_sets = int(np.prod(layout.q_lead, dtype=np.int64))
    n_k_sets = int(np.prod(layout.k_lead, dtype=np.int64))
    return n_q_sets * layout.n_q * layout.d, n_k_sets * layout.n_k * (layout.d + layout.dv)


def _exact_vjp_bytes(layout, itemsize, *, masked):
    """Parts of :func:`exact_attention_vjp`: the forward's outputs (kept as residuals) and
    the pullback's buffers (rows gathered per output entry into a square problem of
    ``N = max(n_q, n_k)`` rows, cotangents, per-rectangle partial gradients, the sums)."""
    from .cpu.backward_ops import _grid

    B, n_q, d, dv = layout.size, layout.n_q, layout.d, layout.dv
    N = max(n_q, layout.n_k) if layout.cross else n_q
    q_size, kv_size = _rows(layout)
    sides = _grid(B, N)
    square = B * N * (2 * d + dv)
    # square problem, its parts and their sums; q gathered before it is embedded; the
    # cotangents as given and embedded; the gradients summed back onto q, k, v
    backward = (square * (1 + sides + (sides > 1)) + B * n_q * (d + dv + 1) + B * N * (dv + 2) + q_size
                + kv_size)
    parts = {
        "outputs": (B * n_q * (dv + 1) + (kv_size if masked else 0)) * itemsize,
        "backward buffers": backward * itemsize,
    }
    return parts, {"outputs": ("n", n_q), "backward buffers": ("n", N)}


def _fmm_vjp_bytes(layout, itemsize, tree, options, *, refine_given):
    """Parts of :func:`fmm_attention_vjp`: the forward's (:func:`~fmm_attention.tree.fmm_call_bytes`),
    the residuals (coarse buffers, cluster groups, a refined plan and its transposition,
    copies of shared key sets) and the pullback's buffers (gradients of the inputs and of
    the coarse rows, cotangents, the slab of partials, coarse queries' far field)."""
    from .tree import _level_sizes, fmm_call_bytes

    B, n_q, n_k, d, dv = layout.size, layout.n_q, layout.n_k, layout.d, layout.dv
    n_globals = len(options.global_tokens)
    parts = fmm_call_bytes(tree, batch=B, d=d, dv=dv, itemsize=itemsize, refine=options.refine,
                           query_coarsening=options.query_coarsening, n_globals=n_globals,
                           coarsening=options.coarsening)
    q_size, kv_size = _rows(layout)
    shared = (options.refine > 0 or options.query_coarsening) and (layout.broadcasts or layout.groups > 1)
    n_sets = B if shared else int(np.prod(layout.k_lead, dtype=np.int64))  # key sets the pullback reads
    n_levels, _, C = _level_sizes(n_k, tree.block_size, tree.rank)
    residuals = n_sets * C * (d + dv + 1) * itemsize
    if shared:
        residuals += B * (n_q * d + n_k * (d + dv)) * itemsize
    if options.coarsening.name == "cluster":
        residuals += n_sets * (n_levels * n_k + 2 * C) * 8  # labels, parents, counts
    # the refined plan and its transposition: twice the forward's per-entry plans
    residuals += 2 * parts["refinement"]
    max_keys = 3 * tree.block_size + n_globals + 3 * tree.rank * tree.n_levels + options.refine
    # a slab holds the columns that fit the budget, at most all of them; it is whole runs of
    # blocks ending before an odd run, so at least two runs (the last run: under two runs'
    # blocks), three runs' columns at most when one block's columns do not fit
    per_column = B * (d + dv) * itemsize
    least = 3 * max(2, int(_config.BACKWARD_RUN_BLOCKS)) * max_keys
    columns = min(max(int(_config.BACKWARD_PARTIAL_BYTES) // per_column, least), tree.n_blocks * max_keys)
    partials = columns * per_column
    # dq (per output entry), g and delta; dk, dv and the coarse rows' gradients per key set;
    # the sums onto q (and onto k, v from copied key sets) when row sets are shared
    spread = layout.broadcasts or layout.groups > 1
    backward = (B * n_q * (d + dv + 1) + n_sets * (n_k + C) * (d + dv) + (q_size if spread else 0)
                + (kv_size if shared else 0)) * itemsize
    backward += partials + B * (n_k + C) * 8  # the slab's partials, the transposed plan's cursors
    if n_globals or options.refine:  # tokens with partial columns sum apart from the near field
        backward += n_sets * n_k * (d + dv) * itemsize
    if options.coarsening.name == "learned":
        backward += n_sets * n_k * (d + dv) * itemsize  # transposed k, v for the weight gradient
    if options.query_coarsening:
        backward += (B * tree.padded_length * (2 * d + dv + 3) + 6 * B * C * (d + dv)) * itemsize
    parts.update({"residuals": residuals, "backward buffers": backward})
    refine_shown = refine_given if refine_given == options.refine else f"{refine_given} (clamped to n = {n_k})"
    return parts, {"refinement": ("refine", refine_shown), "block buffers": ("block_size", tree.block_size),
                   "outputs": ("n", n_k), "coarse buffers": ("n", n_k), "tree and key plan": ("n", n_k),
                   "residuals": ("n", n_k), "backward buffers": ("n", n_k)}


def _fastformer_vjp_bytes(layout, itemsize, causal):
    """Parts of :func:`fastformer_attention_vjp`: broadcast rows copied once (as the forward
    does), the output, the pullback's buffers (the bidirectional one's temporaries are about
    six ``(B, n, d)`` arrays, the causal kernel's three) and the sums onto the inputs."""
    B, n, d = layout.size, layout.n_q, layout.d
    q_size, kv_size = _rows(layout)
    copies = 3 * B * n * d if layout.broadcasts or layout.groups > 1 else 0
    parts = {
        "outputs": (copies + B * n * d + 2 * B * d) * itemsize,
        "backward buffers": (B * n * d * (4 if causal else 8) + (q_size + kv_size if copies else 0)) * itemsize,
    }
    return parts, {"outputs": ("n", n), "backward buffers": ("n", n)}


# ---------------------------------------------------------------- exact attention
def exact_attention_vjp(q, k, v, *, causal=False, scale=None, key_padding_mask=None, return_lse=False,
                        check_finite=True, backend="auto", query_offset=None, attn_mask=None, attn_bias=None,
                        window=None):
    """:func:`~fmm_attention.exact_attention` and its pullback.

    Parameters
    ----------
    q, k, v, causal, scale, key_padding_mask, return_lse, check_finite, backend, query_offset
        As for :func:`~fmm_attention.exact_attention`, broadcast leading dims, grouped heads
        and ``n_q != n_k`` included (the gradients of a shared ``k``/``v`` head are summed
        over its group); only ``backend="cpu"`` (or ``"auto"`` with host arrays) has a backward.
    attn_mask, attn_bias, window
        Not differentiable yet: passing one raises ``NotImplementedError``.

    Returns
    -------
    result : ndarray or tuple
        What :func:`~fmm_attention.exact_attention` returns: ``out``, or ``(out, lse)``.
    pullback : callable
        ``pullback(g_out, g_lse=None) -> AttentionGradients``: the gradients of
        ``sum(g_out * out) + sum(g_lse * lse)`` with respect to ``q``, ``k``, ``v``.
        ``g_out`` has the shape of ``out``, ``g_lse`` that of ``lse``.

    Raises
    ------
    ValueError
        ``backend="cuda"`` or device arrays (no backward there yet); and every error of
        the forward. The pullback raises ``ValueError`` / ``TypeError`` for a cotangent of
        the wrong shape or dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention import exact_attention_vjp
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 64, 8))
    >>> out, pullback = exact_attention_vjp(q, k, v, causal=True)
    >>> dq, dk, dv = pullback(np.ones_like(out))
    >>> dq.shape
    (64, 8)
    """
    return_lse = check_bool(return_lse, "return_lse")
    _refuse_pairwise("exact_attention_vjp", attn_mask=attn_mask, attn_bias=attn_bias, window=window)
    cpu, batch, causal = _exact_setup(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                      check_finite=check_finite, backend=backend, query_offset=query_offset)
    out, lse = cpu.exact(batch, causal=causal)
    pullback = _exact_pullback(batch, causal, out, lse)
    result = (batch.restore(out), batch.restore(lse, last_dim=False)) if return_lse else batch.restore(out)
    return result, pullback


def _refuse_pairwise(function, **pairwise):
    """``NotImplementedError`` for a pairwise term (``attn_mask``, ``attn_bias``, ``window``) given."""
    for name, value in pairwise.items():
        if value is not None:
            raise NotImplementedError(f"{function} has no backward for {name} yet (the backward kernels "
                                      "take no pairwise terms); key_padding_mask and causal are differentiable")


# The forward/pullback halves are separate so that an adapter whose forward and backward
# run apart (jax.pure_callback) can rebuild a pullback from the saved output and lse.
def _exact_setup(q, k, v, *, causal, scale, key_padding_mask, check_finite, backend, query_offset=None):
    from . import _shapes

    causal = check_bool(causal, "causal")
    cpu = _cpu_only(backend, q, k, v)
    layout, dtype = _layout(q, k, v, causal=causal, query_offset=query_offset)
    parts, culprits = _exact_vjp_bytes(layout, dtype.itemsize, masked=key_padding_mask is not None)
    cpu.check_memory(parts, culprits)  # before any copy of the inputs
    batch = _shapes.attention_inputs(q, k, v, scale=scale, key_padding_mask=key_padding_mask,
                                     check_finite=check_finite, causal=causal, query_offset=query_offset)
    return cpu, batch, causal


def _exact_pullback(batch, causal, out, lse):
    from . import _shapes

    def pullback(g_out, g_lse=None):
        from .cpu.backward_ops import exact_backward

        g, delta = _pullback_inputs(batch, out, lse, g_out, g_lse)
        square, g, lse_sq, delta, rows = _shapes.square_problem(batch, g, lse, delta, causal=causal)
        dq, dk, dv = exact_backward(square, causal, g, lse_sq, delta)
        return AttentionGradients(*_shapes.reduce_to_inputs(batch, dq, dk, dv, rows))

    return pullback


# ---------------------------------------------------------------- FMA
def fmm_attention_vjp(q, k, v, *, causal=False, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
                      coarsening="mean", count_scaling=True, query_coarsening=False, scale=None,
                      key_padding_mask=None, return_lse=False, check_finite=True, backend="auto",
                      cluster_iters=3, refine=0, global_tokens=None, query_offset=None):
    """:func:`~fmm_attention.fmm_attention` and its pullback.

    Parameters
    ----------
    q, k, v, causal, block_size, rank, coarsening, count_scaling, query_coarsening, scale, key_padding_mask, return_lse, check_finite, backend, cluster_iters, refine, global_tokens, query_offset
        As for :func:`~fmm_attention.fmm_attention` (no ``return_stats``), broadcast
        leading dims, grouped heads and ``n_q != n_k`` included: the gradients of a ``q``,
        ``k`` or ``v`` row set that several output entries read (the query heads of a
        group, a broadcast batch) are summed over them in entry order. ``refine``'s plan
        and ``coarsening="cluster"``'s group assignments are held fixed at the ones the
        forward chose (the gradient of the branch the forward took). Per-sequence
        ``global_tokens`` (a 2-D index table or a bool array) have no backward yet.

    Returns
    -------
    result : ndarray or tuple
        ``out``, or ``(out, lse)`` with ``return_lse=True``.
    pullback : callable
        ``pullback(g_out, g_lse=None) -> FMMGradients``: gradients of
        ``sum(g_out * out) + sum(g_lse * lse)`` with respect to ``q``, ``k``, ``v`` and,
        with a :class:`~fmm_attention.LearnedCoarsening`, its weights and biases.

    Raises
    ------
    ValueError
        ``backend="cuda"`` or device arrays; every error of the forward; from the
        pullback, cotangents of the wrong shape.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention import fmm_attention_vjp
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 100, 8))
    >>> out, pullback = fmm_attention_vjp(q, k, v, block_size=8, rank=2)
    >>> grads = pullback(np.ones_like(out))
    >>> grads.k.shape, grads.coarsening is None
    ((100, 8), True)
    """
    return_lse = check_bool(return_lse, "return_lse")
    cpu, batch, tree, options = _fmm_setup(
        q, k, v, causal=causal, block_size=block_size, rank=rank, coarsening=coarsening,
        count_scaling=count_scaling, query_coarsening=query_coarsening, scale=scale,
        key_padding_mask=key_padding_mask, check_finite=check_finite, backend=backend,
        cluster_iters=cluster_iters, refine=refine, global_tokens=global_tokens, query_offset=query_offset,
    )
    out, lse, plan = cpu.fmm(batch, tree, options)
    pullback = _fmm_pullback(batch, tree, options, out, lse, plan)
    result = (batch.restore(out), batch.restore(lse, last_dim=False)) if return_lse else batch.restore(out)
    return result, pullback


def _fmm_setup(q, k, v, *, causal, block_size, rank, coarsening, count_scaling, query_coarsening, scale,
               key_padding_mask, check_finite, backend, cluster_iters, refine, global_tokens, query_offset=None):
    """``(cpu, batch, tree, options)``: validated inputs (a :class:`~fmm_attention._shapes.ShapedBatch`)
    and the options of the forward call (its global tokens resolved against ``n_k``).
    """
    from . import _shapes

    causal = check_bool(causal, "causal")
    if _shapes.per_sequence_globals(global_tokens):
        raise NotImplementedError("fmm_attention_vjp has no backward for per-sequence global_tokens (a 2-D index "
                                  "table or a bool array) yet: pass one 1-D set of indices shared by every sequence")
    options = FMMOptions.create(
        causal=causal, block_size=block_size, rank=rank, coarsening=coarsening, count_scaling=count_scaling,
        query_coarsening=query_coarsening, scale=scale, cluster_iters=cluster_iters, refine=refine,
        global_tokens=global_tokens,
    )
    cpu = _cpu_only(backend, q, k, v, options=options)
    if not options.coarsening.differentiable:
        raise ValueError(f"{options.coarsening.describe()} has no backward; use 'mean', 'cluster' or a "
                         "LearnedCoarsening")
    layout, dtype = _layout(q, k, v, causal=causal, query_offset=query_offset, positions=True)
    _check_cross(layout, options)
    n_k = layout.n_k  # the tree is the keys': queries sit at positions in it
    tree = build_tree(n_k, block_size=block_size, rank=rank, causal=causal)
    global_tokens = check_global_tokens(global_tokens, n_k)
    if isinstance(global_tokens, str):
        raise ValueError("global_tokens='auto' has no backward: pass the indices it chooses "
                         "(fmm_attention.sinks.auto_global_tokens), which the gradient holds fixed")
    options.coarsening.check_tree(tree, layout.d, layout.dv)
    # refine as the forward clamps it: n extra keys split every far box, more changes nothing
    options = options.replace(global_tokens=global_tokens, refine=min(options.refine, n_k))
    parts, culprits = _fmm_vjp_bytes(layout, dtype.itemsize, tree, options, refine_given=refine)
    cpu.check_memory(parts, culprits)  # before any copy of the inputs
    batch = _shapes.attention_inputs(q, k, v, scale=scale, key_padding_mask=key_padding_mask,
                                     check_finite=check_finite, skip_masked=True, causal=causal,
                                     query_offset=query_offset, positions=True)
    return cpu, batch, tree, options


def _check_cross(layout, options):
    """Refuse what needs every query of the sequence when the queries are not all of it."""
    if layout.cross and (options.refine > 0 or options.query_coarsening):
        raise ValueError(
            f"{'refine > 0' if options.refine else 'query_coarsening=True'} needs every query of the sequence "
            "(a block's refinement plan and coarse queries depend on all its queries): with n_q != n_k or "
            "query_offset use fine queries and refine=0"
        )


def _fmm_pullback(batch, tree, options, out, lse, plan):
    """The pullback of a forward call that returned ``out``, ``lse`` and ``plan``."""
    from . import _shapes
    from .cpu.backward_ops import FMMResiduals, fmm_backward

    batch = _shapes.as_shaped(batch)
    layout = batch.layout
    shared = batch
    if (options.refine > 0 or options.query_coarsening) and (layout.broadcasts or layout.groups > 1):
        # as in the forward: refinement and coarse queries read one key set per query set
        shared = _shapes.as_shaped(_shapes.materialise(batch))
    res = FMMResiduals.build(shared, tree, plan if options.refine > 0 else None, coarsening=options.coarsening,
                             count_scaling=options.count_scaling, query_coarsening=options.query_coarsening,
                             global_tokens=options.global_tokens, cluster_iters=options.cluster_iters)

    def pullback(g_out, g_lse=None):
        g, delta = _pullback_inputs(batch, out, lse, g_out, g_lse)
        dq, dk, dv, learned = fmm_backward(res, g, lse, delta)
        if learned is not None:
            learned = LearnedCoarseningGradients(*learned)
        dq = _sum_rows(dq, layout.q_index, layout.q_lead)
        if shared is not batch:  # one key set per output entry: sum them back onto k, v
            dk = _sum_rows(dk, layout.kv_index, layout.k_lead)
            dv = _sum_rows(dv, layout.kv_index, layout.k_lead)
        else:
            dk, dv = (x.reshape(layout.k_lead + x.shape[1:]) for x in (dk, dv))
        return FMMGradients(dq, dk, dv, learned)

    return pullback


def _sum_rows(grad, index, lead):
    """Gradients of one row set per output entry (B, n, x) summed onto the caller's row sets:
    entry ``b`` adds to set ``index[b]``, in entry order (a fixed order: deterministic)."""
    n_sets = int(np.prod(lead, dtype=np.int64))
    if n_sets == grad.shape[0] and np.array_equal(index, np.arange(n_sets)):
        return grad.reshape(lead + grad.shape[1:])
    total = np.zeros((n_sets,) + grad.shape[1:], dtype=grad.dtype)
    for b, row_set in enumerate(index):
        total[row_set] += grad[b]
    return total.reshape(lead + grad.shape[1:])


# ---------------------------------------------------------------- Fastformer
def _unbroadcast(grad, shape, lead):
    """Sum ``grad`` (B, d) over the leading dims that a vector of ``shape`` was broadcast along."""
    full = grad.reshape(lead + grad.shape[-1:])
    extra = len(full.shape) - len(shape)
    axes = tuple(range(extra)) + tuple(
        extra + i for i, size in enumerate(shape[:-1]) if size == 1 and full.shape[extra + i] != 1
    )
    return full.sum(axis=axes).reshape(shape) if axes else full.reshape(shape)


def fastformer_attention_vjp(q, k, v, w_q, w_k, *, causal=False, scale=None, key_padding_mask=None,
                             check_finite=True, backend="auto"):
    """:func:`~fmm_attention.fastformer_attention` and its pullback.

    Parameters
    ----------
    q, k, v, w_q, w_k, causal, scale, key_padding_mask, check_finite, backend
        As for :func:`~fmm_attention.fastformer_attention` (no ``return_pools``).

    Returns
    -------
    u : ndarray, shape (..., n, d)
        The output.
    pullback : callable
        ``pullback(g_out) -> FastformerGradients``: gradients of ``sum(g_out * u)`` with
        respect to ``q``, ``k``, ``v``, ``w_q``, ``w_k``; those of ``w_q``, ``w_k`` have
        their shapes (summed over the dims they were broadcast along).

    Raises
    ------
    ValueError
        ``backend="cuda"`` or device arrays; every error of the forward; from the
        pullback, a cotangent of the wrong shape.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention import fastformer_attention_vjp
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 4, 32, 8))
    >>> w_q, w_k = rng.standard_normal((2, 4, 8))
    >>> u, pullback = fastformer_attention_vjp(q, k, v, w_q, w_k, causal=True)
    >>> pullback(np.ones_like(u)).w_q.shape
    (4, 8)
    """
    cpu, batch, causal, wq, wk, shapes = _fastformer_setup(
        q, k, v, w_q, w_k, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
        check_finite=check_finite, backend=backend,
    )
    out, _, _ = cpu.fastformer(batch, wq, wk, causal=causal, return_pools=False)
    return batch.restore(out), _fastformer_pullback(batch, causal, wq, wk, shapes)


def _fastformer_setup(q, k, v, w_q, w_k, *, causal, scale, key_padding_mask, check_finite, backend):
    from . import _shapes

    causal = check_bool(causal, "causal")
    cpu = _cpu_only(backend, q, k, v, w_q, w_k)
    layout, dtype = _layout(q, k, v, same_length=True)
    parts, culprits = _fastformer_vjp_bytes(layout, dtype.itemsize, causal)
    cpu.check_memory(parts, culprits)  # before any copy of the inputs
    shaped = _shapes.attention_inputs(q, k, v, scale=scale, key_padding_mask=key_padding_mask,
                                      check_finite=check_finite, same_length=True)
    # as in the forward: the kernels read one row set per output entry, so broadcast leading
    # dims are copied once here and their gradients summed back in the pullback
    batch = _shapes.materialise(shaped)
    if batch.dv != batch.d:
        raise ValueError(
            f"v must have the feature dim d = {batch.d} of q (u = kg * v is element-wise), got "
            f"v of shape {batch.lead_shape + (batch.n, batch.dv)}"
        )
    shapes = np.shape(as_array(w_q, "w_q")), np.shape(as_array(w_k, "w_k")), shaped.layout
    # own writable copies (B, d): broadcast views are read-only, which Numba types apart
    wq = np.array(attention_vector(w_q, "w_q", batch, check_finite), dtype=batch.dtype, order="C")
    wk = np.array(attention_vector(w_k, "w_k", batch, check_finite), dtype=batch.dtype, order="C")
    return cpu, batch, causal, wq, wk, shapes


def _fastformer_pullback(batch, causal, wq, wk, shapes):
    """The pullback (it recomputes the pools from the inputs, so needs no forward output)."""
    shape_q, shape_k, layout = shapes

    def pullback(g_out):
        from .cpu.backward_fastformer import fastformer_backward

        g = _cotangent(g_out, "g_out", batch, (batch.d,))
        dq, dk, dv, dwq, dwk = fastformer_backward(batch, wq, wk, g, causal=causal)
        return FastformerGradients(
            _sum_rows(dq, layout.q_index, layout.q_lead), _sum_rows(dk, layout.kv_index, layout.k_lead),
            _sum_rows(dv, layout.kv_index, layout.k_lead),
            _unbroadcast(dwq, shape_q, batch.lead_shape), _unbroadcast(dwk, shape_k, batch.lead_shape),
        )

    return pullback

