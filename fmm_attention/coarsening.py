"""Far-field coarsening: how each far box's keys and values are summarised.

A coarsening is an object following the :class:`Coarsening` protocol: it knows its name
(what backends and error messages call it), its cost, whether the error analysis can express
it, whether it has a backward pass, and its upward-pass kernel on each backend that runs it.
Three ship with the library:

* :class:`MeanCoarsening` (``coarsening="mean"``, the default, training-free) averages the
  valid tokens of each sub-box;
* :class:`ClusterCoarsening` (``coarsening="cluster"``) groups each box's keys by content
  (k-means up the tree);
* :class:`LearnedCoarsening` applies trained weights in the layout of
  ``torch.nn.Conv1d(d, r*d, kernel_size=w, stride=w, groups=d)``, so weights trained in
  PyTorch load unchanged.

Adding a coarsening is one subclass of :class:`Coarsening` (its name, its cost, its
``kernels``) and one kernel module per backend it runs on; a backend whose name is not in
``kernels`` refuses it by name (:class:`fmm_attention.backends.BackendNotSupportedError`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from ._validate import as_array, check_count

__all__ = ["ClusterCoarsening", "Coarsening", "LearnedCoarsening", "MeanCoarsening", "as_coarsening"]

#: The strings ``coarsening=`` accepts, and the coarsening each one names.
NAMES = ("mean", "cluster")


class Coarsening:
    """The protocol of a far-field coarsening: what a far box's coarse keys and values are.

    Subclasses set the class attributes and, where the defaults do not fit, override
    :meth:`check_tree` and :meth:`upward_flops`. Instances must be hashable
    (:class:`~fmm_attention.options.FMMOptions` holds one and keys plans with it): a frozen
    dataclass compares by value, a plain class by identity.

    Attributes
    ----------
    name : str
        The name backends declare support for and :class:`~fmm_attention.FMMStats` report.
    analysis : bool
        Whether :mod:`fmm_attention.analysis` can express it (a token-level implied
        attention matrix exists and the analysis reproduces it).
    differentiable : bool
        Whether :func:`fmm_attention.fmm_attention_vjp` has its backward.
    buffer_copies : int
        Sets of coarse-buffer-sized temporaries its upward pass needs, counting the coarse
        buffers themselves (for the memory estimate made before a call allocates).
    kernels : dict
        Backend name -> its upward pass, a callable or ``"module:function"`` (imported on
        first use, so that declaring a CUDA kernel never imports :mod:`numba.cuda`). It is
        called as ``upward(coarsening, batch, tree, valid=, has_mask=, count_scaling=, kc=,
        vc=, cbias=)`` on the backend's arrays: ``batch`` the validated inputs ``(B, n, .)``,
        ``valid`` ``(B, n)`` the tokens allowed into coarsening (read only when
        ``has_mask``), and it writes every row of the coarse keys ``kc`` ``(B, C, d)``,
        values ``vc`` ``(B, C, dv)`` and logit biases ``cbias`` ``(B, C)`` (``-inf`` for a
        row that summarises no valid token; rows ``tree.levels[l].offset + c * rank + t``).
    """

    name = ""
    analysis = False
    differentiable = False
    buffer_copies = 1
    kernels = {}

    def kernel(self, backend):
        """The upward pass on ``backend`` (a name in :attr:`kernels`).

        Parameters
        ----------
        backend : str

        Returns
        -------
        callable

        Raises
        ------
        ValueError
            No kernel for ``backend`` (backends ask :meth:`runs_on` before they get here).
        """
        if backend not in self.kernels:
            raise ValueError(f"{self.describe()} has no upward pass on backend {backend!r}")
        entry = self.kernels[backend]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
        return entry

    def runs_on(self, backend):
        """Whether the coarsening declares a kernel for ``backend`` (a name).

        Parameters
        ----------
        backend : str

        Returns
        -------
        bool
        """
        return backend in self.kernels

    def check_tree(self, tree, d, dv):
        """Raise ``ValueError`` unless the coarsening fits ``tree`` (default: every tree fits).

        Parameters
        ----------
        tree : FMMTree
        d, dv : int
            Feature dims of the keys and of the values.
        """

    def upward_flops(self, tree, d, dv):
        """Multiply-adds of the upward pass for one batch entry (default: one pass over the
        tokens per level).

        Parameters
        ----------
        tree : FMMTree
        d, dv : int

        Returns
        -------
        float
        """
        return float((d + dv) * tree.n * tree.n_levels)

    def describe(self):
        """The coarsening as error messages show it, e.g. ``"coarsening='mean'"``.

        Returns
        -------
        str
        """
        return f"coarsening={self!r}"


@dataclass(frozen=True)
class MeanCoarsening(Coarsening):
    """Mean coarsening (``coarsening="mean"``): each coarse key and value is the mean of the
    valid tokens of its sub-box of ``w_l / r_l`` tokens, with count bias ``log(count)``.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention import MeanCoarsening, fmm_attention
    >>> x = np.random.default_rng(0).standard_normal((64, 4))
    >>> a = fmm_attention(x, x, x, block_size=8, rank=2, coarsening=MeanCoarsening())
    >>> bool(np.array_equal(a, fmm_attention(x, x, x, block_size=8, rank=2, coarsening="mean")))
    True
    """

    name = "mean"
    analysis = True
    differentiable = True
    kernels = {"cpu": "fmm_attention.cpu.coarse:mean_upward", "cuda": "fmm_attention.cuda.fma:mean_upward"}

    def upward_flops(self, tree, d, dv):  # noqa: D102 (the protocol's docstring)
        return float((d + dv) * (tree.n + 2 * sum(lv.n_boxes * lv.rank for lv in tree.levels)))

    def describe(self):  # noqa: D102
        return "coarsening='mean'"


@dataclass(frozen=True)
class ClusterCoarsening(Coarsening):
    """Cluster coarsening (``coarsening="cluster"``): each box's keys grouped by content.

    k-means up the tree, started from the children's groups; each coarse key and value is
    the mean of the tokens of its group (see :mod:`fmm_attention.cpu.cluster`).

    Parameters
    ----------
    iters : int, optional
        Lloyd iterations per level (0 gives mean coarsening); ``cluster_iters=`` of
        :func:`fmm_attention.fmm_attention`.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention import ClusterCoarsening, fmm_attention
    >>> x = np.random.default_rng(0).standard_normal((64, 4))
    >>> a = fmm_attention(x, x, x, block_size=8, rank=2, coarsening=ClusterCoarsening(iters=2))
    >>> b = fmm_attention(x, x, x, block_size=8, rank=2, coarsening="cluster", cluster_iters=2)
    >>> bool(np.array_equal(a, b))
    True
    """

    iters: int = 3

    name = "cluster"
    #: the backward holds each token's group fixed (the spec's rule for discrete choices)
    differentiable = True
    buffer_copies = 2  # the group assignments and centres of the Lloyd steps
    kernels = {"cpu": "fmm_attention.cpu.cluster:upward"}

    def __post_init__(self):
        object.__setattr__(self, "iters", check_count(self.iters, "cluster_iters"))

    def upward_flops(self, tree, d, dv):  # noqa: D102
        return float(sum(3 * d * lv.rank * tree.n * max(self.iters, 1) + (d + dv) * tree.n for lv in tree.levels))

    def describe(self):  # noqa: D102
        return "coarsening='cluster'"


def as_coarsening(coarsening, cluster_iters=3):
    """The :class:`Coarsening` that ``coarsening=`` names.

    Parameters
    ----------
    coarsening : str or Coarsening
        ``"mean"``, ``"cluster"`` or an instance (returned as it is).
    cluster_iters : int, optional
        The iterations of ``"cluster"`` (not checked for instances: they hold their own).

    Returns
    -------
    Coarsening

    Raises
    ------
    ValueError
        Another string or object.
    TypeError
        ``cluster_iters`` not an integer (for ``"cluster"``).
    """
    if isinstance(coarsening, Coarsening):
        return coarsening
    if isinstance(coarsening, str) and coarsening == "mean":
        return MeanCoarsening()
    if isinstance(coarsening, str) and coarsening == "cluster":
        return ClusterCoarsening(cluster_iters)
    raise ValueError(
        f"coarsening must be 'mean', 'cluster' or a LearnedCoarsening (or another Coarsening), got {coarsening!r}"
    )


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


class LearnedCoarsening(Coarsening):
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

    name = "learned"
    differentiable = True
    kernels = {"cpu": "fmm_attention.cpu.coarse:learned_upward", "cuda": "fmm_attention.cuda.fma:learned_upward"}

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

    def upward_flops(self, tree, d, dv):  # noqa: D102 (the protocol's docstring)
        return float(sum(2 * (d + dv) * lv.rank * tree.n for lv in tree.levels))

    def describe(self):  # noqa: D102
        return "coarsening=a LearnedCoarsening"

    def __repr__(self):
        widths = [w.shape[2] for w in self.key_weights]
        return f"LearnedCoarsening(n_levels={self.n_levels}, widths={widths})"
