"""Error analysis of Fast Multipole Attention against exact attention (SciPy).

Mean-coarsened FMA is itself a softmax attention: seen from query ``i``, every key ``j``
served by a far level is replaced by the coarse key of its sub-box, and every valid token
of that sub-box receives the same weight. The resulting dense *implied* attention matrix
``P~`` satisfies ``P~ @ v == fmm_attention(q, k, v)`` to rounding, which turns every
question about FMA's error into a question about two row-stochastic matrices:

* :func:`attention_matrix` builds ``P`` (exact) or ``P~`` (FMA) densely;
* :func:`compare` measures output errors, per-row KL divergence and total variation, the
  spectral-norm error, where (by level) the attention mass and the error sit, and checks
  two rigorous per-query bounds (Theorem 2 and Proposition 3 of the "Error analysis"
  page of the documentation, with proofs);
* :func:`far_field_rank_study` compares FMA's far-field blocks with the best possible
  (Eckart-Young) approximation of the same rank.

All three build ``(n, n)`` matrices, so ``n`` is limited to
8192; everything is computed in float64.

The package's modules: ``implied`` (the validated setup, the implied logits and
:func:`attention_matrix`), ``metrics`` (:func:`compare` and its reports), ``bounds``
(the per-query bound kernel), ``rank`` (:func:`far_field_rank_study`) and ``figures``
(matplotlib figures of the reports, used by ``python -m fmm_attention analyze --plot``).
Every public name imports from :mod:`fmm_attention.analysis` itself.
"""

from .bounds import BOUND_SLACK
from .implied import attention_matrix
from .metrics import SUMMARY_METRICS, CompareReport, HeadReport, compare
from .rank import LevelRankStudy, RankStudy, far_field_rank_study

__all__ = [
    "attention_matrix",
    "compare",
    "far_field_rank_study",
    "CompareReport",
    "HeadReport",
    "RankStudy",
    "LevelRankStudy",
    "BOUND_SLACK",
    "SUMMARY_METRICS",
]
