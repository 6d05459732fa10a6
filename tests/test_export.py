"""Exported runs load in PEFT / plain transformers and give the same logits as dstune's model."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers as T

from helpers import logits, ok, run_cli

RUNS = {  # name: (family, task, data, methods)
    "lora_gpt2": ("gpt2", "causal_lm", "lm.jsonl", [{"name": "lora", "r": 4, "alpha": 16}]),
    "lora_llama_all": ("llama", "causal_lm", "lm.jsonl", [{"name": "lora", "r": 4, "target_modules": "all-linear"}]),
    "ia3_llama": ("llama", "causal_lm", "lm.jsonl", [{"name": "ia3"}]),
    "dora_rslora_gpt2": ("gpt2", "causal_lm", "lm.jsonl", [{"name": "lora", "r": 4, "use_dora": True, "use_rslora": True}]),
    "lora_bert_cls": ("bert", "classification", "cls_train.jsonl", [{"name": "lora", "r": 4}]),
    "ia3_gpt2": ("gpt2", "causal_lm", "lm.jsonl", [{"name": "ia3"}]),
    "adapter_gpt2": ("gpt2", "causal_lm", "lm.jsonl", [{"name": "adapter", "bottleneck": 8}]),
    # two methods on one layer: merged as their hooks compose (IA3 scales LoRA's output; or, listed first, not)
    "lora_ia3_gpt2": ("gpt2", "causal_lm", "lm.jsonl", [{"name": "lora", "r": 4}, {"name": "ia3"}]),
    "ia3_lora_llama": ("llama", "causal_lm", "lm.jsonl", [{"name": "ia3"},
                                                          {"name": "lora", "r": 4, "target_modules": "all-linear"}]),
    "full_gpt2": ("gpt2", "causal_lm", "lm.jsonl", [{"name": "full"}]),
    "prompt_gpt2": ("gpt2", "causal_lm", "lm.jsonl", [{"name": "prompt", "num_virtual_tokens": 4}]),
    "prompt_bert_cls": ("bert", "classification", "cls_train.jsonl",
                        [{"name": "prompt", "num_virtual_tokens": 4, "position": "start"}]),
    "prefix_llama": ("llama", "causal_lm", "lm.jsonl", [{"name": "prefix", "num_virtual_tokens": 4, "gate": False}]),
    "prefix_proj_gpt2": ("gpt2", "causal_lm", "lm.jsonl",
                         [{"name": "prefix", "num_virtual_tokens": 4, "projection": True, "projection_hidden": 16,
                           "gate": False}]),
    "prefix_bert_cls": ("bert", "classification", "cls_train.jsonl",
                        [{"name": "prefix", "num_virtual_tokens": 4, "gate": False}]),
}
AUTO = {"causal_lm": T.AutoModelForCausalLM, "classification": T.AutoModelForSequenceClassification}


@pytest.fixture(scope="module")
def trained(ws, built_ops, tmp_path_factory):
    """`trained(name)`: the run dir of RUNS[name], trained once for the module (the tests only read it)."""
    runs: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("runs")

    def run(name: str) -> Path:
        if name not in runs:
            family, task, data, methods = RUNS[name]
            recipe = root / f"{name}.yaml"
            recipe.write_text(json.dumps({
                "task": task, "model": {"path": str(ws / family)}, "data": {"train": str(ws / data), "max_length": 24},
                "methods": methods, "training": {"precision": "fp32", "max_steps": 4, "lr": 5e-2, "micro_batch_size": 8},
                "output_dir": str(root / name)}))
            ok(run_cli(["train", str(recipe)]))
            runs[name] = root / name
        return runs[name]
    return run


def ours(run_dir):
    from dstune.rundir.load import load_run
    return load_run(str(run_dir)).model


def peft_logits(model, task, name):
    """PEFT's logits, or a skip naming PEFT's own refusal where it cannot run the method on this model
    (PEFT 0.21 + transformers 5.24: prefix tuning on BERT, whose forward takes `cache`, not past_key_values)."""
    import peft
    try:
        return logits(model, task)
    except ValueError as e:
        if "past key values" not in str(e):
            raise
        pytest.skip(f"PEFT {peft.__version__} cannot run {name} with transformers {T.__version__}: {e}")


def assert_modes_of_new_files(folder: Path) -> None:
    """Every file written is as readable as any new file under the umask (safetensors alone writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(f.relative_to(folder)): oct(f.stat().st_mode & 0o777) for f in folder.rglob("*")
             if f.is_file() and "checkpoints" not in f.parts}
    assert modes and set(modes.values()) == {oct(0o666 & ~umask)}, modes


@pytest.mark.parametrize("name", ["lora_gpt2", "lora_llama_all", "ia3_llama", "ia3_gpt2", "lora_bert_cls", "dora_rslora_gpt2",
                                  "prompt_gpt2", "prompt_bert_cls", "prefix_llama", "prefix_proj_gpt2",
                                  "prefix_bert_cls"])
def test_peft_export_loads_in_peft_with_same_logits(ws, trained, tmp_path, name):
    import peft
    family, task = RUNS[name][:2]
    run_dir = trained(name)
    ok(run_cli(["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "peft")]))
    assert_modes_of_new_files(tmp_path / "peft")
    base = AUTO[task].from_pretrained(ws / family, **({"num_labels": 2} if task == "classification" else {}))
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    mine = ours(run_dir)
    theirs, ours_ = peft_logits(loaded, task, name), logits(mine, task)
    theirs = theirs[:, -ours_.shape[1]:] if theirs.dim() == 3 else theirs  # PEFT adds prompt-token logits
    diff = (theirs - ours_).abs().max()
    assert diff <= 1e-5, diff
    # and the adapter actually moved away from the initial (identity) state
    assert (logits(AUTO[task].from_pretrained(ws / family, **({"num_labels": 2} if task == "classification" else {})).eval(), task)
            - logits(mine, task)).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["lora_llama_all", "ia3_gpt2", "dora_rslora_gpt2", "lora_ia3_gpt2", "ia3_lora_llama"])
def test_merged_export_is_a_plain_model_with_same_logits(ws, trained, tmp_path, name):
    family, task = RUNS[name][:2]
    run_dir = trained(name)
    ok(run_cli(["export", str(run_dir), "--format", "merged", "--out", str(tmp_path / "merged")]))
    assert_modes_of_new_files(tmp_path / "merged")
    assert_modes_of_new_files(run_dir)
    plain = AUTO[task].from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n or "ia3" in n for n, _ in plain.named_parameters())
    diff = (logits(plain, task) - logits(ours(run_dir), task)).abs().max()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("name, fmt, message", [
    ("full_gpt2", "peft", "--format peft: supported for one of ia3, lora, prefix, prompt alone; this run used full"),
    ("adapter_gpt2", "merged", "--format merged: adapter cannot be folded into the base weights"),
])
def test_a_format_the_methods_cannot_take_is_refused_before_any_weights_load(trained, tmp_path, monkeypatch, name, fmt,
                                                                             message):
    import dstune.rundir.export as export
    run_dir = trained(name)
    monkeypatch.setattr(export, "load_run", lambda *args, **kwargs: pytest.fail("the weights were loaded"))
    res = run_cli(["export", str(run_dir), "--format", fmt, "--out", str(tmp_path / "out")])
    assert res.returncode == 2 and f"dstune: error: {message}" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_adapters_refuse_to_merge(trained, tmp_path):
    run_dir = trained("adapter_gpt2")
    res = run_cli(["export", str(run_dir), "--format", "merged", "--out", str(tmp_path / "m")])
    assert res.returncode == 2
    assert "dstune: error: --format merged: adapter cannot be folded into the base weights" in res.stderr
    assert not (tmp_path / "m").exists()
    (tmp_path / "a-file").write_text("kept")
    res = run_cli(["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "a-file")])
    assert res.returncode == 2 and f"dstune: error: --out: {tmp_path / 'a-file'} is a file" in res.stderr
    # a damaged trainable.safetensors (in a copy: the module's run stays whole): one line, not a traceback
    import shutil
    run_dir = Path(shutil.copytree(run_dir, tmp_path / "damaged"))
    weights = run_dir / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    res = run_cli(["eval", str(run_dir)])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"dstune: error: {weights}: not a readable safetensors file" in res.stderr


def test_peft_generate_ignores_an_exported_prefix_and_export_says_so(ws, trained, tmp_path):
    """PEFT's forward applies the exported prefix; its generate() (transformers 5.24+) does not."""
    import peft
    run_dir = trained("prefix_llama")
    res = ok(run_cli(["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "peft")]))
    assert "note: PEFT's generate() does not apply prefix adapters" in res.stdout
    base = T.AutoModelForCausalLM.from_pretrained(ws / "llama").eval()
    theirs = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(ws / "llama"), tmp_path / "peft")
    ids = torch.tensor([[2, 5, 10, 4, 17, 9]])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        forward_shift = (theirs.eval()(input_ids=ids).logits[0, -1] - base(input_ids=ids).logits[0, -1]).abs().max()
        first_step = theirs.generate(**kw).scores[0], base.generate(**kw).scores[0], ours(run_dir).generate(**kw).scores[0]
    assert forward_shift > 1e-4  # the prefix changes the next-token logits ...
    assert torch.allclose(first_step[0], first_step[1], atol=1e-6)  # ... but not in PEFT's generate
    assert (first_step[2] - first_step[1]).abs().max() > 1e-4  # dstune's generate applies it


def test_gguf_base_exports_merged_and_as_a_peft_adapter_with_its_base(ws, tiny_gguf, built_ops, tmp_path):
    """On the tiny GGUF file (the real SmolLM2 one, which takes ~30 s per load here, is trained in the prompt and
    prefix tutorial's test)."""
    import peft
    model_dir, gguf_file = tiny_gguf, "tiny.gguf"
    recipe = tmp_path / "gguf.yaml"
    recipe.write_text(json.dumps({
        "task": "causal_lm", "model": {"path": str(model_dir), "gguf_file": gguf_file},
        "data": {"train": str(ws / "lm.jsonl"), "max_length": 24}, "methods": [{"name": "lora", "r": 4}],
        "training": {"precision": "fp32", "max_steps": 2, "lr": 5e-2, "micro_batch_size": 8},
        "output_dir": str(tmp_path / "run")}))
    ok(run_cli(["train", str(recipe)]))
    ok(run_cli(["export", str(tmp_path / "run"), "--format", "merged", "--out", str(tmp_path / "merged")]))
    res = ok(run_cli(["export", str(tmp_path / "run"), "--format", "peft", "--out", str(tmp_path / "peft")]))
    assert f"the base model (dequantized from {gguf_file}) is saved in" in res.stdout
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "peft" / "base")
    mine = ours(tmp_path / "run")
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()  # finds its base by itself
    expected = logits(mine, "causal_lm")
    for theirs in (merged, auto):  # relative to the logits' scale: W + s·BA rounds differently per layer
        assert (logits(theirs, "causal_lm") - expected).abs().max() <= 1e-5 * expected.abs().max()
    res = run_cli(["eval", str(tmp_path / "run")])
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == (
        "dstune: error: --data: the run has no data.eval or data.eval_fraction; name an evaluation file")


@pytest.mark.slow
def test_tiny_runs_reload_exactly_and_export_their_base(ws, built_ops, tmp_path):
    """A model.tiny run's random base is rebuilt from the recipe's seed, under ZeRO-3 on 2 ranks as on 1:
    eval reproduces the end of training, twice alike, and the PEFT export carries the base."""
    import peft
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps({
        "task": "causal_lm", "model": {"tiny": "llama"}, "tokenizer": {"path": str(ws / "tokenizer")},
        "data": {"train": str(ws / "lm.jsonl"), "eval_fraction": 0.25, "max_length": 24},
        "methods": [{"name": "lora", "r": 4}],
        "training": {"precision": "fp32", "max_steps": 3, "lr": 5e-2, "micro_batch_size": 4},
        "output_dir": str(tmp_path / "run")}))
    ends = []
    for run, nproc, overrides in (("one", 1, ["training.gradient_accumulation_steps=2"]), ("zero3", 2, ["deepspeed=zero3"])):
        ok(run_cli(["train", str(recipe), f"output_dir={tmp_path / run}", *overrides], nproc=nproc))
        after = json.loads((tmp_path / run / "results.json").read_text())["after"]["loss"]
        scores = [json.loads(ok(run_cli(["eval", str(tmp_path / run), "--json"])).stdout)["loss"] for _ in range(2)]
        assert scores[0] == scores[1] and abs(scores[0] - after) <= 1e-6, (run, after, scores)
        ends.append(after)
    assert abs(ends[0] - ends[1]) <= 1e-5, ends  # the same base on 1 rank and under ZeRO-3
    ok(run_cli(["export", str(tmp_path / "zero3"), "--format", "peft", "--out", str(tmp_path / "peft")]))
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()
    assert (logits(auto, "causal_lm") - logits(ours(tmp_path / "zero3"), "causal_lm")).abs().max() <= 1e-5
