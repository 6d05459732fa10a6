"""A checkpoint cut off mid-save is never loaded; resume picks the last complete one."""
from __future__ import annotations

import json
import re

import pytest

from helpers import lm_recipe, ok, read_metrics, run_cli


def test_partial_checkpoint_is_ignored_on_resume(ws, built_ops, tmp_path):
    recipe = lm_recipe(ws, tmp_path, "run", max_steps=4, checkpoint_every=2)
    ok(run_cli(["train", recipe]))
    ckpt = tmp_path / "run" / "checkpoints"
    assert json.loads((ckpt / "last_complete").read_text())["tag"] == "step_00000004"
    # a later save that died half-way: its folder exists, but the pointer never moved to it
    partial = ckpt / "step_00000006"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"\x00" * 100)

    res = ok(run_cli(["train", recipe, "training.max_steps=8"]))
    assert "resumed from step_00000004 (step 4)" in res.stdout
    assert sorted(read_metrics(tmp_path / "run")) == list(range(1, 9))
    assert json.loads((ckpt / "last_complete").read_text())["tag"] == "step_00000008"


def test_resume_false_starts_over(ws, built_ops, tmp_path):
    recipe = lm_recipe(ws, tmp_path, "run", max_steps=2)
    ok(run_cli(["train", recipe]))
    res = ok(run_cli(["train", recipe, "training.resume=false"]))
    assert "resumed" not in res.stdout


def test_only_the_newest_checkpoints_are_kept(ws, built_ops, tmp_path):
    recipe = lm_recipe(ws, tmp_path, "run", max_steps=8, checkpoint_every=2, keep_checkpoints=2)
    ok(run_cli(["train", recipe]))
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_00000006", "step_00000008"]
    assert json.loads((ckpt / "last_complete").read_text())["tag"] == "step_00000008"
    res = ok(run_cli(["train", recipe, "training.max_steps=10", "training.keep_checkpoints=1"]))
    assert "resumed from step_00000008 (step 8)" in res.stdout
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_00000010"]


def test_a_run_dir_in_use_by_a_live_job_is_refused_and_left_alone(ws, built_ops, tmp_path):
    import os

    from dstune.rundir.lock import hold_run_dir

    recipe = lm_recipe(ws, tmp_path, "run", max_steps=2)
    fd = hold_run_dir(tmp_path / "run")  # this test process is the live job
    try:
        res = run_cli(["train", recipe])
        assert res.returncode == 2, res.stderr[-3000:]
        assert f"is in use by a running job (pid {os.getpid()} on" in res.stderr
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
    finally:
        os.close(fd)  # the job ends: its lock goes with it
    ok(run_cli(["train", recipe]))
    assert (tmp_path / "run" / "trainable.safetensors").is_file()


class _Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint file would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_carrying_code_is_refused_and_runs_nothing(ws, built_ops, tmp_path):
    import torch

    recipe = lm_recipe(ws, tmp_path, "run", max_steps=2)
    ok(run_cli(["train", recipe]))
    states = tmp_path / "run" / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    saved = torch.load(states, weights_only=False)
    marker = tmp_path / "pwned"
    torch.save({**saved, "extra": _Payload(marker)}, states)
    res = run_cli(["train", recipe, "training.max_steps=4"])
    assert res.returncode == 2, res.stderr[-3000:]
    assert not marker.exists()
    assert f"{states}: refused: it holds a pickled object" in res.stderr
    assert "GLOBAL posix.system" in res.stderr or "GLOBAL os.system" in res.stderr
    assert sorted(read_metrics(tmp_path / "run")) == [1, 2]  # nothing trained or logged on top


@pytest.mark.parametrize("stage, precision", [(2, "fp16"), (3, "bf16")])
def test_resume_reads_deepspeed_checkpoints_of_every_kind_without_unpickling_code(ws, built_ops, tmp_path, stage,
                                                                                  precision):
    """The types safe_load allows are all a checkpoint needs: fp16 (dynamic loss scaler) under ZeRO-2 and
    bf16 under ZeRO-3 resume exactly (ZeRO 0-3 in fp32 resume in test_distributed)."""
    from dstune.engine.precision import cpu_fp16
    if precision == "fp16" and not cpu_fp16():
        pytest.skip("this CPU runs no fp16 (oneDNN needs AVX512-FP16 or AMX-FP16), so DeepSpeed refuses it")
    name = f"z{stage}{precision}"
    recipe = lm_recipe(ws, tmp_path, name, stage, max_steps=4, checkpoint_every=2, precision=precision)
    ok(run_cli(["train", recipe, "training.max_steps=2"]))
    res = ok(run_cli(["train", recipe]))
    assert "resumed from step_00000002 (step 2)" in res.stdout
    assert sorted(read_metrics(tmp_path / name)) == [1, 2, 3, 4]


@pytest.mark.parametrize("stage", [0, 3])
def test_peft_checkpoints_hold_only_what_trains_and_resume_exactly(ws, built_ops, tmp_path, stage):
    """The frozen base is not in a LoRA run's checkpoints (it is reloaded from model.path); the resumed run
    logs the uninterrupted run's losses."""
    import torch

    lora = [{"name": "lora", "r": 4}]
    ok(run_cli(["train", lm_recipe(ws, tmp_path, "straight", stage, methods=lora, max_steps=4)]))
    recipe = lm_recipe(ws, tmp_path, "resumed", stage, methods=lora, max_steps=4, checkpoint_every=2)
    ok(run_cli(["train", recipe, "training.max_steps=2"]))
    res = ok(run_cli(["train", recipe]))
    assert "resumed from step_00000002 (step 2)" in res.stdout
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(straight[step]["loss"] - resumed[step]["loss"]) < 1e-6, (step, straight[step], resumed[step])
    [path] = (tmp_path / "resumed" / "checkpoints" / "step_00000004").glob("*model_states.pt")  # ZeRO-3: per rank
    states = torch.load(path, weights_only=False)
    saved = {k for k, v in (states["module"] or {}).items() if v.numel()}  # ZeRO-3 keeps them in optim_states
    assert not [k for k in saved if "lora" not in k and k not in states["buffer_names"]], sorted(saved)[:5]
    assert stage == 3 or any("lora" in k for k in saved)
    size = sum(f.stat().st_size for f in (tmp_path / "resumed" / "checkpoints" / "step_00000004").rglob("*"))
    base = (ws / "gpt2" / "model.safetensors").stat().st_size
    assert size < base / 2, (size, base)


def test_resume_on_another_base_model_is_refused(ws, built_ops, tmp_path):
    import shutil

    recipe = lm_recipe(ws, tmp_path, "run", methods=[{"name": "lora", "r": 4}], max_steps=2, checkpoint_every=2)
    ok(run_cli(["train", recipe]))
    other = tmp_path / "other-gpt2"
    shutil.copytree(ws / "gpt2", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "note": "another model"}))
    res = run_cli(["train", recipe, "training.max_steps=4", f"model.path={other}"])
    assert res.returncode == 2, res.stderr[-3000:]
    assert "dstune: error: model: the base model differs from the one" in res.stderr
    assert sorted(read_metrics(tmp_path / "run")) == [1, 2]


def test_resume_with_another_recipe_is_refused_before_anything_is_written(ws, built_ops, tmp_path):
    recipe = lm_recipe(ws, tmp_path, "run", max_steps=2, checkpoint_every=2)
    ok(run_cli(["train", recipe]))
    saved = (tmp_path / "run" / "config.yaml").read_text()
    res = run_cli(["train", recipe, "training.max_steps=4", "training.lr=0.1", "data.max_length=16"])
    assert res.returncode == 2, res.stderr[-3000:]
    assert ("holds checkpoints of another recipe; it differs in data.max_length (32 -> 16), training.lr (0.003 -> 0.1)"
            in res.stderr), res.stderr[-2000:]
    assert (tmp_path / "run" / "config.yaml").read_text() == saved
    # how long it runs (and how it saves, logs, evaluates) may change
    res = ok(run_cli(["train", recipe, "training.max_steps=4", "training.log_every=2", "evaluation.batch_size=4"]))
    assert "resumed from step_00000002 (step 2)" in res.stdout


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_complete_one(ws, built_ops, tmp_path):
    """2 ranks, ZeRO-2: rank 1's optimizer shard of the newest checkpoint is cut short (a power loss after
    the pointer moved). Both ranks resume from the previous complete checkpoint and log the same losses."""
    recipe = lm_recipe(ws, tmp_path, "run", 2, max_steps=4, checkpoint_every=2)
    ok(run_cli(["train", recipe], nproc=2))
    first = read_metrics(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints"
    assert json.loads((ckpt / "last_complete").read_text())["kept"] == ["step_00000004", "step_00000002"]
    shard = ckpt / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    res = ok(run_cli(["train", recipe, "training.max_steps=6"], nproc=2))
    assert (f"checkpoint step_00000004 is damaged ({shard}: File is not a zip file); resuming from the previous "
            "complete one, step_00000002") in res.stdout, res.stdout[-2000:]
    assert "resumed from step_00000002 (step 2)" in res.stdout
    again = read_metrics(tmp_path / "run")
    assert sorted(again) == list(range(1, 7))
    for step in (3, 4):  # recomputed from step 2: exact resume
        assert again[step]["loss"] == first[step]["loss"], (step, again[step], first[step])
    assert json.loads((ckpt / "last_complete").read_text())["kept"] == ["step_00000006", "step_00000004"]

    for tag in ("step_00000006", "step_00000004"):
        states = ckpt / tag / "mp_rank_00_model_states.pt"
        states.write_bytes(b"\0" * 64)
    res = run_cli(["train", recipe, "training.max_steps=8"], nproc=2)
    assert res.returncode != 0  # torchrun's own code; each rank ends with exit 2 and the line
    assert "dstune: error: " in res.stderr and "checkpoints: no kept checkpoint is readable (step_00000006, " \
        "step_00000004); remove them, or start over with training.resume=false" in res.stderr, res.stderr[-3000:]


def test_a_resumed_run_logs_each_step_once(ws, built_ops, tmp_path):
    """Steps an earlier start logged past its last checkpoint run again after the resume: metrics.jsonl
    holds each step once, with the numbers of the run that counts."""
    recipe = lm_recipe(ws, tmp_path, "run", max_steps=3, checkpoint_every=2, save_final=False, log_every=1)
    ok(run_cli(["train", recipe]))  # steps 1-3 logged, the checkpoint is step 2
    ok(run_cli(["train", recipe, "training.max_steps=4", "training.save_final=true"]))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    straight = lm_recipe(ws, tmp_path, "straight", max_steps=4, log_every=1)
    ok(run_cli(["train", straight]))
    assert abs(read_metrics(tmp_path / "straight")[3]["loss"] - read_metrics(tmp_path / "run")[3]["loss"]) < 1e-6


def test_a_resume_on_other_held_out_rows_starts_a_new_table(ws, built_ops, tmp_path):
    recipe = lm_recipe(ws, tmp_path, "run", max_steps=2, checkpoint_every=1, eval_fraction=0.4)
    ok(run_cli(["train", recipe]))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"before", "after"} <= results.keys()
    same = ok(run_cli(["train", recipe, "training.max_steps=3"]))  # the same rows: the table goes on
    assert "starts anew" not in same.stdout
    assert json.loads((tmp_path / "run" / "results.json").read_text())["before"] == results["before"]
    res = ok(run_cli(["train", recipe, "training.max_steps=4", "evaluation.max_samples=2"]))
    assert "the held-out rows differ from those this run was first scored on" in res.stdout
    now = json.loads((tmp_path / "run" / "results.json").read_text())
    assert f"({results['held_out']['rows']:,} rows then, {now['held_out']['rows']:,} now)" in res.stdout
    assert "before" not in now and now["held_out"]["rows"] < results["held_out"]["rows"] and now["steps"] == 4
    assert "before" not in res.stdout.split("results (")[1]


def test_rerunning_a_finished_run_says_where_its_results_are(ws, built_ops, tmp_path):
    dora = [{"name": "lora", "r": 2, "use_dora": True}]
    recipe = lm_recipe(ws, tmp_path, "run", methods=dora, max_steps=2, eval_fraction=0.3)
    first = ok(run_cli(["train", recipe]))
    assert "] lora (DoRA): " in first.stdout  # the start-up line names the variant
    assert re.search(r"data: [\d,]+ packed blocks of up to 32 tokens from [\d,]+ examples", first.stdout)
    trained = (tmp_path / "run" / "trainable.safetensors").stat().st_mtime_ns
    again = ok(run_cli(["train", recipe]))
    assert f"{tmp_path / 'run'} already holds this recipe's run, trained to its last step (2): nothing to do" \
        in again.stdout
    assert "after" in again.stdout and "resumed" not in again.stdout and "lora (DoRA): " not in again.stdout
    assert (tmp_path / "run" / "trainable.safetensors").stat().st_mtime_ns == trained
    longer = ok(run_cli(["train", recipe, "training.max_steps=3"]))
    assert "resumed from step_00000002 (step 2)" in longer.stdout


def test_a_run_resumed_to_train_longer_follows_the_new_schedule(ws, built_ops, tmp_path):
    """Trained to step 2 of a linear schedule that ends there (its rate reaches 0), then resumed with
    max_steps 4: step 3 updates at the rate the 4-step plan gives step 3, not at the saved 0."""
    recipe = lm_recipe(ws, tmp_path, "longer", methods=[{"name": "lora", "r": 4}], max_steps=2, warmup_steps=1,
                       lr=3e-3)
    ok(run_cli(["train", recipe]))
    ok(run_cli(["train", recipe, "training.max_steps=4"]))
    train = read_metrics(tmp_path / "longer")
    assert train[2]["lr"] == pytest.approx(3e-3)  # the 2-step plan: warm-up to step 1, 0 at step 2
    assert train[3]["lr"] == pytest.approx(3e-3 * (1 - (2 - 1) / (4 - 1)))
    assert train[4]["lr"] == pytest.approx(3e-3 * (1 - (3 - 1) / (4 - 1)))
