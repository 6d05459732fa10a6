"""`dstune init`: the task and format found from the data's columns, a recipe whose every key is commented
with the schema's own description, that loads and trains as written; one-line errors that write nothing."""
from __future__ import annotations

import io
import json
import re
import sys

import pandas as pd
import pytest
import yaml

from helpers import assert_user_error, ok, run_cli, write_jsonl
from dstune.config import DataConfig, RunConfig, TrainingConfig, load_config
from dstune.methods import available, build_methods

TURNS = [{"role": "user", "content": "say good"}, {"role": "assistant", "content": "good good it is"}]
SHAREGPT = [{"from": "human", "value": "say good"}, {"from": "gpt", "value": "good good it is"}]
FORMATS = {  # name: (model, rows, file suffix, what init says, task, data keys the recipe holds)
    "text": ("llama", [{"text": "the movie was good"}], "jsonl", "plain text", "causal_lm", {"format": "text"}),
    "prompt_response": ("llama", [{"prompt": "say good", "response": "good"}], "jsonl", "prompt/response pairs",
                        "causal_lm", {"format": "prompt_response"}),
    "completion": ("gpt2", [{"prompt": "say good", "completion": "good"}], "jsonl",
                   "prompt/response pairs ('prompt' → 'completion')", "causal_lm",
                   {"format": "prompt_response", "response_column": "completion"}),
    "messages": ("llama", [{"messages": TURNS}], "jsonl", "OpenAI messages", "causal_lm", {"format": "messages"}),
    "sharegpt": ("llama", [{"conversations": SHAREGPT}], "json", "ShareGPT conversations", "causal_lm",
                 {"format": "sharegpt"}),
    "alpaca": ("llama", [{"instruction": "say it", "input": "good", "output": "good"}], "jsonl",
               "Alpaca instructions", "causal_lm", {"format": "alpaca"}),
    "labels": ("bert", [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}], "jsonl",
               "text with labels (2 classes in 'label')", "classification", {}),
    "csv_sentiment": ("bert", [{"sentence": "good film", "sentiment": 1}, {"sentence": "bad film", "sentiment": 0}],
                      "csv", "text with labels (2 classes in 'sentiment')", "classification",
                      {"text_column": "sentence", "label_column": "sentiment"}),
    "source_target": ("t5", [{"source": "copy good", "target": "good"}], "parquet", "source/target pairs", "seq2seq",
                      {}),
    "pairs": ("llama", [{"prompt": "say good", "chosen": "good", "rejected": "bad"}], "jsonl",
              "preference pairs (text)", "preference", {"format": "pairs"}),
    "pair_conversations": ("llama", [{"chosen": TURNS, "rejected": TURNS[:1] + [{"role": "assistant", "content": "no"}]}],
                           "jsonl", "preference pairs (conversations)", "preference", {"format": "pairs"}),
    "unpaired": ("llama", [{"prompt": "say good", "completion": "good", "label": True}], "jsonl",
                 "replies labelled good or bad (unpaired, KTO)", "preference", {"format": "unpaired"}),
}


def data_file(tmp_path, rows: list[dict], suffix: str, n: int = 30):
    """`n` rows cycling through `rows`, as a file of that kind."""
    rows = [rows[i % len(rows)] for i in range(n)]
    path = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    elif suffix == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


def init(*args, input=None, **kw):
    return run_cli(["init", *map(str, args)], input=input, **kw)


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_data_format_is_found_and_the_recipe_loads(ws, tmp_path, name):
    model, rows, suffix, what, task, keys = FORMATS[name]
    data, out = data_file(tmp_path, rows, suffix), tmp_path / "recipe.yaml"
    res = ok(init("--model", ws / model, "--data", data, "--out", out))
    lines = res.stdout.splitlines()
    assert f"data: {data} looks like {what} (30 rows) → task {task}" in lines
    assert lines[-2:] == [f"wrote {out}", f"next: dstune train {out}"]
    cfg = load_config(out)
    assert cfg.task == task and cfg.model.path == str(ws / model) and cfg.data.train == str(data)
    assert {k: getattr(cfg.data, k) for k in keys} == keys
    assert [m["name"] for m in cfg.methods] == ["lora"]
    # the chat formats get a template where the model has none (the workspace's tokenizer has none)
    assert (cfg.tokenizer.chat_template is not None) == (name in ("messages", "sharegpt", "alpaca",
                                                                  "pair_conversations"))
    if task == "preference":  # dpo for pairs, kto for unpaired rows, at a tenth of the supervised learning rate
        assert cfg.preference.loss == ("kto" if name == "unpaired" else "dpo") and cfg.training.lr == pytest.approx(2e-5)


def test_every_key_is_commented_with_the_schemas_description(ws, tmp_path):
    out = tmp_path / "recipe.yaml"
    ok(init("--model", ws / "llama", "--data", ws / "chat.jsonl", "--out", out, "--method", "lora"))
    text = out.read_text()
    keys = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert keys and all(" # " in line for line in keys), [line for line in keys if " # " not in line]
    flat = " ".join(text.split())  # comments wrap over lines
    for cls, name in ((TrainingConfig, "lr"), (TrainingConfig, "precision"), (DataConfig, "packing"),
                      (RunConfig, "deepspeed"), (RunConfig, "output_dir")):
        assert f"# {cls.model_fields[name].description.split()[0]}" in text
        assert " ".join(cls.model_fields[name].description.split()[:6]) in flat.replace(" # ", " ")
    lora = available()["lora"]
    assert lora.description.split(":")[0] in text
    written = yaml.safe_load(text)["methods"][0]
    assert written.keys() - {"name"} == set(lora.Options.model_fields)  # every option, at its default
    assert build_methods([written])[0].options == lora.Options()


@pytest.mark.parametrize("model,data,flags", [
    ("llama", "messages", []),              # chat rows, a model without a template: ChatML is written
    ("gpt2", "chat.jsonl", ["--method", "full"]),
    ("bert", "cls_train.jsonl", []),
    ("t5", "s2s.jsonl", ["--method", "ia3"]),
])
def test_the_written_recipe_trains(ws, built_ops, tmp_path, model, data, flags):
    path = data_file(tmp_path, [{"messages": TURNS}], "jsonl", 40) if data == "messages" else ws / data
    out = tmp_path / "recipe.yaml"
    ok(init("--model", ws / model, "--data", path, "--out", out, *flags))
    res = ok(run_cli(["train", out, "training.max_steps=2", f"output_dir={tmp_path / 'run'}"]))
    assert (tmp_path / "run" / "trainable.safetensors").is_file(), res.stdout[-2000:]


def test_packing_and_batches_follow_the_datas_size(ws, tmp_path):
    """Many rows share packed blocks; a few rows are each their own example and still fill a batch."""
    sizes = {}
    for n in (3000, 5):
        data, out = data_file(tmp_path, [{"text": "the movie was good " * 20}], "jsonl", n), tmp_path / f"{n}.yaml"
        ok(init("--model", ws / "llama", "--data", data, "--out", out))
        sizes[n] = load_config(out)
    big, small = sizes[3000], sizes[5]
    assert big.data.packing and big.data.eval_fraction == round(200 / 3000, 3) and big.data.max_length == 512
    assert not small.data.packing and small.data.eval_fraction == 0
    assert small.training.micro_batch_size * small.training.gradient_accumulation_steps <= 5


def test_a_gguf_folder_or_file_sets_gguf_file(ws, tiny_gguf, tmp_path):
    data = ws / "lm.jsonl"
    for i, model in enumerate((tiny_gguf, tiny_gguf / "tiny.gguf")):
        out = tmp_path / f"r{i}.yaml"
        res = ok(init("--model", model, "--data", data, "--out", out))
        cfg = load_config(out)
        assert (cfg.model.path, cfg.model.gguf_file) == (str(tiny_gguf), "tiny.gguf")
        assert f"model: {model} (llama, GGUF file tiny.gguf, 512 positions)" in res.stdout.splitlines()
        assert cfg.data.max_length == 512


def test_an_existing_recipe_is_kept_unless_forced(ws, tmp_path):
    out = tmp_path / "recipe.yaml"
    out.write_text("mine\n")
    res = init("--model", ws / "llama", "--data", ws / "lm.jsonl", "--out", out)
    assert res.returncode == 2 and res.stderr.strip() == f"dstune: error: --out: {out} exists; --force replaces it"
    assert out.read_text() == "mine\n" and [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]
    ok(init("--model", ws / "llama", "--data", ws / "lm.jsonl", "--out", out, "--force"))
    assert load_config(out).task == "causal_lm" and [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]


@pytest.mark.parametrize("model,data,flags,pattern", [
    ("llama", "lm.jsonl", ["--method", "lroa"], r"--method: unknown method 'lroa' \(did you mean 'lora'\?\)"),
    ("llama", "lm.jsonl", ["--method", "layerwise_lr"], r"--method: layerwise_lr needs one of"),
    ("llama", "lm.jsonl", ["--task", "classification"], r"--task: classification reads a label column .* has text$"),
    ("llama", "s2s.jsonl", [], r"--data: the data looks like source/target pairs, so seq2seq needs an "
                               r"encoder-decoder model \(T5, BART\); --model is a llama"),
    ("t5", "lm.jsonl", [], r"causal_lm needs a decoder-only model; --model is an encoder-decoder t5"),
    ("llama", "odd.jsonl", [], r"--data: .*odd.jsonl holds no task's columns \(it has colour\)"),
    ("nowhere", "lm.jsonl", [], r"--model: not found: .*nowhere$"),
    ("llama", "missing.jsonl", [], r"--data: file not found: .*missing.jsonl$"),
    (None, "lm.jsonl", [], r"--model: required \(or run dstune init at a terminal to be asked\)$"),
])
def test_errors_are_one_line_and_write_nothing(ws, tmp_path, model, data, flags, pattern):
    write_jsonl(ws / "odd.jsonl", [{"colour": "red"}])
    out = tmp_path / "recipe.yaml"
    args = (["--model", ws / model] if model else []) + ["--data", ws / data, "--out", out, *flags]
    assert_user_error(init(*args, input=""), pattern, out)
    assert list(tmp_path.iterdir()) == []


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_at_a_terminal_it_asks_for_what_the_flags_leave_out(ws, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", Terminal(f"{ws / 'bert'}\n{ws / 'cls_train.jsonl'}\n"))
    res = ok(init("--out", tmp_path / "r.yaml"))
    assert re.match(r"^model folder .*: training data .*: model: ", res.stdout)
    assert load_config(tmp_path / "r.yaml").task == "classification"
