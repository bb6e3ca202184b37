"""Kernel knobs in one place.

Every tile size, thread count and compiler flag the kernels use is read from here, so a
tuning change is one edit and the tests can patch the CUDA launch sizes small.
"""

#: Fastmath flags for the CPU kernels. ``reassoc``/``contract`` let LLVM vectorise the
#: reductions and fuse multiply-adds; ``nnan``/``ninf`` are deliberately *not* set, because
#: masked logits are ``-inf`` and the kernels rely on IEEE semantics for them.
FASTMATH = {"reassoc", "contract", "arcp", "nsz"}

#: Cache compiled CPU kernels on disk (``__pycache__``) so later processes skip the JIT.
#: Numba invalidates a cached kernel only when *its own* file changes: after editing a
#: helper in ``cpu/_blocks.py``, delete the ``*.nbi``/``*.nbc`` files (or the kernels that
#: inline it keep the old code). Installed releases are unaffected: every file changes.
CACHE = True

#: Exact attention: query rows per tile (the unit of parallel work) and keys per tile.
EXACT_QUERY_TILE = 64
EXACT_KEY_TILE = 512

#: FMA block attention: chunks of query blocks per thread; each chunk allocates its work
#: buffers once (more chunks balance uneven threads, fewer allocate less).
FMA_CHUNKS_PER_THREAD = 4

#: Streaming decode: multiply-adds per call below which a decode step runs on the calling
#: thread (a parallel launch costs more than a few microseconds of work).
DECODE_PARALLEL_MIN_WORK = 1 << 18

#: Fastformer: sequence chunk length of the parallel bidirectional reductions.
FASTFORMER_CHUNK = 4096

#: CUDA launch configuration (patched small by the simulator tests).
CUDA_THREADS_PER_BLOCK = 128
CUDA_QUERY_TILE = 32
CUDA_KEY_TILE = 32
#: Shared memory a CUDA block may use (the portable 48 KiB), and the most blocks per launch.
CUDA_SHARED_MEMORY_BYTES = 48 * 1024
CUDA_MAX_BLOCKS = 65535

#: Largest ``n`` for which dense ``(n, n)`` diagnostics (level maps, implied attention
#: matrices) are built; beyond it they would take gigabytes.
DENSE_MAX_N = 8192

#: Defaults of ``fmm_attention`` (see docs/tuning.rst for the measurements behind them).
DEFAULT_BLOCK_SIZE = 64
DEFAULT_RANK = 4
