"""The command line: usage errors in one line, help, version, progress, and what each command measures.

Most tests run ``cli.main`` in-process and stub out the library calls a command would make
after its checks: a usage error must be found before any work (a compile, a load, an
analysis), and the stubs fail the test if the work starts.
"""

import argparse
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fmm_attention
from fmm_attention import _cli, _config, api, cli, perf
from fmm_attention._cli import _common, analyze as _analyze, bench as _bench, compile as _compile


def run_cli(argv, capsys):
    """``(exit status, stdout, stderr)`` of one in-process run."""
    try:
        code = cli.main(argv, prog="fmm-attention")
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith("fmm-attention") and ": error: " in lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Make every public compute function fail the test if a command calls it."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the command started working before rejecting its input")

    # imported before api is patched: a first import here would bind the stub for good
    # (analysis takes fmm_attention from api at import), failing later tests of other files
    import fmm_attention.analysis as analysis

    for name in ("exact_attention", "fmm_attention", "fastformer_attention"):
        monkeypatch.setattr(api, name, forbidden)
    monkeypatch.setattr(analysis, "compare", forbidden)
    monkeypatch.setattr(_bench, "matmul_rate", forbidden)


# --------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("argv, needle", [
    (["demo", "--block-size", "3"], "block_size"),
    (["demo", "--rank", "6"], "rank"),
    (["demo", "--n", "0"], "--n"),
    (["demo", "--d", "-1"], "--d"),
    (["demo", "--repeat", "0"], "--repeat"),
    (["demo", "--max-time", "nan"], "--max-time"),
    (["bench", "--block-size", "3"], "block_size"),
    (["bench", "--rank", "0"], "rank"),
    (["bench", "--n", "0"], "--n"),
    (["bench", "--scaling", "--block-size", "12"], "block_size"),
    (["bench", "--backend", "tpu"], "--backend"),
    (["compile", "--only", "nothing"], "--only"),
    (["compile", "--only", "analysis", "--dtype", "float32"], "nothing to compile"),
    (["frobnicate"], "frobnicate"),
    ([], "COMMAND"),
])
def test_bad_options_are_one_line_errors_before_any_work(argv, needle, capsys, no_work):
    code, _, err = run_cli(argv, capsys)
    assert_usage_error(code, err, needle)


def test_bench_cuda_under_the_simulator_is_refused(capsys, no_work):
    from numba.core import config

    if not config.ENABLE_CUDASIM:
        pytest.skip("a real GPU run (FMM_ATTENTION_REAL_GPU=1)")
    code, _, err = run_cli(["bench", "--backend", "cuda"], capsys)
    assert_usage_error(code, err, "simulator")


@pytest.mark.skipif(os.environ.get("FMM_ATTENTION_REAL_GPU") == "1", reason="a GPU is present")
def test_bench_cuda_without_gpu_is_a_usage_error_in_a_fresh_process():
    # A real process: numba-cuda absent or no driver, and the name it was called by.
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(fmm_attention.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "fmm_attention", "bench", "--backend", "cuda", "--n", "64"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("python -m fmm_attention bench: error: --backend cuda: ")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""  # nothing measured


# --------------------------------------------------------------------------- analyze: files
def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def good_npz(tmp_path):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 2, 3, 32, 4))
    mask = np.ones((2, 3, 32), bool)
    mask[:, :, 20:] = False
    return _npz(tmp_path / "good.npz", q=q, k=k, v=v, key_padding_mask=mask)


def _bad_files(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 4))
    good = _npz(tmp_path / "ok.npz", q=x, k=x, v=x)
    data = good.read_bytes()
    files = {
        "empty": (b"", "not an .npz"),
        "truncated": (data[: len(data) // 2], "not an .npz"),
        "text": (b"q,k,v\n1,2,3\n", "not an .npz"),
    }
    out = {}
    for name, (content, needle) in files.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(content)
        out[name] = (path, needle)
    out["npy"] = (Path(str(_npy(tmp_path / "one.npy", x))), "not an .npz")
    out["1-d"] = (_npz(tmp_path / "1d.npz", q=np.ones(4), k=np.ones(4), v=np.ones(4)), "at least 2 dims")
    out["0-d"] = (_npz(tmp_path / "0d.npz", q=np.float64(1), k=np.float64(1), v=np.float64(1)), "at least 2 dims")
    empty_lead = np.zeros((0, 16, 4))
    out["lead 0"] = (_npz(tmp_path / "lead0.npz", q=empty_lead, k=empty_lead, v=empty_lead), "no heads")
    out["n 0"] = (_npz(tmp_path / "n0.npz", q=np.zeros((2, 0, 4)), k=np.zeros((2, 0, 4)), v=np.zeros((2, 0, 4))),
                  "sequence length")
    out["shapes"] = (_npz(tmp_path / "shapes.npz", q=x, k=x[:, :8], v=x), "sequence length")
    out["ints"] = (_npz(tmp_path / "ints.npz", q=np.ones((16, 4), int), k=np.ones((16, 4), int),
                        v=np.ones((16, 4), int)), "q")
    nan = x.copy()
    nan[0, 0, 0] = np.nan
    out["nan"] = (_npz(tmp_path / "nan.npz", q=nan, k=x, v=x), "NaN")
    out["mask dtype"] = (_npz(tmp_path / "maskdt.npz", q=x, k=x, v=x, key_padding_mask=np.ones((2, 16))),
                         "key_padding_mask")
    out["objects"] = (_npz(tmp_path / "objects.npz", q=np.array([None, 1], dtype=object), k=x, v=x),
                      "Python objects")
    out["missing"] = (tmp_path / "missing.npz", "no such file")
    out["directory"] = (tmp_path, "not a file")
    return out


def _npy(path, x):
    np.save(path, x)
    return path


def test_bad_files_are_one_line_errors_before_any_work(tmp_path, capsys, no_work):
    cases = _bad_files(tmp_path)
    for name, (path, needle) in cases.items():
        code, out, err = run_cli(["analyze", str(path)], capsys)
        assert_usage_error(code, err, needle)
        assert "allow_pickle" not in err and "pickled" not in err, name


def test_bad_analyze_options_are_usage_errors(good_npz, capsys, no_work):
    for argv, needle in [(["--block-size", "3"], "block_size"), (["--rank", "5"], "rank"),
                         (["--causal", "--query-coarsening"], "query_coarsening"),
                         (["--scale", "inf"], "scale"), (["--heads", "3"], "--heads: index 3")]:
        code, _, err = run_cli(["analyze", str(good_npz), *argv], capsys)
        assert_usage_error(code, err, needle)


def test_layers_selection_is_bounded_by_the_file(good_npz, capsys, no_work):
    selection = _analyze._selection("0-1000000000,3")
    assert list(selection) == [(0, 1000000000), (3, 3)]  # never expanded at parse time
    code, _, err = run_cli(["analyze", str(good_npz), "--layers", "0-1000000000"], capsys)
    assert_usage_error(code, err, "--layers: index 1000000000 is out of range for an axis of size 2")
    assert _analyze._selection("0-1,1").indices(2, "--layers") == [0, 1, 1]


def test_destinations_are_checked_before_the_analysis(good_npz, tmp_path, capsys, no_work):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for argv, needle in [(["--json", str(a_file / "report.json")], "--json"),
                         (["--json", str(tmp_path)], "is a directory"),
                         (["--plot", str(a_file)], "not a directory"),
                         (["--plot", str(a_file / "figures")], "--plot")]:
        code, _, err = run_cli(["analyze", str(good_npz), *argv], capsys)
        assert_usage_error(code, err, needle)
    assert not (tmp_path / "figures").exists()


class _FakeReport:
    def format(self, labels):
        return "report of " + " ".join(labels)

    def to_dict(self):
        return {}


def test_analyze_accuracy_gets_the_mask_and_scale(good_npz, capsys, monkeypatch):
    import fmm_attention.accuracy as accuracy
    import fmm_attention.analysis as analysis

    seen = {}
    monkeypatch.setattr(analysis, "compare", lambda q, k, v, **kw: seen.setdefault("compare", kw) and _FakeReport())
    monkeypatch.setattr(accuracy, "accuracy_vs_cost", lambda q, k, v, **kw: seen.setdefault("accuracy", kw) and [])
    code, out, err = run_cli(["analyze", str(good_npz), "--accuracy", "--scale", "0.3", "--block-size", "8",
                              "--rank", "2", "--no-progress"], capsys)
    assert code == 0, err
    with np.load(good_npz) as data:
        mask = data["key_padding_mask"]
    for name in ("compare", "accuracy"):
        np.testing.assert_array_equal(seen[name]["key_padding_mask"], mask)
        assert seen[name]["scale"] == 0.3
    assert "with key_padding_mask" in out


def test_topk_oracle_honours_the_mask():
    from fmm_attention.accuracy import topk_attention

    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((3, 2, 24, 4))
    mask = np.ones((2, 24), bool)
    mask[0, 10:] = False
    mask[1, :] = False  # no valid key: zero output, as the library gives
    got = topk_attention(q, k, v, keys=24, key_padding_mask=mask, scale=0.7)
    want = api.exact_attention(q, k, v, key_padding_mask=mask, scale=0.7)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.all(got[1] == 0)


# --------------------------------------------------------------------------- help, version, name
def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"fmm-attention {fmm_attention.__version__}"


def test_prog_is_the_name_called_by(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/fmm-attention", "demo"])
    assert _cli.default_prog() == "fmm-attention"
    monkeypatch.setattr(sys, "argv", [str(Path(fmm_attention.__file__).parent / "__main__.py"), "demo"])
    assert _cli.default_prog() == "python -m fmm_attention"


@pytest.mark.parametrize("command", [None, *_cli.COMMANDS])
def test_help_is_plain_text_with_defaults(command, capsys):
    code, out, _ = run_cli(["--help"] if command is None else [command, "--help"], capsys)
    assert code == 0
    out = " ".join(out.split())  # undo argparse's wrapping
    assert "``" not in out and ":func:" not in out and ":class:" not in out and ":doc:" not in out
    if command in ("demo", "bench"):
        assert "(default: 1024 4096 16384 65536)" in out
    if command in ("demo", "analyze"):
        assert f"(default: {_config.DEFAULT_BLOCK_SIZE})" in out
    if command == "compile":
        assert "NUMBA_CACHE_DIR" in out


# --------------------------------------------------------------------------- progress
class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_one_line_per_step_without_a_tty():
    stream = io.StringIO()
    progress = _common.Progress(3, "demo", unit="row", stream=stream)
    for label in "abc":
        progress.update(label)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["demo: row 1/3 a", "demo: row 2/3 b", "demo: row 3/3 c"]
    assert "\r" not in stream.getvalue()


def test_progress_rewrites_one_line_on_a_tty():
    stream = _Tty()
    progress = _common.Progress(2, "analyze", unit="head", stream=stream)
    for _ in range(2):
        progress.update()
    progress.close()
    text = stream.getvalue()
    assert "\n" not in text and text.count("\r") == 4 and "analyze: head 2/2" in text
    assert text.endswith("\r") and text.rsplit("\r", 2)[1].strip() == ""  # cleared at the end


def test_progress_can_be_disabled():
    stream = io.StringIO()
    progress = _common.Progress(2, "x", stream=stream, enabled=False)
    progress.update()
    progress.close()
    assert stream.getvalue() == "" and progress.done == 1


def test_one_progress_implementation():
    # every command reports through _cli._common.Progress; none keeps its own
    package = Path(fmm_attention.__file__).parent
    for module in ("_cli/demo", "_cli/bench", "_cli/analyze", "_cli/compile", "_cli/__init__", "cli"):
        source = (package / f"{module}.py").read_text()
        assert "tqdm" not in source and "\\r" not in source, module


# --------------------------------------------------------------------------- demo
def test_demo_times_best_of_k_and_shows_progress(capsys, monkeypatch):
    calls = {}

    def fake(name):
        def call(q, k, v, *args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return np.asarray(v, dtype=np.float64) + (name != "exact_attention") * 1e-3

        return call

    for name in ("exact_attention", "fmm_attention", "fastformer_attention"):
        monkeypatch.setattr(api, name, fake(name))
    code, out, err = run_cli(["demo", "--n", "64", "--repeat", "3"], capsys)
    assert code == 0, err
    assert "best of up to 3 runs" in out
    rows = [line.split("  ") for line in out.splitlines() if line.strip().startswith(("exact ", "fma ", "fastformer "))]
    assert rows and all(row[-3].strip() == "3" for row in [[c for c in r if c] for r in rows])
    # per row: one warm-up (real-data methods), three timed runs, one memory probe
    assert calls["exact_attention"] == 1 + 2 * (3 + 1)
    steps = [line for line in err.splitlines() if line.startswith("demo: step ")]
    assert len(steps) == len(set(steps)) > 8 and steps[-1].startswith(f"demo: step {len(steps)}/{len(steps)}")


def test_best_time_max_time_caps_the_runs():
    runs = []
    assert perf.best_time(lambda: runs.append(1), repeat=5, max_time=0.0) >= 0
    assert len(runs) == 1
    runs.clear()
    perf.best_time(lambda: runs.append(1), repeat=4)
    assert len(runs) == 4


# --------------------------------------------------------------------------- bench
def _bench_args(**kw):
    base = dict(block_size=None, rank=None, repeat=3, numpy_max_n=10**9, backend="cpu", d=64, scaling=False)
    return argparse.Namespace(**dict(base, **kw))


def test_bench_tracks_the_library_default_and_32_2():
    labels = [(label, m, p) for label, m, p in _bench.configs(_bench_args())]
    assert labels == [(f"default {_config.DEFAULT_BLOCK_SIZE}/{_config.DEFAULT_RANK}", _config.DEFAULT_BLOCK_SIZE,
                       _config.DEFAULT_RANK), ("32/2", 32, 2)]
    assert _bench.configs(_bench_args(block_size=16)) == [(f"16/{_config.DEFAULT_RANK}", 16, _config.DEFAULT_RANK)]


def test_bench_scaling_honours_backend_and_repeat(capsys, monkeypatch):
    seen = []

    def fake_study(**kw):
        seen.append(kw)
        for n in perf.DEFAULT_SCALING_NS:
            kw["progress"](f"fma n={n}: 1.0 ms")
        return perf.Scaling(perf.DEFAULT_SCALING_NS, np.ones(len(perf.DEFAULT_SCALING_NS)), 1.0)

    monkeypatch.setattr(perf, "scaling_study", fake_study)
    monkeypatch.setattr(_bench, "_require_backend", lambda backend: None)
    code, out, err = run_cli(["bench", "--scaling", "--backend", "cuda", "--repeat", "7", "--d", "16"], capsys)
    assert code == 0, err
    assert len(seen) == 4  # two configurations x fine and coarse queries
    assert all(kw["backend"] == "cuda" and kw["repeat"] == 7 and kw["d"] == 16 for kw in seen)
    assert {(kw["block_size"], kw["rank"]) for kw in seen} == {(_config.DEFAULT_BLOCK_SIZE, _config.DEFAULT_RANK),
                                                               (32, 2)}
    assert "FMA default" in out and "FMA 32/2" in out
    assert len([line for line in err.splitlines() if line.startswith("bench: size ")]) == 4 * len(
        perf.DEFAULT_SCALING_NS)


def test_time_methods_alternates_order_and_splits_slow_runs(monkeypatch):
    log = []
    base = {"numpy": 3.0, "exact": 2.0, "fma a": 1.0, "fma b": 0.5}

    def fake_clock(call, *, repeat, min_time=0.0):
        log.append((call(), repeat, min_time))
        return base[log[-1][0]] + len(log)  # later runs slower

    monkeypatch.setattr(_bench, "best_time", fake_clock)  # NumPy's clock (never the GPU-synced one)
    args = _bench_args()
    calls = {name: (lambda name=name: name) for name in base}
    best = _bench._time_methods(args, fake_clock, 16384, calls)
    # n = 16384: NumPy and exact run once per round; each FMA twice with a time budget
    assert [entry[0] for entry in log] == ["numpy", "exact", "fma a", "fma b", "fma b", "fma a", "exact", "numpy"]
    assert [entry[1] for entry in log] == [1, 1, 3, 3, 3, 3, 1, 1]
    assert log[2][2] > 0 and log[3][2] > 0
    assert best == {"numpy": 3.0 + 1, "exact": 2.0 + 2, "fma a": 1.0 + 3, "fma b": 0.5 + 4}  # the first of each
    log.clear()
    _bench._time_methods(args, fake_clock, 65536, calls)
    assert [entry[0] for entry in log] == ["numpy", "exact", "fma a", "fma b", "fma b", "fma a"]
    log.clear()
    args.numpy_max_n = 1024
    best = _bench._time_methods(args, fake_clock, 4096, calls)
    assert np.isnan(best["numpy"]) and "numpy" not in [entry[0] for entry in log]


@pytest.mark.slow
def test_bench_smoke(capsys):
    code, out, err = run_cli(["bench", "--n", "256", "512", "--repeat", "1"], capsys)
    assert code == 0, err
    assert "NumPy float32 matmul (2048 x 2048)" in out
    rows = [[c.strip() for c in line.split("  ") if c.strip()] for line in out.splitlines()]
    main_rows = [r for r in rows if len(r) == 10 and r[0] in ("256", "512")]
    default = f"default {_config.DEFAULT_BLOCK_SIZE}/{_config.DEFAULT_RANK}"
    assert [(r[0], r[1]) for r in main_rows] == [("256", default), ("256", "32/2"), ("512", default), ("512", "32/2")]
    for row in main_rows:
        times = [float(x) for x in row[2:5]]
        assert all(np.isfinite(times)) and min(times) > 0
        assert row[9].endswith("%")
    assert "Cluster coarsening" in out and "Fastformer" in out
    assert "bench: size 2/4 n=512" in err and "bench: size 4/4 backward n=512" in err  # forward sizes, then backward


# --------------------------------------------------------------------------- compile
def test_compile_variants_cover_the_api(capsys, monkeypatch):
    """Every code path that selects other kernels is called, in both dtypes (stubs record)."""
    from fmm_attention import LearnedCoarsening
    import fmm_attention.analysis as analysis

    seen = []

    def record(name):
        def call(q, *args, **kw):
            seen.append((name, np.asarray(q).dtype.name, kw))

        return call

    for name in ("exact_attention", "fmm_attention", "fastformer_attention"):
        monkeypatch.setattr(api, name, record(name))
    monkeypatch.setattr(analysis, "compare", record("compare"))
    for variant in ("finite-check", "gradients", "decode"):  # they call the VJPs and the decoder, not these functions
        monkeypatch.setitem(_compile.VARIANTS, variant, (
            lambda dtype, variant=variant: seen.append((variant, np.dtype(dtype).name, {})),
            _compile.VARIANTS[variant][1]))
    code, out, err = run_cli(["compile", "--jobs", "1"], capsys)  # in-process: the stubs record
    assert code == 0, err
    assert len([line for line in err.splitlines() if line.startswith("compile: variant ")]) == len(
        _compile.jobs(list(_compile.VARIANTS), _compile.DTYPES))

    def has(name, dtype, **want):
        return any(n == name and dt == dtype and all(
            (kw.get(key) is not None) if value is ... else
            isinstance(kw.get(key), value) if isinstance(value, type) else kw.get(key, False) == value
            for key, value in want.items()) for n, dt, kw in seen)

    for dtype in ("float32", "float64"):
        for causal in (False, True):
            assert has("exact_attention", dtype, causal=causal)
            assert has("fmm_attention", dtype, causal=causal, key_padding_mask=...)
            assert has("fmm_attention", dtype, causal=causal, coarsening="cluster")
            assert has("fmm_attention", dtype, causal=causal, coarsening=LearnedCoarsening)
            assert has("fmm_attention", dtype, causal=causal, refine=8)
            assert has("fmm_attention", dtype, causal=causal, global_tokens=...)
            assert has("fastformer_attention", dtype, causal=causal, key_padding_mask=...)
        assert has("exact_attention", dtype, key_padding_mask=...)
        assert has("fmm_attention", dtype, query_coarsening=True, key_padding_mask=...)
    assert any(name == "compare" for name, _, _ in seen)
    for variant in ("finite-check", "gradients", "decode"):
        assert {dt for name, dt, _ in seen if name == variant} == {"float32", "float64"}
    assert "seconds" in out and "fma-learned" in out


def test_compile_list_names_every_variant(capsys):
    code, out, _ = run_cli(["compile", "--list"], capsys)
    assert code == 0
    assert all(name in out for name in _compile.VARIANTS)


def test_compile_really_compiles_a_subset(capsys):
    import importlib

    kernels = importlib.import_module("fmm_attention.cpu.fastformer")  # the module, not the function

    code, out, err = run_cli(["compile", "--only", "fastformer", "--dtype", "float64", "--no-progress"], capsys)
    assert code == 0, err
    assert err == ""
    assert "fastformer  float64" in out
    for kernel in (kernels.chunk_partials, kernels.modulate, kernels.causal_queries, kernels.causal_keys):
        assert any("float64" in str(sig) for sig in kernel.signatures), kernel


@pytest.mark.slow
def test_compile_jobs_runs_each_dtype_in_its_own_process(capsys, monkeypatch):
    """``--jobs 2``: both dtypes compiled (in spawned workers), rows in the requested order."""
    from fmm_attention.cpu import finite

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(fmm_attention.__file__).parents[1]),
                                                                    os.environ.get("PYTHONPATH")])))
    before = set(finite._max_exponent.signatures)
    code, out, err = run_cli(["compile", "--only", "finite-check", "--jobs", "2", "--no-progress"], capsys)
    assert code == 0, err
    lines = [line.split() for line in out.splitlines() if line.startswith("finite-check")]
    assert [line[1] for line in lines] == ["float32", "float64"]
    assert set(finite._max_exponent.signatures) == before  # the work ran in the workers


def test_compile_jobs_must_be_positive(capsys):
    code, _, err = run_cli(["compile", "--only", "finite-check", "--jobs", "0", "--no-progress"], capsys)
    assert_usage_error(code, err, "--jobs must be at least 1")


def test_user_input_turns_only_validation_errors_into_usage_errors():
    with pytest.raises(_common.UsageError, match="x: boom"):
        with _common.user_input("x: "):
            raise ValueError("boom")
    with pytest.raises(KeyError), _common.user_input():
        raise KeyError("a bug keeps its traceback")


def test_zip_without_arrays_is_reported(tmp_path, capsys, no_work):
    path = tmp_path / "other.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    code, _, err = run_cli(["analyze", str(path)], capsys)
    assert_usage_error(code, err, "lacks array(s) q, k, v")


def test_analyze_defaults_match_the_library():
    args = cli.build_parser("x").parse_args(["analyze", "f.npz"])
    assert (args.block_size, args.rank) == (_config.DEFAULT_BLOCK_SIZE, _config.DEFAULT_RANK)


_KERNEL_COVERAGE = r'''
import importlib, json, pkgutil, sys
import numpy as np
from numba.core.registry import CPUDispatcher
import fmm_attention
import fmm_attention.cpu as cpu
from fmm_attention import cli
from fmm_attention.cpu._launch import Threaded
from fmm_attention.analysis import bounds

assert cli.main(["compile", "--no-progress", "--jobs", "1"]) == 0  # in this process
kernels = {}
for info in pkgutil.iter_modules(cpu.__path__):
    module = importlib.import_module(f"fmm_attention.cpu.{info.name}")
    for name, obj in vars(module).items():
        # parallel loops, and serial nogil kernels (those on the library's threads)
        if (isinstance(obj, CPUDispatcher) and (obj.targetoptions.get("parallel") or obj.targetoptions.get("nogil"))
                and obj.__module__ == module.__name__):
            kernels[f"{info.name}.{name}"] = obj
        elif isinstance(obj, Threaded) and obj.kernel.__module__ == module.__name__:  # serial kernels on threads
            kernels[f"{info.name}.{name}"] = obj.kernel
kernels["analysis._bound_kernel"] = bounds._bound_kernel
report = {}
for name, kernel in kernels.items():
    report[name] = sorted({str(getattr(t, "dtype", "")) for sig in kernel.signatures for t in sig} - {""})
# Signatures of one jitted function (any, kernel or helper) that differ only in a literal
# integer or in an array's writeable flag: a whole compile for the same machine work.
from numba.core import types

def plain(t):
    t = types.unliteral(t)
    return t.copy(readonly=False) if isinstance(t, types.Array) else t

twins = []
for info in pkgutil.walk_packages(fmm_attention.__path__, "fmm_attention."):
    if info.name.endswith("__main__") or ".cuda" in info.name or ".interop" in info.name:
        continue
    module = importlib.import_module(info.name)
    for name, obj in vars(module).items():
        if isinstance(obj, CPUDispatcher) and obj.__module__ == module.__name__:
            seen = {}
            for sig in obj.signatures:
                key = tuple(plain(t) for t in sig)
                if key in seen:
                    twins.append(f"{info.name}.{name}: {seen[key]} and {sig}")
                seen[key] = sig
print(json.dumps({"dtypes": report, "twins": twins}))
'''


@pytest.mark.slow
def test_compile_reaches_every_parallel_kernel_in_both_dtypes(tmp_path):
    """In a fresh process with an empty cache: after ``compile`` every parallel CPU kernel
    has its variants, and no jitted function was compiled twice for the same work."""
    import json

    # An empty cache: a kernel loaded from it brings its callees compiled inside it, so only
    # a full compile shows every function's signatures.
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(fmm_attention.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _KERNEL_COVERAGE], capture_output=True, text=True, env=env,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # one compile per kernel and type: no literal-integer or read-only twin (see cpu/_jit.py)
    assert result["twins"] == []
    report = result["dtypes"]
    assert len(report) > 10
    # kernels on threads are covered too, and exact attention's forward has one kernel per
    # product path, each compiled for the dtypes that take it (by default none take BLAS's)
    assert {"blocks.block_attention", "backward.block_backward", "upward._mean_level", "exact.exact_tiles",
            "upward.learned_upward_level", "backward.learned_weight_grad"} <= set(report)
    micro = set(_config.EXACT_MICRO_KERNEL_DTYPES)
    per_dtype = {"exact.exact_tiles": micro, "exact.exact_tiles_blas": {"float32", "float64"} - micro}
    for name, dtypes in report.items():
        assert dtypes or per_dtype.get(name) == set(), f"{name} was never compiled"
        if name in per_dtype:
            assert per_dtype[name] <= set(dtypes), (name, dtypes)
        elif name.startswith("analysis."):
            assert "float64" in dtypes, name
        elif "float32" in dtypes or "float64" in dtypes:
            assert {"float32", "float64"} <= set(dtypes), (name, dtypes)
        else:  # the finite check works on the bits: one unsigned type per float width
            assert {"uint32", "uint64"} <= set(dtypes), (name, dtypes)


def test_errors_during_the_work_keep_their_traceback(capsys, monkeypatch):
    # A ValueError once the checks have passed is a bug: cli.main must not turn it into a usage error.
    def broken(*args, **kwargs):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(api, "exact_attention", broken)
    with pytest.raises(ValueError, match="internal inconsistency"):
        cli.main(["demo", "--n", "64", "--no-progress"])


def test_interrupt_is_one_line(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(_compile, "run", interrupted)
    code, _, err = run_cli(["compile"], capsys)
    assert code == 130 and err.strip() == "fmm-attention compile: interrupted"


# --------------------------------------------------------------------------- bench: SDPA and backward
def test_bench_says_when_torch_is_missing(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    call, note = _bench.torch_sdpa("cpu")
    assert call is None and "PyTorch is not installed" in note


def test_bench_compares_exact_with_cpu_sdpa_when_torch_is_installed():
    torch = pytest.importorskip("torch")
    call, note = _bench.torch_sdpa("cpu")
    assert call is not None and "CPU" in note and torch.__version__ in note
    q, k, v = perf.random_inputs(64, 8, heads=1)
    out = call(q, k, v)()
    assert np.allclose(out.numpy()[0], api.exact_attention(q, k, v), atol=1e-5)


def test_bench_times_cpu_sdpa_in_a_process_of_its_own():
    pytest.importorskip("torch")
    times = _bench._sdpa_in_own_process([32, 64], 8, 1)
    assert list(times) == [32, 64] and all(0 < t < 10 for t in times.values())


def test_bench_backward_rows_time_forward_and_pullback(monkeypatch):
    import fmm_attention.grad as grad

    pulled = []

    def fake_vjp(name):
        def vjp(q, k, v, **kw):
            return v, lambda g: pulled.append((name, g.shape))

        return vjp

    monkeypatch.setattr(grad, "exact_attention_vjp", fake_vjp("exact"))
    monkeypatch.setattr(grad, "fmm_attention_vjp", fake_vjp("fma"))
    monkeypatch.setattr(api, "exact_attention", lambda q, k, v, **kw: v)
    monkeypatch.setattr(api, "fmm_attention", lambda q, k, v, **kw: v)

    def fake_clock(fn, **kw):  # fn: partial(pullback, g) or partial(forward, q, k, v)
        fn()
        return 0.004 if len(fn.args) == 1 else 0.002

    monkeypatch.setattr(_bench, "best_time", fake_clock)
    progress = _common.Progress(2, "bench", enabled=False)
    rows = _bench._bench_backward(_bench_args(n=[64, 128]), ("32/2", 32, 2), progress)
    assert [(r[0], r[1]) for r in rows] == [(64, "exact"), (64, "fma 32/2"), (128, "exact"), (128, "fma 32/2")]
    assert all(r[2:] == ["2.00", "4.00", "2.00"] for r in rows)  # forward ms, backward ms, backward / forward
    assert ("exact", (1, 64, 64)) in pulled and ("fma", (1, 128, 64)) in pulled and progress.done == 2
