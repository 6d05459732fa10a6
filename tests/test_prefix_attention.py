"""kernels.prefix_attention: equals "concatenate the prefix, explicit mask, SDPA" and an independent
float64 implementation, for GQA, padding, decoding with a cache and T5's position bias."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dstune.kernels import prefix_attention
from helpers import float64_attention, inputs


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("P", [1, 3, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_float64_reference(Hq, Hkv, P, causal):
    q, k, v, pk, pv = inputs(Hq=Hq, Hkv=Hkv, P=P)
    got = prefix_attention(q, k, v, pk, pv, None, causal)
    assert (got.double() - float64_attention(q, k, v, pk, pv, causal=causal)).abs().max() < 1e-5


def test_padding_mask_hides_padded_keys_but_never_the_prefix():
    q, k, v, pk, pv = inputs()
    pad = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]  # HF's 4-D boolean mask
    got = prefix_attention(q, k, v, pk, pv, mask, True)
    want = float64_attention(q, k, v, pk, pv, pad=pad)
    assert (got.double() - want).abs()[:, :4].max() < 1e-5  # padded queries are don't-care rows


def test_decoding_with_a_cache_aligns_causality_bottom_right():
    q, k, v, pk, pv = inputs(S=2, T=6)  # two new queries over six cached+new keys
    got = prefix_attention(q, k, v, pk, pv, None, True)
    assert (got.double() - float64_attention(q, k, v, pk, pv)).abs().max() < 1e-5


def test_position_bias_applies_to_sequence_keys_only():
    q, k, v, pk, pv = inputs(Hq=2, Hkv=2)
    bias = torch.randn(1, 2, 7, 7, generator=torch.Generator().manual_seed(3))
    got = prefix_attention(q, k, v, pk, pv, None, False, scale=None, position_bias=bias)
    assert (got.double() - float64_attention(q, k, v, pk, pv, causal=False, bias=bias)).abs().max() < 1e-5


def test_equals_concatenate_mask_sdpa_as_peft_does_it():
    q, k, v, pk, pv = inputs(Hq=4, Hkv=4, P=5)
    B, S, P = q.shape[0], q.shape[2], pk.shape[1]
    keys = torch.cat([pk[None].expand(B, -1, -1, -1), k], 2)
    vals = torch.cat([pv[None].expand(B, -1, -1, -1), v], 2)
    mask = torch.ones(S, P + S, dtype=torch.bool).tril(P)
    want = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask).transpose(1, 2)
    assert (prefix_attention(q, k, v, pk, pv) - want).abs().max() < 1e-6


def test_prefix_gradients_are_reduced_over_the_batch():
    q, k, v, pk, pv = inputs()
    pk.requires_grad_(True)
    prefix_attention(q, k, v, pk, pv).sum().backward()
    assert pk.grad.shape == pk.shape  # one gradient for the shared prefix, not B copies
    per_row = sum(torch.autograd.grad(prefix_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], pk, pv).sum(), pk)[0]
                  for b in range(q.shape[0]))
    assert torch.allclose(pk.grad, per_row, atol=1e-5)


@pytest.mark.parametrize("path", ["shifted", "lower-right"])
@pytest.mark.parametrize("Hq,Hkv,causal", [(4, 4, True), (4, 1, True), (4, 2, False)])
def test_unmasked_fast_paths_match_the_reference_with_gradients(path, Hq, Hkv, causal):
    from dstune.kernels.reference import (prefix_attention_lower_right, prefix_attention_reference,
                                          prefix_attention_shifted)
    fast_path = {"shifted": prefix_attention_shifted, "lower-right": prefix_attention_lower_right}[path]
    leaves = lambda: [t.clone().requires_grad_() for t in inputs(Hq=Hq, Hkv=Hkv, S=9, P=4, seed=5)]  # noqa: E731
    fast, ref = leaves(), leaves()
    dout = torch.randn(2, 9, Hq, 8, generator=torch.Generator().manual_seed(6))
    out_fast = fast_path(*fast, causal)
    out_ref = prefix_attention_reference(*ref, None, causal)
    (out_fast * dout).sum().backward()
    (out_ref * dout).sum().backward()
    assert (out_fast - out_ref).abs().max() < 1e-5
    for a, b in zip(fast, ref):
        assert (a.grad - b.grad).abs().max() < 1e-5


def test_debug_log_names_the_path_each_input_takes(caplog):
    import dstune.kernels as kernels
    kernels._logged.clear()
    q, k, v, pk, pv = inputs()
    with caplog.at_level("DEBUG", logger="dstune.kernels"):
        prefix_attention(q, k, v, pk, pv)  # full blocks, no mask
        prefix_attention(q[:, :, :2], k, v, pk, pv)  # two queries over a cache
    assert [r.getMessage() for r in caplog.records] == [
        "prefix attention: SDPA, causal over P placeholder queries + the sequence (no mask)",
        "prefix attention: reference (a mask, a position bias or a cache)"]


def _errors_vs_float64(dtype, device="cpu", causal=True, *, path, **shape):
    """Relative errors of prefix_attention (output, then dq, dk, dv, dprefix_k, dprefix_v) vs float64_attention."""
    base = inputs(**shape)
    leaves = [t.double().requires_grad_() for t in base]
    expected = float64_attention(*leaves, causal=causal)
    dout = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    expected.backward(dout)
    ins = [t.to(device, dtype).requires_grad_() for t in base]
    out = prefix_attention(*ins, None, causal, path=path)
    out.backward(dout.to(device, dtype))
    rel = lambda a, b: ((a.detach().double().cpu() - b).norm() / b.norm()).item()  # noqa: E731
    return [rel(out, expected.detach())] + [rel(t.grad, leaf.grad) for t, leaf in zip(ins, leaves)]


SDPA_PATHS = ["shifted", "lower-right", "split"]  # the paths built on SDPA's fused kernels


@pytest.mark.parametrize("path", SDPA_PATHS)
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("P", [1, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_paths_match_float64_with_gradients(path, Hq, Hkv, P, causal):
    errors = _errors_vs_float64(torch.float32, causal=causal, path=path, Hq=Hq, Hkv=Hkv, S=9, P=P, D=16, seed=P)
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("path", SDPA_PATHS)
def test_sdpa_paths_in_bf16_are_within_bf16_tolerance(path):
    errors = _errors_vs_float64(torch.bfloat16, path=path, Hq=8, Hkv=2, S=33, P=16, D=32, seed=4)
    assert max(errors) < 1e-2, errors


def test_every_path_trains_a_model_like_the_others(caplog):
    """Loss and every trainable gradient of a prefix-tuned Llama, with and without activation checkpointing."""
    import dstune.kernels as kernels
    from helpers import batch, with_methods
    results = {}
    for path in ("auto", *SDPA_PATHS):
        kernels._logged.clear()
        for ckpt in (False, True):
            model, task = with_methods("llama", {"name": "prefix", "num_virtual_tokens": 4, "gate": False, "attention": path})
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            with caplog.at_level("DEBUG", logger="dstune.kernels"):
                loss = model(**batch(task)).loss
            loss.backward()
            results[path, ckpt] = loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert {"prefix attention: SDPA, causal over P placeholder queries + the sequence (no mask)",
            "prefix attention: SDPA, lower-right causal (no mask)",
            "prefix attention: split: CPU flash (sequence) + CPU flash (prefix), merged by log-sum-exp"
            } <= set(caplog.messages)
    loss0, grads0 = results["auto", False]
    assert all(g.abs().sum() > 0 for g in grads0.values())
    for loss, grads in results.values():
        assert abs(loss - loss0) < 1e-5 and grads.keys() == grads0.keys()
        assert all(torch.allclose(grads[n], grads0[n], atol=1e-5) for n in grads0)


def test_split_path_skips_inputs_it_cannot_take(caplog):
    import dstune.kernels as kernels
    kernels._logged.clear()
    q, k, v, pk, pv = inputs()
    with caplog.at_level("DEBUG", logger="dstune.kernels"):
        got = prefix_attention(q[:, :, :2], k, v, pk, pv, path="split")  # two queries over a cache
    assert caplog.messages[0].startswith("prefix attention: split skipped")
    assert (got.double() - float64_attention(q[:, :, :2], k, v, pk, pv)).abs().max() < 1e-5


@pytest.mark.parametrize("path", SDPA_PATHS)
def test_sdpa_paths_trace_on_fake_tensors(path):
    """The memory estimate traces the model on fake tensors: every path must run there too."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k, v, pk, pv = (t.requires_grad_() for t in inputs(Hq=4, Hkv=2, S=64, P=8, D=16))
        out = prefix_attention(q, k, v, pk, pv, path=path)
        out.sum().backward()
        assert out.shape == (2, 64, 4, 16) and pk.grad.shape == pk.shape and k.grad.shape == k.shape


@pytest.mark.parametrize("path", SDPA_PATHS)
def test_sdpa_paths_under_torch_compile_give_eager_numbers(path):
    """training.compile compiles each layer, the prefix attention call included."""
    import torch._dynamo
    torch._dynamo.reset()
    fast = [t.requires_grad_() for t in inputs(Hq=4, Hkv=2, S=16, P=4, D=16)]
    eager = [t.detach().clone().requires_grad_() for t in fast]
    out = torch.compile(lambda *x: prefix_attention(*x, path=path), backend="aot_eager")(*fast)
    out.sum().backward()
    prefix_attention(*eager, path=path).sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(fast, eager))


def test_prefix_attention_refuses_an_unknown_path():
    paths = "auto, shifted, lower-right, split, kernel"
    with pytest.raises(ValueError, match=f"prefix_attention: path must be one of {paths}, got 'fast'"):
        prefix_attention(*inputs(), path="fast")


def test_unknown_attention_path_is_a_config_error_naming_the_key():
    from dstune.errors import UserError
    from dstune.methods import build_methods
    with pytest.raises(UserError, match=r"methods\[0\] \(prefix\)\.attention: Input should be 'auto', 'shifted',"):
        build_methods([{"name": "prefix", "attention": "fastest"}])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", SDPA_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,S,P", [(4, 4, 130, 16), (8, 2, 77, 1), (4, 1, 256, 64)])
def test_sdpa_paths_on_cuda_match_float64(path, dtype, Hq, Hkv, S, P):
    errors = _errors_vs_float64(dtype, "cuda", path=path, Hq=Hq, Hkv=Hkv, S=S, P=P, D=64, seed=S)
    assert max(errors) < 1e-2, errors
