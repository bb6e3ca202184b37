"""Per-chunk computations of the sequence-parallel algorithms (NumPy, a little Numba).

Every function here runs inside one Dask task on plain NumPy arrays of one leading block
(leading dims flattened to ``B``): ``q``/``k`` ``(B, c, d)``, ``v`` ``(B, c, dv)``, validity
``(B, c)`` bool or ``None``. No function imports Dask; :mod:`.dask` wires them into graphs.

Partial softmax results travel as ``(max, sum, numerator)`` triples or as normalised
``(out, lse)`` pairs and are merged through log-sum-exp, so no partial ever overflows.
"""

from __future__ import annotations

import numba
import numpy as np

from .. import _config
from .._validate import check_finite_array
from ..tree import COARSE, TOKEN, build_tree

#: Queries per product in the exact partial kernel: bounds the score tile to
#: ``EXACT_QUERY_ROWS x key chunk`` floats per task.


# ---------------------------------------------------------------- input blocks
def prepare_block(x, name, dtype, check_finite, features):
    """One input block as a C-contiguous writeable ``(B, c[, f])`` array in the kernel dtype.

    Runs where the block lives (the first task that touches it), so the finiteness check
    and the cast never move data; errors surface when the result is computed.
    """
    x = np.asarray(x)
    lead = int(np.prod(x.shape[: x.ndim - (2 if features else 1)], dtype=np.int64))
    shape = (lead, x.shape[-2], x.shape[-1]) if features else (lead, x.shape[-1])
    if features:
        x = np.ascontiguousarray(x, dtype=dtype)
    else:
        x = np.ascontiguousarray(x)
    x = x.reshape(shape)
    if not x.flags.writeable:  # read-only arrays would compile a second kernel variant
        x = x.copy()
    if features and check_finite:
        check_finite_array(x, name)
    return x


def prepare_chunk(q, k, v, mask, dtype, check_finite):
    """``(q, k, v, valid)`` of one chunk, prepared together (see :func:`prepare_block`)."""
    return (
        prepare_block(q, "q", dtype, check_finite, True),
        prepare_block(k, "k", dtype, check_finite, True),
        prepare_block(v, "v", dtype, check_finite, True),
        None if mask is None else prepare_block(mask, "key_padding_mask", None, False, False),
    )


def keys_of(chunk):
    """``(k, v, valid)`` of a prepared chunk."""
    return chunk[1:]


def restore(x, lead_shape):
    """``(B, c[, f])`` back to the block's leading dims."""
    return x.reshape(tuple(lead_shape) + x.shape[1:])


# ---------------------------------------------------------------- log-sum-exp merging
def merge_out_lse(parts):
    """Merge normalised partials ``[(out, lse), ...]`` over disjoint key sets, in list order.

    ``out = sum_p exp(lse_p - lse) out_p`` with ``lse = logsumexp_p lse_p``; queries with no
    key in any part keep ``out = 0``, ``lse = -inf``. Pairwise (a balanced tree) so the
    rounding does not grow with the number of parts.
    """
    parts = list(parts)
    while len(parts) > 1:
        merged = []
        for i in range(0, len(parts) - 1, 2):
            merged.append(_merge_pair(parts[i], parts[i + 1]))
        if len(parts) % 2:
            merged.append(parts[-1])
        parts = merged
    return parts[0]


def _merge_pair(a, b):
    out_a, lse_a = a
    out_b, lse_b = b
    top = np.maximum(lse_a, lse_b)
    safe = np.where(np.isfinite(top), top, 0)
    wa = np.exp(lse_a - safe)
    wb = np.exp(lse_b - safe)
    total = wa + wb
    with np.errstate(divide="ignore"):
        lse = np.where(total > 0, safe + np.log(np.where(total > 0, total, 1)), -np.inf)
    inv = np.divide(1, total, out=np.zeros_like(total), where=total > 0)
    out = (wa * inv)[..., None] * out_a + (wb * inv)[..., None] * out_b
    return out.astype(out_a.dtype, copy=False), lse.astype(lse_a.dtype, copy=False)


def merge_triples(a, b):
    """Merge two softmax partials ``(max, sum, vec)`` (shapes ``(B,)``, ``(B,)``, ``(B, f)``)."""
    ma, sa, va = a
    mb, sb, vb = b
    top = np.maximum(ma, mb)
    safe = np.where(np.isfinite(top), top, 0)
    ra = np.where(np.isfinite(ma), np.exp(ma - safe), 0)
    rb = np.where(np.isfinite(mb), np.exp(mb - safe), 0)
    return top, ra * sa + rb * sb, ra[:, None] * va + rb[:, None] * vb


def empty_triple(batch, features, dtype):
    """The partial of no position at all."""
    return (np.full(batch, -np.inf, dtype=dtype), np.zeros(batch, dtype=dtype), np.zeros((batch, features), dtype=dtype))


# ---------------------------------------------------------------- exact attention (ring)
def exact_partial(q, keys, q_start, k_start, causal, scale):
    """Softmax attention of a query chunk against one key chunk: normalised ``(out, lse)``.

    ``q_start``/``k_start`` are the chunks' first global positions (for the causal mask).
    Memory: one ``_config.DASK_EXACT_QUERY_ROWS x c_k`` score tile at a time, never ``(n, n)``.
    ``keys`` is the key chunk's ``(k, v, valid)``.
    """
    k, v, valid = keys
    B, cq, _ = q.shape
    ck = k.shape[1]
    dtype = q.dtype
    out = np.zeros((B, cq, v.shape[2]), dtype=dtype)
    lse = np.full((B, cq), -np.inf, dtype=dtype)
    key_pos = k_start + np.arange(ck)
    if valid is not None:
        # masked keys may hold anything: zero them so 0 * nan cannot reach the products
        k = np.where(valid[..., None], k, 0).astype(dtype, copy=False)
        v = np.where(valid[..., None], v, 0).astype(dtype, copy=False)
    scale = dtype.type(scale)
    rows = max(1, int(_config.DASK_EXACT_QUERY_ROWS))
    for r0 in range(0, cq, rows):
        r1 = min(cq, r0 + rows)
        scores = np.matmul(q[:, r0:r1] * scale, k.transpose(0, 2, 1))  # (B, rows, ck)
        allowed = np.ones((1, r1 - r0, ck), dtype=bool)
        if causal:
            allowed = allowed & (key_pos[None, None, :] <= (q_start + np.arange(r0, r1))[None, :, None])
        if valid is not None:
            allowed = allowed & valid[:, None, :]
        if causal or valid is not None:
            scores = np.where(allowed, scores, -np.inf)
        top = scores.max(axis=2)
        safe = np.where(np.isfinite(top), top, 0)
        w = np.exp(scores - safe[..., None])
        total = w.sum(axis=2)
        num = np.matmul(w, v)
        ok = total > 0
        inv = np.divide(1, total, out=np.zeros_like(total), where=ok)
        out[:, r0:r1] = num * inv[..., None]
        with np.errstate(divide="ignore"):
            lse[:, r0:r1] = np.where(ok, safe + np.log(np.where(ok, total, 1)), -np.inf)
    return out, lse


# ---------------------------------------------------------------- fastformer
def pool_partial(x, logits, valid):
    """Softmax-pool partial ``(max, sum, sum_i e_i x_i)`` of one chunk (masked rows out)."""
    if valid is not None:
        logits = np.where(valid, logits, -np.inf)
        x = np.where(valid[..., None], x, 0)
    top = logits.max(axis=1)
    safe = np.where(np.isfinite(top), top, 0)
    w = np.exp(logits - safe[:, None])
    return top, w.sum(axis=1), np.einsum("bi,bid->bd", w, x)


def pool_value(triple):
    """The pooled vector ``vec / sum`` of a merged partial (zero where nothing was pooled)."""
    _, total, vec = triple
    return np.divide(vec, total[:, None], out=np.zeros_like(vec), where=total[:, None] > 0)


@numba.njit(cache=_config.CACHE)
def _prefix_pool(x, logits, valid, has_mask, c_max, c_sum, c_vec, pool):
    # serial online softmax along each sequence, started from the carried-in partial
    n_batch, n, d = x.shape
    acc = np.empty(d, dtype=x.dtype)
    for b in range(n_batch):
        mx = c_max[b]
        total = c_sum[b]
        for e in range(d):
            acc[e] = c_vec[b, e]
        for i in range(n):
            if not has_mask or valid[b, i]:
                z = logits[b, i]
                if z > mx:
                    rescale = np.exp(mx - z)
                    total *= rescale
                    for e in range(d):
                        acc[e] *= rescale
                    mx = z
                w = np.exp(z - mx)
                total += w
                for e in range(d):
                    acc[e] += w * x[b, i, e]
            if total > 0:
                for e in range(d):
                    pool[b, i, e] = acc[e] / total
            else:
                for e in range(d):
                    pool[b, i, e] = 0


def prefix_pool(x, logits, valid, carry):
    """Causal pools of one chunk: ``pool[i]`` over the carried-in prefix and rows ``<= i``."""
    pool = np.empty_like(x)
    has_mask = valid is not None
    c_max, c_sum, c_vec = (np.ascontiguousarray(a, dtype=x.dtype) for a in carry)
    _prefix_pool(x, np.ascontiguousarray(logits, dtype=x.dtype), valid if has_mask else np.ones((1, 1), np.bool_),
                 has_mask, c_max, c_sum, c_vec, pool)
    return pool


def fastformer_alpha(q, valid, w_q, scale):
    """Query-pool logits ``s q_i . w_q`` of a chunk, ``(B, c)``."""
    return np.einsum("bid,bd->bi", q, (w_q * scale).astype(q.dtype, copy=False))


def fastformer_causal_beta(chunk, w_q, w_k, scale, carry_alpha):
    """Key-pool partial of a chunk ``(q, k, v, valid)`` given the query pool's carry-in (causal)."""
    q, k, _, valid = chunk
    qg = prefix_pool(q, fastformer_alpha(q, valid, w_q, scale), valid, carry_alpha)
    p = qg * k
    logits = np.einsum("bid,bd->bi", p, (w_k * scale).astype(q.dtype, copy=False))
    return pool_partial(p, logits, valid)


def fastformer_causal_out(chunk, w_q, w_k, scale, carry_alpha, carry_beta):
    """Causal Fastformer outputs of a chunk ``(q, k, v, valid)``: ``(u, qg, kg)``, each ``(B, c, d)``."""
    q, k, v, valid = chunk
    qg = prefix_pool(q, fastformer_alpha(q, valid, w_q, scale), valid, carry_alpha)
    p = qg * k
    logits = np.einsum("bid,bd->bi", p, (w_k * scale).astype(q.dtype, copy=False))
    kg = prefix_pool(p, logits, valid, carry_beta)
    return kg * v, qg, kg


# ---------------------------------------------------------------- FMA: upward pass
def _block_sums(x, size):
    """Float64 sums of ``size`` consecutive rows of ``x`` ``(B, c[, f])``; the last block may be short."""
    B, c = x.shape[:2]
    rows = -(-c // size)
    if rows * size != c:
        x = np.concatenate([x, np.zeros((B, rows * size - c) + x.shape[2:], dtype=x.dtype)], axis=1)
    # in the input's own float dtype (a float64 accumulator over float32 halves the speed;
    # the kernels sum float32 keys in float32 too), then float64 for everything above
    acc = x.dtype if x.dtype.kind == "f" else np.float64
    return x.reshape((B, rows, size) + x.shape[2:]).sum(axis=2, dtype=acc).astype(np.float64, copy=False)


def sub_box_sums(k, v, valid, sizes):
    """Sums of keys/values and valid counts over aligned sub-boxes of each size in ``sizes``.

    ``sizes`` are powers of two dividing the chunk's nominal length, ascending; the chunk
    starts on a multiple of each. Returns ``{size: (ksum, vsum, count)}`` in float64 with
    ``ceil(c / size)`` rows: one vectorised pass over the tokens for the smallest size,
    then pairwise merging of those sums (O(c d) for all sizes together). ``k`` and ``v``
    must hold zeros at masked tokens.
    """
    B, c, _d = k.shape
    size = sizes[0]
    ksum, vsum = _block_sums(k, size), _block_sums(v, size)
    if valid is not None:
        count = _block_sums(valid, size)
    else:
        count = np.full((B, ksum.shape[1]), float(size))
        count[:, -1] = c - size * (ksum.shape[1] - 1)
    out = {}
    for want in sizes:
        while size < want:
            rows = ksum.shape[1]
            if rows % 2:
                ksum = np.concatenate([ksum, np.zeros_like(ksum[:, :1])], axis=1)
                vsum = np.concatenate([vsum, np.zeros_like(vsum[:, :1])], axis=1)
                count = np.concatenate([count, np.zeros_like(count[:, :1])], axis=1)
            ksum = ksum[:, 0::2] + ksum[:, 1::2]
            vsum = vsum[:, 0::2] + vsum[:, 1::2]
            count = count[:, 0::2] + count[:, 1::2]
            size *= 2
        out[want] = (ksum, vsum, np.ascontiguousarray(count))
    return out


def _zero_masked(x, valid):
    return np.where(valid[..., None], x, 0) if valid is not None else x


def learned_rows(x, weights, box_size, rank):
    """Grouped-convolution sums (no bias) of aligned boxes of ``x`` ``(B, c, f)``, in float64.

    ``weights`` ``(rank*f, box_size)`` in the ``Conv1d`` row order ``e*rank + t``. Returns
    ``(B, ceil(c / box_size) * rank, f)``: row ``box*rank + t``, channel ``e`` is
    ``sum_u weights[e*rank + t, u] * x[:, box*box_size + u, e]``. A box cut short by the end
    of ``x`` sees only its first columns (padding enters as zeros). ``x`` must already hold
    zeros at masked tokens.
    """
    B, c, f = x.shape
    n_box = -(-c // box_size)
    pad = n_box * box_size - c
    x = x.astype(np.float64, copy=False)
    if pad:
        x = np.concatenate([x, np.zeros((B, pad, f))], axis=1)
    w = np.asarray(weights, dtype=np.float64).reshape(f, rank, box_size)  # [e, t, u]
    # one batched product per channel: (f, B*n_box, u) @ (f, u, t)
    xs = x.reshape(B * n_box, box_size, f).transpose(2, 0, 1)
    out = np.matmul(xs, w.transpose(0, 2, 1))  # (f, B*n_box, t)
    return np.ascontiguousarray(out.reshape(f, B, n_box * rank).transpose(1, 2, 0))


def _box_counts(valid, B, c, box_size):
    if valid is None:
        full = np.full(-(-c // box_size), float(box_size))
        full[-1] = c - box_size * (full.size - 1)
        return np.broadcast_to(full, (B, full.size)).copy()
    pad = -c % box_size
    v = np.concatenate([valid, np.zeros((B, pad), dtype=bool)], axis=1) if pad else valid
    return v.reshape(B, -1, box_size).sum(axis=2).astype(np.float64)


def chunk_upward(chunk, spec):
    """Upward pass of one chunk ``(q, k, v, valid)``: its coarse-row sums and its totals.

    ``spec`` says what to build (client-side metadata, see :func:`.dask._upward_spec`):

    * ``sizes``: mean sub-box sums ``{size: (ksum, vsum, count)}`` for sub-boxes inside the chunk;
    * ``learned_local``: ``[(level, box_size, rank, key_w, value_w)]`` for levels whose boxes
      lie inside the chunk: ``{("L", level): (krows, vrows, count)}``, one row per (box, slot);
    * ``total``: the chunk's contribution to the boxes larger than a chunk, a dict merged by
      :func:`add_totals`: ``"mean"`` (sums, count), ``"q"`` (query sum, count; coarse
      queries) and ``("L", level)`` (learned partial convolutions over the chunk's columns
      ``learned_big``: ``[(level, rank, key_w_slice, value_w_slice)]``).

    All sums are float64; they are finished (divided, biased) by the chunk that uses them.
    """
    q, k, v, valid = chunk
    B, c, _ = k.shape
    kz, vz = _zero_masked(k, valid), _zero_masked(v, valid)
    sums = sub_box_sums(kz, vz, valid, spec["sizes"]) if spec["sizes"] else {}
    for level, box_size, rank, kw, vw in spec["learned_local"]:
        count = np.repeat(_box_counts(valid, B, c, box_size), rank, axis=1)
        sums[("L", level)] = (learned_rows(kz, kw, box_size, rank), learned_rows(vz, vw, box_size, rank), count)
    if not spec["total"]:
        return sums, None
    cnt = valid.sum(axis=1).astype(np.float64) if valid is not None else np.full(B, float(c))
    total = {}
    if spec["mean_total"]:  # from the largest sub-boxes: no second pass over the tokens
        top = sums[spec["sizes"][-1]] if spec["sizes"] else sub_box_sums(kz, vz, valid, [c])[c]
        total["mean"] = tuple(np.ascontiguousarray(x.sum(axis=1)) for x in top)
    if spec["q_total"]:
        total["q"] = (_zero_masked(q, valid).sum(axis=1, dtype=np.float64), cnt)
    for level, rank, kw, vw in spec["learned_big"]:
        total[("L", level)] = (learned_rows(kz, kw, c, rank), learned_rows(vz, vw, c, rank), cnt)
    return sums, total


def export_rows(up, picks):
    """The rows of one chunk's upward pass another chunk lists: ``[(ksum, vsum, count), ...]``."""
    sums, _ = up
    return [tuple(a[:, rows] for a in sums[key]) for key, rows in picks]


def totals_of(node):
    """The totals in a pyramid node: a chunk's far outbox (the pyramid's bottom) or a sum of them."""
    return node["total"] if "rows" in node else node


def add_totals(a, b):
    """Sum of the totals of two neighbouring groups of chunks (the tree reduction above a chunk)."""
    a, b = totals_of(a), totals_of(b)
    return {key: tuple(x + y for x, y in zip(a[key], b[key])) for key in a}


def chunk_outbox(chunk, spec, layout, cross):
    """A chunk's upward pass and, in one go, everything the other chunks need of it.

    ``layout`` names the chunk (``index``, ``first``, ``length``) and the tree (``n``,
    ``block_size``, ``rank``, ``causal``, ``chunk``, ``n_chunks``, ``learned``); ``cross``
    maps each other chunk that lists coarse rows of this one to its picks (``[(key, local
    rows)]``, from the client's plan of that chunk). Returns ``(own, near, far)``:

    * ``own``: ``(rows, plan)``, the rows the chunk lists of itself and its plan
      (:func:`chunk_sources`), for its own attention task (they stay where the chunk lives);
    * ``near``: for the two neighbours, ``{"rows": {chunk: rows}, "first": halo, "last":
      halo}``: the ``m``-token halos (``first`` only when bidirectional) and the rows they
      list, the bulk of what leaves the chunk;
    * ``far``: ``{"rows": {chunk: rows}, "total": totals}``: the few rows every other listing
      chunk takes and the chunk's contribution to the pyramid.

    Everything is ready when the upward pass is (no export task waits behind another
    chunk's attention), and the sub-box sums themselves are dropped here, never held for
    later exports. A chunk at distance two or more receives only ``far``.
    """
    sums, total = chunk_upward(chunk, spec)
    tree = build_tree(layout["n"], block_size=layout["block_size"], rank=layout["rank"], causal=layout["causal"])
    index = layout["index"]
    plan = chunk_sources(tree, layout["first"], layout["length"], layout["chunk"], layout["n_chunks"],
                         layout["learned"])
    own = next((export_rows((sums, None), picks) for j, picks, _ in plan["exports"] if j == index), [])
    rows = {i: export_rows((sums, None), picks) for i, picks in cross.items()}
    m = tree.block_size
    near = {"rows": {i: r for i, r in rows.items() if abs(i - index) == 1},
            "first": halo(chunk, m) if index > 0 and not tree.causal else None,
            "last": halo(chunk, -m) if index + 1 < layout["n_chunks"] else None}
    far = {"rows": {i: r for i, r in rows.items() if abs(i - index) != 1}, "total": total}
    return (own, plan), near, far


# ---------------------------------------------------------------- FMA: per-chunk attention
def listed_boxes(tree, first, length):
    """Far boxes listed by the query blocks of tokens ``[first, first + length)``, per level.

    Returns one sorted int64 array per level: the boxes of that level some block of the
    range attends (valid boxes only: inside the level and holding a real token).
    """
    m, n = tree.block_size, tree.n
    blocks = np.arange(first // m, (first + length - 1) // m + 1, dtype=np.int64)
    out = []
    for level in tree.levels:
        listed = level.interactions[np.unique(blocks * m // level.box_size)]
        keep = (listed >= 0) & (listed * level.box_size < n)
        out.append(np.unique(listed[keep]))
    return out


def _local_plan(tree, first, length, left, right, boxes, box_base, with_far=True):
    """Key plan of a chunk's query blocks in local coordinates (the library's segment order).

    Local token ``t`` is global token ``first - left + t``; local block ``left / m + j`` is
    the chunk's ``j``-th block; the halo blocks get empty plans. Coarse rows index the
    local coarse buffer (level ``l``'s box ``boxes[l][i]`` at ``box_base[l] + i * r_l``).
    """
    m, n = tree.block_size, tree.n
    base = first - left
    n_local = left + length + right
    n_local_blocks = -(-n_local // m)
    blocks = np.arange(first // m, (first + length - 1) // m + 1, dtype=np.int64)
    lo = np.maximum(0, (blocks - 1) * m)
    hi = np.minimum(n, (blocks + (1 if tree.causal else 2)) * m)
    columns = [(TOKEN, lo - base, hi - lo, np.ones(blocks.size, dtype=bool))]
    for level, listed, start in zip(tree.levels if with_far else (), boxes, box_base):
        lists = level.interactions[(blocks * m) // level.box_size]
        for slot in range(lists.shape[1]):
            c = lists[:, slot]
            ok = (c >= 0) & (c * level.box_size < n)
            where = np.searchsorted(listed, np.where(ok, c, 0))
            columns.append((COARSE, start + where * level.rank, np.full_like(c, level.rank), ok))
    kinds = np.stack([np.full(blocks.size, kind, dtype=np.int64) for kind, *_ in columns], axis=1)
    starts = np.stack([col[1] for col in columns], axis=1)
    counts = np.stack([col[2] for col in columns], axis=1)
    valid = np.stack([col[3] for col in columns], axis=1)
    per_block = valid.sum(axis=1)
    ptr = np.zeros(n_local_blocks + 1, dtype=np.int64)
    own = left // m
    ptr[own + 1 : own + 1 + blocks.size] = np.cumsum(per_block)
    ptr[own + 1 + blocks.size :] = ptr[own + blocks.size]
    segments = np.stack([kinds[valid], starts[valid], counts[valid]], axis=1).astype(np.int64)
    max_keys = int(np.where(valid, counts, 0).sum(axis=1).max())
    for arr in (ptr, segments):
        arr.setflags(write=False)  # as the tree's plans: the compiled kernel variant is reused
    return ptr, segments, max_keys


def _local_box_tables(tree, first, chunk, boxes, box_base):
    """The coarse-query box tables of one chunk, in local numbering (cf. ``FMMTree.box_tables``).

    Level ``l`` holds the chunk's ``chunk / w_l`` boxes when ``w_l <= chunk`` (nominal chunk
    length: boxes past the last token get no query) and otherwise the one box containing the
    chunk, so a box's parent is local row ``c // 2`` of the next level, as in the global
    tables. ``interactions`` name rows of the local coarse buffer (``-1``: none).
    """
    n = tree.n
    box_offset = np.zeros(tree.n_levels + 1, dtype=np.int64)
    tables = []
    for i, (level, listed, start) in enumerate(zip(tree.levels, boxes, box_base)):
        w = level.box_size
        n_box = chunk // w if w <= chunk else 1
        glob = first // w + np.arange(n_box)
        c = level.interactions[np.minimum(glob, level.n_boxes - 1)]
        ok = (c >= 0) & (c * w < n)
        where = np.searchsorted(listed, np.where(ok, c, 0))
        tables.append(np.where(ok, start + where * level.rank, -1))
        box_offset[i + 1] = box_offset[i] + n_box
    return box_offset, np.ascontiguousarray(np.concatenate(tables), dtype=np.int64)


def _coarse_query_partials(tree, q, valid, meta, q_totals, kc, vc, cbias, n_local_blocks, own_block):
    """The far-field partials each of the chunk's query blocks inherits (coarse queries).

    Coarse queries of the boxes inside the chunk come from its own tokens; those of the
    larger boxes from the reduced query sums ``q_totals`` (one ``(qsum, count)`` per such
    level, bottom up). Far partials and the downward pass then run on the local tables with
    the backend's kernels, exactly as on one machine. Returns ``(inh_max, inh_sum, inh_num)``
    per local block (halo blocks inherit nothing).
    """
    from ..cpu import coarse_queries, downward_pass, far_partials

    B, c, d = q.shape
    dv = vc.shape[2]
    dtype = q.dtype
    box_offset, interactions = _local_box_tables(tree, meta["first"], meta["chunk"], meta["boxes"], meta["box_base"])
    local = [lv for lv in tree.levels if lv.box_size <= meta["chunk"]]
    total = int(box_offset[-1])
    qc = np.zeros((B, total, d), dtype=dtype)
    q_count = np.zeros((B, total), dtype=np.int64)
    has_mask = valid is not None
    sizes = np.array([lv.box_size for lv in local], dtype=np.int64)
    coarse_queries(q, valid if has_mask else np.zeros((1, 1), np.bool_), has_mask, sizes,
                   np.ascontiguousarray(box_offset[: len(local) + 1]), qc, q_count)
    for row, (qsum, cnt) in zip(range(int(box_offset[len(local)]), total), q_totals):
        filled = cnt > 0
        qc[:, row] = np.divide(qsum, cnt[:, None], out=np.zeros_like(qsum), where=filled[:, None])
        q_count[:, row] = cnt.astype(np.int64)
    ranks = np.array([lv.rank for lv in tree.levels], dtype=np.int64)
    part_max = np.empty((B, total), dtype=dtype)
    part_sum = np.empty((B, total), dtype=dtype)
    part_num = np.empty((B, total, dv), dtype=dtype)
    far_partials(qc, q_count, kc, vc, cbias, box_offset, ranks, interactions, dtype.type(meta["scale"]),
                 part_max, part_sum, part_num)
    downward_pass(box_offset, part_max, part_sum, part_num)
    own = -(-c // tree.block_size)
    inh_max = np.full((B, n_local_blocks), -np.inf, dtype=dtype)
    inh_sum = np.zeros((B, n_local_blocks), dtype=dtype)
    inh_num = np.zeros((B, n_local_blocks, dv), dtype=dtype)
    blocks = slice(own_block, own_block + own)
    inh_max[:, blocks], inh_sum[:, blocks], inh_num[:, blocks] = part_max[:, :own], part_sum[:, :own], part_num[:, :own]
    return inh_max, inh_sum, inh_num


def _coarse_rows(meta, exports, export_dest, totals, total_dest, B, d, dv, dtype):
    """The local coarse buffer ``(kc, vc, cbias)`` from the received row sums.

    Mean coarsening: sums over sub-boxes become means with bias ``log(count)``; learned:
    convolution sums get their bias and ``log(valid(box) / r_l)``. Empty rows are masked.
    """
    rows = max(1, meta["n_rows"])
    ksum = np.zeros((B, rows, d))
    vsum = np.zeros((B, rows, dv))
    count = np.zeros((B, rows))
    for parts, dests in zip(exports, export_dest):
        for (a, b, cnt), dest in zip(parts, dests):
            ksum[:, dest], vsum[:, dest], count[:, dest] = a, b, cnt
    for (a, b, cnt), dest in zip(totals, total_dest):
        dest = np.atleast_1d(dest)
        ksum[:, dest] = a.reshape(B, dest.size, d)
        vsum[:, dest] = b.reshape(B, dest.size, dv)
        count[:, dest] = cnt[:, None]
    filled = count > 0
    learned = meta["learned"]
    if learned is None:
        inv = np.divide(1.0, count, out=np.zeros_like(count), where=filled)
        kc, vc = ksum * inv[..., None], vsum * inv[..., None]
        per_row = count
    else:
        kbias, vbias, row_rank = learned
        kc = np.where(filled[..., None], ksum + kbias[: rows], 0.0)
        vc = np.where(filled[..., None], vsum + vbias[: rows], 0.0)
        per_row = count / row_rank[: rows]
    with np.errstate(divide="ignore"):
        bias = np.log(np.where(filled, per_row, 1.0)) if meta["count_scaling"] else np.zeros_like(count)
    cbias = np.where(filled, bias, -np.inf).astype(dtype)
    return np.ascontiguousarray(kc, dtype=dtype), np.ascontiguousarray(vc, dtype=dtype), cbias


def learned_row_biases(biases, tree, plan):
    """Per row of a chunk's local coarse buffer: the learned key/value bias and the level's rank.

    ``biases`` is ``(key_bias, value_bias)``, one ``(r_l * f,)`` array per level (row
    ``e*r + t`` is slot ``t``'s channel ``e``), as :class:`~fmm_attention.LearnedCoarsening` holds them.
    """
    key_bias, value_bias = biases
    rows = max(1, plan["n_rows"])
    kb = np.zeros((rows, key_bias[0].size // tree.levels[0].rank))
    vb = np.zeros((rows, value_bias[0].size // tree.levels[0].rank))
    rank = np.ones(rows)
    for i, (lv, listed, base) in enumerate(zip(tree.levels, plan["boxes"], plan["box_base"])):
        r = lv.rank
        dest = base + np.arange(listed.size * r)
        # bias[e*r + t] is slot t's channel e
        kb[dest] = np.tile(np.asarray(key_bias[i]).reshape(-1, r).T, (listed.size, 1))
        vb[dest] = np.tile(np.asarray(value_bias[i]).reshape(-1, r).T, (listed.size, 1))
        rank[dest] = r
    return kb, vb, rank


def halo(chunk, size):
    """The first (``size > 0``) or last (``size < 0``) ``|size|`` tokens of a chunk's ``(k, v, valid)``."""
    sl = slice(None, size) if size > 0 else slice(size, None)
    return tuple(None if x is None else np.ascontiguousarray(x[:, sl]) for x in chunk[1:])


def chunk_sources(tree, first, length, chunk, n_chunks, learned):
    """Where chunk ``[first, first + length)`` gets each coarse row it lists (its plan).

    Returns ``boxes``/``box_base`` (the local coarse buffer's layout: level ``l``'s ``i``-th
    listed box at rows ``box_base[l] + i * r_l ...``), ``n_rows``, and the row sources:
    ``exports`` ``[(chunk j, [(key, local rows)], [dest rows])]`` from the chunks' upward
    passes, ``totals`` ``[(pyramid depth, index, key, dest rows)]`` from the tree reduction,
    and ``depth``, the deepest pyramid level used. Mean coarsening's rows are sub-boxes
    (key: the sub-box size); learned coarsening's are (box, slot) pairs (key ``("L", level)``).
    """
    boxes = listed_boxes(tree, first, length)
    box_base, offset = [], 0
    by_chunk = {}
    totals = []
    deepest = 0

    def send(j, key, local, dest):
        by_chunk.setdefault(int(j), ([], []))
        by_chunk[int(j)][0].append((key, local))
        by_chunk[int(j)][1].append(dest)

    for li, (level, listed) in enumerate(zip(tree.levels, boxes)):
        box_base.append(offset)
        r, s, w = level.rank, level.sub_box_size, level.box_size
        if listed.size == 0:
            continue
        rows = (listed[:, None] * r + np.arange(r)[None, :]).ravel()  # global (box, slot) = sub-box rows
        dest = offset + np.arange(rows.size)
        offset += rows.size
        if learned and w <= chunk:
            src = rows // r * w // chunk
            for j in np.unique(src):
                sel = src == j
                send(j, ("L", li), rows[sel] - j * (chunk // w) * r, dest[sel])
        elif learned:
            t = int(np.log2(w // chunk))
            deepest = max(deepest, t)
            for b, dr in zip(listed, dest.reshape(-1, r)):
                totals.append((t, int(b), ("L", li), dr))
        elif s <= chunk:
            src = rows * s // chunk
            for j in np.unique(src):
                # rows past the last real token stay masked (zero count): nobody sends them
                held = -(-(min(chunk, tree.n - int(j) * chunk)) // s) if j < n_chunks else 0
                local = rows - j * (chunk // s)
                sel = (src == j) & (local < held)
                if sel.any():
                    send(j, s, local[sel], dest[sel])
        else:
            t = int(np.log2(s // chunk))
            deepest = max(deepest, t)
            for g, dr in zip(rows, dest):
                if g * (s // chunk) < n_chunks:
                    totals.append((t, int(g), "mean", int(dr)))
    exports = [(j, picks, dests) for j, (picks, dests) in sorted(by_chunk.items())]
    return {"boxes": boxes, "box_base": box_base, "n_rows": offset, "exports": exports, "totals": totals,
            "depth": deepest}


def fma_chunk(chunk, up, sources, outboxes, node_keys, nodes, meta):
    """FMA outputs ``(out, lse)`` of one sequence chunk (see :func:`chunk_outbox`).

    ``up`` is the chunk's own :func:`chunk_outbox` result (its ``own`` holds its rows and plan);
    ``outboxes`` the ``near`` (neighbours) or ``far`` (others) outbox of each chunk in
    ``sources`` (its neighbours for the halos, the chunks whose rows it lists); ``nodes`` the pyramid
    nodes ``node_keys`` ``(depth, index)`` its plan names (totals of the boxes larger than a
    chunk; coarse queries: also the query sums of the ones holding it). ``meta``: ``n,
    block_size, rank, causal, first, chunk, scale, count_scaling, query_coarsening, index``
    and ``learned`` (the learned biases or ``None``).
    """
    (own_rows, plan), *_ = up
    index, chunk_len = meta["index"], meta["chunk"]
    boxes = dict(zip(sources, outboxes))
    nodes = {key: totals_of(node) for key, node in zip(node_keys, nodes)}
    exports, export_dest = [], []
    for j, _picks, dests in plan["exports"]:
        exports.append(own_rows if j == index else boxes[j]["rows"][index])
        export_dest.append(dests)
    totals = [nodes[(t, g)][key] for t, g, key, _ in plan["totals"]]
    total_dest = [dest for *_, dest in plan["totals"]]
    q_totals = []
    if meta["query_coarsening"]:
        tree = build_tree(meta["n"], block_size=meta["block_size"], rank=meta["rank"], causal=meta["causal"])
        q_totals = [nodes[(int(np.log2(lv.box_size // chunk_len)), meta["first"] // lv.box_size)]["q"]
                    for lv in tree.levels if lv.box_size > chunk_len]
    left = boxes[index - 1]["last"] if index > 0 else None
    right = boxes[index + 1]["first"] if index + 1 in boxes and not meta["causal"] else None
    full = {**meta, "boxes": plan["boxes"], "box_base": plan["box_base"], "n_rows": plan["n_rows"]}
    if meta["learned"] is not None:
        tree = build_tree(meta["n"], block_size=meta["block_size"], rank=meta["rank"], causal=meta["causal"])
        full["learned"] = learned_row_biases(meta["learned"], tree, plan)
    return _attend_chunk(chunk, left, right, exports, export_dest, totals, total_dest, q_totals, full)


def _attend_chunk(chunk, halo_left, halo_right, exports, export_dest, totals, total_dest, q_totals, meta):
    """FMA outputs ``(out, lse)`` of one sequence chunk from its own tokens, halos and coarse rows.

    Parameters
    ----------
    chunk : tuple
        The chunk's tokens ``(q, k, v)`` ``(B, c, .)`` and validity (or ``None``).
    halo_left, halo_right : tuple or None
        ``(k, v, valid)`` of the ``m`` tokens before / after the chunk.
    exports, export_dest
        Lists of row sums sent by the chunks holding listed boxes, and for each the rows of
        the local coarse buffer they fill.
    totals, total_dest
        Sums over the boxes larger than a chunk (from the tree reduction) and their rows.
    q_totals : list
        Coarse queries only: ``(qsum, count)`` of the boxes larger than a chunk that hold
        this chunk, bottom up (empty for fine queries).
    meta : dict
        ``n, block_size, rank, causal, first, chunk, scale, count_scaling, query_coarsening,
        learned, boxes, box_base, n_rows`` (``learned``: the row biases of
        :func:`learned_row_biases` or ``None``).
    """
    from ..cpu import block_attention  # compiled on first use in each worker
    from ..cpu._launch import launch_guard

    q, k, v, valid = chunk
    tree = build_tree(meta["n"], block_size=meta["block_size"], rank=meta["rank"], causal=meta["causal"])
    dtype = q.dtype
    B, c, d = q.shape
    dv = v.shape[2]
    m = tree.block_size
    left = 0 if halo_left is None else halo_left[0].shape[1]
    right = 0 if halo_right is None else halo_right[0].shape[1]
    has_mask = valid is not None
    ks, vs, vals = [k], [v], [valid]
    if halo_left is not None:
        ks.insert(0, halo_left[0])
        vs.insert(0, halo_left[1])
        vals.insert(0, halo_left[2])
    if halo_right is not None:
        ks.append(halo_right[0])
        vs.append(halo_right[1])
        vals.append(halo_right[2])
    k_local = np.ascontiguousarray(np.concatenate(ks, axis=1), dtype=dtype)
    v_local = np.ascontiguousarray(np.concatenate(vs, axis=1), dtype=dtype)
    n_local = k_local.shape[1]
    q_local = np.zeros((B, n_local, d), dtype=dtype)
    q_local[:, left : left + c] = q
    if has_mask:
        key_bias = np.where(np.concatenate(vals, axis=1), 0.0, -np.inf).astype(dtype)
    else:
        key_bias = np.zeros((1, 1), dtype=dtype)
    kc, vc, cbias = _coarse_rows(meta, exports, export_dest, totals, total_dest, B, d, dv, dtype)
    coarse_q = meta["query_coarsening"]
    ptr, segments, max_keys = _local_plan(tree, meta["first"], c, left, right, meta["boxes"], meta["box_base"],
                                          with_far=not coarse_q)
    n_local_blocks = ptr.size - 1
    if coarse_q:
        inherit = (True, *_coarse_query_partials(tree, q, valid, meta, q_totals, kc, vc, cbias, n_local_blocks,
                                                 left // m))
    else:
        inherit = (False, np.zeros((1, 1), dtype), np.zeros((1, 1), dtype), np.zeros((1, 1, 1), dtype))
    out = np.empty((B, n_local, dv), dtype=dtype)
    lse = np.empty((B, n_local), dtype=dtype)
    with launch_guard():
        ids = np.arange(B, dtype=np.int64)  # one query and key set per entry, no offset
        block_attention(
            q_local, k_local, v_local, ids, ids, 0, key_bias, has_mask, kc, vc, cbias, ptr[None, :-1], ptr[None, 1:],
            segments[None], max_keys, m, dtype.type(meta["scale"]), tree.causal, *inherit, out, lse,
        )
    return out[:, left : left + c], lse[:, left : left + c]
