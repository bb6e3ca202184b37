"""Accuracy of FMA against exact attention on real inputs (MiniLM q, k, v on license texts).

The inputs are ``minilm_<text>.npz`` in ``../shared/data`` beside the repository root (or
``$FMM_ATTENTION_DATA``): arrays of shape (6, 12, 512, 32) = (layer, head, token, dim),
float32, before the 1/sqrt(32) scaling, so exact attention is ``softmax(q k^T / sqrt(32)) v``
(the library's default scale). Skipped when the files are absent.
"""

import numpy as np

import fmm_attention

from . import _common as c

TEXTS = ["Apache-2_0", "MPL-2_0"]
_references = {}


def _load(text):
    directory = c.data_dir()
    path = None if directory is None else directory / f"minilm_{text}.npz"
    if path is None or not path.is_file():
        raise NotImplementedError(f"real inputs minilm_{text}.npz not found (set FMM_ATTENTION_DATA)")
    with np.load(path) as data:
        return data["q"], data["k"], data["v"]


class RealDataAccuracy:
    """Relative error of FMA (``block_size=32``, mean coarsening) on all 72 MiniLM heads, n = 512.

    ``track_relative_error``: ``||fma - exact||_F / ||exact||_F`` over every head together;
    ``track_worst_head_error``: the largest per-head relative error.
    ``RealDataAccuracyDefault`` tracks the same at the library's default block size (64;
    rank 4 is the default rank).
    """

    block_size = c.BLOCK_SIZE

    params = [TEXTS, [False, True], [False, True], [1, 2, 4, 8]]
    param_names = ["text", "causal", "query_coarsening", "rank"]
    unit = "relative error"

    def setup(self, text, causal, query_coarsening, rank):
        if causal and query_coarsening:
            raise NotImplementedError("query_coarsening=True is bidirectional only")
        q, k, v = _load(text)
        key = (text, causal)
        if key not in _references:
            _references[key] = fmm_attention.exact_attention(q, k, v, causal=causal)
        reference = _references[key]
        out = fmm_attention.fmm_attention(q, k, v, causal=causal, block_size=self.block_size, rank=rank,
                                          query_coarsening=query_coarsening)
        diff = (out - reference).astype(np.float64)
        ref = reference.astype(np.float64)
        self.total = float(np.linalg.norm(diff) / np.linalg.norm(ref))
        per_head = np.sqrt((diff**2).sum(axis=(-2, -1)) / (ref**2).sum(axis=(-2, -1)))
        self.worst = float(per_head.max())

    def track_relative_error(self, text, causal, query_coarsening, rank):
        return self.total

    def track_worst_head_error(self, text, causal, query_coarsening, rank):
        return self.worst


class RealDataAccuracyDefault(RealDataAccuracy):
    """As :class:`RealDataAccuracy`, at the library's default block size (64)."""

    block_size = c.DEFAULT_BLOCK_SIZE
