"""``python -m fmm_attention analyze``: placeholder until the analysis module lands (issue 4)."""


def add_arguments(parser):
    parser.add_argument("file", help="an .npz with arrays q, k, v")


def run(args):
    raise SystemExit("analyze is not available yet")
