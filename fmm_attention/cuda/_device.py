"""Everything the CUDA kernels need from the outside world, in one module.

* the one lazy import of :mod:`numba.cuda` (the CPU library never loads it);
* simulator detection (``NUMBA_ENABLE_CUDASIM=1``);
* array interchange: host inputs are validated by :mod:`fmm_attention._validate` and copied
  in; inputs exposing ``__cuda_array_interface__`` (Numba device arrays, CuPy, PyTorch CUDA
  tensors) are wrapped without a copy, validated on shapes, dtypes and contiguity, and the
  results stay on the device as Numba device arrays;
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
from .._validate import KERNEL_DTYPES, attention_inputs, check_bool, check_scale, padding_mask

#: Dynamic shared memory one attention block may use (bytes): the limit every CUDA GPU grants
#: without an opt-in. Tiles shrink (key tile first, then query tile) until they fit.
SHARED_MEMORY_BYTES = _config.CUDA_SHARED_MEMORY_BYTES

#: Most blocks per launch; the kernels stride over the rest (grid-stride loops).
MAX_BLOCKS = _config.CUDA_MAX_BLOCKS


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
    return max(1, min(MAX_BLOCKS, -(-n_jobs // threads)))


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
    :data:`SHARED_MEMORY_BYTES`.
    """
    rows = min(_positive_knob("CUDA_QUERY_TILE"), max_rows)
    keys = _positive_knob("CUDA_KEY_TILE")

    def need(r, t):
        return itemsize * (r * (d + dv + t + 3) + t * (d + dv + 1))  # rows padded by 1 (banks)

    while need(rows, keys) > SHARED_MEMORY_BYTES and (keys > 1 or rows > 1):
        if keys > 1 and (keys >= rows or rows == 1):
            keys //= 2
        else:
            rows //= 2
    if need(rows, keys) > SHARED_MEMORY_BYTES:
        raise ValueError(
            f"feature dims d={d}, dv={dv} are too large for the CUDA attention kernel in "
            f"{itemsize * 8}-bit floats: one query and one key tile need {need(1, 1)} bytes of "
            f"shared memory, more than {SHARED_MEMORY_BYTES}; use backend='cpu'"
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


@dataclass(frozen=True)
class DeviceBatch:
    """Validated attention inputs on the device, leading dims flattened to one batch axis.

    Attributes
    ----------
    q, k : device array, shape (B, n, d)
    v : device array, shape (B, n, dv)
    valid : device array of bool, shape (B, n), or None
    lead_shape : tuple
    dtype : numpy.dtype
        float32 or float64.
    scale : float
    on_device : bool
        The caller passed device arrays: results stay on the device.
    """

    q: object
    k: object
    v: object
    valid: object
    lead_shape: tuple
    dtype: np.dtype
    scale: float
    on_device: bool

    @property
    def batch(self):
        return self.q.shape[0]

    @property
    def n(self):
        return self.q.shape[1]

    @property
    def d(self):
        return self.q.shape[2]

    @property
    def dv(self):
        return self.v.shape[2]

    def finish(self, out, lse, return_lse):
        """Give results the caller's leading dims; copy them to the host for host inputs."""
        out = out.reshape(self.lead_shape + (self.n, self.dv))
        lse = lse.reshape(self.lead_shape + (self.n,))
        if not self.on_device:
            out, lse = out.copy_to_host(), lse.copy_to_host()
        return (out, lse) if return_lse else out


def inputs(q, k, v, *, scale, key_padding_mask, check_finite):
    """Validate attention inputs and put them on the device.

    Host inputs (NumPy or any array-like) go through :func:`fmm_attention._validate.attention_inputs`
    and are copied in. Device inputs must all be on the device, share one dtype (float32 or
    float64), be C-contiguous and have matching shapes; they are viewed, never copied.

    Returns
    -------
    DeviceBatch
    """
    named = {"q": q, "k": k, "v": v}
    on_device = {name: is_device_array(x) for name, x in named.items()}
    if not any(on_device.values()):
        batch = attention_inputs(q, k, v, scale=scale, key_padding_mask=key_padding_mask, check_finite=check_finite)
        cuda = cuda_module()
        valid = None if batch.valid is None else cuda.to_device(batch.valid)
        return DeviceBatch(
            cuda.to_device(batch.q), cuda.to_device(batch.k), cuda.to_device(batch.v), valid,
            batch.lead_shape, batch.dtype, batch.scale, False,
        )
    if not all(on_device.values()):
        host = [name for name, dev in on_device.items() if not dev]
        device = [name for name, dev in on_device.items() if dev]
        raise TypeError(
            f"{', '.join(host)} {'is a host array' if len(host) == 1 else 'are host arrays'} while "
            f"{', '.join(device)} {'lives' if len(device) == 1 else 'live'} on the GPU: pass q, k "
            "and v all as device arrays or all as host arrays"
        )
    check_finite = check_bool(check_finite, "check_finite")
    arrays = {name: as_device_array(x, name) for name, x in named.items()}
    dtypes = {}
    for name, arr in arrays.items():
        dtype = np.dtype(arr.dtype)
        if dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"{name} is a device array of dtype {dtype}; device inputs must be float32 or "
                "float64 (they are not converted on the device: cast them first)"
            )
        if len(arr.shape) < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., n, features), got shape {tuple(arr.shape)}")
        if not arr.is_c_contiguous():
            raise ValueError(
                f"{name} is a non-contiguous device array (strides {tuple(arr.strides)}); pass a "
                "C-contiguous copy (e.g. .contiguous() in PyTorch, cupy.ascontiguousarray)"
            )
        dtypes[name] = dtype
    if len(set(dtypes.values())) > 1:
        raise TypeError(
            "device inputs must share one dtype; got " + ", ".join(f"{n} {t}" for n, t in dtypes.items())
        )
    qa, ka, va = arrays["q"], arrays["k"], arrays["v"]
    qs, ks, vs = tuple(qa.shape), tuple(ka.shape), tuple(va.shape)
    if qs[:-2] != ks[:-2] or qs[:-2] != vs[:-2]:
        raise ValueError(f"q, k and v must share their leading dims; got q {qs}, k {ks}, v {vs}")
    if qs[-2] != ks[-2] or ks[-2] != vs[-2]:
        raise ValueError(
            f"q, k and v must have the same sequence length n (axis -2); got q {qs}, k {ks}, v {vs}"
        )
    if qs[-1] != ks[-1]:
        raise ValueError(f"q and k must have the same feature dim d; got q {qs}, k {ks}")
    n, d, dv = qs[-2], qs[-1], vs[-1]
    if n < 1:
        raise ValueError("the sequence length n must be at least 1, got an empty sequence")
    if d < 1 or dv < 1:
        raise ValueError(f"feature dims must be at least 1; got d={d}, dv={dv}")
    lead_shape = qs[:-2]
    B = int(np.prod(lead_shape, dtype=np.int64))
    flat = {name: arr.reshape(B, n, tuple(arr.shape)[-1]) for name, arr in arrays.items()}
    if check_finite:
        for name, arr in flat.items():
            if B and not all_finite(arr):
                raise ValueError(f"{name} contains NaN or infinity (pass check_finite=False to skip this check)")
    valid = device_mask(key_padding_mask, lead_shape, n)
    dtype = dtypes["q"]
    return DeviceBatch(flat["q"], flat["k"], flat["v"], valid, lead_shape, dtype, check_scale(scale, d), True)


def device_mask(key_padding_mask, lead_shape, n):
    """``key_padding_mask`` as a device bool array ``(B, n)``, or ``None``.

    A host mask is validated by :func:`fmm_attention._validate.padding_mask` and copied in; a
    device mask must be bool, C-contiguous and of shape ``lead_shape + (n,)``.
    """
    if key_padding_mask is None:
        return None
    B = int(np.prod(lead_shape, dtype=np.int64))
    if not is_device_array(key_padding_mask):
        mask = padding_mask(key_padding_mask, lead_shape, n)
        return cuda_module().to_device(mask)
    mask = as_device_array(key_padding_mask, "key_padding_mask")
    if np.dtype(mask.dtype) != np.bool_:
        raise TypeError(f"key_padding_mask must be a bool array (True = valid key), got dtype {np.dtype(mask.dtype)}")
    if tuple(mask.shape) != tuple(lead_shape) + (n,):
        raise ValueError(
            f"key_padding_mask must have shape {tuple(lead_shape) + (n,)} (leading dims of q, then n), "
            f"got {tuple(mask.shape)}"
        )
    if not mask.is_c_contiguous():
        raise ValueError("key_padding_mask is a non-contiguous device array; pass a C-contiguous copy")
    return mask.reshape(B, n)


def all_finite(arr):
    """True if the device array ``arr`` holds no NaN or infinity (one pass, a 4-byte read back)."""
    from ._attention import nonfinite

    cuda = cuda_module()
    flat = arr.reshape(arr.size)
    flag = cuda.to_device(np.zeros(1, dtype=np.int32))
    threads = threads_per_block()
    nonfinite[grid(flat.size, threads), threads](flat, flag)
    return int(flag.copy_to_host()[0]) == 0


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

