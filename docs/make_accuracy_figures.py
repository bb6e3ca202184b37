"""Accuracy versus cost on the real MiniLM inputs of ../shared/data (all layers and heads).

Writes docs/_static/accuracy_vs_cost.png and prints the table of docs/accuracy.rst.
Run from the repository root: ``python docs/make_accuracy_figures.py``.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmm_attention.accuracy import accuracy_vs_cost, format_rows, relative_errors, topk_attention  # noqa: E402
from fmm_attention import exact_attention  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT = Path(__file__).parent / "_static"


def load():
    arrays = [np.load(f) for f in sorted(DATA.glob("minilm_*.npz"))]
    return tuple(np.concatenate([a[x].reshape(-1, 512, 32) for a in arrays]).astype(np.float64) for x in "qkv")


def main():
    q, k, v = load()
    rows = accuracy_vs_cost(q, k, v, progress=lambda label: print("  measured", label, file=sys.stderr))
    print(f"{q.shape[0]} heads, n={q.shape[1]}\n")
    print(format_rows(rows))
    ref = exact_attention(q, k, v)
    fractions = np.array([0.06, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4])
    oracle = [np.median(relative_errors(topk_attention(q, k, v, keys=int(f * 512)), ref)) for f in fractions]
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    ax.plot(100 * fractions, oracle, "k--", label="top-k oracle (needs the full matrix)")
    markers = {"mean": "o", "cluster": "s"}
    for r in rows:
        kind = "cluster" if "cluster" in r.label else "mean"
        ax.plot(100 * r.keys_fraction, r.median, markers[kind], ms=7, label=r.label)
    ax.set_xlabel("keys per query (% of n)")
    ax.set_ylabel("median relative output error")
    ax.set_title(f"Training-free FMA on {q.shape[0]} real MiniLM heads (n=512)")
    ax.legend(fontsize=7, ncol=1, loc="upper right")
    ax.grid(alpha=0.3)
    OUT.mkdir(exist_ok=True)
    fig.savefig(OUT / "accuracy_vs_cost.png", dpi=90)


if __name__ == "__main__":
    main()
