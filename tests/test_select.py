"""dstune select: the pool's rows scored by a trained run, the k most informative written for labelling."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import GOOD, lm_recipe, ok, run_cli


@pytest.fixture(scope="module")
def classifier(ws, built_ops, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classifier")
    cfg = json.loads(json.dumps(GOOD).replace("MODEL", str(ws / "bert")).replace("TOK", str(ws / "tokenizer"))
                     .replace("DATA", str(ws / "cls_train.jsonl")).replace("OUT", str(tmp / "run")))
    (tmp / "r.yaml").write_text(json.dumps({**cfg, "training": {"precision": "fp32", "max_steps": 20, "lr": 1e-2}}))
    ok(run_cli(["train", str(tmp / "r.yaml")]))
    return tmp / "run"


def picked(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def probabilities(run, texts: list[str]) -> torch.Tensor:
    from dstune.rundir.load import load_run

    loaded = load_run(str(run))
    tok, model = loaded.tokenizer, loaded.model
    with torch.no_grad():
        return torch.stack([model(**tok(t, return_tensors="pt")).logits[0].softmax(-1) for t in texts])


@pytest.mark.parametrize("strategy", ["entropy", "margin", "least-confidence"])
def test_the_least_certain_rows_are_picked(ws, classifier, tmp_path, strategy):
    """The scores are those of the model's own predictions, row by row, and the k picked are the k highest."""
    pool = [json.loads(line) for line in (ws / "cls_eval.jsonl").read_text().splitlines()]
    out = tmp_path / "pick.jsonl"
    res = ok(run_cli(["select", str(classifier), "--pool", str(ws / "cls_eval.jsonl"), "--strategy", strategy,
                      "--k", "10", "--out", str(out)]))
    assert f"10 of {len(pool)} rows by {strategy}" in res.stdout
    got = picked(out)
    p = probabilities(classifier, [r["text"] for r in pool])
    top = p.topk(2, dim=-1).values
    want = {"entropy": -(p * p.log()).sum(-1), "margin": 1 - (top[:, 0] - top[:, 1]),
            "least-confidence": 1 - top[:, 0]}[strategy]
    assert [r["text"] for r in got] == [pool[r["pool_row"]]["text"] for r in got]  # rows keep their columns
    assert all(abs(r["score"] - want[r["pool_row"]].item()) < 1e-5 for r in got)
    assert min(r["score"] for r in got) >= sorted(want.tolist(), reverse=True)[9] - 1e-6
    assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True)


def test_random_is_a_seeded_sample(ws, classifier, tmp_path):
    args = ["select", str(classifier), "--pool", str(ws / "cls_eval.jsonl"), "--strategy", "random", "--k", "8"]
    rows = []
    for seed in (0, 0, 1):
        out = tmp_path / f"r{len(rows)}.jsonl"
        ok(run_cli([*args, "--seed", str(seed), "--out", str(out)]))
        rows.append([r["pool_row"] for r in picked(out)])
    assert rows[0] == rows[1] != rows[2] and len(set(rows[0])) == 8


@pytest.mark.slow
def test_two_ranks_share_the_scoring_and_pick_the_same_rows(ws, classifier, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    args = ["select", str(classifier), "--pool", str(ws / "cls_eval.jsonl"), "--strategy", "entropy", "--k", "12",
            "--batch-size", "5"]
    ok(run_cli([*args, "--out", str(one)]))
    ok(run_cli([*args, "--out", str(two)], nproc=2))
    a, b = picked(one), picked(two)
    assert [r["pool_row"] for r in a] == [r["pool_row"] for r in b]
    assert all(abs(x["score"] - y["score"]) < 1e-6 for x, y in zip(a, b))


def test_nll_scores_each_reference_by_the_models_own_loss(ws, built_ops, tmp_path):
    """causal LM: a row's score is the mean loss per target token of its response given its prompt."""
    from dstune.rundir.load import load_run

    recipe = lm_recipe(ws, tmp_path, "lm", methods=[{"name": "lora", "r": 4}], max_steps=4)
    ok(run_cli(["train", recipe]))
    out = tmp_path / "pick.jsonl"
    ok(run_cli(["select", str(tmp_path / "lm"), "--pool", str(ws / "lm.jsonl"), "--strategy", "nll", "--k", "3",
                "--out", str(out)]))
    loaded = load_run(str(tmp_path / "lm"))
    tok, model = loaded.tokenizer, loaded.model
    for r in picked(out):
        ids = tok(r["text"], return_tensors="pt")["input_ids"]
        ids = torch.cat([ids, torch.tensor([[tok.eos_token_id]])], 1)[:, :32]
        with torch.no_grad():
            assert abs(model(input_ids=ids, labels=ids).loss.item() - r["score"]) < 1e-4, r


@pytest.mark.parametrize("args, message", [
    (["--strategy", "nll", "--k", "3"], r"--strategy: 'nll' does not score classification rows; use random, entropy"),
    (["--strategy", "entropy", "--k", "1000"], r"--k: 1000 is more than the pool's 64 rows"),
    (["--strategy", "entropy", "--k", "3", "--pool", "NOTEXT"], r"data\.text_column: column 'text' not in .*notext"),
])
def test_a_selection_that_cannot_be_made_is_one_line(ws, classifier, tmp_path, args, message):
    import re

    (tmp_path / "notext.jsonl").write_text('{"review": "a b"}\n')
    args = [a.replace("NOTEXT", str(tmp_path / "notext.jsonl")) for a in args]
    pool = [] if "--pool" in args else ["--pool", str(ws / "cls_eval.jsonl")]
    res = run_cli(["select", str(classifier), *pool, *args, "--out", str(tmp_path / "o.jsonl")])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert re.search(message, res.stderr.strip().splitlines()[-1]), res.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_prompts_without_replies_are_scored_by_the_models_own_greedy_reply(ws, built_ops, tmp_path):
    """A pool of prompts alone: each score is the mean NLL of the reply the model gives greedily, recomputed
    here with one forward over prompt + reply."""
    from dstune.rundir.load import load_run

    recipe = lm_recipe(ws, tmp_path, "lm", methods=[{"name": "lora", "r": 4}], max_steps=4)
    ok(run_cli(["train", recipe, "evaluation.max_new_tokens=6"]))
    prompts = [json.loads(line)["text"].split()[:3] for line in (ws / "lm.jsonl").read_text().splitlines()[:12]]
    pool = tmp_path / "prompts.jsonl"
    pool.write_text("".join(json.dumps({"prompt": " ".join(p)}) + "\n" for p in prompts))
    out = tmp_path / "pick.jsonl"
    ok(run_cli(["select", str(tmp_path / "lm"), "--pool", str(pool), "--strategy", "nll", "--k", "12",
                "--batch-size", "5", "--out", str(out)]))
    loaded = load_run(str(tmp_path / "lm"))
    tok, model = loaded.tokenizer, loaded.model
    for r in picked(out):
        x = torch.tensor([tok(r["prompt"])["input_ids"]])
        with torch.no_grad():
            reply = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                   pad_token_id=tok.pad_token_id)[0, x.shape[1]:].tolist()
            if tok.eos_token_id in reply:
                reply = reply[:reply.index(tok.eos_token_id) + 1]
            full = torch.tensor([x[0].tolist() + reply])
            logp = torch.log_softmax(model(input_ids=full).logits[0, x.shape[1] - 1:-1], -1)
        want = -logp.gather(-1, torch.tensor(reply)[:, None]).mean().item()
        assert abs(want - r["score"]) < 1e-4, (r, want)
