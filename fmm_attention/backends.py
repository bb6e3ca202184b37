"""Backend registry: which implementation executes a call.

``"cpu"`` is always there. ``"cuda"`` is imported lazily, only when asked for or when the
inputs already live on a CUDA device, so the CPU library never needs the CUDA packages.
"""

from ._validate import check_choice

__all__ = ["BACKENDS", "get", "on_cuda_device", "resolve"]

#: The values of every function's ``backend`` argument.
BACKENDS = ("auto", "cpu", "cuda")


def on_cuda_device(*arrays):
    """True if any array lives on a CUDA device.

    Arrays exposing ``__cuda_array_interface__`` (Numba, CuPy, PyTorch CUDA tensors) and
    Numba's simulated device arrays (``__cuda_ndarray__``, under ``NUMBA_ENABLE_CUDASIM``).

    Parameters
    ----------
    *arrays : object
        Any objects; ``None`` and host arrays count as not on the device.

    Returns
    -------
    bool
    """
    return any(hasattr(a, "__cuda_array_interface__") or getattr(a, "__cuda_ndarray__", False) for a in arrays)


def resolve(backend, *arrays):
    """Name of the backend that runs a call: ``"cpu"`` or ``"cuda"``.

    ``"auto"`` picks CUDA when the inputs live on the GPU, else the CPU.

    Parameters
    ----------
    backend : {"auto", "cpu", "cuda"}
        The ``backend`` argument of a call.
    *arrays : object
        The call's array inputs.

    Returns
    -------
    str
        ``"cpu"`` or ``"cuda"``.

    Raises
    ------
    ValueError
        An unknown ``backend``.
    """
    check_choice(backend, "backend", BACKENDS)
    if backend == "auto":
        return "cuda" if on_cuda_device(*arrays) else "cpu"
    return backend


def get(name):
    """The backend module for ``name`` (``"cpu"`` or ``"cuda"``).

    Parameters
    ----------
    name : {"cpu", "cuda"}

    Returns
    -------
    module
        :mod:`fmm_attention.cpu` or :mod:`fmm_attention.cuda`.

    Raises
    ------
    RuntimeError
        ``"cuda"`` without a usable GPU or without the ``[cuda]`` extra.
    """
    if name == "cpu":
        from . import cpu

        return cpu
    from . import cuda

    cuda.require()
    return cuda
