"""`dstune estimate` predicts the model-state bytes DeepSpeed really holds on each rank, PEFT-aware."""
from __future__ import annotations

import json

import pytest

from helpers import lm_recipe, ok, run_cli

METHODS = {"full": [{"name": "full"}], "lora": [{"name": "lora", "r": 4, "target_modules": "all-linear"}],
           "prefix": [{"name": "prefix", "num_virtual_tokens": 5}]}
CASES = [(2, s, m) for s in (1, 2, 3) for m in METHODS] + [(4, 2, "lora"), (4, 3, "prefix")]


@pytest.mark.slow
@pytest.mark.parametrize("world,stage,method", CASES, ids=[f"w{w}-zero{s}-{m}" for w, s, m in CASES])
def test_estimate_equals_bytes_the_engine_holds(ws, built_ops, tmp_path, world, stage, method):
    recipe = lm_recipe(ws, tmp_path, "run", stage, methods=METHODS[method], max_steps=1, micro_batch_size=1,
                       weight_decay=0.1)  # two optimizer groups (decay / no decay): two padded flat buffers
    ok(run_cli(["train", recipe], nproc=world))
    measured = json.loads((tmp_path / "run" / "memory.json").read_text())["after_first_step"]
    predicted = json.loads(ok(run_cli(["estimate", recipe, "--world-size", str(world), "--cpu", "--json"])).stdout)
    assert len(measured) == len(predicted) == world
    for m, p in zip(measured, predicted):
        assert m["weights"] == p["weights"], (m, p)
        assert m["optimizer_states"] == p["optimizer_states"], (m, p)
        if stage == 3:  # ZeRO-3 keeps a flat gradient partition; ZeRO-1/2 gradients are gone after the step
            assert m["gradients"] == p["gradients"], (m, p)
    phases = json.loads((tmp_path / "run" / "memory.json").read_text())["phase_peaks"]
    assert [r["rank"] for r in phases] == list(range(world))
    assert all(set(r["rss"]) == {"init", "forward", "backward", "step"} for r in phases)
    if method != "full":  # frozen weights hold no optimizer state: full fine-tuning would hold 3× the weights
        assert p["optimizer_states"] < p["weights"]


NEW_FAMILIES = ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "qwen2_moe", "mixtral"]


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_estimate_equals_bytes_the_engine_holds_for_every_family(built_ops, tmp_path, family):
    """Tiny random models of each family (MoE: every expert's weights and Adam states are held, LoRA on the
    dense ones): the estimate's model states are the engine's, byte for byte."""
    method = [{"name": "full"}] if family.endswith(("moe", "mixtral")) else METHODS["lora"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "task": "causal_lm", "model": {"tiny": family, "config_overrides": {"vocab_size": 300}},
        "data": {"train": "random", "max_length": 16}, "deepspeed": "zero2", "methods": method,
        "training": {"precision": "fp32", "max_steps": 1, "micro_batch_size": 1, "weight_decay": 0.1},
        "output_dir": str(tmp_path / "run")}))
    ok(run_cli(["train", str(recipe)]))
    [measured] = json.loads((tmp_path / "run" / "memory.json").read_text())["after_first_step"]
    [predicted] = json.loads(ok(run_cli(["estimate", str(recipe), "--world-size", "1", "--cpu", "--json"])).stdout)
    assert (measured["weights"], measured["optimizer_states"]) == (predicted["weights"],
                                                                   predicted["optimizer_states"]), (measured, predicted)


def test_moe_flops_count_the_experts_a_token_runs_through(tmp_path):
    """An MoE token runs through top-k of E experts: the FLOPs per token leave the other experts' weights out
    (their memory is counted like any weight's: the test above)."""
    from dstune.config import load_config
    from dstune.planning.estimate import estimate, idle_expert_params, meta_model
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"task": "causal_lm", "model": {"tiny": "mixtral"}, "data": {"train": "random"},
                                  "output_dir": str(tmp_path / "o")}))
    cfg = load_config(str(recipe), ["methods=[{name: full}]", "training.precision=fp32"])
    model = meta_model(cfg)[0]
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert experts > 0 and idle_expert_params(model) == experts // 2   # top-2 of 4 experts
    dense = cfg.model_copy(deep=True)
    dense.model.config_overrides = {"num_experts_per_tok": 4}   # every token through every expert
    assert estimate(cfg, 1, cuda=False)[2]["flops_per_token"] < estimate(dense, 1, cuda=False)[2]["flops_per_token"]


def test_frozen_parameters_hold_weights_only(tmp_path):
    from dstune.planning.estimate import ParamTable, model_state_bytes
    full = ParamTable(frozen=[], groups=[[1000, 24]])
    peft = ParamTable(frozen=[1000], groups=[[24]])
    for stage in (0, 1, 2, 3):
        wf, gf, of = model_state_bytes(full, stage, 2, "bf16")
        wp, gp, op = model_state_bytes(peft, stage, 2, "bf16")
        assert gp < gf and op < of and wp <= wf + 8  # same weights (up to padding), far less of the rest
    # the ZeRO paper's 16 bytes per trainable parameter for mixed-precision Adam, on one rank
    w, g, o = model_state_bytes(ParamTable([], [[4096]]), 1, 1, "bf16")
    assert w + g + o == 16 * 4096


@pytest.mark.parametrize("args,message", [
    (["--world-size", "0"], r"--world-size: must be at least 1, got 0"),
    (["deepspeed={zero_optimization: {stage: 7}}"], r"deepspeed: zero_optimization\.stage must be 0-3, got 7"),
    (["model.tiny=gpt5"], r"model\.tiny: unknown family 'gpt5' \(did you mean 'gpt2'\?\); known: bert, gemma,.*, t5\n"),
])
def test_bad_estimate_input(ws, tmp_path, args, message):
    import re
    recipe = lm_recipe(ws, tmp_path, "run")
    if args[0].startswith("model.tiny"):
        args = args + ["model.path=null"]
    res = run_cli(["estimate", recipe, *args])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert re.search(message, res.stderr), res.stderr


def test_unknown_model_type_is_a_clear_error(ws, tmp_path):
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "not-a-model"}')
    recipe = lm_recipe(ws, tmp_path, "run")
    res = run_cli(["estimate", recipe, f"model.path={bad}"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "dstune: error: model.path: cannot read a model config in" in res.stderr


BUCKET_PROBE = """
import json, sys, torch, deepspeed
stage, overlap, bf16 = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
ds = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": bf16},
      "zero_optimization": {"stage": stage, "reduce_bucket_size": 100000, "overlap_comm": overlap},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
seen = []
def look(p):  # the buckets live during the backward only: look from inside it
    seen.append(sum(b.numel() * b.element_size() for k in engine.optimizer.ipg_buckets.values() for b in k.buffer))
for p in model.parameters():
    p.register_post_accumulate_grad_hook(look)
x = torch.randn(2, 64, dtype=torch.bfloat16 if bf16 else torch.float32)
engine.backward(engine(x).float().sum())
print("BUCKETS " + json.dumps({"config": ds, "bytes": max(seen)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage,overlap,bf16", [(2, 0, 0), (2, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_zero12_bucket_term_is_what_deepspeed_allocates(built_ops, tmp_path, stage, overlap, bf16):
    """A 0.1M-element bucket for a model of 4.7K parameters: DeepSpeed allocates it whole, once or twice."""
    import os
    import subprocess
    import sys

    from helpers import free_port
    from dstune.planning.estimate import zero12_bucket_bytes
    probe = tmp_path / "probe.py"
    probe.write_text(BUCKET_PROBE)
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, str(probe), str(stage), str(overlap), str(bf16)], env=env,
                         capture_output=True, text=True, timeout=300)
    line = [x for x in out.stdout.splitlines() if x.startswith("BUCKETS ")]
    assert line, out.stderr[-2000:]
    got = json.loads(line[0][len("BUCKETS "):])
    assert got["bytes"] == zero12_bucket_bytes(got["config"], "bf16" if bf16 else "fp32") > 0
