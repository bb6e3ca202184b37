"""The kernels also run as plain Python (``NUMBA_DISABLE_JIT=1``, for debuggers and coverage)."""

import os
import subprocess
import sys

import numpy as np

import fmm_attention as fa

SCRIPT = """
import sys
import numpy as np
import fmm_attention as fa
q, k, v, mask, w = (np.load(sys.argv[1])[name] for name in ("q", "k", "v", "mask", "w"))
np.savez(sys.argv[2],
         exact=fa.exact_attention(q, k, v, causal=True),
         fma=fa.fmm_attention(q, k, v, block_size=4, rank=2, key_padding_mask=mask),
         cluster=fa.fmm_attention(q, k, v, block_size=4, rank=2, coarsening="cluster", refine=8, causal=True),
         fastformer=fa.fastformer_attention(q, k, v, w[0], w[1], causal=True))
"""


def test_pure_python_mode_matches_compiled(tmp_path):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 20, 4)) for _ in range(3))
    mask = rng.random((1, 20)) > 0.2
    w = rng.standard_normal((2, 4))
    np.savez(tmp_path / "inputs.npz", q=q, k=k, v=v, mask=mask, w=w)
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
                   check=True, env=env, timeout=600)
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(got["exact"], fa.exact_attention(q, k, v, causal=True), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["fma"], fa.fmm_attention(q, k, v, block_size=4, rank=2, key_padding_mask=mask),
                               rtol=1e-12, atol=1e-12)
    cluster = fa.fmm_attention(q, k, v, block_size=4, rank=2, coarsening="cluster", refine=8, causal=True)
    np.testing.assert_allclose(got["cluster"], cluster, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["fastformer"], fa.fastformer_attention(q, k, v, w[0], w[1], causal=True),
                               rtol=1e-12, atol=1e-12)
