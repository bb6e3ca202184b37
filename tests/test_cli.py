"""The ``bench`` command: a smoke run on tiny sizes, and how it schedules its timings."""

import argparse

import numpy as np
import pytest

from fmm_attention import _bench, cli


@pytest.mark.slow
def test_bench_smoke(capsys):
    assert cli.main(["bench", "--n", "256", "512", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "NumPy float32 matmul (2048 x 2048)" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["256"], ["512"])]
    main_rows = [r for r in rows if len(r) == 9]
    assert [r[0] for r in main_rows] == ["256", "512"]
    for row in main_rows:
        times = [float(x) for x in row[1:4]]
        assert all(np.isfinite(times)) and min(times) > 0
        assert row[8].endswith("%")
    assert "Cluster coarsening" in out and "Fastformer" in out


def test_three_methods_alternates_order_and_splits_slow_runs(monkeypatch):
    log = []

    def fake_clock(call, *, repeat, min_time=0.0):
        log.append((call(), repeat, min_time))
        return {"numpy": 3.0, "exact": 2.0, "fma": 1.0}[log[-1][0]] + len(log)  # later runs slower

    monkeypatch.setattr(_bench, "best_time", fake_clock)  # NumPy's clock (never the GPU-synced one)
    args = argparse.Namespace(repeat=3, numpy_max_n=10**9)
    calls = [lambda name=name: name for name in ("numpy", "exact", "fma")]
    t_np, t_ex, t_fm = _bench._three_methods(args, fake_clock, 16384, *calls)
    # n = 16384: NumPy and exact run once per round; FMA twice with a time budget
    assert [entry[0] for entry in log] == ["numpy", "exact", "fma", "fma", "exact", "numpy"]
    assert [entry[1] for entry in log] == [1, 1, 3, 3, 1, 1]
    assert log[2][2] > 0
    assert (t_np, t_ex, t_fm) == (3.0 + 1, 2.0 + 2, 1.0 + 3)  # the best (first) of each
    log.clear()
    _bench._three_methods(args, fake_clock, 65536, *calls)
    assert [entry[0] for entry in log] == ["numpy", "exact", "fma", "fma"]  # single slow runs: round one only
    log.clear()
    args.numpy_max_n = 1024
    t_np, _, _ = _bench._three_methods(args, fake_clock, 4096, *calls)
    assert np.isnan(t_np) and "numpy" not in [entry[0] for entry in log]
