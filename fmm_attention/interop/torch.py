r"""PyTorch adapter (extra ``[torch]``): differentiable attention on CPU tensors.

The three functions have the names and keywords of the NumPy API and take and return
``torch.Tensor``\\ s; ``torch.autograd.Function``\\ s underneath call
:mod:`fmm_attention.grad`'s VJPs, so ``loss.backward()`` runs the library's backward
kernels. CPU tensors are read without a copy (``tensor.numpy()`` shares their memory) and
results are wrapped without one. :class:`FMMAttention` is an ``nn.Module`` holding a
learned coarsening's weights as ``nn.Parameter``\\ s in the ``torch.nn.Conv1d`` layout of the
paper's code (``(r_l*d, 1, w_l)`` per level), so they train like any other parameter and
load from / save to a Conv1d state dict unchanged.

Only CPU float32/float64 tensors are supported: CUDA tensors raise ``ValueError`` (the
CUDA backend has no backward yet).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _config
from .. import grad as _grad
from ..coarsening import LearnedCoarsening
from ..tree import build_tree

__all__ = ["FMMAttention", "exact_attention", "fastformer_attention", "fmm_attention"]


def _array(t, name):
    """A CPU float tensor as a NumPy array sharing its memory (``None`` passes through)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(
            f"{name} is on {t.device}: fmm_attention.interop.torch supports CPU tensors only "
            "(the CUDA backend has no backward yet)"
        )
    if t.dtype not in (torch.float32, torch.float64, torch.bool):
        raise TypeError(f"{name} must be float32 or float64 (or bool for masks), got {t.dtype}")
    return t.detach().numpy()


def _tensor(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def _cotangent(g, like):
    return np.zeros(like.shape, like.dtype) if g is None else g.detach().numpy()


class _Exact(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, options):
        (out, lse), pullback = _grad.exact_attention_vjp(
            _array(q, "q"), _array(k, "k"), _array(v, "v"), key_padding_mask=mask, return_lse=True, **options
        )
        ctx.pullback = pullback
        ctx.shapes = (out, lse)
        return _tensor(out), _tensor(lse)

    @staticmethod
    def backward(ctx, g_out, g_lse):
        out, lse = ctx.shapes
        grads = ctx.pullback(_cotangent(g_out, out), _cotangent(g_lse, lse))
        return _tensor(grads.q), _tensor(grads.k), _tensor(grads.v), None, None


class _FMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, options, n_levels, *params):
        options = dict(options)
        if n_levels:
            arrays = [_array(p, "coarsening parameter") for p in params]
            groups = [arrays[i * n_levels : (i + 1) * n_levels] for i in range(4)]
            options["coarsening"] = LearnedCoarsening(*groups)
        (out, lse), pullback = _grad.fmm_attention_vjp(
            _array(q, "q"), _array(k, "k"), _array(v, "v"), key_padding_mask=mask, return_lse=True, **options
        )
        ctx.pullback = pullback
        ctx.shapes = (out, lse)
        ctx.param_dtypes = [p.dtype for p in params]
        return _tensor(out), _tensor(lse)

    @staticmethod
    def backward(ctx, g_out, g_lse):
        out, lse = ctx.shapes
        grads = ctx.pullback(_cotangent(g_out, out), _cotangent(g_lse, lse))
        extra = []
        if grads.coarsening is not None:
            flat = [a for group in grads.coarsening for a in group]
            extra = [_tensor(a).to(dt) for a, dt in zip(flat, ctx.param_dtypes)]
        return (_tensor(grads.q), _tensor(grads.k), _tensor(grads.v), None, None, None, *extra)


class _Fastformer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w_q, w_k, mask, options):
        u, pullback = _grad.fastformer_attention_vjp(
            _array(q, "q"), _array(k, "k"), _array(v, "v"), _array(w_q, "w_q"), _array(w_k, "w_k"),
            key_padding_mask=mask, **options,
        )
        ctx.pullback = pullback
        ctx.like = u
        ctx.w_dtypes = (w_q.dtype, w_k.dtype)
        return _tensor(u)

    @staticmethod
    def backward(ctx, g_out):
        grads = ctx.pullback(_cotangent(g_out, ctx.like))
        return (_tensor(grads.q), _tensor(grads.k), _tensor(grads.v), _tensor(grads.w_q).to(ctx.w_dtypes[0]),
                _tensor(grads.w_k).to(ctx.w_dtypes[1]), None, None)


def _mask(key_padding_mask):
    return None if key_padding_mask is None else np.array(_array(key_padding_mask, "key_padding_mask"))


def exact_attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None, attn_mask=None, attn_bias=None,
                    window=None, query_offset=None, return_lse=False, check_finite=True):
    """Differentiable :func:`fmm_attention.exact_attention` on CPU tensors.

    Same keywords, shapes and results as the NumPy function (broadcast leading dims,
    grouped heads, ``n_q != n_k`` with ``query_offset``; ``backend`` is always the CPU), as
    tensors that ``backward()`` reaches through the library's backward kernels; the
    gradients of ``q``, ``k``, ``v`` have their own shapes. ``attn_mask``, ``attn_bias`` and
    ``window`` have no backward yet (``NotImplementedError``).
    """
    _grad._refuse_pairwise("exact_attention", attn_mask=attn_mask, attn_bias=attn_bias, window=window)
    options = dict(causal=causal, scale=scale, check_finite=check_finite, query_offset=query_offset)
    out, lse = _Exact.apply(q, k, v, _mask(key_padding_mask), options)
    return (out, lse) if return_lse else out


def fmm_attention(q, k, v, *, causal=False, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
                  coarsening="mean", count_scaling=True, query_coarsening=False, scale=None, key_padding_mask=None,
                  return_lse=False, check_finite=True, cluster_iters=3, refine=0, global_tokens=None,
                  query_offset=None):
    """Differentiable :func:`fmm_attention.fmm_attention` on CPU tensors.

    Same keywords, shapes and results as the NumPy function (broadcast leading dims,
    grouped heads, ``n_q != n_k`` with ``query_offset``; ``backend`` is always the CPU; no
    ``return_stats``); the gradients of ``q``, ``k``, ``v`` have their own shapes.
    ``coarsening`` is ``"mean"``, a :class:`fmm_attention.LearnedCoarsening` (its weights
    are constants here) or an :class:`FMMAttention` module's parameters through
    :meth:`FMMAttention.forward` (trainable). ``refine``'s plan and
    ``coarsening="cluster"``'s group assignments are held fixed in the backward.
    """
    options = dict(causal=causal, block_size=block_size, rank=rank, coarsening=coarsening,
                   count_scaling=count_scaling, query_coarsening=query_coarsening, scale=scale,
                   check_finite=check_finite, cluster_iters=cluster_iters, refine=refine,
                   global_tokens=global_tokens, query_offset=query_offset)
    out, lse = _FMM.apply(q, k, v, _mask(key_padding_mask), options, 0)
    return (out, lse) if return_lse else out


def fastformer_attention(q, k, v, w_q, w_k, *, causal=False, scale=None, key_padding_mask=None, check_finite=True):
    """Differentiable :func:`fmm_attention.fastformer_attention` on CPU tensors (no
    ``return_pools``); the leading dims of ``q`` and ``k``, ``v`` broadcast (grouped heads
    included) and ``w_q``, ``w_k`` broadcast against them as there; every gradient has its
    input's shape.
    """
    options = dict(causal=causal, scale=scale, check_finite=check_finite)
    return _Fastformer.apply(q, k, v, w_q, w_k, _mask(key_padding_mask), options)


class FMMAttention(torch.nn.Module):
    r"""FMA with a trainable learned coarsening (the paper's grouped convolutions).

    One ``torch.nn.Conv1d(d, r_l*d, kernel_size=w_l, stride=w_l, groups=d)`` weight and bias
    per far level for keys (and likewise for values, ``dv`` channels), held as
    ``nn.Parameter``\\ s in that layout: ``key_weights[l]`` of shape ``(r_l*d, 1, w_l)``,
    ``key_bias[l]`` of shape ``(r_l*d,)``. They start as sub-box means (the training-free
    ``"mean"`` coarsening when no key is masked).

    Parameters
    ----------
    seq_len : int
        Sequence length ``n`` the weights are built for (it fixes the tree).
    d, dv : int
        Feature dims of keys and values (``dv = d`` by default).
    block_size, rank : int, optional
        ``m`` and ``p`` of :func:`fmm_attention.fmm_attention`.
    causal, count_scaling, query_coarsening, scale : optional
        Forwarded to every call (``query_coarsening=True``: the O(n) coarse-query variant,
        bidirectional only).
    dtype : torch.dtype, optional
        Of the parameters (float64 by default, as :class:`~fmm_attention.LearnedCoarsening`
        stores them).
    """

    def __init__(self, seq_len, d, dv=None, *, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
                 causal=False, count_scaling=True, query_coarsening=False, scale=None, dtype=torch.float64):
        super().__init__()
        dv = d if dv is None else dv
        tree = build_tree(seq_len, block_size=block_size, rank=rank, causal=causal)
        self.seq_len, self.block_size, self.rank = seq_len, block_size, rank
        self.causal, self.count_scaling, self.scale = causal, count_scaling, scale
        self.query_coarsening = query_coarsening

        def means(channels, level):
            w = np.zeros((level.rank * channels, 1, level.box_size))
            for t in range(level.rank):
                sub = level.sub_box_size
                w[t :: level.rank, 0, t * sub : (t + 1) * sub] = 1.0 / sub
            return torch.nn.Parameter(torch.tensor(w, dtype=dtype))

        def zeros(channels, level):
            return torch.nn.Parameter(torch.zeros(level.rank * channels, dtype=dtype))

        self.key_weights = torch.nn.ParameterList([means(d, lv) for lv in tree.levels])
        self.value_weights = torch.nn.ParameterList([means(dv, lv) for lv in tree.levels])
        self.key_bias = torch.nn.ParameterList([zeros(d, lv) for lv in tree.levels])
        self.value_bias = torch.nn.ParameterList([zeros(dv, lv) for lv in tree.levels])

    def forward(self, q, k, v, *, key_padding_mask=None, return_lse=False, query_offset=None):
        """FMA of ``q``, ``k``, ``v`` with the module's coarsening; differentiable in the
        inputs and every parameter. ``k``, ``v`` are ``(..., seq_len, .)`` CPU tensors; ``q``
        takes the shapes of :func:`fmm_attention` (grouped heads, broadcast leading dims,
        fewer queries placed at ``query_offset``).
        """
        options = dict(causal=self.causal, block_size=self.block_size, rank=self.rank,
                       count_scaling=self.count_scaling, query_coarsening=self.query_coarsening, scale=self.scale,
                       query_offset=query_offset)
        params = [*self.key_weights, *self.value_weights, *self.key_bias, *self.value_bias]
        out, lse = _FMM.apply(q, k, v, _mask(key_padding_mask), options, len(self.key_weights), *params)
        return (out, lse) if return_lse else out

    def coarsening(self):
        """The current parameters as a (constant) :class:`~fmm_attention.LearnedCoarsening`."""
        groups = [[p.detach().numpy() for p in group] for group in
                  (self.key_weights, self.value_weights, self.key_bias, self.value_bias)]
        return LearnedCoarsening(*groups)
