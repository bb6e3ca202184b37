"""Streaming decode (issue 16): FMA decode step against an exact KV-cache step.

One head, d = 64, float32, default ``block_size`` / ``rank`` (the configuration of the
issue's targets). Each step appends one token, so the context grows by one per call; it
starts at ``T``. The exact decoder's cache is filled directly: its prefill would run an
O(T^2) attention for the prompt's outputs. ``docs/make_decode_table.py`` measures the same
targets side by side in one process.
"""

import numpy as np

import fmm_attention

from . import _common as c

#: Context lengths of the decode benchmarks (2**20 with the full set: its exact KV cache
#: alone is 512 MiB).
CONTEXTS = [2**10, 2**14, 2**17] + ([2**20] if c.FULL else [])
N_POOL = 4096


def _tokens(n, seed=0):
    return c.perf.random_inputs(n, c.D, dtype=np.float32, seed=seed)


def _decoder(method, T, q, k, v):
    dec = fmm_attention.FMMDecoder(d=c.D, dtype=np.float32, method=method)
    if method == "fmm":
        dec.prefill(q[:T], k[:T], v[:T])
    else:
        dec._grow_cache(T + N_POOL)
        dec._kv[0, :T], dec._vv[0, :T], dec._ok[0, :T] = k[:T], v[:T], True
        dec._position = T
    return dec


class DecodeStep:
    """Time of one decode step (one token) at context ``T``, and the state it holds."""

    params = [CONTEXTS, ["fmm", "exact"]]
    param_names = ["T", "method"]
    timeout = 900

    def setup(self, T, method):
        self.q, self.k, self.v = _tokens(T + N_POOL)
        self.pool = [a[T:] for a in (self.q, self.k, self.v)]
        warm = fmm_attention.FMMDecoder(d=c.D, dtype=np.float32, method=method)
        warm.step(*(a[:1] for a in self.pool))  # compile outside the timing
        self.dec = _decoder(method, T, self.q, self.k, self.v)
        self.i = 0

    def time_step(self, T, method):
        i = self.i % N_POOL
        self.i += 1
        if self.dec.position >= T + N_POOL:  # keep the context near T
            self.dec = _decoder(method, T, self.q, self.k, self.v)
        q, k, v = self.pool
        self.dec.step(q[i : i + 1], k[i : i + 1], v[i : i + 1])

    def track_state_bytes(self, T, method):
        return self.dec.state_bytes

    track_state_bytes.unit = "bytes"


class PrefillThenDecode:
    """A prompt of ``T`` tokens then 1,000 single-token steps, against one forward over T + 1,000."""

    params = [CONTEXTS]
    param_names = ["T"]
    timeout = 900
    number = 1
    repeat = 3

    def setup(self, T):
        self.q, self.k, self.v = _tokens(T + 1000)
        fmm_attention.FMMDecoder(d=c.D, dtype=np.float32).prefill(self.q[:300], self.k[:300], self.v[:300])
        fmm_attention.fmm_attention(self.q[:300], self.k[:300], self.v[:300], causal=True)

    def time_prefill_then_1000_steps(self, T):
        dec = fmm_attention.FMMDecoder(d=c.D, dtype=np.float32)
        dec.prefill(self.q[:T], self.k[:T], self.v[:T])
        for t in range(T, T + 1000):
            dec.step(self.q[t : t + 1], self.k[t : t + 1], self.v[t : t + 1])

    def time_one_forward(self, T):
        fmm_attention.fmm_attention(self.q, self.k, self.v, causal=True)
