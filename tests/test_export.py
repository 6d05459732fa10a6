"""Exported runs load in PEFT / plain transformers and give the same logits as dstune's model."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from conftest import ok, run_cli

RUNS = {  # name: (family, task, data, methods)
    "lora_gpt2": ("gpt2", "causal_lm", "lm.jsonl", [{"name": "lora", "r": 4, "alpha": 16}]),
    "lora_llama_all": ("llama", "causal_lm", "lm.jsonl", [{"name": "lora", "r": 4, "target_modules": "all-linear"}]),
    "ia3_llama": ("llama", "causal_lm", "lm.jsonl", [{"name": "ia3"}]),
    "lora_bert_cls": ("bert", "classification", "cls_train.jsonl", [{"name": "lora", "r": 4}]),
    "ia3_gpt2": ("gpt2", "causal_lm", "lm.jsonl", [{"name": "ia3"}]),
    "adapter_gpt2": ("gpt2", "causal_lm", "lm.jsonl", [{"name": "adapter", "bottleneck": 8}]),
    "prompt_gpt2": ("gpt2", "causal_lm", "lm.jsonl", [{"name": "prompt", "num_virtual_tokens": 4}]),
    "prompt_bert_cls": ("bert", "classification", "cls_train.jsonl", [{"name": "prompt", "num_virtual_tokens": 4}]),
    "prefix_llama": ("llama", "causal_lm", "lm.jsonl", [{"name": "prefix", "num_virtual_tokens": 4}]),
    "prefix_proj_gpt2": ("gpt2", "causal_lm", "lm.jsonl",
                         [{"name": "prefix", "num_virtual_tokens": 4, "projection": True, "projection_hidden": 16}]),
    "prefix_bert_cls": ("bert", "classification", "cls_train.jsonl", [{"name": "prefix", "num_virtual_tokens": 4}]),
}
AUTO = {"causal_lm": T.AutoModelForCausalLM, "classification": T.AutoModelForSequenceClassification}


def trained_run(ws, tmp_path, name: str):
    family, task, data, methods = RUNS[name]
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(json.dumps({
        "task": task, "model": {"path": str(ws / family)}, "data": {"train": str(ws / data), "max_length": 24},
        "methods": methods, "training": {"max_steps": 4, "lr": 5e-2, "micro_batch_size": 8},
        "output_dir": str(tmp_path / name)}))
    ok(run_cli(["train", str(recipe)]))
    return tmp_path / name


def ours(run_dir):
    from dstune.engine.run_dir import load_run
    return load_run(str(run_dir))[2]


def logits(model, task):
    ids = torch.randint(4, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("name", ["lora_gpt2", "lora_llama_all", "ia3_llama", "ia3_gpt2", "lora_bert_cls",
                                  "prompt_gpt2", "prompt_bert_cls", "prefix_llama", "prefix_proj_gpt2",
                                  "prefix_bert_cls"])
def test_peft_export_loads_in_peft_with_same_logits(ws, built_ops, tmp_path, name):
    import peft
    family, task = RUNS[name][:2]
    run_dir = trained_run(ws, tmp_path, name)
    ok(run_cli(["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "peft")]))
    base = AUTO[task].from_pretrained(ws / family, **({"num_labels": 2} if task == "classification" else {}))
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    mine = ours(run_dir)
    theirs, ours_ = logits(loaded, task), logits(mine, task)
    theirs = theirs[:, -ours_.shape[1]:] if theirs.dim() == 3 else theirs  # PEFT adds prompt-token logits
    diff = (theirs - ours_).abs().max()
    assert diff <= 1e-5, diff
    # and the adapter actually moved away from the initial (identity) state
    assert (logits(AUTO[task].from_pretrained(ws / family, **({"num_labels": 2} if task == "classification" else {})).eval(), task)
            - logits(mine, task)).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["lora_llama_all", "ia3_gpt2"])
def test_merged_export_is_a_plain_model_with_same_logits(ws, built_ops, tmp_path, name):
    family, task = RUNS[name][:2]
    run_dir = trained_run(ws, tmp_path, name)
    ok(run_cli(["export", str(run_dir), "--format", "merged", "--out", str(tmp_path / "merged")]))
    plain = AUTO[task].from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n or "ia3" in n for n, _ in plain.named_parameters())
    diff = (logits(plain, task) - logits(ours(run_dir), task)).abs().max()
    assert diff <= 1e-5, diff


def test_adapters_refuse_to_merge(ws, built_ops, tmp_path):
    run_dir = trained_run(ws, tmp_path, "adapter_gpt2")
    res = run_cli(["export", str(run_dir), "--format", "merged", "--out", str(tmp_path / "m")])
    assert res.returncode == 2
    assert "dstune: error: --format merged: adapter cannot be folded into the base weights" in res.stderr
    assert not (tmp_path / "m").exists()
