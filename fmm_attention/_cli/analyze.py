"""``python -m fmm_attention analyze FILE.npz``: error analysis of FMA against exact attention.

Loads arrays ``q``, ``k``, ``v`` of shape ``(..., n, d)`` (optionally ``key_padding_mask``
of shape ``(..., n)``, bool) from an ``.npz``, runs :func:`fmm_attention.analysis.compare`
head by head with a progress line, prints a table per head and a summary, and optionally
writes the report as JSON (``--json``) and PNG figures (``--plot DIR``, needs matplotlib:
extra ``plot``). For 4-D arrays ``(layer, head, n, d)`` ``--layers``/``--heads`` pick a
subset; in general ``--layers`` selects along axis ``-4`` and ``--heads`` along axis ``-3``.

Everything the command can check is checked before the analysis starts: the file, its
arrays (with the library's own validators), the options, and that the ``--json`` and
``--plot`` destinations can be written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .. import _config
from ._common import Progress, UsageError, check_fma_options, user_input

#: Figures written by ``--plot`` (file name -> what it shows).
FIGURES = {
    "level_map.png": "which level serves each (query, key) pair",
    "attention.png": "exact vs FMA-implied attention of the head with the largest error",
    "error_by_level.png": "attention mass and error share by level; bound vs actual error",
    "singular_values.png": "singular-value decay of far-field blocks vs FMA's rank",
    "error_by_head.png": "relative output error per (layer, head)",
}


class Selection(tuple):
    """Indices and ranges such as ``0,2-4``, kept as ``(first, last)`` pairs.

    Never expanded before it is checked against the axis it selects from, so that
    ``0-1000000000`` costs nothing and is rejected by the file's shape.
    """

    def indices(self, size, option):
        """The selected indices along an axis of ``size`` (``UsageError`` when out of range)."""
        last = max(hi for _, hi in self)
        if last >= size:
            raise UsageError(f"{option}: index {last} is out of range for an axis of size {size}")
        return [i for lo, hi in self for i in range(lo, hi + 1)]


def _selection(text):
    """Parse ``"0,2-4"`` into a :class:`Selection` (an argparse ``type``)."""
    out = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if dash else int(lo)
            if first < 0 or last < first:
                raise ValueError
            out.append((first, last))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated indices and ranges such as 0,2-4; got {text!r}"
        ) from None
    return Selection(out)


def add_arguments(parser):
    """Add the ``analyze`` options to ``parser``."""
    parser.add_argument("file", type=Path,
                        help="an .npz with arrays q, k, v of shape (..., n, d) and optionally "
                             "key_padding_mask (..., n), bool, True = valid key")
    parser.add_argument("--block-size", type=int, default=_config.DEFAULT_BLOCK_SIZE, metavar="M",
                        help="finest box size m, a power of two")
    parser.add_argument("--rank", type=int, default=_config.DEFAULT_RANK, metavar="P",
                        help="coarse keys per far box p, a power of two")
    parser.add_argument("--causal", action="store_true", help="causal attention (keys j <= i only)")
    parser.add_argument("--coarsening", choices=["mean"], default="mean",
                        help="far-field coarsening (default: mean); learned coarsening has no "
                             "token-level attention matrix, so it cannot be analysed this way")
    parser.add_argument("--no-count-scaling", dest="count_scaling", action="store_false",
                        help="leave out the log(count) bias of coarse keys")
    parser.add_argument("--query-coarsening", action="store_true",
                        help="the O(n) variant with coarse queries (bidirectional only)")
    parser.add_argument("--scale", type=float, default=None, help="logit scale (default: 1/sqrt(d))")
    parser.add_argument("--layers", type=_selection, metavar="LIST",
                        help="layers to analyse (axis -4, e.g. of (layer, head, n, d)): indices and "
                             "ranges such as 0,2-4 (default all)")
    parser.add_argument("--heads", type=_selection, metavar="LIST",
                        help="heads to analyse (axis -3), as --layers (default all)")
    parser.add_argument("--plot", type=Path, metavar="DIR",
                        help="write PNG figures to DIR (needs matplotlib: pip install 'fmm_attention[plot]')")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the full report as JSON")
    parser.add_argument("--accuracy", action="store_true",
                        help="also print the accuracy-versus-cost table of the training-free options "
                             "(mean, cluster, refine, sinks) beside the top-k oracle (docs: accuracy)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress on stderr")


# --------------------------------------------------------------------------- input
#: How a file that numpy.savez did not write is described (never as "pickled data").
_NOT_NPZ = "is not an .npz file (a zip archive of .npy arrays, as numpy.savez writes)"


def _read(path):
    """``q, k, v`` and the optional mask from ``path``, never unpickling anything."""
    if not path.is_file():
        raise UsageError(f"no such file: {path}" if not path.exists() else f"{path} is not a file")
    # numpy.load guesses the format from the first bytes and takes anything else for a
    # pickle: check for a zip archive first so that a text file is called what it is.
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            npy = fh.read(6) == b"\x93NUMPY"
        raise UsageError(f"{path} {_NOT_NPZ}; " + ("it is a .npy file of one array: save q, k and v together "
                                                   "with numpy.savez" if npy else "it may be truncated or another format"))
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):  # pragma: no cover (is_zipfile excludes .npy)
                raise UsageError(f"{path} {_NOT_NPZ}")
            missing = [name for name in ("q", "k", "v") if name not in data.files]
            if missing:
                raise UsageError(f"{path} lacks array(s) {', '.join(missing)} "
                                 f"(has: {', '.join(sorted(data.files)) or 'none'})")
            for name in ("q", "k", "v", "key_padding_mask"):
                if name in data.files:
                    arrays[name] = np.asarray(data[name])
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # object arrays: numeric data only, never unpickled
            raise UsageError(f"{path}: an array holds Python objects; analyze reads numeric arrays only") from None
        raise UsageError(f"cannot read {path}: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise UsageError(f"cannot read {path} (damaged or truncated .npz?): {exc}") from None
    return arrays


def _load(path, layers, heads):
    """Arrays and per-head labels after the selection."""
    arrays = _read(path)
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    mask = arrays.get("key_padding_mask")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 2:
            raise UsageError(f"{path}: {name} must have at least 2 dims (..., n, d), got shape {x.shape}")
    lead = q.shape[:-2]
    indices = [np.arange(size) for size in lead]
    for name, axis_from_end, chosen in (("--layers", 4, layers), ("--heads", 3, heads)):
        if chosen is None:
            continue
        axis = q.ndim - axis_from_end
        if axis < 0:
            raise UsageError(f"{name} needs arrays with at least {axis_from_end} dims; q has shape {q.shape}")
        chosen = chosen.indices(q.shape[axis], name)
        q, k, v = (x.take(chosen, axis=axis) if x.ndim == q.ndim else x for x in (q, k, v))
        if mask is not None and mask.ndim == q.ndim - 1:
            mask = mask.take(chosen, axis=axis)
        indices[axis] = np.asarray(chosen)
    if 0 in q.shape[:-2]:
        raise UsageError(f"{path}: q of shape {q.shape} holds no heads (a leading dim is 0)")
    grid = np.meshgrid(*indices, indexing="ij") if indices else []
    labels = [",".join(str(int(g.flat[i])) for g in grid) or "-" for i in range(int(np.prod(q.shape[:-2])))]
    return q, k, v, mask, labels, indices


def _check_inputs(path, q, k, v, mask, args):
    """The library's own checks of the arrays and options, made before any work."""
    from .._validate import attention_inputs
    from ..options import check_fmm_options

    with user_input(f"{path}: "):
        batch = attention_inputs(q, k, v, scale=args.scale, key_padding_mask=mask, check_finite=True)
    if batch.n > _config.DENSE_MAX_N:
        raise UsageError(f"{path}: n={batch.n} is too long for the dense analysis (at most "
                         f"{_config.DENSE_MAX_N}); analyse a shorter window")
    with user_input():
        check_fmm_options(coarsening=args.coarsening, count_scaling=args.count_scaling,
                          query_coarsening=args.query_coarsening, causal=args.causal)
    check_fma_options(batch.n, block_size=args.block_size, rank=args.rank, causal=args.causal)


def _writable_dir(path):
    """True if files can be created in ``path``, or in the directory that would hold it."""
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def check_destinations(args):
    """``--json`` and ``--plot`` must be writable: checked before the analysis runs."""
    if args.json is not None:
        if args.json.is_dir():
            raise UsageError(f"--json: {args.json} is a directory; give a file name")
        if not _writable_dir(args.json.parent):
            raise UsageError(f"--json: cannot create {args.json}: its directory is not writable")
    if args.plot is not None:
        if args.plot.exists() and not args.plot.is_dir():
            raise UsageError(f"--plot: {args.plot} exists and is not a directory")
        if not _writable_dir(args.plot):
            raise UsageError(f"--plot: cannot write figures to {args.plot}: not a writable directory")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'fmm_attention[plot]'") from None


def _clean(obj):
    """NaN and infinity -> None, recursively, for strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _clean(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(value) for value in obj]
    return obj


# --------------------------------------------------------------------------- figures
def _plot(directory, q, k, mask, report, labels, indices, options):
    from ..analysis import attention_matrix, far_field_rank_study
    from ..analysis.figures import (
        figure_attention,
        figure_error_by_head,
        figure_error_by_level,
        figure_level_map,
        figure_singular_values,
    )

    directory.mkdir(parents=True, exist_ok=True)
    flat = lambda x: None if x is None else x.reshape((-1,) + x.shape[q.ndim - 2 :])  # noqa: E731
    qf, kf, mf = flat(q), flat(k), (None if mask is None else mask.reshape(-1, mask.shape[-1]))
    worst = int(np.argmax([h.rel_fro_error for h in report.heads]))
    label = f"head {labels[worst]}" if labels[worst] != "-" else "the input"
    head_mask = None if mf is None else mf[worst]
    common = dict(key_padding_mask=head_mask, **options)
    from ..tree import build_tree

    figures = {
        "level_map.png": figure_level_map(build_tree(q.shape[-2], block_size=options["block_size"],
                                                     rank=options["rank"], causal=options["causal"])),
        "attention.png": figure_attention(attention_matrix(qf[worst], kf[worst], method="exact", **common),
                                          attention_matrix(qf[worst], kf[worst], method="fmm", **common), label),
        "error_by_level.png": figure_error_by_level(report),
        "singular_values.png": figure_singular_values(far_field_rank_study(qf[worst], kf[worst], **common), label),
    }
    if q.ndim >= 4 and int(np.prod(q.shape[:-4])) == 1:
        grid = np.array([h.rel_fro_error for h in report.heads]).reshape(q.shape[-4], q.shape[-3])
        figures["error_by_head.png"] = figure_error_by_head(
            grid, [str(i) for i in indices[-2]], [str(i) for i in indices[-1]],
            "relative output error ||O~ - O||_F / ||O||_F")
    written = []
    for name, fig in figures.items():
        path = directory / name
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


# --------------------------------------------------------------------------- command
def run(args):
    """Run the ``analyze`` command; returns the exit status."""
    from ..analysis import compare

    start = time.perf_counter()
    check_destinations(args)
    q, k, v, mask, labels, indices = _load(args.file, args.layers, args.heads)
    _check_inputs(args.file, q, k, v, mask, args)
    options = dict(causal=args.causal, block_size=args.block_size, rank=args.rank, coarsening=args.coarsening,
                   count_scaling=args.count_scaling, query_coarsening=args.query_coarsening, scale=args.scale)
    print(f"analyze: {args.file}: q {q.shape} {q.dtype}, {len(labels)} head(s) of n={q.shape[-2]}"
          + ("" if mask is None else ", with key_padding_mask"), flush=True)
    progress = Progress(len(labels), "analyze", unit="head", enabled=args.progress)
    report = compare(q, k, v, key_padding_mask=mask, progress=lambda label: progress.update(), **options)
    progress.close()
    print(report.format(labels=labels))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = report.to_dict()
        payload["labels"] = labels
        args.json.write_text(json.dumps(_clean(payload)))
        print(f"wrote {args.json}")
    if args.plot is not None:
        for path in _plot(args.plot, q, k, mask, report, labels, indices, options):
            print(f"wrote {path}")
    if args.accuracy:
        from ..accuracy import accuracy_vs_cost, default_settings, format_rows

        progress = Progress(len(default_settings(q.shape[-2])), "analyze", unit="setting", enabled=args.progress)
        rows = accuracy_vs_cost(q, k, v, causal=args.causal, scale=args.scale, key_padding_mask=mask,
                                progress=progress.update)
        progress.close()
        print(f"\naccuracy versus cost over {len(labels)} head(s), n={q.shape[-2]} "
              "(errors: median/p90 over heads; oracle: each query's top keys at the same keys per query)")
        print(format_rows(rows))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
