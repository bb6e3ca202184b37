"""Measure time and memory against n for each method and draw the figures of performance.rst.

Usage (from the repository root)::

    python docs/make_performance_figures.py --data /tmp/perf.json     # measure (about 15 min), plot
    python docs/make_performance_figures.py --data /tmp/perf.json --plot-only   # re-plot

Writes ``docs/_static/perf_time.png`` and ``docs/_static/perf_memory.png`` and prints the
figures quoted on the page: the crossover n where FMA overtakes exact attention, the
log-log slopes from n = 16,384 to 1,048,576 and the memory ratios at n = 1,048,576.

All timings of one run are taken in one process, one after the other (best of several
calls, at least one second per point, and best over ``--rounds`` rounds), so the ratios
between methods are meaningful even on a shared machine; the machine and its load average are recorded with the data and
printed on the figures. Peak memory is measured in a fresh interpreter per point
(:func:`fmm_attention.perf.memory_study`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmm_attention import perf  # noqa: E402

STATIC = ROOT / "docs" / "_static"
D, BLOCK_SIZE, RANK = 64, 32, 2
FMA_NS = [2**e for e in range(6, 21)]  # 64 .. 1,048,576
EXACT_NS = [2**e for e in range(6, 16)]  # 64 .. 32,768 (quadratic)
MEMORY_NS = [2**e for e in range(12, 21, 2)]  # 4,096 .. 1,048,576
EXACT_MEMORY_NS = [4096, 16384]
#: label -> (method, options) of every curve
METHODS = {
    "exact": ("exact", {}),
    "FMA, fine queries": ("fma", {"query_coarsening": False}),
    "FMA, coarse queries": ("fma", {"query_coarsening": True}),
    "Fastformer": ("fastformer", {}),
}
STYLE = {
    "exact": dict(color="black", marker="s"),
    "FMA, fine queries": dict(color="tab:blue", marker="o"),
    "FMA, coarse queries": dict(color="tab:orange", marker="^"),
    "Fastformer": dict(color="tab:green", marker="v"),
}


def machine():
    """A one-line description of this machine and its current load."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        ram = f", {ram:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        ram = ""
    return f"{model}, {os.cpu_count()} cores{ram}, {platform.system()}"


def commit():
    """The measured commit (``+`` when the package's files differ from it), or ``"unknown"``."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fmm_attention"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def available(method):
    try:
        perf.method_call(method, *perf.random_inputs(16, 8))
    except NotImplementedError:
        return False
    return True


def measure_times(causal, log):
    """Best wall time per call of every method at every n (one process, one after the other)."""
    times = {}
    for label, (method, options) in METHODS.items():
        if not available(method) or (causal and options.get("query_coarsening")):
            continue
        options = dict(options, causal=causal, block_size=BLOCK_SIZE, rank=RANK)
        perf.method_call(method, *perf.random_inputs(256, D), **options)()  # JIT warm-up
        times[label] = {}
    for n in FMA_NS:
        q, k, v = perf.random_inputs(n, D)
        for label in times:
            method, options = METHODS[label]
            if method == "exact" and n > max(EXACT_NS):
                continue
            fn = perf.method_call(method, q, k, v, causal=causal, block_size=BLOCK_SIZE, rank=RANK, **options)
            fn()  # plans the tree of this n
            big = method == "exact" and n >= 8192
            times[label][n] = perf.best_time(fn, repeat=1 if big else 3, min_time=0.0 if big else 1.0)
            log(f"causal={causal} {label:20s} n={n:8d}: {times[label][n] * 1e3:10.2f} ms")
    return times


def measure_memory(log):
    """Peak memory above inputs and output, per method and n, each in a fresh interpreter."""
    memory = {}
    for label, (method, options) in METHODS.items():
        if not available(method):
            continue
        memory[label] = {}
        for n in EXACT_MEMORY_NS if method == "exact" else MEMORY_NS:
            m = perf.memory_study(n, method=method, d=D, block_size=BLOCK_SIZE, rank=RANK, **options)
            memory[label][n] = {"extra": m.extra, "io_bytes": m.io_bytes, "peak": m.peak}
            log(f"{label:20s} n={n:8d}: extra {m.extra / 2**20:8.1f} MiB, ratio {m.ratio:.3f}")
    return memory


def _best_of(rounds):
    """Per point, the best time over several rounds of :func:`measure_times`."""
    best = {}
    for times in rounds:
        for label, table in times.items():
            for n, t in table.items():
                row = best.setdefault(label, {})
                row[n] = min(t, row.get(n, float("inf")))
    return best


def measure(log, rounds=2):
    data = {"machine": machine(), "commit": commit(), "load_before": load_average(),
            "started": time.strftime("%Y-%m-%d %H:%M"),
            "numba_threads": int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count())),
            "config": {"d": D, "block_size": BLOCK_SIZE, "rank": RANK, "dtype": "float32", "heads": 1}}
    data["rounds"] = rounds
    data["times"] = {
        mode: _best_of([measure_times(causal, log) for _ in range(rounds)])
        for mode, causal in (("bidirectional", False), ("causal", True))
    }
    data["memory"] = measure_memory(log)
    data["load_after"] = load_average()
    return data


def _series(table):
    ns = sorted(int(n) for n in table)
    return np.array(ns), np.array([table[str(n)] if str(n) in table else table[n] for n in ns])


def summary(data):
    """The figures quoted in performance.rst."""
    lines = []
    for mode, times in data["times"].items():
        exact_ns, exact_t = _series(times["exact"])
        for label in times:
            if not label.startswith("FMA"):
                continue
            ns, t = _series(times[label])
            common = np.isin(ns, exact_ns)
            cross = perf.crossover(ns[common], exact_t[np.isin(exact_ns, ns)], t[common])
            big = ns >= 16384
            slope = perf.loglog_slope(ns[big], t[big]) if big.sum() >= 2 else float("nan")
            at = {int(n): t_ for n, t_ in zip(ns, t)}
            speedup = exact_t[-1] / at[int(exact_ns[-1])]
            cross_text = "none in range" if cross is None else f"n = {cross:,.0f}"
            lines.append(f"{mode:13s} {label:20s}: crossover {cross_text}; {speedup:.1f}x faster than exact at "
                         f"n = {exact_ns[-1]:,}; slope 16k..1M {slope:.3f}")
    for label, table in data["memory"].items():
        n = max(int(k) for k in table)
        row = table[str(n)] if str(n) in table else table[n]
        lines.append(f"memory {label:20s} n = {n:,}: extra {row['extra'] / 2**20:.0f} MiB = "
                     f"{row['extra'] / row['io_bytes']:.3f} x q, k, v and output ({row['io_bytes'] / 2**20:.0f} MiB)")
    return "\n".join(lines)


def plot(data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subtitle = (f"{data['machine']}; shared, load average {data['load_before']:.1f} to {data['load_after']:.1f}; "
                f"commit {data.get('commit', 'unknown')}\n"
                f"float32, d = {D}, one head, block_size = {BLOCK_SIZE}, rank = {RANK}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, (mode, times) in zip(axes, data["times"].items()):
        for label, table in times.items():
            ns, t = _series(table)
            ax.loglog(ns, t * 1e3, label=label, markersize=4, linewidth=1.2, **STYLE[label])
        ns = np.array(FMA_NS, dtype=float)
        ax.loglog(ns, 1e3 * 1e-7 * ns, color="grey", linestyle=":", linewidth=1, label="slope 1")
        ax.set_title(mode, fontsize=10)
        ax.set_xlabel("sequence length n")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("time per call (ms)")
    axes[0].legend(fontsize=8)
    fig.suptitle(subtitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(STATIC / "perf_time.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    io = None
    for label, table in data["memory"].items():
        ns, rows = _series(table)
        ax.loglog(ns, [r["extra"] / 2**20 for r in rows], label=label, markersize=4, linewidth=1.2, **STYLE[label])
        if io is None or len(ns) > len(io[0]):
            io = ns, np.array([r["io_bytes"] for r in rows]) / 2**20
    ax.loglog(io[0], 2 * io[1], color="red", linestyle="--", linewidth=1, label="target: 2 x (q, k, v, out)")
    ax.loglog(io[0], io[1], color="grey", linestyle=":", linewidth=1, label="q, k, v, out")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("peak memory above inputs and output (MiB)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(subtitle, fontsize=7)
    fig.tight_layout()
    fig.savefig(STATIC / "perf_memory.png", dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="JSON file to write the measurements to (or read with --plot-only)")
    parser.add_argument("--plot-only", action="store_true", help="plot the measurements in --data, measure nothing")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of timings; the best per point is kept (default 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke test; the figures are not for the docs)")
    args = parser.parse_args(argv)
    if args.quick:
        global FMA_NS, EXACT_NS, MEMORY_NS, EXACT_MEMORY_NS
        FMA_NS, EXACT_NS, MEMORY_NS, EXACT_MEMORY_NS = FMA_NS[:4], EXACT_NS[:3], MEMORY_NS[:2], EXACT_MEMORY_NS[:1]
    if args.plot_only:
        if args.data is None:
            parser.error("--plot-only needs --data")
        data = json.loads(args.data.read_text())
    else:
        data = measure(lambda line: print(line, file=sys.stderr, flush=True), rounds=args.rounds)
        if args.data is not None:
            args.data.write_text(json.dumps(data, indent=1))
        data = json.loads(json.dumps(data))  # the same str keys as a file read back
    plot(data)
    print(f"machine: {data['machine']}; commit {data.get('commit', 'unknown')}; "
          f"load average {data['load_before']:.1f} -> {data['load_after']:.1f}")
    print(summary(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
