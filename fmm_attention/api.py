"""The public functions: options -> backend -> validate -> plan -> kernels.

Each function checks its options (FMA: one :class:`~fmm_attention.options.FMMOptions`),
selects a backend from the registry (:mod:`fmm_attention.backends`; an unsupported option
fails here, naming the backend), lets the backend validate the arrays onto its device,
builds or fetches the plan (:mod:`fmm_attention.tree`), checks the memory estimate and
hands everything to the backend; nothing flows back up. No function branches on a
backend's name: every backend is called the same way.
"""

from __future__ import annotations

from . import _config, _shapes, backends
from ._stats import fmm_stats
from ._validate import check_bool, check_global_tokens
from .coarsening import MeanCoarsening
from .distributed import is_dask
from .options import FMMOptions
from .tree import _build_tree, build_tree, fmm_call_bytes

__all__ = ["exact_attention", "fastformer_attention", "fmm_attention"]


def exact_attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None, attn_mask=None, attn_bias=None,
                    window=None, query_offset=None, return_lse=False, check_finite=True, backend="auto"):
    """Exact softmax attention, streamed in tiles with an online softmax (O(n d) memory).

    Computes ``softmax(scale * q @ k.T + bias + mask) @ v`` for every leading index without
    ever forming the ``(n_q, n_k)`` matrix. The conventions shared by every function (shapes,
    masks, alignment, dtypes) are in :doc:`/semantics`, with a table against PyTorch,
    FlashAttention and JAX.

    Parameters
    ----------
    q : array_like, shape (..., Hq, n_q, d)
        Queries.
    k : array_like, shape (..., Hk, n_k, d)
        Keys. The dims before the head axis broadcast against those of ``q`` (NumPy's
        rules); ``Hq = g * Hk`` groups the query heads (grouped-query and multi-query
        attention): query head ``h`` reads key/value head ``h // g``. Neither copies ``k``
        or ``v``.
    v : array_like, shape (..., Hk, n_k, dv)
        Values, with the leading dims of ``k``; ``dv`` may differ from ``d``.
    causal : bool, optional
        Query ``i`` sits at position ``t_i = query_offset + i`` of the keys and attends
        only to keys ``j <= t_i``. The offset defaults to ``n_k - n_q``: the queries are
        aligned to the **end** of the keys (FlashAttention >= 2.1), so one decode step is
        the last row of the full causal attention.
    scale : float, optional
        Logit scale; ``1 / sqrt(d)`` by default.
    key_padding_mask : array_like of bool, shape (..., n_k), optional
        ``True`` marks a valid position (token); it broadcasts against the output's
        leading dims (size-1 head or batch axes). Invalid keys get zero weight whatever
        ``k`` and ``v`` hold there (NaN and infinity included), so no valid position's
        output depends on them. A query with no valid key gets a zero output and
        ``lse = -inf``. Outputs at invalid positions are computed from their ``q`` rows;
        callers normally discard them (with non-finite ``q`` there they are undefined).
    attn_mask : array_like of bool, shape (..., n_q, n_k), optional
        ``True`` = query ``i`` may attend to key ``j`` (PyTorch's boolean convention),
        broadcastable to ``(..., Hq, n_q, n_k)``. Read in place with strides: a mask with
        size-1 axes is never expanded. Combines (and) with ``causal``,
        ``key_padding_mask`` and ``window``.
    attn_bias : array_like of float, shape (..., n_q, n_k), optional
        Added to the (scaled) logits, broadcastable like ``attn_mask``, read in place;
        ``-inf`` masks a pair, NaN and ``+inf`` are rejected.
    window : (int or None, int or None), optional
        ``(left, right)``: query ``t`` sees keys ``t - left <= j <= t + right`` (``None``: no
        bound on that side), a sliding window without an ``(n, n)`` mask; with ``causal``
        the right side is 0. Positions as for ``causal``.
    query_offset : int, optional
        Position of query 0 in the key sequence, ``0 <= query_offset <= n_k - n_q``;
        replaces the default ``n_k - n_q`` of ``causal`` and ``window``.
    return_lse : bool, optional
        Also return the log-sum-exp of each query's logits, shape ``(..., n_q)``.
    check_finite : bool, optional
        Reject NaN or infinity in ``q``, ``k``, ``v`` with a ``ValueError`` (default), at the
        positions ``key_padding_mask`` marks valid: padding may hold anything. Turning it off
        saves one pass over the inputs; non-finite valid inputs then give undefined results.
    backend : {"auto", "cpu", "cuda"} or a registered name, optional
        ``"auto"`` runs on the GPU when the inputs live there, else on the CPU; any name
        registered with :func:`fmm_attention.backends.register_backend` is accepted too.

    Returns
    -------
    out : ndarray, shape (..., Hq, n_q, dv)
        The broadcast leading dims. In the dtype of the inputs: float32 stays float32,
        float64 stays float64; float16 is computed in float32, wider floats in float64.
    lse : ndarray, shape (..., Hq, n_q)
        Only with ``return_lse=True``.

    Raises
    ------
    TypeError
        Non-float inputs (integer, bool, complex), a non-bool mask or option, a non-integer
        ``query_offset`` or window side.
    ValueError
        Shapes that do not broadcast, ``Hq`` not a multiple of ``Hk``, an empty sequence,
        ``n_q > n_k`` with ``causal`` and no ``query_offset``, an offset out of range, masks
        or biases that do not broadcast, NaN/inf with ``check_finite``, unknown options.

    See Also
    --------
    fmm_attention : the O(n log n) approximation.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention import exact_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 128, 16))
    >>> exact_attention(q, k, v, causal=True).shape
    (2, 128, 16)

    Grouped heads, and one decode step (the last row of the causal attention):

    >>> q8 = rng.standard_normal((8, 128, 16))  # 8 query heads over the 2 key heads
    >>> exact_attention(q8, k, v).shape
    (8, 128, 16)
    >>> step = exact_attention(q[:, -1:], k, v, causal=True)
    >>> bool(np.allclose(step, exact_attention(q, k, v, causal=True)[:, -1:]))
    True
    """
    if is_dask(q, k, v, key_padding_mask):  # lazy in, lazy out: never computed on the client
        _no_dask(attn_mask=attn_mask, attn_bias=attn_bias, window=window, query_offset=query_offset)
        from .distributed import dask as _dask
        return _dask.exact_attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                     return_lse=return_lse, check_finite=check_finite, backend=backend)
    causal = check_bool(causal, "causal")
    return_lse = check_bool(return_lse, "return_lse")
    window = _shapes.check_window(window)
    features = _shapes.call_features(q, k, v, causal=causal, query_offset=query_offset, attn_mask=attn_mask,
                                     attn_bias=attn_bias, window=window)
    be = backends.select(backend, (q, k, v), "exact", features=features)
    batch = be.inputs(q, k, v, scale=scale, key_padding_mask=key_padding_mask, check_finite=check_finite,
                      skip_masked=True, causal=causal, query_offset=query_offset)
    backends.check_dtype(be, batch.dtype)
    pairwise = {}
    if attn_mask is not None:
        pairwise["attn_mask"] = _shapes.pair_term(attn_mask, "attn_mask", batch.layout)
    if attn_bias is not None:
        pairwise["attn_bias"] = _shapes.pair_term(attn_bias, "attn_bias", batch.layout, dtype=batch.dtype)
    if window is not None:
        pairwise["window"] = window
    B, n_q = batch.size if hasattr(batch, "layout") else batch.q.shape[0], batch.n
    # outputs and (with a mask) a zeroed copy of v; the tiles are small
    be.check_memory({"outputs": (B * n_q * (batch.dv + 1) + batch.v.size) * batch.dtype.itemsize},
                    {"outputs": ("n", n_q)})
    out, lse = be.exact(batch, causal=causal, **pairwise)
    return be.finish(batch, out, lse, return_lse)


def _no_dask(**options):
    """The Dask adapter runs self-attention of one shape: refuse the options it lacks."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} is not supported with Dask arrays yet; compute the inputs first")


def fmm_attention(q, k, v, *, causal=False, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
                  coarsening="mean", count_scaling=True, query_coarsening=False, scale=None,
                  key_padding_mask=None, return_lse=False, check_finite=True, backend="auto",
                  cluster_iters=3, refine=0, global_tokens=None, return_stats=False, query_offset=None,
                  attn_mask=None, attn_bias=None):
    """Fast Multipole Attention: exact near field, coarsened far field, one joint softmax.

    Each query attends exactly to the keys of its own block and the neighbouring blocks
    (``block_size`` tokens each). Farther keys and values are summarised level by level in
    boxes that double in size, ``rank`` coarse keys per box; one softmax spans all levels.
    Cost O(n (m + p log n) d) with fine queries, O(n (m + p) d) with coarse queries.
    :doc:`/semantics` states exactly what it computes; :doc:`/fma` explains the method.

    Parameters
    ----------
    q : array_like, shape (..., Hq, n_q, d)
        Queries; ``n_q = n`` for self-attention. With ``n_q < n_k`` query ``i`` sits at
        position ``t_i = query_offset + i`` of the key sequence (default offset
        ``n_k - n_q``: the last positions) and gets exactly row ``t_i`` of FMA
        self-attention over the keys, so prefill in chunks and decode steps give the
        rows of the one-shot forward (fine queries; no ``refine`` or ``query_coarsening``).
    k : array_like, shape (..., Hk, n_k, d)
        Keys. The dims before the head axis broadcast against those of ``q``;
        ``Hq = g * Hk`` groups the query heads (query head ``h`` reads key/value head
        ``h // g``), and the coarse keys of each key head are computed once and shared by
        its group, with no copy of ``k`` or ``v``.
    v : array_like, shape (..., Hk, n_k, dv)
        Values, with the leading dims of ``k``; ``dv`` may differ from ``d``.
    causal : bool, optional
        Query ``i`` attends only to keys ``j <= t_i``.
    block_size : int, optional
        Finest box size ``m``, a power of two. Larger: more exact attention, slower. A
        block longer than the sequence is clamped to the smallest power of two ``>= n``
        (every key is then in the near field: exact attention, the same result).
    rank : int, optional
        Coarse keys per far box ``p``, a power of two. Larger: finer far field, slower.
        ``rank >= N/4`` (``N`` the padded length) makes FMA exact.
    coarsening : "mean", "cluster" or Coarsening, optional
        ``"mean"`` averages the valid tokens of each sub-box (training-free, the paper's
        avgpool); ``"cluster"`` groups each box's keys by content (k-means up the tree,
        started from the children's groups, ``cluster_iters`` Lloyd steps) and averages
        each group, with ``log(group size)`` as bias; :class:`LearnedCoarsening` applies
        trained Conv1d weights. Any :class:`~fmm_attention.coarsening.Coarsening` instance
        is accepted (:class:`MeanCoarsening`, :class:`ClusterCoarsening` or one of your own);
        a backend without a kernel for it refuses it by name.
    count_scaling : bool, optional
        Add ``log(count)`` to each coarse logit, so a coarse key weighs as much as the
        tokens it stands for.
    query_coarsening : bool, optional
        The O(n) variant: far-field logits are computed once per box from its mean query.
        Bidirectional only (``ValueError`` with ``causal=True``).
    scale : float, optional
        Logit scale; ``1 / sqrt(d)`` by default.
    key_padding_mask : array_like of bool, shape (..., n_k), optional
        Broadcasts against the output's leading dims, but must be the same for every
        query head of a group (the group shares one set of coarse keys).
        ``True`` marks a valid position (token). Invalid keys leave every near field,
        coarse mean and count, and invalid queries every coarse query and refinement
        score, so no valid position's output depends on what ``q``, ``k``, ``v`` hold at
        invalid ones (NaN and infinity included), and a right-padded sequence gives the
        result of the unpadded one. A query with no valid key gets a zero output and
        ``lse = -inf``. Outputs at invalid positions are computed from their ``q`` rows;
        callers normally discard them (with non-finite ``q`` there they are undefined).
    return_lse : bool, optional
        Also return each query's log-sum-exp over all its logits, shape ``(..., n)``.
    check_finite : bool, optional
        Reject NaN or infinity in ``q``, ``k``, ``v`` (default), at the positions
        ``key_padding_mask`` marks valid: padding may hold anything.
    backend : {"auto", "cpu", "cuda"} or a registered name, optional
        ``"auto"`` runs on the GPU when the inputs live there, else on the CPU; any name
        registered with :func:`fmm_attention.backends.register_backend` is accepted too.
    cluster_iters : int, optional
        Lloyd iterations of ``coarsening="cluster"`` (0 gives mean coarsening); ignored
        otherwise (a :class:`ClusterCoarsening` holds its own). Each costs ``O(n p d)``
        per level whose boxes hold at most 128 tokens (these move single tokens) and
        ``O(n p^2 d / 128)`` for all larger levels together (these move whole groups of
        their children).
    refine : int, optional
        Extra keys per query block for adaptive refinement (fine queries only): the far box
        whose split would change the block's outputs most (to first order: the *benefit*,
        ``sum_i ||dnum_i - o_i dden_i|| / Z_i`` over the block's valid queries) is split into
        its two children one level finer (a level-1 box into its exact tokens), again and
        again while the added keys fit the budget. Only valid keys are charged. A budget of
        ``n`` covers every far key and gives exact attention; larger budgets are clamped to
        ``n`` (the same result). Default 0.
    global_tokens : array_like of int or bool, or "auto", optional
        Token indices attended exactly by every query (causal: by queries at or after
        them) and left out of coarsening, e.g. ``[0]`` for an attention sink. Per
        sequence: an int array broadcastable to ``(..., g)`` (one row of indices per
        leading index) or a bool array broadcastable to ``(..., n_k)``; an index at or
        past ``n_k`` or at a padded key is ignored for that sequence only, so a padded
        batch whose [SEP] tokens sit at different positions is one call. Per-sequence
        tokens must agree within a group of query heads, and do not combine with
        ``refine``. ``"auto"`` chooses a few (``_config.AUTO_GLOBAL_TOKENS``) per batch
        entry by estimated attention mass, causally with ``causal=True``
        (:mod:`fmm_attention.sinks`); CPU backend, forward only, self-attention
        (``n_q == n_k``).
    return_stats : bool, optional
        Also return an :class:`FMMStats` with keys per query and FLOPs by stage.
    query_offset : int, optional
        Position of query 0 in the key sequence, ``0 <= query_offset <= n_k - n_q``.
    attn_mask, attn_bias : None
        Not supported: a pairwise mask or bias has no coarse form (a far box's coarse key
        stands for many keys at once). Passing one raises ``ValueError``; use
        :func:`exact_attention`, or ``key_padding_mask`` and ``global_tokens``.

    Returns
    -------
    out : ndarray, shape (..., n, dv)
        In the dtype of the inputs (float32 or float64; float16 computes in float32).
    lse : ndarray, shape (..., n)
        Only with ``return_lse=True``.
    stats : FMMStats
        Only with ``return_stats=True`` (last).

    Raises
    ------
    TypeError
        Non-float inputs, a non-integer ``block_size``/``rank``, non-bool flags.
    ValueError
        Mismatched shapes, empty sequences, NaN/inf, ``block_size``/``rank`` not a power of
        two, unknown options, weights that do not fit the tree, coarse queries with causal,
        a call whose estimated memory exceeds the limit (the error names ``n``, ``refine``
        or ``block_size``; see ``_config.MAX_CALL_BYTES``).

    See Also
    --------
    exact_attention, build_tree, LearnedCoarsening

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention import fmm_attention, exact_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1000, 32))
    >>> out = fmm_attention(q, k, v, block_size=16, rank=4)
    >>> out.shape
    (1000, 32)
    >>> full = fmm_attention(q, k, v, block_size=16, rank=256)  # rank N/4: exact
    >>> bool(np.allclose(full, exact_attention(q, k, v)))
    True
    """
    for name, value in (("attn_mask", attn_mask), ("attn_bias", attn_bias)):
        if value is not None:
            raise ValueError(
                f"fmm_attention does not take {name}: a pairwise mask or bias has no coarse form (one coarse key "
                "stands for a whole far box of keys). Use exact_attention for pairwise masks and biases, or "
                "key_padding_mask / global_tokens / causal, which FMA supports"
            )
    per_sequence = _shapes.per_sequence_globals(global_tokens)
    if is_dask(q, k, v, key_padding_mask):  # lazy in, lazy out: never computed on the client
        _no_dask(query_offset=query_offset, global_tokens=global_tokens if per_sequence else None)
        from .distributed import dask as _dask
        return _dask.fmm_attention(
            q, k, v, causal=causal, block_size=block_size, rank=rank, coarsening=coarsening,
            count_scaling=count_scaling, query_coarsening=query_coarsening, scale=scale,
            key_padding_mask=key_padding_mask, return_lse=return_lse, check_finite=check_finite, backend=backend,
            cluster_iters=cluster_iters, refine=refine, global_tokens=global_tokens, return_stats=return_stats)
    return_lse = check_bool(return_lse, "return_lse")
    return_stats = check_bool(return_stats, "return_stats")
    options = FMMOptions.create(
        causal=causal, block_size=block_size, rank=rank, coarsening=coarsening, count_scaling=count_scaling,
        query_coarsening=query_coarsening, scale=scale, cluster_iters=cluster_iters, refine=refine,
        global_tokens=None if per_sequence else global_tokens,
    )
    features = _shapes.call_features(q, k, v, causal=options.causal, query_offset=query_offset, positions=True,
                                     per_sequence_global_tokens=per_sequence or None)
    be = backends.select(backend, (q, k, v), "fmm", options, return_stats=return_stats, features=features)
    if "cross_lengths" in features and (options.refine > 0 or options.query_coarsening):
        raise ValueError(
            f"{'refine > 0' if options.refine else 'query_coarsening=True'} needs every query of the sequence "
            "(a block's refinement plan and coarse queries depend on all its queries): with n_q != n_k or "
            "query_offset use fine queries and refine=0"
        )
    if return_stats and features - {"per_sequence_global_tokens"}:
        raise ValueError("return_stats=True counts keys of self-attention with one key set per query set: it does "
                         f"not combine with {', '.join(sorted(features - {'per_sequence_global_tokens'}))} yet")
    if isinstance(options.global_tokens, str) and "cross_lengths" in features:
        raise ValueError('global_tokens="auto" chooses sinks from the self-attention of the sequence: with '
                         "n_q != n_k or query_offset pass the indices")
    if per_sequence and options.refine > 0:
        raise ValueError("per-sequence global_tokens cannot be combined with refine > 0 yet; pass one shared "
                         "1-D global_tokens, or refine=0")
    batch = be.inputs(q, k, v, scale=options.scale, key_padding_mask=key_padding_mask, check_finite=check_finite,
                      skip_masked=True, causal=options.causal, query_offset=query_offset, positions=True)
    backends.check_dtype(be, batch.dtype)
    entry_globals = (_shapes.global_token_sets(global_tokens, batch.layout, batch.pad) if per_sequence
                     else None)
    asked, (tree, options) = options, plan(batch, options)
    n_out = batch.size if hasattr(batch, "layout") else batch.q.shape[0]
    n_globals = _n_globals(options.global_tokens) if entry_globals is None else max(map(len, entry_globals), default=0)
    parts = fmm_call_bytes(
        tree, batch=n_out, d=batch.d, dv=batch.dv, itemsize=batch.dtype.itemsize, refine=options.refine,
        query_coarsening=options.query_coarsening, n_globals=n_globals,
        coarsening=options.coarsening,
    )
    refine_shown = refine if refine == options.refine else f"{refine} (clamped to n = {options.refine})"
    be.check_memory(parts, {"refinement": ("refine", refine_shown), "block buffers": ("block_size", tree.block_size),
                            "outputs": ("n", batch.n), "coarse buffers": ("n", batch.n),
                            "tree and key plan": ("n", batch.n)})
    out, lse, key_plan = be.fmm(batch, tree, options, **({} if entry_globals is None
                                                         else {"entry_globals": entry_globals}))
    result = be.finish(batch, out, lse, return_lse)
    if not return_stats:
        return result
    stats = fmm_stats(
        tree, key_plan, batch_size=n_out, d=batch.d, dv=batch.dv, coarsening=asked.coarsening,
        refine=options.refine, query_coarsening=options.query_coarsening, valid=batch.valid,
    )
    return (*result, stats) if return_lse else (result, stats)


def _n_globals(global_tokens):
    """Global tokens of a call (``"auto"``: at most ``_config.AUTO_GLOBAL_TOKENS``), for the memory estimate."""
    return _config.AUTO_GLOBAL_TOKENS if isinstance(global_tokens, str) else len(global_tokens)


def plan(batch, options):
    """Plan an FMA call: its tree, and its options fitted to the sequence.

    Parameters
    ----------
    batch : Batch
        The validated inputs (their ``n``, ``d``, ``dv``).
    options : FMMOptions

    Returns
    -------
    tree : Tree
        :func:`fmm_attention.build_tree` of the call (``block_size`` clamped to the sequence).
    options : FMMOptions
        ``refine`` clamped to ``n`` (more changes nothing), global tokens checked against
        ``n``, and the coarsening checked against the tree
        (:meth:`~fmm_attention.coarsening.Coarsening.check_tree`; replaced by mean
        coarsening when the clamped block holds every key: nothing is coarsened).

    Raises
    ------
    ValueError
        A coarsening that does not fit the tree (learned weights), global tokens outside
        ``[0, n)``.
    """
    n = batch.k.shape[1]  # the tree is the keys': queries sit at positions in it
    tree = build_tree(n, block_size=options.block_size, rank=options.rank, causal=options.causal)
    changes = {}
    if tree.block_size < options.block_size:
        # block_size was clamped (it exceeds the sequence): the coarsening must still fit the
        # tree asked for, but no far key exists in either, so nothing is coarsened
        options.coarsening.check_tree(_build_tree(n, options.block_size, tree.rank, options.causal),
                                      batch.d, batch.dv)
        changes["coarsening"] = MeanCoarsening()
    else:
        options.coarsening.check_tree(tree, batch.d, batch.dv)
    changes["global_tokens"] = check_global_tokens(options.global_tokens, n)
    changes["refine"] = min(options.refine, n)  # n extra keys split every far box: more changes nothing
    return tree, options.replace(**changes)


def fastformer_attention(q, k, v, w_q, w_k, *, causal=False, scale=None, key_padding_mask=None,
                         return_pools=False, check_finite=True, backend="auto"):
    """Fastformer additive attention: global query and key pools, O(n d) time and memory.

    For each leading index, with ``s = scale``:
    ``alpha = softmax_i(s q_i . w_q)``, ``qg = sum_i alpha_i q_i``; ``p_i = qg * k_i``;
    ``beta = softmax_i(s p_i . w_k)``, ``kg = sum_i beta_i p_i``; output ``u_i = kg * v_i``
    (``*`` element-wise). With ``causal=True`` the pools at position ``i`` are taken over
    ``j <= i`` only, and ``p_j = qg(j) * k_j`` uses the prefix pool at ``j``. This is the
    attention core of Wu et al., "Fastformer: Additive Attention Can Be All You Need"
    (arXiv 2108.09084); the projections, output transform and residual are the caller's
    (see :doc:`/fastformer`). :doc:`/semantics` states exactly what it computes.

    Parameters
    ----------
    q, k, v : array_like, shape (..., n, d)
        Queries, keys and values with the same ``n`` and ``d`` (``v`` is multiplied
        element-wise by the global key). The leading dims of ``q`` and ``k`` broadcast
        (``k`` and ``v`` share theirs); ``Hq = g * Hk`` repeats each key head for ``g``
        query heads. The kernels read one row set per leading index, so a broadcast
        input is copied once to the output's leading dims.
    w_q, w_k : array_like, shape (..., d)
        Additive-attention vectors, broadcasting against the leading dims of ``q``: ``(d,)``
        for one shared vector, ``(h, d)`` for one per head with ``q`` of shape
        ``(b, h, n, d)``. Cast to the dtype of the computation.
    causal : bool, optional
        Position ``i`` sees only positions ``j <= i`` (prefix pools), computed in one pass
        with running maxima.
    scale : float, optional
        Logit scale ``s``; ``1 / sqrt(d)`` by default.
    key_padding_mask : array_like of bool, shape (..., n), optional
        ``True`` marks a valid position. Invalid positions leave both softmaxes (they
        contribute to neither pool), so their ``q``, ``k`` values change nothing; their
        output is still ``kg * v_i`` (with the causal pool ``kg(i)`` over the valid
        ``j <= i``). Where no valid position exists (the whole sequence, or a causal prefix)
        the pools and the output are zero.
    return_pools : bool, optional
        Also return the pools ``qg`` and ``kg``.
    check_finite : bool, optional
        Reject NaN or infinity in ``q``, ``k``, ``v``, ``w_q``, ``w_k`` (default), at every
        position, masked ones included: an invalid position's ``v`` row still makes its output.
    backend : {"auto", "cpu", "cuda"} or a registered name, optional
        ``"auto"`` runs on the GPU when the inputs live there, else on the CPU; any name
        registered with :func:`fmm_attention.backends.register_backend` is accepted too.

    Returns
    -------
    u : ndarray, shape (..., n, d)
        In the dtype of ``q``, ``k``, ``v``: float32 stays float32, float64 stays float64;
        float16 computes in float32, wider floats in float64.
    qg, kg : ndarray
        Only with ``return_pools=True``: shape ``(..., d)`` bidirectional, ``(..., n, d)``
        causal (the pools of each prefix).

    Raises
    ------
    TypeError
        Non-float inputs or vectors, a non-bool mask or flag.
    ValueError
        Mismatched shapes (``v`` with another ``d``, vectors that do not broadcast), an
        empty sequence, NaN/inf with ``check_finite``, unknown options.

    See Also
    --------
    fmm_attention : Softmax attention over pairs, approximated in O(n log n).
    exact_attention : Softmax attention over pairs, exact.

    Notes
    -----
    Bidirectionally each pool is a two-pass log-sum-exp reduction, parallel over chunks of
    the sequence and the leading dims, so one long sequence uses every core; ``q``, ``k``
    and ``v`` are each read once. Causally each sequence is one serial pass (parallel over
    the leading dims) with online-softmax rescaling, stable for logits of any size.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention import fastformer_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 4, 128, 16))  # (b, h, n, d)
    >>> w_q, w_k = rng.standard_normal((2, 4, 16))  # one vector per head
    >>> fastformer_attention(q, k, v, w_q, w_k).shape
    (2, 4, 128, 16)
    >>> u, qg, kg = fastformer_attention(q, k, v, w_q, w_k, causal=True,
    ...                                  return_pools=True)
    >>> qg.shape
    (2, 4, 128, 16)
    >>> bool(np.allclose(u, kg * v))
    True
    """
    if is_dask(q, k, v, w_q, w_k, key_padding_mask):  # lazy in, lazy out: never computed on the client
        from .distributed import dask as _dask
        return _dask.fastformer_attention(q, k, v, w_q, w_k, causal=causal, scale=scale,
                                          key_padding_mask=key_padding_mask, return_pools=return_pools,
                                          check_finite=check_finite, backend=backend)
    causal = check_bool(causal, "causal")
    return_pools = check_bool(return_pools, "return_pools")
    features = _shapes.call_features(q, k, v, same_length=True)
    be = backends.select(backend, (q, k, v, w_q, w_k), "fastformer", features=features)
    check_finite = check_bool(check_finite, "check_finite")
    fused = check_finite and "fastformer" in be.fused_finite_checks  # checked by the kernels as they read
    batch = be.inputs(q, k, v, scale=scale, key_padding_mask=key_padding_mask, check_finite=check_finite and not fused,
                      same_length=True)
    if hasattr(batch, "layout"):
        # the kernels read one q, k, v row set per entry: broadcast leading dims are copied once
        batch = _shapes.materialise(batch)
    backends.check_dtype(be, batch.dtype)
    if batch.dv != batch.d:
        raise ValueError(
            f"v must have the feature dim d = {batch.d} of q (u = kg * v is element-wise), got "
            f"v of shape {batch.lead_shape + (batch.n, batch.dv)}"
        )
    w_q = be.vector(w_q, "w_q", batch, check_finite)  # check_finite: checked by inputs
    w_k = be.vector(w_k, "w_k", batch, check_finite)
    out, qg, kg = be.fastformer(batch, w_q, w_k, causal=causal, return_pools=return_pools,
                                **({"check_finite": True} if fused else {}))
    return be.finish_pools(batch, out, qg, kg, causal=causal, return_pools=return_pools)
