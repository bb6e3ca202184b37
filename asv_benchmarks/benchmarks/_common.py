"""Shared pieces of the benchmarks: sizes, inputs, JIT warm-up, backend checks, data paths.

Environment variables
---------------------
FMM_ATTENTION_BENCH_FULL=1
    Add the large sizes (n = 262,144 and 1,048,576) to FMA and Fastformer. Exact attention
    stays at n <= 65,536: its O(n^2) cost at n = 1,048,576 would be over an hour per call.
FMM_ATTENTION_DATA=DIR
    Where the real MiniLM inputs live (``minilm_*.npz``); ``../shared/data`` beside the
    repository root by default. Accuracy benchmarks are skipped when it is absent.
"""

import os
import sys
from pathlib import Path

import numpy as np

#: Root of the repository this suite lives in (``asv_benchmarks/benchmarks/`` is two below).
REPO_ROOT = Path(__file__).resolve().parents[2]

try:
    import fmm_attention  # the installed package (asv environments, --python=same)
except ImportError:  # not installed: benchmark the checkout this suite belongs to
    sys.path.insert(0, str(REPO_ROOT))
    import fmm_attention  # noqa: F401

import fmm_attention._config  # noqa: E402
from fmm_attention import perf  # noqa: E402

FULL = os.environ.get("FMM_ATTENTION_BENCH_FULL", "").strip().lower() in ("1", "true", "yes", "on")

#: Sequence lengths of FMA and Fastformer: 1k to 64k, up to 1M with the full set.
SIZES = [1024, 4096, 16384, 65536] + ([262144, 1048576] if FULL else [])
#: Sequence lengths of exact attention (quadratic: capped at 64k even in the full set).
EXACT_SIZES = [1024, 4096, 16384, 65536]
DTYPES = ["float32", "float64"]
#: "cuda" runs only where a GPU is present; otherwise setup skips it.
BACKENDS = ["cpu", "cuda"]

#: Head dim of every benchmark.
D = 64
#: FMA configurations tracked, by label: the performance targets' 32/2 (the classes without
#: a suffix, whose history predates the label) and the library's default (``...Default``).
CONFIGS = {
    "32/2": (32, 2),
    f"default {fmm_attention._config.DEFAULT_BLOCK_SIZE}/{fmm_attention._config.DEFAULT_RANK}":
        (fmm_attention._config.DEFAULT_BLOCK_SIZE, fmm_attention._config.DEFAULT_RANK),
}
#: The targets' configuration (block size, rank), used by the classes without a suffix.
BLOCK_SIZE, RANK = CONFIGS["32/2"]
#: The library's default configuration, used by the ``...Default`` classes.
DEFAULT_LABEL = next(label for label in CONFIGS if label.startswith("default"))
DEFAULT_BLOCK_SIZE, DEFAULT_RANK = CONFIGS[DEFAULT_LABEL]

_inputs = {}
_warmed = set()


def require_backend(backend):
    """Skip (``NotImplementedError``) a CUDA benchmark without a real GPU."""
    if backend == "cpu":
        return
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        raise NotImplementedError("CUDA simulator: not benchmarked")
    try:
        from numba import cuda

        available = cuda.is_available()
    except Exception:  # numba-cuda missing or no driver
        available = False
    if not available:
        raise NotImplementedError("no CUDA GPU")


def inputs(n, dtype, backend="cpu", d=D):
    """One head of standard-normal ``q, k, v`` (device arrays for CUDA), kept for the next setup.

    asv re-runs ``setup`` before every timed call; the arrays of the last size are kept so
    that this costs nothing.
    """
    key = (n, dtype, backend, d)
    if key not in _inputs:
        _inputs.clear()
        arrays = perf.random_inputs(n, d, dtype=dtype)
        if backend == "cuda":
            from numba import cuda

            arrays = tuple(cuda.to_device(a) for a in arrays)
        _inputs[key] = arrays
    return _inputs[key]


def synchronize(backend):
    """Wait for the GPU (no-op on the CPU), so that a timing covers the kernels."""
    if backend == "cuda":
        from fmm_attention import cuda

        cuda.synchronize()


def warm(method, dtype, backend="cpu", **options):
    """Compile (or load from Numba's on-disk cache) the kernels of one method: one small call per process."""
    key = (method, dtype, backend, tuple(sorted(options.items())))
    if key in _warmed:
        return
    arrays = perf.random_inputs(256, D, dtype=dtype)
    if backend == "cuda":
        from numba import cuda

        arrays = tuple(cuda.to_device(a) for a in arrays)
    perf.method_call(method, *arrays, backend=backend, **options)()
    synchronize(backend)
    _warmed.add(key)


def reference_output(v, lse=True):
    """Allocate and write what an attention call returns (``out``, and ``lse`` when the method
    keeps one per query): the peakmem baseline."""
    out = np.empty_like(v)
    out.fill(0)
    if not lse:
        return out
    row_lse = np.empty(v.shape[:-1], dtype=v.dtype)
    row_lse.fill(0)
    return out, row_lse


def data_dir():
    """Directory of the real MiniLM inputs, or ``None`` when absent."""
    path = Path(os.environ.get("FMM_ATTENTION_DATA", REPO_ROOT.parent / "shared" / "data"))
    return path if path.is_dir() and any(path.glob("minilm_*.npz")) else None
