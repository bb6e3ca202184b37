"""``python -m fmm_attention bench``: exact attention and FMA beside a plain NumPy baseline.

All figures of one invocation are measured in the same process, one after the other, so
ratios between them are meaningful even on a noisy machine; absolute times are not.
"""

from __future__ import annotations

import numpy as np

from . import _config, api
from ._workloads import (
    Progress,
    UsageError,
    best_time,
    check_fma_options,
    fma_logits,
    matmul_rate,
    numpy_attention,
    positive_int,
    random_qkv,
    table,
)

#: The FMA configurations timed by default, each labelled in the output: the library's
#: default and the 32/2 of the performance targets (docs: performance), which the
#: published figures use.
TRACKED = ((f"default {_config.DEFAULT_BLOCK_SIZE}/{_config.DEFAULT_RANK}", _config.DEFAULT_BLOCK_SIZE,
            _config.DEFAULT_RANK), ("32/2", 32, 2))


def add_arguments(parser):
    """Add the ``bench`` options to ``parser``."""
    parser.add_argument("--n", type=positive_int, nargs="+", default=[1024, 4096, 16384, 65536], help="sequence lengths")
    parser.add_argument("--d", type=positive_int, default=64, help="head dim")
    parser.add_argument("--block-size", type=int, metavar="M",
                        help="time FMA at this block size only (with --rank, or the default rank); by "
                             f"default both configurations, {' and '.join(label for label, _, _ in TRACKED)}, are timed")
    parser.add_argument("--rank", type=int, metavar="P",
                        help="time FMA at this rank only (with --block-size, or the default block size)")
    parser.add_argument("--backend", choices=["cpu", "cuda"], default="cpu", help="where the kernels run")
    parser.add_argument("--repeat", type=positive_int, default=3,
                        help="timed runs per figure, the best kept (NumPy and exact: fewer from n = 16384 on; "
                             "FMA: more, 0.25 s per round)")
    parser.add_argument("--numpy-max-n", type=int, default=65536, help="skip the NumPy baseline above this n")
    parser.add_argument("--scaling", action="store_true",
                        help="instead: fit the log-log slope of FMA time from n=16384 to 1,048,576 "
                             "(honours --d, --backend, --repeat and the configurations)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress on stderr")


def configs(args):
    """``(label, block_size, rank)`` of each FMA configuration to time."""
    if args.block_size is None and args.rank is None:
        return list(TRACKED)
    m = _config.DEFAULT_BLOCK_SIZE if args.block_size is None else args.block_size
    p = _config.DEFAULT_RANK if args.rank is None else args.rank
    return [(f"{m}/{p}", m, p)]


def _require_backend(backend):
    """A usage error unless ``backend`` can run here (checked before any work)."""
    if backend != "cuda":
        return
    from numba.core import config

    if config.ENABLE_CUDASIM:
        raise UsageError("--backend cuda with NUMBA_ENABLE_CUDASIM=1 would time numba's CUDA simulator, "
                         "not a GPU; unset it to benchmark a GPU")
    from . import cuda

    try:
        cuda.require()
    except (RuntimeError, ImportError) as exc:
        raise UsageError(f"--backend cuda: {exc}") from None


def check(args):
    """Reject bad options before any work (:class:`~fmm_attention._workloads.UsageError`)."""
    from ._perf import DEFAULT_SCALING_NS

    for _, m, p in configs(args):
        for n in DEFAULT_SCALING_NS[-1:] if args.scaling else args.n:
            check_fma_options(n, block_size=m, rank=p)
    _require_backend(args.backend)


def _fmm(q, k, v, args, block_size, rank, **kw):
    return api.fmm_attention(q, k, v, block_size=block_size, rank=rank, backend=args.backend,
                             check_finite=False, **kw)


def _timer(args):
    """``best_time`` that waits for the GPU before reading the clock when timing CUDA."""
    if args.backend != "cuda":
        return best_time
    from . import cuda

    def timed(fn, **kw):
        return best_time(lambda: (fn(), cuda.synchronize()), **kw)

    return timed


def _on_backend(args, *arrays):
    """The inputs where the backend computes: device arrays for CUDA (no host round trip)."""
    if args.backend != "cuda":
        return arrays
    from numba import cuda

    return tuple(cuda.to_device(a) for a in arrays)


def _torch_sdpa_time(q, k, v, timer):
    """PyTorch's scaled_dot_product_attention on the same float32 inputs on the GPU, or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    tq, tk, tv = (torch.as_tensor(x, device="cuda")[None] for x in (q, k, v))
    fn = lambda: (torch.nn.functional.scaled_dot_product_attention(tq, tk, tv), torch.cuda.synchronize())  # noqa: E731
    fn()
    return timer(fn, repeat=1)


def _scaling(args):
    from ._perf import DEFAULT_SCALING_NS, scaling_study

    runs = [(label, m, p, coarse) for label, m, p in configs(args) for coarse in (False, True)]
    progress = Progress(len(runs) * len(DEFAULT_SCALING_NS), "bench", unit="size", enabled=args.progress)
    print(f"float32, d={args.d}, one head, backend={args.backend}, best of at least {args.repeat} runs (1 s per n)")
    for label, m, p, coarse in runs:
        kind = "coarse queries" if coarse else "fine queries"
        ns, times, slope = scaling_study(
            query_coarsening=coarse, block_size=m, rank=p, d=args.d, backend=args.backend, repeat=args.repeat,
            progress=lambda n, t, kind=kind, label=label: progress.update(f"fma {label} {kind} n={n}"))
        progress.close()
        print(f"FMA {label}, {kind}: " + ", ".join(f"n={n}: {t * 1e3:.1f} ms" for n, t in zip(ns, times)))
        print(f"  fitted log-log slope: {slope:.3f}")
    return 0


def run(args):
    """Run the ``bench`` command; returns the exit status."""
    check(args)
    if args.scaling:
        return _scaling(args)
    tracked = configs(args)
    rate_before = matmul_rate()
    print(f"float32, d={args.d}, one head, backend={args.backend}, FMA block_size/rank: "
          f"{', '.join(label for label, _, _ in tracked)}\n")
    # warm the JIT on a tiny input so compile time stays out of the figures
    wq, wk, wv = random_qkv(256, args.d)
    api.exact_attention(wq, wk, wv, backend=args.backend)
    for _, m, p in tracked:
        _fmm(wq, wk, wv, args, m, p)
    timer = _timer(args)
    sdpa = []
    progress = Progress(len(args.n), "bench", unit="size", enabled=args.progress)
    timings = []
    for n in args.n:
        q, k, v = random_qkv(n, args.d)
        dq, dk, dv = _on_backend(args, q, k, v)
        calls = {"numpy": lambda: numpy_attention(q, k, v),
                 "exact": lambda: api.exact_attention(dq, dk, dv, backend=args.backend, check_finite=False)}
        for label, m, p in tracked:
            calls[f"fma {label}"] = lambda m=m, p=p: _fmm(dq, dk, dv, args, m, p)
        best = _time_methods(args, timer, n, calls)
        if args.backend == "cuda":
            t_fm = best[f"fma {tracked[0][0]}"]
            t_sdpa = _torch_sdpa_time(q[0], k[0], v[0], timer)
            if t_sdpa is not None:
                sdpa.append([n, f"{t_sdpa * 1e3:.1f}", f"{t_fm * 1e3:.2f}", f"{t_sdpa / t_fm:.0f}"])
        timings.append((n, best))
        progress.update(f"n={n}")
    progress.close()
    # The matmul rate is taken before and after the timings and the higher one is used:
    # a rate depressed by a passing load would flatter FMA's share of it.
    rate_after = matmul_rate()
    rate = max(rate_before, rate_after)
    print(f"NumPy float32 matmul (2048 x 2048): {rate / 1e9:.1f} GFLOP/s "
          f"(before {rate_before / 1e9:.1f}, after {rate_after / 1e9:.1f}; the higher is used)")
    rows = []
    for n, best in timings:
        t_np, t_ex = best["numpy"], best["exact"]
        exact_flops = 4.0 * args.d * n * n
        for label, m, p in tracked:
            t_fm = best[f"fma {label}"]
            fma_flops = 4.0 * args.d * fma_logits(n, block_size=m, rank=p)
            rows.append([
                n, label, f"{t_np * 1e3:.1f}", f"{t_ex * 1e3:.1f}", f"{t_fm * 1e3:.2f}",
                f"{t_np / t_ex:.2f}", f"{t_np / t_fm:.0f}",
                f"{exact_flops / t_ex / 1e9:.1f}", f"{fma_flops / t_fm / 1e9:.1f}", f"{100 * fma_flops / t_fm / rate:.0f}%",
            ])
    print(table(rows, ["n", "fma m/p", "numpy ms", "exact ms", "fma ms", "numpy/exact", "numpy/fma",
                       "exact GF/s", "fma GF/s", "fma/matmul"]))
    print("\nFLOPs: 4 d per logit (q.k and p.v); FMA's logits counted from its tree. NumPy and exact "
          "attention do not depend on m/p: their figures repeat on each row of an n.")
    if sdpa:
        print(f"\nPyTorch scaled_dot_product_attention on the same GPU, float32 (fma {tracked[0][0]}):")
        print(table(sdpa, ["n", "sdpa ms", "fma ms", "sdpa/fma"]))
    elif args.backend == "cuda":
        print("\n(PyTorch with CUDA is not installed here: no SDPA comparison)")
    _bench_fastformer(args)
    if args.backend == "cpu":
        _bench_cluster_upward(args)
    return 0


def _time_methods(args, timer, n, calls):
    """Best times of each method at one ``n`` (a dict like ``calls``), in two rounds.

    ``calls`` maps names to no-argument callables: ``"numpy"``, ``"exact"`` and one or more
    FMA configurations (names starting with ``"fma"``). The second round runs the methods
    in the opposite order, so none is always timed right after another's heavy work. The
    O(n^2) methods get fewer runs at large n (a NumPy run at n = 65536 takes about 30 s):
    their runs are split between the rounds, and a method with a single run is timed in the
    first round only. FMA runs as often as fits in a quarter second per round.
    """
    slow_runs = args.repeat if n <= 4096 else 2 if n <= 16384 else 1
    best = {name: float("inf") for name in calls}
    if n > args.numpy_max_n:
        best["numpy"] = float("nan")
    order = list(calls)
    for round_ in range(2):
        for name in order if round_ == 0 else order[::-1]:
            clock = best_time if name == "numpy" else timer
            if name.startswith("fma"):
                t = clock(calls[name], repeat=args.repeat, min_time=0.25)
            else:
                runs = (slow_runs + 1) // 2 if round_ == 0 else slow_runs // 2
                if runs == 0 or (name == "numpy" and n > args.numpy_max_n):
                    continue
                t = clock(calls[name], repeat=runs)
            best[name] = min(best[name], t)
    return best


def _bench_cluster_upward(args):
    """Cluster coarsening's upward pass beside the attention it serves (largest n).

    "attention ms" is the rest of the cluster call (the call minus its upward pass);
    plain FMA (mean coarsening) is timed beside it. Run with ``NUMBA_NUM_THREADS=1`` for
    single-thread figures.
    """
    from . import cpu
    from ._validate import attention_inputs
    from .tree import build_tree

    n = max(args.n)
    label, m, p = configs(args)[0]
    q, k, v = random_qkv(n, args.d)
    options = dict(block_size=m, rank=p, check_finite=False)
    api.fmm_attention(q[:, :512], k[:, :512], v[:, :512], coarsening="cluster", **options)
    batch = attention_inputs(q, k, v, scale=None, key_padding_mask=None, check_finite=False)
    tree = build_tree(n, block_size=m, rank=p)
    t_plain = best_time(lambda: api.fmm_attention(q, k, v, **options), repeat=args.repeat)
    rows = []
    for iters in (1, 3, 8):
        t_up = best_time(lambda: cpu.coarse_buffers(batch, tree, "cluster", True, cluster_iters=iters), repeat=args.repeat)
        t_all = best_time(lambda: api.fmm_attention(q, k, v, coarsening="cluster", cluster_iters=iters, **options),
                          repeat=args.repeat)
        rows.append([n, iters, f"{t_up * 1e3:.1f}", f"{(t_all - t_up) * 1e3:.1f}", f"{t_up / (t_all - t_up):.2f}",
                     f"{t_plain * 1e3:.1f}", f"{t_up / t_plain:.2f}"])
    print(f"\nCluster coarsening (float32, one head, m/p {label}): upward pass against the rest of the call and plain FMA")
    print(table(rows, ["n", "cluster_iters", "upward ms", "attention ms", "upward / attention", "plain FMA ms",
                       "upward / plain FMA"]))


def _bench_fastformer(args):
    """Fastformer against the time of reading its inputs once (a memory-bound yardstick)."""
    rows = []
    w = np.random.default_rng(2).standard_normal((2, args.d)).astype(np.float32)
    api.fastformer_attention(*random_qkv(256, args.d), w[0], w[1], backend=args.backend)
    api.fastformer_attention(*random_qkv(256, args.d), w[0], w[1], causal=True, backend=args.backend)
    timer = _timer(args)
    for n in args.n:
        q, k, v = random_qkv(n, args.d)
        moved = 4.0 * q.nbytes  # q, k, v read once, u written once
        t_read = best_time(lambda: (q.sum(), k.sum(), v.sum()), repeat=args.repeat)
        dq, dk, dv, w0, w1 = _on_backend(args, q, k, v, w[0], w[1])
        for causal in (False, True):
            t = timer(lambda: api.fastformer_attention(dq, dk, dv, w0, w1, causal=causal, backend=args.backend,
                                                       check_finite=False), repeat=args.repeat)
            rows.append([n, "causal" if causal else "bidirectional", f"{t * 1e3:.2f}", f"{moved / t / 1e9:.1f}",
                         f"{t_read * 1e3:.2f}", f"{t / t_read:.1f}"])
    print("\nFastformer (float32, one head): bytes = q, k, v read once + output written once")
    print(table(rows, ["n", "variant", "ms", "GB/s", "read q,k,v ms", "time / read"]))
