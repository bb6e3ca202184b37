"""global_tokens="auto": sinks chosen from the inputs, per entry, causally where causal."""

import numpy as np
import pytest

from fmm_attention import exact_attention, fmm_attention
from fmm_attention.sinks import auto_global_tokens


def sink_inputs(n=96, d=6, seed=0, batch=(2,), sinks=(5, 70)):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(batch + (n, d)) for _ in range(3))
    for j in sinks:  # keys aligned with every query: a large share of all attention
        k[..., j, :] = 3.0 * q.mean(axis=-2) / np.linalg.norm(q.mean(axis=-2), axis=-1, keepdims=True) ** 2 * d
    return q, k, v


def test_bidirectional_finds_far_sinks_and_helps():
    q, k, v = sink_inputs()
    chosen = auto_global_tokens(q.reshape(-1, 96, 6), k.reshape(-1, 96, 6), None, block_size=4, scale=6 ** -0.5,
                                causal=False)
    assert chosen == [(5, 70), (5, 70)]
    ref = exact_attention(q, k, v)
    plain = fmm_attention(q, k, v, block_size=4, rank=1)
    auto = fmm_attention(q, k, v, block_size=4, rank=1, global_tokens="auto")
    np.testing.assert_array_equal(auto, fmm_attention(q, k, v, block_size=4, rank=1, global_tokens=[5, 70]))
    assert np.linalg.norm(auto - ref) < 0.5 * np.linalg.norm(plain - ref)


@pytest.mark.parametrize("t", [3, 6, 40])
def test_causal_auto_is_causal_safe(t):
    # perturbing positions >= t changes no output before t, also inside the first 2m
    # positions where the choice is made (there the chosen keys are near-field keys anyway)
    q, k, v = sink_inputs(sinks=(2, 60))
    opts = dict(block_size=4, rank=2, causal=True, global_tokens="auto", refine=8, coarsening="cluster")
    base = fmm_attention(q, k, v, **opts)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[..., t:, :] += 3.0
    k2[..., t:, :] = -2.0 * k2[..., t:, :] + 1.0
    v2[..., t:, :] *= -5.0
    moved = fmm_attention(q2, k2, v2, **opts)
    np.testing.assert_allclose(moved[..., :t, :], base[..., :t, :], rtol=1e-13, atol=1e-13)
    assert not np.allclose(moved[..., t:, :], base[..., t:, :])


def test_causal_choice_reads_only_the_first_two_blocks():
    q, k, v = sink_inputs(sinks=(1,))
    chosen = auto_global_tokens(q.reshape(-1, 96, 6), k.reshape(-1, 96, 6), None, block_size=4, scale=1.0,
                                causal=True)
    assert all(1 in c and max(c) < 8 for c in chosen)


@pytest.mark.parametrize("causal", [False, True])
def test_batch_stack_and_padding_invariance(causal):
    q, k, v = sink_inputs(n=90, batch=(3,), seed=2)
    q[1], k[1] = q[1][::-1], k[1][::-1]  # entries choose different tokens
    opts = dict(block_size=4, rank=2, causal=causal, global_tokens="auto")
    batch, stats = fmm_attention(q, k, v, return_stats=True, **opts)
    for b in range(3):
        np.testing.assert_allclose(batch[b], fmm_attention(q[b], k[b], v[b], **opts), rtol=1e-13, atol=1e-14)
    pad = [(0, 0), (0, 11), (0, 0)]
    mask = np.zeros((3, 101), bool)
    mask[:, :90] = True
    padded = fmm_attention(np.pad(q, pad), np.pad(k, pad), np.pad(v, pad), key_padding_mask=mask, **opts)
    np.testing.assert_allclose(padded[:, :90], batch, rtol=1e-12, atol=1e-13)
    assert 0 < stats.keys_fraction < 1


def test_auto_rejected_where_unsupported():
    from fmm_attention import fmm_attention_vjp

    q, k, v = sink_inputs(batch=())
    with pytest.raises(ValueError, match="auto"):
        fmm_attention_vjp(q, k, v, block_size=4, rank=2, global_tokens="auto")
    with pytest.raises(ValueError, match="global_tokens"):
        fmm_attention(q, k, v, global_tokens="first")
