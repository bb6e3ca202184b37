"""Fastformer additive attention on the CPU, O(n d) time and memory.

The semantics are stated in :doc:`/semantics`. Notation: ``s`` the logit scale,
``a_i = s q_i . w_q``, ``qg = sum_i softmax(a)_i q_i``, ``p_i = qg * k_i``,
``b_i = s p_i . w_k``, ``kg = sum_i softmax(b)_i p_i``, output ``u_i = kg * v_i``.
Masked positions leave both softmaxes; their output is still ``kg * v_i``.

Bidirectional: each pool is a two-pass reduction. :func:`chunk_partials` runs in parallel
over ``(batch, chunk)`` jobs and leaves one ``(max, sum, weighted sum)`` partial per chunk;
:func:`merge_partials` combines them by log-sum-exp. Two algebraic shortcuts keep it to one
read of each input: ``b_i = k_i . (s qg * w_k)`` and ``sum_i e_i p_i = qg * sum_i e_i k_i``,
so ``p`` is never formed. A third parallel pass, :func:`modulate`, writes ``u``.

Causal: a chunked scan (:func:`_causal`), parallel along the sequence as well as over the
leading dims. Each pool is an online softmax (running maximum, running sums rescaled
whenever it grows, so weights are ``exp(logit - running max) <= 1`` and logits of any size
are safe); the state entering each chunk is the log-sum-exp merge of the partials of the
chunks before it, so every chunk runs its stretch of the scan independently. The earlier
kernel walked each sequence on one thread: at n = 2**20 with one head the second core
idled.

Threads: each parallel pass is a serial ``nogil`` kernel over a range of ``(batch, chunk)``
jobs, run on the library's threads (:class:`._launch.Threaded`) rather than a ``prange``
loop, whose body Numba compiles three times. The jobs are fixed by the shapes and
``chunk``, and each writes only its own entries, so the result does not depend on the
thread count or on how the jobs are split.
"""

import numpy as np

from .. import _config
from ._jit import jit
from ._launch import Threaded, launch_guard
from ._softmax import exp_inplace
from .finite import _max_exponent_range, exponent_bits


@jit()
def _row_exponent(bits, b, i, exponent_mask, top):
    """``max(top, bits[b, i, e] & exponent_mask over e)``: the finiteness check of one row
    (:func:`.finite._max_exponent_range`), read while the row is in the cache."""
    row = bits[b, i]
    return max(top, _max_exponent_range(row, exponent_mask, np.int64(0), row.size))


@jit(nogil=True)
def _chunk_partials_jobs(job_lo, job_hi, x, w, valid, has_mask, chunk, part_max, part_sum, part_vec, x_bits,
                         exponent_mask, check, part_exponent):
    """Per-chunk softmax partials of the logits ``x[b, i] . w[b]`` over the rows ``x[b, i]``,
    for the ``(batch, chunk)`` jobs ``job_lo <= job < job_hi`` (``job = b * C + c``).

    Parameters
    ----------
    x : (B, n, d) rows to pool; w : (B, d) logit vector (scale already applied).
    valid, has_mask : (B, n) bool key validity, used only when ``has_mask``.
    chunk : sequence positions per job.
    part_max, part_sum : (B, C) out, ``C = ceil(n / chunk)``: each chunk's largest logit
        (``-inf`` when it has no valid row) and ``sum_i exp(logit_i - max)``.
    part_vec : (B, C, d) out, ``sum_i exp(logit_i - max) x[b, i]``.
    x_bits, exponent_mask, check, part_exponent : with ``check``, the largest exponent field
        of each chunk's rows (all of them, masked or not) goes to ``part_exponent`` (B, C),
        from ``x_bits``, ``x`` viewed as unsigned integers (the fused ``check_finite``).
    """
    n_batch, n, d = x.shape
    n_chunks = part_max.shape[1]
    for job in range(job_lo, job_hi):
        b = job // n_chunks
        c = job % n_chunks
        i0 = c * chunk
        i1 = min(n, i0 + chunk)
        logits = np.empty(i1 - i0, dtype=x.dtype)
        top = x.dtype.type(-np.inf)
        exponent = x_bits.dtype.type(0)
        for i in range(i1 - i0):
            acc = x.dtype.type(0)
            for e in range(d):
                acc += x[b, i0 + i, e] * w[b, e]
            if check:
                exponent = _row_exponent(x_bits, b, i0 + i, exponent_mask, exponent)
            if has_mask and not valid[b, i0 + i]:
                acc = -np.inf
            logits[i] = acc
            top = max(top, acc)
        part_exponent[b, c] = exponent
        part_max[b, c] = top
        part_vec[b, c] = 0
        if top == -np.inf:
            part_sum[b, c] = 0
            continue
        logits -= top
        exp_inplace(logits)
        part_sum[b, c] = logits.sum()
        vec = part_vec[b, c]
        for i in range(i1 - i0):
            weight = logits[i]
            for e in range(d):
                vec[e] += weight * x[b, i0 + i, e]


def _chunk_partials_layout(x, w, valid, has_mask, chunk, part_max, *args):
    # a multiply-add per entry for the logits, another for the weighted sum
    return part_max.size, 2 * x.size


#: :func:`_chunk_partials_jobs` over every ``(batch, chunk)`` job, split over the threads
#: (:class:`._launch.Threaded`: a serial ``nogil`` kernel, no ``prange`` to compile).
chunk_partials = Threaded(_chunk_partials_jobs, _chunk_partials_layout)


@jit(nogil=True)
def _modulate_jobs(job_lo, job_hi, kg, v, chunk, out, v_bits, exponent_mask, check, part_exponent):
    """``out[b, i] = kg[b] * v[b, i]`` for the ``(batch, chunk)`` jobs ``job_lo <= job < job_hi``;
    with ``check``, each chunk's largest exponent field of ``v`` into ``part_exponent`` (B, C)
    (as :func:`_chunk_partials_jobs`)."""
    n_batch, n, d = v.shape
    n_chunks = (n + chunk - 1) // chunk
    for job in range(job_lo, job_hi):
        b = job // n_chunks
        i0 = (job % n_chunks) * chunk
        exponent = v_bits.dtype.type(0)
        # explicit loops: the row expression out[b, i0:i1] = v[b, i0:i1] * kg[b] built a
        # temporary of the whole chunk first, an extra write and read of it
        for i in range(i0, min(n, i0 + chunk)):
            for e in range(d):
                out[b, i, e] = kg[b, e] * v[b, i, e]
            if check:
                exponent = _row_exponent(v_bits, b, i, exponent_mask, exponent)
        part_exponent[b, job % n_chunks] = exponent


def _modulate_layout(kg, v, chunk, out, *args):
    return v.shape[0] * -(-v.shape[1] // chunk), v.size


#: :func:`_modulate_jobs` over every ``(batch, chunk)`` job, split over the threads.
modulate = Threaded(_modulate_jobs, _modulate_layout)


@jit()
def _online_add(acc, top, total, logit, x):
    """Add ``exp(logit) x`` to the running softmax sums ``(top, total, acc)``; returns the new
    ``(top, total)``, ``acc`` updated in place.

    One exponential per step: one of the two factors of the usual update is ``exp(0) = 1``
    (the running maximum either stays, or moves to ``logit``).
    """
    if logit > top:  # also the first term: top = -inf, shrink = 0
        shrink = np.exp(top - logit)
        for e in range(acc.size):
            acc[e] = acc[e] * shrink + x[e]
        return logit, total * shrink + 1
    weight = np.exp(logit - top)
    for e in range(acc.size):
        acc[e] += weight * x[e]
    return top, total + weight


@jit()
def exclusive_scan(part_max, part_sum, part_vec, carry_max, carry_sum, carry_vec):
    """Carry into every chunk: the log-sum-exp merge of the partials of the chunks before it.

    ``carry[b, c]`` merges ``part[b, :c]`` in order (``(-inf, 0, 0)`` for ``c = 0``); serial,
    ``O(B C d)``.
    """
    n_batch, n_chunks, d = part_vec.shape
    for b in range(n_batch):
        top = part_max.dtype.type(-np.inf)
        total = part_max.dtype.type(0)
        acc = np.zeros(d, dtype=part_vec.dtype)
        for c in range(n_chunks):
            carry_max[b, c] = top
            carry_sum[b, c] = total
            # a loop: the row assignment compiled a shape check and its error message
            for e in range(d):
                carry_vec[b, c, e] = acc[e]
            m = part_max[b, c]
            if m == -np.inf:
                continue
            new = max(top, m)
            old = np.exp(top - new)
            own = np.exp(m - new)
            total = total * old + part_sum[b, c] * own
            for e in range(d):
                acc[e] = acc[e] * old + part_vec[b, c, e] * own
            top = new


@jit(nogil=True)
def _causal_queries_jobs(job_lo, job_hi, q, k, w_q, w_k, valid, has_mask, chunk, carry_max, carry_sum, carry_vec,
                         store_pools, p, logits_k, qg_out, part_max, part_sum, part_vec, k_bits, exponent_mask, check,
                         part_exponent):
    """Causal scan, second pass: prefix query pools, ``p_i``, ``b_i`` and per-chunk key partials,
    for the ``(batch, chunk)`` jobs ``job_lo <= job < job_hi``.

    ``carry_*`` (B, C[, d]) is the query pool state entering each chunk (from
    :func:`exclusive_scan` of :func:`chunk_partials`). Each ``(batch, chunk)`` job
    continues the online softmax from its carry, writes ``p_i = qg_i * k_i`` to ``p`` (zero at
    masked positions), ``b_i = p_i . w_k`` to ``logits_k`` (``-inf`` at masked positions), the
    prefix pools to ``qg_out`` when ``store_pools`` (zero before the first valid position),
    and its chunk's key softmax partial ``(max, sum, sum_i exp(b_i - max) p_i)``; with
    ``check``, the chunk's largest exponent field of ``k`` (every row) into ``part_exponent``.
    """
    n_batch, n, d = q.shape
    n_chunks = carry_max.shape[1]
    for job in range(job_lo, job_hi):
        b = job // n_chunks
        c = job % n_chunks
        i0 = c * chunk
        i1 = min(n, i0 + chunk)
        acc = carry_vec[b, c].copy()
        top = carry_max[b, c]
        total = carry_sum[b, c]
        qg = acc / total if total > 0 else np.zeros(d, dtype=q.dtype)  # a masked first row keeps the carry
        total = np.float64(total)  # the running sum is float64 (_online_add's `+ 1` promotes it)
        k_top = q.dtype.type(-np.inf)
        exponent = k_bits.dtype.type(0)
        for i in range(i0, i1):
            if check:
                exponent = _row_exponent(k_bits, b, i, exponent_mask, exponent)
            if not has_mask or valid[b, i]:
                a = q.dtype.type(0)
                for e in range(d):
                    a += q[b, i, e] * w_q[b, e]
                top, total = _online_add(acc, top, total, a, q[b, i])
                inv = 1 / total
                for e in range(d):
                    qg[e] = acc[e] * inv
                    p[b, i, e] = qg[e] * k[b, i, e]
                # a loop of its own: fused with the stores above, the sum's vectorised form
                # (and so its last bits) depended on where malloc put ``qg``, a fresh array on
                # each thread (a run-time overlap check, it seems): bits moved with the threads
                logit = q.dtype.type(0)
                for e in range(d):
                    logit += p[b, i, e] * w_k[b, e]
                logits_k[b, i] = logit
                k_top = max(k_top, logit)
            else:
                logits_k[b, i] = -np.inf
                p[b, i] = 0
            if store_pools:
                # loops: a row assignment compiles a shape check and its error message
                if total > 0:
                    for e in range(d):
                        qg_out[b, i, e] = qg[e]
                else:
                    for e in range(d):
                        qg_out[b, i, e] = 0
        part_exponent[b, c] = exponent
        part_max[b, c] = k_top
        part_sum[b, c] = 0
        part_vec[b, c] = 0
        if k_top == -np.inf:
            continue
        weights = logits_k[b, i0:i1] - k_top
        exp_inplace(weights)
        part_sum[b, c] = weights.sum()
        vec = part_vec[b, c]
        for i in range(i1 - i0):
            for e in range(d):
                vec[e] += weights[i] * p[b, i0 + i, e]


def _causal_queries_layout(q, k, w_q, w_k, valid, has_mask, chunk, carry_max, *args):
    # per entry: the query logit, the pool update, p_i, the key logit, the key partial
    return carry_max.size, 5 * q.size


#: :func:`_causal_queries_jobs` over every ``(batch, chunk)`` job, split over the threads.
causal_queries = Threaded(_causal_queries_jobs, _causal_queries_layout)


@jit(nogil=True)
def _causal_keys_jobs(job_lo, job_hi, v, valid, has_mask, chunk, carry_max, carry_sum, carry_vec, store_pools,
                      logits_k, out, kg_out, v_bits, exponent_mask, check, part_exponent):
    """Causal scan, last pass: prefix key pools ``kg_i`` and ``u_i = kg_i * v_i``, for the
    ``(batch, chunk)`` jobs ``job_lo <= job < job_hi``.

    ``out`` holds ``p_i`` on entry (from :func:`causal_queries`) and ``u_i`` on return: each
    row is read before it is overwritten. ``carry_*`` is the key pool state entering each
    chunk. A position with no valid position at or before it gets zero pools and output.
    With ``check``, the chunk's largest exponent field of ``v`` into ``part_exponent``.
    """
    n_batch, n, d = v.shape
    n_chunks = carry_max.shape[1]
    for job in range(job_lo, job_hi):
        b = job // n_chunks
        c = job % n_chunks
        i0 = c * chunk
        i1 = min(n, i0 + chunk)
        acc = carry_vec[b, c].copy()
        top = carry_max[b, c]
        total = np.float64(carry_sum[b, c])  # float64, as _online_add's `+ 1` makes it
        exponent = v_bits.dtype.type(0)
        for i in range(i0, i1):
            if check:
                exponent = _row_exponent(v_bits, b, i, exponent_mask, exponent)
            if not has_mask or valid[b, i]:
                top, total = _online_add(acc, top, total, logits_k[b, i], out[b, i])
            if total > 0:
                inv = 1 / total
                for e in range(d):
                    kg = acc[e] * inv
                    out[b, i, e] = kg * v[b, i, e]
                    if store_pools:
                        kg_out[b, i, e] = kg
            else:
                out[b, i] = 0
                if store_pools:
                    kg_out[b, i] = 0
        part_exponent[b, c] = exponent


def _causal_keys_layout(v, valid, has_mask, chunk, carry_max, *args):
    # per entry: the pool update and the output
    return carry_max.size, 3 * v.size


#: :func:`_causal_keys_jobs` over every ``(batch, chunk)`` job, split over the threads.
causal_keys = Threaded(_causal_keys_jobs, _causal_keys_layout)


def merge_partials(part_max, part_sum, part_vec):
    """Log-sum-exp merge of chunk partials into the pooled vector ``(B, d)``.

    Each chunk's sums are rescaled by ``exp(chunk max - overall max)``; a batch entry with no
    valid position at all (every max ``-inf``) pools to zero.
    """
    top = part_max.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    rescale = np.exp(part_max - top)
    total = (rescale * part_sum).sum(axis=1)[:, None]
    pooled = np.einsum("bc,bcd->bd", rescale, part_vec)
    return np.divide(pooled, total, out=np.zeros_like(pooled), where=total > 0)


class _FusedCheck:
    """The ``check_finite`` of one call, fused into the passes that read the inputs.

    Each pass that reads ``q``, ``k`` or ``v`` takes its unsigned-integer view and leaves the
    largest exponent field of every chunk it read (:func:`_row_exponent`), so no separate
    pass reads the inputs again: at n = 2**20 that pass was a third of the call. The check
    covers every position, masked or not, as the separate pass did. Each input's result is
    looked at once its pass is done (:meth:`raise_if_not_finite`), before any NumPy
    arithmetic on what the pass produced, so the ``ValueError`` comes where the separate
    check raised it, naming the first of ``q``, ``k``, ``v`` that holds NaN or infinity.
    """

    def __init__(self, enabled, n_batch, n_chunks):
        self.enabled = enabled
        self.shape = (n_batch, n_chunks)  # every job writes its entry, checked or not
        self.parts = {}

    def args(self, x, name):
        """``(bits, exponent_mask, check, part_exponent)`` for a pass reading ``x`` as ``name``."""
        bits, mask = exponent_bits(x)
        part = np.zeros(self.shape, dtype=bits.dtype)
        self.parts[name] = (part, mask)
        return bits, mask, self.enabled, part

    def raise_if_not_finite(self, *names):
        """Raise the ``ValueError`` of ``check_finite`` for the first of ``names`` that failed."""
        if not self.enabled:
            return
        from .._validate import nonfinite_error

        for name in names:
            part, mask = self.parts[name]
            if part.size and part.max() == mask:
                raise nonfinite_error(name)


def _pool(x, w, valid, has_mask, chunk, check, name):
    """Softmax pool of the rows of ``x`` (B, n, d) by the logits ``x . w``: ``(B, d)``;
    ``check`` (a :class:`_FusedCheck`) checks ``x`` as ``name`` before the partials are merged."""
    n_batch, n, d = x.shape
    n_chunks = (n + chunk - 1) // chunk
    part_max = np.empty((n_batch, n_chunks), dtype=x.dtype)
    part_sum = np.empty((n_batch, n_chunks), dtype=x.dtype)
    part_vec = np.empty((n_batch, n_chunks, d), dtype=x.dtype)
    chunk_partials(x, w, valid, has_mask, chunk, part_max, part_sum, part_vec, *check.args(x, name))
    check.raise_if_not_finite(name)
    return merge_partials(part_max, part_sum, part_vec)


def _causal(q, k, v, w_q, w_k, valid, has_mask, chunk, store_pools, out, qg_out, kg_out, check):
    """Causal Fastformer as a chunked scan, every pass parallel over ``(batch, chunk)`` jobs.

    Query pool: chunk partials (:func:`chunk_partials`), carries into each chunk
    (:func:`exclusive_scan`), then :func:`causal_queries` continues the online softmax from
    its carry through the chunk, writing ``p_i`` into ``out`` and the key logits. Key pool:
    the same scan over ``p`` (:func:`causal_keys` overwrites ``p_i`` by ``u_i``). The chunks
    are fixed by ``chunk``, not by the thread count, so the result does not depend on it.
    ``check`` (a :class:`_FusedCheck`) collects the finiteness of ``q``, ``k``, ``v``.
    """
    n_batch, n, d = q.shape
    n_chunks = (n + chunk - 1) // chunk
    parts = [np.empty((n_batch, n_chunks), q.dtype), np.empty((n_batch, n_chunks), q.dtype),
             np.empty((n_batch, n_chunks, d), q.dtype)]
    carry = [np.empty_like(x) for x in parts]
    logits_k = np.empty((n_batch, n), q.dtype)
    chunk_partials(q, w_q, valid, has_mask, chunk, *parts, *check.args(q, "q"))
    exclusive_scan(*parts, *carry)
    causal_queries(q, k, w_q, w_k, valid, has_mask, chunk, *carry, store_pools, out, logits_k, qg_out, *parts,
                   *check.args(k, "k"))
    exclusive_scan(*parts, *carry)
    causal_keys(v, valid, has_mask, chunk, *carry, store_pools, logits_k, out, kg_out, *check.args(v, "v"))


def fastformer_batch(batch, w_q, w_k, *, causal, return_pools, check_finite=False):
    """Fastformer attention core of a validated batch.

    Parameters
    ----------
    batch : fmm_attention._validate.Batch
        ``q``, ``k``, ``v`` of shape ``(B, n, d)``.
    w_q, w_k : ndarray, shape (B, d)
        Additive-attention vectors in ``batch.dtype``, one per batch entry (unscaled).
    causal, return_pools : bool
    check_finite : bool, optional
        Raise ``ValueError`` naming the first of ``q``, ``k``, ``v`` that holds NaN or
        infinity anywhere, checked inside the passes that read them (:class:`_FusedCheck`);
        the caller then skips the separate check.

    Returns
    -------
    (out, qg, kg)
        ``out`` (B, n, d); the pools ``qg``, ``kg`` are ``(B, d)`` bidirectional, ``(B, n, d)``
        causal, or ``None`` when causal and not ``return_pools``. The chunk length of the
        parallel reductions is read from ``_config.FASTFORMER_CHUNK`` at call time.
    """
    dtype = batch.dtype
    scale = dtype.type(batch.scale)
    chunk = max(1, int(_config.FASTFORMER_CHUNK))
    has_mask = batch.valid is not None
    valid = batch.valid if has_mask else np.ones((1, 1), dtype=np.bool_)
    w_q = (w_q * scale).astype(dtype, copy=False)
    out = np.empty_like(batch.v)
    n_batch, n = batch.q.shape[:2]
    check = _FusedCheck(check_finite, n_batch, -(-n // chunk))

    with launch_guard():
        if causal:
            shape = batch.q.shape if return_pools else (1, 1, 1)
            qg, kg = np.empty(shape, dtype), np.empty(shape, dtype)
            w_k = (w_k * scale).astype(dtype, copy=False)
            # compiled passes only: nothing computes on a bad input's results before the check
            _causal(batch.q, batch.k, batch.v, w_q, w_k, valid, has_mask, chunk, return_pools, out, qg, kg, check)
            check.raise_if_not_finite("q", "k", "v")
            return (out, qg, kg) if return_pools else (out, None, None)
        qg = _pool(batch.q, w_q, valid, has_mask, chunk, check, "q")
        # b_i = s (qg * k_i) . w_k = k_i . (s qg * w_k);  sum_i e_i p_i = qg * sum_i e_i k_i
        kg = qg * _pool(batch.k, (qg * w_k * scale).astype(dtype, copy=False), valid, has_mask, chunk, check, "k")
        modulate(kg, batch.v, chunk, out, *check.args(batch.v, "v"))
        check.raise_if_not_finite("v")
    return out, qg, kg
