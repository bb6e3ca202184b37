"""Regenerate docs/_static/fma_level_map*.png: which level serves each (query, key) pair.

Run from the repository root: ``python docs/make_fma_figures.py``.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from fmm_attention import build_tree  # noqa: E402

OUT = Path(__file__).parent / "_static"


def main():
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), constrained_layout=True)
    for ax, causal in zip(axes, (False, True)):
        tree = build_tree(128, block_size=8, rank=2, causal=causal)
        lm = tree.level_map()
        colors = ["#ffffff", "#1b9e77", "#d95f02", "#7570b3", "#e7298a"][: tree.n_levels + 2]
        im = ax.imshow(lm, cmap=ListedColormap(colors), vmin=-1.5, vmax=tree.n_levels + 0.5, interpolation="nearest")
        ax.set_title(f"{'causal' if causal else 'bidirectional'}: n=128, block_size=8")
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    cbar = fig.colorbar(im, ax=axes, ticks=range(-1, tree.n_levels + 1), shrink=0.8)
    cbar.ax.set_yticklabels(["never"] + ["near (exact)"] + [f"level {l}" for l in range(1, tree.n_levels + 1)])
    OUT.mkdir(exist_ok=True)
    fig.savefig(OUT / "fma_level_map.png", dpi=90)


if __name__ == "__main__":
    main()
