"""``python -m fmm_attention bench``: exact attention and FMA beside a plain NumPy baseline.

All figures of one invocation are measured in the same process, one after the other, so
ratios between them are meaningful even on a noisy machine; absolute times are not.
"""

from __future__ import annotations

import numpy as np

from . import api
from ._workloads import Progress, best_time, fma_logits, matmul_rate, numpy_attention, random_qkv, table


def add_arguments(parser):
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384, 65536], help="sequence lengths")
    parser.add_argument("--d", type=int, default=64, help="head dim (default 64)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--backend", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure, the best kept (NumPy and exact: fewer from n = 16384 on; FMA: more, 0.25 s per round)")
    parser.add_argument("--numpy-max-n", type=int, default=65536, help="skip the NumPy baseline above this n")
    parser.add_argument("--scaling", action="store_true", help="fit the log-log slope of FMA time from n=16384 to 1,048,576")


def _fmm(q, k, v, args, **kw):
    return api.fmm_attention(q, k, v, block_size=args.block_size, rank=args.rank, backend=args.backend,
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


def run(args):
    if args.scaling:
        from ._perf import scaling_study

        for coarse in (False, True):
            ns, times, slope = scaling_study(query_coarsening=coarse, block_size=args.block_size, rank=args.rank, d=args.d)
            label = "coarse queries" if coarse else "fine queries"
            print(f"FMA {label}: " + ", ".join(f"n={n}: {t * 1e3:.1f} ms" for n, t in zip(ns, times)))
            print(f"  fitted log-log slope: {slope:.3f}")
        return 0
    rate_before = matmul_rate()
    print(f"float32, d={args.d}, one head, block_size={args.block_size}, rank={args.rank}, backend={args.backend}\n")
    # warm the JIT on a tiny input so compile time stays out of the figures
    wq, wk, wv = random_qkv(256, args.d)
    api.exact_attention(wq, wk, wv, backend=args.backend)
    _fmm(wq, wk, wv, args)
    rows = []
    timer = _timer(args)
    sdpa = []
    progress = Progress(len(args.n), "bench")
    timings = []
    for n in args.n:
        q, k, v = random_qkv(n, args.d)
        dq, dk, dv = _on_backend(args, q, k, v)
        t_np, t_ex, t_fm = _three_methods(args, timer, n, lambda: numpy_attention(q, k, v),
                                          lambda: api.exact_attention(dq, dk, dv, backend=args.backend, check_finite=False),
                                          lambda: _fmm(dq, dk, dv, args))
        if args.backend == "cuda":
            t_sdpa = _torch_sdpa_time(q[0], k[0], v[0], timer)
            if t_sdpa is not None:
                sdpa.append([n, f"{t_sdpa * 1e3:.1f}", f"{t_fm * 1e3:.2f}", f"{t_sdpa / t_fm:.0f}"])
        timings.append((n, t_np, t_ex, t_fm))
        progress.update(f"n={n}")
    progress.close()
    # The matmul rate is taken before and after the timings and the higher one is used:
    # a rate depressed by a passing load would flatter FMA's share of it.
    rate_after = matmul_rate()
    rate = max(rate_before, rate_after)
    print(f"NumPy float32 matmul (2048 x 2048): {rate / 1e9:.1f} GFLOP/s "
          f"(before {rate_before / 1e9:.1f}, after {rate_after / 1e9:.1f}; the higher is used)")
    for n, t_np, t_ex, t_fm in timings:
        exact_flops = 4.0 * args.d * n * n
        fma_flops = 4.0 * args.d * fma_logits(n, block_size=args.block_size, rank=args.rank)
        rows.append([
            n, f"{t_np * 1e3:.1f}", f"{t_ex * 1e3:.1f}", f"{t_fm * 1e3:.2f}",
            f"{t_np / t_ex:.2f}", f"{t_np / t_fm:.0f}",
            f"{exact_flops / t_ex / 1e9:.1f}", f"{fma_flops / t_fm / 1e9:.1f}", f"{100 * fma_flops / t_fm / rate:.0f}%",
        ])
    print(table(rows, ["n", "numpy ms", "exact ms", "fma ms", "numpy/exact", "numpy/fma",
                       "exact GF/s", "fma GF/s", "fma/matmul"]))
    print("\nFLOPs: 4 d per logit (q.k and p.v); FMA's logits counted from its tree.")
    if sdpa:
        print("\nPyTorch scaled_dot_product_attention on the same GPU, float32:")
        print(table(sdpa, ["n", "sdpa ms", "fma ms", "sdpa/fma"]))
    elif args.backend == "cuda":
        print("\n(PyTorch with CUDA is not installed here: no SDPA comparison)")
    _bench_fastformer(args)
    if args.backend == "cpu":
        _bench_cluster_upward(args)
    return 0


def _three_methods(args, timer, n, numpy_call, exact_call, fma_call):
    """Best times of NumPy, exact attention and FMA at one ``n``, in two rounds.

    The second round runs the methods in the opposite order, so none is always timed
    right after another's heavy work. The O(n^2) methods get fewer runs at large n (a
    NumPy run at n = 65536 takes about 30 s): their runs are split between the rounds,
    and a method with a single run is timed in the first round only. FMA runs as often as
    fits in a quarter second per round.
    """
    slow_runs = args.repeat if n <= 4096 else 2 if n <= 16384 else 1
    best = {"numpy": float("inf"), "exact": float("inf"), "fma": float("inf")}
    if n > args.numpy_max_n:
        best["numpy"] = float("nan")
    calls = {"numpy": (best_time, numpy_call), "exact": (timer, exact_call), "fma": (timer, fma_call)}
    for round_ in range(2):
        for name in ("numpy", "exact", "fma") if round_ == 0 else ("fma", "exact", "numpy"):
            clock, call = calls[name]
            if name == "fma":
                t = clock(call, repeat=args.repeat, min_time=0.25)
            else:
                runs = (slow_runs + 1) // 2 if round_ == 0 else slow_runs // 2
                if runs == 0 or (name == "numpy" and n > args.numpy_max_n):
                    continue
                t = clock(call, repeat=runs)
            best[name] = min(best[name], t)
    return best["numpy"], best["exact"], best["fma"]


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
    q, k, v = random_qkv(n, args.d)
    options = dict(block_size=args.block_size, rank=args.rank, check_finite=False)
    api.fmm_attention(q[:, :512], k[:, :512], v[:, :512], coarsening="cluster", **options)
    batch = attention_inputs(q, k, v, scale=None, key_padding_mask=None, check_finite=False)
    tree = build_tree(n, block_size=args.block_size, rank=args.rank)
    t_plain = best_time(lambda: api.fmm_attention(q, k, v, **options), repeat=args.repeat)
    rows = []
    for iters in (1, 3, 8):
        t_up = best_time(lambda: cpu.coarse_buffers(batch, tree, "cluster", True, cluster_iters=iters), repeat=args.repeat)
        t_all = best_time(lambda: api.fmm_attention(q, k, v, coarsening="cluster", cluster_iters=iters, **options),
                          repeat=args.repeat)
        rows.append([n, iters, f"{t_up * 1e3:.1f}", f"{(t_all - t_up) * 1e3:.1f}", f"{t_up / (t_all - t_up):.2f}",
                     f"{t_plain * 1e3:.1f}", f"{t_up / t_plain:.2f}"])
    print("\nCluster coarsening (float32, one head): upward pass against the rest of the call and plain FMA")
    print(table(rows, ["n", "cluster_iters", "upward ms", "attention ms", "upward / attention", "plain FMA ms",
                       "upward / plain FMA"]))


def _bench_fastformer(args):
    """Fastformer against the time of reading its inputs once (a memory-bound yardstick)."""
    rows = []
    w = np.random.default_rng(2).standard_normal((2, args.d)).astype(np.float32)
    api.fastformer_attention(*random_qkv(256, args.d), w[0], w[1], backend=args.backend)
    api.fastformer_attention(*random_qkv(256, args.d), w[0], w[1], causal=True, backend=args.backend)
    timer = _timer(args)
    timings = []
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
