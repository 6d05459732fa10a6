"""The estimate's activation term: one training step traced on fake tensors, checked against real steps."""
from __future__ import annotations

import pytest
import torch

from dstune.config import load_config
from dstune.models.loading import prepare_for_training
from dstune.models.loading import weights_dtype
from dstune.planning.activations import default_dtype, trace_step
from dstune.tasks import get_task
from dstune.models.loading import recipe_config
from dstune.planning.estimate import _with_methods, estimate, traced_activations

METHODS = {"full": "[{name: full}]", "lora": "[{name: lora, r: 4, target_modules: all-linear}]",
           "prefix": "[{name: prefix, num_virtual_tokens: 5}]", "prompt": "[{name: prompt, num_virtual_tokens: 5}]"}
TASKS = {"gpt2": "causal_lm", "llama": "causal_lm", "bert": "classification", "t5": "seq2seq"}


def recipe(tmp_path, family: str, method: str = "full", *overrides: str):
    path = tmp_path / "r.yaml"
    path.write_text(f"task: {TASKS[family]}\nmodel: {{tiny: {family}, config_overrides: {{vocab_size: 300}}}}\n"
                    f"data: {{train: unused.jsonl, max_length: 24, max_target_length: 8}}\ntraining: {{precision: fp32}}\n"
                    f"output_dir: {tmp_path / 'run'}\n")
    return load_config(path, [f"methods={METHODS[method]}", *overrides])


def real_step(cfg, micro_batch: int, seq_len: int):
    """The same step on real CPU tensors: a real model, real ids, real autograd."""
    torch.manual_seed(0)
    with default_dtype(weights_dtype(cfg.training.precision)):
        model, _ = _with_methods(cfg, recipe_config(cfg), None)
    prepare_for_training(model, cfg)
    return model, get_task(cfg.task).example_batch(model.config, micro_batch, seq_len, cfg.data.max_target_length)


CASES = [(f, m, p, c) for f in TASKS for m in METHODS for p, c in (("fp32", False), ("bf16", True))
         if not (f == "t5" and m == "prompt")]  # prompt tuning refuses encoder-decoder models


@pytest.mark.parametrize("family,method,precision,checkpointing", CASES,
                         ids=[f"{f}-{m}-{p}{'-ckpt' if c else ''}" for f, m, p, c in CASES])
def test_fake_trace_equals_the_real_step_on_cpu(tmp_path, family, method, precision, checkpointing):
    cfg = recipe(tmp_path, family, method, f"training.precision={precision}",
                 f"training.activation_checkpointing={str(checkpointing).lower()}")
    fake = traced_activations(cfg, 2, 24)
    real = trace_step(*real_step(cfg, 2, 24))
    assert fake == real and fake.peak > fake.after_forward > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_after_forward_is_what_autograd_saves_for_the_backward(tmp_path, family):
    """Counted independently: the storages autograd packs for the backward, plus the loss itself."""
    cfg = recipe(tmp_path, family, "lora")
    model, batch = real_step(cfg, 2, 24)
    existing = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers(), *batch.values()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage()._cdata not in existing:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    assert traced_activations(cfg, 2, 24).after_forward == sum(saved.values()) + loss.untyped_storage().nbytes()


def test_what_a_method_saves_follows_what_trains(tmp_path):
    """Frozen linears save no inputs, checkpointing keeps layer inputs only, the chunked loss no fp32 logits."""
    shape = "model.config_overrides={vocab_size: 4000, hidden_size: 128, intermediate_size: 352, num_hidden_layers: 4}"

    def after_forward(method: str, *more: str) -> int:
        return traced_activations(recipe(tmp_path, "llama", method, shape, "training.precision=bf16", *more),
                                  2, 256).after_forward

    full, lora, prompt = after_forward("full"), after_forward("lora"), after_forward("prompt")
    assert prompt < lora < full
    every_layer = after_forward("full", "training.activation_checkpointing=true")
    every_other = after_forward("full", "training.activation_checkpointing=true",
                                "training.activation_checkpointing_every=2")
    assert every_layer < full / 2 and every_layer < every_other < full
    # transformers' loss keeps fp32 log-probabilities (4 bytes per logit); the chunked one the bf16 logits (2)
    logits = 2 * 256 * 4000
    assert after_forward("full", "training.loss_chunk_tokens=0") - full == pytest.approx(2 * logits, rel=0.01)


# Peak allocated memory of the HF + PEFT + DeepSpeed baseline on one H100 80GB, TinyLlama-1.1B shape, random
# init, ZeRO-2 defaults, bf16, micro-batch 4 x 2048 tokens, transformers' loss, torch fused AdamW (GiB).
H100_PEAKS = {("full", False): 32.6, ("lora", False): 19.0, ("prompt", False): 15.9, ("prefix", False): 17.6,
              ("full", True): 23.1, ("lora", True): 6.45, ("prompt", True): 6.38}


def bench_recipe_estimate(method: str, *overrides: str):
    """recipes/bench_llama_1b.yaml with one of bench's methods, estimated as the allocator sees it (no CUDA
    context: the allocator's peak does not include it)."""
    import json
    from pathlib import Path

    from dstune.methods import bench_presets
    cfg = load_config(Path(__file__).parents[1] / "recipes" / "bench_llama_1b.yaml",
                      [f"methods={json.dumps(bench_presets()[method])}", *overrides])
    (est, *_), _, info = estimate(cfg, 1, cuda=False)
    return est, info


@pytest.mark.parametrize("method,checkpointing", list(H100_PEAKS), ids=[f"{m}{'-ckpt' if c else ''}" for m, c in H100_PEAKS])
def test_estimate_predicts_measured_gpu_peaks_within_10_percent(method, checkpointing):
    """The same settings through `estimate`."""
    est, _ = bench_recipe_estimate(method, "training.loss_chunk_tokens=0", "training.lean_activations=false",
                                   "deepspeed={zero_optimization: {stage: 2}}",
                                   f"training.activation_checkpointing={str(checkpointing).lower()}")
    measured = H100_PEAKS[method, checkpointing] * 2**30
    assert abs(est.total / measured - 1) < 0.10, (est, est.total / 2**30)


# dstune's own runs of recipes/bench_llama_1b.yaml with its defaults (lean activations, chunked loss), same H100
# and shapes: peak allocated (GiB), from `dstune bench` (docs/sample_bench/bench.json). Prefix tuning ran the
# lower-right attention path then (the default at the time).
DSTUNE_H100_PEAKS = {"full": 26.92, "lora": 13.65, "prompt": 10.40, "prefix-lower-right": 10.19}


@pytest.mark.parametrize("method", list(DSTUNE_H100_PEAKS))
def test_estimate_predicts_dstunes_own_gpu_peaks_within_10_percent(method):
    est, info = bench_recipe_estimate(method)
    assert info["activations_source"] == "traced"
    assert abs(est.total / (DSTUNE_H100_PEAKS[method] * 2**30) - 1) < 0.10, (est, est.total / 2**30)


def test_checkpointing_every_other_layer_changes_no_number(tmp_path):
    """Recomputing half the layers gives the plain step's loss and gradients."""
    results = []
    for extra in ([], ["training.activation_checkpointing=true", "training.activation_checkpointing_every=2"]):
        cfg = recipe(tmp_path, "llama", "full", "model.config_overrides={vocab_size: 300, num_hidden_layers: 4}",
                     *extra)
        model, batch = real_step(cfg, 2, 24)
        model.train()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, abs=1e-6) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))
    layers = real_step(cfg, 2, 24)[0].model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, True, False]


def test_lean_activations_keep_exactly_the_redundant_copies_less_and_the_same_loss(tmp_path):
    """Full fine-tuning in bf16. transformers' norm keeps an fp32 copy (4 bytes) and bf16 normalised values
    (2) per element, the lean one the bf16 input (2): 4 bytes less, for 2 norms per layer (2 layers) plus the
    final one. Its SwiGLU keeps silu(gate) besides gate and up: 2 bytes per intermediate element less."""
    def step(lean: bool):
        cfg = recipe(tmp_path, "llama", "full", "training.precision=bf16",
                     f"training.lean_activations={str(lean).lower()}")
        return cfg, traced_activations(cfg, 2, 24)

    (_, lean), (_, plain) = step(True), step(False)
    tokens, hidden, intermediate, layers = 2 * 24, 32, 64, 2
    norms = 4 * tokens * hidden * (2 * layers + 1)
    swiglu = 2 * tokens * intermediate * layers
    assert plain.after_forward - lean.after_forward == norms + swiglu
    losses = []
    for on in (True, False):
        model, batch = real_step(step(on)[0], 2, 24)
        losses.append(model(**batch).loss.item())
    assert losses[0] == losses[1]  # the forward is the same arithmetic


def test_a_model_the_trace_cannot_run_falls_back_to_the_rule_of_thumb(tmp_path, monkeypatch, capsys):
    import dstune.planning.estimate as est
    from dstune.planning.report import estimate_table

    def fail(*args, **kwargs):
        raise RuntimeError("aten.some_op: no fake implementation\nmore detail")

    cfg = recipe(tmp_path, "llama", "full")
    traced = estimate(cfg, 1, cuda=False)[0][0].activations
    monkeypatch.setattr(est, "traced_activations", fail)
    (e, *_), table, info = estimate(cfg, 1, cuda=False)
    assert info["activations_source"] == "rule of thumb: the trace failed (aten.some_op: no fake implementation)"
    assert e.activations == est.rule_of_thumb_activation_bytes(recipe_config(cfg), 8, 24, "fp32", False) != traced
    assert "**activations: rule of thumb: the trace failed" in estimate_table(cfg, e, table, info, 1, None)
