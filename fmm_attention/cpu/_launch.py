"""Process set-up around parallel kernel launches.

* The threading layer: ``_config.THREADING_LAYER`` is applied before Numba loads one.
* Fork: a child forked after GNU OpenMP ran cannot run a parallel kernel; it gets a clear
  error instead of dying in Numba (which would leave a ``multiprocessing.Pool`` hanging).
* Concurrency: launches are serialised when the layer cannot take concurrent ones.
* BLAS threads: pinned to one around the kernels that call BLAS.
* Ctrl-C: long kernels run as a series of short launches (:class:`Chunked`), and Python
  handles the signal between two of them.
* Threaded serial kernels (:class:`Threaded`): a ``nogil`` kernel over a range of jobs, run
  on a few Python threads at once instead of a ``prange`` (no parfor to compile).
"""

import contextlib
import functools
import os
import queue
import threading
import time

import numpy as np

from .. import _config
from .._threads import choose_layer as _choose_layer
from .._threads import loaded_layer as _layer
from .._threads import num_threads

_LAUNCH_LOCK = threading.Lock()
_BLAS_LOCK = threading.Lock()
#: Worker threads of :class:`Threaded` kernels, one job queue each (started on demand).
_team = []
_TEAM_LOCK = threading.Lock()
_blas_state = {"users": 0, "limiter": None}
#: Set in a child forked after GNU OpenMP ran: its parallel kernels cannot run.
_fork_state = {"after_gnu_openmp": False}


def _after_fork_in_child():
    # Only the forking thread survives: a lock another thread held stays locked for good.
    global _LAUNCH_LOCK, _BLAS_LOCK, _TEAM_LOCK
    _LAUNCH_LOCK = threading.Lock()
    _BLAS_LOCK = threading.Lock()
    _TEAM_LOCK = threading.Lock()
    _blas_state.update(users=0, limiter=None)
    # the parent's worker threads do not exist here: the child starts its own when needed
    _team.clear()
    if _layer() == "omp":
        from numba.np.ufunc import omppool

        # GNU OpenMP's thread pool does not survive fork (Numba then kills the process at
        # the next parallel launch); Intel's and LLVM's do
        _fork_state["after_gnu_openmp"] = omppool.openmp_vendor == "GNU"


os.register_at_fork(after_in_child=_after_fork_in_child)

_FORK_ERROR = (
    "fmm_attention cannot run its parallel kernels in this process: it was forked after GNU "
    "OpenMP (Numba's 'omp' threading layer) had started threads, and OpenMP's threads do not "
    "survive fork. Start worker processes with multiprocessing.get_context('spawn') or "
    "'forkserver' (concurrent.futures.ProcessPoolExecutor(mp_context=...)), or select a "
    "fork-safe threading layer before the first call: leave NUMBA_THREADING_LAYER unset "
    "(fmm_attention then picks 'forksafe'), or set it to 'workqueue' or 'tbb'."
)


@functools.cache
def _blas_controller():
    # numba's np.dot calls SciPy's BLAS, loaded lazily: load it before looking for pools
    import scipy.linalg.cython_blas  # noqa: F401
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def _single_threaded_blas():
    """Pin BLAS to one thread while kernels run; restore it when the last caller leaves.

    Exact attention's float64 forward kernel calls BLAS (``np.dot`` compiles to SciPy's
    BLAS) from inside its parallel loops (float32 runs on the micro-kernel and calls none).
    A multithreaded OpenBLAS then starts its own threads in every worker and the two pools
    fight for the cores: measured 70x slower for exact attention at n = 4096 on two
    cores. The limit is reference-counted so that concurrent callers from several Python
    threads restore the user's setting only once all of them are done.
    """
    with _BLAS_LOCK:
        if _blas_state["users"] == 0:
            _blas_state["limiter"] = _blas_controller().limit(limits=1, user_api="blas")
        _blas_state["users"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _blas_state["users"] -= 1
            if _blas_state["users"] == 0:
                _blas_state["limiter"].restore_original_limits()
                _blas_state["limiter"] = None


@contextlib.contextmanager
def launch_guard(*, calls_blas=False):
    """Prepare the process for a parallel kernel launch.

    Every parallel kernel of the library runs inside this guard. Before the first launch it
    applies the configured threading layer (:func:`_choose_layer`). In a process forked
    after GNU OpenMP ran it raises ``RuntimeError`` with the remedy. With ``calls_blas``
    (kernels that call ``np.dot``: exact attention's float64 forward), BLAS goes
    single-threaded (see :func:`_single_threaded_blas`); the other kernels do their own products and skip that
    (about 50 us per launch in threadpoolctl). Launches are serialised when the threading
    layer cannot take concurrent calls: the OpenMP and TBB layers accept launches from
    several Python threads at once, the ``workqueue`` layer aborts the process instead.
    Until the layer is known (first launch) and whenever it is ``workqueue``, launches take
    a lock.
    """
    layer = _layer()
    if layer is None:
        _choose_layer()
    elif _fork_state["after_gnu_openmp"]:
        raise RuntimeError(_FORK_ERROR)
    safe = layer is not None and layer != "workqueue"
    with _single_threaded_blas() if calls_blas else contextlib.nullcontext():
        if safe:
            yield
        else:
            with _LAUNCH_LOCK:
                yield


class Chunked:
    """A parallel kernel over independent jobs, launched a chunk of jobs at a time.

    A compiled call holds the interpreter until it returns, so a SIGINT (Ctrl-C) is only
    handled once it does. Launching a long kernel as consecutive job ranges of about
    ``_config.INTERRUPT_SECONDS`` each lets Python raise ``KeyboardInterrupt`` between
    two of them; a call shorter than that is one launch, as before.

    Parameters
    ----------
    kernel : numba dispatcher
        Called as ``kernel(job_lo, job_hi, *knobs, *args)``; it runs jobs
        ``job_lo <= job < job_hi`` (each job independent of the others, so the result does
        not depend on the chunks).
    layout : callable
        ``layout(*args) -> (knobs, n_jobs, total_work, cumulative_work)``: the knob arguments
        read from :mod:`fmm_attention._config` at call time, the number of jobs, their
        estimated cost in any unit proportional to time (multiply-adds), and a function
        returning the cost of jobs ``0 .. j-1`` for ``j = 0 .. n_jobs`` (``n_jobs + 1``
        non-decreasing numbers), called only when the call is long enough to be cut.

    group : int, optional
        Chunk boundaries fall on multiples of ``group * threads`` jobs, so that each thread's
        contiguous share of a chunk (``prange`` splits it statically) holds whole groups of
        ``group`` jobs: exact attention pairs a cheap causal tile with an expensive one.

    Notes
    -----
    The kernel's speed (seconds per unit of work) is learned from its launches; before the
    first it is taken as slow (``_config.INTERRUPT_FIRST_SECONDS_PER_WORK``), so the first long call
    starts with a short chunk rather than a long one. A chunk has at least ``group`` jobs per
    thread.
    """

    def __init__(self, kernel, layout, group=1):
        self.kernel = kernel
        self.layout = layout
        self.group = group
        self.seconds_per_work = float(_config.INTERRUPT_FIRST_SECONDS_PER_WORK)

    @property
    def signatures(self):
        """The compiled variants of the kernel."""
        return self.kernel.signatures

    def __call__(self, *args):
        knobs, n_jobs, total, cumulative_work = self.layout(*args)
        target = float(_config.INTERRUPT_SECONDS)
        if total * self.seconds_per_work <= target:  # short: one launch, nothing to learn
            self._launch(0, n_jobs, total, knobs, args)
            return
        cumulative = cumulative_work()
        threads = num_threads()
        lo = 0
        while lo < n_jobs:
            budget = cumulative[lo] + target / self.seconds_per_work
            hi = int(np.searchsorted(cumulative, budget, side="right")) - 1
            step = self.group * threads
            hi = min(n_jobs, -(-max(hi, lo + 1) // step) * step)
            self._launch(lo, hi, cumulative[hi] - cumulative[lo], knobs, args)
            lo = hi

    def _launch(self, lo, hi, work, knobs, args):
        start = time.perf_counter()
        self.kernel(lo, hi, *knobs, *args)
        elapsed = time.perf_counter() - start
        if elapsed > 1e-3 and work > 0:  # shorter launches time the wake-up, not the work
            self.seconds_per_work = elapsed / work


def _work(tasks):
    # A worker thread: runs job ranges until the process ends (daemon thread).
    while True:
        kernel, lo, hi, args, task = tasks.get()
        try:
            kernel(lo, hi, *args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
            task.error = exc
        finally:
            task.done.release()


def _workers(count):
    """The job queues of ``count`` worker threads, starting the missing ones."""
    if len(_team) < count:
        with _TEAM_LOCK:
            while len(_team) < count:
                tasks = queue.SimpleQueue()
                threading.Thread(target=_work, args=(tasks,), name=f"fmm_attention-{len(_team) + 1}",
                                 daemon=True).start()
                _team.append(tasks)
    return _team[:count]


class _Task:
    __slots__ = ("done", "error")

    def __init__(self):
        self.done = threading.Lock()
        self.done.acquire()  # released by the worker when its range is done
        self.error = None

    def wait(self):
        interrupted = None
        while True:
            try:
                self.done.acquire()
                break
            except BaseException as exc:  # noqa: BLE001 - Ctrl-C: the worker still writes the outputs
                interrupted = exc
        if interrupted is not None:
            raise interrupted
        if self.error is not None:
            raise self.error


class Threaded:
    """A serial ``nogil`` kernel over independent jobs, run on several threads at once.

    Replaces a ``prange`` over the jobs: Numba compiles a parallel loop's body twice more
    (as a gufunc, then again with the calling function), which made the FMA block kernel's
    first call cost three times its serial compile. Here the jobs are split into
    ``numba.get_num_threads()`` contiguous ranges (as ``prange``'s static schedule does),
    the calling thread runs the first and persistent Python worker threads the others; the
    kernel releases the GIL, so they run at once. No Numba threading layer is involved, so
    these launches may come from several Python threads at once under any layer, and a
    forked child starts its own workers.

    Parameters
    ----------
    kernel : numba dispatcher
        Compiled with ``nogil=True``; called as ``kernel(job_lo, job_hi, *args)`` and runs
        jobs ``job_lo <= job < job_hi``, each writing only its own outputs, so the result
        does not depend on the split.
    layout : callable
        ``layout(*args) -> (n_jobs, work)``: the number of jobs of a call and their cost in
        multiply-adds (or any unit of about a nanosecond).

    Notes
    -----
    A call of less than ``_config.THREADED_MIN_WORK`` runs in the calling thread alone:
    waking a worker costs more than it gains. Ctrl-C is handled once every range is done,
    as after a single compiled call. An error raised by the kernel in any range is raised
    in the caller once all ranges are done.
    """

    def __init__(self, kernel, layout):
        self.kernel = kernel
        self.layout = layout

    @property
    def signatures(self):
        """The compiled variants of the kernel."""
        return self.kernel.signatures

    @property
    def py_func(self):
        """The kernel's Python function."""
        return self.kernel.py_func

    def __call__(self, *args):
        self.launch(*self.layout(*args), *args)

    def launch(self, n_jobs, work, *args, first=0):
        """Run jobs ``first .. first + n_jobs - 1`` (``work`` in all) of ``kernel(job_lo,
        job_hi, *args)``."""
        threads = min(num_threads(), n_jobs)
        if threads <= 1 or work < _config.THREADED_MIN_WORK:
            self.kernel(first, first + n_jobs, *args)
            return
        tasks = []
        for worker, jobs in enumerate(_workers(threads - 1), start=1):
            task = _Task()
            lo, hi = first + worker * n_jobs // threads, first + (worker + 1) * n_jobs // threads
            jobs.put((self.kernel, lo, hi, args, task))
            tasks.append(task)
        error = None
        try:
            self.kernel(first, first + n_jobs // threads, *args)
        except BaseException as exc:  # noqa: BLE001 - raised once the workers are done with the outputs
            error = exc
        for task in tasks:
            try:
                task.wait()
            except BaseException as exc:  # noqa: BLE001 - the first error is raised
                error = exc if error is None else error
        if error is not None:
            raise error
