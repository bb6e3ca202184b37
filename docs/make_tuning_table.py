"""The block_size / rank trade-off behind fmm_attention's defaults (docs/tuning.rst).

Error: median and p90 relative output error over all 144 real MiniLM heads of
../shared/data (n=512, mean coarsening). Cost: keys per query at n = 16384 (from the
tree) and time at n = 16384, d = 64, float32, one head, relative to the default, all
measured in one run. Run from the repository root: ``python docs/make_tuning_table.py``.
"""

import sys
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from make_accuracy_figures import load  # noqa: E402

from fmm_attention import _config, exact_attention, fmm_attention  # noqa: E402
from fmm_attention.perf import best_time, format_table, random_inputs  # noqa: E402
from fmm_attention.accuracy import relative_errors  # noqa: E402


def main():
    q, k, v = load()
    ref = exact_attention(q, k, v)
    xq, xk, xv = random_inputs(16384, heads=1)
    grid = [(m, p) for m in (16, 32, 64) for p in (1, 2, 4, 8)]
    times = {}
    for m, p in grid:
        fmm_attention(xq[:, :512], xk[:, :512], xv[:, :512], block_size=m, rank=p)
        times[m, p] = best_time(partial(fmm_attention, xq, xk, xv, block_size=m, rank=p, check_finite=False), repeat=5)
    default = times[_config.DEFAULT_BLOCK_SIZE, _config.DEFAULT_RANK]
    rows = []
    for m, p in grid:
        err = relative_errors(fmm_attention(q, k, v, block_size=m, rank=p), ref)
        _, stats = fmm_attention(xq, xk, xv, block_size=m, rank=p, return_stats=True)
        rows.append([m, p, f"{np.median(err):.3f}", f"{np.percentile(err, 90):.3f}",
                     f"{stats.keys_per_query_mean:.0f}", f"{times[m, p] * 1e3:.1f}", f"{times[m, p] / default:.2f}"])
    print(format_table(rows, ["block_size", "rank", "median err (real)", "p90 err (real)", "keys/query n=16k",
                              "ms n=16k", "time / default"]))


if __name__ == "__main__":
    main()
