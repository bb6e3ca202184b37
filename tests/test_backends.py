"""The backend registry and FMMOptions.

A toy backend written here, in plain NumPy over the oracles of ``reference.py``, is
registered and run through the public functions: the library needs no edit to accept a
backend, and asking one for what it does not declare fails with one error naming it and
the option.
"""

import numpy as np
import pytest

import reference
from fmm_attention import LearnedCoarsening, exact_attention, fastformer_attention, fmm_attention
from fmm_attention import backends
from fmm_attention.options import FMMOptions


class ToyBackend(backends.Backend):
    """Dense NumPy attention, one head at a time; FMA with mean coarsening and fine queries only."""

    name = "toy"
    title = "NumPy toy"
    supports = frozenset({"exact", "fmm", "fastformer"})
    coarsenings = frozenset({"mean"})
    fmm_features = frozenset()

    def __init__(self):
        self.calls = []

    @staticmethod
    def _valid(batch, b):
        return None if batch.valid is None else batch.valid[b]

    def exact(self, batch, *, causal):
        self.calls.append("exact")
        pairs = [reference.exact_reference(batch.q[b], batch.k[b], batch.v[b], causal=causal, scale=batch.scale,
                                           valid=self._valid(batch, b)) for b in range(batch.q.shape[0])]
        return (np.array([o for o, _ in pairs], dtype=batch.dtype).reshape(batch.q.shape[:2] + (batch.dv,)),
                np.array([lse for _, lse in pairs], dtype=batch.dtype).reshape(batch.q.shape[:2]))

    def fmm(self, batch, tree, options):
        self.calls.append(("fmm", options))
        pairs = [reference.fma_reference(batch.q[b], batch.k[b], batch.v[b], block_size=tree.block_size,
                                         rank=tree.rank, causal=options.causal, scale=batch.scale,
                                         valid=self._valid(batch, b), count_scaling=options.count_scaling)
                 for b in range(batch.q.shape[0])]
        out = np.array([o for o, _ in pairs], dtype=batch.dtype).reshape(batch.q.shape[:2] + (batch.dv,))
        lse = np.array([lse for _, lse in pairs], dtype=batch.dtype).reshape(batch.q.shape[:2])
        return out, lse, None

    def fastformer(self, batch, w_q, w_k, *, causal, return_pools):
        self.calls.append("fastformer")
        rows = [reference.fastformer_reference(batch.q[b], batch.k[b], batch.v[b], w_q[b], w_k[b], causal=causal,
                                               scale=batch.scale, valid=self._valid(batch, b))
                for b in range(batch.q.shape[0])]
        return tuple(np.array([r[i] for r in rows], dtype=batch.dtype) for i in range(3))


@pytest.fixture
def toy():
    backend = backends.register_backend(ToyBackend())
    yield backend
    backends.unregister_backend("toy")


def qkv(lead, n, d=4, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(lead + (n, d)).astype(dtype) for _ in range(3))


@pytest.mark.parametrize("causal", [False, True])
def test_toy_exact_matches_cpu(toy, causal):
    q, k, v = qkv((2, 3), 37)
    mask = np.random.default_rng(1).random((2, 3, 37)) > 0.3
    opts = dict(causal=causal, key_padding_mask=mask, return_lse=True)
    out, lse = exact_attention(q, k, v, backend="toy", **opts)
    want, want_lse = exact_attention(q, k, v, backend="cpu", **opts)
    assert toy.calls == ["exact"]
    assert out.shape == want.shape and lse.shape == want_lse.shape
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_toy_fmm_matches_cpu_and_receives_the_options(toy, causal):
    q, k, v = qkv((2,), 40, seed=2)
    opts = dict(causal=causal, block_size=4, rank=2, return_lse=True)
    out, lse = fmm_attention(q, k, v, backend="toy", **opts)
    want, want_lse = fmm_attention(q, k, v, backend="cpu", **opts)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-10, atol=1e-12)
    ((op, options),) = toy.calls
    assert op == "fmm" and options == FMMOptions.create(causal=causal, block_size=4, rank=2)


def test_toy_fastformer_matches_cpu(toy):
    q, k, v = qkv((2, 3), 19, seed=3)
    w_q, w_k = np.random.default_rng(4).standard_normal((2, 3, 4))
    got = fastformer_attention(q, k, v, w_q, w_k, causal=True, backend="toy", return_pools=True)
    want = fastformer_attention(q, k, v, w_q, w_k, causal=True, backend="cpu", return_pools=True)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options, named", [
    (dict(refine=4), "refine > 0"),
    (dict(coarsening="cluster"), "coarsening='cluster'"),
    (dict(global_tokens=[0]), "global_tokens"),
    (dict(query_coarsening=True), "query_coarsening=True"),
    (dict(return_stats=True), "return_stats=True"),
])
def test_toy_names_itself_and_the_unsupported_option(toy, options, named):
    q, k, v = qkv((), 16)
    with pytest.raises(ValueError, match=r"backend 'toy' \(NumPy toy\) does not support " + named.replace(
            "(", r"\(").replace(")", r"\)") + r".*use backend='cpu'") as info:
        fmm_attention(q, k, v, block_size=4, rank=2, backend="toy", **options)
    assert isinstance(info.value, backends.BackendNotSupportedError)
    assert toy.calls == []  # refused before any work


def test_toy_refuses_learned_coarsening_and_operations_it_lacks(toy):
    q, k, v = qkv((), 16)
    coarse = LearnedCoarsening([np.ones((8, 1, 4))], [np.ones((8, 1, 4))])
    with pytest.raises(ValueError, match="backend 'toy'.*a LearnedCoarsening"):
        fmm_attention(q, k, v, block_size=4, rank=2, coarsening=coarse, backend="toy")
    from fmm_attention import exact_attention_vjp

    with pytest.raises(ValueError, match=r"backend 'toy' .*gradients \(backward\); use backend='cpu'"):
        exact_attention_vjp(q, k, v, backend="toy")


def test_registry_names_and_errors(toy):
    assert backends.available_backends() == ("auto", "cpu", "cuda", "toy")
    assert backends.get_backend("toy") is toy
    assert backends.resolve("auto", np.zeros((2, 2))) == "cpu"  # a host backend never claims "auto"
    with pytest.raises(ValueError, match="already registered"):
        backends.register_backend(ToyBackend())
    with pytest.raises(TypeError, match="Backend instance"):
        backends.register_backend(object())
    with pytest.raises(ValueError, match="cannot be unregistered"):
        backends.unregister_backend("cpu")
    q, k, v = qkv((), 8)
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'cpu', 'cuda', 'toy'; got 'tpu'"):
        exact_attention(q, k, v, backend="tpu")


def test_cuda_capabilities_are_declared_without_importing_it():
    # a fresh process: in this one another test may have imported numba.cuda already
    import os
    import subprocess
    import sys
    from pathlib import Path

    import fmm_attention

    code = (
        "import sys\n"
        "from fmm_attention import backends\n"
        "from fmm_attention.options import FMMOptions\n"
        "cuda = backends.get_backend('cuda')\n"
        "assert cuda.not_supported('fmm', FMMOptions.create(refine=3)) == 'refine > 0'\n"
        "assert cuda.not_supported('backward') == 'gradients (backward)'\n"
        "assert cuda.not_supported('fmm', FMMOptions.create()) is None\n"
        "assert backends.resolve('auto', [1.0]) == 'cpu'\n"
        "loaded = [m for m in sys.modules if m == 'numba.cuda' or m.startswith(('numba.cuda.', 'fmm_attention.cuda'))]\n"
        "assert not loaded, loaded\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(fmm_attention.__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_toy_backend_removed_is_gone():
    backends.register_backend(ToyBackend())
    backends.unregister_backend("toy")
    q, k, v = qkv((), 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        exact_attention(q, k, v, backend="toy")


# ---------------------------------------------------------------- FMMOptions
def test_options_are_hashable_and_equal_for_equal_values():
    a = FMMOptions.create(block_size=np.int64(8), rank=2, global_tokens=np.array([5, 1, 5]), scale=np.float32(0.5))
    b = FMMOptions.create(block_size=8, rank=2, global_tokens=[1, 5], scale=0.5)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert type(a.block_size) is int and a.global_tokens == (1, 5) and type(a.scale) is float
    assert a != FMMOptions.create(block_size=8, rank=4)
    coarse = LearnedCoarsening([np.ones((4, 1, 4))], [np.ones((4, 1, 4))])
    c = FMMOptions.create(coarsening=coarse)
    assert hash(c) == hash(FMMOptions.create(coarsening=coarse)) and c.coarsening_name == "learned"
    with pytest.raises(AttributeError):
        a.rank = 4  # frozen


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(block_size=3), ValueError, "block_size must be a power of two"),
    (dict(rank=2.0), TypeError, "rank must be an integer power of two"),
    (dict(coarsening="max"), ValueError, "coarsening must be 'mean', 'cluster' or a LearnedCoarsening"),
    (dict(causal=True, query_coarsening=True), ValueError, "query_coarsening=True cannot be combined"),
    (dict(refine=-1), ValueError, "refine must be >= 0"),
    (dict(refine=2, query_coarsening=True), ValueError, "refine > 0 needs fine queries"),
    (dict(cluster_iters=1.5), TypeError, "cluster_iters must be a non-negative integer"),
    (dict(count_scaling=1), TypeError, "count_scaling must be True or False"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    # (a 2-D table is per-sequence global tokens, shapes-and-decoding.md)
    (dict(global_tokens=[0.5]), TypeError, "global_tokens must be a 1-D sequence"),
])
def test_options_reject_bad_values_with_the_public_messages(kwargs, error, message):
    with pytest.raises(error, match=message):
        FMMOptions.create(**kwargs)
    q, k, v = qkv((), 8)
    with pytest.raises(error, match=message):
        fmm_attention(q, k, v, **kwargs)
