"""asv benchmarks of fmm_attention: speed, memory, scaling and accuracy (see docs/performance.rst)."""
