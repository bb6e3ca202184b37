"""Fast Multipole Attention: time, FLOP rate, peak memory, options and planning against n.

Two configurations are tracked, each under its own names: the performance targets' d = 64,
``block_size=32``, ``rank=2`` (``FMMAttention``, ``FMMAttentionMemory``, ``BuildTree``), and
the library's default block size and rank, 64/4 (the same classes with the suffix
``Default``); both with fine queries (O(n log n)) and coarse queries (O(n)).
"""

import fmm_attention

from . import _common as c


def _check_options(causal, query_coarsening):
    if causal and query_coarsening:
        raise NotImplementedError("query_coarsening=True is bidirectional only")


def _plan(n, causal, query_coarsening, block_size=c.BLOCK_SIZE, rank=c.RANK):
    """Build and cache the tree and plan of one call (a first call at a new n builds them)."""
    tree = fmm_attention.build_tree(n, block_size=block_size, rank=rank, causal=causal)
    if query_coarsening:
        tree.near_plan, tree.box_tables
    else:
        tree.key_plan
    return tree


class FMMAttention:
    """Time and FLOP rate of :func:`fmm_attention.fmm_attention` (plan cached, as in repeated calls), 32/2."""

    block_size, rank = c.BLOCK_SIZE, c.RANK
    params = [c.SIZES, [False, True], [False, True], c.DTYPES, c.BACKENDS]
    param_names = ["n", "causal", "query_coarsening", "dtype", "backend"]
    timeout = 600

    def setup(self, n, causal, query_coarsening, dtype, backend):
        _check_options(causal, query_coarsening)
        c.require_backend(backend)
        self.options = dict(causal=causal, block_size=self.block_size, rank=self.rank,
                            query_coarsening=query_coarsening)
        c.warm("fma", dtype, backend, **self.options)
        _plan(n, causal, query_coarsening, self.block_size, self.rank)
        self.q, self.k, self.v = c.inputs(n, dtype, backend)

    def _call(self, backend):
        out = fmm_attention.fmm_attention(self.q, self.k, self.v, backend=backend, **self.options)
        c.synchronize(backend)
        return out

    def time_fmm_attention(self, n, causal, query_coarsening, dtype, backend):
        self._call(backend)

    def track_gflops(self, n, causal, query_coarsening, dtype, backend):
        seconds = c.perf.best_time(lambda: self._call(backend), repeat=3)
        flops = c.perf.attention_flops("fma", n, d=c.D, causal=causal, block_size=self.block_size, rank=self.rank,
                                        query_coarsening=query_coarsening)
        return flops / seconds / 1e9

    track_gflops.unit = "GFLOP/s"


class FMMAttentionMemory:
    """Peak memory of a first FMA call at each n (its plan is built inside the call) on the CPU.

    ``peakmem_reference`` holds the same inputs and an output: the difference is what FMA
    needs beyond them (target: at most 2x the bytes of q, k, v and the output, at n =
    1,048,576 in float32). Configuration 32/2.
    """

    block_size, rank = c.BLOCK_SIZE, c.RANK

    params = [c.SIZES, [False, True], [False, True], c.DTYPES]
    param_names = ["n", "causal", "query_coarsening", "dtype"]
    timeout = 600

    def setup(self, n, causal, query_coarsening, dtype):
        _check_options(causal, query_coarsening)
        self.options = dict(causal=causal, block_size=self.block_size, rank=self.rank,
                            query_coarsening=query_coarsening)
        c.warm("fma", dtype, **self.options)
        self.q, self.k, self.v = c.inputs(n, dtype)

    def peakmem_fmm_attention(self, n, causal, query_coarsening, dtype):
        fmm_attention.fmm_attention(self.q, self.k, self.v, backend="cpu", **self.options)

    def peakmem_reference(self, n, causal, query_coarsening, dtype):
        c.reference_output(self.v)


class FMMOptions:
    """FMA time against ``block_size`` and ``rank`` at n = 65,536, float32, CPU, bidirectional."""

    params = [[16, 32, 64], [1, 2, 4, 8], [False, True]]
    param_names = ["block_size", "rank", "query_coarsening"]
    n = 65536

    def setup(self, block_size, rank, query_coarsening):
        self.options = dict(block_size=block_size, rank=rank, query_coarsening=query_coarsening)
        c.warm("fma", "float32", **self.options)
        self.q, self.k, self.v = c.inputs(self.n, "float32")
        self.time_fmm_attention(block_size, rank, query_coarsening)  # builds and caches the plan

    def time_fmm_attention(self, block_size, rank, query_coarsening):
        fmm_attention.fmm_attention(self.q, self.k, self.v, backend="cpu", **self.options)


class BuildTree:
    """Planning a new length from scratch: :func:`fmm_attention.build_tree` and its key plan, 32/2."""

    block_size, rank = c.BLOCK_SIZE, c.RANK
    params = [c.SIZES, [False, True], [False, True]]
    param_names = ["n", "causal", "query_coarsening"]
    timeout = 600

    def setup(self, n, causal, query_coarsening):
        _check_options(causal, query_coarsening)
        c.perf._clear_plan_caches()  # asv re-runs setup before every timed call: each is cold

    def time_build_tree(self, n, causal, query_coarsening):
        _plan(n, causal, query_coarsening, self.block_size, self.rank)


class FMMAttentionDefault(FMMAttention):
    """As :class:`FMMAttention`, at the library's default block size and rank (64/4)."""

    block_size, rank = c.DEFAULT_BLOCK_SIZE, c.DEFAULT_RANK


class FMMAttentionMemoryDefault(FMMAttentionMemory):
    """As :class:`FMMAttentionMemory`, at the library's default block size and rank (64/4)."""

    block_size, rank = c.DEFAULT_BLOCK_SIZE, c.DEFAULT_RANK


class BuildTreeDefault(BuildTree):
    """As :class:`BuildTree`, at the library's default block size and rank (64/4)."""

    block_size, rank = c.DEFAULT_BLOCK_SIZE, c.DEFAULT_RANK
