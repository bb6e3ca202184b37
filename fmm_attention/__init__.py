"""fmm_attention: attention on long sequences, outside PyTorch.

Fast Multipole Attention (exact near field, hierarchical far field, one joint softmax),
exact softmax attention as the memory-efficient reference, and error analysis against it.
Numba CPU kernels (and CUDA kernels with the ``[cuda]`` extra) behind one NumPy API.
"""

from . import _threads  # noqa: F401 - applies the threading layer before anything asks Numba for threads
from .api import exact_attention, fastformer_attention, fmm_attention
from .grad import exact_attention_vjp, fastformer_attention_vjp, fmm_attention_vjp
from ._stats import FMMStats
from .coarsening import ClusterCoarsening, Coarsening, LearnedCoarsening, MeanCoarsening
from .decode import FMMDecoder
from .tree import FMMTree, build_tree

__version__ = "0.1.0"

__all__ = [
    "exact_attention",
    "fmm_attention",
    "fastformer_attention",
    "exact_attention_vjp",
    "fmm_attention_vjp",
    "fastformer_attention_vjp",
    "build_tree",
    "FMMTree",
    "Coarsening",
    "MeanCoarsening",
    "ClusterCoarsening",
    "LearnedCoarsening",
    "FMMDecoder",
    "FMMStats",
    "__version__",
]
