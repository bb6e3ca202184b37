"""The PyTorch adapter: gradcheck in float64, Conv1d-layout weight gradients, a two-step
optimisation that lowers a loss, no copies of CPU tensors, clear errors. Skipped without
torch (extra ``[torch]``).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fmm_attention import exact_attention as np_exact_attention
from fmm_attention import fmm_attention as np_fmm_attention
from fmm_attention.interop import torch as fmt


def tensors(*shapes, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=dtype, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("causal", [False, True])
def test_exact_gradcheck(causal):
    q, k, v = tensors((2, 21, 3), (2, 21, 3), (2, 21, 2))
    mask = torch.rand(2, 21, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 0] = True
    f = lambda q, k, v: fmt.exact_attention(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True)
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_fmm_gradcheck(causal):
    q, k, v = tensors((2, 37, 3), (2, 37, 3), (2, 37, 2), seed=1)
    f = lambda q, k, v: fmt.fmm_attention(q, k, v, causal=causal, block_size=4, rank=2, return_lse=True)
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_fastformer_gradcheck(causal):
    q, k, v = tensors((2, 3, 17, 4), (2, 3, 17, 4), (2, 3, 17, 4), seed=2)
    w_q, w_k = tensors((3, 4), (4,), seed=3)
    f = lambda *x: fmt.fastformer_attention(*x, causal=causal)
    assert torch.autograd.gradcheck(f, (q, k, v, w_q, w_k))


# the NumPy API's shapes: (q, k, v shapes, options)
SHAPES = {
    "grouped": (((2, 4, 13, 3), (2, 2, 13, 3), (2, 2, 13, 2)), {}),  # Hq = 4 over Hk = 2
    "broadcast": (((2, 1, 13, 3), (3, 13, 3), (3, 13, 2)), {}),  # output lead (2, 3)
    "cross": (((2, 7, 3), (2, 19, 3), (2, 19, 2)), dict(causal=True, query_offset=5)),
}
METHODS = {
    "exact": (fmt.exact_attention, np_exact_attention, {}),
    "fmm": (fmt.fmm_attention, np_fmm_attention, dict(block_size=4, rank=2)),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", SHAPES)
def test_shapes_gradcheck_and_the_numpy_api(case, method):
    shapes, options = SHAPES[case]
    fn, np_fn, method_options = METHODS[method]
    options = dict(options, **method_options)
    q, k, v = tensors(*shapes, seed=9)
    out, lse = fn(q, k, v, return_lse=True, **options)
    want_out, want_lse = np_fn(*(x.detach().numpy() for x in (q, k, v)), return_lse=True, **options)
    np.testing.assert_array_equal(out.detach().numpy(), want_out)
    np.testing.assert_array_equal(lse.detach().numpy(), want_lse)
    (out.sum() + lse.sum()).backward()
    assert [x.grad.shape for x in (q, k, v)] == [x.shape for x in (q, k, v)]  # k, v's own shapes
    assert torch.autograd.gradcheck(lambda q, k, v: fn(q, k, v, return_lse=True, **options), (q, k, v))


def test_module_takes_grouped_heads_and_query_offset():
    module = fmt.FMMAttention(30, 3, block_size=4, rank=2)
    q, k, v = tensors((2, 4, 7, 3), (2, 2, 30, 3), (2, 2, 30, 3), seed=10)
    out = module(q, k, v, query_offset=10)
    want = np_fmm_attention(*(x.detach().numpy() for x in (q, k, v)), block_size=4, rank=2,
                            coarsening=module.coarsening(), query_offset=10)
    np.testing.assert_array_equal(out.detach().numpy(), want)
    out.sum().backward()
    assert k.grad.shape == k.shape and module.key_weights[0].grad is not None


def test_module_gradcheck_and_conv1d_layout():
    n, d, dv = 30, 3, 2
    module = fmt.FMMAttention(n, d, dv, block_size=4, rank=2)
    q, k, v = tensors((n, d), (n, d), (n, dv), seed=4)
    params = list(module.parameters())
    assert [tuple(p.shape) for p in module.key_weights] == [(2 * d, 1, 4), (2 * d, 1, 8)]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))

    options = dict(causal=False, block_size=4, rank=2, count_scaling=True, scale=None)
    n_levels = len(module.key_weights)

    def f(q, k, v, *ps):
        return fmt._FMM.apply(q, k, v, None, options, n_levels, *ps)[0]

    assert torch.autograd.gradcheck(f, (q, k, v, *params))
    # the weight gradient has the shape of Conv1d's weight
    out = module(q, k, v)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * g).sum().backward()
    conv = torch.nn.Conv1d(d, 2 * d, kernel_size=4, stride=4, groups=d, dtype=torch.float64)
    assert module.key_weights[0].grad.shape == conv.weight.shape
    # the module with its current weights equals the NumPy function with them
    want = np_fmm_attention(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(), block_size=4, rank=2,
                            coarsening=module.coarsening())
    np.testing.assert_allclose(module(q, k, v).detach().numpy(), want, rtol=1e-13, atol=1e-13)


def test_learned_weight_grads_match_conv1d_autograd():
    # a pure-PyTorch dense reference: coarse keys by torch's Conv1d, one joint softmax over
    # the near field and the coarse keys of a tiny tree (n = 16, m = 4, p = 2: one far
    # level, boxes of 4 tokens)
    n, d, m, p = 16, 2, 4, 2
    module = fmt.FMMAttention(n, d, d, block_size=m, rank=p, count_scaling=False)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for prm in module.parameters():
            prm.add_(0.3 * torch.randn(prm.shape, generator=gen, dtype=prm.dtype))
    q, k, v = (torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    out = module(q, k, v)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * g).sum().backward()

    convs = []
    for weights, bias in ((module.key_weights[0], module.key_bias[0]), (module.value_weights[0], module.value_bias[0])):
        conv = torch.nn.Conv1d(d, p * d, kernel_size=m, stride=m, groups=d, dtype=torch.float64)
        with torch.no_grad():
            conv.weight.copy_(weights)
            conv.bias.copy_(bias)
        convs.append(conv)
    kc = convs[0](k.T[None])[0]  # (p*d, n/m): channel e*p + t, box c
    vc = convs[1](v.T[None])[0]
    # coarse key of box c, slot t: kc[e*p + t, c] over e
    kc = kc.reshape(d, p, n // m).permute(2, 1, 0).reshape(-1, d)  # row c*p + t
    vc = vc.reshape(d, p, n // m).permute(2, 1, 0).reshape(-1, d)
    scale = 1 / np.sqrt(d)
    outs = []
    for i in range(n):
        blk, box = i // m, i // m
        lo, hi = max(0, (blk - 1) * m), min(n, (blk + 2) * m)
        far = [c for c in ((box - 2, box + 2, box + 3) if box % 2 == 0 else (box - 3, box - 2, box + 2))
               if 0 <= c < n // m]
        keys = torch.cat([k[lo:hi]] + [kc[c * p : (c + 1) * p] for c in far])
        vals = torch.cat([v[lo:hi]] + [vc[c * p : (c + 1) * p] for c in far])
        outs.append(torch.softmax(scale * keys @ q[i], 0) @ vals)
    ref = torch.stack(outs)
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    (ref * g).sum().backward()
    torch.testing.assert_close(module.key_weights[0].grad, convs[0].weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module.key_bias[0].grad, convs[0].bias.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module.value_weights[0].grad, convs[1].weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module.value_bias[0].grad, convs[1].bias.grad, rtol=1e-10, atol=1e-12)


def test_two_steps_of_sgd_lower_the_loss():
    n, d = 40, 4
    module = fmt.FMMAttention(n, d, block_size=4, rank=2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, n, d, generator=gen) for _ in range(3))
    target = torch.randn(2, n, d, generator=gen)
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = ((module(q, k, v) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0]


def test_cpu_tensors_are_not_copied_and_errors_are_clear():
    q, k, v = tensors((9, 2), (9, 2), (9, 2), seed=8)
    assert fmt._array(q, "q").__array_interface__["data"][0] == q.data_ptr()
    with pytest.raises(TypeError, match="q"):
        fmt.exact_attention(q.to(torch.int64), k, v)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fmt.exact_attention(q.detach().numpy(), k, v)
    if hasattr(torch, "device"):
        meta = torch.empty((9, 2), device="meta")
        with pytest.raises(ValueError, match="CPU tensors only"):
            fmt.exact_attention(meta, k, v)
    with pytest.raises(ValueError, match="block_size"):
        fmt.fmm_attention(q, k, v, block_size=0, rank=1)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        fmt.exact_attention(q, k, v, attn_mask=torch.ones(9, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="query_offset"):
        fmt.fmm_attention(q[:4], k, v, causal=True, query_offset=6)
