"""Adapters that run the public functions on distributed arrays.

They sit *above* :mod:`fmm_attention.api`: the public functions hand a call over to
:mod:`fmm_attention.distributed.dask` when any input is a Dask collection, and nothing below
the API imports this package. Importing it does not import Dask: :func:`is_dask` recognises a
Dask collection by the collection protocol (``__dask_graph__``), so NumPy-only users never
pay for (or need) the ``[dask]`` extra.
"""

from __future__ import annotations


def is_dask(*arrays):
    """True if any argument is a Dask collection (checked without importing Dask).

    Parameters
    ----------
    *arrays : object
        Candidate inputs; ``None`` and non-array objects are ignored.

    Returns
    -------
    bool

    Examples
    --------
    >>> import numpy as np
    >>> is_dask(np.zeros(3), None)
    False
    """
    return any(callable(getattr(type(x), "__dask_graph__", None)) for x in arrays if x is not None)


__all__ = ["is_dask"]
