"""Backend registry: which implementation executes a call, and what each one can do.

A backend is a :class:`Backend` object registered under a name. It *declares* what it
supports (operations, coarsenings, FMA features, dtypes) and answers
:meth:`Backend.not_supported` with the reason it cannot run a request, so a call that asks
for something a backend lacks fails before any work with one error naming the backend and
the option, and the backends that could run it. ``"cpu"`` is always there; ``"cuda"`` is
registered too but imports its kernels (and :mod:`numba.cuda`) only when a call runs on it,
so the CPU library never needs the CUDA packages.

Every backend is called the same way by :mod:`fmm_attention.api`:
``batch = backend.inputs(q, k, v, ...)`` (validated, on the backend's device), then
``backend.exact(batch, causal=...)``, ``backend.fmm(batch, tree, options)`` or
``backend.fastformer(batch, w_q, w_k, causal=...)``, and ``backend.finish(...)`` for the
caller's shapes. A new backend subclasses :class:`Backend`, implements the operations it
declares and calls :func:`register_backend`.
"""

from __future__ import annotations

import numpy as np

from ._validate import KERNEL_DTYPES

__all__ = [
    "Backend",
    "BackendNotSupportedError",
    "available_backends",
    "get",
    "get_backend",
    "on_cuda_device",
    "register_backend",
    "resolve",
    "select",
    "unregister_backend",
]

#: The operations a backend may declare in :attr:`Backend.supports`.
OPERATIONS = ("exact", "fmm", "fastformer", "backward", "decode")
#: The FMA features a backend may declare in :attr:`Backend.fmm_features`.
FMM_FEATURES = ("refine", "global_tokens", "query_coarsening", "return_stats")
#: The shape and mask features a backend may declare in :attr:`Backend.shape_features`
#: (``shared/spec/shapes-and-decoding.md``), with the phrase an error names them by.
SHAPE_FEATURES = {
    "broadcast": "broadcast leading dims",
    "grouped_heads": "grouped heads (Hq = g * Hk)",
    "cross_lengths": "n_q != n_k or query_offset",
    "attn_mask": "attn_mask",
    "attn_bias": "attn_bias",
    "window": "window",
    "per_sequence_global_tokens": "per-sequence global_tokens",
}


class BackendNotSupportedError(ValueError):
    """A backend was asked for an operation or option it does not declare.

    A ``ValueError`` (the option's value is what is wrong for that backend), so code that
    catches bad options keeps catching it.
    """


def on_cuda_device(*arrays):
    """True if any array lives on a CUDA device.

    Arrays exposing ``__cuda_array_interface__`` (Numba, CuPy, PyTorch CUDA tensors) and
    Numba's simulated device arrays (``__cuda_ndarray__``, under ``NUMBA_ENABLE_CUDASIM``).

    Parameters
    ----------
    *arrays : object
        Any objects; ``None`` and host arrays count as not on the device.

    Returns
    -------
    bool
    """
    return any(hasattr(a, "__cuda_array_interface__") or getattr(a, "__cuda_ndarray__", False) for a in arrays)


class Backend:
    """Base class of a backend: declared capabilities and the host-side defaults.

    Subclasses set the class attributes and implement the operations they declare. The
    defaults validate host arrays (:meth:`inputs`, :meth:`vector`), check the estimated
    host memory (:meth:`check_memory`) and restore the caller's shapes (:meth:`finish`,
    :meth:`finish_pools`), which is all a NumPy-array backend needs.

    Attributes
    ----------
    name : str
        The value of ``backend=`` that selects it.
    title : str
        A short description used in error messages.
    supports : frozenset of str
        Operations: ``"exact"``, ``"fmm"``, ``"fastformer"``, ``"backward"``, ``"decode"``.
    coarsenings : frozenset of str
        Names of the coarsenings it implements itself (``"mean"``, ``"cluster"``,
        ``"learned"``, ...). It also runs every coarsening that declares a kernel for its
        name (:attr:`fmm_attention.coarsening.Coarsening.kernels`), which is how the CPU and
        CUDA backends run theirs: a new coarsening declares the backends it runs on.
    fmm_features : frozenset of str
        ``"refine"`` (``refine > 0``), ``"global_tokens"``, ``"query_coarsening"``,
        ``"return_stats"``.
    shape_features : frozenset of str
        The keys of :data:`SHAPE_FEATURES` it runs: broadcasting, grouped heads, queries
        and keys of different lengths, pairwise masks and biases, windows.
    dtypes : tuple of numpy.dtype
        The dtypes it computes in.
    fused_finite_checks : frozenset of str
        Operations whose kernels check ``q``, ``k``, ``v`` for NaN and infinity as they read
        them: for these the public function validates the inputs with
        ``check_finite=False`` and passes ``check_finite=True`` to the operation instead,
        which then raises the same ``ValueError`` (so no separate pass reads the inputs).
        Only ``"fastformer"`` may be listed. Empty by default.
    """

    name = ""
    title = ""
    supports = frozenset()
    coarsenings = frozenset({"mean"})
    fmm_features = frozenset()
    shape_features = frozenset()
    dtypes = KERNEL_DTYPES
    fused_finite_checks = frozenset()

    # ------------------------------------------------------------ capabilities
    def not_supported(self, op, options=None, *, return_stats=False, features=frozenset()):
        """Why this backend cannot run ``op`` with ``options``, or ``None`` if it can.

        Parameters
        ----------
        op : str
            One of ``"exact"``, ``"fmm"``, ``"fastformer"``, ``"backward"``, ``"decode"``.
        options : FMMOptions, optional
            The FMA options (for ``"fmm"`` and ``"backward"`` of FMA).
        return_stats : bool, optional
            Whether the call asks for :class:`~fmm_attention.FMMStats`.
        features : frozenset of str, optional
            The shape features the call uses (keys of :data:`SHAPE_FEATURES`).

        Returns
        -------
        str or None
            A phrase naming the option, e.g. ``"refine > 0"``.
        """
        if op not in self.supports:
            return {"backward": "gradients (backward)", "decode": "decoding"}.get(op, f"{op} attention")
        for feature in sorted(features):
            if feature not in self.shape_features:
                return SHAPE_FEATURES.get(feature, feature)
        if options is None:
            return None
        coarsening = options.coarsening
        if not (coarsening.runs_on(self.name) or coarsening.name in self.coarsenings):
            return coarsening.describe()
        wanted = {
            "refine": (options.refine > 0, "refine > 0"),
            "global_tokens": (bool(options.global_tokens), "global_tokens"),
            "query_coarsening": (options.query_coarsening, "query_coarsening=True"),
            "return_stats": (return_stats, "return_stats=True"),
        }
        for feature, (asked, phrase) in wanted.items():
            if asked and feature not in self.fmm_features:
                return phrase
        return None

    def owns(self, *arrays):
        """Whether ``backend="auto"`` should pick this backend for these inputs.

        Parameters
        ----------
        *arrays : object
            The call's array inputs.

        Returns
        -------
        bool
            ``False`` by default: ``"auto"`` falls back to ``"cpu"``.
        """
        return False

    def require(self):
        """Raise ``RuntimeError`` when the backend cannot run on this machine (default: it can)."""

    # ------------------------------------------------------------ host defaults
    def inputs(self, q, k, v, *, scale, key_padding_mask, check_finite, skip_masked=False, **layout):
        """Validate ``q``, ``k``, ``v`` and the mask into a batch this backend's operations take.

        Parameters
        ----------
        q, k, v, scale, key_padding_mask, check_finite
            As for the public functions.
        skip_masked : bool, optional
            Do not check masked positions for finiteness (exact and FMA: they get zero weight).
        **layout
            ``causal``, ``query_offset``, ``positions``, ``same_length`` of
            :func:`fmm_attention._shapes.resolve`.

        Returns
        -------
        ShapedBatch
            Contiguous ``(B, n, .)`` arrays in the computation dtype, each at its own batch
            size (broadcasting and grouped heads copy nothing).
        """
        from ._shapes import attention_inputs

        return attention_inputs(q, k, v, scale=scale, key_padding_mask=key_padding_mask, check_finite=check_finite,
                                skip_masked=skip_masked, **layout)

    def vector(self, w, name, batch, check_finite):
        """Validate a Fastformer vector ``(..., d)`` into ``(B, d)`` for ``batch``.

        Parameters
        ----------
        w : array_like
        name : str
        batch : Batch
        check_finite : bool

        Returns
        -------
        ndarray
        """
        from ._validate import attention_vector

        return attention_vector(w, name, batch, check_finite)

    def check_memory(self, parts, culprits):
        """Refuse a call whose estimated memory exceeds the limit (host memory by default).

        Parameters
        ----------
        parts : dict
            Bytes by buffer.
        culprits : dict
            The argument to name for each buffer, ``{part: (name, value)}``.
        """
        from .tree import check_memory

        check_memory(parts, culprits)

    def finish(self, batch, out, lse, return_lse):
        """The caller's shapes: ``out`` or ``(out, lse)``.

        Parameters
        ----------
        batch : Batch
        out, lse : ndarray
            ``(B, n, dv)`` and ``(B, n)``.
        return_lse : bool

        Returns
        -------
        ndarray or tuple
        """
        out = batch.restore(out)
        if return_lse:
            return out, batch.restore(lse, last_dim=False)
        return out

    def finish_pools(self, batch, out, qg, kg, *, causal, return_pools):
        """The caller's shapes for Fastformer: ``u`` or ``(u, qg, kg)``.

        Parameters
        ----------
        batch : Batch
        out, qg, kg : ndarray
            ``(B, n, d)``; the pools ``(B, d)``, or ``(B, n, d)`` when causal.
        causal, return_pools : bool

        Returns
        -------
        ndarray or tuple
        """
        out = batch.restore(out)
        if not return_pools:
            return out
        if causal:
            return out, batch.restore(qg), batch.restore(kg)
        return out, qg.reshape(batch.lead_shape + (batch.d,)), kg.reshape(batch.lead_shape + (batch.d,))

    # ------------------------------------------------------------ operations
    def exact(self, batch, *, causal):
        """Exact attention of a batch: ``(out, lse)`` of shapes ``(B, n, dv)``, ``(B, n)``.

        Parameters
        ----------
        batch : Batch
        causal : bool
        """
        raise NotImplementedError

    def fmm(self, batch, tree, options):
        """FMA of a batch along ``tree``: ``(out, lse, plan)``; ``plan`` feeds statistics (or ``None``).

        Parameters
        ----------
        batch : Batch
        tree : Tree
        options : FMMOptions
        """
        raise NotImplementedError

    def fastformer(self, batch, w_q, w_k, *, causal, return_pools):
        """Fastformer of a batch: ``(out, qg, kg)`` (pools may be ``None`` without ``return_pools``).

        Parameters
        ----------
        batch : Batch
        w_q, w_k : ndarray, shape (B, d)
        causal, return_pools : bool
        """
        raise NotImplementedError

    def __repr__(self):  # noqa: D105
        return f"<{type(self).__name__} {self.name!r}>"


class CPUBackend(Backend):
    """Numba ``@njit`` kernels on host arrays: every operation and option."""

    name = "cpu"
    title = "Numba CPU kernels"
    supports = frozenset({"exact", "fmm", "fastformer", "backward", "decode"})
    fused_finite_checks = frozenset({"fastformer"})
    coarsenings = frozenset()  # every coarsening with a "cpu" kernel (Coarsening.kernels)
    fmm_features = frozenset(FMM_FEATURES)
    shape_features = frozenset(SHAPE_FEATURES)

    @staticmethod
    def _kernels():
        from . import cpu

        return cpu

    def exact(self, batch, *, causal, **pairwise):
        """Exact attention with the CPU kernels (see :meth:`Backend.exact`).

        Parameters
        ----------
        batch : Batch
        causal : bool
        **pairwise
            ``attn_mask``, ``attn_bias`` (:class:`~fmm_attention._shapes.PairTerm`) and
            ``window`` (``(left, right)``).
        """
        return self._kernels().exact_batch(batch, causal=causal, **pairwise)

    def fmm(self, batch, tree, options, entry_globals=None):
        """FMA with the CPU kernels (see :meth:`Backend.fmm`).

        Parameters
        ----------
        batch : Batch
        tree : Tree
        options : FMMOptions
        entry_globals : list of tuple, optional
            Per-sequence global tokens, one tuple per output entry.
        """
        return self._kernels().fmm(batch, tree, options, entry_globals=entry_globals)

    def fastformer(self, batch, w_q, w_k, *, causal, return_pools, check_finite=False):
        """Fastformer with the CPU kernels (see :meth:`Backend.fastformer`).

        Parameters
        ----------
        batch : Batch
        w_q, w_k : ndarray
        causal, return_pools : bool
        check_finite : bool, optional
            Check ``q``, ``k``, ``v`` inside the kernels' passes (this backend lists
            ``"fastformer"`` in :attr:`fused_finite_checks`).
        """
        return self._kernels().fastformer_batch(batch, w_q, w_k, causal=causal, return_pools=return_pools,
                                                check_finite=check_finite)


class CUDABackend(Backend):
    """``@cuda.jit`` kernels on device (or copied host) arrays; imported on first use.

    Host inputs are validated, copied in and the results copied back; device inputs stay
    on the device and give Numba device arrays (see :mod:`fmm_attention.cuda`).
    """

    name = "cuda"
    title = "CUDA kernels"
    supports = frozenset({"exact", "fmm", "fastformer"})
    coarsenings = frozenset()  # every coarsening with a "cuda" kernel (mean, learned)
    fmm_features = frozenset({"query_coarsening"})

    @staticmethod
    def _device():
        from .cuda import _device

        return _device

    def owns(self, *arrays):
        """Inputs on a CUDA device run here with ``backend="auto"``.

        Parameters
        ----------
        *arrays : object
        """
        return on_cuda_device(*arrays)

    def require(self):
        """Raise ``RuntimeError`` without numba-cuda or a usable GPU (the simulator passes)."""
        self._device().require()

    def inputs(self, q, k, v, *, scale, key_padding_mask, check_finite, skip_masked=False, **layout):
        """Validate and place the inputs on the device (host arrays are copied in).

        Parameters
        ----------
        q, k, v, scale, key_padding_mask, check_finite, skip_masked
            As for :meth:`Backend.inputs` (``skip_masked`` is ignored: device inputs are
            checked at every position, as before).
        **layout
            Ignored: the device batch has one shape for ``q``, ``k``, ``v``, and the
            registry refuses every shape feature first (:attr:`shape_features` is empty).
        """
        from .cuda._inputs import inputs

        return inputs(q, k, v, scale=scale, key_padding_mask=key_padding_mask, check_finite=check_finite)

    def vector(self, w, name, batch, check_finite):
        """A Fastformer vector on the device, cast to the batch dtype.

        Parameters
        ----------
        w : array_like or device array
        name : str
        batch : DeviceBatch
        check_finite : bool
        """
        from ._validate import check_bool
        from .cuda.fastformer import attention_vector

        return attention_vector(w, name, batch, check_bool(check_finite, "check_finite"))

    def check_memory(self, parts, culprits):
        """Device memory is not estimated yet: the driver reports an allocation failure.

        Parameters
        ----------
        parts, culprits : dict
        """

    def finish(self, batch, out, lse, return_lse):
        """Caller shapes; host inputs get NumPy arrays back, device inputs device arrays.

        Parameters
        ----------
        batch : DeviceBatch
        out, lse : device array
        return_lse : bool
        """
        return batch.finish(out, lse, return_lse)

    def finish_pools(self, batch, out, qg, kg, *, causal, return_pools):
        """Caller shapes for Fastformer, copied to the host for host inputs.

        Parameters
        ----------
        batch : DeviceBatch
        out, qg, kg : device array
        causal, return_pools : bool
        """
        n, d, lead = batch.n, batch.d, batch.lead_shape
        results = [out.reshape(lead + (n, d))]
        if return_pools:
            tail = (n, d) if causal else (d,)
            results += [qg.reshape(lead + tail), kg.reshape(lead + tail)]
        if not batch.on_device:
            results = [r.copy_to_host() for r in results]
        return tuple(results) if return_pools else results[0]

    def exact(self, batch, *, causal):
        """Exact attention with the CUDA kernels.

        Parameters
        ----------
        batch : DeviceBatch
        causal : bool
        """
        from .cuda.exact import exact

        return exact(batch, causal=causal)

    def fmm(self, batch, tree, options):
        """FMA with the CUDA kernels (no plan for statistics: ``None``).

        Parameters
        ----------
        batch : DeviceBatch
        tree : Tree
        options : FMMOptions
        """
        device = self._device()
        if batch.batch == 0:
            return device.empty((0, batch.n, batch.dv), batch.dtype), device.empty((0, batch.n), batch.dtype), None
        from .cuda.fma import fmm

        out, lse = fmm(batch, tree, options)
        return out, lse, None

    def fastformer(self, batch, w_q, w_k, *, causal, return_pools):
        """Fastformer with the CUDA kernels.

        Parameters
        ----------
        batch : DeviceBatch
        w_q, w_k : device array
        causal, return_pools : bool
        """
        B, n, d = batch.batch, batch.n, batch.d
        if B == 0:
            device = self._device()
            pool_shape = (B, n, d) if causal else (B, d)
            return (device.empty((B, n, d), batch.dtype), device.empty(pool_shape, batch.dtype),
                    device.empty(pool_shape, batch.dtype))
        from .cuda.fastformer import fastformer

        return fastformer(batch, w_q, w_k, causal=causal)


_REGISTRY = {}


def register_backend(backend, *, replace=False):
    """Make ``backend`` selectable as ``backend=backend.name`` in every public function.

    Parameters
    ----------
    backend : Backend
        An instance; its :attr:`~Backend.name` must not be ``"auto"``.
    replace : bool, optional
        Allow replacing a backend already registered under that name.

    Returns
    -------
    Backend
        ``backend``, so that the call can decorate an instance expression.

    Raises
    ------
    TypeError
        Not a :class:`Backend`.
    ValueError
        A reserved, empty or already registered name.
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a Backend instance, got {type(backend).__name__}")
    name = backend.name
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a backend needs a name other than 'auto', got {name!r}")
    unknown = set(backend.supports) - set(OPERATIONS)
    if unknown:
        raise ValueError(f"backend {name!r} declares unknown operations {sorted(unknown)}; known: {OPERATIONS}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a backend named {name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[name] = backend
    return backend


def unregister_backend(name):
    """Remove the backend registered under ``name`` (``"cpu"`` cannot be removed).

    Parameters
    ----------
    name : str

    Raises
    ------
    ValueError
        ``"cpu"`` or an unknown name.
    """
    if name == "cpu":
        raise ValueError("the 'cpu' backend cannot be unregistered")
    if name not in _REGISTRY:
        raise ValueError(f"no backend named {name!r} is registered")
    del _REGISTRY[name]


def available_backends():
    """The values ``backend=`` accepts: ``"auto"`` and every registered name.

    Returns
    -------
    tuple of str
    """
    return ("auto", *_REGISTRY)


def get_backend(name):
    """The registered backend object called ``name`` (nothing is imported or checked).

    Parameters
    ----------
    name : str

    Returns
    -------
    Backend

    Raises
    ------
    ValueError
        An unknown name.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend must be one of {', '.join(map(repr, available_backends()))}; got {name!r}")
    return _REGISTRY[name]


def resolve(backend, *arrays):
    """Name of the backend that runs a call.

    ``"auto"`` picks the first registered backend that :meth:`~Backend.owns` the inputs
    (CUDA for device arrays), else ``"cpu"``.

    Parameters
    ----------
    backend : str
        The ``backend`` argument of a call.
    *arrays : object
        The call's array inputs.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        An unknown ``backend``.
    """
    if backend == "auto":
        for name, candidate in _REGISTRY.items():
            if name != "cpu" and candidate.owns(*arrays):
                return name
        return "cpu"
    return get_backend(backend).name


def select(backend, arrays, op, options=None, *, return_stats=False, features=frozenset()):
    """The backend object that runs ``op``, checked against what it declares.

    Parameters
    ----------
    backend : str
        ``"auto"`` or a registered name.
    arrays : sequence
        The call's array inputs (for ``"auto"``).
    op : str
        The operation (see :attr:`Backend.supports`).
    options : FMMOptions, optional
        FMA options to check.
    return_stats : bool, optional
        Whether statistics are asked for.
    features : frozenset of str, optional
        The shape features of the call (:data:`SHAPE_FEATURES`).

    Returns
    -------
    Backend
        Ready to run (:meth:`Backend.require` passed).

    Raises
    ------
    BackendNotSupportedError
        (a ``ValueError``) naming the backend, the option and the backends that support it.
    ValueError
        An unknown ``backend``.
    RuntimeError
        The backend cannot run on this machine (e.g. CUDA without a GPU).
    """
    chosen = get_backend(resolve(backend, *arrays))
    reason = chosen.not_supported(op, options, return_stats=return_stats, features=features)
    if reason is not None:
        others = [name for name, b in _REGISTRY.items()
                  if b is not chosen and b.not_supported(op, options, return_stats=return_stats, features=features)
                  is None]
        hint = f"; use backend={others[0]!r}" if others else ""
        if others and chosen.owns(*arrays):
            hint += " with host arrays"
        raise BackendNotSupportedError(
            f"backend {chosen.name!r} ({chosen.title}) does not support {reason}{hint}"
        )
    chosen.require()
    return chosen


def check_dtype(backend, dtype):
    """Raise if ``backend`` does not compute in ``dtype`` (after validation chose it)."""
    if np.dtype(dtype) not in tuple(np.dtype(t) for t in backend.dtypes):
        raise BackendNotSupportedError(
            f"backend {backend.name!r} ({backend.title}) does not support dtype {np.dtype(dtype)}; it computes in "
            + ", ".join(str(np.dtype(t)) for t in backend.dtypes)
        )


def get(name):
    """The backend object for ``name``, checked to run on this machine.

    Parameters
    ----------
    name : str

    Returns
    -------
    Backend

    Raises
    ------
    RuntimeError
        ``"cuda"`` without a usable GPU or without the ``[cuda]`` extra.
    """
    chosen = get_backend(name)
    chosen.require()
    return chosen


register_backend(CPUBackend())
register_backend(CUDABackend())
