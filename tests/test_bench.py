"""`dstune bench` runs each method in its own process and writes a table, JSON and a plot."""
from __future__ import annotations

import json

import pytest

from helpers import lm_recipe, ok, random_tokens_recipe, run_cli

KEYS = {"method", "trainable_params", "tokens_per_s", "step_s", "mfu", "peak_bytes", "estimate_bytes"}


@pytest.mark.slow
def test_bench_compares_methods(ws, built_ops, tmp_path):
    recipe = lm_recipe(ws, tmp_path, "unused")
    out = tmp_path / "bench"
    res = ok(run_cli(["bench", recipe, "--methods", "full,lora,prefix", "--steps", "4", "--out", str(out),
                      "--json", str(tmp_path / "rows.json")]))
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["method"] for r in rows] == ["full", "lora", "prefix"]
    for r in rows:
        assert KEYS <= r.keys()
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["peak_bytes"] > 0 and r["estimate_bytes"] > 0
        assert r["mfu"] is None  # no accelerator: MFU is not made up
        steps = [json.loads(x) for x in (out / r["method"] / "metrics.jsonl").read_text().splitlines()]
        # micro-batch 2 × blocks of up to 32 tokens, packed from ~15-token documents: real tokens, no padding
        assert all(2 * 16 < s["tokens"] <= 2 * 32 for s in steps), [s["tokens"] for s in steps]
    full, lora, prefix = rows
    assert lora["trainable_params"] < full["trainable_params"] and prefix["trainable_params"] < full["trainable_params"]
    # frozen weights carry no optimizer state: measured model states shrink with the method
    assert lora["model_state_bytes_measured"] < full["model_state_bytes_measured"]
    assert (out / "bench.png").stat().st_size > 10_000 and (out / "bench.md").read_text().startswith("| method |")
    assert "| lora (preset: r=16, alpha=32, target_modules=all-linear) |" in res.stdout  # the recipe has no LoRA
    assert [r["ran"] for r in rows] == ["full (recipe: defaults)", "lora (preset: r=16, alpha=32, "
                                        "target_modules=all-linear)", "prefix (preset: num_virtual_tokens=32, gate=false)"]
    # the report says what it measured, and can be drawn again from its JSON alone
    import os
    assert rows[0]["setup"] == {"model": "gpt2 (gpt2)", "params": json.loads((out / "full" / "run.json").read_text())[
        "base_params"], "device": f"CPU ({os.cpu_count()} cores)", "precision": "fp32", "seq_len": 32,
        "micro_batch": 2, "zero_stage": 0, "world_size": 1}
    md = (out / "bench.md").read_text()
    (out / "bench.png").unlink()
    (out / "bench.md").unlink()
    again = ok(run_cli(["bench", "--replot", str(out / "bench.json")]))
    assert (out / "bench.md").read_text() == md and (out / "bench.png").stat().st_size > 10_000
    assert "bench report written again" in again.stdout


def bench_recipe(tmp_path, methods: list) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"task": "causal_lm", "model": {"tiny": "llama"}, "data": {"train": "random"},
                                "methods": methods, "training": {"precision": "fp32"}, "output_dir": "unused"}))
    return str(path)


def test_bench_runs_the_recipes_own_method_as_written_and_presets_for_the_others(tmp_path):
    from dstune.config import load_config
    from dstune.methods import bench_presets
    from dstune.planning.bench import what_runs

    lora = {"name": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}
    cfg = load_config(bench_recipe(tmp_path, [lora, {"name": "bitfit"}]))
    assert what_runs(cfg, "lora") == ([lora], "lora (recipe: r=8, target_modules=q_proj,v_proj)")
    assert what_runs(cfg, "bitfit") == ([{"name": "bitfit"}], "bitfit (recipe: defaults)")
    assert what_runs(cfg, "qlora") == ([lora], "qlora (recipe: r=8, target_modules=q_proj,v_proj)")  # on nf4
    assert what_runs(cfg, "prefix") == (bench_presets()["prefix"], "prefix (preset: num_virtual_tokens=32, gate=false)")
    assert what_runs(cfg, "prefix-split")[1] == \
        "prefix-split (preset: prefix num_virtual_tokens=32, gate=false, attention=split)"  # not a method name
    cfg = load_config(bench_recipe(tmp_path, [{"name": "full"}, {"name": "layerwise_lr", "decay": 0.5}]))
    assert what_runs(cfg, "layerwise_lr") == ([{"name": "full"}, {"name": "layerwise_lr", "decay": 0.5}],
                                              "layerwise_lr (recipe: full + layerwise_lr decay=0.5)")
    assert what_runs(cfg, "lora")[1] == "lora (preset: r=16, alpha=32, target_modules=all-linear)"
    assert what_runs(cfg, "qlora")[1] == "qlora (preset: lora r=16, alpha=32, target_modules=all-linear)"


def test_bench_trains_and_labels_each_row_with_what_it_ran(tmp_path, monkeypatch):
    """In-process, the children stood in for: each gets the methods it names on its command line, and the row
    (bench.json, bench.md) and the estimate say what ran."""
    import dstune.planning.bench as B

    lora = {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj"]}
    ran = {}

    def child(recipe, overrides, method, specs, out, steps):
        ran[method] = specs
        out.mkdir(parents=True)
        (out / "run.json").write_text(json.dumps({"base_params": 1000, "world_size": 1}))

    def row(cfg, method, specs, run):  # the estimate of what ran: its trainable parameters say which it was
        from dstune.planning.estimate import estimate
        (est, *_), table, _ = estimate(cfg.model_copy(update={"methods": specs}), 1, cuda=False)
        return {"method": method, "trainable_params": table.trainable, "tokens_per_s": 100.0, "step_s": 1.0, "mfu": None, "peak_bytes": 1 << 20, "peak_source": "peak RSS",
                "estimate_bytes": est.total, "estimate": est.as_dict(), "model_state_bytes_measured": 1 << 10}

    monkeypatch.setattr(B, "_run_one", child)
    monkeypatch.setattr(B, "_row", row)
    out = tmp_path / "bench"
    rows = B.bench(bench_recipe(tmp_path, [lora]), [], ["lora", "prompt"], str(out), 3)
    assert ran == {"lora": [lora], "prompt": [{"name": "prompt", "num_virtual_tokens": 32}]}
    saved = json.loads((out / "bench.json").read_text())
    assert [(r["method"], r["ran"], r["methods"]) for r in saved] == [
        ("lora", "lora (recipe: r=4, alpha=8, target_modules=q_proj)", [lora]),
        ("prompt", "prompt (preset: num_virtual_tokens=32)", [{"name": "prompt", "num_virtual_tokens": 32}])]
    assert rows == saved
    assert [r["trainable_params"] for r in rows] == [2 * (4 * 32 + 32 * 4), 32 * 32]  # r 4 on q_proj; 32 tokens
    md = (out / "bench.md").read_text()
    assert "| lora (recipe: r=4, alpha=8, target_modules=q_proj) |" in md and "| prompt (preset: " in md


def test_bench_rejects_unknown_method(ws, tmp_path):
    res = run_cli(["bench", lm_recipe(ws, tmp_path, "unused"), "--methods", "full,magic"])
    assert res.returncode == 2 and "dstune: error: --methods: unknown magic; known: full," in res.stderr


# Stands in for the GPU-only peer baseline script: same command line, same `RESULT {json}` contract.
STAND_IN_PEER = '''
import argparse, json, os, sys
p = argparse.ArgumentParser()
for a in ("--method", "--size", "--seq", "--bsz", "--zero", "--steps", "--vtokens"):
    p.add_argument(a)
p.add_argument("--ckpt", action="store_true")
a = p.parse_args()
with open(os.environ["PEER_LOG"], "a") as f:
    f.write(json.dumps(vars(a)) + "\\n")
if a.method == "prompt":
    sys.exit("peer: no GPU here")
print("some log line")
print("RESULT " + json.dumps({"method": a.method, "params": int(os.environ["PEER_PARAMS"]), "tok_s": 1000.0,
                              "step_s": 0.5, "peak_gib": 1.5, "trainable": 1, "loss": 4.0}))
'''


@pytest.mark.slow
def test_bench_runs_the_peer_side_by_side(built_ops, tmp_path, monkeypatch):
    peer = tmp_path / "peer.py"
    peer.write_text(STAND_IN_PEER)
    log = tmp_path / "peer_log.jsonl"
    monkeypatch.setenv("PEER_LOG", str(log))
    # tiny llama: embeddings 300x32 twice + 2 layers x (q,o 32x32; k,v 32x16; MLP 3x32x64; 2 norms) + final norm
    base = 2 * 300 * 32 + 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32) + 32
    monkeypatch.setenv("PEER_PARAMS", str(base))
    out = tmp_path / "bench"
    res = ok(run_cli(["bench", random_tokens_recipe(tmp_path), "--methods", "full,prefix,prefix-split", "--steps",
                      "4", "--out", str(out), "--peer", str(peer), "--peer-size", "tiny"]))
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert [c["method"] for c in calls] == ["full", "prefix"]  # prefix-split is prefix tuning: one peer run for both
    assert "attention: split" in (out / "prefix-split" / "config.yaml").read_text()
    for c in calls:  # the recipe's shapes, and as many measured steps as dstune's after its warm-up
        assert (c["size"], c["seq"], c["bsz"], c["zero"], c["steps"], c["ckpt"]) == ("tiny", "32", "2", "2", "2", False)
    assert calls[0]["vtokens"] is None and calls[1]["vtokens"] == "32"
    rows = json.loads((out / "bench.json").read_text())
    assert [r["method"] for r in rows] == ["full", "prefix", "prefix-split"]
    for r in rows:
        assert r["peer"]["tok_s"] == 1000.0
        assert r["tokens_per_s_vs_peer"] == r["tokens_per_s"] / 1000.0
        assert r["peak_vs_peer"] is None  # RSS against an allocator peak would be no ratio at all
        steps = [json.loads(x) for x in (out / r["method"] / "metrics.jsonl").read_text().splitlines()]
        assert {s["tokens"] for s in steps} == {2 * 32}  # random data: full blocks, no padding
    assert not list(out.glob("*/checkpoint*")) and not list(out.glob("*/trainable.safetensors"))  # bench saves none
    assert "Against the peer baseline" in res.stdout and "| prefix (preset: num_virtual_tokens=32, gate=false) |" in res.stdout


@pytest.mark.slow
def test_bench_refuses_a_peer_of_another_shape_or_that_fails(built_ops, tmp_path, monkeypatch):
    peer = tmp_path / "peer.py"
    peer.write_text(STAND_IN_PEER)
    monkeypatch.setenv("PEER_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("PEER_PARAMS", "123")
    recipe = random_tokens_recipe(tmp_path)
    args = ["bench", recipe, "--steps", "3", "--out", str(tmp_path / "b"), "--peer", str(peer)]
    res = run_cli([*args, "--methods", "full"])
    assert res.returncode == 2 and "--peer-size: the peer's model has 123 parameters, the recipe's" in res.stderr
    res = run_cli([*args, "--methods", "prompt"])  # the peer fails first: dstune's run never starts
    assert res.returncode == 2 and "bench: peer prompt failed (exit 1): peer: no GPU here" in res.stderr
    assert f"(whole output: {tmp_path / 'b' / 'prompt-peer.log'})" in res.stderr
    assert not (tmp_path / "b" / "prompt").exists()
    assert "peer: no GPU here" in (tmp_path / "b" / "prompt-peer.log").read_text()  # the whole output is kept
    # refused before anything runs
    res = run_cli([*args, "--methods", "full,adapter"])
    assert res.returncode == 2 and "the peer baseline runs only full, lora, prefix, prompt, not adapter" in res.stderr
    res = run_cli(["bench", random_tokens_recipe(tmp_path, "fp32"), "--methods", "full", "--peer", str(peer)])
    assert res.returncode == 2 and "training.precision: the peer baseline runs bf16, the recipe fp32" in res.stderr
    res = run_cli([*args[:-1], str(tmp_path / "missing.py"), "--methods", "full"])
    assert res.returncode == 2 and "--peer: no such file:" in res.stderr
    res = run_cli(["bench", random_tokens_recipe(tmp_path), "training.gradient_accumulation_steps=2", "--methods", "full",
                   "--peer", str(peer)])
    assert res.returncode == 2 and "training.gradient_accumulation_steps: the peer baseline takes one" in res.stderr


def test_bench_without_a_recipe_or_with_a_missing_report_says_so(tmp_path):
    res = run_cli(["bench"])
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == \
        "dstune: error: bench: name a recipe (or --replot a bench.json)"
    res = run_cli(["bench", "--replot", str(tmp_path)])
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == \
        f"dstune: error: --replot: no bench.json at {tmp_path / 'bench.json'}"
