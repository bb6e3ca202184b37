"""Fresh zeroed arrays carved from one mapping, for the large outputs of a call.

A pullback returns new gradient arrays on every call, and a training loop drops the last
step's. With glibc's allocator an array below its largest mmap threshold (32 MiB on 64-bit
Linux) comes from the heap once an earlier large array was freed, and when several are
freed together the heap's top is returned to the system; the next call's arrays then
fault in page by page, 4 KiB at a time: about 3,000 faults per FMA pullback at
n = 65,536, each 2 to 16 us on this project's virtual machines. One allocation of at least
the threshold is always a fresh mapping: NumPy asks for transparent huge pages on it, and
its pages fault in 2 MiB at a time (docs/performance.rst, "Page faults"). Pages never
written are never backed, so the rounding up costs address space only.
"""

import math

import numpy as np

from .. import _config

_ALIGN = 4096  # each array starts on a page of its own
_HUGE_PAGE = 2 << 20  # the block's arrays start on a huge-page boundary: all of it can be huge pages


def zeroed_arrays(specs):
    """Zeroed arrays of the given ``(shape, dtype)`` specs, in one allocation when large.

    Parameters
    ----------
    specs : sequence of (tuple, numpy dtype)
        Shape and dtype of each array.

    Returns
    -------
    list of ndarray
        C-contiguous, zeroed, pairwise non-overlapping; views of one block (which lives
        until the last of them is dropped) when their total reaches
        ``_config.FRESH_BLOCK_MIN_BYTES`` (0: never), else separate ``np.zeros`` arrays.
    """
    sizes = [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in specs]
    starts = np.cumsum([0] + [-(-s // _ALIGN) * _ALIGN for s in sizes])
    least = int(_config.FRESH_BLOCK_MIN_BYTES)
    if least <= 0 or int(starts[-1]) < least:
        return [np.zeros(shape, dtype) for shape, dtype in specs]
    block = np.zeros(max(int(starts[-1]), int(_config.FRESH_BLOCK_BYTES)) + _HUGE_PAGE, dtype=np.uint8)
    base = -block.ctypes.data % _HUGE_PAGE
    return [
        block[base + int(start) : base + int(start) + size].view(dtype).reshape(shape)
        for (shape, dtype), start, size in zip(specs, starts, sizes)
    ]
