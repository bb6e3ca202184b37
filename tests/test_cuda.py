"""The CUDA backend against the CPU backend.

CI runs this module under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set in
``conftest.py`` unless ``FMM_ATTENTION_REAL_GPU=1``). The simulator runs every CUDA thread
as a Python thread (about 1000x slower than compiled code), so the sizes are tiny
(n <= 64, d <= 8) and the launch knobs are patched small so that several blocks, several
query tiles per block and several key tiles per query still run.

Tolerances: the CUDA results equal the CPU backend's to 1e-12 in float64 and 1e-5 in
float32, relative to the largest magnitude of the compared array.
"""

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fmm_attention as fa
from fmm_attention import LearnedCoarsening, _config, build_tree
from fmm_attention.backends import BackendNotSupportedError


def _numba_cuda_missing():
    """Why the CUDA target is unusable here, or None: the ``numba-cuda`` package is required.

    numba itself still ships a deprecated ``numba.cuda`` that imports without ``numba-cuda``
    but lacks what the kernels use (``get_current_device``...), so importing is no test.
    """
    try:
        importlib.metadata.version("numba-cuda")
    except importlib.metadata.PackageNotFoundError:
        return "the numba-cuda package is not installed (pip install -e '.[cuda]')"
    return None


def _unavailable():
    missing = _numba_cuda_missing()
    if missing is not None:
        return missing
    try:
        from fmm_attention import cuda as fcuda

        fcuda.require()
    except RuntimeError as exc:
        return str(exc)
    return None


REASON = _unavailable()
needs_cuda = pytest.mark.skipif(REASON is not None, reason=f"CUDA backend unavailable: {REASON}")
needs_numba_cuda = pytest.mark.skipif(_numba_cuda_missing() is not None, reason=f"{_numba_cuda_missing()}")
fastformer_attention = fa.fastformer_attention


@pytest.fixture(autouse=True, scope="module")
def small_launches():
    """Small blocks and tiles, and quick thread switches for the simulator's barriers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_config, "CUDA_THREADS_PER_BLOCK", 4)
        mp.setattr(_config, "CUDA_QUERY_TILE", 4)
        mp.setattr(_config, "CUDA_KEY_TILE", 4)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)  # the simulator's block manager polls; 5 ms switches dominate
        try:
            yield
        finally:
            sys.setswitchinterval(interval)


@pytest.fixture(scope="module")
def device():
    """``(fmm_attention.cuda, numba.cuda, simulator?)``."""
    from fmm_attention import cuda as fcuda
    from fmm_attention.cuda import _device

    return fcuda, _device.cuda_module(), _device.simulator()


def tol(dtype):
    return 1e-12 if np.dtype(dtype) == np.float64 else 1e-5


def assert_matches(gpu, cpu):
    """``gpu`` equals ``cpu`` to the backend tolerance (same dtype, same infinities)."""
    assert isinstance(gpu, np.ndarray), type(gpu)
    assert gpu.dtype == cpu.dtype and gpu.shape == cpu.shape
    finite = np.isfinite(cpu)
    np.testing.assert_array_equal(np.isfinite(gpu), finite)
    np.testing.assert_array_equal(gpu[~finite], cpu[~finite])
    if finite.any():
        t = tol(cpu.dtype)
        np.testing.assert_allclose(gpu[finite], cpu[finite], rtol=t, atol=t * np.abs(cpu[finite]).max())


def inputs(shape, dv=None, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    *lead, n, d = shape
    q = rng.standard_normal(shape)
    k = rng.standard_normal(shape)
    v = rng.standard_normal((*lead, n, dv or d))
    return tuple(x.astype(dtype) for x in (q, k, v))


def padding(lead, n, seed=1, dead=True):
    """Return a random key mask; with ``dead`` one batch entry has no valid key at all."""
    mask = np.random.default_rng(seed).random((*lead, n)) > 0.3
    if dead:
        mask.reshape(-1, n)[0] = False
    return mask


def both(fn, *args, **kwargs):
    """``fn`` on the CUDA and on the CPU backend."""
    return fn(*args, backend="cuda", **kwargs), fn(*args, backend="cpu", **kwargs)


def learned(tree, d, dv, seed=2):
    rng = np.random.default_rng(seed)
    kw, vw, kb, vb = [], [], [], []
    for lv in tree.levels:
        kw.append(rng.standard_normal((lv.rank * d, 1, lv.box_size)) / lv.box_size)
        vw.append(rng.standard_normal((lv.rank * dv, 1, lv.box_size)) / lv.box_size)
        kb.append(0.1 * rng.standard_normal(lv.rank * d))
        vb.append(0.1 * rng.standard_normal(lv.rank * dv))
    return LearnedCoarsening(kw, vw, kb, vb)


# ---------------------------------------------------------------- availability
def test_require_error_without_numba_cuda(monkeypatch):
    from fmm_attention.cuda import _device

    def broken():
        raise ImportError("No module named 'numba.cuda'")

    monkeypatch.setattr(_device, "_import_cuda", broken)
    with pytest.raises(RuntimeError, match=r"fmm_attention\[cuda\]"):
        _device.require()
    x = np.ones((8, 2))
    with pytest.raises(RuntimeError, match="numba-cuda"):
        fa.exact_attention(x, x, x, backend="cuda")


@needs_cuda
def test_require_error_without_gpu(monkeypatch, device):
    fcuda, cuda, _ = device
    from fmm_attention.cuda import _device

    monkeypatch.setattr(_device, "simulator", lambda: False)
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no usable CUDA GPU"):
        fcuda.require()
    x = np.ones((8, 2))
    with pytest.raises(RuntimeError, match="backend='cpu'"):
        fa.fmm_attention(x, x, x, backend="cuda")


@needs_cuda
def test_require_and_synchronize_pass(device):
    fcuda, _, _ = device
    fcuda.require()
    fcuda.synchronize()


def test_cpu_backend_never_imports_numba_cuda():
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import fmm_attention as fa
        x = np.random.default_rng(0).standard_normal((2, 24, 4))
        fa.exact_attention(x, x, x)
        fa.fmm_attention(x, x, x, block_size=2, rank=2)
        fa.fmm_attention(x, x, x, block_size=2, rank=2, backend="cpu", query_coarsening=True)
        fa.fastformer_attention(x, x, x, x[:, 0], x[:, 1])
        loaded = [m for m in ("numba.cuda", "fmm_attention.cuda") if m in sys.modules]
        assert not loaded, loaded
        print("clean")
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout


PTX_SCRIPT = """
import sys

from numba import cuda, types as t


def probe(x):
    x[0] = 1.0


try:  # compile_ptx needs NVVM (the CUDA toolkit), not a GPU
    cuda.compile_ptx(probe, (t.float32[::1],), cc=(8, 0))
except Exception:
    try:  # a toolkit without NVRTC: numba asks it only for the list of architectures
        import numba.cuda.cuda_paths as cuda_paths
        import numba.cuda.cudadrv.nvrtc as nvrtc

        nvrtc.find_closest_arch = lambda cc: cc
        cuda_paths._get_nvrtc_path = lambda: ("none", None)
        cuda.compile_ptx(probe, (t.float32[::1],), cc=(8, 0))
    except Exception as exc:
        print("SKIP", type(exc).__name__, exc)
        sys.exit(0)

from fmm_attention.cuda import _attention, fastformer, fma

f = t.float32
A1, A2, A3 = (t.Array(f, nd, "C") for nd in (1, 2, 3))
B2, I1, I2 = t.Array(t.boolean, 2, "C"), t.Array(t.int64, 1, "C"), t.Array(t.int64, 2, "C")
i, b = t.int64, t.boolean
K, F = fma.kernels("float32"), fastformer.kernels("float32")
launches = {  # the argument types of every launch in the package
    "nonfinite": (_attention.nonfinite, (A1, t.Array(t.int32, 1, "C"))),
    "attention": (_attention.attention_kernel("float32"),
                  (A3, A3, A3, B2, b, A3, A3, A2, I1, I2, b, i, i, i, b, f, b, A2, A2, A3, A3, A2)),
    "mean_upward_level": (K.mean_upward_level, (A3, A3, B2, b, i, i, i, i, i, i, b, A3, A3, A2, A2)),
    "learned_upward_level": (K.learned_upward_level, (A3, A3, B2, b, A2, A1, A2, A1, i, i, i, i, b, A3, A3, A2)),
    "coarse_queries_level": (K.coarse_queries_level, (A3, B2, b, i, i, i, i, i, A3, I2)),
    "far_partials": (K.far_partials, (A3, I2, A3, A3, A2, I1, I1, I2, f, A2, A2, A3)),
    "downward_level": (K.downward_level, (i, i, i, A2, A2, A3)),
    "scaled_vector": (F.scaled_vector, (A2, f, A2)),
    "key_vector": (F.key_vector, (A2, A2, f, A2)),
    "logits": (F.logits, (A3, A3, b, A2, B2, b, A2)),
    "chunk_max_sum": (F.chunk_max_sum, (A2, i, A2, A2, A2)),
    "chunk_vec": (F.chunk_vec, (A3, A3, b, A2, i, A3)),
    "merge": (F.merge, (A2, A2, A3, A2)),
    "carry_scan": (F.carry_scan, (A2, A2, A3, A2, A2, A3)),
    "chunk_scan": (F.chunk_scan, (A3, A3, b, A2, i, A2, A2, A3, A3)),
    "hadamard": (F.hadamard, (A2, A2, A2)),
    "modulate": (F.modulate, (A3, b, A3, A3)),
    "gather_rows": (F.gather_rows, (A2, I1, A2)),
}
failed = 0
for name, (kernel, sig) in launches.items():
    try:
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(8, 0))
        assert ".f64" not in ptx, "float64 arithmetic in a float32 kernel"
    except Exception as exc:
        failed += 1
        print("FAIL", name, type(exc).__name__, exc)
print("compiled", len(launches) - failed, "of", len(launches))
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
@needs_numba_cuda
def test_kernels_compile_for_a_real_gpu():
    """The simulator never types the kernels: compile each one to PTX (sm_80), no GPU needed.

    Also checks that the float32 kernels contain no float64 arithmetic. Skipped without the
    CUDA toolkit's NVVM.
    """
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-c", PTX_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if result.stdout.startswith("SKIP"):
        pytest.skip(f"cannot compile PTX here: {result.stdout.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compiled 18 of 18" in result.stdout


# ---------------------------------------------------------------- exact attention
@needs_cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_matches_cpu(dtype, causal):
    q, k, v = inputs((2, 23, 4), dv=3, dtype=dtype)
    mask = padding((2,), 23)
    (out, lse), (ref, ref_lse) = both(
        fa.exact_attention, q, k, v, causal=causal, key_padding_mask=mask, return_lse=True
    )
    assert_matches(out, ref)
    assert_matches(lse, ref_lse)
    assert np.all(out[0] == 0) and np.all(lse[0] == -np.inf)  # no valid key: zeros, -inf


@needs_cuda
def test_exact_leading_dims_and_scale():
    q, k, v = inputs((2, 1, 13, 3), dv=5)
    out, ref = both(fa.exact_attention, q, k, v, scale=0.7)
    assert_matches(out, ref)


# ---------------------------------------------------------------- FMA
FMA_CASES = [  # causal, query_coarsening, dtype
    (False, False, np.float64),
    (True, False, np.float64),
    (False, True, np.float64),
    (False, False, np.float32),
    (True, False, np.float32),
    (False, True, np.float32),
]


@needs_cuda
@pytest.mark.parametrize("causal, query_coarsening, dtype", FMA_CASES)
def test_fmm_mean_matches_cpu(causal, query_coarsening, dtype):
    # n = 37 pads to N = 64: three far levels of 4, 8 and 16 tokens, a partly padded block.
    q, k, v = inputs((2, 37, 4), dv=3, dtype=dtype, seed=3)
    mask = padding((2,), 37, dead=False)
    (out, lse), (ref, ref_lse) = both(
        fa.fmm_attention, q, k, v, causal=causal, block_size=4, rank=2,
        query_coarsening=query_coarsening, key_padding_mask=mask, return_lse=True,
    )
    assert_matches(out, ref)
    assert_matches(lse, ref_lse)


@needs_cuda
@pytest.mark.parametrize("causal, query_coarsening", [(False, False), (True, False), (False, True)])
def test_fmm_learned_matches_cpu(causal, query_coarsening):
    q, k, v = inputs((2, 29, 3), dv=2, seed=4)
    tree = build_tree(29, block_size=4, rank=2, causal=causal)
    coarsening = learned(tree, 3, 2)
    mask = padding((2,), 29, dead=False)
    (out, lse), (ref, ref_lse) = both(
        fa.fmm_attention, q, k, v, causal=causal, block_size=4, rank=2, coarsening=coarsening,
        query_coarsening=query_coarsening, key_padding_mask=mask, return_lse=True,
    )
    assert_matches(out, ref)
    assert_matches(lse, ref_lse)


@needs_cuda
def test_fmm_options_match_cpu():
    """No count scaling, a rank above some box sizes, a dead batch entry, a custom scale."""
    q, k, v = inputs((2, 21, 3), seed=5)
    mask = padding((2,), 21)
    (out, lse), (ref, ref_lse) = both(
        fa.fmm_attention, q, k, v, block_size=2, rank=4, count_scaling=False, scale=0.9,
        key_padding_mask=mask, return_lse=True,
    )
    assert_matches(out, ref)
    assert_matches(lse, ref_lse)
    assert np.all(out[0] == 0) and np.all(lse[0] == -np.inf)


@needs_cuda
def test_fmm_full_rank_is_exact():
    """With rank >= N/4 and mean coarsening FMA is exact attention (spec property 2), on the GPU."""
    q, k, v = inputs((19, 3), seed=6)
    for causal in (False, True):
        fmm = fa.fmm_attention(q, k, v, causal=causal, block_size=2, rank=8, backend="cuda")
        exact = fa.exact_attention(q, k, v, causal=causal, backend="cuda")
        np.testing.assert_allclose(fmm, exact, rtol=1e-12, atol=1e-12)


@needs_cuda
def test_fmm_rejects_coarse_queries_with_causal(device):
    fcuda, _, _ = device
    x = np.ones((8, 2))
    with pytest.raises(ValueError, match="query_coarsening"):
        fcuda.fmm_attention(x, x, x, causal=True, query_coarsening=True, block_size=2, rank=2)


@needs_cuda
def test_unsupported_coarsening_is_refused(device):
    fcuda, _, _ = device
    x = np.ones((8, 2))
    with pytest.raises(ValueError, match="coarsening"):
        fcuda.fmm_attention(x, x, x, block_size=2, rank=2, coarsening="cluster")
    with pytest.raises(ValueError, match="coarsening"):
        fcuda.fmm_attention(x, x, x, block_size=2, rank=2, coarsening="median")


@needs_cuda
def test_learned_weights_must_fit_the_tree():
    q, k, v = inputs((29, 3), dv=2)
    coarsening = learned(build_tree(29, block_size=4, rank=2), 3, 2)
    with pytest.raises(ValueError, match="levels"):
        fa.fmm_attention(q, k, v, block_size=2, rank=2, coarsening=coarsening, backend="cuda")


# ---------------------------------------------------------------- launch shape, determinism
@needs_cuda
def test_deterministic_and_independent_of_grid_size(monkeypatch):
    from fmm_attention.cuda import _device

    q, k, v = inputs((2, 26, 3), seed=7)
    kwargs = dict(block_size=4, rank=2, backend="cuda", return_lse=True)
    first = fa.fmm_attention(q, k, v, **kwargs)
    again = fa.fmm_attention(q, k, v, **kwargs)
    monkeypatch.setattr(_config, "CUDA_MAX_BLOCKS", 1)  # one block strides over every job (read at call time)
    assert _device.grid(1000, 4) == 1
    strided = fa.fmm_attention(q, k, v, **kwargs)
    for a, b, c in zip(first, again, strided, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


@needs_cuda
def test_tile_sizes_change_nothing_but_rounding(monkeypatch):
    q, k, v = inputs((1, 26, 3), seed=8)
    ref = fa.exact_attention(q, k, v, causal=True, backend="cpu")
    for rows, keys in ((1, 1), (3, 5), (8, 32)):
        monkeypatch.setattr(_config, "CUDA_QUERY_TILE", rows)
        monkeypatch.setattr(_config, "CUDA_KEY_TILE", keys)
        assert_matches(fa.exact_attention(q, k, v, causal=True, backend="cuda"), ref)


def test_tiles_shrink_to_fit_shared_memory(monkeypatch):
    from fmm_attention.cuda import _device

    monkeypatch.setattr(_config, "CUDA_QUERY_TILE", 32)
    monkeypatch.setattr(_config, "CUDA_KEY_TILE", 32)
    small = _device.attention_tiles(64, 64, 4, max_rows=1024)
    assert (small.rows, small.keys) == (32, 32) and small.shared_bytes <= _config.CUDA_SHARED_MEMORY_BYTES
    assert _device.attention_tiles(64, 64, 4, max_rows=8).rows == 8  # never more rows than the block
    big = _device.attention_tiles(512, 512, 8, max_rows=1024)
    assert big.shared_bytes <= _config.CUDA_SHARED_MEMORY_BYTES and big.rows >= 1 and big.keys >= 1
    with pytest.raises(ValueError, match="too large"):
        _device.attention_tiles(4096, 4096, 8, max_rows=32)
    monkeypatch.setattr(_config, "CUDA_SHARED_MEMORY_BYTES", small.shared_bytes // 2)  # read at call time
    assert _device.attention_tiles(64, 64, 4, max_rows=1024).shared_bytes <= small.shared_bytes // 2
    monkeypatch.setattr(_config, "CUDA_KEY_TILE", 0)
    with pytest.raises(ValueError, match="CUDA_KEY_TILE"):
        _device.attention_tiles(8, 8, 4, max_rows=32)


# ---------------------------------------------------------------- device arrays
class CudaArrayLike:
    """Exposes nothing but ``__cuda_array_interface__``, like CuPy arrays and torch tensors."""

    def __init__(self, host):
        from fmm_attention.cuda import _device

        self._device = _device.cuda_module().to_device(np.ascontiguousarray(host))
        self._simulated = _device.simulator()
        self._host = host

    @property
    def __cuda_array_interface__(self):
        if not self._simulated:
            return self._device.__cuda_array_interface__
        ary = self._device._ary  # the simulator's "device" memory is a NumPy array
        return {"shape": ary.shape, "typestr": ary.dtype.str, "data": (ary.ctypes.data, False),
                "strides": None, "version": 3}


@needs_cuda
def test_device_arrays_in_device_arrays_out(device):
    fcuda, cuda, _ = device
    from fmm_attention.cuda import _device

    q, k, v = inputs((2, 22, 3), dv=2, dtype=np.float32, seed=9)
    mask = padding((2,), 22, dead=False)
    dq, dk, dv, dmask = (cuda.to_device(x) for x in (q, k, v, mask))
    out, lse = fcuda.fmm_attention(dq, dk, dv, block_size=4, rank=2, key_padding_mask=dmask, return_lse=True)
    assert _device.is_device_array(out) and _device.is_device_array(lse)
    assert not isinstance(out, np.ndarray)
    assert out.shape == (2, 22, 2) and out.dtype == np.float32
    ref, ref_lse = fa.fmm_attention(q, k, v, block_size=4, rank=2, key_padding_mask=mask, return_lse=True, backend="cpu")
    assert_matches(out.copy_to_host(), ref)
    assert_matches(lse.copy_to_host(), ref_lse)
    exact = fcuda.exact_attention(dq, dk, dv, causal=True)
    assert _device.is_device_array(exact)
    assert_matches(exact.copy_to_host(), fa.exact_attention(q, k, v, causal=True, backend="cpu"))


@needs_cuda
def test_cuda_array_interface_inputs_dispatch_automatically(device):
    """Objects with ``__cuda_array_interface__`` go to the GPU under ``backend="auto"``."""
    from fmm_attention.cuda import _device

    q, k, v = inputs((1, 2, 17, 3), seed=10)
    mask = padding((1, 2), 17, dead=False)
    wrapped = [CudaArrayLike(x) for x in (q, k, v)]
    out = fa.fmm_attention(*wrapped, block_size=2, rank=2, query_coarsening=True, key_padding_mask=CudaArrayLike(mask))
    assert _device.is_device_array(out) and out.shape == (1, 2, 17, 3)
    ref = fa.fmm_attention(q, k, v, block_size=2, rank=2, query_coarsening=True, key_padding_mask=mask, backend="cpu")
    assert_matches(out.copy_to_host(), ref)


@needs_cuda
def test_device_input_validation(device):
    fcuda, cuda, _ = device
    q, k, v = inputs((2, 12, 3))
    dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
    with pytest.raises(TypeError, match="v is a host array"):
        fcuda.exact_attention(dq, dk, v)
    with pytest.raises(TypeError, match="float32 or float64"):
        fcuda.exact_attention(cuda.to_device(q.astype(np.float16)), dk, dv)
    with pytest.raises(TypeError, match="share one dtype"):
        fcuda.exact_attention(cuda.to_device(q.astype(np.float32)), dk, dv)
    with pytest.raises(ValueError, match="non-contiguous"):  # every other row of a doubled q: q's shape
        fcuda.exact_attention(cuda.to_device(np.repeat(q, 2, axis=1))[:, ::2], dk, dv)
    with pytest.raises(ValueError, match="same sequence length"):
        fcuda.exact_attention(dq, cuda.to_device(k[:, :5].copy()), dv)
    with pytest.raises(BackendNotSupportedError, match=r"n_q != n_k"):  # cross lengths: CPU only
        fcuda.exact_attention(dq, cuda.to_device(k[:, :5].copy()), cuda.to_device(v[:, :5].copy()))
    with pytest.raises(ValueError, match="feature dim d"):
        fcuda.exact_attention(dq, cuda.to_device(k[..., :2].copy()), dv)
    with pytest.raises(ValueError, match="at least 2 dims"):
        fcuda.exact_attention(cuda.to_device(q[0, 0]), dk, dv)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        fcuda.exact_attention(dq, dk, dv, key_padding_mask=cuda.to_device(np.ones((2, 12))))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 12\)"):
        fcuda.exact_attention(dq, dk, dv, key_padding_mask=cuda.to_device(np.ones((2, 11), bool)))
    bad = q.copy()
    bad[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match="q contains NaN"):
        fcuda.exact_attention(cuda.to_device(bad), dk, dv)
    with pytest.raises(TypeError, match="check_finite"):
        fcuda.exact_attention(dq, dk, dv, check_finite=1)


@needs_cuda
def test_host_validation_is_shared_with_cpu():
    x = np.ones((8, 2))
    with pytest.raises(TypeError, match="q must have a real floating dtype"):
        fa.exact_attention(np.ones((8, 2), dtype=np.int64), x, x, backend="cuda")
    with pytest.raises(ValueError, match="k contains NaN"):
        fa.fmm_attention(x, np.full((8, 2), np.inf), x, backend="cuda")
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        fa.fmm_attention(x, x, x, block_size=3, backend="cuda")


@needs_cuda
def test_empty_batch_and_float16_host_inputs(device):
    fcuda, _, _ = device
    q = np.ones((0, 3, 8, 2))
    out, lse = fcuda.fmm_attention(q, q, q, block_size=2, rank=2, return_lse=True)
    assert out.shape == (0, 3, 8, 2) and lse.shape == (0, 3, 8)
    h = inputs((9, 2), dtype=np.float16)
    out, ref = both(fa.exact_attention, *h)
    assert out.dtype == np.float32
    assert_matches(out, ref)


# ---------------------------------------------------------------- Fastformer
def fastformer_inputs(dtype, seed=11):
    q, k, v = inputs((2, 2, 21, 3), dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 1)
    w_q, w_k = (rng.standard_normal((2, 3)).astype(dtype) for _ in range(2))  # one vector per head
    return q, k, v, w_q, w_k


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_fastformer_matches_cpu(dtype, causal):
    q, k, v, w_q, w_k = fastformer_inputs(dtype)
    mask = padding((2, 2), 21)  # one entry without any valid position: zero pools and output
    gpu, cpu = both(fastformer_attention, q, k, v, w_q, w_k, causal=causal, key_padding_mask=mask, return_pools=True)
    for a, b in zip(gpu, cpu, strict=True):
        assert_matches(a, b)
    assert np.all(gpu[0][0, 0] == 0)


@needs_cuda
def test_fastformer_device_arrays_and_large_logits(device):
    fcuda, cuda, _ = device
    from fmm_attention.cuda import _device

    q, k, v, w_q, w_k = fastformer_inputs(np.float64, seed=12)
    q = q * 1e4  # logits of size 1e4: neither overflow nor NaN
    dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
    dw_q = cuda.to_device(w_q[:1].astype(np.float32))  # broadcast (1, d) and cast on the device
    for causal in (False, True):
        u, qg, kg = fcuda.fastformer_attention(dq, dk, dv, dw_q, cuda.to_device(w_k), causal=causal, return_pools=True)
        assert all(_device.is_device_array(x) for x in (u, qg, kg))
        ref = fastformer_attention(q, k, v, w_q[:1].astype(np.float32), w_k, causal=causal, return_pools=True, backend="cpu")
        for a, b in zip((u, qg, kg), ref, strict=True):
            host = a.copy_to_host()
            assert np.isfinite(host).all()
            assert_matches(host, b)
    with pytest.raises(ValueError, match="does not broadcast"):
        fcuda.fastformer_attention(dq, dk, dv, cuda.to_device(np.ones((3, 3))), cuda.to_device(w_k))
    with pytest.raises(ValueError, match="feature dim d"):
        fcuda.fastformer_attention(dq, dk, cuda.to_device(v[..., :2].copy()), dw_q, dw_q)
