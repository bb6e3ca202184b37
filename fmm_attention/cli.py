"""``python -m fmm_attention COMMAND``: demo, bench, analyze.

Each command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them to argparse, importing a command's module
when it is chosen so that ``demo`` never pays for SciPy or matplotlib imports it does not use.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["build_parser", "main"]

COMMANDS = {
    "demo": ("fmm_attention._demo", "run the built-in workload: time, memory and error of each method"),
    "bench": ("fmm_attention._bench", "benchmark exact attention and FMA against a NumPy baseline"),
    "analyze": ("fmm_attention._analyze", "error analysis of FMA against exact attention on an .npz of q, k, v"),
}


def build_parser():
    """The argparse parser of all commands (their modules are imported to add arguments).

    Returns
    -------
    argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(prog="python -m fmm_attention", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None):
    """Entry point of ``python -m fmm_attention`` and the ``fmm-attention`` script.

    Parameters
    ----------
    argv : list of str, optional
        The command line without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        The command's exit status (0 on success). Command-line errors found by argparse
        exit through ``SystemExit`` instead.
    """
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
