"""What every command shares: the usage error, the progress line, argument types, the sample.

Every command reports progress through :class:`Progress` (its ``update`` is the package's
one ``progress=`` contract: a callable called with a label after each step) and prints
results with :func:`fmm_attention.perf.format_table`; a command raises :class:`UsageError`
for a mistake of the user, which :func:`fmm_attention._cli.main` prints as one line (exit
status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from importlib import resources

import numpy as np


class UsageError(Exception):
    """A mistake in the command line or the input it names: reported in one line, exit status 2."""


def real_sample():
    """The shipped real sample: ``q, k, v`` (3, 512, 32) float32 from MiniLM, and its provenance."""
    with resources.files("fmm_attention").joinpath("data/minilm_sample.npz").open("rb") as fh:
        data = np.load(fh)
        return data["q"], data["k"], data["v"], f"all-MiniLM-L6-v2 on {data['source']} (layer, head) {data['layer_head'].tolist()}"


class Progress:
    """The progress of a command on stderr, the one implementation every command uses.

    On a terminal one line is rewritten in place and cleared at the end; elsewhere (a log,
    a pipe, CI) each step prints its own line, so progress stays visible without a TTY.
    Each line reads ``desc: unit i/total label (T s elapsed)``.

    Parameters
    ----------
    total : int
        Number of steps.
    desc : str
        Name of the command, the line's prefix.
    unit : str, optional
        What a step is ("head", "variant", ...).
    enabled : bool, optional
        ``False`` prints nothing.
    stream : file, optional
        ``sys.stderr`` (read at each write, so that a replaced stderr is honoured) by default.
    """

    def __init__(self, total, desc, *, unit="step", enabled=True, stream=None):
        self.total, self.desc, self.unit, self.enabled = int(total), desc, unit, bool(enabled)
        self.done = 0
        self._stream = stream
        self._start = time.perf_counter()
        self._width = 0

    @property
    def stream(self):
        return sys.stderr if self._stream is None else self._stream

    def _tty(self):
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def update(self, label=""):
        """Count one step done; ``label`` says which.

        This is the package's one ``progress=`` contract, so ``progress=bar.update`` can
        be passed to :func:`~fmm_attention.perf.scaling_study`,
        :func:`~fmm_attention.analysis.compare` or
        :func:`~fmm_attention.accuracy.accuracy_vs_cost`.
        """
        self.done += 1
        if not self.enabled:
            return
        text = f"{self.desc}: {self.unit} {self.done}/{self.total}" + (f" {label}" if label else "")
        text += f" ({time.perf_counter() - self._start:.1f} s elapsed)"
        if self._tty():
            print("\r" + text.ljust(self._width), end="", file=self.stream, flush=True)
            self._width = max(self._width, len(text))
        else:
            print(text, file=self.stream, flush=True)

    def close(self):
        """End the progress: clear the line on a terminal."""
        if self.enabled and self._width and self._tty():
            print("\r" + " " * self._width + "\r", end="", file=self.stream, flush=True)
        self._width = 0


@contextlib.contextmanager
def user_input(prefix=""):
    """Turn the library's ``ValueError``/``TypeError`` into a :class:`UsageError`.

    Wrap only the checks a command makes before it starts working (validating its options
    with the library's own validators), never the work itself: an error there is a bug and
    keeps its traceback.
    """
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{prefix}{exc}") from exc


def positive_int(text):
    """An argparse ``type``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def check_fma_options(n, *, block_size, rank, causal=False):
    """Validate FMA's ``block_size``/``rank`` for a length ``n`` with the library (its plan)."""
    from ..tree import build_tree

    with user_input("invalid --block-size/--rank: "):
        build_tree(int(n), block_size=block_size, rank=rank, causal=causal)


def positive_float(text):
    """An argparse ``type``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value
