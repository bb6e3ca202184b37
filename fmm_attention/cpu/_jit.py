"""The project's ``jit`` and the scalar helpers every CPU kernel shares.

Kernels are compiled with :data:`fmm_attention._config.CACHE` and
:data:`fmm_attention._config.FASTMATH` read when the module defining them is imported.
"""

from numba import njit

from .. import _config


def jit(**options):
    """``numba.njit`` with the library's cache and fastmath settings."""
    return njit(cache=_config.CACHE, fastmath=_config.FASTMATH, **options)


@jit()
def dot(a, b):
    """Dot product of two 1-D float arrays of equal size, in their dtype."""
    total = a.dtype.type(0)
    for e in range(a.size):
        total += a[e] * b[e]
    return total
