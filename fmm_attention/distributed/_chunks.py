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
def sub_box_sums(k, v, valid, sizes):
    """Sums of keys/values and valid counts over aligned sub-boxes of each size in ``sizes``.

    ``sizes`` are powers of two dividing the chunk's nominal length, ascending; the chunk
    starts on a multiple of each. Returns ``{size: (ksum, vsum, count)}`` in float64 with
    ``ceil(c / size)`` rows, built by pairwise merging (O(c d) for all sizes together).
    """
    B, c, _d = k.shape
    if valid is not None:
        k = np.where(valid[..., None], k, 0)
        v = np.where(valid[..., None], v, 0)
        count = valid.astype(np.float64)
    else:
        count = np.ones((B, c))
    ksum, vsum = k.astype(np.float64), v.astype(np.float64)
    size = 1
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
        out[want] = (ksum, vsum, count)
    return out


def chunk_upward(chunk, sizes, with_total):
    """Upward pass of one chunk ``(q, k, v, valid)``: sub-box sums for ``sizes`` and, if asked, the chunk total."""
    _, k, v, valid = chunk
    sums = sub_box_sums(k, v, valid, sizes)
    total = None
    if with_total:
        kt = np.where(valid[..., None], k, 0) if valid is not None else k
        vt = np.where(valid[..., None], v, 0) if valid is not None else v
        cnt = valid.sum(axis=1).astype(np.float64) if valid is not None else np.full(k.shape[0], float(k.shape[1]))
        total = (kt.sum(axis=1, dtype=np.float64), vt.sum(axis=1, dtype=np.float64), cnt)
    return sums, total


def export_rows(up, picks):
    """The rows of one chunk's upward pass another chunk lists: ``[(ksum, vsum, count), ...]``."""
    sums, _ = up
    return [tuple(a[:, rows] for a in sums[size]) for size, rows in picks]


def chunk_total(up):
    """The chunk total of an upward pass (``(B, d)``, ``(B, dv)``, ``(B,)``)."""
    return up[1]


def add_totals(a, b):
    """Sum of two sub-box totals (the tree reduction above the chunk size)."""
    return tuple(x + y for x, y in zip(a, b))


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


def _local_plan(tree, first, length, left, right, boxes, box_base):
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
    for level, listed, start in zip(tree.levels, boxes, box_base):
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


def fma_chunk(chunk, halo_left, halo_right, exports, export_dest, totals, total_dest, meta):
    """FMA outputs ``(out, lse)`` of one sequence chunk from its own tokens, halos and coarse rows.

    Parameters
    ----------
    chunk : tuple
        The chunk's tokens ``(q, k, v)`` ``(B, c, .)`` and validity (or ``None``).
    halo_left, halo_right : tuple or None
        ``(k, v, valid)`` of the ``m`` tokens before / after the chunk.
    exports, export_dest
        Lists of sub-box sums sent by the chunks holding listed boxes, and for each the
        rows of the local coarse buffer they fill.
    totals, total_dest
        Sums of the sub-boxes larger than a chunk (from the tree reduction) and their rows.
    meta : dict
        ``n, block_size, rank, causal, first, scale, count_scaling, boxes, box_base, n_rows``.
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
    # coarse rows: means of the listed sub-boxes, bias log(count), masked when empty
    rows = max(1, meta["n_rows"])
    ksum = np.zeros((B, rows, d))
    vsum = np.zeros((B, rows, dv))
    count = np.zeros((B, rows))
    for parts, dests in zip(exports, export_dest):
        for (a, b, cnt), dest in zip(parts, dests):
            ksum[:, dest], vsum[:, dest], count[:, dest] = a, b, cnt
    for (a, b, cnt), dest in zip(totals, total_dest):
        ksum[:, dest], vsum[:, dest], count[:, dest] = a, b, cnt
    filled = count > 0
    inv = np.divide(1.0, count, out=np.zeros_like(count), where=filled)
    kc = np.ascontiguousarray(ksum * inv[..., None], dtype=dtype)
    vc = np.ascontiguousarray(vsum * inv[..., None], dtype=dtype)
    with np.errstate(divide="ignore"):
        bias = np.log(np.where(filled, count, 1.0)) if meta["count_scaling"] else np.zeros_like(count)
    cbias = np.where(filled, bias, -np.inf).astype(dtype)
    ptr, segments, max_keys = _local_plan(tree, meta["first"], c, left, right, meta["boxes"], meta["box_base"])
    out = np.empty((B, n_local, dv), dtype=dtype)
    lse = np.empty((B, n_local), dtype=dtype)
    none = (np.zeros((1, 1), dtype), np.zeros((1, 1), dtype), np.zeros((1, 1, 1), dtype))
    with launch_guard():
        block_attention(
            q_local, k_local, v_local, key_bias, has_mask, kc, vc, cbias, ptr[None, :-1], ptr[None, 1:],
            segments[None], max_keys, m, dtype.type(meta["scale"]), tree.causal, False, *none,
            _config.FMA_CHUNKS_PER_THREAD * numba.get_num_threads(), out, lse,
        )
    return out[:, left : left + c], lse[:, left : left + c]
