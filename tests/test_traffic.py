"""The step traffic counter behind benchmarks/step_traffic.py: FLOPs and bytes per operator."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dstune.planning.traffic import StepTraffic, recipe_traffic


def test_views_and_allocations_move_nothing_and_a_copy_reads_and_writes_its_bytes():
    x = torch.randn(64, 32)
    with StepTraffic() as traffic:
        x.view(32, 64)
        x.t()
        torch.empty(1000)
        torch.empty_like(x)
        x.new_empty(10)
        x.clone()
    assert dict(traffic.rows) == {("forward", "clone"): [0, 2 * 64 * 32 * 4, 1]}


def test_a_linear_layer_is_one_matmul_of_2mkn_flops():
    x, w = torch.randn(64, 32), torch.randn(16, 32)
    with StepTraffic() as traffic:
        F.linear(x, w)
    assert traffic.rows["forward", "mm"] == [2 * 64 * 32 * 16, (64 * 32 + 32 * 16 + 64 * 16) * 4, 1]


@pytest.mark.parametrize("causal", [True, False])
def test_fused_attention_counts_half_the_score_matrix_when_causal(causal):
    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    with StepTraffic() as traffic:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        traffic.phase = "backward"
        out.sum().backward()
    full = 4 * 2 * 4 * 16 * 16 * 8
    forward = full // 2 if causal else full
    assert traffic.total("forward", 0) == forward
    assert traffic.total("backward", 0, {"_scaled_dot_product_flash_attention_for_cpu_backward"}) == forward * 5 // 2


def _tiny_llama(tmp_path, methods: list[dict]):
    """A tiny Llama recipe and its model with `methods` applied, on the meta device."""
    import json

    from dstune.config import load_config
    from dstune.planning.estimate import meta_model
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: causal_lm\nmodel: {tiny: llama, config_overrides: {vocab_size: 300}}\n"
                      "data: {train: unused.jsonl, max_length: 24}\ntraining: {precision: fp32, micro_batch_size: 2}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    return recipe, meta_model(load_config(recipe, [f"methods={json.dumps(methods)}"]))[0]


MATMULS = {"mm", "addmm"}


def test_a_training_step_counts_every_matmul_once(tmp_path):
    """Full fine-tuning: 2 FLOPs per weight per token forward, twice that backward (input and weight
    gradients). LoRA adds exactly 2·r·(in + out) per token and wrapped layer forward. Prompt tuning runs
    P more tokens, and backward only the input gradients (every weight is frozen)."""
    methods = [{"name": "full"}]
    recipe, model = _tiny_llama(tmp_path, methods)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    tokens = 2 * 24
    full = recipe_traffic(recipe, methods)
    assert full.total("forward", 0, MATMULS) == 2 * tokens * weights
    assert full.total("backward", 0, MATMULS) == 2 * full.total("forward", 0, MATMULS)

    methods = [{"name": "lora", "r": 4, "target_modules": "all-linear"}]
    _, model = _tiny_llama(tmp_path, methods)
    lora = recipe_traffic(recipe, methods)
    wrapped = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert wrapped
    extra = sum(2 * tokens * 4 * (m.in_features + m.out_features) for m in wrapped)
    assert lora.total("forward", 0, MATMULS) == full.total("forward", 0, MATMULS) + extra

    prompt = recipe_traffic(recipe, [{"name": "prompt", "num_virtual_tokens": 5}])
    assert prompt.total("forward", 0, MATMULS) == 2 * 2 * (24 + 5) * weights
    assert prompt.total("backward", 0, MATMULS) == prompt.total("forward", 0, MATMULS)
