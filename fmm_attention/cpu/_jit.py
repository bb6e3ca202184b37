"""The project's ``jit`` and the scalar helpers every CPU kernel shares.

Kernels are compiled with :data:`fmm_attention._config.CACHE` and
:data:`fmm_attention._config.FASTMATH` read when the module defining them is imported.

One compiled variant per kernel and dtype. Numba compiles a kernel once per distinct tuple
of argument types, and two kinds of difference cost a whole compile without changing the
machine code's work:

* A literal integer passed to another jitted function (``f(0, ...)``), or a counter that
  starts at one (``count = 0`` ... ``count += 1`` ... ``f(count)``: type inference
  resolves the call once while ``count`` is still ``Literal[int](0)``), compiles the callee
  for ``Literal[int](0)`` besides ``int64``. Such arguments start as ``np.int64(0)``.
* A read-only array where another call passes a writeable one: the library's plans and
  the layouts' index arrays are read-only (both are cached), masks and inputs writeable.

The compile-coverage test checks that no kernel holds two signatures of either kind.
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
