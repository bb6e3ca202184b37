"""Shared pieces of the commands: inputs, baselines, timers, counts, the progress line and the table.

Every command reports progress through :class:`Progress` and prints results with
:func:`table`; a command raises :class:`UsageError` for a mistake of the user, which
:func:`fmm_attention.cli.main` prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import tracemalloc
from importlib import resources

import numpy as np

from ._perf import best_time, fma_logits, random_inputs  # noqa: F401  (one timer, logit count, generator)


class UsageError(Exception):
    """A mistake in the command line or the input it names: reported in one line, exit status 2."""


def random_qkv(n, d=64, *, heads=1, dtype=np.float32, seed=0):
    """Standard-normal ``q, k, v`` of shape ``(heads, n, d)`` (:func:`._perf.random_inputs`).

    One input generator for every command, the asv suite and the docs: the same seed gives
    the same data everywhere.
    """
    return random_inputs(n, d, heads=heads, dtype=dtype, seed=seed)


def real_sample():
    """The shipped real sample: ``q, k, v`` (3, 512, 32) float32 from MiniLM, and its provenance."""
    with resources.files("fmm_attention").joinpath("data/minilm_sample.npz").open("rb") as fh:
        data = np.load(fh)
        return data["q"], data["k"], data["v"], f"all-MiniLM-L6-v2 on {data['source']} (layer, head) {data['layer_head'].tolist()}"


def numpy_attention(q, k, v, *, tile=1024):
    """Plain NumPy exact attention in query tiles: ``q @ k.T``, max, exp, ``@ v`` (the baseline)."""
    scale = q.dtype.type(1.0 / np.sqrt(q.shape[-1]))
    out = np.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    for h in range(q.shape[0]):
        for i0 in range(0, q.shape[1], tile):
            s = (q[h, i0 : i0 + tile] * scale) @ k[h].T
            s -= s.max(axis=1, keepdims=True)
            np.exp(s, out=s)
            out[h, i0 : i0 + tile] = (s @ v[h]) / s.sum(axis=1, keepdims=True)
    return out


def peak_memory(fn):
    """Peak bytes of NumPy allocations made while ``fn()`` runs (``tracemalloc``).

    Counts arrays allocated through NumPy (outputs, coarse buffers, plans); the kernels'
    per-thread scratch (a few blocks' keys) is allocated by Numba's runtime and not seen.
    """
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def matmul_rate(n=2048, dtype=np.float32):
    """NumPy's matmul FLOP rate (flop/s) on an ``n x n`` product."""
    a = np.random.default_rng(1).standard_normal((n, n)).astype(dtype)
    a @ a
    return 2.0 * n**3 / best_time(lambda: a @ a, repeat=5, min_time=0.2)


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
        """Count one step done; ``label`` says which."""
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

    def wrap(self, iterable):
        """Yield the items of ``iterable``, counting a step after each (a ``progress=`` wrapper)."""
        for item in iterable:
            yield item
            self.update()

    def close(self):
        """End the progress: clear the line on a terminal."""
        if self.enabled and self._width and self._tty():
            print("\r" + " " * self._width + "\r", end="", file=self.stream, flush=True)
        self._width = 0


def table(rows, headers):
    """Format rows (lists of str) as an aligned text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


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
    from .tree import build_tree

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
