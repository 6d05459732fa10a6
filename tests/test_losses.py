"""The chunked causal-LM loss equals transformers' ForCausalLMLoss (value and gradient), in fp32 exactly
and in bf16 within rounding, and a run trained with it logs the losses of a run without it."""
from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from dstune.models.losses import chunked_causal_lm_loss
from helpers import lm_recipe, ok, read_metrics, run_cli


def _case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 11, 50, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :4] = -100  # a masked prompt
    labels[2, 7:] = -100  # padding
    return logits, labels


@pytest.mark.parametrize("chunk", [1, 4, 7, 33, 1000])
@pytest.mark.parametrize("num_items", [None, 19])
def test_equals_transformers_loss_in_fp32(chunk, num_items):
    logits, labels = _case(torch.float32)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    expected = ForCausalLMLoss(a, labels, 50, num_items_in_batch=num_items)
    got = chunked_causal_lm_loss(b, labels, 50, num_items_in_batch=num_items, chunk=chunk)
    assert abs(got.item() - expected.item()) < 1e-6
    expected.backward()
    (got * 1.0).backward()
    assert (a.grad - b.grad).abs().max() < 1e-7
    assert b.grad[0, :3].abs().max() == 0  # positions whose next token is masked get no gradient


def test_given_shift_labels_are_used_as_they_are():
    logits, labels = _case(torch.float32)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    expected = ForCausalLMLoss(logits, None, 50, shift_labels=shifted)
    assert abs(chunked_causal_lm_loss(logits, None, 50, shift_labels=shifted, chunk=5).item() - expected.item()) < 1e-6


def test_bf16_logits_keep_their_dtype_and_match_within_rounding():
    logits, labels = _case(torch.bfloat16, seed=1)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    expected = ForCausalLMLoss(a, labels, 50)
    got = chunked_causal_lm_loss(b, labels, 50, chunk=8)
    assert got.dtype == torch.float32
    assert abs(got.item() - expected.item()) < 1e-5  # both accumulate in fp32
    expected.backward()
    got.backward()
    assert b.grad.dtype == torch.bfloat16
    assert (a.grad.float() - b.grad.float()).abs().max() < 1e-2 * a.grad.float().abs().max()


@pytest.mark.slow
def test_training_with_chunked_loss_logs_the_same_losses(ws, tmp_path):
    recipe = lm_recipe(ws, tmp_path, "run", eval_fraction=0.0)
    ok(run_cli(["train", recipe, "training.loss_chunk_tokens=5", f"output_dir={tmp_path / 'chunked'}"]))
    ok(run_cli(["train", recipe, "training.loss_chunk_tokens=0", f"output_dir={tmp_path / 'plain'}"]))
    chunked, plain = read_metrics(tmp_path / "chunked"), read_metrics(tmp_path / "plain")
    assert sorted(chunked) == sorted(plain)
    for step in plain:
        assert abs(chunked[step]["loss"] - plain[step]["loss"]) < 1e-5, step
