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
