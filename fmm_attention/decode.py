"""Streaming causal decode: FMA (or exact attention) one token at a time, from a small state.

A causal FMA row ``i`` depends only on the tokens ``j <= i`` and on the box sizes
``w_l = m * 2**(l-1)``; the depth ``L`` of a one-shot call only leaves out levels whose
lists are empty for every query it holds. So a decoder can keep as many levels as the
position needs, and its output for the token at position ``t`` is row ``t`` of
``fmm_attention(q[..., :T, :], k[..., :T, :], v[..., :T, :], causal=True, ...)`` for any
``T > t`` (``shared/spec/shapes-and-decoding.md``, "Streaming decode with FMA").
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _config
from ._threads import num_threads
from ._validate import (
    KERNEL_DTYPES,
    as_array,
    check_bool,
    check_choice,
    check_finite_array,
    check_power_of_two,
    check_scale,
    float_dtype,
)
from .coarsening import LearnedCoarsening, MeanCoarsening

_EMPTY_INT = np.zeros(0, dtype=np.int64)
_KERNELS = []  # the CPU decode kernels once imported: importing the package loads no kernel module


def _kernels():
    """The module of CPU decode kernels (a step looks it up without an import statement)."""
    if not _KERNELS:
        from .cpu import decode

        _KERNELS.append(decode)
    return _KERNELS[0]


def _positive_int(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def _batch_shape(batch_shape):
    if isinstance(batch_shape, numbers.Integral) and not isinstance(batch_shape, (bool, np.bool_)):
        batch_shape = (batch_shape,)
    if not isinstance(batch_shape, (tuple, list)):
        raise TypeError(f"batch_shape must be a tuple of positive integers, got {batch_shape!r}")
    return tuple(_positive_int(x, f"batch_shape[{i}]") for i, x in enumerate(batch_shape))


def _global_list(global_tokens):
    if global_tokens is None:
        return _EMPTY_INT
    arr = np.asarray(global_tokens)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(f"global_tokens must be a 1-D sequence of integer token indices, got {global_tokens!r}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"global_tokens must be non-negative positions, got {arr.min()}")
    return np.unique(arr).astype(np.int64)


def _check_tokens_finite(arrays):
    """Reject NaN or infinity in the (contiguous) ``q, k, v`` of a prefill or step."""
    if arrays[0].size + arrays[1].size + arrays[2].size > _config.DECODE_PARALLEL_MIN_WORK:  # a prompt: the parallel check
        for name, arr in zip("qkv", arrays):
            check_finite_array(arr, name)
        return
    kernels = _kernels()
    # a step's few tokens: one serial call for all three (no parallel launch, no temporaries)
    q, k, v = arrays
    bad = kernels.first_nonfinite(q.reshape(-1), k.reshape(-1), v.reshape(-1))
    if bad >= 0:
        raise ValueError(f"{'qkv'[bad]} contains NaN or infinity (pass check_finite=False to skip this check)")


class FMMDecoder:
    """Causal attention one token at a time: FMA from an O((m + p log T) d) state.

    Holds the decoding state of one causal attention per leading index (batch, heads).
    :meth:`prefill` takes a prompt, :meth:`step` the next tokens; each returns the outputs
    of its tokens. With ``method="fmm"`` the output for the token at position ``t`` equals
    row ``t`` of ``fmm_attention(q[..., :T, :], k[..., :T, :], v[..., :T, :], causal=True,
    block_size=block_size, rank=rank, ...)`` for any ``T > t`` (to rounding), while the state
    is only the last ``2 * block_size`` tokens, the coarse rows of at most four boxes per
    far level, the running sums of the boxes being filled and the global tokens: no memory
    or work per token that grows linearly in ``T``. With ``method="exact"`` it keeps a plain
    KV cache and its outputs are the rows of ``exact_attention(..., causal=True)``.

    Parameters
    ----------
    batch_shape : tuple of int, optional
        Leading dims of every input, e.g. ``(batch, heads)``; ``()`` for one sequence.
        With ``kv_heads``, the leading dims of ``q`` and the outputs, the last one the
        query heads.
    d : int
        Feature dim of queries and keys.
    dv : int, optional
        Feature dim of values; ``d`` by default.
    block_size, rank : int, optional
        ``m`` and ``p`` of the FMA tree (powers of two), as in :func:`fmm_attention`.
    coarsening : "mean" or LearnedCoarsening, optional
        Far-field coarsening. A :class:`LearnedCoarsening` with ``L`` levels fits the tree
        of ``fmm_attention`` calls of padded length ``N = m * 2**(L+1)``; the decoder then
        serves positions ``0 .. N-1`` (it cannot invent weights for a level ``L + 1``).
    count_scaling : bool, optional
        Add ``log(count)`` to each coarse logit, as in :func:`fmm_attention`.
    scale : float, optional
        Logit scale; ``1 / sqrt(d)`` by default.
    dtype : float32 or float64, optional
        dtype of the state and of every output; inputs are converted to it.
    global_tokens : array_like of int, optional
        Positions attended exactly by every later query and left out of coarsening, as
        ``fmm_attention(global_tokens=...)`` (positions beyond the current length simply
        have not been reached yet).
    method : {"fmm", "exact"}, optional
        ``"exact"`` keeps a KV cache (O(T d) memory, O(T d) work per token) and ignores
        the FMA options, so switching is one argument.
    kv_heads : int, optional
        Grouped-query attention: ``k``, ``v`` (and the key padding mask) carry ``kv_heads``
        heads where ``q`` carries ``Hq = batch_shape[-1] = g * kv_heads``; query head ``h``
        uses key/value head ``h // g``, as :func:`fmm_attention` with grouped heads. The
        state is held once per key/value head (``g`` times smaller than with ``k``, ``v``
        repeated) and the outputs are the rows of the grouped one-shot call. ``None``
        (default): ``k``, ``v`` have the leading dims ``batch_shape``.

    Attributes
    ----------
    position : int
        Tokens seen so far (the position of the next token).
    state_bytes : int
        Bytes of the arrays the state holds now (learned weights excluded: they are
        parameters, not state).

    Raises
    ------
    TypeError, ValueError
        Bad options, each naming its argument; learned weights that do not fit ``d``,
        ``dv``, ``block_size`` and ``rank``.

    See Also
    --------
    fmm_attention, exact_attention

    Notes
    -----
    Per token the FMA step costs about ``2m + 2 p L`` logits (``L = log2(T/m)``) plus the
    state update: O(d) for mean coarsening (a box's rows are made from its two children
    when it closes, with the forward's arithmetic), O(p d L) for learned coarsening (the
    weighted sums of every open box gain the new token). The sequences of a batch run in
    parallel; within one sequence the tokens of a call are processed in order.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention import FMMDecoder, fmm_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 100, 8))
    >>> dec = FMMDecoder(d=8, block_size=4, rank=2)
    >>> first = dec.prefill(q[:60], k[:60], v[:60])       # the prompt, in one call
    >>> rest = [dec.step(q[t:t + 1], k[t:t + 1], v[t:t + 1]) for t in range(60, 100)]
    >>> out = np.concatenate([first] + rest)
    >>> ref = fmm_attention(q, k, v, causal=True, block_size=4, rank=2)
    >>> bool(np.allclose(out, ref, rtol=1e-12, atol=1e-12)), dec.position
    (True, 100)
    """

    def __init__(self, *, batch_shape=(), d, dv=None, block_size=_config.DEFAULT_BLOCK_SIZE,
                 rank=_config.DEFAULT_RANK, coarsening="mean", count_scaling=True, scale=None,
                 dtype=np.float64, global_tokens=None, method="fmm", kv_heads=None):
        self.batch_shape = _batch_shape(batch_shape)
        if kv_heads is None:
            self.kv_shape, self._g = self.batch_shape, 1
        else:
            kv_heads = _positive_int(kv_heads, "kv_heads")
            if not self.batch_shape or self.batch_shape[-1] % kv_heads:
                raise ValueError(
                    f"kv_heads must divide the query heads batch_shape[-1] (Hq = g * kv_heads), got kv_heads = "
                    f"{kv_heads} with batch_shape = {self.batch_shape}")
            self.kv_shape, self._g = self.batch_shape[:-1] + (kv_heads,), self.batch_shape[-1] // kv_heads
        self.d = _positive_int(d, "d")
        self.dv = self.d if dv is None else _positive_int(dv, "dv")
        self.method = check_choice(method, "method", ("fmm", "exact"))
        self.block_size = check_power_of_two(block_size, "block_size")
        self.rank = check_power_of_two(rank, "rank")
        if isinstance(coarsening, MeanCoarsening):
            coarsening = "mean"
        if not (isinstance(coarsening, LearnedCoarsening) or (isinstance(coarsening, str) and coarsening == "mean")):
            raise ValueError(
                f"coarsening must be 'mean' or a LearnedCoarsening for decoding, got {coarsening!r} "
                "('cluster' regroups a whole box at once and has no running form)"
            )
        self.coarsening = coarsening
        self.count_scaling = check_bool(count_scaling, "count_scaling")
        self.scale = check_scale(scale, self.d)
        try:
            dt = np.dtype(dtype)
        except TypeError as exc:
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from exc
        if dt not in KERNEL_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dt}")
        self.dtype = dt
        self.global_tokens = _global_list(global_tokens)
        self._B = int(np.prod(self.kv_shape, dtype=np.int64))  # one state per key/value sequence
        self._position = 0
        self._kernel_state_cache = None
        # one token's (q, k, v) shapes as given, then q's, k's and v's kernel shapes (step's fast path)
        kv_lead = self.batch_shape if self._g == 1 else self.kv_shape
        self._one_token_shapes = (
            (self.batch_shape + (1, self.d), kv_lead + (1, self.d), kv_lead + (1, self.dv)),
            (self._B, self._g, 1, self.d), (self._B, 1, self.d), (self._B, 1, self.dv),
        )
        if self.method == "exact":
            self._kv = self._ok = None
            self._vv = None
            return
        self._max_position = None  # exclusive bound on positions (learned weights)
        if isinstance(coarsening, LearnedCoarsening):
            from .tree import build_tree

            n_max = self.block_size << (coarsening.n_levels + 1)
            coarsening.check_tree(build_tree(n_max, block_size=self.block_size, rank=self.rank, causal=True),
                                  self.d, self.dv)
            self._max_position = n_max
            self._init_learned(coarsening)
        else:
            self._learned = None
            self._wkt = self._wvt = self._bk = self._bv = np.zeros(1, dtype=dt)
            self._w_off = self._bk_off = self._bv_off = np.zeros(1, dtype=np.int64)
            self._acck = np.zeros((1, 1, 1, 1), dtype=dt)
            self._accv = np.zeros((1, 1, 1, 1), dtype=dt)
            self._accn = np.zeros((1, 1), dtype=np.int64)
        B, m, p = self._B, self.block_size, self.rank
        self._near_k = np.zeros((B, 2 * m, self.d), dtype=dt)
        self._near_v = np.zeros((B, 2 * m, self.dv), dtype=dt)
        self._near_ok = np.zeros((B, 2 * m), dtype=np.bool_)
        self._near_cv = np.zeros((B, 2 * m), dtype=np.bool_)
        n_levels = self._learned.n_levels if self._learned is not None else 0
        self._n_levels = 0
        self._ck = np.zeros((B, 0, 4, p, self.d), dtype=dt)
        self._cv = np.zeros((B, 0, 4, p, self.dv), dtype=dt)
        self._cb = np.full((B, 0, 4, p), -np.inf, dtype=dt)
        self._cn = np.zeros((B, 0, 4, p), dtype=dt)
        self._grow_levels(n_levels)
        self._gk = np.zeros((B, 0, self.d), dtype=dt)
        self._gv = np.zeros((B, 0, self.dv), dtype=dt)
        self._gok = np.zeros((B, 0), dtype=np.bool_)

    # ------------------------------------------------------------------ state layout
    def _init_learned(self, coarsening):
        dt = self.dtype
        kw, vw, kb, vb = coarsening.level_arrays(dt)  # (r*d, w) per level
        self._learned = coarsening
        # stored (w, r*d) per level: the weights of one token position are contiguous
        self._wkt = np.concatenate([np.ascontiguousarray(w.T).ravel() for w in kw])
        self._wvt = np.concatenate([np.ascontiguousarray(w.T).ravel() for w in vw])
        self._w_off = np.cumsum([0] + [w.size for w in kw[:-1]]).astype(np.int64)
        self._wv_off = np.cumsum([0] + [w.size for w in vw[:-1]]).astype(np.int64)
        self._bk = np.concatenate(kb)
        self._bv = np.concatenate(vb)
        self._bk_off = np.cumsum([0] + [b.size for b in kb[:-1]]).astype(np.int64)
        self._bv_off = np.cumsum([0] + [b.size for b in vb[:-1]]).astype(np.int64)
        L, B, p = coarsening.n_levels, self._B, self.rank
        self._acck = np.zeros((B, L, p, self.d), dtype=dt)
        self._accv = np.zeros((B, L, p, self.dv), dtype=dt)
        self._accn = np.zeros((B, L), dtype=np.int64)

    def _all_valid(self, t):
        # every step of an unpadded decode needs one: kept, as the kernels only read it
        cached = getattr(self, "_all_valid_cache", None)
        if cached is None or cached.shape[1] != t:
            cached = self._all_valid_cache = np.ones((self._B, t), dtype=np.bool_)
        return cached

    def _no_globals(self, t):
        cached = getattr(self, "_no_globals_cache", None)
        if cached is None or cached[0].size != t:
            cached = self._no_globals_cache = (np.zeros(t, dtype=np.int64), np.zeros(t, dtype=np.bool_))
        return cached

    def _grow_levels(self, n_levels):
        if n_levels <= self._n_levels:
            return
        extra = n_levels - self._n_levels
        B, p = self._B, self.rank
        self._ck = np.concatenate([self._ck, np.zeros((B, extra, 4, p, self.d), dtype=self.dtype)], axis=1)
        self._cv = np.concatenate([self._cv, np.zeros((B, extra, 4, p, self.dv), dtype=self.dtype)], axis=1)
        self._cb = np.concatenate([self._cb, np.full((B, extra, 4, p), -np.inf, dtype=self.dtype)], axis=1)
        self._cn = np.concatenate([self._cn, np.zeros((B, extra, 4, p), dtype=self.dtype)], axis=1)
        self._n_levels = n_levels
        self._kernel_state_cache = None

    def _kernel_state(self):
        """The decode kernel's arguments from ``block_size`` to ``gpos``, as one tuple.

        Built again only after the state arrays are reallocated (:meth:`_grow_levels`,
        :meth:`_grow_globals`): a step then passes them without looking up two dozen
        attributes.
        """
        state = self._kernel_state_cache
        if state is None:
            gpos = self.global_tokens[: self._gk.shape[1]]
            wv_off = self._w_off if self._learned is None else self._wv_off
            state = self._kernel_state_cache = (
                self.block_size, self.rank, self._n_levels, self.dtype.type(self.scale), self.count_scaling,
                self._learned is not None,
                self._near_k, self._near_v, self._near_ok, self._near_cv, self._ck, self._cv, self._cb, self._cn,
                self._wkt, self._wvt, self._bk, self._bv, self._w_off, wv_off, self._bk_off, self._bv_off,
                self._acck, self._accv, self._accn, self._gk, self._gv, self._gok, gpos,
            )
        return state

    def _levels_for(self, n_tokens):
        """Far levels with at least one finished box after ``n_tokens`` tokens."""
        return max(0, (n_tokens // self.block_size).bit_length())

    def _grow_globals(self, n_tokens):
        if not self.global_tokens.size:  # the common case, on every step
            return
        n_reached = int(np.searchsorted(self.global_tokens, n_tokens))
        have = self._gk.shape[1]
        if n_reached > have:
            extra = n_reached - have
            B = self._B
            self._gk = np.concatenate([self._gk, np.zeros((B, extra, self.d), dtype=self.dtype)], axis=1)
            self._gv = np.concatenate([self._gv, np.zeros((B, extra, self.dv), dtype=self.dtype)], axis=1)
            self._gok = np.concatenate([self._gok, np.zeros((B, extra), dtype=np.bool_)], axis=1)
            self._kernel_state_cache = None

    def _grow_cache(self, n_tokens):
        have = 0 if self._kv is None else self._kv.shape[1]
        if n_tokens <= have:
            return
        cap = max(n_tokens, have + have // 2)  # amortised growth, 1.5x
        B = self._B
        kv = np.zeros((B, cap, self.d), dtype=self.dtype)
        vv = np.zeros((B, cap, self.dv), dtype=self.dtype)
        ok = np.zeros((B, cap), dtype=np.bool_)
        if have:
            kv[:, :have], vv[:, :have], ok[:, :have] = self._kv, self._vv, self._ok
        self._kv, self._vv, self._ok = kv, vv, ok

    @property
    def position(self):
        """Tokens seen so far: the position of the next token."""
        return self._position

    @property
    def state_bytes(self):
        """Bytes held by the decoding state (KV cache for ``method="exact"``)."""
        if self.method == "exact":
            return 0 if self._kv is None else self._kv.nbytes + self._vv.nbytes + self._ok.nbytes
        arrays = [self._near_k, self._near_v, self._near_ok, self._near_cv, self._ck, self._cv, self._cb,
                  self._cn, self._gk, self._gv, self._gok]
        if self._learned is not None:
            arrays += [self._acck, self._accv, self._accn]
        return int(sum(a.nbytes for a in arrays))

    def __repr__(self):
        heads = "" if self._g == 1 else f"kv_heads={self.kv_shape[-1]}, "
        return (f"FMMDecoder(method={self.method!r}, batch_shape={self.batch_shape}, {heads}d={self.d}, dv={self.dv}, "
                f"block_size={self.block_size}, rank={self.rank}, position={self._position})")

    # ------------------------------------------------------------------ inputs
    def _tokens(self, q, k, v, mask, mask_name, check_finite):
        check_finite = check_bool(check_finite, "check_finite")
        arrays = {"q": as_array(q, "q"), "k": as_array(k, "k"), "v": as_array(v, "v")}
        t = None
        for name, arr in arrays.items():
            feat = self.dv if name == "v" else self.d
            fname = "dv" if name == "v" else "d"
            lead, lead_name = (self.batch_shape, "*batch_shape") if name == "q" or self._g == 1 else (
                self.kv_shape, "*batch_shape[:-1], kv_heads")
            if arr.ndim != len(lead) + 2 or arr.shape[: len(lead)] != lead or arr.shape[-1] != feat:
                raise ValueError(
                    f"{name} must have shape ({lead_name}, t, {fname}) = {lead + ('t', feat)}, got {arr.shape}"
                )
            if t is None:
                t = arr.shape[-2]
            elif arr.shape[-2] != t:
                raise ValueError(
                    f"q, k and v must hold the same number of tokens t (axis -2); got q {arrays['q'].shape}, "
                    f"k {arrays['k'].shape}, v {arrays['v'].shape}"
                )
        if t < 1:
            raise ValueError("q, k and v must hold at least one token (t >= 1), got t = 0")
        if any(arr.dtype != self.dtype for arr in arrays.values()):
            float_dtype(*arrays.items())  # TypeError for integer, bool or complex inputs
        out = []
        for name, arr in arrays.items():
            # q: the g query heads of each key/value head are adjacent (head h uses h // g)
            shape = (self._B, self._g, t, arr.shape[-1]) if name == "q" else (self._B, t, arr.shape[-1])
            arr = np.ascontiguousarray(arr, dtype=self.dtype).reshape(shape)
            if not arr.flags.writeable:  # Numba would compile every kernel again for read-only arrays
                arr = arr.copy()
            out.append(arr)
        if check_finite:
            _check_tokens_finite(out)
        if mask is None:
            valid = None
        else:
            valid = as_array(mask, mask_name)
            if valid.dtype != np.bool_:
                raise TypeError(f"{mask_name} must be a bool array (True = valid token), got dtype {valid.dtype}")
            lead, lead_name = (self.batch_shape, "*batch_shape") if self._g == 1 else (
                self.kv_shape, "*batch_shape[:-1], kv_heads")
            if valid.shape != lead + (t,):
                raise ValueError(f"{mask_name} must have shape ({lead_name}, t) = {lead + (t,)}, got {valid.shape}")
            valid = np.ascontiguousarray(valid).reshape(self._B, t)
            if not valid.flags.writeable:
                valid = valid.copy()
        return (*out, valid, t)

    def _one_token(self, q, k, v):
        """The kernel views of one token's ``q, k, v`` if they need no conversion, else None.

        A generation loop calls :meth:`step` once per token, where :meth:`_tokens`' general
        checks and conversions cost more than the kernel: ndarrays of the decoder's dtype,
        C-contiguous, writeable and of one token's exact shapes are taken as they are (the
        same views :meth:`_tokens` would return); anything else goes the general way, which
        converts it or names what is wrong.
        """
        if type(q) is not np.ndarray or type(k) is not np.ndarray or type(v) is not np.ndarray:
            return None
        shapes = self._one_token_shapes
        if (q.shape, k.shape, v.shape) != shapes[0]:
            return None
        dt = self.dtype
        if q.dtype != dt or k.dtype != dt or v.dtype != dt:
            return None
        for arr in (q, k, v):
            flags = arr.flags
            if not (flags.c_contiguous and flags.writeable):
                return None
        return q.reshape(shapes[1]), k.reshape(shapes[2]), v.reshape(shapes[3])

    def _finish(self, out, lse, t, return_lse):
        out = out.reshape(self.batch_shape + (t, self.dv))
        if return_lse:
            return out, lse.reshape(self.batch_shape + (t,))
        return out

    def _check_reach(self, t):
        if self._max_position is not None and self._position + t > self._max_position:
            raise ValueError(
                f"the LearnedCoarsening has {self._learned.n_levels} levels, which serve positions below "
                f"{self._max_position} with block_size={self.block_size}; {t} more tokens at position "
                f"{self._position} would pass it (give weights for more levels)"
            )

    # ------------------------------------------------------------------ public calls
    def prefill(self, q, k, v, *, key_padding_mask=None, return_lse=False, check_finite=True):
        """Take a prompt of ``t`` tokens in one call and return their outputs.

        On a fresh decoder this is one :func:`fmm_attention` (or :func:`exact_attention`)
        call for the outputs plus one O(t d) pass that builds the state, so a long prompt
        costs about one forward. On a decoder that already holds tokens it is :meth:`step`.

        Parameters
        ----------
        q, k : array_like, shape (batch_shape..., t, d)
        v : array_like, shape (batch_shape..., t, dv)
            With ``kv_heads``, ``k`` and ``v`` have the leading dims
            ``(*batch_shape[:-1], kv_heads)``.
        key_padding_mask : array_like of bool, shape (batch_shape..., t), optional
            ``True`` marks a valid token; invalid tokens are kept as padding (they take a
            position but no attention weight and no place in any coarse mean or count).
            With ``kv_heads``, of shape ``(*batch_shape[:-1], kv_heads, t)``.
        return_lse : bool, optional
            Also return each query's log-sum-exp, shape ``(*batch_shape, t)``.
        check_finite : bool, optional
            Reject NaN or infinity in ``q``, ``k``, ``v`` (default).

        Returns
        -------
        out : ndarray, shape (batch_shape..., t, dv)
        lse : ndarray, shape (batch_shape..., t)
            Only with ``return_lse=True``.
        """
        return_lse = check_bool(return_lse, "return_lse")
        qa, ka, va, valid, t = self._tokens(q, k, v, key_padding_mask, "key_padding_mask", check_finite)
        if self._position > 0:
            return self._append(qa, ka, va, valid, t, return_lse)
        from .api import exact_attention, fmm_attention

        lead, kv_lead = self.batch_shape, self.kv_shape
        user = [qa.reshape(lead + qa.shape[2:]), ka.reshape(kv_lead + ka.shape[1:]), va.reshape(kv_lead + va.shape[1:])]
        # the one-shot call's mask has the output's leading dims: each key head's, per query head
        mask = None if valid is None else np.repeat(valid, self._g, axis=0).reshape(lead + (t,))
        if self.method == "exact":
            out, lse = exact_attention(*user, causal=True, scale=self.scale, key_padding_mask=mask,
                                       return_lse=True, check_finite=False, backend="cpu")
            self._grow_cache(t)
            self._kv[:, :t], self._vv[:, :t] = ka, va
            self._ok[:, :t] = True if valid is None else valid
        else:
            self._check_reach(t)
            globals_now = self.global_tokens[self.global_tokens < t]
            out, lse = fmm_attention(
                *user, causal=True, block_size=self.block_size, rank=self.rank,
                coarsening=self._prompt_coarsening(t), count_scaling=self.count_scaling, scale=self.scale,
                key_padding_mask=mask, return_lse=True, check_finite=False, backend="cpu",
                global_tokens=globals_now if globals_now.size else None,
            )
            self._build_state(ka, va, valid, t, globals_now)
        self._position = t
        return self._finish(np.asarray(out), np.asarray(lse), t, return_lse)

    def step(self, q, k, v, *, valid=None, return_lse=False, check_finite=True):
        """Append the next ``t`` tokens (usually one) and return their outputs.

        Parameters
        ----------
        q, k : array_like, shape (batch_shape..., t, d)
        v : array_like, shape (batch_shape..., t, dv)
            With ``kv_heads``, ``k``, ``v`` and ``valid`` have the leading dims
            ``(*batch_shape[:-1], kv_heads)``.
        valid : array_like of bool, shape (batch_shape..., t), optional
            ``False`` appends a token as padding (no weight anywhere, later included).
        return_lse : bool, optional
            Also return each query's log-sum-exp, shape ``(*batch_shape, t)``.
        check_finite : bool, optional
            Reject NaN or infinity in ``q``, ``k``, ``v`` (default).

        Returns
        -------
        out : ndarray, shape (batch_shape..., t, dv)
            Token ``s`` gets row ``position + s`` of the one-shot causal forward.
        lse : ndarray, shape (batch_shape..., t)
            Only with ``return_lse=True``.
        """
        return_lse = check_bool(return_lse, "return_lse")
        one = self._one_token(q, k, v) if valid is None else None
        if one is None:
            qa, ka, va, valid, t = self._tokens(q, k, v, valid, "valid", check_finite)
        else:
            if check_bool(check_finite, "check_finite"):
                _check_tokens_finite(one)
            (qa, ka, va), t = one, 1
        return self._append(qa, ka, va, valid, t, return_lse)

    # ------------------------------------------------------------------ internals
    def _prompt_coarsening(self, t):
        """The coarsening of a one-shot call over ``t`` tokens (learned: its first levels)."""
        if self._learned is None:
            return "mean"
        from .tree import build_tree

        n_levels = build_tree(t, block_size=self.block_size, rank=self.rank, causal=True).n_levels
        c = self._learned
        if n_levels == c.n_levels:
            return c
        return LearnedCoarsening(c.key_weights[:n_levels], c.value_weights[:n_levels],
                                 c.key_bias[:n_levels], c.value_bias[:n_levels])

    def _append(self, q, k, v, valid, t, return_lse):
        kernels = _kernels()
        B, g, dt = self._B, self._g, self.dtype
        out = np.empty((B, g, t, self.dv), dtype=dt)
        lse = np.empty((B, g, t), dtype=dt)
        pos0 = self._position
        if valid is None:
            valid = self._all_valid(t)
        if self.method == "exact":
            self._grow_cache(pos0 + t)
            self._kv[:, pos0:pos0 + t], self._vv[:, pos0:pos0 + t], self._ok[:, pos0:pos0 + t] = k, v, valid
            n_chunks = max(1, min(4 * num_threads(), (pos0 + t) // _config.DECODE_EXACT_CHUNK_KEYS))
            work = B * g * t * (pos0 + t) * (self.d + self.dv)
            # one job (a single query over one chunk) has nothing to share: the parallel
            # launch would only add its cost
            parallel = work >= _config.DECODE_PARALLEL_MIN_WORK and B * g * t * n_chunks > 1
            kernel = kernels.exact_decode if parallel else kernels.exact_decode_serial
            part_max = np.empty((B, g, t, n_chunks), dtype=dt)
            part_sum = np.empty((B, g, t, n_chunks), dtype=dt)
            part_num = np.empty((B, g, t, n_chunks, self.dv), dtype=dt)
            kernel(q, self._kv, self._vv, self._ok, pos0, dt.type(self.scale), n_chunks,
                                 part_max, part_sum, part_num, out, lse)
        else:
            self._check_reach(t)
            end = pos0 + t
            if self._learned is None:
                self._grow_levels(self._levels_for(end))
            if self.global_tokens.size:
                self._grow_globals(end)
                positions = np.arange(pos0, end, dtype=np.int64)
                slots = np.searchsorted(self.global_tokens, positions)
                is_global = slots < self.global_tokens.size
                is_global[is_global] = self.global_tokens[slots[is_global]] == positions[is_global]
            else:  # the common case, on every step: no per-call arrays
                slots, is_global = self._no_globals(t)
            state = self._kernel_state()
            kernel = kernels.fma_decode_serial
            if B > 1:
                keys = 2 * self.block_size + self._gk.shape[1] + 2 * self.rank * self._n_levels
                work = B * g * t * keys * (self.d + self.dv)
                if self._learned is not None:
                    work += B * t * self.rank * self._n_levels * (self.d + self.dv)
                if work >= _config.DECODE_PARALLEL_MIN_WORK:
                    kernel = kernels.fma_decode
            kernel(q, k, v, valid, is_global, slots, pos0, *state, out, lse)
        self._position += t
        return self._finish(out, lse, t, return_lse)

    def _build_state(self, k, v, valid, n, globals_now):
        """The state after a prompt of ``n`` tokens on a fresh decoder (no outputs)."""
        kernels = _kernels()
        B, m, p, dt = self._B, self.block_size, self.rank, self.dtype
        ok = np.ones((B, n), dtype=np.bool_) if valid is None else valid
        cvalid = ok.copy()
        cvalid[:, globals_now] = False
        # near ring: position j in slot j % 2m
        ring = 2 * m
        last = np.arange(max(0, n - ring), n)
        self._near_k[:, last % ring] = k[:, last]
        self._near_v[:, last % ring] = v[:, last]
        self._near_ok[:, last % ring] = ok[:, last]
        self._near_cv[:, last % ring] = cvalid[:, last]
        self._grow_globals(n)
        self._gk[:, : globals_now.size] = k[:, globals_now]
        self._gv[:, : globals_now.size] = v[:, globals_now]
        self._gok[:, : globals_now.size] = ok[:, globals_now]
        has_mask = bool(globals_now.size) or valid is not None
        if self._learned is None:
            n_levels = self._levels_for(n)
            self._grow_levels(n_levels)
            if n_levels == 0:
                return
            from .cpu.upward import mean_upward

            widths = [m << lv for lv in range(n_levels)]
            ranks = [min(p, w) for w in widths]
            n_rows = np.array([(n // w) * r for w, r in zip(widths, ranks)], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(n_rows)[:-1]]).astype(np.int64)
            sub_sizes = np.array([w // r for w, r in zip(widths, ranks)], dtype=np.int64)
            total = int(n_rows.sum())
            kc = np.zeros((B, total, self.d), dtype=dt)
            vc = np.zeros((B, total, self.dv), dtype=dt)
            cbias = np.full((B, total), -np.inf, dtype=dt)
            counts = np.zeros((B, total), dtype=dt)
            mask = cvalid if has_mask else np.zeros((1, 1), dtype=np.bool_)
            mean_upward(k, v, mask, has_mask, sub_sizes, offsets, n_rows, self.count_scaling, kc, vc, cbias, counts)
            for lv, (w, r) in enumerate(zip(widths, ranks)):
                n_done = n // w
                for c in range(max(0, n_done - 4), n_done):
                    rows = slice(offsets[lv] + c * r, offsets[lv] + (c + 1) * r)
                    self._ck[:, lv, c & 3, :r] = kc[:, rows]
                    self._cv[:, lv, c & 3, :r] = vc[:, rows]
                    self._cb[:, lv, c & 3, :r] = cbias[:, rows]
                    self._cn[:, lv, c & 3, :r] = counts[:, rows]
            return
        mask = cvalid if has_mask else np.zeros((1, 1), dtype=np.bool_)
        kw, vw, kb, vb = self._learned.level_arrays(dt)
        for lv in range(self._learned.n_levels):
            w = m << lv
            r = min(p, w)
            ring_k = np.zeros((B, 4, p, self.d), dtype=dt)
            ring_v = np.zeros((B, 4, p, self.dv), dtype=dt)
            acc_k = np.zeros((B, p, self.d), dtype=dt)
            acc_v = np.zeros((B, p, self.dv), dtype=dt)
            kernels.learned_prefill_level(k, mask, has_mask, np.ascontiguousarray(kw[lv].T), np.array(kb[lv]), w, r, n,
                                          ring_k, acc_k)
            kernels.learned_prefill_level(v, mask, has_mask, np.ascontiguousarray(vw[lv].T), np.array(vb[lv]), w, r, n,
                                          ring_v, acc_v)
            n_done = n // w
            box_counts = np.add.reduceat(cvalid.astype(np.int64), np.arange(0, n, w), axis=1)
            for c in range(max(0, n_done - 4), n_done):
                count = box_counts[:, c]
                empty = count == 0
                self._ck[:, lv, c & 3, :r] = np.where(empty[:, None, None], 0, ring_k[:, c & 3, :r])
                self._cv[:, lv, c & 3, :r] = np.where(empty[:, None, None], 0, ring_v[:, c & 3, :r])
                with np.errstate(divide="ignore"):
                    bias = np.log(count / r) if self.count_scaling else np.zeros(B)
                self._cb[:, lv, c & 3, :r] = np.where(empty, -np.inf, bias)[:, None]
                self._cn[:, lv, c & 3, :r] = count[:, None]
            if n % w:
                self._acck[:, lv, :r] = acc_k[:, :r]
                self._accv[:, lv, :r] = acc_v[:, :r]
                self._accn[:, lv] = box_counts[:, n_done]
