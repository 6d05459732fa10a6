"""A checkpoint cut off mid-save is never loaded; resume picks the last complete one."""
from __future__ import annotations

import json

from conftest import ok, read_metrics, run_cli
from test_distributed import lm_recipe


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

    from dstune.engine.run_lock import hold_run_dir

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
