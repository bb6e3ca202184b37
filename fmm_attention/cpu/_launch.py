"""Process set-up around parallel kernel launches: BLAS threads and the threading layer."""

import contextlib
import functools
import threading

import numba

_LAUNCH_LOCK = threading.Lock()
_BLAS_LOCK = threading.Lock()
_blas_state = {"users": 0, "limiter": None}


@functools.cache
def _blas_controller():
    # numba's np.dot calls SciPy's BLAS, loaded lazily: load it before looking for pools
    import scipy.linalg.cython_blas  # noqa: F401
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def _single_threaded_blas():
    """Pin BLAS to one thread while kernels run; restore it when the last caller leaves.

    The exact kernel calls BLAS (``np.dot`` compiles to SciPy's BLAS) from inside its parallel
    loops. A multithreaded OpenBLAS then starts its own threads in every worker and the two
    pools fight for the cores: measured 70x slower for exact attention at n = 4096 on two
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

    With ``calls_blas`` (kernels that call ``np.dot``: exact attention), BLAS goes
    single-threaded (see :func:`_single_threaded_blas`); the other kernels do their own
    products and skip that (about 50 us per launch in threadpoolctl). Launches are serialised
    when the threading layer cannot take concurrent calls: the OpenMP and TBB layers accept
    launches from several Python threads at once, numba's fallback ``workqueue`` layer
    aborts the process instead. Until the layer is known (first launch) and whenever it is
    ``workqueue``, launches take a lock.
    """
    try:
        safe = numba.threading_layer() != "workqueue"
    except ValueError:  # no parallel region has run yet
        safe = False
    with _single_threaded_blas() if calls_blas else contextlib.nullcontext():
        if safe:
            yield
        else:
            with _LAUNCH_LOCK:
                yield
