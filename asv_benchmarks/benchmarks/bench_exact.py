"""Exact softmax attention: time, FLOP rate and peak memory against n."""

import fmm_attention

from . import _common as c


class ExactAttention:
    """Time and FLOP rate of :func:`fmm_attention.exact_attention`, one head, d = 64."""

    params = [c.EXACT_SIZES, [False, True], c.DTYPES, c.BACKENDS]
    param_names = ["n", "causal", "dtype", "backend"]
    # a call takes up to about a minute at n = 65536 on two cores: one warm-up-free sample
    # or a few, one round
    number = 1
    repeat = (1, 3, 30.0)
    warmup_time = 0.0
    rounds = 1
    timeout = 900

    def setup(self, n, causal, dtype, backend):
        c.require_backend(backend)
        c.warm("exact", dtype, backend, causal=causal)
        self.q, self.k, self.v = c.inputs(n, dtype, backend)

    def _call(self, causal, backend):
        out = fmm_attention.exact_attention(self.q, self.k, self.v, causal=causal, backend=backend)
        c.synchronize(backend)
        return out

    def time_exact_attention(self, n, causal, dtype, backend):
        self._call(causal, backend)

    def track_gflops(self, n, causal, dtype, backend):
        seconds = c.perf.best_time(lambda: self._call(causal, backend), repeat=1 if n >= 16384 else 3)
        return c.perf.attention_flops("exact", n, d=c.D, causal=causal) / seconds / 1e9

    track_gflops.unit = "GFLOP/s"


class ExactAttentionMemory:
    """Peak memory of exact attention on the CPU; ``peakmem_reference`` holds only inputs and output."""

    params = [c.EXACT_SIZES, [False, True], c.DTYPES]
    param_names = ["n", "causal", "dtype"]
    timeout = 900

    def setup(self, n, causal, dtype):
        c.warm("exact", dtype, causal=causal)
        self.q, self.k, self.v = c.inputs(n, dtype)

    def peakmem_exact_attention(self, n, causal, dtype):
        fmm_attention.exact_attention(self.q, self.k, self.v, causal=causal, backend="cpu")

    def peakmem_reference(self, n, causal, dtype):
        c.reference_output(self.v)
