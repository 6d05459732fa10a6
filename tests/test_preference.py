"""Preference tuning end to end: DPO, IPO, SimPO, ORPO and KTO train through `dstune train` on every kind of
row users bring, log TRL's metric names, evaluate held-out pairs, and refuse what cannot work in one line.
The losses and gradients themselves are checked against TRL in test_preference_trl.py."""
from __future__ import annotations

import json
import random

import pytest

from helpers import NEG, POS, assert_user_error, ok, read_metrics, run_cli, write_jsonl


def pair_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """A prompt naming a word; chosen repeats it, rejected says a word of the other sentiment."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w = (POS + NEG)[i % 16]
        v = rng.choice(NEG if w in POS else POS)
        rows.append({"prompt": f"say {w}", "chosen": f"{w} {w} it is", "rejected": f"{v} it is not"})
    return rows


def recipe(tmp_path, ws, name: str, data: str, methods=None, preference=None, **training) -> str:
    t = {"precision": "fp32", "max_steps": 6, "micro_batch_size": 4, "lr": 5e-3, "seed": 3, **training}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({
        "task": "preference", "model": {"path": str(ws / "llama")},
        "data": {"train": data, "max_length": 24, "eval_fraction": 0.25},
        "methods": methods or [{"name": "lora", "r": 4, "alpha": 8}],
        "preference": preference or {}, "training": t, "evaluation": {"batch_size": 8},
        "output_dir": str(tmp_path / name)}))
    return str(path)


def test_dpo_with_lora_trains_from_text_pairs(ws, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    res = ok(run_cli(["train", recipe(tmp_path, ws, "dpo", str(data))]))
    assert "preference: dpo (beta 0.1); reference: the model with lora stepped aside, no second copy" in res.stdout
    train = read_metrics(tmp_path / "dpo")
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= set(train[1])
    results = json.loads((tmp_path / "dpo" / "results.json").read_text())
    before, after = results["before"], results["after"]
    assert before["rewards/margins"] == pytest.approx(0, abs=1e-6)  # policy == reference at step 0
    assert before["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert after["rewards/margins"] > 0 and after["loss"] < before["loss"]
