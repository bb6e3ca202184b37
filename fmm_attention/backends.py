"""Backend registry: which implementation executes a call.

``"cpu"`` is always there. ``"cuda"`` is imported lazily, only when asked for or when the
inputs already live on a CUDA device, so the CPU library never needs the CUDA packages.
"""

from ._validate import check_choice

BACKENDS = ("auto", "cpu", "cuda")


def on_cuda_device(*arrays):
    """True if any array lives on a CUDA device.

    Arrays exposing ``__cuda_array_interface__`` (Numba, CuPy, PyTorch CUDA tensors) and
    Numba's simulated device arrays (``__cuda_ndarray__``, under ``NUMBA_ENABLE_CUDASIM``).
    """
    return any(hasattr(a, "__cuda_array_interface__") or getattr(a, "__cuda_ndarray__", False) for a in arrays)


def resolve(backend, *arrays):
    """Name of the backend that runs a call: ``"cpu"`` or ``"cuda"``.

    ``"auto"`` picks CUDA when the inputs live on the GPU, else the CPU.
    """
    check_choice(backend, "backend", BACKENDS)
    if backend == "auto":
        return "cuda" if on_cuda_device(*arrays) else "cpu"
    return backend


def get(name):
    """The backend module for ``name`` (``"cpu"`` or ``"cuda"``)."""
    if name == "cpu":
        from . import cpu

        return cpu
    from . import cuda

    cuda.require()
    return cuda
