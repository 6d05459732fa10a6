"""Each task trains on a tiny model with the SentencePiece tokenizer trained in the fixture, and the
run dir works with `dstune eval` and `dstune generate`."""
from __future__ import annotations

import json

import pytest

from helpers import ok, read_metrics, run_cli

TASKS = {
    # name: (task, model folder, data file, extra data keys, training overrides)
    "classification": ("classification", "bert", "cls_train.jsonl", {"eval": "cls_eval.jsonl"},
                       {"max_steps": 120, "lr": 3e-3}),  # a tiny BERT plateaus for up to ~50 steps, seed-dependent
    "causal_text": ("causal_lm", "llama", "lm.jsonl", {"eval_fraction": 0.2, "packing": True, "max_length": 32},
                    {"max_steps": 20, "lr": 1e-2}),
    "causal_chat": ("causal_lm", "gpt2", "chat.jsonl", {"eval_fraction": 0.2}, {"max_steps": 30, "lr": 1e-2}),
    "seq2seq": ("seq2seq", "t5", "s2s.jsonl", {"eval_fraction": 0.2}, {"max_steps": 30, "lr": 1e-2}),
}


def task_recipe(ws, tmp_path, name: str, model_key: str = "path", **extra) -> tuple:
    task, model, data, data_extra, training = TASKS[name]
    data_cfg = {"train": str(ws / data), **{k: str(ws / v) if k == "eval" else v for k, v in data_extra.items()}}
    model_cfg = {"path": str(ws / model)} if model_key == "path" else {"tiny": model}
    recipe = {"task": task, "model": model_cfg, "tokenizer": {"path": str(ws / "tokenizer")}, "data": data_cfg,
              "training": {"precision": "fp32", "micro_batch_size": 8, "warmup_steps": 3, **training},
              "evaluation": {"max_new_tokens": 8}, "output_dir": str(tmp_path / name), **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))
    return path, tmp_path / name


@pytest.mark.parametrize("name", list(TASKS))
def test_task_trains_and_loss_falls(ws, built_ops, tmp_path, name):
    recipe, run_dir = task_recipe(ws, tmp_path, name)
    res = ok(run_cli(["train", str(recipe)]))
    assert "parameters train" in res.stdout
    train = read_metrics(run_dir)
    first = sum(train[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(train[s]["loss"] for s in sorted(train)[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["after"]["loss"] < results["before"]["loss"]
    for f in ("config.yaml", "run.json", "trainable.safetensors", "tokenizer/tokenizer.json",
              "checkpoints/last_complete"):
        assert (run_dir / f).exists(), f
    assert list((run_dir / "tensorboard").iterdir()), "no TensorBoard events"
    if name == "classification":
        assert {"accuracy", "macro_f1"} <= results["after"].keys()
        assert results["after"]["accuracy"] > 0.8 > results["before"]["accuracy"], results  # it learned the task
        # the eval command reloads the run dir and reproduces the in-training score
        scored = json.loads(ok(run_cli(["eval", str(run_dir), "--json"])).stdout)
        assert abs(scored["accuracy"] - results["after"]["accuracy"]) < 1e-9
        # and both print what the user came for: the metrics before and after, as a table
        table = res.stdout.split("[dstune] results (data.eval, 64 rows):\n")[1].splitlines()
        assert table[0].split() == ["metric", "before", "after"]
        rows = {line.split()[0]: line.split()[1:] for line in table[1:4]}
        assert rows.keys() == {"loss", "accuracy", "macro_f1"}
        for metric, (before, after) in rows.items():
            assert before == f"{results['before'][metric]:.4f}" and after == f"{results['after'][metric]:.4f}"
        shown = ok(run_cli(["eval", str(run_dir)])).stdout.splitlines()
        assert shown[0] == f"{ws / 'cls_eval.jsonl'} (64 rows):" and shown[1].split() == ["metric", "score"]
        assert shown[3].split() == ["accuracy", f"{scored['accuracy']:.4f}"]
    elif name == "seq2seq":
        assert {"bleu", "rouge1", "rougeL"} <= results["after"].keys()
        assert results["after"]["perplexity"] < results["before"]["perplexity"]
    else:
        assert results["after"]["perplexity"] < results["before"]["perplexity"]


def test_generate_from_trained_run(ws, built_ops, tmp_path):
    recipe, run_dir = task_recipe(ws, tmp_path, "causal_chat")
    ok(run_cli(["train", str(recipe), "training.max_steps=60"]))
    out = ok(run_cli(["generate", str(run_dir), "--prompt", "say good", "--prompt", "say bad",
                      "--max-new-tokens", "6", "--jsonl"])).stdout.strip().splitlines()
    rows = [json.loads(line) for line in out]
    assert [r["prompt"] for r in rows] == ["say good", "say bad"]
    # "say W" → "W W it is": after 60 steps the reply starts with the prompt's word (it may not end it yet)
    assert rows[0]["reply"].startswith("goo") and rows[1]["reply"].startswith("bad"), rows
    plain = ok(run_cli(["generate", str(run_dir), "--max-new-tokens", "6"], input="say good\nsay bad\n")).stdout
    assert plain == "".join(f">>> {r['prompt']}\n{r['reply']}\n---\n" for r in rows)


def test_tiny_random_model_with_sentencepiece_model_file(ws, built_ops, tmp_path):
    """model.tiny builds a random model; tokenizer.path may be a bare SentencePiece .model file."""
    recipe, run_dir = task_recipe(ws, tmp_path, "causal_text", model_key="tiny",
                                  tokenizer={"path": str(ws / "tokenizer" / "tokenizer.model")})
    ok(run_cli(["train", str(recipe), "training.max_steps=5"]))
    assert json.loads((run_dir / "run.json").read_text())["trainable_params"] > 0


@pytest.mark.parametrize("method", [{"name": "prompt", "num_virtual_tokens": 4},
                                    {"name": "prefix", "num_virtual_tokens": 4, "gate": False}])
def test_methods_that_change_the_model_at_step_0_also_score_the_untouched_base(ws, built_ops, tmp_path, method):
    """Random virtual tokens make "before" a damaged model: the base is scored too (its forward with the
    method's hooks stepped aside) and equals a run whose method leaves the model as it was (LoRA's B = 0)."""
    recipe, run_dir = task_recipe(ws, tmp_path, "causal_chat", methods=[method])
    res = ok(run_cli(["train", str(recipe), "training.max_steps=2"]))
    results = json.loads((run_dir / "results.json").read_text())
    ok(run_cli(["train", str(recipe), "training.max_steps=1", f"output_dir={tmp_path / 'lora'}",
                "methods=[{name: lora, r: 2}]"]))
    untouched = json.loads((tmp_path / "lora" / "results.json").read_text())["before"]
    assert abs(results["base"]["loss"] - untouched["loss"]) < 1e-5, (results["base"], untouched)
    assert abs(results["before"]["loss"] - untouched["loss"]) > 1e-3   # the virtual tokens did change it
    header = res.stdout.split("held-out rows):\n")[1].splitlines()[0]
    assert header.split() == ["metric", "base", "model", "before", "after"]
