"""Regenerate the figures of docs/analysis.rst from the real MiniLM inputs.

Usage (from the repository root; needs matplotlib)::

    python docs/make_analysis_figures.py [--data DIR] [--out docs/_static]

``--data`` defaults to ``../shared/data`` beside the checkout (the project's real
attention inputs, see its README). Writes ``analysis_*.png`` to ``--out`` and prints the
tables quoted on the page. Takes a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fmm_attention import exact_attention, fmm_attention
from fmm_attention.analysis.figures import (
    _figure,
    figure_attention,
    figure_error_by_level,
    figure_level_map,
    figure_singular_values,
)
from fmm_attention.analysis import attention_matrix, compare, far_field_rank_study
from fmm_attention.tree import build_tree

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = (8, 16, 32, 64)
RANKS = (1, 2, 4, 8, 16)
TABLE = ((16, 2, False), (32, 4, False), (32, 8, False), (64, 8, False), (64, 16, False), (32, 4, True))


def load(data_dir):
    files = sorted(data_dir.glob("minilm_*.npz"))
    if not files:
        raise SystemExit(f"no minilm_*.npz in {data_dir}")
    out = {}
    for path in files:
        with np.load(path) as data:
            out[path.stem.removeprefix("minilm_")] = tuple(np.asarray(data[n], dtype=np.float64) for n in "qkv")
    return out


def relative_errors(q, k, v, exact, **options):
    """Relative Frobenius output error of every (layer, head)."""
    approx = fmm_attention(q, k, v, **options)
    return np.linalg.norm(approx - exact, axis=(-2, -1)) / np.linalg.norm(exact, axis=(-2, -1))


def sweep(datasets):
    """Median and p90 over all heads of both texts, per (causal, block, rank)."""
    out = {}
    for causal in (False, True):
        errors = {}
        for q, k, v in datasets.values():
            exact = exact_attention(q, k, v, causal=causal)
            for m in BLOCKS:
                for p in RANKS:
                    rel = relative_errors(q, k, v, exact, block_size=m, rank=p, causal=causal)
                    errors.setdefault((m, p), []).append(rel.ravel())
        for key, values in errors.items():
            values = np.concatenate(values)
            out[(causal,) + key] = (np.median(values), np.percentile(values, 90))
    return out


def figure_sweep(results):
    fig = _figure(10, 3.8)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, causal in zip(axes, (False, True)):
        for i, m in enumerate(BLOCKS):
            med = [results[(causal, m, p)][0] for p in RANKS]
            p90 = [results[(causal, m, p)][1] for p in RANKS]
            ax.plot(RANKS, med, "o-", color=f"C{i}", label=f"block {m}")
            ax.plot(RANKS, p90, ":", color=f"C{i}", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rank p (coarse keys per far box)")
        ax.set_title(("causal" if causal else "bidirectional") + ", 144 MiniLM heads, n=512", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("relative error ||O~ - O||_F / ||O||_F\n(solid: median, dotted: 90th percentile)")
    axes[0].legend(fontsize=8)
    return fig


def figure_layers_heads(reports):
    fig = _figure(10, 3.4)
    axes = fig.subplots(1, len(reports))
    axes = np.atleast_1d(axes)
    vmax = max(max(h.rel_fro_error for h in r) for r in reports.values())
    for ax, (name, report) in zip(axes, reports.items()):
        grid = np.array([h.rel_fro_error for h in report]).reshape(report.lead_shape)
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
        ax.tick_params(labelsize=7)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{name}: block 32, rank 4", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.85, label="relative output error")
    return fig


def figure_far_mass(reports):
    """Relative error against the share of exact mass in the far field, per head."""
    fig = _figure(5.5, 3.8)
    ax = fig.add_subplot()
    for i, (name, report) in enumerate(reports.items()):
        layer = np.repeat(np.arange(report.lead_shape[0]), report.lead_shape[1])
        sc = ax.scatter([h.far_mass for h in report], [h.rel_fro_error for h in report], c=layer, cmap="plasma",
                        marker="os"[i % 2], s=18, label=name)
    fig.colorbar(sc, ax=ax, label="layer")
    ax.set_xlabel("share of exact attention mass in the far field")
    ax.set_ylabel("relative output error")
    ax.set_title("block 32, rank 4: relative error vs far-field mass, per head", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "_static")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    datasets = load(args.data)
    figures = {}

    results = sweep(datasets)
    figures["analysis_block_rank.png"] = figure_sweep(results)
    print("relative output error over all heads of both texts (median / p90):")
    print("causal  block " + " ".join(f"{'rank ' + str(p):>15}" for p in RANKS))
    for causal in (False, True):
        for m in BLOCKS:
            cells = " ".join(f"{results[(causal, m, p)][0]:7.3f}/{results[(causal, m, p)][1]:.3f}" for p in RANKS)
            print(f"{causal!s:6} {m:6d} {cells}")

    reports = {name: compare(q, k, v, block_size=32, rank=4) for name, (q, k, v) in datasets.items()}
    figures["analysis_layers_heads.png"] = figure_layers_heads(reports)
    figures["analysis_far_mass.png"] = figure_far_mass(reports)
    for rname, report in reports.items():
        far = np.array([h.far_mass for h in report]).reshape(report.lead_shape)
        rel = np.array([h.rel_fro_error for h in report]).reshape(report.lead_shape)
        print(f"{rname}, block 32 rank 4, per layer: far mass min-max and median error")
        for layer in range(far.shape[0]):
            print(f"  layer {layer}: far mass {far[layer].min():.2f}-{far[layer].max():.2f}, "
                  f"median error {np.median(rel[layer]):.3f}")
        summary = report.summary()
        print("  level mass (median)", np.round(summary["level_mass"], 3),
              "error share (median)", np.round(summary["level_error_share"], 3))
    first = next(iter(reports.values()))
    figures["analysis_error_by_level.png"] = figure_error_by_level(first)

    name, (q, k, v) = next(iter(datasets.items()))
    figures["analysis_level_map.png"] = figure_level_map(build_tree(q.shape[-2], block_size=32, rank=4))
    layer, head = 3, 5
    label = f"{name}, layer {layer} head {head}"
    figures["analysis_attention.png"] = figure_attention(
        attention_matrix(q[layer, head], k[layer, head]),
        attention_matrix(q[layer, head], k[layer, head], method="fmm", block_size=32, rank=4), label)
    study = far_field_rank_study(q[layer, head], k[layer, head], block_size=32, rank=4)
    figures["analysis_singular_values.png"] = figure_singular_values(study, label)
    print(f"\nfar-field rank study, {label}, block 32, rank 4:")
    for row in study.summary():
        print(f"  level {row['level']} (w={row['box_size']}, r={row['rank']}, {row['n_blocks']} blocks): "
              f"FMA error {row['fma_error']:.3f}, optimal {row['best_error']:.3f}, ratio {row['excess']:.2f}")
    for lv in study.levels:
        norm = np.sqrt((lv.block_norm**2).sum())
        print(f"  level {lv.level}: relative to the blocks' norm, FMA {np.sqrt((lv.fma_error**2).sum()) / norm:.3f}, "
              f"optimal {np.sqrt((lv.best_error**2).sum()) / norm:.3f}")

    excess, optimum = [], []
    for layer_q, layer_k in zip(q, k):
        sub = far_field_rank_study(layer_q[::4], layer_k[::4], block_size=32, rank=4)
        for lv in sub.levels:
            excess.append(np.sqrt((lv.fma_error**2).sum(-1) / (lv.best_error**2).sum(-1)))
            optimum.append(np.sqrt((lv.best_error**2).sum(-1) / (lv.block_norm**2).sum(-1)))
    excess, optimum = np.concatenate(excess), np.concatenate(optimum)
    print(f"every 4th head of every layer ({name}), per head and level: FMA/optimal error median "
          f"{np.median(excess):.2f} (min {excess.min():.2f}, max {excess.max():.2f}); optimal error / block "
          f"norm median {np.median(optimum):.3f}")

    print("\ncompare() over all heads of both texts (median / p90 relative error, bound):")
    print("block rank causal   rel.err med   rel.err p90   KL mean med   bound/err med   held")
    for m, p, causal in TABLE:
        heads = [h for q, k, v in datasets.values() for h in compare(q, k, v, block_size=m, rank=p, causal=causal)]
        rel = np.array([h.rel_fro_error for h in heads])
        kl = np.array([h.kl.mean() for h in heads])
        ratio = np.array([h.bound_ratio for h in heads])
        held = all(h.bound_held and h.tv_bound_held for h in heads)
        print(f"{m:5d} {p:4d} {causal!s:6} {np.median(rel):13.3f} {np.percentile(rel, 90):13.3f} "
              f"{np.median(kl):13.3f} {np.nanmedian(ratio):15.2f}   {held}")

    for file_name, fig in figures.items():
        path = args.out / file_name
        fig.savefig(path, dpi=90)
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
