"""Fastformer additive attention: time and peak memory against n.

Skipped (``NotImplementedError`` in setup) where ``fmm_attention.fastformer_attention`` is
not available.
"""

import fmm_attention

from . import _common as c


def _require_fastformer():
    if not hasattr(fmm_attention, "fastformer_attention"):
        raise NotImplementedError("fmm_attention.fastformer_attention is not available")


class FastformerAttention:
    """Time of ``fmm_attention.fastformer_attention``, one head, d = 64."""

    params = [c.SIZES, [False, True], c.DTYPES, c.BACKENDS]
    param_names = ["n", "causal", "dtype", "backend"]
    timeout = 600

    def setup(self, n, causal, dtype, backend):
        _require_fastformer()
        c.require_backend(backend)
        c.warm("fastformer", dtype, backend, causal=causal)
        q, k, v = c.inputs(n, dtype, backend)
        self.call = c.perf.method_call("fastformer", q, k, v, causal=causal, backend=backend)

    def time_fastformer_attention(self, n, causal, dtype, backend):
        self.call()
        c.synchronize(backend)


class FastformerAttentionMemory:
    """Peak memory of Fastformer on the CPU; ``peakmem_reference`` holds only inputs and output."""

    params = [c.SIZES, [False, True], c.DTYPES]
    param_names = ["n", "causal", "dtype"]
    timeout = 600

    def setup(self, n, causal, dtype):
        _require_fastformer()
        c.warm("fastformer", dtype, causal=causal)
        q, k, self.v = c.inputs(n, dtype)
        self.call = c.perf.method_call("fastformer", q, k, self.v, causal=causal, backend="cpu")

    def peakmem_fastformer_attention(self, n, causal, dtype):
        self.call()

    def peakmem_reference(self, n, causal, dtype):
        c.reference_output(self.v, lse=False)
