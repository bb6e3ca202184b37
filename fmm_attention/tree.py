"""The FMA tree: padding, levels, boxes, interaction lists and the per-block key plan.

A tree depends only on ``(n, block_size, rank, causal)``, never on the data, so it is
built once and cached. Every backend executes the same plan, which is what makes the CPU
and CUDA results agree to rounding.

Conventions (:doc:`/semantics`): the sequence is right-padded to
``N = m * 2**k`` with ``k >= 2``; far levels ``l = 1 .. L = log2(N/m) - 1`` have boxes of
``w_l = m * 2**(l-1)`` tokens, each summarised by ``r_l = min(p, w_l)`` coarse keys (one per
aligned sub-box of ``w_l / r_l`` tokens).
"""

from __future__ import annotations

import collections
import functools
import os
import threading
from dataclasses import dataclass

import numpy as np

from . import _config
from ._threads import num_threads
from ._validate import check_bool, check_power_of_two
from .coarsening import as_coarsening

__all__ = ["FMMTree", "Level", "build_tree", "padded_length"]

#: Segment kinds in a key plan: exact tokens of ``k``/``v``, or rows of the coarse buffers.
TOKEN, COARSE = 0, 1


class LRUCache:
    """A least-recently-used cache of ``build(*key)`` whose size is a ``_config`` knob.

    Unlike ``functools.lru_cache`` the size is read from ``_config`` at every insertion, so
    a change of the knob takes effect at the next call (0 caches nothing).

    Parameters
    ----------
    build : callable
        Computes the value of a key (positional arguments).
    size_knob : str
        The name of the size in :mod:`fmm_attention._config`.
    """

    def __init__(self, build, size_knob):
        self.build = build
        self.size_knob = size_knob
        self._data = collections.OrderedDict()
        self._lock = threading.Lock()
        functools.update_wrapper(self, build)

    def __call__(self, *key):
        """The value of ``key``, built on a miss."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = self.build(*key)
        with self._lock:
            self._data[key] = value
            size = max(0, int(getattr(_config, self.size_knob)))
            while len(self._data) > size:
                self._data.popitem(last=False)
        return value

    def keys(self):
        """The cached keys, least recently used first."""
        with self._lock:
            return list(self._data)

    def cache_clear(self):
        """Drop every cached value."""
        with self._lock:
            self._data.clear()


def effective_block_size(n, block_size):
    """``block_size``, or the smallest power of two ``>= n`` where that is smaller.

    A block at least as long as the sequence puts every key in the near field (exact
    attention); any larger block gives the same function, only with a larger padded
    length and larger buffers, so the tree never uses more.
    """
    return min(int(block_size), 1 << max(0, int(n) - 1).bit_length())


def padded_length(n, block_size):
    """The padded length of a sequence: the smallest ``N = block_size * 2**k >= n`` with ``k >= 2``.

    Parameters
    ----------
    n : int
        Sequence length.
    block_size : int
        Finest box size ``m``, a power of two.

    Returns
    -------
    int
        ``N``; at least ``4 * block_size``.

    Examples
    --------
    >>> from fmm_attention.tree import padded_length
    >>> padded_length(100, 8), padded_length(10, 8)
    (128, 32)
    """
    length = 4 * block_size
    while length < n:
        length *= 2
    return length


def _interactions(n_boxes, causal):
    """The far-field interaction list of every box ``0 .. n_boxes-1`` at one level.

    Bidirectional: even ``b`` sees ``b-2, b+2, b+3``; odd ``b`` sees ``b-3, b-2, b+2``.
    Causal: even ``b`` sees ``b-2``; odd ``b`` sees ``b-3, b-2``. Boxes outside the level
    are dropped and each list is left-packed in this order, ``-1`` filling the rest:
    shape ``(n_boxes, 3)``.
    """
    b = np.arange(n_boxes, dtype=np.int64)
    even = b % 2 == 0
    if causal:
        listed = np.stack([np.where(even, b - 2, b - 3), np.where(even, -1, b - 2)], axis=1)
    else:
        listed = np.stack([np.where(even, b - 2, b - 3), np.where(even, b + 2, b - 2), np.where(even, b + 3, b + 2)], axis=1)
    listed[(listed < 0) | (listed >= n_boxes)] = -1
    order = np.argsort(listed < 0, axis=1, kind="stable")  # keep the list order, -1 last
    packed = np.full((n_boxes, 3), -1, dtype=np.int64)
    packed[:, : listed.shape[1]] = np.take_along_axis(listed, order, axis=1)
    return packed


@dataclass(frozen=True)
class Level:
    """One far level of the tree.

    Attributes
    ----------
    index : int
        Level number ``l`` (1 = finest far level).
    box_size : int
        Tokens per box, ``w_l = m * 2**(l-1)``.
    n_boxes : int
        Boxes covering the padded length, ``N / w_l``.
    rank : int
        Coarse keys per box, ``r_l = min(p, w_l)``.
    sub_box_size : int
        Tokens summarised by one coarse key, ``w_l / r_l``.
    offset : int
        First row of this level in the coarse buffers (row of box ``c``, slot ``t``:
        ``offset + c * rank + t``).
    interactions : ndarray of int64, shape (n_boxes, 3)
        Far boxes seen by each box at this level, ``-1`` where the list is shorter or a box
        falls outside ``[0, n_boxes)``.
    """

    index: int
    box_size: int
    n_boxes: int
    rank: int
    sub_box_size: int
    offset: int
    interactions: np.ndarray


@dataclass(frozen=True, eq=False)
class FMMTree:
    """The plan of one FMA call: what every query attends to, at which level.

    Build it with :func:`build_tree`. All arrays are read-only.

    Attributes
    ----------
    n : int
        Sequence length.
    padded_length : int
        ``N``, the padded length.
    block_size, rank : int
        ``m`` and ``p``.
    causal : bool
    levels : tuple of Level
        Far levels ``1 .. L`` (empty never: ``L >= 1``).
    n_coarse : int
        Rows of the coarse buffers (all levels together).
    n_blocks : int
        Query blocks holding at least one real query, ``ceil(n / m)``.

    See Also
    --------
    build_tree, fmm_attention

    Examples
    --------
    >>> from fmm_attention import build_tree
    >>> tree = build_tree(1000, block_size=16, rank=4, causal=True)
    >>> tree
    FMMTree(n=1000, padded_length=1024, block_size=16, rank=4, causal=True, n_levels=5)
    >>> tree.near_range(3)  # causal: the previous block and its own
    (32, 64)
    """

    n: int
    padded_length: int
    block_size: int
    rank: int
    causal: bool
    levels: tuple
    n_coarse: int

    @property
    def n_levels(self):
        """``L``, the number of far levels."""
        return len(self.levels)

    @property
    def n_blocks(self):
        """Query blocks holding at least one real query, ``ceil(n / m)``."""
        return -(-self.n // self.block_size)

    def near_range(self, block):
        """Token range ``[lo, hi)`` of the near field of query block ``block`` (clipped to ``n``).

        Causal near fields also end at the block's last key; the kernels additionally mask
        keys after each query.

        Parameters
        ----------
        block : int
            Query block ``I``, ``0 <= I < n_blocks``.

        Returns
        -------
        lo, hi : int
            The keys ``lo .. hi-1`` attended exactly by the block's queries.
        """
        m = self.block_size
        lo = max(0, (block - 1) * m)
        hi = min(self.n, (block + (1 if self.causal else 2)) * m)
        return lo, hi

    def far_segments(self, block):
        """Coarse-row segments ``(start, count, level)`` of query block ``block``'s far field.

        Boxes that hold only padding are left out: every key in them is masked.

        Parameters
        ----------
        block : int
            Query block ``I``, ``0 <= I < n_blocks``.

        Returns
        -------
        list of (int, int, int)
            For each far box the block attends: its first row in the coarse buffers, its
            number of coarse keys and its level, finest level first.
        """
        segments = []
        position = block * self.block_size
        for level in self.levels:
            b = position // level.box_size
            for c in level.interactions[b]:
                if c >= 0 and c * level.box_size < self.n:
                    segments.append((level.offset + c * level.rank, level.rank, level.index))
        return segments

    @property
    def key_plan(self):
        """The per-block key plan every backend executes (fine queries).

        Returns
        -------
        ptr : ndarray of int64, shape (n_blocks + 1,)
            Segments of block ``I`` are ``ptr[I] : ptr[I+1]``.
        segments : ndarray of int64, shape (n_segments, 3)
            ``(kind, start, count)``; kind ``TOKEN`` indexes ``k``/``v`` rows, kind
            ``COARSE`` indexes coarse-buffer rows.
        max_keys : int
            The most keys any block attends to (buffer size for the kernels).
        """
        return self.plan()

    @property
    def near_plan(self):
        """As :attr:`key_plan`, near field only (for ``query_coarsening=True``)."""
        return self.plan(with_far=False)

    def plan(self, *, with_far=True, global_tokens=()):
        """The key plan, optionally with far levels left out or global tokens added.

        Parameters
        ----------
        with_far : bool
            Include the far-field coarse segments (fine queries) or not (coarse queries:
            the far field arrives through the box partials).
        global_tokens : tuple of int
            Sorted token indices attended exactly by every block; a block whose near field
            already holds one attends it there. The caller leaves them out of coarsening.

        Returns
        -------
        ptr : ndarray of int64, shape (n_blocks + 1,)
            Segments of block ``I`` are ``ptr[I] : ptr[I+1]``.
        segments : ndarray of int64, shape (n_segments, 3)
            ``(kind, start, count)`` as in :attr:`key_plan`.
        max_keys : int
            The most keys any block attends to.

        Notes
        -----
        Plans are cached by ``(n, block_size, rank, causal, with_far, global_tokens)`` (what
        :meth:`FMMOptions.plan_key` gives), the ``_config.PLAN_CACHE_SIZE`` most recently
        used, read at call time; the arrays are read-only.

        Examples
        --------
        >>> from fmm_attention import build_tree
        >>> tree = build_tree(64, block_size=8, rank=2)
        >>> ptr, segments, max_keys = tree.plan()
        >>> len(ptr) == tree.n_blocks + 1, max_keys
        (True, 32)
        >>> # a global token adds one exact key to the blocks far from it
        >>> tree.plan(global_tokens=(0,))[2]
        33
        """
        return _plan(self.n, self.block_size, self.rank, self.causal, bool(with_far), tuple(global_tokens))

    def plan_of(self, options):
        """The key plan a call with ``options`` executes (:meth:`plan`, from the same cache).

        Parameters
        ----------
        options : FMMOptions
            Options of a call along this tree; :meth:`FMMOptions.plan_key` is the cache key.

        Returns
        -------
        ptr, segments, max_keys
            As :meth:`plan` with ``with_far = not options.query_coarsening`` and the
            options' global tokens.
        """
        key = options.plan_key(self.n)
        if key[:4] != (self.n, self.block_size, self.rank, self.causal):
            raise ValueError(f"options {options} do not describe this tree ({self})")
        return _plan(*key)

    @functools.cached_property
    def box_tables(self):
        """Per-level arrays for the coarse-query (O(n)) pass.

        Returns
        -------
        box_offset : ndarray of int64, shape (L + 1,)
            Boxes of level ``l`` (1-based) are rows ``box_offset[l-1] : box_offset[l]`` of the
            box buffers.
        interactions : ndarray of int64, shape (total_boxes, 3)
            Coarse-row start of each far box (``-1``: none or padding only).
        """
        box_offset = np.zeros(self.n_levels + 1, dtype=np.int64)
        tables = []
        for i, level in enumerate(self.levels):
            c = level.interactions
            tables.append(np.where((c >= 0) & (c * level.box_size < self.n), level.offset + c * level.rank, -1))
            box_offset[i + 1] = box_offset[i] + level.n_boxes
        inter = np.concatenate(tables)
        for arr in (box_offset, inter):
            arr.setflags(write=False)
        return box_offset, inter

    def level_map(self):
        """Dense ``(n, n)`` map of the level serving each (query, key) pair.

        ``0`` is the near field (exact tokens), ``l >= 1`` a far level, ``-1`` a pair never
        attended (future keys when causal). For diagnostics and figures at small ``n``.

        Returns
        -------
        ndarray of int8, shape (n, n)

        Raises
        ------
        ValueError
            ``n`` above 8192 (the array would take gigabytes).

        Examples
        --------
        >>> from fmm_attention import build_tree
        >>> levels = build_tree(32, block_size=4, rank=2).level_map()
        >>> # query 0: blocks 0 and 1 exact (0), then two level-1 boxes (1)
        >>> levels[0, :16].tolist()
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
        """
        n = self.n
        if n > _config.DENSE_MAX_N:
            raise ValueError(f"level_map() builds an (n, n) array; n={n} exceeds {_config.DENSE_MAX_N}")
        out = np.full((n, n), -1, dtype=np.int8)
        m = self.block_size
        for block in range(self.n_blocks):
            rows = slice(block * m, min(n, (block + 1) * m))
            lo, hi = self.near_range(block)
            out[rows, lo:hi] = 0
            for level in self.levels:
                b = block * m // level.box_size
                for c in level.interactions[b]:
                    if c >= 0:
                        w = level.box_size
                        out[rows, c * w : min(n, (c + 1) * w)] = level.index
        if self.causal:
            out[np.triu_indices(n, 1)] = -1
        return out

    def __repr__(self):
        return (
            f"FMMTree(n={self.n}, padded_length={self.padded_length}, block_size={self.block_size}, "
            f"rank={self.rank}, causal={self.causal}, n_levels={self.n_levels})"
        )


def _global_runs(global_tokens):
    """Sorted global token indices as runs ``(first, stop)`` of consecutive indices."""
    tokens = np.asarray(global_tokens, dtype=np.int64)
    if tokens.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(tokens) != 1) + 1
    firsts = tokens[np.r_[0, breaks]]
    lasts = tokens[np.r_[breaks - 1, tokens.size - 1]]
    return np.stack([firsts, lasts + 1], axis=1)


def _build_plan(n, m, p, causal, with_far, global_tokens):
    tree = _build_tree(n, m, p, causal)
    # Built for all blocks at once: a column of candidate segments per slot (near field,
    # global runs left of it, global runs right of it, far boxes level by level), each
    # with a validity flag, then compressed row by row so every block keeps this order.
    m, n = tree.block_size, tree.n
    blocks = np.arange(tree.n_blocks, dtype=np.int64)
    lo = np.maximum(0, (blocks - 1) * m)
    hi = np.minimum(n, (blocks + (1 if tree.causal else 2)) * m)
    always = np.ones(blocks.size, dtype=bool)
    columns = [(TOKEN, lo, hi - lo, always)]
    runs = _global_runs(global_tokens)
    # a global token inside the near field is attended there; one after a causal block's
    # last query is masked for all its rows, so causal blocks take no right-hand pieces
    for first, stop in runs:
        columns.append((TOKEN, np.full_like(lo, first), np.minimum(stop, lo) - first, first < lo))
    if not tree.causal:
        for first, stop in runs:
            start = np.maximum(first, hi)
            columns.append((TOKEN, start, stop - start, stop > hi))
    if with_far:
        for level in tree.levels:
            boxes = level.interactions[(blocks * m) // level.box_size]
            for slot in range(boxes.shape[1]):
                c = boxes[:, slot]
                # boxes of padding only are left out: every key in them is masked
                columns.append((COARSE, level.offset + c * level.rank, np.full_like(c, level.rank),
                                (c >= 0) & (c * level.box_size < n)))
    kinds = np.stack([np.full(blocks.size, kind, dtype=np.int64) for kind, *_ in columns], axis=1)
    starts = np.stack([col[1] for col in columns], axis=1)
    counts = np.stack([col[2] for col in columns], axis=1)
    valid = np.stack([col[3] for col in columns], axis=1)
    ptr = np.zeros(blocks.size + 1, dtype=np.int64)
    np.cumsum(valid.sum(axis=1), out=ptr[1:])
    segments = np.stack([kinds[valid], starts[valid], counts[valid]], axis=1)
    max_keys = int(np.where(valid, counts, 0).sum(axis=1).max())
    for arr in (ptr, segments):
        arr.setflags(write=False)
    return ptr, segments, max_keys


#: Key plans by ``(n, block_size, rank, causal, with_far, global_tokens)``.
_plan = LRUCache(_build_plan, "PLAN_CACHE_SIZE")


def build_tree(n, *, block_size, rank, causal=False):
    """Build (or fetch from cache) the FMA tree for a sequence of length ``n``.

    Parameters
    ----------
    n : int
        Sequence length, ``n >= 1``.
    block_size : int
        Finest box size ``m`` (power of two): each query attends exactly to the keys of its
        own and neighbouring blocks.
    rank : int
        Coarse keys per far box ``p`` (power of two).
    causal : bool, optional
        Build the causal interaction lists (keys at or before each query only).

    Returns
    -------
    FMMTree
        Its ``block_size`` is ``min(block_size, 2**ceil(log2(n)))``: a block longer than the
        sequence is clamped to the smallest power of two holding it (every key is in the
        near field either way, so attention is exact and the result the same).

    Raises
    ------
    ValueError
        ``n < 1``, ``n > 2**40``, or a tree (with its key plan) needing more memory than
        :func:`memory_limit` allows.

    Examples
    --------
    >>> from fmm_attention import build_tree
    >>> tree = build_tree(100, block_size=8, rank=2)
    >>> tree.padded_length, tree.n_levels, [lv.box_size for lv in tree.levels]
    (128, 3, [8, 16, 32])
    """
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an integer, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if n > 2**40:
        raise ValueError(f"n={n} is beyond the supported sequence length 2**40")
    n = int(n)
    m = effective_block_size(n, check_power_of_two(block_size, "block_size"))
    p = check_power_of_two(rank, "rank")
    causal = check_bool(causal, "causal")
    check_memory({"tree and key plan": tree_bytes(n, m, p)}, {"tree and key plan": ("n", n)})
    return _build_tree(n, m, p, causal)


# ---------------------------------------------------------------- memory estimates
def memory_limit():
    """Bytes one call may allocate: ``_config.MAX_CALL_BYTES``, or physical memory if ``None``."""
    if _config.MAX_CALL_BYTES is not None:
        return int(_config.MAX_CALL_BYTES)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): no bound
        return 2**63


def _level_sizes(n, m, p):
    """``(n_levels, total boxes, coarse rows)`` of the tree of ``(n, m, p)``, without building it."""
    N = padded_length(n, m)
    n_levels = (N // m).bit_length() - 2
    boxes = rows = 0
    for index in range(1, n_levels + 1):
        w = m << (index - 1)
        boxes += N // w
        rows += (N // w) * min(p, w)
    return n_levels, boxes, rows


def _plan_columns(n_levels, n_globals, causal):
    """Candidate segments per block of a key plan (near field, global runs, far boxes)."""
    return 1 + (1 if causal else 2) * n_globals + (2 if causal else 3) * n_levels


def tree_bytes(n, block_size, rank, n_globals=0, causal=False):
    """Bytes of a tree's tables plus one key plan and the temporaries that build it."""
    n_levels, boxes, _ = _level_sizes(n, block_size, rank)
    n_blocks = -(-n // block_size)
    # interactions and box tables: 3 int64 per box each; plan build: ~8 int64 arrays per column
    return 2 * 24 * boxes + 64 * n_blocks * _plan_columns(n_levels, n_globals, causal)


def fmm_call_bytes(tree, *, batch, d, dv, itemsize, refine=0, query_coarsening=False, n_globals=0,
                   coarsening="mean", n_threads=None):
    """Estimated bytes one :func:`~fmm_attention.fmm_attention` call allocates, by part.

    Parts: ``"outputs"`` (output, lse), ``"coarse buffers"`` (coarse keys, values, biases;
    coarse queries and box partials), ``"refinement"`` (per-entry plans and the scoring
    work of the threads), ``"block buffers"`` (the block kernel's per-thread work buffers),
    ``"tree and key plan"``. Upper bounds to within small factors, computed before anything
    is allocated. ``coarsening``: a :class:`~fmm_attention.coarsening.Coarsening` or its name.
    """
    if n_threads is None:
        n_threads = num_threads()
    n, m, B = tree.n, tree.block_size, batch
    n_blocks = tree.n_blocks
    _, boxes, rows = _level_sizes(n, m, tree.rank)
    columns = _plan_columns(tree.n_levels, n_globals, tree.causal)
    coarse = B * rows * ((d + dv + 2) * itemsize + 8) * as_coarsening(coarsening).buffer_copies
    if query_coarsening:
        coarse += B * boxes * ((d + dv + 2) * itemsize + 8) + B * n_blocks * (dv + 2) * itemsize
    width = min(m, n) + 16  # queries per block, padded to the micro-kernel's panel
    max_keys = 3 * min(m, n) + n_globals + 3 * tree.rank * tree.n_levels + refine
    block = n_threads * (max_keys * (d + dv + 1 + width) * itemsize + 8 * max_keys + (d + dv) * width * itemsize)
    refinement = 0
    if refine:
        capacity = columns + 2 * refine + n_globals + min(m, n) + 2
        plans = B * n_blocks * (capacity * 24 + 16)
        scoring = n_threads * (8 * min(m, n) * (max_keys + 2 * dv + 2) + 48 * capacity)
        refinement = plans + scoring
    return {
        "outputs": B * n * (dv + 1) * itemsize,
        "coarse buffers": coarse,
        "refinement": refinement,
        "block buffers": block,
        "tree and key plan": tree_bytes(n, m, tree.rank, n_globals, tree.causal),
    }


def check_memory(parts, culprits):
    """Raise ``ValueError`` if the estimated ``parts`` (name -> bytes) exceed :func:`memory_limit`.

    ``culprits`` maps a part to the ``(argument, value)`` that drives it; the error names
    the argument of the largest part.
    """
    total = sum(parts.values())
    limit = memory_limit()
    if total <= limit:
        return
    worst = max(parts, key=parts.get)
    name, value = culprits.get(worst, ("n", None))
    gib = 2.0**30
    breakdown = ", ".join(f"{part} {size / gib:.3g} GiB" for part, size in parts.items() if size)
    raise ValueError(
        f"{name}={value} needs about {total / gib:.3g} GiB for this call ({breakdown}), more than the "
        f"{limit / gib:.3g} GiB allowed (physical memory, or fmm_attention._config.MAX_CALL_BYTES); "
        f"reduce {name}"
    )


def _make_tree(n, m, p, causal):
    N = padded_length(n, m)
    n_levels = (N // m).bit_length() - 1 - 1  # log2(N/m) - 1
    levels = []
    offset = 0
    for index in range(1, n_levels + 1):
        w = m << (index - 1)
        r = min(p, w)
        n_boxes = N // w
        inter = _interactions(n_boxes, causal)
        inter.setflags(write=False)
        levels.append(Level(index, w, n_boxes, r, w // r, offset, inter))
        offset += n_boxes * r
    return FMMTree(n, N, m, p, causal, tuple(levels), offset)


#: Trees by ``(n, block_size, rank, causal)``.
_build_tree = LRUCache(_make_tree, "TREE_CACHE_SIZE")
