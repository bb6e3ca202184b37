"""Exact softmax attention on the GPU, flash-style, O(n d) memory.

Each CUDA block owns ``_config.CUDA_QUERY_TILE`` query rows (one thread per row), stages
``_config.CUDA_KEY_TILE`` keys and values at a time through shared memory and keeps an
online softmax per row (:mod:`._attention`). Causal tiles stop at their last query. No
``(n, n)`` array exists at any time.
"""

from __future__ import annotations

from ._attention import attend


def exact(batch, *, causal):
    """Exact attention of a :class:`~._inputs.DeviceBatch`; ``(out, lse)`` device arrays."""
    return attend(batch, causal=causal, scale=batch.scale, exact=True, plan_block=max(1, batch.n))
