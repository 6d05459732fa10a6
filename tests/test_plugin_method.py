"""A third-party tuning method, defined only in this file and registered through the `dstune.methods` entry
point, trains, merges, exports to PEFT and benches with no change to dstune."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers as T
from torch import nn

from helpers import lm_recipe, logits, ok, random_tokens_recipe, run_cli
from dstune.methods.lora import Lora
from dstune.methods.peft_format import PeftAdapter


class LoraFA(Lora):
    """LoRA-FA: A stays at its random start and only B trains (half of LoRA's optimizer state)."""

    name = "lora_fa"
    description = "LoRA-FA: LoRA with a frozen random A; only B trains"

    def apply(self, model: nn.Module, task: str) -> None:
        super().apply(model, task)
        for name in self.wrapped:
            model.get_submodule(name).lora_A.weight.requires_grad_(False)

    def peft_adapter(self, model: nn.Module, task: str) -> PeftAdapter:
        adapter = super().peft_adapter(model, task)   # what trains (B); PEFT needs the frozen A too
        adapter.tensors.update({f"base_model.model.{name}.lora_A.weight": model.get_submodule(name).lora_A.weight
                                .detach().contiguous() for name in self.wrapped})
        return adapter

    @classmethod
    def bench_presets(cls) -> dict[str, list[dict]]:
        return {"lora_fa": [{"name": "lora_fa", "r": 4}]}


@pytest.fixture
def plugin_env(tmp_path) -> dict:
    """An installed distribution that registers LoraFA, as `pip install` of a plugin package would."""
    info = tmp_path / "site" / "dstune_lora_fa-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dstune-lora-fa\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dstune.methods]\nlora_fa = test_plugin_method:LoraFA\n")
    path = [str(tmp_path / "site"), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in path if p)}


@pytest.mark.slow
def test_a_plugin_method_trains_merges_exports_and_benches(ws, built_ops, tmp_path, plugin_env):
    listed = ok(run_cli(["methods"], env=plugin_env)).stdout
    assert "lora_fa" in listed and "frozen random A" in listed

    recipe = lm_recipe(ws, tmp_path, "run", methods=[{"name": "lora_fa", "r": 4}], max_steps=4, lr=5e-2)
    res = ok(run_cli(["train", recipe], env=plugin_env))
    assert "lora_fa: 768 of " in res.stdout   # B alone: 2 layers × c_attn's 96 outputs × rank 4
    run_dir = tmp_path / "run"
    ok(run_cli(["export", str(run_dir), "--format", "merged", "--out", str(tmp_path / "merged")], env=plugin_env))
    ok(run_cli(["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "peft")], env=plugin_env))

    import peft
    base = T.AutoModelForCausalLM.from_pretrained(ws / "gpt2").eval()
    before = logits(base, "causal_lm")
    theirs = logits(peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval(), "causal_lm")
    merged = logits(T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), "causal_lm")
    assert (theirs - before).abs().max() > 1e-4                       # it trained
    assert torch.allclose(theirs, merged, atol=1e-5, rtol=0), (theirs - merged).abs().max()

    bench = ok(run_cli(["bench", random_tokens_recipe(tmp_path, "fp32"), "--methods", "lora_fa", "--steps", "3",
                        "--out", str(tmp_path / "bench")], env=plugin_env))
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [r["method"] for r in rows] == ["lora_fa"] and rows[0]["tokens_per_s"] > 0, bench.stdout
