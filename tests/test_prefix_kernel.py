"""The prefix-attention CUDA kernel: its algorithm (tests/prefix_attention_tiled.py, the kernel's loops in
PyTorch) against an independent float64 implementation on the CPU, forward and all five gradients;
the custom op's registration and mask conversion; and, on a GPU, the kernel itself."""
from __future__ import annotations

import pytest
import torch

import prefix_attention_tiled as tiled
from helpers import float64_attention, inputs

CASES = [  # Hq, Hkv, Sq, Sk, P, causal, padded
    (4, 4, 9, 9, 3, True, False),
    (4, 2, 9, 9, 1, True, True),
    (4, 1, 5, 5, 6, True, True),
    (4, 2, 7, 7, 3, False, True),
    (2, 1, 3, 10, 5, True, False),  # queries are the last 3 of 10 cached keys
    (2, 2, 1, 6, 2, True, True),    # one decoding step
]


def _pad(B: int, Sk: int, padded: bool) -> torch.Tensor | None:
    if not padded:
        return None
    pad = torch.ones(B, Sk, dtype=torch.bool)
    pad[1, Sk - 3:] = False  # right padding
    pad[0, :2] = False       # left padding
    return pad


@pytest.mark.parametrize("Hq,Hkv,Sq,Sk,P,causal,padded", CASES)
def test_kernel_algorithm_matches_float64(Hq, Hkv, Sq, Sk, P, causal, padded):
    q, k, v, pk, pv = (t.double() for t in inputs(Hq=Hq, Hkv=Hkv, S=Sq, T=Sk, P=P, D=8, seed=Sq + P))
    pad = _pad(2, Sk, padded)
    scale = 8 ** -0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    expected = float64_attention(*leaves, pad=pad, causal=causal)
    dout = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected.backward(dout)

    key_valid = pad.to(torch.uint8) if pad is not None else None
    out, lse = tiled.forward(q, k, v, pk, pv, key_valid, causal, scale)
    assert torch.isfinite(lse).all() and not torch.isnan(out).any()
    assert (out - expected.detach()).abs().max() < 1e-10
    grads = tiled.backward(dout, q, k, v, pk, pv, out, lse, key_valid, causal, scale)
    for name, got, leaf in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, leaves):
        assert (got - leaf.grad).abs().max() < 1e-10, name


def test_key_padding_accepts_causal_padding_and_refuses_other_masks():
    from dstune.kernels.prefix_cuda import key_padding
    pad = torch.tensor([[True] * 6, [False, False] + [True] * 4])
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    ok, key_valid = key_padding(causal[None, None] & pad[:, None, None, :], 6, 6, True)
    assert ok and torch.equal(key_valid, pad.to(torch.uint8))
    assert key_padding(None, 6, 6, True) == (True, None)
    ok, key_valid = key_padding(pad[:, None, None, :].expand(2, 1, 6, 6), 6, 6, False)  # encoder padding
    assert ok and torch.equal(key_valid, pad.to(torch.uint8))
    packed = torch.block_diag(torch.ones(3, 3), torch.ones(3, 3)).bool() & causal  # two packed documents
    assert key_padding(packed[None, None], 6, 6, True) == (False, None)
    assert key_padding(torch.zeros(1, 1, 6, 6), 6, 6, True) == (False, None)  # additive float mask


def test_custom_op_is_registered_with_shapes_for_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import dstune.kernels.prefix_cuda  # noqa: F401  (registers the ops)
    with FakeTensorMode():
        q = torch.empty(2, 8, 16, 64, dtype=torch.bfloat16)
        k = torch.empty(2, 2, 16, 64, dtype=torch.bfloat16)
        pk = torch.empty(2, 4, 64, dtype=torch.bfloat16)
        out, lse = torch.ops.dstune.prefix_attention(q, k, k, pk, pk, None, True, 0.125)
        assert out.shape == (2, 16, 8, 64) and lse.shape == (2, 8, 16) and lse.dtype == torch.float32
        grads = torch.ops.dstune.prefix_attention_backward(out, q, k, k, pk, pk, out, lse, None, True, 0.125)
        assert [g.shape for g in grads] == [q.shape, k.shape, k.shape, pk.shape, pk.shape]


def test_unsupported_inputs_name_the_reason():
    from dstune.kernels.prefix_cuda import unsupported_reason
    q, k, _, pk, _ = inputs(D=64)
    assert unsupported_reason(q, k, pk, True, None, 0.0) == "not on CUDA"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,Sq,Sk,P,causal,padded", CASES)
def test_cuda_kernel_matches_float64(dtype, Hq, Hkv, Sq, Sk, P, causal, padded):
    from dstune.kernels.prefix_cuda import prefix_attention_op
    q, k, v, pk, pv = inputs(Hq=Hq, Hkv=Hkv, S=Sq * 11, T=Sk * 11, P=P * 5, D=64, seed=3)  # past tile sizes
    pad = _pad(2, Sk * 11, padded)
    leaves = [t.double().requires_grad_() for t in (q, k, v, pk, pv)]
    expected = float64_attention(*leaves, pad=pad, causal=causal)
    dout = torch.randn(expected.shape, dtype=torch.float64)
    expected.backward(dout)
    cuda = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v, pk, pv)]
    key_valid = pad.to("cuda", torch.uint8) if pad is not None else None
    out, _ = prefix_attention_op(*cuda, key_valid, causal, 64 ** -0.5)
    out.backward(dout.to("cuda", dtype))
    rel = lambda a, b: ((a.double().cpu() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out, expected.detach()) < 1e-2
    for t, leaf in zip(cuda, leaves):
        assert not torch.isnan(t.grad).any()
        assert rel(t.grad, leaf.grad) < 1e-2
