"""Kernel knobs in one place.

Every tile size, thread count and compiler flag the kernels use is read from here, so a
tuning change is one edit and the tests can patch the CUDA launch sizes small. The CPU
kernels receive their tile sizes as arguments, read from here at call time: a kernel cached
on disk would keep the value a module-level constant had when it was compiled. The
exception, said at its knobs: the compiler flags are read once, at import (they are how the
kernels are compiled).
"""

#: Fastmath flags for the CPU kernels. ``reassoc``/``contract`` let LLVM vectorise the
#: reductions and fuse multiply-adds; ``nnan``/``ninf`` are deliberately *not* set, because
#: masked logits are ``-inf`` and the kernels rely on IEEE semantics for them.
FASTMATH = {"reassoc", "contract", "arcp", "nsz"}

#: Cache compiled CPU kernels on disk (``__pycache__``) so later processes skip the JIT.
#: Numba invalidates a cached kernel only when *its own* file changes: after editing a
#: helper in ``cpu/_softmax.py``, delete the ``*.nbi``/``*.nbc`` files (or the kernels that
#: inline it keep the old code). Installed releases are unaffected: every file changes.
CACHE = True

#: Numba threading layer chosen at the first parallel launch, unless the user has chosen one
#: (``NUMBA_THREADING_LAYER``, a ``.numba_config.yaml`` or ``numba.config.THREADING_LAYER``)
#: or a parallel kernel has already run in the process; ``None`` leaves Numba's own choice
#: (TBB, else OpenMP, else workqueue). ``"forksafe"`` is TBB when it loads, else workqueue.
#: Numba's default on Linux, GNU OpenMP, has two failures this avoids: a process forked after
#: it ran (``multiprocessing``'s default start method) cannot run a parallel kernel, and its
#: spin-waiting threads made a 1 ms call take a median 450 ms while other processes loaded
#: the cores (docs/performance.rst, "Threads and processes"; with OpenMP, set
#: ``OMP_WAIT_POLICY=passive``). Workqueue cannot take launches from several threads at
#: once; the library serialises its own (``cpu/_launch.py``).
THREADING_LAYER = "forksafe"

#: Long parallel kernels run as several launches of about this many seconds each, so that
#: Ctrl-C (handled by Python between launches) stops a long call within about this time.
INTERRUPT_SECONDS = 0.25
#: Seconds per unit of work a chunked kernel is assumed to take before its first launch
#: (a slow 1e9 per second: the first long call starts with a short chunk).
INTERRUPT_FIRST_SECONDS_PER_WORK = 1e-9

#: Threaded serial kernels (FMA's block kernel, mean upward pass and refinement, cluster
#: coarsening, and the others ``cpu/_launch.Threaded`` runs): a call of less work than this
#: (multiply-adds) runs in the calling thread alone (waking a worker thread costs more than
#: it gains). Each thread runs one contiguous range of jobs and allocates its work buffers
#: once (this replaced the refinement's ``FMA_CHUNKS_PER_THREAD`` and cluster coarsening's
#: ``CLUSTER_CHUNKS``: their chunks of a ``prange`` were split statically too, so they only
#: added allocations).
THREADED_MIN_WORK = 1_000_000

#: Exact attention: query rows per tile (the unit of parallel work) and keys per tile.
EXACT_QUERY_TILE = 64
EXACT_KEY_TILE = 512
#: Exact attention's forward in float32 with at least ``EXACT_LONG_KEYS`` queries and keys:
#: query rows per tile (fewer queries keep the short tile, whose jobs the threads need). Each tile streams all its keys and values, and from 32,768 keys (16 MiB of k and
#: v at d = 64) they no longer stay in a 32 MiB L3 cache beside the other arrays; twice the
#: rows halve that traffic: 0.90-0.97 times the time at n = 32,768 and 65,536, neutral at
#: 16,384; float64 gained nothing (docs/performance.rst). The query tile changes no bit.
EXACT_LONG_QUERY_TILE = 128
EXACT_LONG_KEYS = 32768
#: Exact attention: at most this many output entries reading the same keys and values (the
#: query heads of one key head, or broadcast batch entries) share a job, which reads each key
#: and value tile once for all of them; their query and output tiles and the key and value
#: tiles together stay within a 1 MiB L2 cache at the default tiles and d = 64.
EXACT_GROUP_ENTRIES = 8
#: Exact attention's forward: the dtypes (names) whose products run on the library's
#: register-blocked micro-kernel, logits key-major; the others call BLAS (``np.dot``) per
#: tile. Both by default: on a quiet machine the micro-kernel took 0.85 to 0.92 times
#: BLAS's time in float64 as well (n >= 4,096, medians of three rounds; docs/performance.rst); a
#: host whose BLAS beats it at these shapes can name fewer.
EXACT_MICRO_KERNEL_DTYPES = ("float32", "float64")

#: ``check_finite``: elements per parallel chunk of the finiteness pass (large enough that
#: scheduling costs nothing).
FINITE_CHUNK = 1 << 16
#: ``check_finite``: arrays smaller than this many bytes are checked on the calling thread
#: (a launch of two workqueue threads cost 0.2-0.4 ms on the shared 2-core machine and a serial
#: pass read 16 MB twice as fast as two threads; at 64 MB they tied: docs/development.rst,
#: "The finiteness check").
FINITE_PARALLEL_MIN_BYTES = 1 << 25

#: Cluster coarsening: the largest box whose level clusters tokens; larger boxes cluster
#: their children's groups. Token levels cost O(n p d iters) each, group levels
#: O(n p^2 d iters / box size). With 128 every level of a sequence of at most 512 tokens
#: clusters tokens (docs/accuracy.rst measures what the group levels cost).
CLUSTER_FLAT_SIZE = 128

#: The gradients of a pullback (and its large scratch buffers) come from one zeroed block
#: when together they reach ``FRESH_BLOCK_MIN_BYTES``, sized at least ``FRESH_BLOCK_BYTES``:
#: glibc maps such a block fresh (its largest mmap threshold is 32 MiB) with huge pages,
#: where separate arrays came from a heap whose freed top it returns page by page
#: (``cpu/_memory.py``; docs/performance.rst, "Page faults"). 0 turns the block off.
FRESH_BLOCK_MIN_BYTES = 1 << 20
FRESH_BLOCK_BYTES = (32 << 20) + (1 << 20)

#: Exact attention's backward: query rows and keys per tile inside each rectangle of the
#: grid of partial sums (the query tile is rounded up to the micro-kernel's panel width, 16
#: in float32 and 8 in float64; 32 to 128 by 64 to 384 measured within the noise of
#: 64 x 256: docs/performance.rst).
BACKWARD_QUERY_TILE = 64
BACKWARD_KEY_TILE = 256
#: Exact attention's backward: the grid of partial sums has at most this many rectangles
#: per side, each holding at least ``BACKWARD_MIN_SPAN`` queries (keys). The grid depends on
#: the shapes and these two knobs only (never the thread count), so the sums are reproducible.
BACKWARD_MAX_GRID = 4
BACKWARD_MIN_SPAN = 512
#: Learned coarsening's backward (its downward pass): tokens per parallel job.
BACKWARD_LEARNED_TOKENS = 256
#: FMA's backward: bytes of the key-side partial buffers (one row per plan column outside the
#: near field, which goes straight into dk, dv; for all
#: output entries); longer sequences run in slabs of query blocks that fit, all in one
#: buffer. Smaller means less memory and more launches; 16 MB keeps the buffer (and the
#: gradients allocated after it) in pages the allocator reuses from call to call, where
#: 8 MB took three times the page faults per call (n = 16384, d = 64, glibc). The slabs
#: change no result.
BACKWARD_PARTIAL_BYTES = 16 << 20
#: FMA's backward: query blocks per run. A run's jobs add the near-field key gradients of
#: its blocks straight into ``dk``, ``dv`` (even runs, then odd runs), in a few runs' rows
#: at a time; the run grid depends on the shapes and this knob only (at least 2 blocks).
BACKWARD_RUN_BLOCKS = 8

#: Dask, exact attention over sequence chunks: query rows per score tile (a task holds one
#: ``rows x key chunk`` tile at a time).
DASK_EXACT_QUERY_ROWS = 512

#: Streaming decode: multiply-adds per call below which a decode step runs on the calling
#: thread (a parallel launch costs more than a few microseconds of work).
DECODE_PARALLEL_MIN_WORK = 1 << 18

#: Streaming exact decode: fewest cache rows per key chunk of one query (a chunk is one
#: parallel job; their softmax partials are merged by log-sum-exp).
DECODE_EXACT_CHUNK_KEYS = 4096

#: Fastformer: sequence chunk length of the parallel bidirectional reductions.
FASTFORMER_CHUNK = 4096

#: CUDA launch configuration (patched small by the simulator tests).
CUDA_THREADS_PER_BLOCK = 128
#: CUDA Fastformer: positions per thread of a chunk (a chunk is
#: ``CUDA_THREADS_PER_BLOCK * CUDA_FASTFORMER_ITEMS_PER_THREAD`` positions).
CUDA_FASTFORMER_ITEMS_PER_THREAD = 4
CUDA_QUERY_TILE = 32
CUDA_KEY_TILE = 32
#: Shared memory a CUDA block may use (the portable 48 KiB), and the most blocks per launch.
CUDA_SHARED_MEMORY_BYTES = 48 * 1024
CUDA_MAX_BLOCKS = 65535

#: Largest ``n`` for which dense ``(n, n)`` diagnostics (level maps, implied attention
#: matrices) are built; beyond it they would take gigabytes.
DENSE_MAX_N = 8192

#: Cached key plans and trees (least-recently-used caches, sizes read at each insertion): a
#: plan at n = 2**20 is tens of MB, a tree a few interaction tables.
PLAN_CACHE_SIZE = 8
TREE_CACHE_SIZE = 64

#: Defaults of ``fmm_attention`` (see docs/tuning.rst for the measurements behind them).
DEFAULT_BLOCK_SIZE = 64
DEFAULT_RANK = 4

#: ``global_tokens="auto"`` (:mod:`fmm_attention.sinks`): keys chosen per batch entry, and
#: the queries sampled to estimate the bidirectional far-field attention mass of each key.
AUTO_GLOBAL_TOKENS = 2
AUTO_GLOBAL_QUERIES = 32

#: Most bytes one call may allocate (estimated before allocating; a larger call raises a
#: ``ValueError`` naming the argument to reduce). ``None``: the machine's physical memory.
MAX_CALL_BYTES = None
