"""Validated inputs on the device: :class:`DeviceBatch` from host or device arrays.

Host inputs (NumPy or any array-like) go through :func:`fmm_attention._validate.attention_inputs`
and are copied in. Device inputs are wrapped without a copy (:func:`._device.as_device_array`)
and checked by the same shape, mask, dtype and stride checks of :mod:`fmm_attention._validate`
(same messages), plus what only device arrays need: one kernel dtype without conversion,
C-contiguity, and the finiteness pass on the device (:func:`._attention.all_finite`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._validate import (
    Batch,
    attention_inputs,
    attention_shapes,
    check_bool,
    check_c_contiguous,
    check_kernel_dtypes,
    check_mask,
    check_scale,
    nonfinite_error,
    padding_mask,
)
from . import _device
from ._attention import all_finite


@dataclass(frozen=True)
class DeviceBatch(Batch):
    """A :class:`~fmm_attention._validate.Batch` whose arrays live on the device.

    Attributes
    ----------
    q, k, v, valid : device arrays
        Shapes as in :class:`~fmm_attention._validate.Batch`.
    on_device : bool
        The caller passed device arrays: results stay on the device.
    """

    on_device: bool

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
    on_device = {name: _device.is_device_array(x) for name, x in named.items()}
    if not any(on_device.values()):
        batch = attention_inputs(q, k, v, scale=scale, key_padding_mask=key_padding_mask, check_finite=check_finite)
        cuda = _device.cuda_module()
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
    arrays = {}
    for name, x in named.items():
        wrapped = _device.as_device_array(x, name)
        check_kernel_dtypes({name: wrapped.dtype}, "device")
        if len(wrapped.shape) < 2:
            attention_shapes({name: tuple(wrapped.shape)})  # the shared message for too few dims
        check_c_contiguous(name, wrapped.is_c_contiguous(), wrapped.strides, "device")
        arrays[name] = wrapped
    dtype = check_kernel_dtypes({name: arr.dtype for name, arr in arrays.items()}, "device")
    lead_shape, n, d, _ = attention_shapes({name: tuple(arr.shape) for name, arr in arrays.items()})
    B = int(np.prod(lead_shape, dtype=np.int64))
    flat = {name: arr.reshape(B, n, tuple(arr.shape)[-1]) for name, arr in arrays.items()}
    if check_finite:
        for name, arr in flat.items():
            if B and not all_finite(arr):
                raise nonfinite_error(name)
    valid = device_mask(key_padding_mask, lead_shape, n)
    return DeviceBatch(flat["q"], flat["k"], flat["v"], valid, lead_shape, dtype, check_scale(scale, d), True)


def device_mask(key_padding_mask, lead_shape, n):
    """``key_padding_mask`` as a device bool array ``(B, n)``, or ``None``.

    A host mask is validated by :func:`fmm_attention._validate.padding_mask` and copied in; a
    device mask gets the same checks (:func:`fmm_attention._validate.check_mask`) and must be
    C-contiguous.
    """
    if key_padding_mask is None:
        return None
    if not _device.is_device_array(key_padding_mask):
        return _device.cuda_module().to_device(padding_mask(key_padding_mask, lead_shape, n))
    mask = _device.as_device_array(key_padding_mask, "key_padding_mask")
    check_mask(mask.dtype, mask.shape, lead_shape, n)
    check_c_contiguous("key_padding_mask", mask.is_c_contiguous(), mask.strides, "device")
    return mask.reshape(int(np.prod(lead_shape, dtype=np.int64)), n)
