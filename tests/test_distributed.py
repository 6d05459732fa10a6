"""2 CPU ranks over gloo reproduce the 1-rank run for every ZeRO stage, and resume is exact."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import LM_STEPS as STEPS
from cli_runner import FAILED_RANK_GRACE_S, pool_pids
from helpers import free_port, kill_tree, lm_recipe, ok, read_metrics, run_cli

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def single_rank(ws, built_ops, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    ok(run_cli(["train", lm_recipe(ws, tmp, "run", gradient_accumulation_steps=2)]))
    return tmp / "run"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_match_one_rank(ws, built_ops, single_rank, tmp_path, stage):
    ok(run_cli(["train", lm_recipe(ws, tmp_path, "run", stage)], nproc=2))
    one, two = read_metrics(single_rank), read_metrics(tmp_path / "run")
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert abs(one[step]["loss"] - two[step]["loss"]) < 1e-5, (step, one[step]["loss"], two[step]["loss"])
    assert one[STEPS]["loss"] < one[1]["loss"]
    # what trained is saved whole (gathered from the shards under ZeRO-3) and equals the 1-rank weights
    w1 = load_file(str(single_rank / "trainable.safetensors"))
    w2 = load_file(str(tmp_path / "run" / "trainable.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert w1[k].shape == w2[k].shape, k
        assert (w1[k] - w2[k]).abs().max() < 1e-4, k


def test_dora_with_loraplus_under_zero3_matches_one_rank(ws, built_ops, tmp_path):
    """DoRA reads the whole base weight and A, B, m in its hook: under ZeRO-3 they are gathered, and two ranks
    train as one; LoRA+ gives B its own optimizer group."""
    methods = [{"name": "lora", "r": 4, "use_dora": True, "loraplus_lr_ratio": 4, "target_modules": "all-linear"}]
    ok(run_cli(["train", lm_recipe(ws, tmp_path, "one", methods=methods, gradient_accumulation_steps=2)]))
    ok(run_cli(["train", lm_recipe(ws, tmp_path, "two", 3, methods=methods)], nproc=2))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert all(abs(one[s]["loss"] - two[s]["loss"]) < 1e-5 for s in one) and one[STEPS]["loss"] < one[1]["loss"]
    w1, w2 = (load_file(str(tmp_path / r / "trainable.safetensors")) for r in ("one", "two"))
    assert w1.keys() == w2.keys() and any("lora_magnitude_vector" in k for k in w1)
    assert all((w1[k] - w2[k]).abs().max() < 1e-4 for k in w1)


def test_deepspeed_launcher_matches_one_rank(ws, built_ops, single_rank, tmp_path):
    ok(run_cli(["train", lm_recipe(ws, tmp_path, "run", 2)], nproc=2, launcher="deepspeed"))
    one, two = read_metrics(single_rank), read_metrics(tmp_path / "run")
    assert sorted(two) == sorted(one)
    assert all(abs(one[s]["loss"] - two[s]["loss"]) < 1e-5 for s in one)


def test_killed_run_resumes_exactly(ws, built_ops, tmp_path):
    steps = 60
    ref_recipe = lm_recipe(ws, tmp_path, "reference", 2, max_steps=steps)
    ok(run_cli(["train", ref_recipe], nproc=2))
    reference = read_metrics(tmp_path / "reference")

    recipe = lm_recipe(ws, tmp_path, "killed", 2, max_steps=steps, checkpoint_every=5)
    run_dir = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), "-m", "dstune", "train", recipe],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pointer = run_dir / "checkpoints" / "last_complete"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["global_step"] >= 10:
            break
        time.sleep(0.02)
    kill_tree(proc.pid)
    proc.wait()
    killed_at = json.loads(pointer.read_text())["global_step"]
    assert 10 <= killed_at < steps, "the run finished before it could be killed; make it longer"

    res = ok(run_cli(["train", recipe], nproc=2))
    assert f"resumed from step_{killed_at:08d}" in res.stdout
    resumed = read_metrics(run_dir)  # the log holds the killed run's lines, then the resumed run's
    assert max(resumed) == steps
    for step in range(killed_at + 1, steps + 1):
        assert abs(resumed[step]["loss"] - reference[step]["loss"]) < 1e-6, step


METHOD_SPECS = {
    "lora": [{"name": "lora", "r": 4, "target_modules": "all-linear"}],
    "ia3": [{"name": "ia3"}],
    "adapter": [{"name": "adapter", "bottleneck": 8}],
    "bitfit": [{"name": "bitfit"}],
    "prompt": [{"name": "prompt", "num_virtual_tokens": 4}],
    "prefix": [{"name": "prefix", "num_virtual_tokens": 4}],
    "prefix-ungated": [{"name": "prefix", "num_virtual_tokens": 4, "gate": False}],
    "prefix-from-text": [{"name": "prefix", "num_virtual_tokens": 4, "init_text": "a review of the film"}],
    "prefix+lora": [{"name": "prefix", "num_virtual_tokens": 4, "projection": True, "projection_hidden": 16},
                    {"name": "lora", "r": 4}],
    "freeze+layerwise_lr": [{"name": "freeze", "layers": 1}, {"name": "layerwise_lr", "decay": 0.5}],
}


@pytest.mark.parametrize("method", list(METHOD_SPECS))
def test_method_under_two_rank_zero3_matches_one_rank(ws, built_ops, tmp_path, method):
    specs = METHOD_SPECS[method]
    lr = 0.3 if method == "prompt" else 2e-2  # a soft prompt moves slowly through a tiny model
    ok(run_cli(["train", lm_recipe(ws, tmp_path, "one", methods=specs, eval_fraction=0.25,
                                   gradient_accumulation_steps=2, lr=lr)]))
    ok(run_cli(["train", lm_recipe(ws, tmp_path, "two", 3, methods=specs, eval_fraction=0.25, lr=lr)], nproc=2))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for step in one:
        assert abs(one[step]["loss"] - two[step]["loss"]) < 1e-5, (step, one[step]["loss"], two[step]["loss"])
    held_out = json.loads((tmp_path / "two" / "results.json").read_text())
    assert held_out["after"]["loss"] < held_out["before"]["loss"]  # a fixed set: batch noise cannot fake it
    w1 = load_file(str(tmp_path / "one" / "trainable.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "trainable.safetensors"))
    assert w1.keys() == w2.keys() and all((w1[k] - w2[k]).abs().max() < 1e-4 for k in w1)


def test_compiled_layers_train_like_eager(ws, built_ops, single_rank, tmp_path):
    """training.compile: torch.compile (inductor, CPU here) of each GPT-2 block gives the eager run's losses."""
    res = ok(run_cli(["train", lm_recipe(ws, tmp_path, "run", gradient_accumulation_steps=2, compile=True)]))
    assert "; 2 layers compiled" in res.stdout
    eager, compiled = read_metrics(single_rank), read_metrics(tmp_path / "run")
    assert sorted(compiled) == sorted(eager)
    assert all(abs(eager[s]["loss"] - compiled[s]["loss"]) < 1e-4 for s in eager), (eager, compiled)


def test_compile_refuses_zero3(ws, tmp_path):
    res = run_cli(["train", lm_recipe(ws, tmp_path, "run", 3, compile=True)])
    assert res.returncode == 2 and "training.compile: ZeRO-3 gathers parameters in module hooks" in res.stderr
    assert not (tmp_path / "run").exists()


def test_step_loss_is_the_token_mean_of_the_whole_global_batch(ws, built_ops, tmp_path):
    """2 ranks × accum 2 on examples of very different lengths: the logged loss is the mean over every target
    token of the global batch, and the update is that of its gradient, computed here by plain PyTorch.
    AdamW's first step is lr·g/(|g|+eps) per element: with eps = lr = 1e4 it is the gradient itself, nearly."""
    import random

    import torch
    import torch.nn.functional as F
    import transformers as T

    from dstune.config import load_config
    from dstune.data.batching import StepBatches, collate
    from dstune.data.batching import IGNORE
    from dstune.prepare.pipeline import prepare_data
    from dstune.tasks import get_task
    from dstune.models.tokenizers import load_tokenizer

    rng = random.Random(3)
    words = "the movie film plot actor scene was good bad dull fun".split()
    rows = [{"text": " ".join(rng.choice(words) for _ in range(n))} for n in [2, 3, 40, 4, 30, 2, 25, 3] * 2]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lr = eps = 1e4
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "task": "causal_lm", "model": {"path": str(ws / "llama")}, "data": {"train": str(tmp_path / "mixed.jsonl"),
                                                                            "max_length": 48},
        "training": {"precision": "fp32", "max_steps": 1, "micro_batch_size": 2, "gradient_accumulation_steps": 2,
                     "lr": lr, "eps": eps,
                     "weight_decay": 0.0, "max_grad_norm": 0.0, "lr_schedule": "constant", "seed": 5},
        "output_dir": str(tmp_path / "run")}))
    ok(run_cli(["train", str(recipe)], nproc=2))

    cfg = load_config(str(recipe))
    data = prepare_data(cfg, load_tokenizer(str(ws / "tokenizer")))
    batch = collate([data.train[i] for i in StepBatches(len(data.train), 2, 2, 2, 0, 5).global_step(0)], 0, get_task("causal_lm"))
    model = T.AutoModelForCausalLM.from_pretrained(ws / "llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    assert len({int((row != IGNORE).sum()) for row in targets}) > 3  # the lengths really differ
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    loss = loss / (targets != IGNORE).sum()
    loss.backward()
    assert abs(read_metrics(tmp_path / "run")[1]["loss"] - loss.item()) < 1e-6
    trained = load_file(str(tmp_path / "run" / "trainable.safetensors"))
    for n, p in model.named_parameters():
        expected = before[n] - lr * p.grad / (p.grad.abs() + eps)
        assert torch.allclose(trained[n], expected, atol=1e-6, rtol=0), (n, (trained[n] - expected).abs().max())


@pytest.mark.parametrize("stage", [2, 3])
def test_a_stopped_rank_ends_the_job_within_the_timeout(ws, built_ops, tmp_path, stage):
    """A hung peer (SIGSTOP: a stuck node, a partitioned network) fails the job after training.dist_timeout_s,
    in DeepSpeed's own data-parallel and ZeRO groups too, instead of torch's default 30 minutes. (The pool
    then ends the stopped rank, as a launcher would.)"""
    import threading

    import psutil

    timeout = 10
    recipe = lm_recipe(ws, tmp_path, "hung", stage, max_steps=100_000, dist_timeout_s=timeout, log_every=1)
    rank1 = psutil.Process(pool_pids(2)[1])
    done: dict = {}
    job = threading.Thread(target=lambda: done.update(res=run_cli(["train", recipe], nproc=2, timeout=300)))
    job.start()
    metrics = tmp_path / "hung" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and job.is_alive() and len(read_metrics(tmp_path / "hung")
                                                            if metrics.exists() else {}) < 3:
        time.sleep(0.1)
    assert job.is_alive(), done
    rank1.suspend()
    stopped = time.time()
    job.join(timeout + 120)
    ended = time.time() - stopped
    res = done["res"]
    rank0_err = res.ranks[0][1]
    assert res.returncode != 0 and res.ranks[0][0] != "", rank0_err[-3000:]
    assert "timed out" in rank0_err.lower() or "timeout" in rank0_err.lower(), rank0_err[-3000:]
    # rank 0 ends after the timeout; the pool gives the stopped rank FAILED_RANK_GRACE_S before it kills it
    assert ended < timeout + FAILED_RANK_GRACE_S + 30, (ended, rank0_err[-3000:])


def test_ranks_end_when_their_launcher_is_killed(ws, built_ops, tmp_path):
    """kill -9 of torchrun alone: its ranks stop within seconds instead of training on unwatched."""
    import psutil

    recipe = lm_recipe(ws, tmp_path, "orphan", 0, max_steps=100_000, log_every=1)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), "-m", "dstune", "train", recipe],
                            env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = tmp_path / "orphan" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(read_metrics(tmp_path / "orphan")
                                                                     if metrics.exists() else {}) < 3:
            time.sleep(0.1)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "dstune" in " ".join(p.cmdline())]
        assert len(ranks) == 2
        proc.kill()  # the launcher only
        proc.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=20)
        assert not alive, f"{len(alive)} rank(s) still running 20 s after their launcher was killed"
    finally:
        kill_tree(proc.pid)
        for p in psutil.process_iter(["cmdline"]):
            if recipe in " ".join(p.info["cmdline"] or []):
                p.kill()


def test_progress_bars_come_from_rank_0_alone(ws, built_ops, tmp_path):
    """Tokenize, weight-loading and training bars are drawn once, by rank 0; rank 1's output holds none."""
    res = ok(run_cli(["train", lm_recipe(ws, tmp_path, "run", max_steps=2), f"data.cache_dir={tmp_path / 'cache'}"],
                     nproc=2))
    err = [e for _, e in res.ranks]
    assert "tokenize" in err[0] and "Loading weights" in err[0] and "train:" in err[0]
    assert not any(bar in err[1] for bar in ("tokenize", "Loading weights", "train:", "it/s]")), err[1][-2000:]


def test_precision_auto_is_the_default_resolved_for_this_machine_and_recorded(ws, built_ops, tmp_path):
    from dstune.engine.precision import resolve
    precision, why = resolve("auto")
    recipe = Path(lm_recipe(ws, tmp_path, "run", max_steps=2))
    cfg = json.loads(recipe.read_text())
    del cfg["training"]["precision"]   # left to the default
    recipe.write_text(json.dumps(cfg))
    res = ok(run_cli(["train", str(recipe)]))
    assert f"ZeRO-0, {precision} ({why})," in res.stdout
    assert f"precision: {precision}" in (tmp_path / "run" / "config.yaml").read_text()   # what ran
    est = json.loads(ok(run_cli(["estimate", lm_recipe(ws, tmp_path, "est"), "training.precision=auto",
                                 "--json"])).stdout)[0]
    fp32 = json.loads(ok(run_cli(["estimate", lm_recipe(ws, tmp_path, "est"), "--json"])).stdout)[0]
    assert est["weights"] * 2 == fp32["weights"]   # a GPU estimate: auto is bf16 there


def test_measuring_memory_is_cheap_by_default_and_can_be_off(ws, built_ops, tmp_path):
    ok(run_cli(["train", lm_recipe(ws, tmp_path, "on", max_steps=2)]))
    memory = json.loads((tmp_path / "on" / "memory.json").read_text())
    assert memory.keys() == {"after_first_step", "phase_peaks"}
    assert "RSS" in memory["phase_peaks"][0]["measured_by"]
    ok(run_cli(["train", lm_recipe(ws, tmp_path, "off", max_steps=2), "training.measure_memory=off"]))
    assert not (tmp_path / "off" / "memory.json").exists() and (tmp_path / "off" / "trainable.safetensors").exists()


def test_activation_checkpointing_auto_turns_on_only_where_the_estimate_does_not_fit(ws, built_ops, tmp_path,
                                                                                    monkeypatch):
    from dstune.config import load_config
    from dstune.planning import fit
    from dstune.planning.estimate import estimate

    res = ok(run_cli(["train", lm_recipe(ws, tmp_path, "run", max_steps=2), "training.activation_checkpointing=auto"]))
    line = next(x for x in res.stdout.splitlines() if "activation checkpointing" in x)
    assert line.startswith("[dstune] activation checkpointing off (auto: without it the estimate is "), line
    assert "activation_checkpointing: false" in (tmp_path / "run" / "config.yaml").read_text()
    cfg = load_config(lm_recipe(ws, tmp_path, "unit"), ["training.activation_checkpointing=auto"])
    need = estimate(cfg, 1, cuda=False)[0][0].total
    cpu = __import__("torch").device("cpu")
    for have, on in ((need * 2, False), (need // 2, True)):   # a rank with room to spare, and one without
        monkeypatch.setattr(fit, "rank_memory", lambda device, have=have: have)
        assert fit.resolve_checkpointing(cfg, 1, cpu)[0] is on
    assert fit.resolve_checkpointing(cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"activation_checkpointing": True})}), 1, cpu) == (True, "")
