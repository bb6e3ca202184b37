"""The public functions: validate, plan, dispatch.

Each function checks its arguments (:mod:`._validate`), builds or fetches the plan
(:mod:`.tree`), picks a backend (:mod:`.backends`) and hands over; nothing flows back up.
"""

from __future__ import annotations

from . import _config, backends
from ._validate import attention_inputs, check_bool
from .coarsening import LearnedCoarsening
from .tree import build_tree


def _finish(batch, out, lse, return_lse):
    out = batch.restore(out)
    if return_lse:
        return out, batch.restore(lse, last_dim=False)
    return out


def exact_attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None, return_lse=False,
                    check_finite=True, backend="auto"):
    """Exact softmax attention, streamed in tiles with an online softmax (O(n d) memory).

    Computes ``softmax(scale * q @ k.T + mask) @ v`` for every leading index without ever
    forming the ``(n, n)`` matrix.

    Parameters
    ----------
    q, k : array_like, shape (..., n, d)
        Queries and keys. Leading dims (batch, heads) must match across ``q``, ``k``, ``v``.
    v : array_like, shape (..., n, dv)
        Values; ``dv`` may differ from ``d``.
    causal : bool, optional
        Query ``i`` attends only to keys ``j <= i``.
    scale : float, optional
        Logit scale; ``1 / sqrt(d)`` by default.
    key_padding_mask : array_like of bool, shape (..., n), optional
        ``True`` marks a valid key; invalid keys get zero weight. A query with no valid key
        gets a zero output and ``lse = -inf``.
    return_lse : bool, optional
        Also return the log-sum-exp of each query's logits, shape ``(..., n)``.
    check_finite : bool, optional
        Reject NaN or infinity in ``q``, ``k``, ``v`` with a ``ValueError`` (default). Turning
        it off saves one pass over the inputs; non-finite inputs then give undefined results.
    backend : {"auto", "cpu", "cuda"}, optional
        ``"auto"`` runs on the GPU when the inputs live there, else on the CPU.

    Returns
    -------
    out : ndarray, shape (..., n, dv)
        In the dtype of the inputs: float32 stays float32, float64 stays float64; float16
        is computed in float32, wider floats in float64.
    lse : ndarray, shape (..., n)
        Only with ``return_lse=True``.

    Raises
    ------
    TypeError
        Non-float inputs (integer, bool, complex), a non-bool mask or option.
    ValueError
        Mismatched shapes, an empty sequence, NaN/inf with ``check_finite``, unknown options.

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
    """
    causal = check_bool(causal, "causal")
    return_lse = check_bool(return_lse, "return_lse")
    name = backends.resolve(backend, q, k, v)
    if name == "cuda":
        return backends.get("cuda").exact_attention(
            q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
            return_lse=return_lse, check_finite=check_finite,
        )
    batch = attention_inputs(q, k, v, scale=scale, key_padding_mask=key_padding_mask, check_finite=check_finite)
    out, lse = backends.get(name).exact(batch, causal=causal)
    return _finish(batch, out, lse, return_lse)


def check_fmm_options(*, coarsening, count_scaling, query_coarsening, causal):
    """Validate FMA options shared by every backend; returns them normalised."""
    if not (isinstance(coarsening, LearnedCoarsening) or (isinstance(coarsening, str) and coarsening == "mean")):
        raise ValueError(f"coarsening must be 'mean' or a LearnedCoarsening, got {coarsening!r}")
    count_scaling = check_bool(count_scaling, "count_scaling")
    query_coarsening = check_bool(query_coarsening, "query_coarsening")
    if query_coarsening and causal:
        raise ValueError(
            "query_coarsening=True cannot be combined with causal=True: a coarse query averages "
            "future tokens into past outputs (use fine queries for causal attention)"
        )
    return coarsening, count_scaling, query_coarsening


def fmm_attention(q, k, v, *, causal=False, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
                  coarsening="mean", count_scaling=True, query_coarsening=False, scale=None,
                  key_padding_mask=None, return_lse=False, check_finite=True, backend="auto"):
    """Fast Multipole Attention: exact near field, coarsened far field, one joint softmax.

    Each query attends exactly to the keys of its own block and the neighbouring blocks
    (``block_size`` tokens each). Farther keys and values are summarised level by level in
    boxes that double in size, ``rank`` coarse keys per box; one softmax spans all levels.
    Cost O(n (m + p log n) d) with fine queries, O(n (m + p) d) with coarse queries.
    The semantics are fixed in ``shared/spec/fma.md`` and documented in :doc:`/fma`.

    Parameters
    ----------
    q, k : array_like, shape (..., n, d)
        Queries and keys; leading dims (batch, heads) must match across ``q``, ``k``, ``v``.
    v : array_like, shape (..., n, dv)
        Values; ``dv`` may differ from ``d``.
    causal : bool, optional
        Query ``i`` attends only to keys ``j <= i``.
    block_size : int, optional
        Finest box size ``m``, a power of two. Larger: more exact attention, slower.
    rank : int, optional
        Coarse keys per far box ``p``, a power of two. Larger: finer far field, slower.
        ``rank >= N/4`` (``N`` the padded length) makes FMA exact.
    coarsening : "mean" or LearnedCoarsening, optional
        ``"mean"`` averages the valid tokens of each sub-box (training-free);
        :class:`LearnedCoarsening` applies trained Conv1d weights.
    count_scaling : bool, optional
        Add ``log(count)`` to each coarse logit, so a coarse key weighs as much as the
        tokens it stands for.
    query_coarsening : bool, optional
        The O(n) variant: far-field logits are computed once per box from its mean query.
        Bidirectional only (``ValueError`` with ``causal=True``).
    scale : float, optional
        Logit scale; ``1 / sqrt(d)`` by default.
    key_padding_mask : array_like of bool, shape (..., n), optional
        ``True`` marks a valid key. Invalid keys leave every near field, coarse mean and
        count. A query with no valid key gets a zero output and ``lse = -inf``.
    return_lse : bool, optional
        Also return each query's log-sum-exp over all its logits, shape ``(..., n)``.
    check_finite : bool, optional
        Reject NaN or infinity in ``q``, ``k``, ``v`` (default).
    backend : {"auto", "cpu", "cuda"}, optional
        ``"auto"`` runs on the GPU when the inputs live there, else on the CPU.

    Returns
    -------
    out : ndarray, shape (..., n, dv)
        In the dtype of the inputs (float32 or float64; float16 computes in float32).
    lse : ndarray, shape (..., n)
        Only with ``return_lse=True``.

    Raises
    ------
    TypeError
        Non-float inputs, a non-integer ``block_size``/``rank``, non-bool flags.
    ValueError
        Mismatched shapes, empty sequences, NaN/inf, ``block_size``/``rank`` not a power of
        two, unknown options, weights that do not fit the tree, coarse queries with causal.

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
    >>> bool(np.allclose(fmm_attention(q, k, v, block_size=16, rank=256), exact_attention(q, k, v)))
    True
    """
    causal = check_bool(causal, "causal")
    return_lse = check_bool(return_lse, "return_lse")
    coarsening, count_scaling, query_coarsening = check_fmm_options(
        coarsening=coarsening, count_scaling=count_scaling, query_coarsening=query_coarsening, causal=causal
    )
    name = backends.resolve(backend, q, k, v)
    if name == "cuda":
        return backends.get("cuda").fmm_attention(
            q, k, v, causal=causal, block_size=block_size, rank=rank, coarsening=coarsening,
            count_scaling=count_scaling, query_coarsening=query_coarsening, scale=scale,
            key_padding_mask=key_padding_mask, return_lse=return_lse, check_finite=check_finite,
        )
    batch = attention_inputs(q, k, v, scale=scale, key_padding_mask=key_padding_mask, check_finite=check_finite)
    tree = build_tree(batch.n, block_size=block_size, rank=rank, causal=causal)
    if isinstance(coarsening, LearnedCoarsening):
        coarsening.check_tree(tree, batch.d, batch.dv)
    out, lse = backends.get(name).fmm(
        batch, tree, coarsening=coarsening, count_scaling=count_scaling, query_coarsening=query_coarsening
    )
    return _finish(batch, out, lse, return_lse)
