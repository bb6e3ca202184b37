"""Grouped heads (g = 8) against the same call with k, v repeated: time and peak memory.

The issue-16 target: grouping costs no more time than the repeated call and makes no copy
of ``k``, ``v`` (the peak memory of the grouped call holds one key head per group).
"""

import numpy as np

import fmm_attention

G = 8  # query heads per key/value head
HK = 2
D = 64


def _inputs(n, dtype):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((HK * G, n, D)).astype(dtype)
    k, v = rng.standard_normal((2, HK, n, D)).astype(dtype)
    return q, k, v


class GroupedHeads:
    """``exact_attention`` and ``fmm_attention`` with ``Hq = 8 Hk``, float32, d = 64."""

    params = [["exact", "fmm"], ["grouped", "repeated"]]
    param_names = ["method", "kv"]
    number = 1
    repeat = (1, 3, 30.0)
    warmup_time = 0.0
    timeout = 900

    def setup(self, method, kv):
        n = 4096 if method == "exact" else 16384
        self.q, self.k, self.v = _inputs(n, np.float32)
        if kv == "repeated":
            self.k, self.v = np.repeat(self.k, G, axis=0), np.repeat(self.v, G, axis=0)
        self.func = fmm_attention.exact_attention if method == "exact" else fmm_attention.fmm_attention
        self.func(self.q[:, :256], self.k[:, :256], self.v[:, :256])  # compile outside the timing

    def time_call(self, method, kv):
        self.func(self.q, self.k, self.v)

    def peakmem_call(self, method, kv):
        self.func(self.q, self.k, self.v)
