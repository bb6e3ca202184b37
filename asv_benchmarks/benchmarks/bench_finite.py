"""The ``check_finite`` pass: time per call of the finiteness check on one input array.

``n = 16`` (a (16, 64) array, serial path) tracks the fixed per-call cost, the large sizes
the bandwidth (issue 18: at least 25 GB/s, at most 20 us per call at n = 16). ``track_``
benchmarks report the bandwidth in GB/s directly (the median of several timed passes).
"""

import time

import numpy as np

from . import _common as c

#: Elements of the checked array: (16, 64) and 2**18 .. 2**24 floats.
FINITE_SIZES = [16 * c.D, 1 << 18, 1 << 22, 1 << 24]


def _array(size, dtype):
    return np.random.default_rng(0).standard_normal(size).astype(dtype)


class CheckFinite:
    """Time of ``_validate.check_finite_array`` (what ``check_finite=True`` runs per input)."""

    params = [FINITE_SIZES, c.DTYPES]
    param_names = ["size", "dtype"]

    def setup(self, size, dtype):
        from fmm_attention._validate import check_finite_array

        self.check = check_finite_array
        self.x = _array(size, dtype)
        self.check(self.x, "q")  # compile or load the kernels

    def time_check_finite(self, size, dtype):
        self.check(self.x, "q")

    def time_numpy_isfinite_all(self, size, dtype):
        """Time the NumPy one-liner, for comparison in the same run."""
        np.isfinite(self.x).all()


class CheckFiniteBandwidth:
    """Bytes read per second by the finiteness check (GB/s), median of 21 passes."""

    params = [FINITE_SIZES[1:], c.DTYPES]
    param_names = ["size", "dtype"]
    unit = "GB/s"

    def setup(self, size, dtype):
        from fmm_attention.cpu.finite import all_finite

        self.all_finite = all_finite
        self.x = _array(size, dtype)
        assert all_finite(self.x)

    def track_check_finite_bandwidth(self, size, dtype):
        times = []
        for _ in range(21):
            start = time.perf_counter()
            self.all_finite(self.x)
            times.append(time.perf_counter() - start)
        return self.x.nbytes / float(np.median(times)) / 1e9
