"""The command line: ``python -m fmm_attention COMMAND`` (or the ``fmm-attention`` script).

Commands: ``demo`` (the built-in workload), ``bench`` (timings against NumPy, SGEMM and,
when installed, PyTorch), ``analyze FILE.npz`` (error analysis of FMA) and ``compile``
(every kernel variant ahead of use). ``python -m fmm_attention COMMAND --help`` lists a
command's options. :func:`main` runs a command from Python, as the shell would.
"""

from ._cli import build_parser, main

__all__ = ["build_parser", "main"]
