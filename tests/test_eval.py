"""`dstune eval` scores a run as its training did, and every machine-readable output parses whatever a
method imports on the way."""
from __future__ import annotations

import json

import pytest

from helpers import lm_recipe, ok, run_cli


@pytest.mark.parametrize("precision, model", [("fp32", "gpt2"), ("bf16", "gpt2"), ("bf16", "llama")])
def test_eval_equals_the_runs_own_final_evaluation(ws, built_ops, tmp_path, precision, model):
    """bf16 weights as DeepSpeed holds them: the parameters cast, the buffers not (Llama's rotary inv_freq
    stays fp32)."""
    lora = [{"name": "lora", "r": 4}]
    recipe = lm_recipe(ws, tmp_path, "run", methods=lora, eval_fraction=0.3, precision=precision, max_steps=3,
                       model=model)
    ok(run_cli(["train", recipe]))
    after = json.loads((tmp_path / "run" / "results.json").read_text())["after"]
    again = json.loads(ok(run_cli(["eval", str(tmp_path / "run"), "--json"])).stdout)
    assert again == after
    if precision == "bf16":  # the override is applied before the weights load: fp32 scores differ
        fp32 = json.loads(ok(run_cli(["eval", str(tmp_path / "run"), "--json", "training.precision=fp32"])).stdout)
        assert fp32["loss"] != after["loss"] and abs(fp32["loss"] - after["loss"]) < 0.05


# a method that needs company or options to train on the tiny GPT-2; any other trains as {name: NAME}
METHOD_SPECS = {"layerwise_lr": [{"name": "full"}, {"name": "layerwise_lr"}],
                "lora": [{"name": "lora", "r": 2, "use_dora": True}]}


@pytest.fixture
def noisy_load(monkeypatch):
    """Whatever loads a run also writes to stdout, as a library's import-time log line does: through
    sys.stdout and straight to file descriptor 1."""
    import os
    import sys

    from dstune.rundir import load

    real = load.load_trainable

    def noisy(*args, **kwargs):
        print("[WARNING] a library's line on stdout")
        sys.stdout.flush()
        os.write(1, b"[WARNING] a C++ line on fd 1\n")
        return real(*args, **kwargs)
    monkeypatch.setattr(load, "load_trainable", noisy)


def test_json_outputs_parse_for_every_method(ws, built_ops, tmp_path, noisy_load):
    from dstune.methods import available

    for name in sorted(available()):
        recipe = lm_recipe(ws, tmp_path, name, methods=METHOD_SPECS.get(name, [{"name": name}]), max_steps=1,
                           eval_fraction=0.3)
        ok(run_cli(["train", recipe]))
        res = ok(run_cli(["eval", str(tmp_path / name), "--json"]))
        assert "loss" in json.loads(res.stdout), name
        assert "a C++ line on fd 1" in res.stderr and "a library's line" in res.stderr
        res = ok(run_cli(["generate", str(tmp_path / name), "--jsonl", "--max-new-tokens", "2", "--prompt", "a",
                          "--prompt", "b"]))
        assert [json.loads(line)["prompt"] for line in res.stdout.splitlines()] == ["a", "b"], name


@pytest.mark.slow
def test_a_dora_run_prints_only_json_from_a_fresh_process(ws, built_ops, tmp_path):
    """The real case: DoRA imports DeepSpeed lazily, whose accelerator line went to stdout first."""
    recipe = lm_recipe(ws, tmp_path, "dora", methods=METHOD_SPECS["lora"], max_steps=1, eval_fraction=0.3)
    ok(run_cli(["train", recipe]))
    res = ok(run_cli(["eval", str(tmp_path / "dora"), "--json"], launcher="python"))
    assert "loss" in json.loads(res.stdout)
    res = ok(run_cli(["generate", str(tmp_path / "dora"), "--jsonl", "--prompt", "a"], launcher="python"))
    assert json.loads(res.stdout)["prompt"] == "a"


def test_early_stopping_stops_within_patience_of_the_best_step_and_keeps_its_state(ws, built_ops, tmp_path):
    """Full fine-tuning of the tiny GPT-2 at a high rate overfits its few rows: the held-out loss turns up,
    training stops `patience` evaluations after its lowest point, and `--checkpoint best` scores exactly what
    that step scored."""
    recipe = lm_recipe(ws, tmp_path, "run", eval_fraction=0.3, max_steps=200, lr=3e-2, warmup_steps=1)
    res = ok(run_cli(["train", recipe, "evaluation.every=2", "evaluation.early_stopping={patience: 3}"]))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    best, stopped = results["best"], results["stopped_early"]
    evals = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "eval" and r["step"] > 0}
    assert stopped < 200 and stopped == best["step"] + 3 * 2, (stopped, best, evals)
    assert best["value"] == min(evals.values()) == evals[best["step"]]
    assert f"early stopping at step {stopped} of 200: loss has not improved on step {best['step']}'s" in res.stdout
    assert f"best (step {best['step']})" in res.stdout
    run_dir = str(tmp_path / "run")
    assert json.loads(ok(run_cli(["eval", run_dir, "--json"])).stdout) == best["scores"]  # best: the default
    assert json.loads(ok(run_cli(["eval", run_dir, "--json", "--checkpoint", "last"])).stdout) == results["after"]
    again = ok(run_cli(["train", recipe, "evaluation.every=2", "evaluation.early_stopping={patience: 3}"]))
    assert "trained to its last step" in again.stdout and "stopped early" in again.stdout


def test_keep_best_needs_held_out_rows_and_a_best_state_to_load(ws, built_ops, tmp_path):
    recipe = lm_recipe(ws, tmp_path, "run", max_steps=2)
    res = run_cli(["train", recipe, "evaluation.keep_best=true"])
    assert res.returncode == 2 and "evaluation.keep_best: the best state is chosen on held-out rows" in res.stderr
    res = run_cli(["train", recipe, "evaluation.early_stopping={patience: 2}"])
    assert res.returncode == 2 and "evaluation.early_stopping needs evaluation.every" in res.stderr
    ok(run_cli(["train", recipe]))
    res = run_cli(["eval", str(tmp_path / "run"), "--checkpoint", "best", "--data", str(ws / "lm.jsonl")])
    assert res.returncode == 2 and "--checkpoint: " in res.stderr and "kept no best state" in res.stderr
