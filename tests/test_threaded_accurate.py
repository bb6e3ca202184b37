"""The accurate setting's kernels and coarse queries' kernels as serial kernels on threads.

FMA's refinement (``refine=``), the cluster upward pass (``coarsening="cluster"``) and the
coarse-query passes (``query_coarsening=True``) were ``prange`` loops; now they are
``nogil`` kernels over a range of jobs run by ``cpu/_launch.Threaded`` (as FMA's block
kernels: tests/test_threaded.py, and Fastformer's and exact attention's:
tests/test_threaded_kernels.py). What must hold: the jobs are independent (each writes only
its own entries and reads nothing another job of the same launch writes), so the results
are the same bit for bit for one thread, two threads, an unsplit call and the jobs run one
at a time in reverse order.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
# the same fixture (two Numba threads) and bitwise check as the sibling test
from test_threaded_kernels import assert_bits_do_not_depend_on_threads, two_threads  # noqa: E402, F401

from fmm_attention import fmm_attention, fmm_attention_vjp  # noqa: E402
from fmm_attention.cpu import _launch, cluster, query_coarsening, refine  # noqa: E402

#: (module, name) of every converted kernel: a ``Threaded`` whose serial kernel is patched.
KERNELS = [(refine, "refine_plans"), (cluster, "flat_spans"), (cluster, "merged_boxes")] + [
    (query_coarsening, name) for name in ("_coarse_queries_level", "far_partials", "_downward_level")]


def test_every_converted_kernel_is_threaded_nogil_and_not_parallel():
    for module, name in KERNELS:
        kernel = getattr(module, name)
        assert isinstance(kernel, _launch.Threaded), name
        options = kernel.kernel.targetoptions
        assert options.get("nogil") and not options.get("parallel"), name


def calls(dtype, n, heads, causal, masked):
    rng = np.random.default_rng(11)
    q, k, v, g = (rng.standard_normal((heads, n, 8)).astype(dtype) for _ in range(4))
    q *= 2  # peaked attention: the refinement's choices differ from block to block
    mask = rng.random((heads, n)) > 0.3 if masked else None
    if masked:
        mask[0, : n // 2] = False  # a long masked stretch: blocks without a valid query or key
    refined = dict(block_size=4, rank=1, refine=12, causal=causal, key_padding_mask=mask)
    yield "refine", lambda: fmm_attention(q, k, v, return_lse=True, **refined)
    yield "refine, cluster, global tokens", lambda: fmm_attention(
        q, k, v, block_size=8, rank=2, refine=16, coarsening="cluster", global_tokens=[0, 40], causal=causal,
        key_padding_mask=mask, return_lse=True)
    yield "refine vjp", lambda: fmm_attention_vjp(q, k, v, **refined)[1](g)
    # block 4, rank 2: levels of 8 .. 256 tokens, token-level up to 128, then group levels
    clustered = dict(block_size=4, rank=2, coarsening="cluster", cluster_iters=3, causal=causal,
                     key_padding_mask=mask)
    yield "cluster", lambda: fmm_attention(q, k, v, return_lse=True, **clustered)
    yield "cluster vjp", lambda: fmm_attention_vjp(q, k, v, **clustered)[1](g)
    if not causal:  # coarse queries are bidirectional only
        coarse = dict(block_size=4, rank=2, query_coarsening=True, key_padding_mask=mask)
        yield "coarse queries", lambda: fmm_attention(q, k, v, return_lse=True, **coarse)
        yield "coarse queries vjp", lambda: fmm_attention_vjp(q, k, v, **coarse)[1](g)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "mask"])
@pytest.mark.usefixtures("two_threads")
def test_bits_do_not_depend_on_threads_splitting_or_job_order(dtype, causal, masked, monkeypatch):
    """At n = 301 (not a multiple of any block size), three heads, each kernel has tens of jobs
    per thread; the mask leaves the first head's first half without a valid position."""
    assert_bits_do_not_depend_on_threads(calls(dtype, 301, 3, causal, masked),
                                         [getattr(module, name) for module, name in KERNELS], monkeypatch)
