"""The far-field rank study: FMA's far blocks against their best (Eckart-Young) approximation of the same rank."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .. import _config
from .implied import _logits, _setup, _softmax
from .metrics import _jsonable


@dataclass(frozen=True, eq=False)
class LevelRankStudy:
    """Far-field blocks of one level: their spectra and FMA's error against the optimum.

    Block ``t`` is the ``w x w`` submatrix (``w`` the level's box size) of the exact
    attention matrix ``P`` with rows = the queries of level box ``blocks[t, 0]`` and
    columns = the keys of level box ``blocks[t, 1]``, one of the far boxes in its
    interaction list at this level; positions beyond ``n`` are zero rows/columns. These
    blocks tile exactly the pairs the level serves. FMA's implied block (same rows and
    columns of ``P~``) is constant on each of the ``rank`` sub-boxes of its columns, so its
    rank is at most ``rank``, and by Eckart-Young its error is at least ``best_error``.

    Attributes
    ----------
    level : int
        Far level ``l`` (1 = finest).
    box_size : int
        ``w_l``.
    rank : int
        ``r_l``, the coarse keys per box FMA uses at this level.
    blocks : ndarray of int64, shape (n_blocks, 2)
        ``(query box, far box)`` of each block.
    singular_values : ndarray, shape (..., n_blocks, box_size)
        Singular values of each exact block, descending (``scipy.linalg.svdvals``).
    block_norm : ndarray, shape (..., n_blocks)
        Frobenius norm of each exact block.
    best_error, best_spectral_error : ndarray, shape (..., n_blocks)
        Eckart-Young: the smallest Frobenius / spectral error of any rank-``rank``
        approximation of the block, ``sqrt(sum_{t >= rank} sigma_t**2)`` and ``sigma_rank``.
    fma_error, fma_spectral_error : ndarray, shape (..., n_blocks)
        Frobenius / spectral norm of FMA's actual error ``P~ - P`` on the block.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention.analysis import far_field_rank_study
    >>> q, k = np.random.default_rng(0).standard_normal((2, 64, 8))
    >>> level = far_field_rank_study(q, k, block_size=4, rank=2).levels[0]
    >>> level.singular_values.shape == (len(level.blocks), level.box_size)
    True
    """

    level: int
    box_size: int
    rank: int
    blocks: np.ndarray
    singular_values: np.ndarray
    block_norm: np.ndarray
    best_error: np.ndarray
    best_spectral_error: np.ndarray
    fma_error: np.ndarray
    fma_spectral_error: np.ndarray

    @property
    def excess(self):
        """``||P~ - P||_F / min_rank ||A - P||_F`` over all blocks of the level, per head (>= 1).

        How far FMA's fixed coarsening is from the best possible rank-``rank``
        approximation of the same blocks; ``nan`` where the optimum is exact.
        """
        fma = np.sqrt((self.fma_error**2).sum(axis=-1))
        best = np.sqrt((self.best_error**2).sum(axis=-1))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(best > 0, fma / np.where(best > 0, best, 1.0), np.nan)

    def to_dict(self):
        """JSON-ready dict of all arrays."""
        return {name: (value.tolist() if isinstance(value, np.ndarray) else value)
                for name, value in self.__dict__.items()} | {"excess": np.asarray(self.excess).tolist()}


@dataclass(frozen=True, eq=False)
class RankStudy:
    """Result of :func:`far_field_rank_study`: one :class:`LevelRankStudy` per far level.

    Attributes
    ----------
    levels : tuple of LevelRankStudy
        Far levels ``1 .. L`` (levels serving no pair of the sequence are left out).
    lead_shape : tuple of int
        Leading dims of the inputs; every per-block array starts with them.
    options : dict
        The FMA options studied.

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention.analysis import far_field_rank_study
    >>> q, k = np.random.default_rng(0).standard_normal((2, 64, 8))
    >>> study = far_field_rank_study(q, k, block_size=4, rank=2)
    >>> [s["level"] for s in study.summary()]
    [1, 2, 3]
    """

    levels: tuple
    lead_shape: tuple
    options: dict

    def summary(self):
        """Per level: box size, rank, number of blocks, FMA and optimal errors over all blocks
        and heads (Frobenius), and their ratio ``excess``."""
        out = []
        for lv in self.levels:
            fma = float(np.sqrt((lv.fma_error**2).sum()))
            best = float(np.sqrt((lv.best_error**2).sum()))
            out.append({"level": lv.level, "box_size": lv.box_size, "rank": lv.rank,
                        "n_blocks": len(lv.blocks), "fma_error": fma, "best_error": best,
                        "excess": fma / best if best > 0 else float("nan")})
        return out

    def to_dict(self):
        """JSON-ready dict: options, summary and every level's arrays."""
        return {"options": _jsonable(self.options), "lead_shape": list(self.lead_shape), "summary": self.summary(),
                "levels": [lv.to_dict() for lv in self.levels]}


def far_field_rank_study(q, k, *, causal=False, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
                         coarsening="mean", count_scaling=True, query_coarsening=False, scale=None,
                         key_padding_mask=None, check_finite=True):
    """Spectra of the exact far-field attention blocks, and FMA's error beside the optimum.

    At far level ``l`` (box size ``w``), for every query box ``b`` and every far box ``c``
    in its interaction list, the block ``A = P[b*w:(b+1)*w, c*w:(c+1)*w]`` of the exact
    attention matrix is the part of the attention that FMA approximates with ``r_l``
    coarse keys. FMA's implied block ``A~`` (same rows and columns of the matrix of
    :func:`attention_matrix`) has rank at most ``r_l``, so by Eckart-Young
    ``||A~ - A|| >= min_{rank B <= r_l} ||B - A||``, in the Frobenius and spectral norms.
    The study reports both sides, per block.

    Parameters
    ----------
    q, k : array_like, shape (..., n, d)
        Queries and keys.
    causal, block_size, rank, coarsening, count_scaling, query_coarsening, scale, key_padding_mask, check_finite
        FMA's options, as in :func:`fmm_attention.fmm_attention` (``coarsening="mean"``).

    Returns
    -------
    RankStudy

    Raises
    ------
    ValueError
        As :func:`attention_matrix`.

    See Also
    --------
    compare, attention_matrix

    Examples
    --------
    >>> import numpy as np
    >>> from fmm_attention.analysis import far_field_rank_study
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 128, 16))
    >>> study = far_field_rank_study(q, k, block_size=8, rank=2)
    >>> level = study.levels[0]
    >>> level.box_size, level.rank, level.singular_values.shape[-1]
    (8, 2, 8)
    >>> bool(np.all(level.fma_error >= level.best_error))
    True
    """
    setup = _setup("far_field_rank_study", q, k, None, causal=causal, block_size=block_size, rank=rank,
                   coarsening=coarsening, count_scaling=count_scaling, query_coarsening=query_coarsening,
                   scale=scale, key_padding_mask=key_padding_mask, check_finite=check_finite)
    tree, n, B = setup.tree, setup.q.shape[1], setup.n_heads
    N = tree.padded_length
    pairs = []
    for level in tree.levels:
        w = level.box_size
        blocks = [(b, c) for b in range(level.n_boxes) for c in level.interactions[b]
                  if c >= 0 and b * w < n and c * w < n]
        pairs.append(np.array(blocks, dtype=np.int64).reshape(-1, 2))
    results = [{name: np.zeros((B, len(blocks)) + ((level.box_size,) if name == "sv" else ()))
                for name in ("sv", "norm", "best", "best2", "fma", "fma2")}
               for level, blocks in zip(tree.levels, pairs)]
    for b in range(B):
        exact, implied = _logits(setup, b)
        p = np.zeros((N, N))
        pt = np.zeros((N, N))
        p[:n, :n] = _softmax(exact)
        pt[:n, :n] = _softmax(implied)
        for level, blocks, res in zip(tree.levels, pairs, results):
            w, r = level.box_size, level.rank
            for t, (qb, kb) in enumerate(blocks):
                rows, cols = slice(qb * w, (qb + 1) * w), slice(kb * w, (kb + 1) * w)
                sv = scipy.linalg.svdvals(p[rows, cols], check_finite=False)
                err = pt[rows, cols] - p[rows, cols]
                res["sv"][b, t] = sv
                res["norm"][b, t] = np.sqrt(np.sum(sv**2))
                res["best"][b, t] = np.sqrt(np.sum(sv[r:] ** 2))
                res["best2"][b, t] = sv[r] if r < sv.size else 0.0
                res["fma"][b, t] = np.linalg.norm(err)
                res["fma2"][b, t] = scipy.linalg.svdvals(err, check_finite=False)[0]
    studies = []
    for level, blocks, res in zip(tree.levels, pairs, results):
        if not len(blocks):
            continue
        shape = setup.lead_shape + (len(blocks),)
        studies.append(LevelRankStudy(
            level=level.index, box_size=level.box_size, rank=level.rank, blocks=blocks,
            singular_values=res["sv"].reshape(shape + (level.box_size,)), block_norm=res["norm"].reshape(shape),
            best_error=res["best"].reshape(shape), best_spectral_error=res["best2"].reshape(shape),
            fma_error=res["fma"].reshape(shape), fma_spectral_error=res["fma2"].reshape(shape),
        ))
    return RankStudy(tuple(studies), setup.lead_shape, dict(setup.options))
