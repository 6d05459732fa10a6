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


# --- rows as users have them ---------------------------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HISTORY = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the movie was good"},
           {"role": "assistant", "content": "a clever plot"}, {"role": "user", "content": "and the cast"}]
GOOD, BAD = "the actors were great", "it was boring"
SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


def _sharegpt(turns):
    return [{"from": SHAREGPT[t["role"]], "value": t["content"]} for t in turns]


LAYOUTS = {  # one pair, as each kind of file holds it
    "conversations": {"chosen": HISTORY + [{"role": "assistant", "content": GOOD}],
                      "rejected": HISTORY + [{"role": "assistant", "content": BAD}]},
    "prompt_turns": {"prompt": HISTORY, "chosen": [{"role": "assistant", "content": GOOD}],
                     "rejected": [{"role": "assistant", "content": BAD}]},
    "sharegpt": {"conversations": _sharegpt(HISTORY), "chosen": {"from": "gpt", "value": GOOD},
                 "rejected": {"from": "gpt", "value": BAD}},
}


def _prepare(tmp_path, ws, rows, template=CHATML, **extra):
    from dstune.config import load_config
    from dstune.models.tokenizers import load_tokenizer
    from dstune.prepare.pipeline import prepare_data

    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"task": "preference", "model": {"tiny": "llama"},
                                  "tokenizer": {"path": str(ws / "tokenizer"), "chat_template": template},
                                  "data": {"train": str(data), "max_length": extra.pop("max_length", 512),
                                           "packing": extra.pop("packing", False)},
                                  "output_dir": str(tmp_path / "run"), **extra}))
    cfg = load_config(recipe)
    return prepare_data(cfg, load_tokenizer(str(ws / "tokenizer"), chat_template=template)), cfg


def _reply(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != -100])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_pair_layout_renders_as_supervised_chat_data(ws, tmp_path, layout):
    """UltraFeedback/HH conversations, TRL's prompt turns + one reply, ShareGPT: the same tokens; only the last
    reply is scored, its end-of-turn marker included, rendered exactly as the chat template renders it."""
    from dstune.models.tokenizers import load_tokenizer

    data, _ = _prepare(tmp_path, ws, [LAYOUTS[layout]] * 2)
    tok = load_tokenizer(str(ws / "tokenizer"), chat_template=CHATML)
    row = data.train[0]
    whole = tok.apply_chat_template(HISTORY + [{"role": "assistant", "content": GOOD}], tokenize=False)
    assert row["input_ids"] == tok(whole, add_special_tokens=False)["input_ids"]
    said = lambda text: tok.decode(tok(f"{text}<|im_end|>", add_special_tokens=False)["input_ids"]).replace(" ", "")  # noqa: E731
    assert _reply(tok, row["input_ids"], row["labels"]).replace(" ", "") == said(GOOD)
    assert _reply(tok, row["rejected_ids"], row["rejected_labels"]).replace(" ", "") == said(BAD)
    (tmp_path / "ref").mkdir()
    reference, _ = _prepare(tmp_path / "ref", ws, [LAYOUTS["conversations"]] * 2)
    assert data.train[0] == reference.train[0]


def test_text_pairs_with_a_template_render_the_prompt_as_a_user_turn(ws, tmp_path):
    from dstune.models.tokenizers import load_tokenizer

    data, _ = _prepare(tmp_path, ws, [{"prompt": "and the cast", "chosen": GOOD, "rejected": BAD}] * 2)
    tok = load_tokenizer(str(ws / "tokenizer"), chat_template=CHATML)
    whole = tok.apply_chat_template([{"role": "user", "content": "and the cast"},
                                     {"role": "assistant", "content": GOOD}], tokenize=False)
    assert data.train[0]["input_ids"] == tok(whole, add_special_tokens=False)["input_ids"]


def test_unpaired_rows_and_their_mismatched_kl_rows(ws, tmp_path):
    from dstune.models.tokenizers import load_tokenizer

    rows = [{"prompt": f"say {w}", "completion": f"{w} it is", "label": i % 2 == 0} for i, w in enumerate(POS[:4])]
    data, _ = _prepare(tmp_path, ws, rows, preference={"loss": "kto"})
    tok = load_tokenizer(str(ws / "tokenizer"), chat_template=CHATML)
    assert data.train["desirable"] == [1, 0, 1, 0]
    # row 1's KL row: its own prompt, row 0's reply
    kl = data.train[1]
    assert _reply(tok, kl["kl_input_ids"], kl["kl_labels"]) == _reply(tok, data.train[0]["input_ids"],
                                                                       data.train[0]["labels"])
    assert tok.decode(kl["kl_input_ids"]).startswith(tok.decode(data.train[1]["input_ids"][:5]))


def test_a_prompt_that_fills_max_length_is_left_out_and_counted(ws, tmp_path):
    long = {"prompt": " ".join(["the movie was good"] * 40), "chosen": GOOD, "rejected": BAD}
    short = {"prompt": "and the cast", "chosen": GOOD + " " + " ".join(["and great"] * 60), "rejected": BAD}
    data, cfg = _prepare(tmp_path, ws, [long, short, short], max_length=96)
    assert len(data.train) == 2 and data.sources[0]["too_long"] == 1
    assert len(data.train[0]["input_ids"]) == 96  # the long reply is cut at its end
    assert data.train[0]["labels"][-1] != -100
    from dstune.models.tokenizers import load_tokenizer
    from dstune.prepare.cache import prepared_data, summary
    cfg.data.cache_dir = str(tmp_path / "cache")
    line = summary(*prepared_data(cfg, load_tokenizer(str(ws / "tokenizer"), chat_template=CHATML)))
    assert line.endswith("; left out, the prompt alone filling data.max_length (96 tokens): 1 rows of rows.jsonl")


@pytest.mark.parametrize("row, message", [
    ({"chosen": HISTORY + [{"role": "assistant", "content": GOOD}],
      "rejected": HISTORY[:2] + [{"role": "assistant", "content": BAD}]},
     r"rows.jsonl:2: data.train: chosen and rejected: the conversations differ before their last turn"),
    ({"chosen": GOOD, "rejected": BAD},
     r"rows.jsonl:2: data.train: prompt: missing \(the replies are text"),
    ({"prompt": HISTORY, "chosen": [{"role": "user", "content": GOOD}], "rejected": BAD},
     r"rows.jsonl:2: data.train: chosen: expected one assistant reply after the prompt, got user"),
    ({"prompt": "hi", "chosen": 3, "rejected": BAD},
     r"rows.jsonl:2: data.train: chosen: expected text or turns, got int"),
])
def test_bad_pair_rows_name_their_line(ws, tmp_path, row, message):
    from dstune.errors import UserError

    with pytest.raises(UserError, match=message):
        _prepare(tmp_path, ws, [LAYOUTS["prompt_turns"], row])


def test_bad_unpaired_label_and_the_wrong_rows_for_the_loss(ws, tmp_path):
    from dstune.errors import UserError

    with pytest.raises(UserError, match=r"rows.jsonl:1: data.train: label: expected true \(a good reply\) or false"):
        _prepare(tmp_path, ws, [{"prompt": "a", "completion": "b", "label": "yes"}], preference={"loss": "kto"})
    with pytest.raises(UserError, match=r"preference.loss: dpo trains on pairs \(prompt, chosen, rejected\), and "
                                        r".*rows.jsonl holds unpaired rows$"):
        _prepare(tmp_path, ws, [{"prompt": "a", "completion": "b", "label": True}])
    with pytest.raises(UserError, match=r"preference.loss: kto trains on unpaired rows .* holds pairs$"):
        _prepare(tmp_path, ws, [LAYOUTS["prompt_turns"]], preference={"loss": "kto"})
    with pytest.raises(UserError, match=r"data.packing: preference rows are scored pair by pair"):
        _prepare(tmp_path, ws, [LAYOUTS["prompt_turns"]], packing=True)


# --- where the reference comes from ---------------------------------------------------------------------

def _base_params(ws) -> int:
    from safetensors.torch import load_file
    return sum(t.numel() for t in load_file(str(ws / "llama" / "model.safetensors")).values())


def _train_curve(tmp_path, ws, name, data, **kw) -> tuple[dict, dict]:
    res = ok(run_cli(["train", recipe(tmp_path, ws, name, data, **kw)]))
    memory = json.loads((tmp_path / name / "memory.json").read_text())["after_first_step"][0]
    return {s: (m["loss"], m.get("rewards/margins")) for s, m in read_metrics(tmp_path / name).items()}, \
        {"stdout": res.stdout, "reference_bytes": memory.get("reference_bytes")}


def test_the_reference_is_the_same_whether_stepped_aside_copied_or_precomputed(ws, tmp_path):
    """LoRA: the base with the adapter stepped aside, a frozen copy and log-probabilities precomputed before the
    first step are the same reference: the same losses and rewards at every step. Only the copy holds a
    second model (memory.json: the bytes of reference weights each rank holds)."""
    data = str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows()))
    base, b = _train_curve(tmp_path, ws, "base", data)
    copy, c = _train_curve(tmp_path, ws, "copy", data, preference={"reference": "copy"})
    pre, p = _train_curve(tmp_path, ws, "pre", data, preference={"reference": "precompute"})
    for other in (copy, pre):
        assert other.keys() == base.keys()
        for step in base:
            assert other[step] == pytest.approx(base[step], abs=1e-5), step
    assert base[6][1] != 0  # the rewards moved
    assert b["reference_bytes"] == 0 and p["reference_bytes"] == 0
    assert c["reference_bytes"] == 4 * _base_params(ws)  # every weight of the tiny Llama, fp32
    assert "reference: computed once before the first step with the base model" in p["stdout"]
    assert "reference log-probabilities (preference.reference: precompute): " in p["stdout"]


def test_full_fine_tuning_precomputes_its_reference_and_refuses_base(ws, tmp_path):
    data = str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows()))
    res = ok(run_cli(["train", recipe(tmp_path, ws, "full", data, methods=[{"name": "full"}], lr=1e-3, max_steps=3)]))
    assert "reference: computed once before the first step with the base model" in res.stdout
    after = json.loads((tmp_path / "full" / "results.json").read_text())["after"]
    assert after["rewards/margins"] > 0
    res = run_cli(["train", recipe(tmp_path, ws, "refused", data, methods=[{"name": "full"}],
                                   preference={"reference": "base"})])
    assert_user_error(res, r"preference.reference: base is the model with its methods stepped aside, and full "
                           r"trains the base's own weights; use copy, precompute or a model folder / run dir",
                      tmp_path / "refused")


@pytest.mark.parametrize("preference, message", [
    ({"loss": "simpo", "reference": "copy"}, r"preference.reference: simpo needs no reference model"),
    ({"loss": "orpo", "sft_weight": 0.5}, r"preference.sft_weight: orpo has its NLL term built in"),
])
def test_settings_that_cannot_work_are_refused(ws, tmp_path, preference, message):
    data = str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8)))
    assert_user_error(run_cli(["train", recipe(tmp_path, ws, "r", data, preference=preference)]), message,
                      tmp_path / "r")


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo"])
def test_each_pair_objective_trains_and_logs(ws, tmp_path, loss):
    data = str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows()))
    ok(run_cli(["train", recipe(tmp_path, ws, loss, data, preference={"loss": loss}, max_steps=4)]))
    results = json.loads((tmp_path / loss / "results.json").read_text())
    assert results["after"]["rewards/margins"] > results["before"]["rewards/margins"]
    if loss == "orpo":
        assert {"log_odds_ratio", "log_odds_chosen", "nll_loss"} <= set(read_metrics(tmp_path / loss)[4])


def test_kto_trains_on_unpaired_rows(ws, tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in pair_rows(32)
            for k in ("chosen", "rejected")]
    data = str(write_jsonl(tmp_path / "kto.jsonl", rows))
    ok(run_cli(["train", recipe(tmp_path, ws, "kto", data, preference={"loss": "kto"}, max_steps=4)]))
    step = read_metrics(tmp_path / "kto")[4]
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(step)
    results = json.loads((tmp_path / "kto" / "results.json").read_text())
    assert results["after"]["rewards/margins"] > results["before"]["rewards/margins"]


# --- SFT -> DPO, and what a preference run gives back ---------------------------------------------------

def test_sft_then_dpo_in_two_commands_then_eval_and_export(ws, tmp_path):
    """An SFT run dir is a model.path (its merged weights) and a reference; at step 0 the policy is the SFT
    model and so is the reference (rewards 0). `dstune eval` scores the DPO run as its last evaluation did;
    `dstune export` gives a PEFT adapter and merged weights as for any run."""
    sft = tmp_path / "sft.yaml"
    sft.write_text(json.dumps({"task": "causal_lm", "model": {"path": str(ws / "llama")},
                               "data": {"train": str(ws / "chat.jsonl"), "max_length": 24},
                               "training": {"precision": "fp32", "max_steps": 3, "micro_batch_size": 4, "lr": 3e-3},
                               "output_dir": str(tmp_path / "sft")}))
    ok(run_cli(["train", str(sft)]))
    data = str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows()))
    path = recipe(tmp_path, ws, "dpo", data)
    spec = json.loads(open(path).read())
    spec["model"]["path"] = str(tmp_path / "sft")
    open(path, "w").write(json.dumps(spec))
    res = ok(run_cli(["train", path]))
    assert f"model.path: {tmp_path / 'sft'} is a dstune run dir: training on its merged weights" in res.stdout
    results = json.loads((tmp_path / "dpo" / "results.json").read_text())
    assert results["before"]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert results["after"]["rewards/margins"] > 0

    spec.update(methods=[{"name": "full"}], output_dir=str(tmp_path / "dpo-full"),
                preference={"reference": str(tmp_path / "sft")})
    spec["training"].update(max_steps=2, lr=1e-3)
    open(path, "w").write(json.dumps(spec))
    ok(run_cli(["train", path]))
    full = json.loads((tmp_path / "dpo-full" / "results.json").read_text())
    assert full["before"]["rewards/margins"] == pytest.approx(0, abs=1e-6)  # the reference is the SFT model

    scored = json.loads(ok(run_cli(["eval", str(tmp_path / "dpo"), "--json"])).stdout)
    for k in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert scored[k] == pytest.approx(results["after"][k], abs=1e-5), k
    ok(run_cli(["export", str(tmp_path / "dpo"), "--format", "peft", "--out", str(tmp_path / "peft")]))
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    ok(run_cli(["export", str(tmp_path / "dpo"), "--format", "merged", "--out", str(tmp_path / "merged")]))
    assert (tmp_path / "merged" / "config.json").is_file()


# --- many ranks -----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["dpo-lora-sft", "kto-lora", "dpo-full-precompute", "ipo-full-copy"])
def test_two_zero3_ranks_with_accumulation_equal_one_rank(ws, built_ops, tmp_path, case):
    """The loss is the mean over the global batch's pairs (rows, kto; the KL estimate too), and the NLL term
    the token mean over its chosen replies: 2 ranks × accumulation 2 under ZeRO-3 step as 1 rank × 4 does,
    whether the reference is the base stepped aside (gathered layer by layer), precomputed, or a frozen copy
    (partitioned by DeepSpeed)."""
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    loss = case.split("-")[0]
    if loss == "kto":
        rows = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in pair_rows(40)
                for k in ("chosen", "rejected")]
    else:
        rows = pair_rows(80)
    data = str(write_jsonl(tmp_path / "rows.jsonl", rows))
    methods = [{"name": "full"}] if "full" in case else None
    preference = {"loss": loss, **({"sft_weight": 0.5} if "sft" in case else {}),
                  **({"reference": "copy"} if "copy" in case else {})}
    common = dict(methods=methods, preference=preference, micro_batch_size=2, max_steps=4,
                  lr=1e-3 if "full" in case else 5e-3)
    ok(run_cli(["train", recipe(tmp_path, ws, "one", data, gradient_accumulation_steps=4, **common)]))
    ok(run_cli(["train", recipe(tmp_path, ws, "two", data, gradient_accumulation_steps=2, **common),
                f"deepspeed={zero3}"], nproc=2))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        for k in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen") + (("kl",) if loss == "kto" else ()):
            assert two[step][k] == pytest.approx(one[step][k], abs=2e-5), (step, k)
    r1, r2 = (json.loads((tmp_path / r / "results.json").read_text())["after"] for r in ("one", "two"))
    assert r2["loss"] == pytest.approx(r1["loss"], abs=2e-5)


def test_the_estimate_counts_the_reference_it_holds(ws, tmp_path):
    """A copy holds the base's weights again (partitioned under ZeRO-3); the base stepped aside and
    precomputed log-probabilities hold nothing."""
    data = str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8)))
    path = recipe(tmp_path, ws, "e", data)
    est = lambda *o: json.loads(ok(run_cli(["estimate", path, "--json", *o])).stdout)[0]  # noqa: E731
    base, copy = est(), est("preference.reference=copy")
    assert base["reference_weights"] == 0 and est("preference.reference=precompute")["reference_weights"] == 0
    assert copy["reference_weights"] == 4 * _base_params(ws)  # fp32, every weight of the base (no LoRA)
    assert copy["total"] == base["total"] + copy["reference_weights"]
    zero3 = est("preference.reference=copy", "deepspeed=zero3", "--world-size", "2")
    assert 0 < zero3["reference_weights"] < copy["reference_weights"]
    table = ok(run_cli(["estimate", path, "preference.reference=copy"])).stdout
    assert "reference model (preference.reference: copy; frozen, ZeRO-3: partitioned)" in table


def test_prompt_tuning_scores_the_untouched_base_too(ws, tmp_path):
    """A soft prompt changes the model before any step: the results table gets the base model's column
    (policy and reference both the base: rewards 0), and the prompt-tuned policy's own 'before'."""
    data = str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows()))
    ok(run_cli(["train", recipe(tmp_path, ws, "prompt", data, methods=[{"name": "prompt", "num_virtual_tokens": 4}],
                                max_steps=3, lr=3e-2)]))
    results = json.loads((tmp_path / "prompt" / "results.json").read_text())
    assert results["base"]["rewards/chosen"] == 0 and results["base"]["rewards/rejected"] == 0
    assert results["before"]["rewards/chosen"] != 0


def test_kto_with_full_fine_tuning_precomputed_equals_a_copy(ws, tmp_path):
    """kto's reference for its rows and for its mismatched KL rows, precomputed, is the frozen copy's."""
    rows = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in pair_rows(16)
            for k in ("chosen", "rejected")]
    data = str(write_jsonl(tmp_path / "kto.jsonl", rows))
    kw = dict(methods=[{"name": "full"}], max_steps=3, lr=1e-3)
    copy, _ = _train_curve(tmp_path, ws, "copy", data, preference={"loss": "kto", "reference": "copy"}, **kw)
    pre, p = _train_curve(tmp_path, ws, "pre", data, preference={"loss": "kto"}, **kw)
    assert "reference: computed once before the first step" in p["stdout"]
    for step in copy:
        assert pre[step] == pytest.approx(copy[step], abs=1e-5), step
    kl = [[m["kl"] for m in read_metrics(tmp_path / r).values()] for r in ("copy", "pre")]
    assert kl[1] == pytest.approx(kl[0], abs=1e-6)


def test_active_learning_refuses_a_preference_run():
    from dstune.active.select import check_strategy
    from dstune.errors import UserError

    with pytest.raises(UserError, match=r"--strategy: active learning picks rows to label .* a preference run's"):
        check_strategy("preference", "nll")


def test_generation_scoring_and_unusable_run_dirs_are_refused_in_one_line(ws, tmp_path):
    from dstune.config import RunConfig
    from dstune.errors import UserError
    from dstune.rundir.as_base import base_from_run

    with pytest.raises(UserError, match=r"evaluation.generate: preference runs are scored by their rewards"):
        _prepare(tmp_path, ws, [LAYOUTS["prompt_turns"]], evaluation={"generate": True})
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.yaml").write_text("{}")
    (run / "run.json").write_text("{}")
    cfg = RunConfig.model_validate({"task": "preference", "model": {"path": str(run)}, "data": {"train": "x"},
                                    "output_dir": str(tmp_path / "out")})
    with pytest.raises(UserError, match=r"model.path: .*unfinished is a dstune run dir that has not finished"):
        base_from_run(cfg)
    data = str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8)))
    ok(run_cli(["train", recipe(tmp_path, ws, "prompt", data, methods=[{"name": "prompt", "num_virtual_tokens": 2}],
                                max_steps=1)]))
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(tmp_path / "prompt")})})
    with pytest.raises(UserError, match=r"model.path: .*prompt trained prompt, which cannot be folded into the base"):
        base_from_run(cfg)
