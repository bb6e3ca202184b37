"""The three attention functions on Dask arrays: lazy in, lazy out, nothing on the client.

The public functions (:mod:`fmm_attention.api`) hand a call here when any input is a Dask
collection. Only metadata (shapes, chunks, dtypes) is read on the client; every byte of data
is touched inside tasks, so a call returns a lazy :class:`dask.array.Array` at once.

Two schemes, chosen by the chunking of the sequence axis (``-2``):

* **One sequence chunk** (batch/heads chunked, or nothing chunked): every block is an
  independent problem; :func:`dask.array.blockwise` applies the NumPy function to it, with
  every option the NumPy function has.
* **Sequence chunks** (sequence parallelism), per function:

  - ``exact_attention``: every query chunk meets every key chunk (causal: those at or
    before it) in a partial ``(out, lse)`` task; the partials are merged through their
    log-sum-exp in a balanced tree (the ring-attention scheme, O(n^2 d / workers)).
  - ``fmm_attention``: a per-chunk upward pass (sub-box sums and counts; learned: box
    convolutions and partial convolutions; coarse queries: query sums) whose task also
    cuts out everything the other chunks need of the chunk (its outboxes: halos, the rows
    they list, its share of the pyramid), a tree reduction
    for the boxes larger than a chunk, and per chunk one task with its own tokens,
    ``m``-token halos from its neighbours (causal: left only) and the coarse rows its
    interaction lists name. No task receives another chunk's tokens beyond a halo.
  - ``fastformer_attention``: the pools are tree-reduced per-chunk ``(max, sum, vector)``
    partials; causally the partials are prefix-scanned across chunks instead.

Errors that need the data (NaN/inf with ``check_finite``) are raised when the result is
computed, by the task that reads the offending block.
"""

from __future__ import annotations

import operator

import numpy as np

from .. import _config
from .._validate import check_bool, check_scale, check_vector_shape, float_dtype
from . import _chunks

_LEAD_INDEX = "abceghijklmopqrstuvwxyz"  # blockwise index letters for leading axes (n, d, f taken)


# ---------------------------------------------------------------- inputs (metadata only)
def _da():
    import dask.array as da

    return da


def _as_dask(x, name):
    da = _da()
    if isinstance(x, da.Array):
        return x
    if hasattr(type(x), "__dask_graph__"):
        raise TypeError(f"{name} is a Dask collection but not a dask.array.Array ({type(x).__name__})")
    return da.asarray(x)


class _Inputs:
    """Validated lazy inputs: ``q``, ``k``, ``v`` (and mask) sharing one chunking."""

    def __init__(self, q, k, v, key_padding_mask, scale):
        arrays = {"q": q, "k": k, "v": v}
        first = next((x for x in arrays.values() if hasattr(type(x), "__dask_graph__")), None)
        arrays = {name: _as_dask(x, name) for name, x in arrays.items()}
        for name, arr in arrays.items():
            if arr.ndim < 2:
                raise ValueError(f"{name} must have at least 2 dims (..., n, features), got shape {arr.shape}")
            if any(np.isnan(s) for s in arr.shape):
                raise ValueError(f"{name} has unknown chunk sizes {arr.shape}; call compute_chunk_sizes() first")
        qa, ka, va = arrays["q"], arrays["k"], arrays["v"]
        if qa.shape[:-2] != ka.shape[:-2] or qa.shape[:-2] != va.shape[:-2]:
            raise ValueError(f"q, k and v must share their leading dims; got q {qa.shape}, k {ka.shape}, v {va.shape}")
        if qa.shape[-2] != ka.shape[-2] or ka.shape[-2] != va.shape[-2]:
            raise ValueError(
                f"q, k and v must have the same sequence length n (axis -2); got q {qa.shape}, k {ka.shape}, v {va.shape}"
            )
        if qa.shape[-1] != ka.shape[-1]:
            raise ValueError(f"q and k must have the same feature dim d; got q {qa.shape}, k {ka.shape}")
        self.n, self.d, self.dv = qa.shape[-2], qa.shape[-1], va.shape[-1]
        if self.n < 1:
            raise ValueError("the sequence length n must be at least 1, got an empty sequence")
        if self.d < 1 or self.dv < 1:
            raise ValueError(f"feature dims must be at least 1; got d={self.d}, dv={self.dv}")
        self.dtype = float_dtype(*arrays.items())
        self.lead_shape = tuple(qa.shape[:-2])
        ref = first if first is not None and first.ndim == qa.ndim else qa
        ref = _as_dask(ref, "q")
        self.chunks = tuple(ref.chunks[:-1])  # leading + sequence chunks
        self.q = qa.rechunk(self.chunks + (-1,))
        self.k = ka.rechunk(self.chunks + (-1,))
        self.v = va.rechunk(self.chunks + (-1,))
        self.mask = None
        if key_padding_mask is not None:
            mask = _as_dask(key_padding_mask, "key_padding_mask")
            if mask.dtype != np.bool_:
                raise TypeError(f"key_padding_mask must be a bool array (True = valid key), got dtype {mask.dtype}")
            if mask.shape != self.lead_shape + (self.n,):
                raise ValueError(
                    f"key_padding_mask must have shape {self.lead_shape + (self.n,)} (leading dims of q, then n), "
                    f"got {mask.shape}"
                )
            self.mask = mask.rechunk(self.chunks)
        self.scale = check_scale(scale, self.d)

    @property
    def seq_chunks(self):
        return self.chunks[-1]

    @property
    def lead_blocks(self):
        return list(np.ndindex(*[len(c) for c in self.chunks[:-1]]))

    def lead_block_shape(self, lead):
        return tuple(self.chunks[a][i] for a, i in enumerate(lead))

    def starts(self):
        return np.concatenate([[0], np.cumsum(self.seq_chunks)[:-1]]).astype(np.int64)

    def delayed_blocks(self, check_finite):
        """Per leading block, per sequence chunk: one delayed ``(q, k, v, valid)`` tuple.

        One task prepares all four arrays of a chunk, so everything that reads the chunk
        depends on that one result and the scheduler runs it where the chunk lives: a
        chunk's tokens never travel to read its own queries, keys and values together.
        """
        # unoptimised: the blocks keep their keys, so the graph stays inspectable (and the
        # whole graph is optimised once, at compute time)
        qd, kd, vd = (x.to_delayed(optimize_graph=False) for x in (self.q, self.k, self.v))
        md = self.mask.to_delayed(optimize_graph=False) if self.mask is not None else None
        prep = _delayed(_chunks.prepare_chunk)
        out = {}
        for lead in self.lead_blocks:
            out[lead] = [
                prep(qd[lead + (j, 0)], kd[lead + (j, 0)], vd[lead + (j, 0)],
                     md[lead + (j,)] if md is not None else None, self.dtype, check_finite)
                for j in range(len(self.seq_chunks))
            ]
        return out

    def assemble(self, blocks, tail, dtype=None):
        """A Dask array from per-(leading block, chunk) delayed blocks of shape ``(B, c) + tail``."""
        da = _da()
        grid = np.empty(tuple(len(c) for c in self.chunks), dtype=object)
        for lead in self.lead_blocks:
            shape = self.lead_block_shape(lead)
            for j, c in enumerate(self.seq_chunks):
                block = _delayed(_chunks.restore)(blocks[lead][j], shape)
                grid[lead + (j,)] = da.from_delayed(block, shape + (c,) + tail, dtype=dtype or self.dtype)
        arrays = grid.tolist()
        if len(tail):
            arrays = _deepen(arrays, grid.ndim)
        return da.block(arrays)


def _deepen(nested, depth):
    # da.block needs one nesting level per dimension: wrap each leaf for the feature axis
    if depth == 0:
        return [nested]
    return [_deepen(x, depth - 1) for x in nested]


def _delayed(fn, nout=None):
    import dask

    return dask.delayed(fn, pure=True, nout=nout)


def _index(ndim_lead):
    return _LEAD_INDEX[:ndim_lead]


def _lazy_vector(w, name, inputs):
    """An additive-attention vector broadcast to ``lead + (d,)`` and chunked like ``q``'s leading dims."""
    da = _da()
    w = _as_dask(w, name)
    float_dtype((name, w))
    d, lead = inputs.d, inputs.lead_shape
    check_vector_shape(tuple(w.shape), name, d, lead)
    w = da.broadcast_to(w.astype(inputs.dtype), lead + (d,))
    return w.rechunk(inputs.chunks[:-1] + (-1,))


# ---------------------------------------------------------------- one sequence chunk: blockwise
def _exact_block(q, k, v, mask, kwargs, return_lse):
    from .. import api

    res = api.exact_attention(q, k, v, key_padding_mask=mask, return_lse=return_lse, **kwargs)
    return np.concatenate([res[0], res[1][..., None].astype(res[0].dtype)], axis=-1) if return_lse else res


def _fmm_block(q, k, v, mask, kwargs, return_lse):
    from .. import api

    res = api.fmm_attention(q, k, v, key_padding_mask=mask, return_lse=return_lse, **kwargs)
    return np.concatenate([res[0], res[1][..., None].astype(res[0].dtype)], axis=-1) if return_lse else res


def _fastformer_block(q, k, v, mask, w_q, w_k, kwargs, return_pools, causal):
    from .. import api

    res = api.fastformer_attention(q, k, v, w_q, w_k, key_padding_mask=mask, return_pools=return_pools,
                                   causal=causal, **kwargs)
    if not return_pools:
        return res
    u, qg, kg = res
    if causal:
        return np.concatenate([u, qg, kg], axis=-1)
    return np.concatenate([u, qg[..., None, :], kg[..., None, :]], axis=-2)


def _blockwise(fn, inputs, out_features, *extra, **kwargs):
    da = _da()
    lead = _index(len(inputs.lead_shape))
    mask = (inputs.mask, lead + "n") if inputs.mask is not None else (None, None)
    return da.blockwise(
        fn, lead + "nf", inputs.q, lead + "nd", inputs.k, lead + "nd", inputs.v, lead + "nf", *mask, *extra,
        dtype=inputs.dtype, meta=np.empty((0,) * inputs.q.ndim, dtype=inputs.dtype),
        adjust_chunks={"f": out_features}, concatenate=True, **kwargs,
    )


def _split_lse(res, dv, return_lse):
    if not return_lse:
        return res
    return res[..., :dv], res[..., dv]


# ---------------------------------------------------------------- exact attention
def exact_attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None, return_lse=False,
                    check_finite=True, backend="auto"):
    """:func:`fmm_attention.exact_attention` on Dask arrays (lazy; see the module notes).

    Returns Dask arrays ``out`` (and ``lse``) chunked like ``q``. Any chunking is accepted:
    with sequence chunks each query chunk is computed against every key chunk (causal:
    those at or before it) and the partials are merged through log-sum-exp.
    """
    causal = check_bool(causal, "causal")
    return_lse = check_bool(return_lse, "return_lse")
    check_finite = check_bool(check_finite, "check_finite")
    inputs = _Inputs(q, k, v, key_padding_mask, scale)
    if len(inputs.seq_chunks) == 1:
        kwargs = {"causal": causal, "scale": inputs.scale, "check_finite": check_finite, "backend": backend}
        res = _blockwise(_exact_block, inputs, inputs.dv + return_lse, kwargs=kwargs, return_lse=return_lse)
        return _split_lse(res, inputs.dv, return_lse)
    _check_cpu_backend(backend)
    blocks = inputs.delayed_blocks(check_finite)
    starts = inputs.starts()
    partial = _delayed(_chunks.exact_partial)
    merge = _delayed(_chunks.merge_out_lse)
    outs, lses = {}, {}
    for lead, row in blocks.items():
        outs[lead], lses[lead] = [], []
        queries = [_delayed(operator.getitem)(c, 0) for c in row]
        keys = [_delayed(_chunks.keys_of)(c) for c in row]  # (k, v, valid): what the ring moves
        for i, qi in enumerate(queries):
            parts = [
                partial(qi, kj, int(starts[i]), int(starts[j]), causal, inputs.scale)
                for j, kj in enumerate(keys)
                if not causal or j <= i
            ]
            merged = merge(parts)
            outs[lead].append(_delayed(operator.getitem)(merged, 0))
            lses[lead].append(_delayed(operator.getitem)(merged, 1))
    out = inputs.assemble(outs, (inputs.dv,))
    return (out, inputs.assemble(lses, ())) if return_lse else out


def _check_cpu_backend(backend):
    if backend not in ("auto", "cpu"):
        raise ValueError(
            f"backend={backend!r}: Dask arrays chunked along the sequence run the CPU kernels in each task; "
            "use backend='auto' or 'cpu' (or one sequence chunk, which calls the NumPy function per block)"
        )


# ---------------------------------------------------------------- fastformer
def fastformer_attention(q, k, v, w_q, w_k, *, causal=False, scale=None, key_padding_mask=None,
                         return_pools=False, check_finite=True, backend="auto"):
    """:func:`fmm_attention.fastformer_attention` on Dask arrays (lazy; see the module notes).

    Any chunking is accepted. Sequence chunks: the pools are tree reductions of per-chunk
    ``(max, sum, vector)`` partials; causally the partials are prefix-scanned across chunks.
    """
    causal = check_bool(causal, "causal")
    return_pools = check_bool(return_pools, "return_pools")
    check_finite = check_bool(check_finite, "check_finite")
    inputs = _Inputs(q, k, v, key_padding_mask, scale)
    if inputs.dv != inputs.d:
        raise ValueError(
            f"v must have the feature dim d = {inputs.d} of q (u = kg * v is element-wise), got "
            f"v of shape {inputs.lead_shape + (inputs.n, inputs.dv)}"
        )
    wq = _lazy_vector(w_q, "w_q", inputs)
    wk = _lazy_vector(w_k, "w_k", inputs)
    d = inputs.d
    lead_ix = _index(len(inputs.lead_shape))
    if len(inputs.seq_chunks) == 1:
        da = _da()
        kwargs = {"scale": inputs.scale, "check_finite": check_finite, "backend": backend}
        mask = (inputs.mask, lead_ix + "n") if inputs.mask is not None else (None, None)
        if return_pools and not causal:
            out_ix, adjust = lead_ix + "nd", {"n": lambda c: c + 2}
        else:
            out_ix, adjust = lead_ix + "nd", {"d": 3 * d if return_pools else d}
        res = da.blockwise(
            _fastformer_block, out_ix, inputs.q, lead_ix + "nd", inputs.k, lead_ix + "nd", inputs.v, lead_ix + "nd",
            *mask, wq, lead_ix + "d", wk, lead_ix + "d", dtype=inputs.dtype, adjust_chunks=adjust,
            meta=np.empty((0,) * inputs.q.ndim, dtype=inputs.dtype),
            concatenate=True, kwargs=kwargs, return_pools=return_pools, causal=causal,
        )
        if not return_pools:
            return res
        if causal:
            return res[..., :d], res[..., d : 2 * d], res[..., 2 * d :]
        n = inputs.n
        return res[..., :n, :], res[..., n, :], res[..., n + 1, :]
    _check_cpu_backend(backend)
    if check_finite:
        wq, wk = (x.map_blocks(_checked_vector, name, dtype=x.dtype) for x, name in ((wq, "w_q"), (wk, "w_k")))
    blocks = inputs.delayed_blocks(check_finite)
    wqd, wkd = wq.to_delayed(optimize_graph=False), wk.to_delayed(optimize_graph=False)
    scale = inputs.scale
    outs, qgs, kgs = {}, {}, {}
    flat = _delayed(_flat_vector)
    for lead, row in blocks.items():
        shape = inputs.lead_block_shape(lead)
        B = int(np.prod(shape, dtype=np.int64))
        wql, wkl = flat(wqd[lead + (0,)], B), flat(wkd[lead + (0,)], B)
        if causal:
            outs[lead], qgs[lead], kgs[lead] = _fastformer_causal(row, wql, wkl, scale, B, d, inputs.dtype)
        else:
            u, qg, kg = _fastformer_bidirectional(row, wql, wkl, scale)
            outs[lead] = u
            qgs[lead], kgs[lead] = qg, kg
    out = inputs.assemble(outs, (d,))
    if not return_pools:
        return out
    if causal:
        return out, inputs.assemble(qgs, (d,)), inputs.assemble(kgs, (d,))
    return out, _assemble_pools(inputs, qgs), _assemble_pools(inputs, kgs)


def _checked_vector(w, name):
    from .._validate import check_finite_array

    check_finite_array(np.ascontiguousarray(w), name)
    return w


def _flat_vector(w, batch):
    return np.ascontiguousarray(np.asarray(w).reshape(batch, -1))


def _assemble_pools(inputs, pools):
    da = _da()
    grid = np.empty(tuple(len(c) for c in inputs.chunks[:-1]) + (1,), dtype=object)
    for lead in inputs.lead_blocks:
        shape = inputs.lead_block_shape(lead)
        block = _delayed(_chunks.restore)(pools[lead], shape)
        grid[lead + (0,)] = da.from_delayed(block, shape + (inputs.d,), dtype=inputs.dtype)
    return da.block(grid.tolist())


def _tree(items, fn):
    """Balanced pairwise reduction of delayed ``items`` with ``fn`` (fixed order)."""
    merge = _delayed(fn)
    items = list(items)
    while len(items) > 1:
        paired = [merge(items[i], items[i + 1]) for i in range(0, len(items) - 1, 2)]
        items = paired + ([items[-1]] if len(items) % 2 else [])
    return items[0]


def _fastformer_bidirectional(row, wq, wk, scale):
    alpha = _delayed(_alpha_partial)
    beta = _delayed(_beta_partial)
    qg = _delayed(_chunks.pool_value)(_tree([alpha(c, wq, scale) for c in row], _chunks.merge_triples))
    wk_eff = _delayed(_beta_vector)(qg, wk, scale)
    pool_k = _delayed(_chunks.pool_value)(_tree([beta(c, wk_eff) for c in row], _chunks.merge_triples))
    kg = _delayed(operator.mul)(qg, pool_k)  # sum_i beta_i (qg * k_i) = qg * sum_i beta_i k_i
    u = [_delayed(_modulate)(kg, c) for c in row]
    return u, qg, kg


def _alpha_partial(chunk, w_q, scale):
    q, _, _, valid = chunk
    return _chunks.pool_partial(q, _chunks.fastformer_alpha(q, valid, w_q, scale), valid)


def _beta_vector(qg, w_k, scale):
    return (qg * w_k * scale).astype(qg.dtype, copy=False)


def _beta_partial(chunk, w_eff):
    _, k, _, valid = chunk
    return _chunks.pool_partial(k, np.einsum("bid,bd->bi", k, w_eff), valid)


def _modulate(kg, chunk):
    return kg[:, None, :] * chunk[2]


def _fastformer_causal(row, wq, wk, scale, batch, d, dtype):
    empty = _chunks.empty_triple(batch, d, dtype)
    alpha = _delayed(_alpha_partial)
    beta = _delayed(_chunks.fastformer_causal_beta)
    merge = _delayed(_chunks.merge_triples)
    final = _delayed(_chunks.fastformer_causal_out, nout=3)
    # prefix scan over chunks: the carry into chunk j merges the partials of chunks < j
    carry_a = [empty]
    for c in row[:-1]:
        carry_a.append(merge(carry_a[-1], alpha(c, wq, scale)))
    carry_b = [empty]
    for c, ca in zip(row[:-1], carry_a):
        carry_b.append(merge(carry_b[-1], beta(c, wq, wk, scale, ca)))
    outs, qgs, kgs = [], [], []
    for c, ca, cb in zip(row, carry_a, carry_b):
        u, qg, kg = final(c, wq, wk, scale, ca, cb)
        outs.append(u)
        qgs.append(qg)
        kgs.append(kg)
    return outs, qgs, kgs


# ---------------------------------------------------------------- FMA
def fmm_attention(q, k, v, *, causal=False, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
                  coarsening="mean", count_scaling=True, query_coarsening=False, scale=None,
                  key_padding_mask=None, return_lse=False, check_finite=True, backend="auto",
                  cluster_iters=3, refine=0, global_tokens=None, return_stats=False):
    """:func:`fmm_attention.fmm_attention` on Dask arrays (lazy; see the module notes).

    One sequence chunk: every option of the NumPy function, applied per block. Sequence
    chunks: mean or learned coarsening, fine or coarse queries (causal or not, with masks,
    with or without count scaling; not cluster coarsening, ``refine`` or ``global_tokens``); chunks must all have the same power-of-two length ``>= 2 * block_size``
    (the last may be shorter), otherwise a ``ValueError`` names the nearest valid size.
    ``return_stats`` is not available for Dask inputs.
    """
    from ..coarsening import LearnedCoarsening, MeanCoarsening, as_coarsening
    from ..options import check_accuracy_options, check_fmm_options
    from ..tree import build_tree

    causal = check_bool(causal, "causal")
    return_lse = check_bool(return_lse, "return_lse")
    check_finite = check_bool(check_finite, "check_finite")
    if check_bool(return_stats, "return_stats"):
        raise ValueError("return_stats=True is not available for Dask inputs (statistics would need a compute)")
    coarsening, count_scaling, query_coarsening = check_fmm_options(
        coarsening=coarsening, count_scaling=count_scaling, query_coarsening=query_coarsening, causal=causal
    )
    cluster_iters, refine = check_accuracy_options(cluster_iters=cluster_iters, refine=refine,
                                                   query_coarsening=query_coarsening)
    inputs = _Inputs(q, k, v, key_padding_mask, scale)
    tree = build_tree(inputs.n, block_size=block_size, rank=rank, causal=causal)  # checks m, p
    as_coarsening(coarsening, cluster_iters).check_tree(tree, inputs.d, inputs.dv)
    if len(inputs.seq_chunks) == 1:
        kwargs = {"causal": causal, "block_size": block_size, "rank": rank, "coarsening": coarsening,
                      "count_scaling": count_scaling, "query_coarsening": query_coarsening, "scale": inputs.scale,
                      "check_finite": check_finite, "backend": backend, "cluster_iters": cluster_iters, "refine": refine,
                      "global_tokens": global_tokens}
        res = _blockwise(_fmm_block, inputs, inputs.dv + return_lse, kwargs=kwargs, return_lse=return_lse)
        return _split_lse(res, inputs.dv, return_lse)
    if not isinstance(as_coarsening(coarsening, cluster_iters), (MeanCoarsening, LearnedCoarsening)) or refine or \
            global_tokens is not None:
        raise ValueError(
            "fmm_attention on a Dask array chunked along the sequence supports mean and learned coarsening, "
            "fine or coarse queries (no cluster coarsening, refine or global_tokens: they need every key of a "
            "box at once); rechunk the sequence axis into one chunk (q.rechunk({-2: -1})) to use the other "
            "options per block"
        )
    _check_cpu_backend(backend)
    chunk = check_fma_chunks(inputs.seq_chunks, tree.block_size)
    learned = coarsening if isinstance(coarsening, LearnedCoarsening) else None
    return _fma_sequence(inputs, tree, chunk, count_scaling=count_scaling, learned=learned,
                         query_coarsening=query_coarsening, return_lse=return_lse, check_finite=check_finite)


def nearest_valid_chunk(size, block_size):
    """The power-of-two chunk length ``>= 2 * block_size`` nearest to ``size`` (ties: larger)."""
    low = 2 * block_size
    while low * 2 <= size:
        low *= 2
    high = low * 2
    return low if size - low < high - size and size >= low else high if size >= low else low


def check_fma_chunks(chunks, block_size):
    """The common chunk length of a sequence-chunked FMA call, or a ``ValueError`` naming a valid one.

    Every chunk but the last must have the same length ``C``, a power of two with
    ``C >= 2 * block_size`` (so chunks align with every box of the tree and a halo of
    ``block_size`` tokens is less than a neighbour chunk); the last chunk may be shorter.
    """
    size = chunks[0]
    valid = size >= 2 * block_size and not size & (size - 1)
    uniform = all(c == size for c in chunks[:-1]) and chunks[-1] <= size
    if valid and uniform:
        return size
    suggestion = nearest_valid_chunk(max(chunks), block_size)
    raise ValueError(
        f"fmm_attention on a Dask array chunked along the sequence needs equal sequence chunks of a power-of-two "
        f"length >= 2 * block_size = {2 * block_size} (the last may be shorter); got chunks {tuple(chunks)}. "
        f"The nearest valid chunk size is {suggestion}: pass q.rechunk({{-2: {suggestion}}}) (and k, v, mask)"
    )


def _upward_spec(tree, first, length, chunk, learned, query_coarsening):
    """What the upward pass of chunk ``[first, first + length)`` builds (see :func:`_chunks.chunk_upward`).

    Learned weights travel as delayed objects: the levels inside a chunk share one copy per
    level; a level whose boxes are larger than a chunk sends each chunk only the columns of
    its own tokens.
    """
    levels = tree.levels
    big_sizes = [lv.sub_box_size for lv in levels if lv.sub_box_size > chunk] if learned is None else []
    spec = {"sizes": [], "learned_local": [], "learned_big": [], "mean_total": bool(big_sizes),
            "q_total": query_coarsening and any(lv.box_size > chunk for lv in levels)}
    if learned is None:
        spec["sizes"] = sorted({lv.sub_box_size for lv in levels if lv.sub_box_size <= chunk})
    else:
        for i, lv in enumerate(levels):
            kw, vw = learned.key_weights[i][:, 0, :], learned.value_weights[i][:, 0, :]
            if lv.box_size <= chunk:
                spec["learned_local"].append((i, lv.box_size, lv.rank, _shared(kw), _shared(vw)))
            else:
                cols = slice(first % lv.box_size, first % lv.box_size + length)
                spec["learned_big"].append((i, lv.rank, _shared(kw[:, cols]), _shared(vw[:, cols])))
    spec["total"] = spec["mean_total"] or spec["q_total"] or bool(spec["learned_big"])
    return spec


def _shared(array):
    """A NumPy array as one graph key (tokenised by content), not a literal in every task."""
    import dask

    return dask.delayed(np.ascontiguousarray(array), pure=True)


def _fma_sequence(inputs, tree, chunk, *, count_scaling, learned, query_coarsening, return_lse, check_finite):
    m = tree.block_size
    causal = tree.causal
    seq = inputs.seq_chunks
    n_chunks = len(seq)
    starts = inputs.starts()
    # The plans are drawn here only to wire the graph: who lists whose rows (and the few
    # rows a chunk lists of another). Each chunk's own plan, with its large row tables, is
    # drawn again by its upward task on the worker, so the graph stays small.
    plans = [_chunks.chunk_sources(tree, int(starts[i]), seq[i], chunk, n_chunks, learned is not None)
             for i in range(n_chunks)]
    cross = [{} for _ in range(n_chunks)]  # cross[j][i]: the picks chunk i lists of chunk j
    sources = [set() for _ in range(n_chunks)]
    for i, plan in enumerate(plans):
        for j, picks, _ in plan["exports"]:
            if j != i:
                cross[j][i] = picks
                sources[i].add(int(j))
        sources[i].update(j for j in (i - 1, i + 1) if 0 <= j < n_chunks and (j < i or not causal))
    q_levels = [lv for lv in tree.levels if query_coarsening and lv.box_size > chunk]
    node_keys = [sorted({(t, g) for t, g, _, _ in plan["totals"]}
                        | {(int(np.log2(lv.box_size // chunk)), int(starts[i]) // lv.box_size) for lv in q_levels})
                 for i, plan in enumerate(plans)]
    depth = max([t for keys in node_keys for t, _ in keys], default=0)
    specs = [_upward_spec(tree, int(starts[i]), seq[i], chunk, learned, query_coarsening) for i in range(n_chunks)]
    layouts = [{"n": inputs.n, "block_size": m, "rank": tree.rank, "causal": causal, "chunk": chunk,
                "n_chunks": n_chunks, "learned": learned is not None, "index": i, "first": int(starts[i]),
                "length": seq[i]} for i in range(n_chunks)]
    biases = _shared_tuple((learned.key_bias, learned.value_bias)) if learned is not None else None
    upward = _delayed(_chunks.chunk_outbox)
    item = _delayed(operator.getitem)
    add = _delayed(_chunks.add_totals)
    attend = _delayed(_chunks.fma_chunk)
    blocks = inputs.delayed_blocks(check_finite)
    outs, lses = {}, {}
    for lead, row in blocks.items():
        # a chunk's attention task reads its upward result whole (same worker, nothing moves);
        # its neighbours read its near outbox, the other chunks and the pyramid its far one
        ups = [upward(c, spec, layout, cross[i]) for i, (c, spec, layout) in enumerate(zip(row, specs, layouts))]
        near = [item(u, 1) for u in ups]
        far = [item(u, 2) for u in ups]
        # pyramid: level t holds the totals of 2**t consecutive chunks (of the boxes larger than a chunk)
        pyramid = [far]
        for _ in range(depth):
            prev = pyramid[-1]
            pyramid.append([add(prev[g], prev[g + 1]) if g + 1 < len(prev) else prev[g] for g in range(0, len(prev), 2)])
        outs[lead], lses[lead] = [], []
        for i, ci in enumerate(row):
            src = sorted(sources[i])
            meta = {"n": inputs.n, "block_size": m, "rank": tree.rank, "causal": causal, "first": int(starts[i]),
                    "chunk": chunk, "scale": inputs.scale, "count_scaling": count_scaling,
                    "query_coarsening": query_coarsening, "learned": biases, "index": i}
            res = attend(ci, ups[i], src, [near[j] if abs(j - i) == 1 else far[j] for j in src], node_keys[i],
                         [pyramid[t][g] for t, g in node_keys[i]], meta)
            outs[lead].append(_delayed(operator.getitem)(res, 0))
            lses[lead].append(_delayed(operator.getitem)(res, 1))
    out = inputs.assemble(outs, (inputs.dv,))
    return (out, inputs.assemble(lses, ())) if return_lse else out


def _shared_tuple(lists):
    """Nested sequences of arrays as one graph key (the learned biases, read by every chunk)."""
    import dask

    return dask.delayed(tuple(tuple(np.ascontiguousarray(a) for a in x) for x in lists), pure=True)


__all__ = ["check_fma_chunks", "exact_attention", "fastformer_attention", "fmm_attention", "nearest_valid_chunk"]
