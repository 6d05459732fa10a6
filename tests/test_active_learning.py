"""dstune active-learn: the loop simulated with the pool's labels as the oracle, resumable per round."""
from __future__ import annotations

import json

import pytest

from helpers import GOOD, ok, run_cli


@pytest.mark.slow
def test_the_loop_grows_the_labelled_set_by_each_strategy_and_resumes(ws, built_ops, tmp_path):
    cfg = json.loads(json.dumps(GOOD).replace("MODEL", str(ws / "bert")).replace("TOK", str(ws / "tokenizer"))
                     .replace("DATA", str(ws / "cls_train.jsonl")).replace("OUT", str(tmp_path / "unused")))
    cfg["data"]["eval"] = str(ws / "cls_eval.jsonl")
    cfg["training"] = {"precision": "fp32", "epochs": 2, "micro_batch_size": 8, "lr": 1e-2}
    (tmp_path / "r.yaml").write_text(json.dumps(cfg))
    out = tmp_path / "al"
    args = ["active-learn", str(tmp_path / "r.yaml"), "--pool", str(ws / "cls_train.jsonl"), "--initial", "16",
            "--rounds", "2", "--per-round", "16", "--strategies", "entropy,random", "--seeds", "1,2", "--out", str(out)]
    res = ok(run_cli(args))
    curve = json.loads((out / "curve.json").read_text())
    assert curve["metric"] == "accuracy" and sorted(curve["runs"]) == ["entropy", "random"]
    for strategy, by_seed in curve["runs"].items():
        assert sorted(by_seed) == ["1", "2"]
        for seed, points in by_seed.items():
            assert [p["labelled"] for p in points] == [16, 32, 48]
            assert all(0 <= p["accuracy"] <= 1 for p in points)
            rounds = [json.loads((out / strategy / f"seed{seed}" / f"round{r}.json").read_text()) for r in range(3)]
            assert all(a == b[:len(a)] and len(set(b)) == len(b) for a, b in zip(rounds, rounds[1:]))
    for seed in ("1", "2"):  # every strategy of a seed starts from the same rows
        assert (out / "entropy" / f"seed{seed}" / "round0.json").read_text() == \
            (out / "random" / f"seed{seed}" / "round0.json").read_text()
    assert (out / "entropy/seed1/round1.json").read_text() != (out / "random/seed1/round1.json").read_text()
    table = (out / "curve.md").read_text()
    assert "| labelled rows | entropy | random |" in table and "| 48 |" in table and table in res.stdout
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("trainable.safetensors")}
    (out / "curve.json").unlink()
    again = ok(run_cli(args))  # everything finished: nothing trains again, the same curve comes back
    assert {p: p.stat().st_mtime_ns for p in out.rglob("trainable.safetensors")} == stamps
    assert json.loads((out / "curve.json").read_text()) == curve and "round 2" in again.stdout


def test_a_loop_the_pool_cannot_feed_is_refused(ws, tmp_path):
    cfg = json.loads(json.dumps(GOOD).replace("MODEL", str(ws / "bert")).replace("TOK", str(ws / "tokenizer"))
                     .replace("DATA", str(ws / "cls_train.jsonl")).replace("OUT", str(tmp_path / "unused")))
    (tmp_path / "r.yaml").write_text(json.dumps({**cfg, "data": {**cfg["data"], "eval": str(ws / "cls_eval.jsonl")}}))
    base = ["active-learn", str(tmp_path / "r.yaml"), "--pool", str(ws / "cls_eval.jsonl"), "--out", str(tmp_path / "al")]
    for extra, message in ((["--rounds", "5", "--per-round", "20"], "100 + 5 x 20 = 200 rows, the pool has 64"),
                           (["--rounds", "1", "--per-round", "4", "--initial", "8", "--strategies", "nll"],
                            "--strategy: 'nll' does not score classification rows")):
        res = run_cli([*base, *extra])
        assert res.returncode == 2 and message in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]


@pytest.mark.slow
def test_continue_starts_each_round_from_the_last_rounds_merged_model(ws, built_ops, tmp_path):
    cfg = json.loads(json.dumps(GOOD).replace("MODEL", str(ws / "bert")).replace("TOK", str(ws / "tokenizer"))
                     .replace("DATA", str(ws / "cls_train.jsonl")).replace("OUT", str(tmp_path / "unused")))
    cfg["data"]["eval"] = str(ws / "cls_eval.jsonl")
    cfg["methods"] = [{"name": "lora", "r": 4, "target_modules": ["query", "value"]}]
    cfg["training"] = {"precision": "fp32", "epochs": 1, "micro_batch_size": 8, "lr": 1e-2}
    (tmp_path / "r.yaml").write_text(json.dumps(cfg))
    out = tmp_path / "al"
    args = ["active-learn", str(tmp_path / "r.yaml"), "--pool", str(ws / "cls_train.jsonl"), "--initial", "16",
            "--rounds", "2", "--per-round", "16", "--strategies", "margin", "--seeds", "1", "--out", str(out)]
    ok(run_cli([*args, "--retrain", "continue"]))
    runs = [out / "margin" / "seed1" / f"round{r}" for r in range(3)]
    results = [json.loads((r / "results.json").read_text()) for r in runs]
    for prev, run, res in zip(runs, runs[1:], results[1:]):
        assert f"path: {prev / 'merged'}" in (run / "config.yaml").read_text()
    for before, after in zip(results[1:], results):  # a round starts where the last one ended
        assert abs(before["before"]["loss"] - after["after"]["loss"]) < 1e-4
    assert json.loads((out / "curve.json").read_text())["retrain"] == "continue"

    res = run_cli([*args, "--retrain", "base"])  # the rounds there were made another way
    assert res.returncode == 2 and "--out: " in res.stderr and "retrain: 'continue'" in res.stderr, res.stderr[-2000:]
    cfg["methods"] = [{"name": "adapter"}]
    (tmp_path / "r.yaml").write_text(json.dumps(cfg))
    res = run_cli([*args[:-1], str(tmp_path / "al2"), "--retrain", "continue"])
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].endswith("--retrain continue: adapter cannot be folded into the "
                                                         "weights the next round starts from; use --retrain base")
