"""The coarsening protocol: a coarsening written here, in the test file, runs through the library.

``FirstTokenCoarsening`` summarises each sub-box by its first valid token (with the count
bias ``log(count)``), with a plain NumPy upward pass declared as its ``"cpu"`` kernel. No
library file knows it: ``fmm_attention`` runs it on the CPU, checked against a dense
reference computed here, and the CUDA backend (no kernel declared) refuses it by name.
"""

from dataclasses import dataclass

import numpy as np
import pytest

import reference
from fmm_attention import (
    ClusterCoarsening,
    Coarsening,
    LearnedCoarsening,
    MeanCoarsening,
    build_tree,
    fmm_attention,
    fmm_attention_vjp,
)
from fmm_attention.backends import BackendNotSupportedError
from fmm_attention.options import FMMOptions

CALLS = []


def first_token_upward(coarsening, batch, tree, *, valid, has_mask, count_scaling, kc, vc, cbias):
    """Row ``offset + g`` of a level: the first valid token of sub-box ``g`` (plain NumPy)."""
    CALLS.append(coarsening)
    B, n = batch.k.shape[:2]
    for level in tree.levels:
        size = level.sub_box_size
        for b in range(B):
            for g in range(level.n_boxes * level.rank):
                row = level.offset + g
                tokens = np.arange(g * size, min(n, (g + 1) * size))
                if has_mask:
                    tokens = tokens[valid[b, tokens]]
                if tokens.size == 0:
                    kc[b, row], vc[b, row], cbias[b, row] = 0, 0, -np.inf
                    continue
                kc[b, row] = batch.k[b, tokens[0]]
                vc[b, row] = batch.v[b, tokens[0]]
                cbias[b, row] = np.log(tokens.size) if count_scaling else 0.0


@dataclass(frozen=True)
class FirstTokenCoarsening(Coarsening):
    """Each sub-box stands for its first valid token."""

    name = "first-token"
    kernels = {"cpu": first_token_upward}


def first_token_reference(q, k, v, *, block_size, rank, causal, valid, count_scaling=True):
    """Dense FMA of one head with first-token coarse keys: every logit of every query."""
    n, d = q.shape
    scale = 1 / np.sqrt(d)
    N = reference.padded_length(n, block_size)
    levels = reference.level_map_reference(n, block_size, causal)
    out, lse = np.zeros((n, v.shape[1])), np.full(n, -np.inf)
    for i in range(n):
        logits, values = [], []
        for j in range(n):
            if levels[i, j] == 0 and valid[j]:
                logits.append(scale * q[i] @ k[j])
                values.append(v[j])
        for level in range(1, int(np.log2(N // block_size))):
            w = block_size * 2 ** (level - 1)
            sub = w // min(rank, w)
            for g in sorted({j // sub for j in range(n) if levels[i, j] == level}):
                members = [j for j in range(g * sub, min(n, (g + 1) * sub)) if valid[j]]
                if members:
                    logits.append(scale * q[i] @ k[members[0]] + (np.log(len(members)) if count_scaling else 0.0))
                    values.append(v[members[0]])
        if logits:
            x = np.array(logits)
            weights = np.exp(x - x.max())
            out[i] = weights @ np.array(values) / weights.sum()
            lse[i] = x.max() + np.log(weights.sum())
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("count_scaling", [True, False])
def test_a_coarsening_defined_in_the_test_file_runs_and_matches_its_dense_reference(causal, count_scaling):
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((3, 2, 45, 4))
    mask = rng.random((2, 45)) > 0.25
    CALLS.clear()
    coarse = FirstTokenCoarsening()
    out, lse = fmm_attention(q, k, v, block_size=4, rank=2, causal=causal, coarsening=coarse,
                             count_scaling=count_scaling, key_padding_mask=mask, return_lse=True)
    assert CALLS == [coarse]  # its own upward pass ran, once
    for b in range(2):
        want, want_lse = first_token_reference(q[b], k[b], v[b], block_size=4, rank=2, causal=causal,
                                               valid=mask[b], count_scaling=count_scaling)
        np.testing.assert_allclose(out[b], want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(lse[b], want_lse, rtol=1e-10, atol=1e-12)
    # and the test can fail: mean coarsening of the same inputs is another result
    mean = fmm_attention(q, k, v, block_size=4, rank=2, causal=causal, count_scaling=count_scaling,
                         key_padding_mask=mask)
    assert not np.allclose(out, mean, atol=1e-3)


def test_the_toy_coarsening_gives_statistics_and_is_refused_where_it_has_no_kernel():
    q, k, v = np.random.default_rng(6).standard_normal((3, 32, 4))
    _, stats = fmm_attention(q, k, v, block_size=4, rank=2, coarsening=FirstTokenCoarsening(), return_stats=True)
    n_levels = build_tree(32, block_size=4, rank=2).n_levels
    assert n_levels == 2 and stats.flops["upward"] == (4 + 4) * 32 * n_levels  # the protocol's default cost
    with pytest.raises(BackendNotSupportedError,
                       match=r"backend 'cuda' \(CUDA kernels\) does not support "
                             r"coarsening=FirstTokenCoarsening\(\); use backend='cpu'"):
        fmm_attention(q, k, v, block_size=4, rank=2, coarsening=FirstTokenCoarsening(), backend="cuda")
    with pytest.raises(ValueError, match=r"coarsening=FirstTokenCoarsening\(\) has no backward"):
        fmm_attention_vjp(q, k, v, block_size=4, rank=2, coarsening=FirstTokenCoarsening())


def test_cuda_refuses_cluster_by_name_before_needing_a_gpu():
    q, k, v = np.random.default_rng(7).standard_normal((3, 16, 4))
    with pytest.raises(BackendNotSupportedError, match=r"backend 'cuda' .*coarsening='cluster'; use backend='cpu'"):
        fmm_attention(q, k, v, block_size=4, rank=2, coarsening=ClusterCoarsening(2), backend="cuda")


@pytest.mark.parametrize("causal", [False, True])
def test_instances_compute_what_their_names_compute(causal):
    q, k, v = np.random.default_rng(8).standard_normal((3, 50, 4))
    opts = dict(block_size=4, rank=2, causal=causal)
    np.testing.assert_array_equal(fmm_attention(q, k, v, coarsening=MeanCoarsening(), **opts),
                                  fmm_attention(q, k, v, coarsening="mean", **opts))
    np.testing.assert_array_equal(fmm_attention(q, k, v, coarsening=ClusterCoarsening(iters=2), **opts),
                                  fmm_attention(q, k, v, coarsening="cluster", cluster_iters=2, **opts))


def test_options_hold_the_coarsening_object():
    assert FMMOptions.create().coarsening == MeanCoarsening()
    a = FMMOptions.create(coarsening="cluster", cluster_iters=2)
    b = FMMOptions.create(coarsening=ClusterCoarsening(2), cluster_iters=7)  # the instance's iters win
    assert a == b and hash(a) == hash(b) and b.cluster_iters == 2 and b.coarsening_name == "cluster"
    assert FMMOptions.create(coarsening="cluster", cluster_iters=3) != a
    toy = FMMOptions.create(coarsening=FirstTokenCoarsening())
    assert toy == FMMOptions.create(coarsening=FirstTokenCoarsening()) and toy.coarsening_name == "first-token"
    with pytest.raises(TypeError, match="cluster_iters must be a non-negative integer"):
        ClusterCoarsening(1.5)


def test_each_coarsening_declares_what_it_is():
    learned = LearnedCoarsening([np.ones((4, 1, 4))], [np.ones((4, 1, 4))])
    assert [c.name for c in (MeanCoarsening(), ClusterCoarsening(), learned)] == ["mean", "cluster", "learned"]
    assert MeanCoarsening().analysis and not ClusterCoarsening().analysis and not learned.analysis
    assert MeanCoarsening().differentiable and learned.differentiable and ClusterCoarsening().differentiable
    assert set(MeanCoarsening().kernels) == {"cpu", "cuda"} and set(ClusterCoarsening().kernels) == {"cpu"}
    assert set(learned.kernels) == {"cpu", "cuda"}
    assert callable(ClusterCoarsening().kernel("cpu"))  # "module:function" resolved on first use
    with pytest.raises(ValueError, match="has no upward pass on backend 'cuda'"):
        ClusterCoarsening().kernel("cuda")
