"""The CUDA backend (extra ``[cuda]``): ``@cuda.jit`` kernels mirroring :mod:`fmm_attention.cpu`."""


def require():
    """Raise ``RuntimeError`` with a clear message if no usable CUDA device is present."""
    try:
        from numba import cuda
    except ImportError as exc:  # pragma: no cover - numba always has the module
        raise RuntimeError("backend='cuda' needs numba's CUDA target: pip install 'fmm_attention[cuda]'") from exc
    if not cuda.is_available():
        raise RuntimeError(
            "backend='cuda' was requested but no usable CUDA GPU was found (install the extra "
            "'fmm_attention[cuda]' and check the driver); use backend='cpu'"
        )
    raise RuntimeError("backend='cuda' is not implemented yet")
