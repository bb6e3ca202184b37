"""``python -m fmm_attention``: the command line (see :mod:`fmm_attention.cli`)."""

import sys

from ._cli import main

sys.exit(main(prog="python -m fmm_attention"))
