"""Adapters to training frameworks, thin layers over :mod:`fmm_attention.grad`.

Each lives in its own module and imports its framework only there:
:mod:`fmm_attention.interop.torch` (extra ``[torch]``) and :mod:`fmm_attention.interop.jax`
(extra ``[jax]``).
"""
