"""A quantized frozen base (model.quantize: nf4, fp4, int8 through bitsandbytes): methods on top compute what
PEFT + bitsandbytes compute (PEFT's QLoRA path is the oracle), the estimate counts the bytes a load holds,
runs train, resume and export, 2 ranks under ZeRO-3 equal 1, and what cannot work is refused in one line."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from helpers import assert_user_error, lm_recipe, ok, read_metrics, run_cli

pytest.importorskip("bitsandbytes")


def dstune_model(folder, mode: str | None, spec: dict, precision: str = "fp32"):
    """The model as a dstune run holds it: the base loaded (quantized), the method applied, DeepSpeed's cast."""
    from dstune.config import RunConfig
    from dstune.methods import apply_methods, build_methods
    from dstune.models.loading import cast_as_deepspeed, load_model

    cfg = RunConfig.model_validate({"task": "causal_lm", "model": {"path": str(folder), "quantize": mode},
                                    "data": {"train": "random"}, "methods": [spec],
                                    "training": {"precision": precision}, "output_dir": "unused"})
    model = load_model(cfg, None, None)
    methods = build_methods(cfg.methods)
    apply_methods(model, methods, "causal_lm")
    torch.manual_seed(5)  # what starts at zero or one (LoRA's B, IA3's scales, DoRA's magnitudes) moved
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return cast_as_deepspeed(model, precision), methods[0]


def peft_qlora(folder, mode: str, method, ours, tmp_path, dtype=torch.float32):
    """PEFT's QLoRA path on the same checkpoint: bitsandbytes loading, prepare_model_for_kbit_training, and
    our adapter's weights loaded as a trainable PEFT adapter."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_8bit=True) if mode == "int8" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=dtype, device_map="cpu")
    base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    from dstune.rundir.export import write_peft_folder

    adapter = method.peft_adapter(ours, "causal_lm")
    write_peft_folder(tmp_path / "adapter", {"task_type": "CAUSAL_LM", **adapter.config}, adapter.tensors)
    prompt_learning = adapter.config["peft_type"] in ("PROMPT_TUNING", "PREFIX_TUNING")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=not prompt_learning)
    if prompt_learning:  # PEFT loads these frozen only
        theirs.prompt_encoder.requires_grad_(True)
    return theirs


def forward_backward(model, vocab: int):
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n.replace("base_model.model.", "").replace(".default", "").removesuffix(".weight"): p.grad.flatten()
             for n, p in model.named_parameters() if p.requires_grad}
    if len(grads) == 1:  # a prompt or a prefix: one tensor, named differently by each
        grads = {"virtual tokens": next(iter(grads.values()))}
    return out.logits.detach().float(), out.loss.item(), grads


LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}
CASES = {"nf4": ("nf4", LORA), "fp4": ("fp4", LORA), "int8": ("int8", LORA),
         "nf4-dora": ("nf4", {**LORA, "use_dora": True}), "nf4-rslora": ("nf4", {**LORA, "use_rslora": True}),
         "nf4-ia3": ("nf4", {"name": "ia3"}), "nf4-prompt": ("nf4", {"name": "prompt", "num_virtual_tokens": 4}),
         "nf4-prefix": ("nf4", {"name": "prefix", "num_virtual_tokens": 4, "gate": False})}


@pytest.mark.parametrize("mode,spec", list(CASES.values()), ids=list(CASES))
def test_methods_on_a_quantized_base_equal_peft_qlora(ws, tmp_path, mode, spec):
    """Same checkpoint, same quantization, same trained weights and batch: logits, loss and every gradient
    of what trains equal PEFT's prepare_model_for_kbit_training + get_peft_model (fp32 compute)."""
    ours, method = dstune_model(ws / "llama", mode, spec)
    theirs = peft_qlora(ws / "llama", mode, method, ours, tmp_path)
    a, b = forward_backward(ours, ours.config.vocab_size), forward_backward(theirs, ours.config.vocab_size)
    theirs_logits = b[0][:, -a[0].shape[1]:]  # PEFT's prompt tuning returns the virtual tokens' logits too
    assert torch.allclose(a[0], theirs_logits, atol=1e-5), (a[0] - theirs_logits).abs().max()
    assert a[1] == pytest.approx(b[1], abs=1e-5)
    assert a[2].keys() == b[2].keys() and a[2]
    for n in a[2]:
        assert torch.allclose(a[2][n], b[2][n], atol=1e-5, rtol=1e-4), (n, (a[2][n] - b[2][n]).abs().max())
    from dstune.models.quantize import is_quantized
    assert not any(p.requires_grad for m in ours.modules() if is_quantized(m) for p in m.parameters(recurse=False))


def test_bf16_qlora_is_as_close_to_fp32_as_peft_qlora_in_bf16(ws, tmp_path):
    """bf16 compute, PEFT's rounding as the tolerance: with the same weights, dstune's bf16 logits and loss
    are as close to the fp32 computation (where the two are equal) as PEFT's bf16 QLoRA is (dstune holds norms
    and embeddings in bf16, as DeepSpeed does; PEFT's kbit preparation upcasts them to fp32)."""
    ours, method = dstune_model(ws / "llama", "nf4", LORA, precision="bf16")
    theirs = peft_qlora(ws / "llama", "nf4", method, ours, tmp_path, dtype=torch.bfloat16)
    exact, _ = dstune_model(ws / "llama", "nf4", LORA)
    trained = {n: p.float() for n, p in ours.named_parameters() if p.requires_grad}
    assert not exact.load_state_dict(trained, strict=False).unexpected_keys
    vocab = ours.config.vocab_size
    a, b, ref = forward_backward(ours, vocab), forward_backward(theirs, vocab), forward_backward(exact, vocab)
    ours_off, theirs_off = (a[0] - ref[0]).abs().max(), (b[0] - ref[0]).abs().max()
    assert ours_off <= 1.5 * theirs_off, (ours_off, theirs_off)
    assert abs(a[1] - ref[1]) <= 1.5 * abs(b[1] - ref[1]) + 1e-3, (a[1], b[1], ref[1])
    for n in a[2]:
        cos = torch.nn.functional.cosine_similarity(a[2][n], ref[2][n], dim=0)
        assert cos > 0.99, (n, cos)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_the_estimate_counts_the_bytes_a_quantized_load_holds(ws, tmp_path, mode):
    """The estimate quantizes the layers loading quantizes (transformers' rule: not the output head), and
    its weights are the bytes the loaded model holds: packed weights, constants, what stays full precision."""
    from dstune.config import RunConfig
    from dstune.models.quantize import quantized_names
    from dstune.planning.estimate import estimate, meta_model
    from dstune.telemetry.measure import _constants

    spec = {"name": "lora", "r": 4}
    ours, _ = dstune_model(ws / "llama", mode, spec)
    cfg = RunConfig.model_validate({"task": "causal_lm", "model": {"path": str(ws / "llama"), "quantize": mode},
                                    "data": {"train": "random"}, "methods": [spec], "deepspeed": "zero0",
                                    "training": {"precision": "fp32"}, "output_dir": str(tmp_path / "x")})
    meta, _ = meta_model(cfg)
    assert quantized_names(meta) == quantized_names(ours) and "lm_head" not in quantized_names(ours)
    held = sum(p.untyped_storage().nbytes() + sum(c.untyped_storage().nbytes() for c in _constants(p))
               for p in ours.parameters())
    [est], table, _ = estimate(cfg, 1, cuda=False)
    assert est.weights == held
    full = RunConfig.model_validate({**cfg.model_dump(), "model": {"path": str(ws / "llama")}})
    [plain], plain_table, _ = estimate(full, 1, cuda=False)
    assert table.total == plain_table.total  # the same parameters, held in fewer bytes
    assert est.weights < plain.weights


def test_qlora_trains_exports_and_peft_loads_the_adapter_on_the_quantized_base(ws, tmp_path):
    """1 rank: the LoRA on an nf4 base learns; its checkpoint holds only LoRA; eval scores it; the merged
    export equals the quantized run (dequantized base + update) and says how far the full-precision base
    is; the PEFT adapter on PEFT's own nf4 load of the base gives the run's logits."""
    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from dstune.rundir.load import load_run

    recipe = lm_recipe(ws, tmp_path, "q", methods=[LORA], model="llama", eval_fraction=0.25, max_steps=8, lr=1e-2)
    ok(run_cli(["train", recipe, "model.quantize=nf4"]))
    info = json.loads((tmp_path / "q" / "run.json").read_text())
    full = AutoModelForCausalLM.from_pretrained(ws / "llama")
    assert info["base_params"] == sum(p.numel() for p in full.parameters())  # whole weights, not packed elements
    results = json.loads((tmp_path / "q" / "results.json").read_text())
    assert results["after"]["loss"] < results["before"]["loss"] - 0.03, results  # held-out rows
    saved = load_file(tmp_path / "q" / "trainable.safetensors")
    assert saved and all("lora_" in k for k in saved), sorted(saved)[:4]
    ok(run_cli(["eval", str(tmp_path / "q"), "--json"]))

    res = ok(run_cli(["export", str(tmp_path / "q"), "--format", "merged", "--out", str(tmp_path / "merged")]))
    shift = float(res.stdout.split("max |Δ logit| against the quantized run ")[1].split()[0])
    assert shift < 1e-4, res.stdout
    assert "on the full-precision base the same update moves them by up to" in res.stdout
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())

    ok(run_cli(["export", str(tmp_path / "q"), "--format", "peft", "--out", str(tmp_path / "peft")]))
    run = load_run(str(tmp_path / "q"))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(ws / "llama", quantization_config=q, device_map="cpu")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(run.model(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "freeze", "bitfit"])
def test_methods_that_train_the_base_are_refused_on_a_quantized_base(ws, tmp_path, method):
    recipe = lm_recipe(ws, tmp_path, "run", methods=[{"name": method}], model="llama", max_steps=1)
    res = run_cli(["train", recipe, "model.quantize=nf4"])
    assert_user_error(res, re.escape(f"methods: {method} trains the base's own weights, which model.quantize nf4 holds "
                           "frozen in quantized form; on a quantized base train lora"), tmp_path / "run")
    res = run_cli(["estimate", recipe, "model.quantize=nf4", "--cpu"])
    assert res.returncode == 2 and f"methods: {method} trains the base's own weights" in res.stderr


def test_a_checkpoint_saved_quantized_trains_as_such_and_others_are_refused(ws, tmp_path):
    """A bitsandbytes checkpoint (config.json's quantization_config) is read as the quantized base it is;
    a GPTQ one, or a model.quantize that contradicts the checkpoint, is refused in one line."""
    import shutil

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    saved = tmp_path / "llama-nf4"
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    AutoModelForCausalLM.from_pretrained(ws / "llama", quantization_config=q, device_map="cpu").save_pretrained(saved)
    shutil.copy(ws / "llama" / "tokenizer.json", saved)
    shutil.copy(ws / "llama" / "tokenizer_config.json", saved)
    recipe = lm_recipe(ws, tmp_path, "run", methods=[{"name": "lora", "r": 4}], model="llama", max_steps=2)
    ok(run_cli(["train", recipe, f"model.path={saved}"]))
    res = ok(run_cli(["export", str(tmp_path / "run"), "--format", "merged", "--out", str(tmp_path / "m")]))
    assert "merged into the dequantized nf4 base" in res.stdout and "full-precision base" not in res.stdout

    res = run_cli(["train", recipe, f"model.path={saved}", "model.quantize=int8", f"output_dir={tmp_path / 'b'}"])
    assert_user_error(res, re.escape(f"model.quantize: int8, but {saved} holds weights saved quantized as nf4; set "
                           "model.quantize: nf4 (or leave it out)"), tmp_path / "b")
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq",
                                                                                     "bits": 4}}))
    res = run_cli(["train", recipe, f"model.path={saved}", f"output_dir={tmp_path / 'c'}"])
    assert_user_error(res, re.escape("model.path: the checkpoint is gptq-quantized; dstune trains on a bitsandbytes "
                           "checkpoint (nf4, fp4, int8)"), tmp_path / "c")


def test_without_bitsandbytes_model_quantize_is_refused_in_one_line(ws, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    recipe = lm_recipe(ws, tmp_path, "run", methods=[{"name": "lora", "r": 4}], model="llama", max_steps=1)
    res = run_cli(["train", recipe, "model.quantize=nf4"])
    assert_user_error(res, re.escape("model.quantize nf4: needs bitsandbytes (pip install 'bitsandbytes>=0.49')"),
                      tmp_path / "run")


def test_a_mode_the_platform_cannot_run_is_refused_in_one_line(ws, tmp_path, monkeypatch):
    """Whatever bitsandbytes refuses on this device and dtype is found by a 64×64 probe before loading."""
    import bitsandbytes

    def refuse(*args, **kwargs):
        raise RuntimeError("no kernel for this device\nsecond line")
    monkeypatch.setattr(bitsandbytes, "matmul_4bit", refuse)
    recipe = lm_recipe(ws, tmp_path, "run", methods=[{"name": "lora", "r": 4}], model="llama", max_steps=1)
    res = run_cli(["train", recipe, "model.quantize=fp4"])
    assert_user_error(res, re.escape(f"model.quantize fp4: bitsandbytes {bitsandbytes.__version__} cannot run it here "
                           "(cpu, float32): no kernel for this device"), tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_equal_one_and_resume_exactly_on_a_quantized_base(ws, built_ops, tmp_path, stage):
    """nf4 + LoRA: 2 ranks (ZeRO-2: the base replicated; ZeRO-3: partitioned, its 4-bit storage gathered per
    layer) log the losses of 1 rank with the same global batch, stopped at step 2 and resumed, then with the
    newest checkpoint damaged resumed from the one before; checkpoints hold LoRA only; the estimate's weights
    are the bytes each rank holds (memory.json)."""
    lora = [{"name": "lora", "r": 4, "target_modules": "all-linear"}]
    one = lm_recipe(ws, tmp_path, "one", None, methods=lora, model="llama", max_steps=6, micro_batch_size=4)
    ok(run_cli(["train", one, "model.quantize=nf4"]))
    two = lm_recipe(ws, tmp_path, "two", stage, methods=lora, model="llama", max_steps=4, checkpoint_every=2)
    ok(run_cli(["train", two, "model.quantize=nf4", "training.max_steps=2"], nproc=2))
    res = ok(run_cli(["train", two, "model.quantize=nf4"], nproc=2))
    assert "resumed from step_00000002 (step 2)" in res.stdout
    ckpt = tmp_path / "two" / "checkpoints" / "step_00000004"
    states = torch.load(next(ckpt.glob("*model_states.pt")), weights_only=False)
    kept = [k for k, v in (states["module"] or {}).items() if v.numel() and k not in states["buffer_names"]]
    assert all("lora_" in k for k in kept), kept[:5]
    shard = next(ckpt.glob("*rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    res = ok(run_cli(["train", two, "model.quantize=nf4", "training.max_steps=6"], nproc=2))
    assert "resuming from the previous complete one, step_00000002" in res.stdout
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-5, (step, a[step], b[step])
    measured = json.loads((tmp_path / "two" / "memory.json").read_text())["after_first_step"]
    predicted = json.loads(ok(run_cli(["estimate", two, "model.quantize=nf4", "--world-size", "2", "--cpu",
                                       "--json"])).stdout)
    assert [m["weights"] for m in measured] == [p["weights"] for p in predicted]


def test_task_heads_and_the_output_head_stay_in_full_precision(ws, tmp_path):
    """A classifier with a bias (BERT's), which transformers' rule alone would quantize, stays full precision
    and trains; the estimate quantizes the same layers as the load."""
    from dstune.config import RunConfig
    from dstune.methods import apply_methods, build_methods
    from dstune.models.loading import load_model
    from dstune.models.quantize import quantized_names
    from dstune.planning.estimate import meta_model

    cfg = RunConfig.model_validate({"task": "classification", "model": {"path": str(ws / "bert"), "quantize": "nf4"},
                                    "data": {"train": "random"}, "methods": [{"name": "lora"}],
                                    "training": {"precision": "fp32"}, "output_dir": str(tmp_path / "x")})
    model = load_model(cfg, None, ["a", "b"])
    apply_methods(model, build_methods(cfg.methods), "classification")
    names = quantized_names(model)
    assert names and not [n for n in names if n.startswith("classifier")]
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    assert quantized_names(meta_model(cfg, None, ["a", "b"])[0]) == names


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_the_estimate_equals_what_a_run_holds_after_its_first_step(ws, tmp_path, mode):
    """memory.json's weights (the packed weights, their constants, and int8's row scales, which bitsandbytes
    moves onto the layer once it has run) are the estimate's, byte for byte."""
    recipe = lm_recipe(ws, tmp_path, "run", methods=[{"name": "lora", "r": 4}], model="llama", max_steps=1)
    ok(run_cli(["train", recipe, f"model.quantize={mode}"]))
    [measured] = json.loads((tmp_path / "run" / "memory.json").read_text())["after_first_step"]
    [predicted] = json.loads(ok(run_cli(["estimate", recipe, f"model.quantize={mode}", "--cpu", "--json"])).stdout)
    assert measured["weights"] == predicted["weights"]


def test_dpo_on_a_quantized_base_steps_the_lora_aside_for_its_reference(ws, tmp_path):
    """Preference tuning on an nf4 base: the reference is the quantized base itself (LoRA stepped aside), so
    the policy equals it before the first step, and DPO moves the held-out margins."""
    words = ["good", "great", "fine", "bad", "awful", "dull"]
    rows = [{"prompt": f"say {w}", "chosen": f"{w} {w} it is", "rejected": f"{words[(i + 3) % 6]} it is not"}
            for i, w in enumerate(words * 8)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(json.dumps({
        "task": "preference", "model": {"path": str(ws / "llama"), "quantize": "nf4"},
        "data": {"train": str(data), "max_length": 24, "eval_fraction": 0.25},
        "methods": [{"name": "lora", "r": 4, "alpha": 8}], "preference": {"loss": "dpo"},
        "training": {"precision": "fp32", "max_steps": 6, "micro_batch_size": 4, "lr": 5e-3, "seed": 3},
        "evaluation": {"batch_size": 8}, "output_dir": str(tmp_path / "dpo")}))
    res = ok(run_cli(["train", str(recipe)]))
    assert "reference: the model with lora stepped aside, no second copy" in res.stdout
    results = json.loads((tmp_path / "dpo" / "results.json").read_text())
    assert results["before"]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert results["after"]["rewards/margins"] > 0
