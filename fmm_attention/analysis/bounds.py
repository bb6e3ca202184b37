"""Rigorous per-query error bounds of FMA (Theorem 2 of the "Error analysis" page), as a
parallel kernel over the rows of the exact and implied attention.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ..cpu._jit import jit
from ..cpu._launch import launch_guard

#: Rounding slack of the bound checks: a bound holds for query ``i`` when
#: ``error_i <= bound_i + BOUND_SLACK * (bound_i + max_j ||v_j||)``.
BOUND_SLACK = 1e-10


#: Perturbations from which ``sinh`` and ``cosh`` may overflow: the bound is set to ``inf``.
_OVERFLOW = 700.0


@jit(parallel=True)
def _bound_kernel(exact, implied, levels, pt, values, centers, part_a, radius, max_delta):
    """Theorem 2's part A, the radius and the largest perturbation of every query.

    Per query ``i``, in one pass over its keys (no ``(n, n)`` temporaries):

    * ``part_a[i]``: Theorem 2 (A), ``(||sum_j p~_ij (cosh d_ij - 1) u_ij||
      + ||sum_j p~_ij sinh(d_ij) |u_ij| ||) / sum_j p~_ij exp(-d_ij)`` with
      ``u_ij = v_j - o~_i`` and ``d_ij = |implied_ij - exact_ij|`` on far pairs (0 near);
    * ``radius[i] = max_j ||u_ij||`` and ``max_delta[i] = max_j d_ij`` over attended keys.

    ``sinh``, ``cosh - 1`` and ``exp(-d)`` all come from one ``e = expm1(d)``, free of
    cancellation: ``sinh d = e (e + 2) / (2 (e + 1))``, ``cosh d - 1 = e**2 / (2 (e + 1))``.
    """
    n_rows, n_cols = exact.shape
    dv = values.shape[1]
    for i in prange(n_rows):
        even = np.zeros(dv)
        odd = np.zeros(dv)
        denominator = 0.0
        r2 = 0.0
        dmax = 0.0
        blowup = False
        for j in range(n_cols):
            if exact[i, j] == -np.inf:
                continue
            w = pt[i, j]
            d = abs(implied[i, j] - exact[i, j]) if levels[i, j] > 0 else 0.0
            dmax = max(dmax, d)
            w_even = 0.0
            w_odd = 0.0
            if d > _OVERFLOW:
                blowup = True
            elif d > 0:
                e = math.expm1(d)
                w_even = w * e * e / (2.0 * (e + 1.0))
                w_odd = w * e * (e + 2.0) / (2.0 * (e + 1.0))
                denominator += w / (e + 1.0)
            else:
                denominator += w
            dist2 = 0.0
            for f in range(dv):
                u = values[j, f] - centers[i, f]
                dist2 += u * u
                even[f] += w_even * u
                odd[f] += w_odd * abs(u)
            r2 = max(r2, dist2)
        radius[i] = math.sqrt(r2)
        max_delta[i] = dmax
        numerator = math.sqrt(np.sum(even * even)) + math.sqrt(np.sum(odd * odd))
        if blowup or denominator == 0.0:
            part_a[i] = np.inf if (blowup or numerator > 0) else 0.0
        else:
            part_a[i] = numerator / denominator


def _output_bound(exact, implied, levels, pt, values, fma_out):
    """Theorem 2 for every query: ``(bound, max_delta)``.

    The bound is the smaller of part A (see :func:`_bound_kernel`) and part B,
    ``2 tanh(max_j d_ij / 2) max_j ||v_j - o~_i||``. Rounding: a weight ``p~ < 5e-324``
    that underflowed to 0 drops a term below ``5e-324 * sinh(700) * ||u|| < 1e-15 ||u||``
    (larger perturbations give ``inf``), far inside :data:`BOUND_SLACK`.
    """
    n = exact.shape[0]
    part_a, radius, max_delta = np.empty(n), np.empty(n), np.empty(n)
    with launch_guard():  # a parallel kernel like the library's others: see cpu/_launch.py
        _bound_kernel(exact, implied, levels, pt, values, fma_out, part_a, radius, max_delta)
    return np.minimum(part_a, 2.0 * np.tanh(max_delta / 2) * radius), max_delta
