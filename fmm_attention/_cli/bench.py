"""``python -m fmm_attention bench``: exact attention and FMA beside a plain NumPy baseline.

All figures of one invocation are measured in the same process, one after the other, so
ratios between them are meaningful even on a noisy machine; absolute times are not.
Beside the NumPy baseline: PyTorch's ``scaled_dot_product_attention`` on the same inputs
when torch is installed (the ``bench`` extra; said so when it is not), and the backward
passes of :mod:`fmm_attention.grad` against their forwards.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from .. import _config, api
from ..perf import best_time, fma_logits, format_table, matmul_rate, random_inputs
from ._common import Progress, UsageError, check_fma_options, positive_int

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
    parser.add_argument("--no-backward", dest="backward", action="store_false",
                        help="leave out the backward rows (fmm_attention.grad's pullbacks against their forwards)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress on stderr")


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
    from .. import cuda

    try:
        cuda.require()
    except (RuntimeError, ImportError) as exc:
        raise UsageError(f"--backend cuda: {exc}") from None


def check(args):
    """Reject bad options before any work (:class:`~fmm_attention._cli._common.UsageError`)."""
    from ..perf import DEFAULT_SCALING_NS

    for _, m, p in configs(args):
        for n in DEFAULT_SCALING_NS[-1:] if args.scaling else args.n:
            check_fma_options(n, block_size=m, rank=p)
    _require_backend(args.backend)


def _fmm(q, k, v, args, block_size, rank, **kw):
    return api.fmm_attention(q, k, v, block_size=block_size, rank=rank, backend=args.backend,
                             check_finite=False, **kw)


def _on_backend(args, *arrays):
    """The inputs where the backend computes: device arrays for CUDA (no host round trip)."""
    if args.backend != "cuda":
        return arrays
    from numba import cuda

    return tuple(cuda.to_device(a) for a in arrays)


def torch_sdpa(backend):
    """PyTorch's ``scaled_dot_product_attention`` where ``backend`` computes, or why not.

    Returns ``(make_call, note)``: ``make_call(q, k, v)`` gives a no-argument callable of
    SDPA on those (float32, ``(heads, n, d)``) inputs, CPU tensors sharing the arrays'
    memory, or copies on the GPU, which waits for the GPU before returning; ``note`` says
    which torch ran. ``make_call`` is ``None`` when torch is not installed, or has no CUDA
    for ``backend="cuda"``, and ``note`` then says so.
    """
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed here: no SDPA comparison (install it: the 'torch' extra)"
    if backend == "cuda" and not torch.cuda.is_available():
        return None, f"PyTorch {torch.__version__} here has no CUDA: no SDPA comparison on the GPU"
    device = "cuda" if backend == "cuda" else "cpu"
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def make_call(q, k, v):
        tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x)).to(device)[None] for x in (q, k, v))
        if device == "cuda":
            return lambda: (sdpa(tq, tk, tv), torch.cuda.synchronize())
        return lambda: sdpa(tq, tk, tv)

    threads = "" if device == "cuda" else f", {torch.get_num_threads()} torch threads"
    return make_call, f"PyTorch {torch.__version__} scaled_dot_product_attention on the {device.upper()}{threads}"


def sdpa_best_times(ns, d, repeat):
    """Best times (seconds) of CPU SDPA at each ``n`` of ``ns``: ``{n: seconds}``.

    The inputs are :func:`~fmm_attention.perf.random_inputs` of the bench's own rows (the
    same seed, so the same numbers), with as many runs as the bench gives exact attention at
    that ``n``. Run by :func:`_sdpa_in_own_process`, in a process of its own.
    """
    make_call, note = torch_sdpa("cpu")
    if make_call is None:
        raise RuntimeError(note)
    times = {}
    for n in ns:
        call = make_call(*random_inputs(n, d, heads=1))
        call()  # torch's first call at a shape sets up its kernels
        times[n] = best_time(call, repeat=_slow_runs(n, repeat))
    return times


def _sdpa_in_own_process(ns, d, repeat):
    """:func:`sdpa_best_times` in a spawned process, while this one waits.

    PyTorch's CPU threads keep spinning after its calls: in one process, with a 0.4 s pause,
    exact attention at n = 512 took 0.70 ms after an SDPA call against 0.40 ms before any,
    so timing both in one process measured PyTorch's threads as much as the library.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(sdpa_best_times, list(ns), d, repeat).result()


def _scaling(args):
    from ..perf import DEFAULT_SCALING_NS, scaling_study

    runs = [(label, m, p, coarse) for label, m, p in configs(args) for coarse in (False, True)]
    progress = Progress(len(runs) * len(DEFAULT_SCALING_NS), "bench", unit="size", enabled=args.progress)
    print(f"float32, d={args.d}, one head, backend={args.backend}, best of at least {args.repeat} runs (1 s per n)")
    for label, m, p, coarse in runs:
        kind = "coarse queries" if coarse else "fine queries"
        ns, times, slope = scaling_study(
            query_coarsening=coarse, block_size=m, rank=p, d=args.d, backend=args.backend, repeat=args.repeat,
            progress=lambda step, kind=kind, label=label: progress.update(f"{label} {kind}: {step}"))
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
    wq, wk, wv = random_inputs(256, args.d, heads=1)
    api.exact_attention(wq, wk, wv, backend=args.backend)
    for _, m, p in tracked:
        _fmm(wq, wk, wv, args, m, p)
    timer = partial(best_time, backend=args.backend)
    sdpa_call, sdpa_note = torch_sdpa(args.backend)
    backward = args.backward and args.backend == "cpu"
    progress = Progress(len(args.n) * (2 if backward else 1), "bench", unit="size", enabled=args.progress)
    timings = []
    for n in args.n:
        q, k, v = random_inputs(n, args.d, heads=1)
        dq, dk, dv = _on_backend(args, q, k, v)
        calls = {"numpy": partial(numpy_attention, q, k, v),
                 "exact": partial(api.exact_attention, dq, dk, dv, backend=args.backend, check_finite=False)}
        if sdpa_call is not None and args.backend == "cuda":  # CPU: in its own process, below
            calls["sdpa"] = sdpa_call(q, k, v)
        for label, m, p in tracked:
            calls[f"fma {label}"] = partial(_fmm, dq, dk, dv, args, m, p)
        best = _time_methods(args, timer, n, calls)
        timings.append((n, best))
        progress.update(f"n={n}")
    backward_rows = _bench_backward(args, tracked[0], progress) if backward else []
    progress.close()
    if sdpa_call is not None and args.backend != "cuda":
        sdpa_times = _sdpa_in_own_process([n for n, _ in timings], args.d, args.repeat)
        for n, best in timings:
            best["sdpa"] = sdpa_times[n]
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
    print(format_table(rows, ["n", "fma m/p", "numpy ms", "exact ms", "fma ms", "numpy/exact", "numpy/fma",
                              "exact GF/s", "fma GF/s", "fma/matmul"]))
    print("\nFLOPs: 4 d per logit (q.k and p.v); FMA's logits counted from its tree. NumPy and exact "
          "attention do not depend on m/p: their figures repeat on each row of an n.")
    if sdpa_call is not None:
        label = tracked[0][0]
        where = ("timed in the same rounds" if args.backend == "cuda" else
                 "timed in a process of its own after the others (in one process its threads slow the calls after it)")
        print(f"\n{sdpa_note}, float32, the same inputs, {where} (fma {label}):")
        sdpa_rows = [[n, f"{best['sdpa'] * 1e3:.1f}", f"{best['exact'] * 1e3:.1f}", f"{best['sdpa'] / best['exact']:.2f}",
                      f"{4.0 * args.d * n * n / best['sdpa'] / 1e9:.1f}", f"{best[f'fma {label}'] * 1e3:.2f}",
                      f"{best['sdpa'] / best[f'fma {label}']:.1f}"] for n, best in timings]
        print(format_table(sdpa_rows, ["n", "sdpa ms", "exact ms", "sdpa/exact", "sdpa GF/s", "fma ms", "sdpa/fma"]))
    else:
        print(f"\n({sdpa_note})")
    if backward_rows:
        print("\nBackward (fmm_attention.grad): the pullback alone against the plain forward of the same call, "
              f"float32, bidirectional (fma {tracked[0][0]})")
        print(format_table(backward_rows, ["n", "method", "forward ms", "backward ms", "backward/forward"]))
    elif args.backward:
        print(f"\n(no backward rows: the {args.backend} backend has no backward pass)")
    _bench_fastformer(args)
    if args.backend == "cpu":
        _bench_cluster_upward(args)
    return 0


def _bench_backward(args, config, progress):
    """Rows ``[n, method, forward ms, backward ms, ratio]`` of exact attention and one FMA
    configuration at each ``n``: the plain forward call against the pullback of its VJP
    (:mod:`fmm_attention.grad`), each the best of its runs, measured one after the other."""
    from ..grad import exact_attention_vjp, fmm_attention_vjp

    label, m, p = config
    fma = dict(block_size=m, rank=p, check_finite=False)
    methods = [("exact", partial(api.exact_attention, check_finite=False), partial(exact_attention_vjp, check_finite=False)),
               (f"fma {label}", partial(api.fmm_attention, **fma), partial(fmm_attention_vjp, **fma))]
    wq, wk, wv, wg = random_inputs(256, args.d, heads=1, cotangent=True)
    for _, _, vjp in methods:  # compile the backward kernels outside the timings
        vjp(wq, wk, wv)[1](wg)
    rows = []
    for n in args.n:
        q, k, v, g = random_inputs(n, args.d, heads=1, cotangent=True)
        for name, forward, vjp in methods:
            # the O(n^2) method runs fewer times at large n, as in the main table
            runs = dict(repeat=args.repeat, min_time=0.25) if name != "exact" or n <= 4096 else dict(repeat=1)
            _, pullback = vjp(q, k, v)
            t_fwd = best_time(partial(forward, q, k, v), **runs)
            t_bwd = best_time(partial(pullback, g), **runs)
            rows.append([n, name, f"{t_fwd * 1e3:.2f}", f"{t_bwd * 1e3:.2f}", f"{t_bwd / t_fwd:.2f}"])
            del pullback
        progress.update(f"backward n={n}")
    return rows


def _slow_runs(n, repeat):
    """Timed runs of an O(n^2) method at ``n`` (NumPy, exact attention, SDPA): ``repeat``, fewer at large n."""
    return repeat if n <= 4096 else 2 if n <= 16384 else 1


def _time_methods(args, timer, n, calls):
    """Best times of each method at one ``n`` (a dict like ``calls``), in two rounds.

    ``calls`` maps names to no-argument callables: ``"numpy"``, ``"exact"``, optionally
    ``"sdpa"`` (PyTorch) and one or more FMA configurations (names starting with ``"fma"``). The second round runs the methods
    in the opposite order, so none is always timed right after another's heavy work. The
    O(n^2) methods get fewer runs at large n (a NumPy run at n = 65536 takes about 30 s):
    their runs are split between the rounds, and a method with a single run is timed in the
    first round only. FMA runs as often as fits in a quarter second per round.
    """
    slow_runs = _slow_runs(n, args.repeat)
    best = {name: float("inf") for name in calls}
    if n > args.numpy_max_n:
        best["numpy"] = float("nan")
    order = list(calls)
    for round_ in range(2):
        for name in order if round_ == 0 else order[::-1]:
            # NumPy and torch wait for their own work; only the library's calls may need a GPU sync
            clock = best_time if name in ("numpy", "sdpa") else timer
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
    from .. import cpu
    from .._validate import attention_inputs
    from ..tree import build_tree

    n = max(args.n)
    label, m, p = configs(args)[0]
    q, k, v = random_inputs(n, args.d, heads=1)
    options = dict(block_size=m, rank=p, check_finite=False)
    api.fmm_attention(q[:, :512], k[:, :512], v[:, :512], coarsening="cluster", **options)
    batch = attention_inputs(q, k, v, scale=None, key_padding_mask=None, check_finite=False)
    tree = build_tree(n, block_size=m, rank=p)
    t_plain = best_time(lambda: api.fmm_attention(q, k, v, **options), repeat=args.repeat)
    rows = []
    for iters in (1, 3, 8):
        t_up = best_time(partial(cpu.coarse_buffers, batch, tree, "cluster", True, cluster_iters=iters),
                         repeat=args.repeat)
        t_all = best_time(partial(api.fmm_attention, q, k, v, coarsening="cluster", cluster_iters=iters, **options),
                          repeat=args.repeat)
        rows.append([n, iters, f"{t_up * 1e3:.1f}", f"{(t_all - t_up) * 1e3:.1f}", f"{t_up / (t_all - t_up):.2f}",
                     f"{t_plain * 1e3:.1f}", f"{t_up / t_plain:.2f}"])
    print(f"\nCluster coarsening (float32, one head, m/p {label}): upward pass against the rest of the call and plain FMA")
    print(format_table(rows, ["n", "cluster_iters", "upward ms", "attention ms", "upward / attention",
                              "plain FMA ms", "upward / plain FMA"]))


def _read_once(*arrays):
    """Read every element of ``arrays`` once (a sum each, on one thread)."""
    return [x.sum() for x in arrays]


def _read_once_parallel(*arrays):
    """Read every element of ``arrays`` once on every thread (the finiteness pass's parallel
    kernel, whatever the array's size): two cores read large arrays faster than one."""
    from ..cpu import finite

    bits = [finite.exponent_bits(x.reshape(-1)) for x in arrays]
    return [finite._max_exponent(word, mask, max(1, int(_config.FINITE_CHUNK))) for word, mask in bits]


def _bench_fastformer(args):
    """Fastformer (default options: ``check_finite`` on) against the time of reading its
    inputs once: the faster of a serial and a parallel read, the memory-bound yardstick."""
    rows = []
    small = random_inputs(256, args.d, heads=1, fastformer=True)
    api.fastformer_attention(*small, backend=args.backend)
    api.fastformer_attention(*small, causal=True, backend=args.backend)
    timer = partial(best_time, backend=args.backend)
    for n in args.n:
        q, k, v, w_q, w_k = random_inputs(n, args.d, heads=1, fastformer=True)
        moved = 4.0 * q.nbytes  # q, k, v read once, u written once
        _read_once_parallel(q[:, :8], k[:, :8], v[:, :8])  # compiled outside the timing
        t_read = min(best_time(partial(_read_once, q, k, v), repeat=args.repeat),
                     best_time(partial(_read_once_parallel, q, k, v), repeat=args.repeat))
        dq, dk, dv, w0, w1 = _on_backend(args, q, k, v, w_q, w_k)
        for causal in (False, True):
            t = timer(partial(api.fastformer_attention, dq, dk, dv, w0, w1, causal=causal, backend=args.backend),
                      repeat=args.repeat)
            rows.append([n, "causal" if causal else "bidirectional", f"{t * 1e3:.2f}", f"{moved / t / 1e9:.1f}",
                         f"{t_read * 1e3:.2f}", f"{t / t_read:.1f}"])
    print("\nFastformer (float32, one head, check_finite on): bytes = q, k, v read once + output written once; "
          "read = the faster of a serial and a parallel read of q, k, v")
    print(format_table(rows, ["n", "variant", "ms", "GB/s", "read q,k,v ms", "time / read"]))
