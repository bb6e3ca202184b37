"""Shared test fixtures."""

# CUDA backend: tests/test_cuda.py runs the kernels in numba's CUDA simulator unless
# FMM_ATTENTION_REAL_GPU=1. Set before anything imports numba (it reads the variable then).
import os

if os.environ.get("FMM_ATTENTION_REAL_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
