"""The command line's implementation: one module per command, wired to argparse here.

Each command lives in its own module of this package (``demo.py``, ``bench.py``,
``analyze.py``, ``compile.py``) exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only wires them to argparse, importing a command's module when it is chosen so
that ``demo`` never pays for SciPy or matplotlib imports it does not use. What the commands
share (the usage error, the progress line, argument types) is in ``_common.py``; the
measuring (inputs, timer, memory probe, table) is the public :mod:`fmm_attention.perf`.
The public entry point is :func:`fmm_attention.cli.main`.

A user's mistake never ends in a traceback: argparse rejects malformed options, and a
command raises :class:`~fmm_attention._cli._common.UsageError` for what it finds wrong before
it starts working (a block size that is not a power of two, an unreadable file, a missing
GPU). Both print one line on stderr, ``PROG COMMAND: error: ...``, and exit with status 2.
Errors raised while a command works are not caught: they are bugs, and their traceback is
what a bug report needs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["build_parser", "main"]

#: Command name -> (module, one-line summary, description for ``COMMAND --help``).
COMMANDS = {
    "demo": (
        "fmm_attention._cli.demo",
        "run the built-in workload: time, memory and error of each method",
        "Times each method (exact attention, FMA, FMA with coarse queries, Fastformer) on random "
        "inputs and on a real sample shipped with the package (three MiniLM heads): best of a few "
        "runs, peak memory (the resident set's rise during a call, Numba's buffers included), and "
        "relative error against exact attention.",
    ),
    "bench": (
        "fmm_attention._cli.bench",
        "benchmark exact attention and FMA against a NumPy baseline",
        "Exact attention and FMA beside a plain NumPy baseline, all measured in one process one "
        "after the other, so that ratios between them are meaningful on a noisy machine (absolute "
        "times are not). FMA is timed at the library's default block size and rank (64/4) and at "
        "32/2, each row labelled, unless --block-size or --rank pick one configuration.",
    ),
    "analyze": (
        "fmm_attention._cli.analyze",
        "error analysis of FMA against exact attention on an .npz of q, k, v",
        "Loads arrays q, k, v of shape (..., n, d), and optionally key_padding_mask of shape "
        "(..., n), bool, from an .npz file, compares FMA with exact attention head by head, prints "
        "a table per head and a summary, and optionally writes the report as JSON (--json) and PNG "
        "figures (--plot DIR, needs matplotlib: the 'plot' extra). For 4-D arrays "
        "(layer, head, n, d) --layers and --heads pick a subset; in general --layers selects along "
        "axis -4 and --heads along axis -3.",
    ),
    "compile": (
        "fmm_attention._cli.compile",
        "compile every kernel variant ahead of use (fills Numba's on-disk cache)",
        "Compiles every CPU kernel variant (float32 and float64; exact attention, FMA with fine and "
        "coarse queries, causal or not, masks, mean, cluster and learned coarsening, refinement, "
        "global tokens, Fastformer, the analysis) by calling the public functions on tiny inputs, "
        "and prints the time each variant took. Numba keeps the compiled code in its on-disk "
        "cache, so later processes start in seconds instead of minutes. The cache lives in "
        "__pycache__ folders beside the package's modules (numba's per-user cache directory when "
        "those are not writable); set the environment variable NUMBA_CACHE_DIR to put it "
        "elsewhere, and use the same value when running.",
    ),
}


class _Formatter(argparse.HelpFormatter):
    """Help with each option's default, unless its text already says it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default in (None, False, True)
                or default is argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``PROG: error: MESSAGE``, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def default_prog():
    """The name the command line was called by: ``fmm-attention``, or ``python -m fmm_attention``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not name or name in ("__main__.py", "-m", "-c") or name.endswith(".py"):
        return "python -m fmm_attention"
    return name


def build_parser(prog=None):
    """The argparse parser of all commands (their modules are imported to add arguments).

    Parameters
    ----------
    prog : str, optional
        The program name shown in help and errors; :func:`default_prog` by default.

    Returns
    -------
    argparse.ArgumentParser
    """
    from .. import __version__

    parser = _Parser(prog=prog or default_prog(), formatter_class=_Formatter,
                     description="Fast Multipole Attention, exact attention and Fastformer: "
                                 "demo, benchmark, error analysis and ahead-of-time compilation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary, description) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=description, formatter_class=_Formatter)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None, *, prog=None):
    """Entry point of ``python -m fmm_attention`` and the ``fmm-attention`` script.

    Parameters
    ----------
    argv : list of str, optional
        The command line without the program name; ``sys.argv[1:]`` by default.
    prog : str, optional
        The program name shown in help and errors; :func:`default_prog` by default.

    Returns
    -------
    int
        The exit status: 0, or 2 for a usage error (argparse's own errors exit with 2
        through ``SystemExit``), 130 when interrupted.
    """
    from ._common import UsageError

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.run(args)
    except UsageError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130
