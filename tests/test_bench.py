"""`dstune bench` runs each method in its own process and writes a table, JSON and a plot."""
from __future__ import annotations

import json

from conftest import ok, run_cli
from test_distributed import lm_recipe

KEYS = {"method", "trainable_params", "tokens_per_s", "step_s", "mfu", "peak_bytes", "estimate_bytes"}


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
        assert {s["tokens"] for s in steps} == {2 * 32}  # micro-batch 2 × 32 packed tokens per step
    full, lora, prefix = rows
    assert lora["trainable_params"] < full["trainable_params"] and prefix["trainable_params"] < full["trainable_params"]
    # frozen weights carry no optimizer state: measured model states shrink with the method
    assert lora["model_state_bytes_measured"] < full["model_state_bytes_measured"]
    assert (out / "bench.png").stat().st_size > 10_000 and (out / "bench.md").read_text().startswith("| method |")
    assert "| lora |" in res.stdout


def test_bench_rejects_unknown_method(ws, tmp_path):
    res = run_cli(["bench", lm_recipe(ws, tmp_path, "unused"), "--methods", "full,magic"])
    assert res.returncode == 2 and "dstune: error: --methods: unknown magic; known: full," in res.stderr
