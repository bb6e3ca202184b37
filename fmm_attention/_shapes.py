"""Shape resolution: broadcast leading dims, grouped heads, query positions, masks.

One place turns the caller's shapes into what the kernels index, for every public
function (``shared/spec/shapes-and-decoding.md``):

* ``q`` (..., Hq, n_q, d), ``k`` (..., Hk, n_k, d), ``v`` (..., Hk, n_k, dv). The dims
  before the head axis broadcast by NumPy's rules; ``Hq = g * Hk`` groups the query heads,
  query head ``h`` reading key/value head ``h // g``. No array is copied to do either:
  each output entry ``b`` of the flattened output lead gets the flat index of its query
  row set (``q_index[b]``) and of its key/value set (``kv_index[b]``), and the kernels
  index with them.
* Query ``i`` sits at position ``query_offset + i`` of the key sequence; the offset
  defaults to ``n_k - n_q`` (causal attention aligned to the end of the keys).
* Pairwise masks and biases (..., n_q, n_k) are read where they lie: a flat view of the
  caller's buffer, an element offset per output entry and a stride per query and per key
  (0 along a broadcast axis). Nothing of size ``n_q * n_k`` is made unless the caller
  passed it.

The result is a :class:`ShapedBatch`, a :class:`~fmm_attention._validate.Batch` whose
``q``, ``k``, ``v`` keep their own (smaller) batch sizes.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import numpy as np

from ._validate import Batch, as_array, check_bool, check_finite_array, check_scale, float_dtype

__all__ = ["Layout", "PairTerm", "ShapedBatch", "as_shaped", "attention_inputs", "check_window", "pair_term",
           "resolve"]


@dataclass(frozen=True)
class Layout:
    """The resolved shapes of one call (no data).

    Attributes
    ----------
    lead_shape : tuple
        The output's leading dims (broadcast pre-head dims, then the query heads).
    n_q, n_k, d, dv : int
    groups : int
        ``g`` of grouped heads (1 without grouping).
    q_index, kv_index : ndarray of int64, shape (B,)
        For each flattened output entry, the flat index of its ``q`` rows and of its
        ``k``/``v`` rows (``B`` = the product of ``lead_shape``).
    q_lead, k_lead : tuple
        The leading dims of ``q`` and of ``k``/``v`` as given.
    query_offset : int
        Position of query 0 in the key sequence.
    offset_given : bool
        Whether the caller passed ``query_offset``.
    broadcasts : bool
        Whether a leading dim of ``q`` or ``k`` is broadcast (grouping aside).
    """

    lead_shape: tuple
    n_q: int
    n_k: int
    d: int
    dv: int
    groups: int
    q_index: np.ndarray
    kv_index: np.ndarray
    q_lead: tuple
    k_lead: tuple
    query_offset: int
    offset_given: bool
    broadcasts: bool = False

    @property
    def size(self):
        """Number of output entries ``B``."""
        return int(self.q_index.shape[0])

    @property
    def cross(self):
        """Whether queries and keys differ in length or the queries are offset."""
        return self.n_q != self.n_k or self.query_offset != 0

    def features(self):
        """The shape features this call uses, as backends declare them (``"broadcast"``,
        ``"grouped_heads"``, ``"cross_lengths"``)."""
        used = set()
        if self.groups > 1:
            used.add("grouped_heads")
        if self.broadcasts:
            used.add("broadcast")
        if self.cross:
            used.add("cross_lengths")
        return frozenset(used)


def _check_offset(query_offset):
    if query_offset is None:
        return None
    if isinstance(query_offset, (bool, np.bool_)) or not isinstance(query_offset, numbers.Integral):
        raise TypeError(f"query_offset must be an integer or None, got {query_offset!r}")
    return int(query_offset)


def _broadcast(shapes, what):
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ValueError(f"{what} do not broadcast: " + ", ".join(map(str, shapes))) from None


def resolve(q_shape, k_shape, v_shape, *, causal=False, query_offset=None, positions=False, same_length=False):
    """Resolve the shapes of a call into a :class:`Layout`, or raise naming the argument.

    Layouts are cached by their arguments (a model calls with a few shapes, and resolving
    costs tens of microseconds of a small call); their index arrays are read-only.

    Parameters
    ----------
    q_shape, k_shape, v_shape : tuple
    causal : bool
        Causal attention: with ``n_q > n_k`` it needs an explicit ``query_offset``.
    query_offset : int or None
    positions : bool
        Whether the call places queries in the key sequence (FMA): every position
        ``query_offset + i`` must then lie in ``[0, n_k)``.
    same_length : bool
        The function needs ``n_q == n_k`` and no offset (Fastformer).

    Returns
    -------
    Layout
    """
    offset = _check_offset(query_offset)  # before the cache: an unhashable offset is a TypeError naming it
    return _resolve(tuple(q_shape), tuple(k_shape), tuple(v_shape), bool(causal), offset, bool(positions),
                    bool(same_length))


@functools.lru_cache(maxsize=256)
def _resolve(q_shape, k_shape, v_shape, causal, offset, positions, same_length):
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., n, features), got shape {shape}")
    n_q, d = q_shape[-2:]
    n_k, d_k = k_shape[-2:]
    n_v, dv = v_shape[-2:]
    if n_v != n_k:
        raise ValueError(f"k and v must have the same sequence length n_k (axis -2); got k {k_shape}, v {v_shape}")
    if same_length and n_q != n_k:
        raise ValueError(
            f"q, k and v must have the same sequence length n (axis -2); got q {q_shape}, k {k_shape}, v {v_shape}"
        )
    if d != d_k:
        raise ValueError(f"q and k must have the same feature dim d; got q {q_shape}, k {k_shape}")
    if n_q < 1 or n_k < 1:
        raise ValueError("the sequence length n must be at least 1, got an empty sequence "
                         f"(q {q_shape}, k {k_shape})")
    if d < 1 or dv < 1:
        raise ValueError(f"feature dims must be at least 1; got d={d}, dv={dv}")
    q_lead, k_lead = tuple(q_shape[:-2]), tuple(k_shape[:-2])
    if k_lead != tuple(v_shape[:-2]):
        raise ValueError(f"k and v must have the same leading dims; got k {k_shape}, v {v_shape}")
    groups = 1
    k_heads = k_lead  # k's lead as seen by the queries: grouping repeats its head indices
    if len(q_lead) >= 1 and len(k_lead) >= 1 and q_lead[-1] != k_lead[-1] and 1 not in (q_lead[-1], k_lead[-1]):
        hq, hk = q_lead[-1], k_lead[-1]
        if hq % hk:
            raise ValueError(
                f"q and k leading dims: the number of query heads Hq = {hq} (q axis -3) must be a multiple of "
                f"the key/value heads Hk = {hk} (k axis -3) for grouped heads; got q {q_shape}, k {k_shape}"
            )
        groups = hq // hk
        k_heads = k_lead[:-1] + (hq,)
    lead = _broadcast([q_lead, k_heads], "the leading dims of q and k (grouped heads aside)")
    q_ids = np.broadcast_to(np.arange(_prod(q_lead), dtype=np.int64).reshape(q_lead), lead)
    k_ids = np.arange(_prod(k_lead), dtype=np.int64).reshape(k_lead)
    if groups > 1:
        k_ids = np.repeat(k_ids, groups, axis=-1)  # indices only: query head h reads key head h // g
    k_ids = np.broadcast_to(k_ids, lead)
    given = offset is not None
    if same_length and given and offset != 0:
        raise ValueError(f"query_offset must be 0 or None here, got {offset}")
    if given:
        if offset < 0 or offset + n_q > n_k:
            raise ValueError(
                f"query_offset must place every query inside the keys: 0 <= query_offset <= n_k - n_q = "
                f"{n_k - n_q}; got query_offset={offset} (n_q = {n_q}, n_k = {n_k})"
            )
    else:
        offset = n_k - n_q
        if offset < 0 and (causal or positions):
            raise ValueError(
                f"n_q = {n_q} queries exceed the n_k = {n_k} keys with "
                f"{'causal=True' if causal else 'query positions'}: causal queries are aligned to the end of "
                "the keys, so the first ones would sit before the first key; pass query_offset "
                f"(0 <= query_offset <= n_k - n_q) or at most n_k queries"
            )
    # read-only whether broadcasting copied them or not: shared by every call of these
    # shapes, and one kernel variant either way (cpu/_jit.py)
    q_index = np.array(q_ids, dtype=np.int64).reshape(-1)
    kv_index = np.array(k_ids, dtype=np.int64).reshape(-1)
    q_index.setflags(write=False)
    kv_index.setflags(write=False)
    return Layout(lead, n_q, n_k, d, dv, groups, q_index, kv_index, q_lead, k_lead, offset, given,
                  q_lead != lead or k_heads != lead)


def _prod(shape):
    return math.prod(int(x) for x in shape)  # np.prod costs microseconds per call on a tuple


@dataclass(frozen=True)
class PairTerm:
    """A pairwise mask or bias read in place: ``value[b, i, j] = flat[offset[b] + i * si + j * sj]``.

    Attributes
    ----------
    flat : ndarray, 1-D
        A view of the caller's buffer (or of its cast), never broadcast into a new array.
    offset : ndarray of int64, shape (B,)
        Element offset of each output entry's ``(n_q, n_k)`` slice.
    si, sj : int
        Element strides along the queries and the keys (0 where the caller's axis is 1).
    """

    flat: np.ndarray
    offset: np.ndarray
    si: int
    sj: int

    @staticmethod
    def empty(dtype, size):
        """The placeholder of an absent term (one element, offsets 0).

        Cached: every call of one size shares it. Its arrays stay writeable, like those of
        a real term (Numba compiles one kernel variant per writeable flag), and the kernels
        only read them.
        """
        return _empty_term(np.dtype(dtype), size)


@functools.lru_cache(maxsize=64)
def _empty_term(dtype, size):
    fill = True if dtype == np.bool_ else 0
    return PairTerm(np.full(1, fill, dtype=dtype), np.zeros(size, dtype=np.int64), 0, 0)


def _flat_view(arr):
    """``(flat, element strides)`` of ``arr``: a 1-D view from its first to its last element.

    Every element of a strided view with non-negative strides lies between those two in
    the buffer, so the 1-D view is in bounds. Other layouts (negative or odd strides) are
    copied, as are read-only buffers (Numba would compile a second kernel variant for them).
    """
    item = arr.itemsize
    if (not arr.flags.writeable or any(s < 0 or s % item for s in arr.strides)) or arr.size == 0:
        arr = np.ascontiguousarray(arr)
        arr = arr if arr.flags.writeable else arr.copy()
    strides = tuple(0 if size == 1 else s // item for s, size in zip(arr.strides, arr.shape))
    extent = 1 + sum((size - 1) * s for size, s in zip(arr.shape, strides))
    flat = np.lib.stride_tricks.as_strided(arr, shape=(extent,), strides=(item,), writeable=True)
    return flat, strides


def pair_term(value, name, layout, *, dtype=None):
    """Validate a pairwise ``attn_mask`` (bool) or ``attn_bias`` (float) into a :class:`PairTerm`.

    Parameters
    ----------
    value : array_like or None
    name : str
        ``"attn_mask"`` or ``"attn_bias"``.
    layout : Layout
    dtype : numpy.dtype, optional
        The computation dtype (biases are cast to it; ``None`` for the bool mask).

    Returns
    -------
    PairTerm or None
    """
    if value is None:
        return None
    arr = as_array(value, name)
    if dtype is None:
        if arr.dtype != np.bool_:
            raise TypeError(f"{name} must be a bool array (True = may attend), got dtype {arr.dtype}; "
                            "pass float additive terms as attn_bias")
    else:
        if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
            raise TypeError(f"{name} must be a real floating array (added to the logits), got dtype {arr.dtype}; "
                            "pass a bool mask as attn_mask")
        if arr.dtype != dtype:
            arr = arr.astype(dtype)
        if np.isnan(arr).any() or np.isposinf(arr).any():
            raise ValueError(f"{name} contains NaN or +inf (-inf is allowed: it masks the pair)")
    full = layout.lead_shape + (layout.n_q, layout.n_k)
    if arr.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., n_q, n_k) broadcastable to {full}, got {arr.shape}")
    try:
        fits = np.broadcast_shapes(arr.shape, full) == full
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{name} of shape {arr.shape} does not broadcast to (..., Hq, n_q, n_k) = {full}")
    arr = arr.reshape((1,) * (len(full) - arr.ndim) + arr.shape)
    flat, strides = _flat_view(arr)
    lead = layout.lead_shape
    offset = np.zeros(lead, dtype=np.int64)
    for axis, size in enumerate(lead):
        if arr.shape[axis] != 1:
            shape = [1] * len(lead)
            shape[axis] = size
            offset = offset + np.arange(size, dtype=np.int64).reshape(shape) * strides[axis]
    return PairTerm(flat, np.ascontiguousarray(np.broadcast_to(offset, lead)).reshape(-1), strides[-2], strides[-1])


def check_window(window):
    """``window=(left, right)`` as two ints ``>= 0`` (``None`` entries: unbounded), or ``None``."""
    if window is None:
        return None
    try:
        left, right = window
    except (TypeError, ValueError):
        raise TypeError(f"window must be a pair (left, right) of integers >= 0 or None, got {window!r}") from None
    sides = []
    for side, x in (("left", left), ("right", right)):
        if x is None:
            sides.append(None)
            continue
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
            raise TypeError(f"window {side} must be an integer >= 0 or None, got {x!r}")
        if x < 0:
            raise ValueError(f"window {side} must be >= 0, got {int(x)}")
        sides.append(int(x))
    return tuple(sides)


@dataclass(frozen=True)
class ShapedBatch(Batch):
    """A :class:`~fmm_attention._validate.Batch` with its own batch size for ``q`` and ``k``/``v``.

    Attributes
    ----------
    q : ndarray, shape (Bq, n_q, d)
    k, v : ndarray, shape (Bk, n_k, d), (Bk, n_k, dv)
    valid : ndarray of bool, shape (Bk, n_k), or None
        A key row that some output entry may read (the finiteness check and the zeroing
        of masked values use it).
    layout : Layout
    pad : ndarray of bool, shape (B, n_k), or None
        Key validity of each output entry (``key_padding_mask`` broadcast; small).
    """

    layout: Layout = None
    pad: np.ndarray | None = None

    @property
    def n_k(self):
        return self.k.shape[1]

    @property
    def size(self):
        """Number of output entries (the flattened output lead)."""
        return self.layout.size

    def key_validity(self):
        """``(Bk, n_k)`` validity of the key rows when every output entry reading a key row
        sees the same mask (so coarse keys can be shared by a group), else ``None``."""
        if self.pad is None:
            return None
        shared = self.valid[self.layout.kv_index]
        return self.valid if np.array_equal(shared, self.pad) else None


def as_shaped(batch):
    """A plain :class:`Batch` (one ``q``, ``k``, ``v`` row set per entry) as a :class:`ShapedBatch`."""
    if isinstance(batch, ShapedBatch):
        return batch
    B, n = batch.q.shape[:2]
    ids = np.arange(B, dtype=np.int64)
    layout = Layout(batch.lead_shape, n, n, batch.d, batch.dv, 1, ids, ids, batch.lead_shape, batch.lead_shape, 0,
                    False)
    return ShapedBatch(batch.q, batch.k, batch.v, batch.valid, batch.lead_shape, batch.dtype, batch.scale,
                       layout=layout, pad=batch.valid)


def attention_inputs(q, k, v, *, scale, key_padding_mask, check_finite, skip_masked=False, causal=False,
                     query_offset=None, positions=False, same_length=False):
    """Validate ``q, k, v`` and the key mask into a :class:`ShapedBatch` (see :func:`resolve`).

    Arrays are made C-contiguous and writeable in the kernel dtype, each at its own size:
    broadcasting and grouped heads copy nothing. The inputs are never written to.
    """
    check_finite = check_bool(check_finite, "check_finite")
    arrays = {"q": as_array(q, "q"), "k": as_array(k, "k"), "v": as_array(v, "v")}
    layout = resolve(arrays["q"].shape, arrays["k"].shape, arrays["v"].shape, causal=causal,
                     query_offset=query_offset, positions=positions, same_length=same_length)
    dtype = float_dtype(*arrays.items())
    pad = padding_masks(key_padding_mask, layout)
    valid = None
    if pad is not None:
        valid = np.zeros((_prod(layout.k_lead), layout.n_k), dtype=np.bool_)
        np.logical_or.at(valid, layout.kv_index, pad)  # a key row some entry may read
    out = {}
    for name, arr in arrays.items():
        lead = layout.q_lead if name == "q" else layout.k_lead
        arr = np.ascontiguousarray(arr, dtype=dtype).reshape(_prod(lead), arr.shape[-2], arr.shape[-1])
        if not arr.flags.writeable:
            arr = arr.copy()  # read-only arrays are a second Numba type: see _validate.attention_inputs
        if check_finite:
            # q rows are tokens of the key sequence only in self-attention of one shape
            aligned = name != "q" or (layout.q_lead == layout.k_lead and layout.n_q == layout.n_k)
            check_finite_array(arr, name, valid if (skip_masked and aligned) else None)
        out[name] = arr
    return ShapedBatch(out["q"], out["k"], out["v"], valid, layout.lead_shape, dtype, check_scale(scale, layout.d),
                       layout=layout, pad=pad)


def padding_masks(key_padding_mask, layout):
    """``key_padding_mask`` (..., n_k), broadcast to every output entry: ``(B, n_k)`` bool or ``None``."""
    if key_padding_mask is None:
        return None
    mask = as_array(key_padding_mask, "key_padding_mask")
    if mask.dtype != np.bool_:
        raise TypeError(f"key_padding_mask must be a bool array (True = valid key), got dtype {mask.dtype}")
    want = layout.lead_shape + (layout.n_k,)
    try:
        fits = mask.ndim >= 1 and np.broadcast_shapes(mask.shape, want) == want
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"key_padding_mask must have shape (..., n_k) broadcastable to {want} (the output's leading dims, "
            f"then n_k; size-1 head or batch axes broadcast), got {mask.shape}"
        )
    # always a copy (n_k bytes per sequence): a mask of the full shape would otherwise pass
    # as a read-only broadcast view and compile every kernel a second time (see as_shaped)
    return np.array(np.broadcast_to(mask, want), order="C").reshape(layout.size, layout.n_k)


def _shape_of(x, name):
    shape = getattr(x, "shape", None)
    if shape is None and hasattr(x, "__cuda_array_interface__"):
        # device objects that expose nothing else (a host conversion would refuse them)
        shape = x.__cuda_array_interface__["shape"]
    return tuple(shape) if shape is not None else as_array(x, name).shape


def call_features(q, k, v, *, causal=False, query_offset=None, positions=False, same_length=False, **pairwise):
    """The shape features of a call (checked against the backend before any array is read).

    Parameters
    ----------
    q, k, v : array_like
        Only their shapes are read.
    causal, query_offset, positions, same_length
        As for :func:`resolve`.
    **pairwise
        ``attn_mask``, ``attn_bias``, ``window``, ``per_sequence_global_tokens``: each
        counts when not ``None`` / ``False``.

    Returns
    -------
    frozenset of str
        Keys of :data:`fmm_attention.backends.SHAPE_FEATURES`.
    """
    layout = resolve(_shape_of(q, "q"), _shape_of(k, "k"), _shape_of(v, "v"), causal=causal,
                     query_offset=query_offset, positions=positions, same_length=same_length)
    return layout.features() | {name for name, value in pairwise.items() if value is not None and value is not False}


def materialise(batch):
    """A plain :class:`Batch` with one ``q``, ``k``, ``v`` row set per output entry.

    For kernels that index no row sets (Fastformer): broadcast rows are copied, once.
    A batch that broadcasts nothing is returned as it is.
    """
    layout = batch.layout
    B = layout.size
    ids = np.arange(B, dtype=np.int64)
    q = batch.q if np.array_equal(layout.q_index, ids) else batch.q[layout.q_index]
    same_k = np.array_equal(layout.kv_index, ids)
    k = batch.k if same_k else batch.k[layout.kv_index]
    v = batch.v if same_k else batch.v[layout.kv_index]
    return Batch(q, k, v, batch.pad, batch.lead_shape, batch.dtype, batch.scale)


def key_sets(per_entry, layout, name):
    """Per key/value set values from per-output-entry ones, which must agree within a set.

    FMA coarsens each key/value set once, so what shapes its coarse keys (the key mask,
    the global tokens) must be the same for every output entry reading that set (every
    query head of a group, every batch entry a broadcast key set serves).

    Parameters
    ----------
    per_entry : ndarray (B, ...) or list of B tuples
    layout : Layout
    name : str
        The argument, for the error.

    Returns
    -------
    ndarray or list
        One row (or tuple) per key/value set.
    """
    _, first = np.unique(layout.kv_index, return_index=True)
    if isinstance(per_entry, np.ndarray):
        shared = per_entry[first]
        differs = np.flatnonzero((shared[layout.kv_index] != per_entry).reshape(layout.size, -1).any(axis=1))
    else:
        shared = [per_entry[i] for i in first]
        differs = [b for b, kb in enumerate(layout.kv_index) if per_entry[b] != shared[kb]]
    if len(differs):
        b = int(differs[0])
        kb = int(layout.kv_index[b])
        raise ValueError(
            f"{name} must be the same for every output entry that reads one key/value set (the query heads of a "
            f"group, the batch entries a broadcast k serves): FMA coarsens each key set once; output entries "
            f"{int(first[kb])} and {b} read key set {kb} with different {name}. Give {name} a size-1 axis "
            "there, or broadcast k and v explicitly"
        )
    return shared


def per_sequence_globals(global_tokens):
    """Whether ``global_tokens`` is a per-sequence form (a bool array, or ints with ``ndim >= 2``)."""
    if global_tokens is None or isinstance(global_tokens, (tuple, list, range)) and not any(
            isinstance(x, (tuple, list, np.ndarray)) for x in global_tokens):
        return False
    arr = np.asarray(global_tokens)
    return arr.dtype == np.bool_ or arr.ndim >= 2


def global_token_sets(global_tokens, layout, pad):
    """Per-sequence ``global_tokens`` as one sorted tuple of indices per output entry.

    An int array broadcastable to ``(..., g)`` or a bool array broadcastable to
    ``(..., n_k)`` (True = global). An index at or past ``n_k``, or at a key that
    ``key_padding_mask`` marks invalid, is ignored for that sequence only, so padded
    rows of an index table may hold any such filler.
    """
    arr = as_array(global_tokens, "global_tokens")
    lead, n_k = layout.lead_shape, layout.n_k
    if arr.dtype == np.bool_:
        want = lead + (n_k,)
        try:
            fits = arr.ndim >= 1 and np.broadcast_shapes(arr.shape, want) == want
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"global_tokens as a bool array must broadcast to {want} (..., n_k), got {arr.shape}")
        flags = np.broadcast_to(arr, want).reshape(layout.size, n_k)
    else:
        if arr.dtype.kind not in "iu":
            raise TypeError(f"global_tokens must hold integer token indices or bools, got dtype {arr.dtype}")
        try:
            idx = np.broadcast_to(arr, np.broadcast_shapes(arr.shape[:-1], lead) + arr.shape[-1:])
        except ValueError:
            raise ValueError(f"global_tokens of shape {arr.shape} does not broadcast to (..., g) with leading dims "
                             f"{lead}") from None
        if idx.shape[:-1] != lead:
            raise ValueError(f"global_tokens of shape {arr.shape} does not broadcast to (..., g) with leading dims "
                             f"{lead}")
        if idx.size and idx.min() < 0:
            raise ValueError(f"global_tokens must be >= 0, got {int(idx.min())}")
        idx = idx.reshape(layout.size, -1)
        flags = np.zeros((layout.size, n_k), dtype=np.bool_)
        rows, cols = np.nonzero(idx < n_k)
        flags[rows, idx[rows, cols]] = True
    if pad is not None:
        flags = flags & pad
    return [tuple(int(j) for j in np.flatnonzero(row)) for row in flags]


def square_problem(batch, g, lse, delta, *, causal):
    """Exact attention's backward on a :class:`ShapedBatch` as self-attention of one shape.

    The backward kernels take one ``q``, ``k``, ``v`` row set per entry and ``n_q = n_k``.
    Row sets are gathered per output entry, and the queries are embedded at their key
    positions (``query_offset + i``) in a sequence of ``N = max(n_k, n_q)`` rows; the other
    rows carry ``g = 0``, ``delta = 0`` and ``lse = -inf``, so every weight of theirs is 0
    and they add nothing. Without ``causal`` and with ``n_q > n_k`` the keys are padded with
    invalid ones instead.

    Returns
    -------
    square : Batch
    g, lse, delta : ndarray
        Embedded ``(B, N, dv)``, ``(B, N)``, ``(B, N)``.
    rows : slice
        The query rows of the square problem.
    """
    layout = batch.layout
    B, n_q, n_k = layout.size, layout.n_q, layout.n_k
    q, k, v = batch.q[layout.q_index], batch.k[layout.kv_index], batch.v[layout.kv_index]
    valid = batch.pad
    if n_q == n_k and layout.query_offset == 0:
        return Batch(q, k, v, valid, layout.lead_shape, batch.dtype, batch.scale), g, lse, delta, slice(0, n_q)
    N = max(n_k, n_q)
    start = layout.query_offset if causal else 0
    rows = slice(start, start + n_q)

    def embed(x, length, at, fill=0):
        full = np.full((B, length) + x.shape[2:], fill, dtype=x.dtype)
        full[:, at] = x
        return full

    if N > n_k:  # more queries than keys (not causal): invalid keys pad the key sequence
        k, v = embed(k, N, slice(0, n_k)), embed(v, N, slice(0, n_k))
        valid = embed(np.ones((B, n_k), np.bool_) if valid is None else valid, N, slice(0, n_k), fill=False)
    q = embed(q, N, rows)
    square = Batch(q, k, v, valid, layout.lead_shape, batch.dtype, batch.scale)
    return square, embed(g, N, rows), embed(lse, N, rows, fill=-np.inf), embed(delta, N, rows), rows


def reduce_to_inputs(batch, dq, dk, dv, rows):
    """Gradients of the square problem back to the caller's ``q``, ``k``, ``v`` shapes:
    query rows taken, key padding dropped, and sums over the output entries that read one
    row set (a group of query heads, a broadcast batch), in entry order."""
    layout = batch.layout
    n_k = layout.n_k
    out = []
    for grad, index, lead in ((dq[:, rows], layout.q_index, layout.q_lead),
                              (dk[:, :n_k], layout.kv_index, layout.k_lead),
                              (dv[:, :n_k], layout.kv_index, layout.k_lead)):
        size = _prod(lead)
        entries = index.tolist()
        if entries == list(range(size)):  # one entry per row set: nothing to sum
            out.append(np.ascontiguousarray(grad).reshape(lead + grad.shape[1:]))
            continue
        # entry by entry in index order, as np.add.at adds (which took 12 ms for three
        # (4096, 64) float32 gradients of one entry: a per-element loop)
        total = np.zeros((size,) + grad.shape[1:], dtype=grad.dtype)
        for entry, target in enumerate(entries):
            total[target] += grad[entry]
        out.append(total.reshape(lead + grad.shape[1:]))
    return out
