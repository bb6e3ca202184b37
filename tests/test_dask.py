"""The three attention functions on Dask arrays (``fmm_attention.distributed.dask``).

Results are compared with the single-machine NumPy calls on the same data, computed on a
``LocalCluster`` of two worker *processes*; the graph checks run on the synchronous
scheduler, where every task's result can be inspected.
"""

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

from dask.callbacks import Callback
from dask.core import get_dependencies

import fmm_attention as fa
from fmm_attention import LearnedCoarsening
from fmm_attention.distributed import is_dask
from fmm_attention.distributed.dask import check_fma_chunks, nearest_valid_chunk

TOL = 1e-12


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1, dashboard_address=":0")
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def _data(B=2, n=1000, d=8, dv=None, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, B, n, d))
    v = rng.standard_normal((B, n, dv or d))
    mask = rng.random((B, n)) > 0.25
    mask[-1, 100:300] = False  # a long masked run: whole boxes without a valid key
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), mask


def _lazy(arrays, chunks):
    """Dask copies of ``(B, n, f)`` arrays and ``(B, n)`` masks, chunked ``(batch, sequence)``."""
    return [None if x is None else da.from_array(x, chunks=tuple(chunks) + x.shape[2:]) for x in arrays]


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    fin = np.isfinite(b)
    assert np.array_equal(fin, np.isfinite(a))
    return np.max(np.abs(a[fin] - b[fin])) / max(np.max(np.abs(b[fin])), 1e-300)


CHUNKINGS = [(1, 1000), (2, 256), (1, 128)]  # (batch chunk, sequence chunk)


# ---------------------------------------------------------------- equality with single-machine
@pytest.mark.parametrize("causal", [False, True])
def test_exact_matches_numpy(client, causal):
    q, k, v, mask = _data(dv=5)
    lazy, refs = [], []
    for mk in (None, mask):
        ref = fa.exact_attention(q, k, v, causal=causal, key_padding_mask=mk, return_lse=True)
        for chunks in CHUNKINGS + [(2, 300)]:  # exact accepts any chunking
            dq, dk, dv, dm = _lazy((q, k, v, mk), chunks)
            out = fa.exact_attention(dq, dk, dv, causal=causal, key_padding_mask=dm, return_lse=True)
            assert all(isinstance(x, da.Array) for x in out)
            assert out[0].chunks[:2] == dq.chunks[:2]
            lazy.append(out)
            refs.append(ref)
    for (out, lse), (r_out, r_lse) in zip(dask.compute(*lazy), refs):
        assert _rel(out, r_out) < TOL
        assert _rel(lse, r_lse) < TOL


@pytest.mark.parametrize("causal", [False, True])
def test_fma_matches_numpy(client, causal):
    q, k, v, mask = _data(dv=5)
    lazy, refs = [], []
    for block_size, rank, count_scaling in ((8, 2, True), (16, 32, True), (8, 1, False)):
        for mk in (None, mask):
            opts = {"causal": causal, "block_size": block_size, "rank": rank, "count_scaling": count_scaling,
                        "key_padding_mask": mk, "return_lse": True}
            ref = fa.fmm_attention(q, k, v, **opts)
            for chunks in CHUNKINGS + [(2, 64)]:
                dq, dk, dv, dm = _lazy((q, k, v, mk), chunks)
                lazy.append(fa.fmm_attention(dq, dk, dv, **{**opts, "key_padding_mask": dm}))
                refs.append(ref)
    for (out, lse), (r_out, r_lse) in zip(dask.compute(*lazy), refs):
        assert _rel(out, r_out) < TOL
        assert _rel(lse, r_lse) < TOL


def _learned(n, d, dv, block_size, rank, seed=3):
    """Random learned coarsening (with biases) for the tree of ``(n, block_size, rank)``."""
    rng = np.random.default_rng(seed)
    levels = fa.build_tree(n, block_size=block_size, rank=rank).levels
    kw = [rng.standard_normal((lv.rank * d, 1, lv.box_size)) / lv.box_size for lv in levels]
    vw = [rng.standard_normal((lv.rank * dv, 1, lv.box_size)) / lv.box_size for lv in levels]
    kb = [rng.standard_normal(lv.rank * d) for lv in levels]
    vb = [rng.standard_normal(lv.rank * dv) for lv in levels]
    return LearnedCoarsening(kw, vw, kb, vb)


@pytest.mark.parametrize("causal", [False, True])
def test_fma_learned_and_coarse_queries_match_numpy(client, causal):
    # sequence chunks with learned coarsening (boxes inside a chunk and boxes spanning
    # several: partial convolutions tree-reduced) and coarse queries (box partials passed
    # down from boxes larger than a chunk)
    q, k, v, mask = _data(dv=5)
    cases = [{"block_size": 8, "rank": 2, "coarsening": _learned(1000, 8, 5, 8, 2)},
             {"block_size": 16, "rank": 4, "coarsening": _learned(1000, 8, 5, 16, 4), "count_scaling": False}]
    if not causal:  # coarse queries are bidirectional only
        cases += [{"block_size": 8, "rank": 2, "query_coarsening": True},
                  {"block_size": 16, "rank": 4, "query_coarsening": True, "count_scaling": False},
                  {"block_size": 8, "rank": 2, "query_coarsening": True, "coarsening": _learned(1000, 8, 5, 8, 2)}]
    for opts in cases:
        for mk in (None, mask):  # one compute per case: each graph carries its inputs
            opts = {**opts, "causal": causal, "return_lse": True}
            ref = fa.fmm_attention(q, k, v, key_padding_mask=mk, **opts)
            lazy = []
            for chunks in CHUNKINGS + [(2, 64)]:
                dq, dk, dv, dm = _lazy((q, k, v, mk), chunks)
                lazy.append(fa.fmm_attention(dq, dk, dv, key_padding_mask=dm, **opts))
            for out, lse in dask.compute(*lazy):
                assert _rel(out, ref[0]) < TOL
                assert _rel(lse, ref[1]) < TOL


@pytest.mark.parametrize("causal", [False, True])
def test_fastformer_matches_numpy(client, causal):
    q, k, v, mask = _data()
    w_q, w_k = np.random.default_rng(1).standard_normal((2, 2, 8))  # one vector per batch entry
    lazy, refs = [], []
    for mk in (None, mask):
        ref = fa.fastformer_attention(q, k, v, w_q, w_k, causal=causal, key_padding_mask=mk, return_pools=True)
        for chunks in CHUNKINGS + [(2, 300)]:
            dq, dk, dv, dm = _lazy((q, k, v, mk), chunks)
            lazy.append(fa.fastformer_attention(dq, dk, dv, w_q, w_k, causal=causal, key_padding_mask=dm,
                                                return_pools=True))
            refs.append(ref)
    for got, ref in zip(dask.compute(*lazy), refs):
        for a, b in zip(got, ref):
            assert a.shape == b.shape
            assert _rel(a, b) < TOL


def test_leading_axes_blockwise_every_option(client):
    # one sequence chunk: the NumPy function per (batch, head) block, options included
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((3, 2, 3, 64, 4))
    mask = rng.random((2, 3, 64)) > 0.2
    widths = [4, 8, 16]
    coarse = LearnedCoarsening([rng.standard_normal((2 * 4, 1, w)) / w for w in widths],
                               [rng.standard_normal((2 * 4, 1, w)) / w for w in widths])
    cases = [{"query_coarsening": True}, {"coarsening": coarse}, {"global_tokens": [0, 5], "refine": 4},
             {"coarsening": "cluster", "causal": True}]
    dq, dk, dv = (da.from_array(x, chunks=(1, 2, 64, 4)) for x in (q, k, v))
    dm = da.from_array(mask, chunks=(1, 2, 64))
    lazy = [fa.fmm_attention(dq, dk, dv, block_size=4, rank=2, key_padding_mask=dm, **c) for c in cases]
    refs = [fa.fmm_attention(q, k, v, block_size=4, rank=2, key_padding_mask=mask, **c) for c in cases]
    for got, ref in zip(dask.compute(*lazy), refs):
        assert _rel(got, ref) < TOL


def test_float32_stays_float32(client):
    q, k, v, mask = _data(dtype=np.float32)
    dq, dk, dv, dm = _lazy((q, k, v, mask), (2, 256))
    got = fa.fmm_attention(dq, dk, dv, block_size=16, rank=4, key_padding_mask=dm)
    assert got.dtype == np.float32
    ref = fa.fmm_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), block_size=16, rank=4,
                           key_padding_mask=mask)
    out = got.compute()
    assert out.dtype == np.float32
    assert _rel(out, ref) < 1e-5


def test_mixed_numpy_and_dask_inputs(client):
    q, k, v, _mask = _data()
    dk = da.from_array(k, chunks=(1, 256, 8))
    got = fa.exact_attention(q, dk, v, causal=True)
    assert isinstance(got, da.Array) and got.chunks == dk.chunks
    assert _rel(got.compute(), fa.exact_attention(q, k, v, causal=True)) < TOL


# ---------------------------------------------------------------- laziness and errors
def _exploding(shape, chunks):
    """A Dask array whose every block raises when computed."""
    def boom():
        raise RuntimeError("computed")

    blocks = da.from_delayed(dask.delayed(boom)(), shape=(shape[0], chunks, shape[2]), dtype=np.float64)
    return da.concatenate([blocks] * (shape[1] // chunks), axis=1)


@pytest.mark.parametrize("chunks", [64, 256])  # several sequence chunks; one chunk (blockwise)
def test_never_computes_on_the_client(chunks):
    q = _exploding((2, 256, 8), chunks)
    w = np.ones(8)
    calls = [
        lambda: fa.exact_attention(q, q, q, causal=True, return_lse=True)[0],
        lambda: fa.fmm_attention(q, q, q, block_size=8, rank=2),
        lambda: fa.fastformer_attention(q, q, q, w, w, causal=True),
        lambda: fa.fastformer_attention(q, q, q, w, w, return_pools=True)[1],
    ]
    for call in calls:
        out = call()  # would raise here if anything were computed eagerly
        assert isinstance(out, da.Array)
        with pytest.raises(RuntimeError, match="computed"):
            out.compute(scheduler="sync")


def test_invalid_fma_chunking_names_the_nearest_valid_size():
    q, k, v, _ = _data(B=1, n=1000)
    dq, dk, dv = (da.from_array(x, chunks=(1, 300, 8)) for x in (q, k, v))
    with pytest.raises(ValueError, match=r"nearest valid chunk size is 256"):
        fa.fmm_attention(dq, dk, dv, block_size=8, rank=2)
    with pytest.raises(ValueError, match=r">= 2 \* block_size = 32.*nearest valid chunk size is 32"):
        check_fma_chunks((16,) * 4, 16)
    with pytest.raises(ValueError, match="nearest valid chunk size is 512"):
        check_fma_chunks((512, 256, 512, 100), 8)  # unequal middle chunks
    assert check_fma_chunks((256, 256, 100), 8) == 256
    assert nearest_valid_chunk(700, 8) == 512 and nearest_valid_chunk(800, 8) == 1024


def test_unsupported_sequence_options_raise_clearly():
    q, k, v, _ = _data(B=1, n=512)
    dq, dk, dv = (da.from_array(x, chunks=(1, 128, 8)) for x in (q, k, v))
    for opts in ({"coarsening": "cluster"}, {"refine": 4}, {"global_tokens": [3]}):
        with pytest.raises(ValueError, match="rechunk the sequence axis into one chunk"):
            fa.fmm_attention(dq, dk, dv, block_size=8, rank=2, **opts)
    with pytest.raises(ValueError, match="return_stats"):
        fa.fmm_attention(dq, dk, dv, return_stats=True)
    with pytest.raises(ValueError, match="same sequence length"):
        fa.exact_attention(dq, dk[:, :500], dv)


def test_check_finite_raises_when_computed():
    q, k, v, _ = _data(B=1, n=512)
    k = k.copy()
    k[0, 300, 2] = np.nan
    dq, dk, dv = (da.from_array(x, chunks=(1, 128, 8)) for x in (q, k, v))
    out = fa.fmm_attention(dq, dk, dv, block_size=8, rank=2)  # lazy: no error yet
    with pytest.raises(ValueError, match="k contains NaN"):
        out.compute(scheduler="sync")


def test_is_dask_does_not_need_a_compute():
    assert is_dask(np.zeros(2), da.zeros(3))
    assert not is_dask(np.zeros(2), None, [1.0])


# ---------------------------------------------------------------- the graph: what each task receives
def _nbytes(obj):
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(x) for x in obj.values())
    return 0


def _foreign_bytes(result, input_names):
    """Per task: bytes it receives from results that do not descend from its own chunk only.

    A task's *home* is the sequence chunk of its largest input (when that input descends
    from one chunk); every other input descending from another chunk counts as foreign.
    """
    dsk = dict(result.__dask_graph__())
    sizes = {}

    class Record(Callback):
        def _posttask(self, key, value, dsk, state, id):
            sizes[key] = _nbytes(value)

    with Record():
        dask.get(dsk, list(dsk))
    deps = {key: get_dependencies(dsk, key) for key in dsk}
    origin = {}

    def chunks_of(key):
        if key not in origin:
            if isinstance(key, tuple) and key[0] in input_names:
                origin[key] = frozenset([key[2]])  # (name, batch, chunk[, feature])
            else:
                origin[key] = frozenset().union(*[chunks_of(d) for d in deps[key]]) if deps[key] else frozenset()
        return origin[key]

    foreign = {}
    for key, ds in deps.items():
        if not ds:
            continue
        big = max(sorted(ds, key=str), key=lambda d: sizes.get(d, 0))
        home = chunks_of(big)
        foreign[key] = sum(sizes.get(d, 0) for d in ds if not chunks_of(d) <= home) if len(home) == 1 else 0
    return foreign


def test_fma_tasks_receive_only_halos_and_coarse_rows():
    # 8 chunks long enough that a chunk's tokens outweigh what it may receive: from each
    # neighbour its near outbox (halos of 8 tokens, the rows both neighbours list), from the
    # other chunks their far outbox (a few rows each), and pyramid nodes
    n, chunk, d = 16384, 2048, 8
    q, k, v, mask = _data(B=1, n=n, d=d)
    names = ("q-in", "k-in", "v-in", "m-in")
    dq, dk, dv = (da.from_array(x, chunks=(1, chunk, d), name=nm) for x, nm in zip((q, k, v), names))
    dm = da.from_array(mask[:1], chunks=(1, chunk), name=names[3])
    chunk_kv = 2 * chunk * d * 8
    learned = _learned(n, d, d, 8, 2)
    cases = [{"causal": False}, {"causal": True}, {"causal": True, "coarsening": learned},
             {"query_coarsening": True}, {"query_coarsening": True, "coarsening": learned}]
    for opts in cases:
        out = fa.fmm_attention(dq, dk, dv, block_size=8, rank=2, key_padding_mask=dm, **opts)
        foreign = _foreign_bytes(out, names)
        # halos and the listed coarse rows: a small fraction of a chunk's k + v
        assert 0 < max(foreign.values()) < 0.2 * chunk_kv
    # the check can fail: in the exact ring a query chunk and another chunk's keys and
    # values meet in one task (whichever is home, the other is a whole chunk's tokens)
    ring = _foreign_bytes(fa.exact_attention(dq, dk, dv, key_padding_mask=dm), names)
    assert max(ring.values()) >= 0.5 * chunk_kv


def test_fma_graph_is_compact():
    # the client wires the graph from each chunk's plan but ships only the few rows a chunk
    # lists of another one (each chunk's own plan, its large row tables, is drawn on the
    # worker), and one outbox task per chunk replaces the export, halo and pyramid-part
    # tasks: before, this graph pickled to 1.36 MB with 116 keys (one outbox: 24 KB, 80)
    import pickle

    n, chunk = 2**17, 2**14
    x = da.zeros((1, n, 8), chunks=(1, chunk, 8))
    for opts in ({}, {"causal": True}, {"query_coarsening": True}):
        graph = dict(fa.fmm_attention(x, x, x, block_size=8, rank=2, **opts).__dask_graph__())
        assert len(graph) <= 11 * (n // chunk)
        assert len(pickle.dumps(graph, protocol=5)) < 64 * 1024
