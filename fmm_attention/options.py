"""FMMOptions: every option of one FMA call, validated once, hashable, passed whole.

:func:`fmm_attention.fmm_attention` builds one from its keywords and hands it to the
backend; backends, statistics and plans read their options from it instead of from a
row of loose arguments. What a call *returns* (``return_lse``, ``return_stats``) is not an
option of the computation and stays out: it changes what is handed back, not what is
computed (a backend that cannot produce statistics says so through ``return_stats`` of
:meth:`fmm_attention.backends.Backend.not_supported`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import _config
from ._validate import (
    check_accuracy_options,
    check_bool,
    check_fmm_options,
    check_power_of_two,
    check_scale,
    global_token_indices,
)

__all__ = ["FMMOptions"]


@dataclass(frozen=True)
class FMMOptions:
    """The options of one Fast Multipole Attention call, validated and normalised.

    Build it with :meth:`create`, which checks every value with the same errors as
    :func:`fmm_attention.fmm_attention`; the fields then hold plain Python values
    (``bool``, ``int``, ``float`` or ``None``, a tuple of ints), so two equal sets of
    options compare and hash equal. A :class:`~fmm_attention.LearnedCoarsening` compares
    by identity.

    Parameters
    ----------
    causal, block_size, rank, coarsening, count_scaling, query_coarsening, scale, cluster_iters, refine
        As for :func:`fmm_attention.fmm_attention`.
    global_tokens : tuple of int
        Sorted unique token indices (empty: none).

    Examples
    --------
    >>> from fmm_attention.options import FMMOptions
    >>> a = FMMOptions.create(block_size=16, rank=4, global_tokens=[3, 0, 3])
    >>> a.global_tokens
    (0, 3)
    >>> a == FMMOptions.create(block_size=16, rank=4, global_tokens=(0, 3))
    True
    >>> len({a, FMMOptions.create(block_size=16, rank=4, global_tokens=(0, 3))})
    1
    """

    causal: bool = False
    block_size: int = _config.DEFAULT_BLOCK_SIZE
    rank: int = _config.DEFAULT_RANK
    coarsening: object = "mean"
    count_scaling: bool = True
    query_coarsening: bool = False
    scale: float | None = None
    cluster_iters: int = 3
    refine: int = 0
    global_tokens: tuple = ()

    @classmethod
    def create(cls, *, causal=False, block_size=_config.DEFAULT_BLOCK_SIZE, rank=_config.DEFAULT_RANK,
               coarsening="mean", count_scaling=True, query_coarsening=False, scale=None, cluster_iters=3,
               refine=0, global_tokens=None):
        """Validate the keywords of :func:`fmm_attention.fmm_attention` into options.

        Parameters
        ----------
        causal, block_size, rank, coarsening, count_scaling, query_coarsening, scale, cluster_iters, refine, global_tokens
            As for :func:`fmm_attention.fmm_attention`.

        Returns
        -------
        FMMOptions

        Raises
        ------
        TypeError, ValueError
            The errors of :func:`fmm_attention.fmm_attention` for the same values.
        """
        causal = check_bool(causal, "causal")
        coarsening, count_scaling, query_coarsening = check_fmm_options(
            coarsening=coarsening, count_scaling=count_scaling, query_coarsening=query_coarsening, causal=causal
        )
        cluster_iters, refine = check_accuracy_options(
            cluster_iters=cluster_iters, refine=refine, query_coarsening=query_coarsening
        )
        block_size = check_power_of_two(block_size, "block_size")
        rank = check_power_of_two(rank, "rank")
        if scale is not None:
            scale = check_scale(scale, 1)  # d is not known yet: only the value is checked here
        return cls(causal=causal, block_size=block_size, rank=rank, coarsening=coarsening,
                   count_scaling=count_scaling, query_coarsening=query_coarsening, scale=scale,
                   cluster_iters=cluster_iters, refine=refine, global_tokens=global_token_indices(global_tokens))

    @property
    def coarsening_name(self):
        """``"mean"``, ``"cluster"`` or ``"learned"``: what backends declare support for."""
        return self.coarsening if isinstance(self.coarsening, str) else "learned"

    def replace(self, **changes):
        """Copy with some fields changed (no validation: for values derived from valid ones).

        Parameters
        ----------
        **changes
            Field names and their new values.

        Returns
        -------
        FMMOptions
        """
        return dataclasses.replace(self, **changes)
