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
from ._validate import check_bool, check_count, check_power_of_two, check_scale, global_token_indices
from .coarsening import ClusterCoarsening, Coarsening, MeanCoarsening, as_coarsening
from .tree import effective_block_size

__all__ = ["FMMOptions", "check_accuracy_options", "check_fmm_options"]


def check_fmm_options(*, coarsening, count_scaling, query_coarsening, causal):
    """Validate the FMA options shared by every backend.

    Parameters
    ----------
    coarsening : str or Coarsening
        ``"mean"``, ``"cluster"`` or a :class:`~fmm_attention.coarsening.Coarsening`.
    count_scaling, query_coarsening, causal : bool

    Returns
    -------
    coarsening, count_scaling, query_coarsening
        ``coarsening`` as given (checked; :func:`~fmm_attention.coarsening.as_coarsening`
        turns it into an object), the flags as Python bools.

    Raises
    ------
    TypeError, ValueError
        The errors of :func:`fmm_attention.fmm_attention` for the same values.
    """
    as_coarsening(coarsening, 0)
    count_scaling = check_bool(count_scaling, "count_scaling")
    query_coarsening = check_bool(query_coarsening, "query_coarsening")
    if query_coarsening and causal:
        raise ValueError(
            "query_coarsening=True cannot be combined with causal=True: a coarse query averages "
            "future tokens into past outputs (use fine queries for causal attention)"
        )
    return coarsening, count_scaling, query_coarsening


def check_accuracy_options(*, cluster_iters, refine, query_coarsening):
    """Validate the training-free accuracy options.

    Parameters
    ----------
    cluster_iters, refine : int
        Non-negative integers.
    query_coarsening : bool
        Already checked (``refine > 0`` needs fine queries).

    Returns
    -------
    cluster_iters, refine : int
    """
    cluster_iters = check_count(cluster_iters, "cluster_iters")
    refine = check_count(refine, "refine")
    if refine and query_coarsening:
        raise ValueError("refine > 0 needs fine queries: it cannot be combined with query_coarsening=True")
    return cluster_iters, refine


@dataclass(frozen=True)
class FMMOptions:
    """The options of one Fast Multipole Attention call, validated and normalised.

    Build it with :meth:`create`, which checks every value with the same errors as
    :func:`fmm_attention.fmm_attention`; the fields then hold plain Python values
    (``bool``, ``int``, ``float`` or ``None``, a tuple of ints) and one
    :class:`~fmm_attention.coarsening.Coarsening`, so two equal sets of options compare and
    hash equal (``"mean"`` becomes ``MeanCoarsening()``, ``"cluster"`` becomes
    ``ClusterCoarsening(cluster_iters)``; a :class:`~fmm_attention.LearnedCoarsening`
    compares by identity).

    Parameters
    ----------
    causal, block_size, rank, count_scaling, query_coarsening, scale, refine
        As for :func:`fmm_attention.fmm_attention`.
    coarsening : Coarsening
    cluster_iters : int
        As given, or the ``iters`` of a :class:`~fmm_attention.ClusterCoarsening`.
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
    coarsening: Coarsening = MeanCoarsening()
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
        coarsening = as_coarsening(coarsening, cluster_iters)
        if isinstance(coarsening, ClusterCoarsening):
            cluster_iters = coarsening.iters  # an instance holds its own iterations
        return cls(causal=causal, block_size=block_size, rank=rank, coarsening=coarsening,
                   count_scaling=count_scaling, query_coarsening=query_coarsening, scale=scale,
                   cluster_iters=cluster_iters, refine=refine, global_tokens=global_token_indices(global_tokens))

    @property
    def coarsening_name(self):
        """The coarsening's name (``"mean"``, ``"cluster"``, ``"learned"``, ...)."""
        return self.coarsening.name

    def plan_key(self, n):
        """What the plan of a call over ``n`` tokens depends on: the key of the plan cache.

        Parameters
        ----------
        n : int
            The sequence length.

        Returns
        -------
        tuple
            ``(n, block_size, rank, causal, with_far, global_tokens)`` with ``block_size``
            clamped to the sequence (as :func:`fmm_attention.build_tree` does) and
            ``with_far = not query_coarsening``. Options that change only the arithmetic
            (coarsening, scale, count scaling, refinement) share a plan.

        Examples
        --------
        >>> from fmm_attention.options import FMMOptions
        >>> FMMOptions.create(block_size=64, rank=4).plan_key(40)
        (40, 64, 4, False, True, ())
        >>> a = FMMOptions.create(block_size=8, scale=0.5).plan_key(100)
        >>> a == FMMOptions.create(block_size=8, coarsening="cluster").plan_key(100)
        True
        """
        return (int(n), effective_block_size(n, self.block_size), self.rank, self.causal, not self.query_coarsening,
                self.global_tokens)

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
