"""Input checking: array-likes in, contiguous float arrays out, or a clear error.

Every public function funnels its arguments through here before anything is planned or
compiled, so a compiled kernel never sees a shape, dtype or value it was not written for.
Errors name the offending argument and say what was expected. The checks of shapes, masks,
dtypes and strides (:func:`attention_shapes`, :func:`check_mask`, :func:`check_vector_shape`,
:func:`check_kernel_dtypes`, :func:`check_c_contiguous`, :func:`nonfinite_error`) take
plain shapes and dtypes, so device arrays (:mod:`fmm_attention.cuda._device`, which only
wraps and copies) are checked by the same code with the same messages as host arrays.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

#: dtypes the kernels are compiled for; everything else real-floating is promoted.
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_array(x, name):
    """Convert an array-like (list, ``__array__``, DLPack) to a NumPy array, no copy if possible."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        raise TypeError(
            f"{name} lives on a CUDA device; pass backend='cuda' (or 'auto') with all inputs on "
            "the device, or copy it to the host first"
        )
    if getattr(x, "requires_grad", False) is True:  # torch refuses to export it (RuntimeError)
        raise TypeError(
            f"{name} is a tensor that requires grad; fmm_attention computes no gradients: pass "
            f"{name}.detach()"
        )
    if hasattr(x, "__dlpack__") and not hasattr(x, "__array__"):
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError) as exc:
            raise TypeError(f"{name} could not be read through DLPack: {exc}") from exc
    try:
        return np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        dtype = getattr(x, "dtype", None)
        if dtype is not None:  # an array type whose dtype NumPy lacks (bfloat16, ...)
            raise TypeError(
                f"{name} must be an array-like of real floats NumPy can read, got {type(x).__name__} of "
                f"dtype {dtype}; convert it to float32 or float64 first"
            ) from exc
        raise TypeError(f"{name} must be an array-like of real floats, got {type(x).__name__}") from exc


def float_dtype(*named_arrays):
    """The kernel dtype for a set of arrays: float32 or float64.

    float16 (and any float narrower than 32 bits) is promoted to float32; float64 and wider
    (``longdouble``) compute in float64. Integers, booleans, complex and object arrays are
    rejected with a ``TypeError`` naming the argument.
    """
    result = None
    for name, arr in named_arrays:
        dt = arr.dtype
        if dt.kind != "f":
            raise TypeError(
                f"{name} must have a real floating dtype (float32 or float64), got {dt}"
            )
        dt = np.dtype(np.float32) if dt.itemsize <= 4 else np.dtype(np.float64)
        result = dt if result is None else np.promote_types(result, dt)
    return result


def check_finite_array(arr, name, valid=None):
    """Raise ``ValueError`` if ``arr`` holds NaN or infinity (only in rows ``valid`` marks,
    if given: ``arr`` (B, n, f), ``valid`` (B, n) bool).

    A parallel compiled pass over the exponent bits (:func:`fmm_attention.cpu.finite.all_finite`):
    no boolean temporary, every thread at memory bandwidth. Only when it fails and
    ``valid`` is given are the valid rows looked at again.
    """
    from .cpu.finite import all_finite  # compiled: imported on first use, like the backends

    if not all_finite(arr) and (valid is None or not np.isfinite(arr[valid]).all()):
        raise nonfinite_error(name)


def check_bool(value, name):
    """``value`` must be a Python or NumPy bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_power_of_two(value, name):
    """``value`` must be an integer power of two (1, 2, 4, ...)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer power of two, got {value!r}")
    value = int(value)
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 1, got {value}")
    return value


def check_count(value, name):
    """``value`` must be an integer >= 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def check_choice(value, name, choices):
    """``value`` must be one of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_scale(scale, d):
    """The logit scale: ``1/sqrt(d)`` by default, else a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    try:
        scale = float(scale)
    except OverflowError:  # an int or Fraction beyond the float range
        raise ValueError("scale must be finite, got a number beyond the float range") from None
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


@dataclass(frozen=True)
class Batch:
    """Validated attention inputs, leading dims flattened to one batch axis.

    Host arrays here; :class:`fmm_attention.cuda._inputs.DeviceBatch` is the same with
    device arrays.

    Attributes
    ----------
    q, k : ndarray, shape (B, n, d)
    v : ndarray, shape (B, n, dv)
    valid : ndarray of bool, shape (B, n), or None
        Key validity (``True`` = valid); ``None`` when every key is valid.
    lead_shape : tuple
        The caller's leading dims, restored on output.
    dtype : numpy.dtype
        float32 or float64, the dtype of the computation and the output.
    scale : float
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    valid: np.ndarray | None
    lead_shape: tuple
    dtype: np.dtype
    scale: float

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

    def restore(self, out, last_dim=True):
        """Give ``out`` (B, n[, x]) the caller's leading dims back."""
        tail = out.shape[2:] if last_dim else ()
        return out.reshape(self.lead_shape + (self.n,) + tail)


def attention_shapes(shapes):
    """Check the shapes of ``q``, ``k``, ``v`` (host or device arrays alike).

    Parameters
    ----------
    shapes : dict
        ``{"q": shape, "k": shape, "v": shape}``, tuples.

    Returns
    -------
    lead_shape : tuple
    n, d, dv : int

    Raises
    ------
    ValueError
        Fewer than 2 dims, mismatched leading dims, lengths or feature dims, an empty
        sequence or feature dim.
    """
    for name, shape in shapes.items():
        if len(shape) < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., n, features), got shape {shape}")
    qs, ks, vs = (tuple(shapes[name]) for name in ("q", "k", "v"))
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
    return qs[:-2], n, d, dv


def check_mask(dtype, shape, lead_shape, n):
    """A key padding mask (host or device) must be bool of shape ``lead_shape + (n,)``."""
    if np.dtype(dtype) != np.bool_:
        raise TypeError(f"key_padding_mask must be a bool array (True = valid key), got dtype {np.dtype(dtype)}")
    if tuple(shape) != tuple(lead_shape) + (n,):
        raise ValueError(
            f"key_padding_mask must have shape {tuple(lead_shape) + (n,)} (leading dims of q, then n), "
            f"got {tuple(shape)}"
        )


def check_kernel_dtypes(named_dtypes, where):
    """Arrays that are not converted (``where``: e.g. ``"device"``) must share one kernel dtype.

    Parameters
    ----------
    named_dtypes : dict
        Argument name -> dtype.
    where : str
        What kind of array they are, for the messages.

    Returns
    -------
    numpy.dtype
        float32 or float64.
    """
    dtypes = {name: np.dtype(dt) for name, dt in named_dtypes.items()}
    for name, dtype in dtypes.items():
        if dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"{name} is a {where} array of dtype {dtype}; {where} inputs must be float32 or "
                f"float64 (they are not converted on the {where}: cast them first)"
            )
    if len(set(dtypes.values())) > 1:
        raise TypeError(
            f"{where} inputs must share one dtype; got " + ", ".join(f"{n} {t}" for n, t in dtypes.items())
        )
    return next(iter(dtypes.values()))


def check_c_contiguous(name, c_contiguous, strides, where):
    """Arrays that are not copied (``where``: e.g. ``"device"``) must be C-contiguous."""
    if not c_contiguous:
        raise ValueError(
            f"{name} is a non-contiguous {where} array (strides {tuple(strides)}); pass a C-contiguous copy "
            "(e.g. .contiguous() in PyTorch, cupy.ascontiguousarray)"
        )


def nonfinite_error(name):
    """The ``ValueError`` for NaN or infinity in argument ``name`` (host and device alike)."""
    return ValueError(f"{name} contains NaN or infinity (pass check_finite=False to skip this check)")


def attention_inputs(q, k, v, *, scale, key_padding_mask, check_finite, skip_masked=False):
    """Validate ``q, k, v`` (and mask, scale) and return a :class:`Batch`.

    Shapes ``(..., n, d)``, ``(..., n, d)``, ``(..., n, dv)`` with identical leading dims.
    Arrays are made C-contiguous and writeable in the kernel dtype; a copy happens only when
    the input is not already so (read-only inputs are copied: Numba would otherwise compile a
    second variant of every kernel for them), and the inputs themselves are never written to.
    With ``skip_masked`` the finiteness check ignores the positions ``key_padding_mask``
    marks invalid (for kernels in which such positions influence no valid output).
    """
    check_finite = check_bool(check_finite, "check_finite")
    arrays = {"q": as_array(q, "q"), "k": as_array(k, "k"), "v": as_array(v, "v")}
    lead_shape, n, d, _ = attention_shapes({name: arr.shape for name, arr in arrays.items()})
    dtype = float_dtype(*arrays.items())
    batch = int(np.prod(lead_shape, dtype=np.int64))
    valid = padding_mask(key_padding_mask, lead_shape, n)
    out = {}
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr, dtype=dtype).reshape(batch, n, arr.shape[-1])
        if not arr.flags.writeable:
            # Numba types read-only arrays apart: passing one would compile every kernel
            # again (tens of seconds). One O(n d) copy is far cheaper; the kernels never write.
            arr = arr.copy()
        if check_finite:
            check_finite_array(arr, name, valid if skip_masked else None)
        out[name] = arr
    return Batch(out["q"], out["k"], out["v"], valid, lead_shape, dtype, check_scale(scale, d))


def padding_mask(key_padding_mask, lead_shape, n):
    """Validate ``key_padding_mask`` (..., n) bool, True = valid; ``None`` if all valid."""
    if key_padding_mask is None:
        return None
    mask = as_array(key_padding_mask, "key_padding_mask")
    check_mask(mask.dtype, mask.shape, lead_shape, n)
    batch = int(np.prod(lead_shape, dtype=np.int64))
    mask = np.ascontiguousarray(mask).reshape(batch, n)
    return mask if mask.flags.writeable else mask.copy()  # read-only: see attention_inputs


def global_token_indices(global_tokens):
    """Sorted unique integer token indices as a tuple (empty for ``None``), or ``"auto"``
    (chosen per call from the inputs, :mod:`fmm_attention.sinks`); the range is not checked.
    """
    if global_tokens is None:
        return ()
    if isinstance(global_tokens, str):
        if global_tokens == "auto":
            return "auto"
        raise ValueError(f"global_tokens must be token indices or 'auto', got {global_tokens!r}")
    arr = np.asarray(global_tokens)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(f"global_tokens must be a 1-D sequence of integer token indices, got {global_tokens!r}")
    return tuple(int(i) for i in np.unique(arr))


def check_global_tokens(global_tokens, n):
    """Sorted unique token indices in ``[0, n)`` as a tuple (empty for ``None``), or ``"auto"``."""
    tokens = global_token_indices(global_tokens)
    if tokens == "auto":
        return tokens
    if tokens and (tokens[0] < 0 or tokens[-1] >= n):
        raise ValueError(f"global_tokens must lie in [0, n) = [0, {n}), got min {tokens[0]} and max {tokens[-1]}")
    return tokens


def check_vector_shape(shape, name, d, lead):
    """An additive-attention vector's shape must be ``(..., d)``, broadcasting to ``lead``."""
    if len(shape) < 1 or shape[-1] != d:
        raise ValueError(f"{name} must have shape (..., d) with d = {d} (the feature dim of q), got {shape}")
    try:
        fits = np.broadcast_shapes(shape[:-1], lead) == lead
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{name} of shape {shape} does not broadcast against the leading dims {lead} of q: "
            f"expected (..., {d}) with leading dims broadcastable to {lead}, e.g. one vector per head"
        )


def attention_vector(w, name, batch, check_finite):
    """Validate an additive-attention vector ``(..., d)``; return it as ``(B, d)`` in the batch dtype."""
    arr = as_array(w, name)
    float_dtype((name, arr))
    d, lead = batch.d, batch.lead_shape
    check_vector_shape(arr.shape, name, d, lead)
    arr = arr.astype(batch.dtype, copy=False)
    if check_finite:
        check_finite_array(arr, name)
    return np.broadcast_to(arr, lead + (d,)).reshape(batch.q.shape[0], d)
