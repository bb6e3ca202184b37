"""Far-field coarsening: how each far box's keys and values are summarised.

``"mean"`` (the default, training-free) averages the valid tokens of each sub-box.
:class:`LearnedCoarsening` applies trained weights in the layout of
``torch.nn.Conv1d(d, r*d, kernel_size=w, stride=w, groups=d)``, so weights trained in
PyTorch load unchanged. The kernels in :mod:`fmm_attention.cpu` and
:mod:`fmm_attention.cuda` execute these descriptions.
"""

from __future__ import annotations

import numpy as np

from ._validate import as_array

__all__ = ["LearnedCoarsening"]


def _weight_list(weights, name):
    if isinstance(weights, np.ndarray) or not hasattr(weights, "__len__"):
        raise TypeError(f"{name} must be a sequence with one array per far level")
    out = []
    for level, w in enumerate(weights, start=1):
        arr = as_array(w, f"{name}[{level - 1}]")
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name}[{level - 1}] must be real, got dtype {arr.dtype}")
        if arr.ndim == 2:  # (r*d, w) is accepted as the squeezed Conv1d layout
            arr = arr[:, None, :]
        if arr.ndim != 3 or arr.shape[1] != 1:
            raise ValueError(
                f"{name}[{level - 1}] must have the Conv1d grouped layout (r*d, 1, w), got shape {arr.shape}"
            )
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}[{level - 1}] contains NaN or infinity")
        arr = np.array(arr, dtype=np.float64)  # own copy: later edits by the caller change nothing
        arr.setflags(write=False)
        out.append(arr)
    if not out:
        raise ValueError(f"{name} must hold at least one level")
    return tuple(out)


def _bias_list(biases, weights, name):
    if biases is None:
        # read-only like given biases: Numba compiles one kernel variant per (dtype, writeable)
        zeros = tuple(np.zeros(w.shape[0]) for w in weights)
        for arr in zeros:
            arr.setflags(write=False)
        return zeros
    if isinstance(biases, np.ndarray) or not hasattr(biases, "__len__") or len(biases) != len(weights):
        raise ValueError(f"{name} must be None or one array per far level ({len(weights)} levels)")
    out = []
    for level, (b, w) in enumerate(zip(biases, weights)):
        arr = as_array(b, f"{name}[{level}]")
        if arr.dtype.kind not in "fiu":  # a cast to float64 would drop a complex bias's imaginary part
            raise TypeError(f"{name}[{level}] must be real, got dtype {arr.dtype}")
        arr = np.array(arr, dtype=np.float64)  # own copy: later edits by the caller change nothing
        if arr.shape != (w.shape[0],):
            raise ValueError(f"{name}[{level}] must have shape ({w.shape[0]},), got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}[{level}] contains NaN or infinity")
        arr.setflags(write=False)
        out.append(arr)
    return tuple(out)


class LearnedCoarsening:
    """Trained far-field coarsening: one grouped convolution per far level.

    At far level ``l`` (box size ``w_l``, ``r_l`` coarse keys per box) the coarse key in slot
    ``t`` of box ``c``, channel ``e``, is::

        Kc[c*r_l + t, e] = sum_{u < w_l} W_l[e*r_l + t, 0, u] * K[c*w_l + u, e] + bias_l[e*r_l + t]

    exactly what ``torch.nn.Conv1d(d, r_l*d, kernel_size=w_l, stride=w_l, groups=d)``
    computes, so ``conv.weight`` and ``conv.bias`` load unchanged. Values use their own
    weights of shape ``(r_l*dv, 1, w_l)``. Padded and masked tokens enter as zeros, a box with
    no valid token is masked, and count scaling adds ``log(valid(box) / r_l)``.

    Parameters
    ----------
    key_weights : sequence of array_like
        One array per far level ``l = 1 .. L``, shape ``(r_l*d, 1, w_l)`` (``(r_l*d, w_l)``
        is accepted too).
    value_weights : sequence of array_like
        Likewise for values, shape ``(r_l*dv, 1, w_l)``.
    key_bias, value_bias : sequence of array_like, optional
        One array per level, shape ``(r_l*d,)`` / ``(r_l*dv,)``; zeros when omitted.

    Notes
    -----
    The weights fix the tree: ``L`` levels with box sizes ``w_l = m * 2**(l-1)``. A call
    whose ``n``, ``block_size`` or ``rank`` imply another tree raises ``ValueError``.
    Weights are stored in float64 and cast to the dtype of each call.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention import LearnedCoarsening, fmm_attention
    >>> from fmm_attention import build_tree
    >>> d, m, p = 4, 4, 2
    >>> tree = build_tree(32, block_size=m, rank=p)  # two far levels
    >>> [level.box_size for level in tree.levels]
    [4, 8]
    >>> kw = [np.full((lv.rank * d, 1, lv.box_size), 1.0 / lv.box_size)
    ...       for lv in tree.levels]
    >>> coarse = LearnedCoarsening(kw, kw)  # every slot holds its box's mean
    >>> x = np.random.default_rng(0).standard_normal((32, d))
    >>> out = fmm_attention(x, x, x, block_size=m, rank=p, coarsening=coarse)
    >>> out.shape
    (32, 4)

    Two slots that both hold the box mean, each with count bias ``log(w_l / 2)``, weigh
    exactly as one box mean with bias ``log(w_l)``, that is mean coarsening at rank 1:

    >>> bool(np.allclose(out, fmm_attention(x, x, x, block_size=m, rank=1)))
    True
    """

    def __init__(self, key_weights, value_weights, key_bias=None, value_bias=None):
        self.key_weights = _weight_list(key_weights, "key_weights")
        self.value_weights = _weight_list(value_weights, "value_weights")
        if len(self.key_weights) != len(self.value_weights):
            raise ValueError(
                f"key_weights and value_weights must have one array per level each; got "
                f"{len(self.key_weights)} and {len(self.value_weights)}"
            )
        self.key_bias = _bias_list(key_bias, self.key_weights, "key_bias")
        self.value_bias = _bias_list(value_bias, self.value_weights, "value_bias")
        for level, (kw, vw) in enumerate(zip(self.key_weights, self.value_weights), start=1):
            if kw.shape[2] != vw.shape[2]:
                raise ValueError(
                    f"level {level}: key and value weights must share the kernel width w, got "
                    f"{kw.shape[2]} and {vw.shape[2]}"
                )

    @property
    def n_levels(self):
        """Number of far levels the weights cover."""
        return len(self.key_weights)

    def check_tree(self, tree, d, dv):
        """Raise ``ValueError`` unless the weights fit ``tree`` and feature dims ``d``, ``dv``.

        Parameters
        ----------
        tree : FMMTree
            The tree of a call (:func:`~fmm_attention.build_tree`).
        d, dv : int
            Feature dims of the keys and of the values.

        Raises
        ------
        ValueError
            Another number of levels, or weights whose shape is not ``(r_l*d, 1, w_l)``
            (values: ``(r_l*dv, 1, w_l)``) at some level.
        """
        if tree.n_levels != self.n_levels:
            raise ValueError(
                f"coarsening: LearnedCoarsening has {self.n_levels} levels but n={tree.n} with "
                f"block_size={tree.block_size} needs {tree.n_levels} (padded length {tree.padded_length})"
            )
        for level, kw, vw in zip(tree.levels, self.key_weights, self.value_weights):
            want_k = (level.rank * d, 1, level.box_size)
            want_v = (level.rank * dv, 1, level.box_size)
            if kw.shape != want_k or vw.shape != want_v:
                raise ValueError(
                    f"coarsening: level {level.index} expects key weights {want_k} and value weights "
                    f"{want_v} (r_l={level.rank}, w_l={level.box_size}); got {kw.shape} and {vw.shape}"
                )

    def level_arrays(self, dtype):
        """Weights and biases per level as 2-D arrays ``(r*d, w)`` in ``dtype``.

        Parameters
        ----------
        dtype : numpy.dtype
            The dtype of the computation (float32 or float64).

        Returns
        -------
        key_weights, value_weights : tuple of ndarray
            One C-contiguous ``(r_l*d, w_l)`` (values: ``(r_l*dv, w_l)``) array per level.
        key_bias, value_bias : tuple of ndarray
            One ``(r_l*d,)`` (values: ``(r_l*dv,)``) array per level.
        """
        return (
            tuple(np.ascontiguousarray(w[:, 0, :], dtype=dtype) for w in self.key_weights),
            tuple(np.ascontiguousarray(w[:, 0, :], dtype=dtype) for w in self.value_weights),
            tuple(np.asarray(b, dtype=dtype) for b in self.key_bias),
            tuple(np.asarray(b, dtype=dtype) for b in self.value_bias),
        )

    def __repr__(self):
        widths = [w.shape[2] for w in self.key_weights]
        return f"LearnedCoarsening(n_levels={self.n_levels}, widths={widths})"
