"""Tuning methods on every family of dstune/families.py (tiny configs): what trains, PEFT parity, zero-init,
merging, export, composition."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from dstune.errors import UserError
from dstune.methods import apply_methods, build_methods, count_trainable, param_groups
from dstune.families import FAMILIES as SPECS
from helpers import MODEL_FAMILIES as FAMILIES
from helpers import SPECIAL, batch, tiny, with_methods, with_methods_list

def refused(family: str, spec: dict) -> bool:
    """Gemma 2 soft-caps its attention logits, which no prefix path computes: prefix tuning refuses it."""
    if spec["name"] != "prefix" or family != "gemma2":
        return False
    with pytest.raises(UserError, match=r"^methods \(prefix\): gemma2 soft-caps its attention logits"):
        with_methods(family, spec)
    return True


def grads_after_backward(model, task) -> set[str]:
    model(**batch(task)).loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


EXPECT = {  # method spec → predicate on the names that must (and alone may) get gradients
    "full": ({"name": "full"}, lambda n: True),
    "freeze": ({"name": "freeze", "layers": 1}, lambda n: ".0." not in n and not any(
        e in n for e in ("_embeddings.weight", "embed_tokens", "wte", "wpe"))),
    "bitfit": ({"name": "bitfit"}, lambda n: n.endswith(".bias") or n.startswith(("classifier", "score"))),
    "lora": ({"name": "lora", "r": 4}, lambda n: ".lora_" in n or n.startswith(("classifier", "score"))),
    "ia3": ({"name": "ia3"}, lambda n: ".ia3_l." in n or n.startswith(("classifier", "score"))),
    "adapter": ({"name": "adapter", "bottleneck": 8}, lambda n: ".adapter." in n or n.startswith(("classifier", "score"))),
    "prompt": ({"name": "prompt", "num_virtual_tokens": 3}, lambda n: "dstune_prompt" in n or n.startswith(("classifier", "score"))),
    "prefix": ({"name": "prefix", "num_virtual_tokens": 3}, lambda n: "dstune_prefix" in n or n.startswith(("classifier", "score"))),
    "prefix_ungated": ({"name": "prefix", "num_virtual_tokens": 3, "gate": False},
                       lambda n: "dstune_prefix" in n or n.startswith(("classifier", "score"))),
    "prefix_mlp": ({"name": "prefix", "num_virtual_tokens": 3, "projection": True, "projection_hidden": 8},
                   lambda n: "dstune_prefix" in n or n.startswith(("classifier", "score"))),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(EXPECT))
def test_only_intended_parameters_get_gradients(family, method):
    if refused(family, EXPECT[method][0]):
        return
    if method == "bitfit" and not any(n.endswith(".bias") for n, _ in tiny(family)[0].named_parameters()):
        with pytest.raises(UserError, match="nothing trains"):  # Llama and most decoders since have no biases
            with_methods(family, EXPECT[method][0])
        return
    model, task = with_methods(family, EXPECT[method][0])
    intended = {n for n, _ in model.named_parameters() if EXPECT[method][1](n)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == intended
    got = grads_after_backward(model, task)
    # zero-initialised up-projections block the gradient of the layer below them at step 0
    blocked = {n for n in intended if method == "adapter" and ".down." in n} | \
              {n for n in intended if method == "lora" and ".lora_A." in n} | \
              {n for n in intended if method.startswith("prefix") and "dstune_prefix" in n and ".gate." not in n}
    assert got <= intended and intended - blocked <= got | {n for n in intended if n.endswith(".bias")}


def _peft_count(family: str, config) -> int:
    import peft
    model, task = tiny(family)
    config.task_type = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
    return count_trainable(peft.get_peft_model(model, config))[0]


# PEFT 0.21 has no LoRA/IA3 defaults for Phi-3 and Qwen2-MoE and none it can apply to Mixtral in
# transformers 5, and its all-linear also adapts MoE routers and fused experts (dstune's is nn.Linear layers
# only: families.MOE_NOTE): there PEFT is given dstune's targets by name, and the counts must still agree
NAMED_FOR_PEFT = {"phi3", "qwen2_moe", "mixtral"}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_lora_trainable_count_equals_peft(family, targets):
    import peft
    model, _, (method,) = with_methods_list(family, {"name": "lora", "r": 4, "target_modules": targets})
    named = list(method.wrapped) if family in NAMED_FOR_PEFT else targets
    assert count_trainable(model)[0] == _peft_count(family, peft.LoraConfig(r=4, lora_alpha=8, target_modules=named))
    dora, _, _ = with_methods_list(family, {"name": "lora", "r": 4, "target_modules": targets, "use_dora": True})
    assert count_trainable(dora)[0] == _peft_count(family, peft.LoraConfig(r=4, lora_alpha=8, target_modules=named,
                                                                           use_dora=True))


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True},
                                     {"use_dora": True, "use_rslora": True, "dropout": 0.1}], ids=["dora", "rslora", "both"])
def test_lora_variants_train_as_peft_does(family, variant):
    """The same weights in dstune and PEFT give the same loss and the same gradients for A, B and DoRA's
    magnitude (PEFT holds the row norm constant in the backward; so does dstune), dropout included."""
    import peft
    spec = {"name": "lora", "r": 4, "alpha": 16, "target_modules": "all-linear", **variant}
    ours, task, method = as_if_trained(family, spec)
    base, _ = tiny(family)
    theirs = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=variant.get("dropout", 0.0), target_modules=list(method.wrapped),
        use_dora=variant.get("use_dora", False), use_rslora=variant.get("use_rslora", False),
        fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM"))
    adapter = method.peft_adapter(ours, task)
    assert not peft.set_peft_model_state_dict(theirs, adapter.tensors).unexpected_keys
    ours.train(), theirs.train()
    losses = []
    for model in (ours, theirs):
        torch.manual_seed(11)   # the same dropout masks
        losses.append(model(**batch(task)).loss)
        losses[-1].backward()
    assert abs(losses[0].item() - losses[1].item()) < 1e-5
    grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad for n, p in theirs.named_parameters()
             if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            g = grads[n]
            assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4), (n, (p.grad - g).abs().max())


def test_loraplus_gives_b_a_larger_learning_rate():
    model, _, methods = with_methods_list("llama", {"name": "lora", "r": 4, "loraplus_lr_ratio": 16})
    lrs = {n: g["lr"] for g in param_groups(model, methods, 1e-4, 0.0) for n in g["names"]}
    assert lrs and all(lr == pytest.approx(16e-4 if ".lora_B." in n else 1e-4) for n, lr in lrs.items())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ia3_trainable_count_equals_peft(family):
    import peft
    model, _, (method,) = with_methods_list(family, {"name": "ia3"})
    named = {"target_modules": method.targets, "feedforward_modules": method.feedforward} \
        if family in NAMED_FOR_PEFT else {}
    assert count_trainable(model)[0] == _peft_count(family, peft.IA3Config(**named))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("spec,config", [
    ({"name": "prompt", "num_virtual_tokens": 5}, lambda: __import__("peft").PromptTuningConfig(num_virtual_tokens=5)),
    ({"name": "prefix", "num_virtual_tokens": 5, "gate": False},
     lambda: __import__("peft").PrefixTuningConfig(num_virtual_tokens=5)),
    ({"name": "prefix", "num_virtual_tokens": 5, "projection": True, "projection_hidden": 16, "gate": False},
     lambda: __import__("peft").PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16)),
], ids=["prompt", "prefix", "prefix_mlp"])
def test_prompt_and_prefix_trainable_counts_equal_peft(family, spec, config):
    if refused(family, spec):
        return
    assert count_trainable(with_methods(family, spec)[0])[0] == _peft_count(family, config())


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "bert"])
@pytest.mark.parametrize("spec", [{"name": "prefix", "num_virtual_tokens": 3}, {"name": "prompt", "num_virtual_tokens": 3}])
def test_prefix_and_prompt_work_with_activation_checkpointing(family, spec):
    if refused(family, spec):
        return
    results = []
    for ckpt in (False, True):
        model, task = with_methods(family, spec)
        if getattr(getattr(model, "dstune_prefix", None), "gate", None) is not None:
            model.dstune_prefix.gate.weight.data.fill_(0.5)   # opened, as after some steps: every part gets a gradient
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        loss = model(**batch(task)).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) < 1e-6 and g0.keys() == g1.keys()
    assert all(torch.allclose(g0[n], g1[n], atol=1e-6) for n in g0) and all(g0[n].abs().sum() > 0 for n in g0)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "bert"])
@pytest.mark.parametrize("spec", [{"name": "prefix", "num_virtual_tokens": 3},
                                  {"name": "prefix", "num_virtual_tokens": 3, "gate": False},
                                  {"name": "prompt", "num_virtual_tokens": 3}], ids=["prefix", "prefix_ungated", "prompt"])
def test_generation_with_cache_equals_without(family, spec):
    if refused(family, spec):
        return
    model, _ = with_methods(family, spec)
    ids = torch.randint(4, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**kw, **model.dstune_generate_kwargs)
    without = model.generate(**{**kw, "use_cache": False})
    assert with_cache.shape == (1, 11) and torch.equal(with_cache, without)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("spec", [{"name": "lora", "r": 4}, {"name": "lora", "r": 4, "use_dora": True},
                                  {"name": "ia3"}, {"name": "adapter", "bottleneck": 8},
                                  {"name": "adapter", "style": "pfeiffer", "bottleneck": 8}])
def test_zero_initialised_methods_leave_logits_unchanged(family, spec):
    base, task = tiny(family)
    model, _ = with_methods(family, spec)
    x = batch(task)
    with torch.no_grad():
        assert torch.equal(base(**x).logits, model(**x).logits)


def as_if_trained(family: str, spec: dict):
    """A model with the method applied and its zero-initialised parts (LoRA's B, IA3's scales, DoRA's
    magnitudes) moved."""
    model, task, (method,) = with_methods_list(family, spec)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "ia3_l" in n:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "ia3_l" in n else 0.0))
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    return model, task, method


MERGEABLE = [{"name": "lora", "r": 4, "target_modules": "all-linear"}, {"name": "lora", "r": 4}, {"name": "ia3"},
             {"name": "lora", "r": 4, "use_dora": True, "target_modules": "all-linear"},
             {"name": "lora", "r": 4, "alpha": 16, "use_rslora": True}]
MERGEABLE_IDS = ["lora_all", "lora", "ia3", "dora", "rslora"]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("spec", MERGEABLE, ids=MERGEABLE_IDS)
def test_merged_weights_reproduce_the_adapted_model(family, spec):
    model, task, method = as_if_trained(family, spec)
    merged = method.merged_state(model)
    plain, _ = tiny(family)
    plain.load_state_dict({**plain.state_dict(), **merged})
    x = batch(task)
    with torch.no_grad():
        assert (plain(**x).logits - model(**x).logits).abs().max() < 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("spec", MERGEABLE, ids=MERGEABLE_IDS)
def test_peft_loads_the_exported_adapter_with_the_same_logits(family, spec, tmp_path):
    import peft

    from dstune.rundir.export import write_peft_folder
    model, task, method = as_if_trained(family, spec)
    adapter = method.peft_adapter(model, task)
    head = {"task_type": "CAUSAL_LM"} if task == "causal_lm" else {"task_type": "SEQ_CLS",
                                                                    "modules_to_save": ["classifier", "score"]}
    write_peft_folder(tmp_path, {**head, **adapter.config}, adapter.tensors)
    loaded = peft.PeftModel.from_pretrained(tiny(family)[0], tmp_path).eval()
    x = batch(task)
    with torch.no_grad():
        ours = model(**x).logits
        tol = 1e-4 * ours.abs().max()   # relative: a tiny BERT's logits are about 0.01
        assert (loaded(**x).logits - ours).abs().max() < tol
        assert (tiny(family)[0](**x).logits - ours).abs().max() > tol   # and the adapter does something


def test_layerwise_lr_decays_from_the_top():
    model, _, methods = with_methods_list("llama", {"name": "full"}, {"name": "layerwise_lr", "decay": 0.5})
    groups = param_groups(model, methods, 1.0, 0.0)
    lr_of = {n: g["lr"] for g in groups for n in g["names"]}
    assert lr_of["model.layers.1.mlp.down_proj.weight"] == 1.0
    assert lr_of["model.layers.0.mlp.down_proj.weight"] == 0.5
    assert lr_of["model.embed_tokens.weight"] == 0.25
    assert lr_of["lm_head.weight"] == 1.0 and lr_of["model.norm.weight"] == 1.0


def test_weight_decay_skips_biases_and_norms():
    model, _ = with_methods("gpt2", {"name": "full"})
    groups = param_groups(model, build_methods([{"name": "full"}]), 1e-3, 0.1)
    decay_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert decay_of["transformer.h.0.attn.c_attn.weight"] == 0.1
    assert decay_of["transformer.h.0.attn.c_attn.bias"] == 0.0
    assert decay_of["transformer.h.0.ln_1.weight"] == 0.0


@pytest.mark.parametrize("specs,message", [
    ([{"name": "full"}, {"name": "freeze"}], r"methods: full and freeze cannot be combined"),
    ([{"name": "layerwise_lr"}], r"methods: layerwise_lr needs one of full, freeze"),
    ([{"name": "lora"}, {"name": "lora"}], r"methods: lora is listed twice"),
    ([{"name": "lora", "rank": 4}], r"methods\[0\] \(lora\)\.rank: unknown option; lora's options: r, alpha, "),
    ([{"name": "lora", "alpah": 4}], r"methods\[0\] \(lora\)\.alpah: unknown option \(did you mean 'alpha'\?\)"),
    ([{"name": "lroa"}], r"methods\[0\]\.name: unknown method 'lroa' \(did you mean 'lora'\?\); known: adapter, "),
    ([{"name": "lora", "r": 0}], r"methods\[0\] \(lora\)\.r: Input should be greater than 0"),
])
def test_impossible_combinations_and_bad_options_are_config_errors(specs, message):
    with pytest.raises(UserError, match=message):
        build_methods(specs)


def test_lora_with_unknown_target_says_so():
    with pytest.raises(UserError, match=r"target_modules: \['nope'\] matches no linear layer"):
        with_methods("llama", {"name": "lora", "target_modules": ["nope"]})


def test_a_family_not_in_the_table_is_discovered_from_its_module_tree():
    """OPT is not in dstune/families.py: prefixes find its blocks and self-attention; LoRA without targets
    names the linear layers it found; with targets it trains."""
    config = T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
                         word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.0, **SPECIAL)
    assert config.model_type not in SPECS  # dstune's family table

    def opt(*specs):
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(config).eval()
        apply_methods(model, build_methods(list(specs)), "causal_lm")
        return model
    with pytest.raises(UserError, match=r"^methods \(lora\)\.target_modules: no default for model type 'opt' "
                                        r"\(discovered: 2 blocks at model\.decoder\.layers, self-attention 'self_attn', "
                                        r"linear layers fc1, fc2, k_proj, out_proj, q_proj, v_proj\); set target_modules"):
        opt({"name": "lora"})
    assert count_trainable(opt({"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}))[0] == 2 * 2 * 2 * 4 * 32
    prefixed = opt({"name": "prefix", "num_virtual_tokens": 3, "gate": False})
    assert count_trainable(prefixed)[0] == 3 * 2 * 2 * 32   # P × layers × (key, value) × width
    grads = grads_after_backward(prefixed, "causal_lm")
    assert grads == {"dstune_prefix.embedding.weight"}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_a_soft_prompt_starts_from_real_token_embeddings(family):
    """By default (PEFT's SAMPLE_VOCAB) each virtual token is some vocabulary token's input embedding, drawn
    from the run's seed; `init: random` keeps nn.Embedding's N(0, 1)."""
    def prompt(**options):
        torch.manual_seed(3)
        model, _ = with_methods(family, {"name": "prompt", "num_virtual_tokens": 6, **options})
        return model.dstune_prompt.embedding.weight.detach(), model.get_input_embeddings().weight.detach()
    rows, vocab = prompt()
    assert all(any(torch.equal(r, v) for v in vocab) for r in rows)
    assert torch.equal(prompt()[0], rows)                          # the same seed, the same tokens
    random, vocab = prompt(init="random")
    assert not any(torch.equal(r, v) for r in random for v in vocab)


class WordIds:
    """A stand-in tokenizer: word n of the text is token 10 + n (the test needs ids, not a vocabulary)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [10 + i for i, _ in enumerate(text.split())]}


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral", "phi3"])
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "mlp"])
def test_a_prefix_from_text_is_the_base_model_reading_that_text_first(family, projection):
    """prefix.init_text: the prefix starts as the keys and values of the text in every layer, so at step 0
    the model on x gives the base model's logits on [text; x] (at x's positions)."""
    from dstune.methods import apply_methods, build_methods
    text = "one two three four five"   # 5 words: tokens 10..14, P = 5
    base, task = tiny(family)
    model, _ = tiny(family)
    methods = build_methods([{"name": "prefix", "num_virtual_tokens": 5, "init_text": text, "projection": projection,
                              "projection_hidden": 16, "gate": False}])
    apply_methods(model, methods, task, WordIds())
    x = torch.randint(20, 100, (2, 7), generator=torch.Generator().manual_seed(4))
    both = torch.cat([torch.arange(10, 15).expand(2, -1), x], dim=1)
    with torch.no_grad():
        ours = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        reference = base(input_ids=both, attention_mask=torch.ones_like(both)).logits[:, 5:]
    assert (ours - reference).abs().max() < 1e-4, (ours - reference).abs().max()
    assert any(p.requires_grad for p in model.dstune_prefix.parameters())


def test_a_decoders_prefix_starts_from_the_first_training_inputs_by_default():
    """Without init_text a decoder's prefix starts as the keys and values of the run's first training input
    tokens (repeated to P where there are fewer): the same prefix as init_text of those tokens; `init: random`
    and a run without data (a reloaded run dir) start at random, as an encoder's does unless told."""
    def prefix(spec: dict, tokenizer=None, inputs=None, family: str = "llama") -> torch.Tensor:
        model, task = tiny(family)
        apply_methods(model, build_methods([{"name": "prefix", "num_virtual_tokens": 5, "gate": False, **spec}]),
                      task, tokenizer, inputs)
        return model.dstune_prefix().detach()
    first = lambda n: [10, 11, 12][:n]  # noqa: E731  (three input tokens in all)
    from_data = prefix({}, inputs=first)
    assert torch.equal(from_data, prefix({"init_text": "a b c"}, WordIds()))
    assert not torch.equal(from_data, prefix({"init_text": "a b c d"}, WordIds()))
    assert not torch.equal(from_data, prefix({"init": "random"}, inputs=first))
    assert torch.equal(prefix({"init": "random"}, inputs=first), prefix({}))   # torch.manual_seed(0) in tiny
    assert torch.equal(prefix({}, inputs=first, family="bert"), prefix({"init": "random"}, family="bert"))
    assert torch.equal(prefix({"init": "data"}, inputs=first, family="bert"),
                       prefix({"init_text": "a b c"}, WordIds(), family="bert"))


def test_leading_inputs_are_each_rows_prompt_then_the_next_row():
    from dstune.data.batching import IGNORE
    from dstune.prepare.pipeline import TaskData
    chat = TaskData(train=[{"input_ids": [1, 2, 3, 4], "labels": [IGNORE, IGNORE, 3, 4]},
                           {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}], eval=None)
    assert chat.leading_inputs(10) == [1, 2, 5] and chat.leading_inputs(2) == [1, 2]
    text = TaskData(train=[{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}], eval=None)
    assert text.leading_inputs(3) == [1, 2, 3] and text.leading_inputs(9) == [1, 2, 3, 4]
    classes = TaskData(train=[{"input_ids": [101, 7, 102], "labels": 1}], eval=None)
    assert classes.leading_inputs(2) == [101, 7]


def test_prefix_init_text_needs_a_tokenizer_and_tokens():
    with pytest.raises(UserError, match=r"methods \(prefix\)\.init_text: needs the run's tokenizer"):
        with_methods("llama", {"name": "prefix", "init_text": "hello"})
    model, task = tiny("llama")
    with pytest.raises(UserError, match=r"methods \(prefix\)\.init_text: the text has no tokens"):
        apply_methods(model, build_methods([{"name": "prefix", "init_text": " "}]), task, WordIds())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_gated_prefix_starts_as_the_base_model_and_opens(family):
    """The default prefix adds its attention through a zero gate: step 0 gives the base model's logits bit
    for bit and only the gate gets a gradient; once open, the prefix changes the output and learns."""
    if refused(family, {"name": "prefix"}):
        return
    base, task = tiny(family)
    model, _ = with_methods(family, {"name": "prefix", "num_virtual_tokens": 3})
    x = batch(task)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, base(**x).logits)
    assert {n for n in grads_after_backward(model, task) if not n.startswith(("classifier", "score"))} \
        == {"dstune_prefix.gate.weight"}
    with torch.no_grad():
        model.dstune_prefix.gate.weight.fill_(0.5)
        assert (model(**x).logits - base(**x).logits).abs().max() > 1e-4
    model.zero_grad()
    assert "dstune_prefix.embedding.weight" in grads_after_backward(model, task)


def test_a_gated_prefix_has_no_peft_form_and_no_attention_path():
    model, task, (method,) = with_methods_list("llama", {"name": "prefix", "num_virtual_tokens": 3})
    with pytest.raises(UserError, match=r"^--format peft: a gated prefix .* train with gate: false"):
        method.peft_adapter(model, task)
    with pytest.raises(UserError, match=r"^methods\[0\] \(prefix\): attention: split picks how an ungated prefix "
                                        r"joins the sequence's softmax; a gated prefix has its own attention: set gate: "
                                        r"false to use it$"):
        build_methods([{"name": "prefix", "attention": "split"}])


def test_a_soft_prompt_from_text_repeats_the_texts_token_embeddings():
    model, task = tiny("llama")
    apply_methods(model, build_methods([{"name": "prompt", "num_virtual_tokens": 5, "init_text": "a b"}]), task,
                  WordIds())
    emb = model.get_input_embeddings().weight
    assert torch.equal(model.dstune_prompt.embedding.weight, emb[torch.tensor([10, 11, 10, 11, 10])])
    with pytest.raises(UserError, match=r"^methods \(prompt\)\.init_text: the text has no tokens$"):
        apply_methods(tiny("llama")[0], build_methods([{"name": "prompt", "init_text": " "}]), task, WordIds())


@pytest.mark.parametrize("position,at", [("auto", 1), ("after_first", 1), ("start", 0)])
def test_a_bert_classifiers_soft_prompt_goes_after_cls_unless_told(position, at):
    """BERT's classifier pools the first token: by default the prompt goes after [CLS], so the classifier
    reads [CLS] at position 0; `start` prepends it as PEFT does. Either way the model equals the base model
    fed those embeddings."""
    base, task = tiny("bert")
    model, _ = with_methods("bert", {"name": "prompt", "num_virtual_tokens": 3, "position": position})
    x = batch(task)
    with torch.no_grad():
        emb, prompt = base.get_input_embeddings()(x["input_ids"]), model.dstune_prompt(2)
        embeds = torch.cat([emb[:, :at], prompt, emb[:, at:]], dim=1)
        expected = base(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits
        assert torch.allclose(model(**x).logits, expected, atol=1e-6)


def test_a_prompt_after_cls_has_no_peft_form_and_is_for_classifiers_only():
    model, task, (method,) = with_methods_list("bert", {"name": "prompt", "num_virtual_tokens": 3})
    with pytest.raises(UserError, match=r"^--format peft: this soft prompt sits after the input's first token .* "
                                        r"train with position: start to export it$"):
        method.peft_adapter(model, task)
    assert with_methods("llama", {"name": "prompt", "num_virtual_tokens": 3})[0].dstune_prompt.at == 0
    with pytest.raises(UserError, match=r"^methods \(prompt\)\.position: after_first is for classifiers that read "
                                        r"the first token; a causal_lm model's prompt goes at the start$"):
        with_methods("llama", {"name": "prompt", "position": "after_first"})
