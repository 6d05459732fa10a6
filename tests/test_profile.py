"""training.profile_step: one optimizer step under torch.profiler, a trace per rank and a table on rank 0."""
from __future__ import annotations

import json

import pytest

from helpers import ok, random_tokens_recipe, read_metrics, run_cli


@pytest.mark.slow
def test_profile_step_writes_a_trace_per_rank_and_a_table(built_ops, tmp_path):
    out = tmp_path / "run"
    ok(run_cli(["train", random_tokens_recipe(tmp_path), "training.max_steps=3", "training.profile_step=2",
                "training.save_final=false", f"output_dir={out}"], nproc=2))
    for rank in (0, 1):
        trace = json.loads((out / "profile" / f"trace-rank{rank}.json").read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"dstune/forward", "dstune/backward", "dstune/step", "aten::mm"} <= names
    table = (out / "profile" / "profile.md").read_text()
    assert table.startswith("# Step 2, rank 0")
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "ms" not in line]
    phases = rows[:3]
    assert phases == ["backward", "forward", "step"]
    assert "| operator | calls | self CPU time (ms) | share |" in table and "| aten::mm |" in table
    assert sorted(read_metrics(out)) == [1, 2, 3]  # the profiled step trains like any other


def test_profile_step_past_the_end_is_refused_before_anything_is_written(built_ops, tmp_path):
    out = tmp_path / "run"
    res = run_cli(["train", random_tokens_recipe(tmp_path), "training.max_steps=3", "training.profile_step=4",
                   f"output_dir={out}"])
    assert res.returncode == 2
    assert "training.profile_step: 4 is past the run's last step (3)" in res.stderr.strip().splitlines()[-1]
    assert not out.exists()
