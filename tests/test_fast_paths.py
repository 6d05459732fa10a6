"""dstune's memory and speed paths change no number that matters: the plain path's losses over 20 steps."""
from __future__ import annotations

import pytest

from helpers import lm_recipe, ok, read_metrics, run_cli

PLAIN = ["training.lean_activations=false", "training.loss_chunk_tokens=0"]
FAST = ["training.lean_activations=true", "training.loss_chunk_tokens=16"]


@pytest.mark.slow
def test_fast_paths_train_like_the_plain_path_in_bf16(ws, built_ops, tmp_path):
    recipe = lm_recipe(ws, tmp_path, "run", 2, max_steps=20, precision="bf16")
    runs = {}
    for name, flags in (("plain", PLAIN), ("fast", FAST)):
        ok(run_cli(["train", recipe, f"model.path={ws / 'llama'}", *flags, f"output_dir={tmp_path / name}"]))
        runs[name] = read_metrics(tmp_path / name)
    plain, fast = runs["plain"], runs["fast"]
    assert sorted(fast) == sorted(plain) == list(range(1, 21))
    assert plain[20]["loss"] < plain[1]["loss"] - 0.2  # it learns, so wrong gradients would show
    worst = max(abs(fast[s]["loss"] - plain[s]["loss"]) for s in plain)
    assert worst < 5e-3, {s: (plain[s]["loss"], fast[s]["loss"]) for s in plain}
