"""Sequence-parallel FMA on a local Dask cluster beside the single-machine call.

Run ``python -m fmm_attention.distributed.bench --n 4194304`` (needs the ``[dask]`` extra).
It starts a :class:`distributed.LocalCluster` of worker *processes* with a memory limit each,
generates ``q``, ``k``, ``v`` lazily on the workers (one packed ``(3, n, d)`` random array
chunked ``(3, C, d)``, so a chunk's ``q``, ``k``, ``v`` are born together on one worker, as
from a fused projection, each a contiguous view of the block: no copy before the kernels),
runs :func:`fmm_attention.fmm_attention` on it and reduces the output on the cluster (its
column sums and a few sampled rows come back, never the output). It reports

* the wall time (work stealing off: it would move whole chunks to an idle worker): the whole graph (generation included), and the attention alone with the
  inputs already persisted on the workers;
* the bytes moved between workers (the workers' ``transfer_incoming_log``, which the
  scheduler's transfers fill), against the bytes of ``k + v``;
* each worker's peak resident memory (``ru_maxrss`` of the worker process);
* the single-machine call on the same data (all cores in one process; the inputs are
  generated again in this process from the same seed, never gathered from the cluster)
  and the largest difference on the sampled rows.

The client's graph construction is counted in the cluster's times. ``--repeats R``
alternates ``R`` persisted-input rounds with the single-machine call (minimum of each,
and per round the wall and CPU seconds of both sides and the load average), so both meet
the same load; ``--profile`` adds the task stream of the last round (seconds per task
prefix; per worker busy, idle and receiving seconds and the idle gaps).
``--no-persist`` skips the persisted-inputs run, for sizes where the inputs
exceed the workers' memory; ``--local-directory`` is where workers spill.

Numba uses one thread per worker process, so ``--workers`` processes use as many cores as
the single-machine call does (``numba.get_num_threads()`` of this process).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import time

import numpy as np


def _worker_peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _cpu_seconds():
    """User + system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _incoming_bytes(dask_worker):
    return int(sum(t["total"] for t in dask_worker.transfer_incoming_log))


def _reset_log(dask_worker):
    dask_worker.transfer_incoming_log.clear()


def _inputs(n, d, chunk, dtype, seed):
    import dask.array as da

    packed = da.random.default_rng(seed).standard_normal((3, n, d), chunks=(3, chunk, d), dtype=dtype)
    return packed[0], packed[1], packed[2]


def run(n=2**22, d=32, chunk=2**19, workers=2, memory_limit="1.5GiB", block_size=64, rank=4, causal=False,
        dtype="float32", seed=0, n_samples=64, single=True, function="fmm", bandwidth="10MB", persist=True,
        local_directory=None, repeats=1, profile=False):
    """Run the benchmark; returns a dict of measurements (see the module notes)."""
    import dask
    import distributed
    import numba

    import fmm_attention as fa

    dtype = np.dtype(dtype)
    sample = np.sort(np.random.default_rng(seed + 1).choice(n, size=min(n_samples, n), replace=False))
    env = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = {"n": n, "d": d, "chunk": chunk, "workers": workers, "memory_limit": memory_limit, "block_size": block_size,
                  "rank": rank, "causal": causal, "dtype": str(dtype), "function": function, "bandwidth_model": bandwidth,
                  "kv_bytes": 2 * n * d * dtype.itemsize, "qkv_out_bytes": 4 * n * d * dtype.itemsize}

    def attend(q, k, v):
        if function == "exact":
            return fa.exact_attention(q, k, v, causal=causal)
        return fa.fmm_attention(q, k, v, block_size=block_size, rank=rank, causal=causal)

    def single_call(qn, kn, vn):
        start, cpu = time.perf_counter(), _cpu_seconds()
        ref = attend(qn, kn, vn)
        return time.perf_counter() - start, _cpu_seconds() - cpu, ref

    def local_inputs():
        # the same inputs, generated again here (same seed and chunks): nothing comes from the cluster
        qn, kn, vn = dask.compute(*_inputs(n, d, chunk, dtype, seed), scheduler="threads")
        warm = min(n, 2**16) if function == "fmm" else 4096
        attend(qn[:warm], kn[:warm], vn[:warm])  # warm-up (compile / load)
        return qn, kn, vn

    result["load_average_start"] = list(os.getloadavg())
    # The scheduler starts a task where it would start soonest: queue length plus transfer
    # time at its estimated bandwidth. Between processes on one machine transfers look free,
    # so a momentarily idle worker pulls whole chunks to itself (and work stealing does the
    # same later). A cluster's network is far slower than loopback: model that (bandwidth, bytes per second)
    # and keep stealing off, so tasks run where their chunk lives.
    with dask.config.set({"distributed.scheduler.work-stealing": False,
                          "distributed.scheduler.bandwidth": bandwidth}), \
            distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                     memory_limit=memory_limit, dashboard_address=":0", env=env,
                                     local_directory=local_directory) as cluster, \
            distributed.Client(cluster) as client:
        q, k, v = _inputs(n, d, chunk, dtype, seed)
        # warm-up on a small problem: numba loads (or compiles) the kernels in every worker
        # (same kernels and signatures as the real run, whatever its size)
        wq, wk, wv = _inputs(2**16 if function == "fmm" else 4096, d, 2**13 if function == "fmm" else 1024, dtype, seed)
        client.compute(attend(wq, wk, wv).sum(axis=0)).result()
        client.run(_reset_log)

        start = time.perf_counter()
        out = attend(q, k, v)
        total, rows = client.compute([out.sum(axis=0), out[sample]], sync=True)
        result["cluster_total_s"] = time.perf_counter() - start
        result["cluster_total_bytes_moved"] = sum(client.run(_incoming_bytes).values())

        result["cluster_total_s_per_token_us"] = result["cluster_total_s"] / n * 1e6
        result["n_tasks"] = len(out.__dask_graph__())
        result["graph_pickled_bytes"] = len(pickle.dumps(dict(out.__dask_graph__()), protocol=5))
        singles = []
        if persist:
            # the attention alone: inputs persisted on the workers first (generation not timed);
            # rounds alternate with the single-machine call, so both meet the same load
            q, k, v = client.persist([q, k, v])
            distributed.wait([q, k, v])
            local = local_inputs() if single else None
            rounds = []
            for r in range(repeats):
                client.run(_reset_log)
                cpu = client.run(_cpu_seconds)
                start = time.perf_counter()
                out = attend(q, k, v)  # graph construction on the client is part of the call
                built = time.perf_counter()
                with distributed.get_task_stream(client) as stream:
                    __, rows2 = client.compute([out.sum(axis=0), out[sample]], sync=True)
                done = time.perf_counter()
                cpu = sum(after - cpu[addr] for addr, after in client.run(_cpu_seconds).items())
                rounds.append({"graph_s": built - start, "compute_s": done - built, "total_s": done - start,
                               "workers_cpu_s": cpu,
                               "bytes_moved": sum(client.run(_incoming_bytes).values()),
                               "load_average": list(os.getloadavg())})
                assert np.array_equal(rows, rows2)
                if profile and r == repeats - 1:
                    result["profile"] = _profile(stream.data)
                if single:
                    seconds, cpu, ref = single_call(*local)
                    singles.append(seconds)
                    rounds[-1]["single_s"] = seconds
                    rounds[-1]["single_cpu_s"] = cpu
            result["rounds"] = rounds
            result["cluster_attention_s"] = min(x["total_s"] for x in rounds)
            result["cluster_attention_compute_s"] = min(x["compute_s"] for x in rounds)
            result["cluster_graph_s"] = min(x["graph_s"] for x in rounds)
            result["cluster_attention_bytes_moved"] = rounds[-1]["bytes_moved"]
            result["bytes_moved_over_kv"] = result["cluster_attention_bytes_moved"] / result["kv_bytes"]
        else:
            result["bytes_moved_over_kv"] = result["cluster_total_bytes_moved"] / result["kv_bytes"]
        result["worker_peak_rss_bytes"] = sorted(client.run(_worker_peak_rss).values())
    if single:
        if not singles:
            local = local_inputs()
            seconds, _cpu, ref = single_call(*local)
            singles.append(seconds)
        del local
        result["single_s"] = min(singles)
        result["single_threads"] = numba.get_num_threads()
        result["single_peak_rss_bytes"] = _worker_peak_rss()
        scale = float(np.abs(ref[sample]).max())
        result["max_rel_diff_sampled_rows"] = float(np.abs(rows - ref[sample]).max() / scale)
        ref_sum = ref.sum(axis=0, dtype=np.float64)
        result["rel_diff_column_sums"] = float(np.abs(total - ref_sum).max() / np.abs(ref_sum).max())
        timed = result.get("cluster_attention_s", result["cluster_total_s"])
        result["cluster_over_single"] = timed / result["single_s"]
        if "cluster_attention_compute_s" in result:
            result["cluster_compute_over_single"] = result["cluster_attention_compute_s"] / result["single_s"]
            # CPU seconds (the workers' against the single call's process): the work each
            # side did, less sensitive than wall time to how a loaded machine shares its cores
            result["workers_cpu_over_single_cpu"] = min(x["workers_cpu_s"] / x["single_cpu_s"] for x in rounds)
    result["load_average_end"] = list(os.getloadavg())
    return result


def _profile(tasks):
    """Where the cluster's time went, from the scheduler's task stream of one run.

    Per task prefix: count and seconds computing; per worker: seconds busy, idle within
    the run's span (waiting for inputs or for work), seconds spent receiving data, and its
    idle gaps over 50 ms (when, how long, and the task that ran next).
    """
    from distributed.utils import key_split

    prefixes, workers = {}, {}
    for task in tasks:
        w = workers.setdefault(task["worker"], {"busy_s": 0.0, "transfer_s": 0.0, "runs": []})
        for ss in task["startstops"]:
            seconds = ss["stop"] - ss["start"]
            if ss["action"] == "compute":
                entry = prefixes.setdefault(key_split(task["key"]), [0, 0.0])
                entry[0] += 1
                entry[1] += seconds
                w["busy_s"] += seconds
                w["runs"].append((ss["start"], ss["stop"], key_split(task["key"])))
            elif ss["action"] == "transfer":
                w["transfer_s"] += seconds
    first = min(min(r[0] for r in w["runs"]) for w in workers.values())
    last = max(max(r[1] for r in w["runs"]) for w in workers.values())
    per_worker = {}
    for addr, w in workers.items():
        runs = sorted(w["runs"])
        gaps, edge = [], first
        for start, stop, name in runs:
            if start - edge > 0.05:
                gaps.append({"at_s": round(edge - first, 3), "idle_s": round(start - edge, 3), "next": name})
            edge = max(edge, stop)
        if last - edge > 0.05:
            gaps.append({"at_s": round(edge - first, 3), "idle_s": round(last - edge, 3), "next": None})
        per_worker[addr] = {"busy_s": w["busy_s"], "idle_s": (last - first) - w["busy_s"],
                            "transfer_s": w["transfer_s"], "gaps": gaps}
    top = sorted(prefixes.items(), key=lambda kv: -kv[1][1])
    return {"span_s": last - first, "workers": per_worker,
            "prefixes": {name: {"tasks": c, "compute_s": sec} for name, (c, sec) in top}}


def main(argv=None):
    """Run the benchmark from the command line ``argv`` and print its report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2**22)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=2**19)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="1.5GiB")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--function", choices=("fmm", "exact"), default="fmm")
    parser.add_argument("--bandwidth", default="10MB", help="the scheduler's network model")
    parser.add_argument("--no-single", action="store_true", help="skip the single-machine call")
    parser.add_argument("--no-persist", action="store_true", help="skip the run with persisted inputs")
    parser.add_argument("--local-directory", default=None, help="where workers spill")
    parser.add_argument("--repeats", type=int, default=1,
                        help="persisted-input rounds, each followed by the single-machine call (min of each)")
    parser.add_argument("--profile", action="store_true", help="report the task stream of the last round")
    args = parser.parse_args(argv)
    res = run(n=args.n, d=args.d, chunk=args.chunk, workers=args.workers, memory_limit=args.memory_limit,
              block_size=args.block_size, rank=args.rank, causal=args.causal, dtype=args.dtype,
              single=not args.no_single, function=args.function, bandwidth=args.bandwidth,
              persist=not args.no_persist, local_directory=args.local_directory, repeats=args.repeats,
              profile=args.profile)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
