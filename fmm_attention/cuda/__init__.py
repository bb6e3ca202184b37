"""The CUDA backend (extra ``[cuda]``): ``@cuda.jit`` kernels mirroring :mod:`fmm_attention.cpu`.

The public functions of :mod:`fmm_attention` call into this package with ``backend="cuda"``,
or with ``backend="auto"`` when the inputs already live on the GPU. It can also be used
directly; every function here takes the same keywords as its public counterpart, without
``backend``.

Inputs and outputs
------------------
* Host inputs (NumPy arrays or any array-like) are validated like on the CPU, copied to the
  device, and the results copied back: NumPy arrays in, NumPy arrays out.
* Device inputs, i.e. objects exposing ``__cuda_array_interface__`` (Numba device arrays,
  CuPy arrays, PyTorch CUDA tensors), are computed on the GPU without a host round trip.
  They must all be on the device, share one dtype (float32 or float64), and be
  C-contiguous. The results are **Numba device arrays** (``numba.cuda.cudadrv.devicearray.
  DeviceNDArray``) of the same dtype; hand them to CuPy (``cupy.asarray(out)``) or PyTorch
  (``torch.as_tensor(out, device="cuda")``) without a copy, or call ``out.copy_to_host()``.
* Kernels run on the current device (``numba.cuda.select_device``) in the default stream.
  :func:`synchronize` waits for them (for timings).

Nothing here imports :mod:`numba.cuda` at import time: :mod:`._device` does, on first use.
The functions here are the public ones with ``backend="cuda"``: validation, options and
dispatch live once, in :mod:`fmm_attention.api` and the registered CUDA backend object
(:mod:`fmm_attention.backends`).
"""

from __future__ import annotations

from .. import _config
from . import _device

__all__ = ["require", "synchronize", "exact_attention", "fmm_attention", "fastformer_attention"]


def require():
    """Check that the CUDA backend can run.

    Passes under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).

    Raises
    ------
    RuntimeError
        When numba's CUDA target (package ``numba-cuda``, extra ``[cuda]``) cannot be
        imported, or no usable CUDA GPU (driver) is found.
    """
    _device.require()


def synchronize():
    """Block until every kernel launched on the current device has finished.

    The kernels run asynchronously when results stay on the device; call this before reading
    a clock.
    """
    _device.synchronize()


def exact_attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None, return_lse=False,
                    check_finite=True):
    """Exact softmax attention on the GPU (flash-style tiles, O(n d) memory).

    Same semantics as :func:`fmm_attention.exact_attention`.

    Parameters
    ----------
    q, k : array_like or device array, shape (..., n, d)
    v : array_like or device array, shape (..., n, dv)
    causal : bool, optional
    scale : float, optional
        ``1 / sqrt(d)`` by default.
    key_padding_mask : array_like or device array of bool, shape (..., n), optional
        ``True`` marks a valid key.
    return_lse : bool, optional
    check_finite : bool, optional
        For device inputs this is one extra pass and a 4-byte read back per array.

    Returns
    -------
    out : ndarray or numba device array, shape (..., n, dv)
        A NumPy array for host inputs, a Numba device array for device inputs.
    lse : same kind, shape (..., n)
        Only with ``return_lse=True``.

    Raises
    ------
    RuntimeError
        No usable GPU.
    TypeError, ValueError
        Invalid inputs (see :func:`fmm_attention.exact_attention`); device inputs also need
        one dtype (float32/float64) and C-contiguity.
    """
    from ..api import exact_attention as _exact

    return _exact(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask, return_lse=return_lse,
                  check_finite=check_finite, backend="cuda")


def fmm_attention(q, k, v, *, causal=False, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
                  coarsening="mean", count_scaling=True, query_coarsening=False, scale=None,
                  key_padding_mask=None, return_lse=False, check_finite=True):
    """Fast Multipole Attention on the GPU.

    Same semantics and plan (:func:`fmm_attention.build_tree`) as
    :func:`fmm_attention.fmm_attention`: upward pass (mean or learned coarsening) as its own
    kernels, near and far field fused per query block in one online (joint) softmax, and the
    O(n) coarse-query variant (far partials per box, downward pass, near merge).

    Parameters
    ----------
    q, k : array_like or device array, shape (..., n, d)
    v : array_like or device array, shape (..., n, dv)
    causal : bool, optional
    block_size, rank : int, optional
        Powers of two: finest box size ``m`` and coarse keys per box ``p``.
    coarsening : "mean" or Coarsening, optional
        A coarsening with a ``"cuda"`` kernel (:class:`~fmm_attention.MeanCoarsening`,
        :class:`~fmm_attention.LearnedCoarsening`; others are refused by name). Learned
        weights are copied to the device once per coarsening object and dtype.
    count_scaling, query_coarsening : bool, optional
    scale : float, optional
    key_padding_mask : array_like or device array of bool, shape (..., n), optional
    return_lse, check_finite : bool, optional

    Returns
    -------
    out : ndarray or numba device array, shape (..., n, dv)
        A NumPy array for host inputs, a Numba device array for device inputs.
    lse : same kind, shape (..., n)
        Only with ``return_lse=True``.

    Raises
    ------
    RuntimeError
        No usable GPU.
    TypeError, ValueError
        As :func:`fmm_attention.fmm_attention`.
    """
    from ..api import fmm_attention as _fmm

    return _fmm(q, k, v, causal=causal, block_size=block_size, rank=rank, coarsening=coarsening,
                count_scaling=count_scaling, query_coarsening=query_coarsening, scale=scale,
                key_padding_mask=key_padding_mask, return_lse=return_lse, check_finite=check_finite, backend="cuda")


def fastformer_attention(q, k, v, w_q, w_k, *, causal=False, scale=None, key_padding_mask=None,
                         return_pools=False, check_finite=True):
    """Fastformer additive attention on the GPU.

    Same semantics as :func:`fmm_attention.fastformer_attention`: bidirectional pools by
    parallel chunked reductions (shared-memory tree reductions, log-sum-exp merge), causal
    prefix pools by a chunked scan with running maxima.

    Parameters
    ----------
    q, k, v : array_like or device array, shape (..., n, d)
    w_q, w_k : array_like or device array, shape (..., d)
        Broadcast against the leading dims of ``q``; device vectors are cast to the dtype of
        ``q`` on the device.
    causal : bool, optional
    scale : float, optional
        ``1 / sqrt(d)`` by default.
    key_padding_mask : array_like or device array of bool, shape (..., n), optional
    return_pools : bool, optional
        Also return the pools ``qg`` and ``kg``.
    check_finite : bool, optional

    Returns
    -------
    u : ndarray or numba device array, shape (..., n, d)
        A NumPy array for host inputs, a Numba device array for device inputs.
    qg, kg : same kind
        Only with ``return_pools=True``: shape ``(..., d)``, or ``(..., n, d)`` when causal.

    Raises
    ------
    RuntimeError
        No usable GPU.
    TypeError, ValueError
        As :func:`fmm_attention.fastformer_attention`.
    """
    from ..api import fastformer_attention as _fastformer

    return _fastformer(q, k, v, w_q, w_k, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                       return_pools=return_pools, check_finite=check_finite, backend="cuda")
