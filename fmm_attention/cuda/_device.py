"""Everything the CUDA kernels need from the outside world, in one module.

* the one lazy import of :mod:`numba.cuda` (the CPU library never loads it);
* simulator detection (``NUMBA_ENABLE_CUDASIM=1``);
* array interchange: inputs exposing ``__cuda_array_interface__`` (Numba device arrays,
  CuPy, PyTorch CUDA tensors) are wrapped without a copy (:func:`as_device_array`), host
  arrays copied in; checking them is :mod:`fmm_attention.cuda._inputs`' job (with the
  shared checks of :mod:`fmm_attention._validate`);
* the launch configuration, read from the ``CUDA_*`` knobs of :mod:`fmm_attention._config`
  at call time (the tests patch them small so that tiny inputs still span several blocks);
* device copies of the per-tree plans and of learned coarsening weights, cached.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import numpy as np

from .. import _config


# ---------------------------------------------------------------- the lazy import
def _import_cuda():
    from numba import cuda

    return cuda


def cuda_module():
    """:mod:`numba.cuda`, imported on first use; ``RuntimeError`` if it cannot be imported."""
    try:
        return _import_cuda()
    except ImportError as exc:
        raise RuntimeError(
            "backend='cuda' needs numba's CUDA target (the numba-cuda package): "
            "pip install 'fmm_attention[cuda]'"
        ) from exc


def simulator():
    """True when numba's CUDA simulator is active (``NUMBA_ENABLE_CUDASIM=1``)."""
    cuda = cuda_module()
    config = getattr(cuda, "config", None)
    if config is not None and hasattr(config, "ENABLE_CUDASIM"):
        return bool(config.ENABLE_CUDASIM)
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"  # pragma: no cover


def require():
    """Raise ``RuntimeError`` unless a CUDA GPU (or the simulator) can run the kernels."""
    cuda = cuda_module()
    if simulator():
        return
    if not cuda.is_available():
        raise RuntimeError(
            "backend='cuda' was requested but no usable CUDA GPU was found (check the NVIDIA "
            "driver and 'pip install fmm_attention[cuda]'); use backend='cpu', or set "
            "NUMBA_ENABLE_CUDASIM=1 to run the kernels in numba's (slow) CUDA simulator"
        )


def synchronize():
    """Wait until every kernel launched on the current device has finished."""
    cuda_module().synchronize()


def _device_id():
    return getattr(cuda_module().get_current_device(), "id", 0)


# ---------------------------------------------------------------- launch configuration
def threads_per_block():
    """Threads per block of the element-wise kernels (``_config.CUDA_THREADS_PER_BLOCK``)."""
    return _positive_knob("CUDA_THREADS_PER_BLOCK")


def _positive_knob(name):
    value = getattr(_config, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"fmm_attention._config.{name} must be a positive integer, got {value!r}")
    return int(value)


def grid(n_jobs, threads):
    """Blocks for ``n_jobs`` independent jobs at ``threads`` per block (at least 1)."""
    return max(1, min(_positive_knob("CUDA_MAX_BLOCKS"), -(-n_jobs // threads)))


@dataclass(frozen=True)
class AttentionTiles:
    """Launch shape of the attention kernel.

    Attributes
    ----------
    rows : int
        Query rows per block (one thread each).
    keys : int
        Keys per shared-memory tile.
    shared_bytes : int
        Dynamic shared memory per block.
    """

    rows: int
    keys: int
    shared_bytes: int


def attention_tiles(d, dv, itemsize, max_rows):
    """Tile sizes of the attention kernel for feature dims ``d``, ``dv``.

    Starts from ``_config.CUDA_QUERY_TILE`` rows (at most ``max_rows``, the query block) and
    ``_config.CUDA_KEY_TILE`` keys, and halves the key tile, then the query tile, until the
    block's shared memory (query tile, accumulators, scores, key and value tile) fits in
    ``_config.CUDA_SHARED_MEMORY_BYTES`` (read at call time).
    """
    limit = _positive_knob("CUDA_SHARED_MEMORY_BYTES")
    rows = min(_positive_knob("CUDA_QUERY_TILE"), max_rows)
    keys = _positive_knob("CUDA_KEY_TILE")

    def need(r, t):
        return itemsize * (r * (d + dv + t + 3) + t * (d + dv + 1))  # rows padded by 1 (banks)

    while need(rows, keys) > limit and (keys > 1 or rows > 1):
        if keys > 1 and (keys >= rows or rows == 1):
            keys //= 2
        else:
            rows //= 2
    if need(rows, keys) > limit:
        raise ValueError(
            f"feature dims d={d}, dv={dv} are too large for the CUDA attention kernel in "
            f"{itemsize * 8}-bit floats: one query and one key tile need {need(1, 1)} bytes of "
            f"shared memory, more than {limit}; use backend='cpu'"
        )
    return AttentionTiles(rows, keys, need(rows, keys))


# ---------------------------------------------------------------- array interchange
def is_device_array(x):
    """True for arrays that live on a CUDA device.

    Anything exposing ``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors, Numba device
    arrays), and the simulator's stand-in device arrays.
    """
    return hasattr(x, "__cuda_array_interface__") or bool(getattr(x, "__cuda_ndarray__", False))


class _InterfaceView:
    """Holds a CUDA array interface as a NumPy array interface (simulator only)."""

    def __init__(self, owner, desc):
        self.owner = owner
        self.__array_interface__ = {
            "shape": tuple(desc["shape"]),
            "typestr": desc["typestr"],
            "data": desc["data"],
            "strides": desc.get("strides"),
            "version": 3,
        }


def as_device_array(x, name):
    """A Numba device array viewing ``x`` (no copy).

    ``x`` is a Numba device array or exposes ``__cuda_array_interface__``. Under the simulator
    "device" memory is host memory, so an interface's pointer is viewed as a NumPy array.
    """
    cuda = cuda_module()
    if getattr(x, "__cuda_ndarray__", False):
        return x
    try:
        if simulator():
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

            desc = x.__cuda_array_interface__
            if desc.get("mask") is not None:
                raise NotImplementedError("masked CUDA arrays are not supported")
            return FakeCUDAArray(np.asarray(_InterfaceView(x, desc)))
        return cuda.as_cuda_array(x)
    except (NotImplementedError, TypeError, ValueError, KeyError) as exc:
        raise TypeError(f"{name} could not be read through __cuda_array_interface__: {exc}") from exc


def empty(shape, dtype):
    """An uninitialised device array."""
    return cuda_module().device_array(shape, dtype=dtype)


def dummy(ndim, dtype):
    """A tiny zero device array standing in for an unused kernel argument (never written).

    Cached per device, so that calls on device inputs make no host-to-device copies.
    """
    key = (ndim, np.dtype(dtype).str, _device_id())
    if key not in _DUMMIES:
        _DUMMIES[key] = cuda_module().to_device(np.zeros((1,) * ndim, dtype=dtype))
    return _DUMMIES[key]


# ---------------------------------------------------------------- cached device copies
_DUMMIES = {}
_TREE_CACHE = weakref.WeakKeyDictionary()
_WEIGHT_CACHE = weakref.WeakKeyDictionary()


def tree_arrays(tree, name, build):
    """Device copies of ``build()`` (a tuple of host arrays), cached per tree, name and device."""
    per_tree = _TREE_CACHE.setdefault(tree, {})
    key = (name, _device_id())
    if key not in per_tree:
        cuda = cuda_module()
        per_tree[key] = tuple(cuda.to_device(np.ascontiguousarray(a)) for a in build())
    return per_tree[key]


def coarsening_arrays(coarsening, dtype):
    """Device copies of a :class:`~fmm_attention.LearnedCoarsening`'s weights in ``dtype``.

    Cached while the coarsening object lives (its weights are read-only copies).
    """
    per_object = _WEIGHT_CACHE.setdefault(coarsening, {})
    key = (np.dtype(dtype).str, _device_id())
    if key not in per_object:
        cuda = cuda_module()
        per_object[key] = tuple(
            tuple(cuda.to_device(a) for a in group) for group in coarsening.level_arrays(dtype)
        )
    return per_object[key]

