"""The rest of the bad-input paths, checked in-process: each raises UserError with the message users see."""
from __future__ import annotations

import json

import pytest

from dstune.config import load_config
from dstune.errors import UserError


def recipe(tmp_path, task: str, train, **data):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"task": task, "model": {"tiny": "gpt2"}, "data": {"train": str(train), **data},
                                "output_dir": str(tmp_path / "o")}))
    return load_config(path)


@pytest.fixture
def tok(ws):
    from dstune.models.tokenizers import load_tokenizer
    return load_tokenizer(str(ws / "tokenizer"))


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unsupported_file_type(tmp_path):
    from dstune.data.files import load_table
    (tmp_path / "d.xml").write_text("<x/>")
    with pytest.raises(UserError, match=r"data\.train: unsupported file type '\.xml'"):
        load_table(str(tmp_path / "d.xml"), "data.train")


def test_jsonl_row_that_is_not_an_object(tmp_path):
    from dstune.data.files import load_table
    bad = write_rows(tmp_path / "d.jsonl", [{"text": "a"}, [1, 2]])
    with pytest.raises(UserError, match=r"d\.jsonl:2: data\.train: each row must be a JSON object, got list"):
        load_table(str(bad), "data.train")


def test_single_label_value(tmp_path, tok):
    from dstune.prepare.pipeline import prepare_data
    data = write_rows(tmp_path / "d.jsonl", [{"text": "a b", "label": "x"}] * 4)
    with pytest.raises(UserError, match=r"data\.label_column: .* has only one label value \('x'\)"):
        prepare_data(recipe(tmp_path, "classification", data), tok)


def test_eval_label_unseen_in_training(tmp_path, tok):
    from dstune.prepare.pipeline import prepare_data
    train = write_rows(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    ev = write_rows(tmp_path / "e.jsonl", [{"text": "a", "label": "z"}])
    with pytest.raises(UserError, match=r"data\.eval: labels \['z'\] do not occur in the training labels"):
        prepare_data(recipe(tmp_path, "classification", train, eval=str(ev)), tok)


def test_causal_lm_without_text_or_prompt_columns(tmp_path, tok):
    from dstune.prepare.pipeline import prepare_data
    data = write_rows(tmp_path / "d.jsonl", [{"body": "a b"}])
    with pytest.raises(UserError, match=r"^data\.format: .*d.jsonl is none of text \('text'\), prompt_response "
                                        r"\('prompt'\+'response'\), messages, .* \(columns: body\)"):
        prepare_data(recipe(tmp_path, "causal_lm", data), tok)
    cfg = recipe(tmp_path, "causal_lm", data)
    cfg.data.format = "messages"  # a named format names the column it lacks
    with pytest.raises(UserError, match=r"^data\.messages_column: column 'messages' not in .*d.jsonl"):
        prepare_data(cfg, tok)


def test_seq2seq_without_target_column(tmp_path, tok):
    from dstune.prepare.pipeline import prepare_data
    data = write_rows(tmp_path / "d.jsonl", [{"source": "a b"}])
    with pytest.raises(UserError, match=r"data\.target_column: column 'target' not in"):
        prepare_data(recipe(tmp_path, "seq2seq", data), tok)


def test_tokenizer_train_missing_file_and_tiny_vocab(tmp_path):
    from dstune.models.tokenizers import train_sentencepiece
    with pytest.raises(UserError, match=r"tokenizer train: file not found: .*nope\.txt"):
        train_sentencepiece([str(tmp_path / "nope.txt")], str(tmp_path / "out"))
    (tmp_path / "c.txt").write_text("a b c\n")
    with pytest.raises(UserError, match=r"--vocab-size: must be at least 8"):
        train_sentencepiece([str(tmp_path / "c.txt")], str(tmp_path / "out"), vocab_size=4)


def test_model_path_and_gguf_file_must_exist(tmp_path, tok):
    from dstune.models.loading import load_model
    cfg = recipe(tmp_path, "causal_lm", tmp_path / "d.jsonl")
    cfg.model.tiny, cfg.model.path = None, str(tmp_path / "nomodel")
    with pytest.raises(UserError, match=r"model\.path: not a folder: .*nomodel"):
        load_model(cfg, tok)
    (tmp_path / "m").mkdir()
    cfg.model.path, cfg.model.gguf_file = str(tmp_path / "m"), "x.gguf"
    with pytest.raises(UserError, match=r"model\.gguf_file: no x\.gguf in .*m; it holds no \.gguf file"):
        load_model(cfg, tok)


def test_gguf_without_the_gguf_package_is_one_line_naming_it(tmp_path, tok, monkeypatch):
    import transformers
    from dstune.models.loading import recipe_config

    def refuse(*args, **kwargs):  # what transformers raises when `gguf` is not installed
        raise ImportError("Please install torch and gguf>=0.10.0 to load a GGUF checkpoint in PyTorch.")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    cfg = recipe(tmp_path, "causal_lm", tmp_path / "d.jsonl")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.gguf").write_bytes(b"GGUF")
    cfg.model.tiny, cfg.model.path, cfg.model.gguf_file = None, str(tmp_path / "m"), "x.gguf"
    with pytest.raises(UserError, match=r"^model\.gguf_file: reading x\.gguf needs the gguf package "
                                        r"\(pip install 'gguf>=0\.10'\): Please install"):
        recipe_config(cfg, tok)


def test_export_out_must_be_empty(tmp_path):
    from dstune.rundir.export import _prepare_out
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("x")
    with pytest.raises(UserError, match=r"--out: .*out exists and is not empty"):
        _prepare_out(str(tmp_path / "out"))


def test_bench_needs_more_steps_than_warmup(tmp_path):
    from dstune.planning.bench import bench
    with pytest.raises(UserError, match=r"--steps: must be more than the 2 warm-up steps"):
        bench(str(tmp_path / "r.yaml"), [], ["full"], str(tmp_path / "b"), 2)


def test_run_dir_that_is_not_a_run(tmp_path):
    from dstune.rundir.load import load_run
    with pytest.raises(UserError, match=r"not a finished dstune run \(missing config\.yaml\)"):
        load_run(str(tmp_path))


@pytest.mark.parametrize("rows, task, message", [
    ([{"text": "a", "label": "x"}, {"text": "b"}, {"text": "c", "label": "y"}], "classification",
     r"d\.jsonl:2: data\.label_column: 'label' is missing or null in this row"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": None, "label": "x"}], "classification",
     r"d\.jsonl:3: data\.text_column: 'text' is missing or null in this row"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}], "causal_lm",
     r"d\.jsonl:2: data\.response_column: 'response' is missing or null in this row"),
    ([{"source": "a", "target": "b"}, {"source": None, "target": "c"}], "seq2seq",
     r"d\.jsonl:2: data\.source_column: 'source' is missing or null in this row"),
])
def test_a_row_without_a_value_names_its_line(tmp_path, tok, rows, task, message):
    """Not a class "None", nor the text "None": the row is named."""
    from dstune.prepare.pipeline import prepare_data
    data = write_rows(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=message):
        prepare_data(recipe(tmp_path, task, data), tok)


def test_drop_invalid_rows_leaves_out_and_counts_rows_without_a_value(tmp_path, tok):
    """Rows 2 and 4 miss their label; the rest train, later errors still name their own lines, and the
    start-up line says what was left out."""
    from dstune.prepare.cache import prepared_data, summary

    rows = [{"text": "a b", "label": "x"}, {"text": "b"}, {"text": "c", "label": "y"}, {"text": "d", "label": None},
            {"text": "e", "label": "x"}]
    data = write_rows(tmp_path / "d.jsonl", rows)
    cfg = recipe(tmp_path, "classification", data, drop_invalid_rows=True, cache_dir=str(tmp_path / "cache"))
    prepared, entry = prepared_data(cfg, tok)
    assert len(prepared.train) == 3 and prepared.labels == ["x", "y"]
    assert sorted(r["input_ids"] for r in prepared.train) == sorted(tok(t)["input_ids"] for t in ("a b", "c", "e"))
    assert summary(prepared, entry).endswith("; left out for a missing value (data.drop_invalid_rows): 2 rows of d.jsonl")

    from dstune.prepare.pipeline import prepare_data
    empty = write_rows(tmp_path / "n.jsonl", [{"text": None}, {"text": None}])
    with pytest.raises(UserError, match=r"n\.jsonl: every row misses a value of text"):
        prepare_data(recipe(tmp_path, "causal_lm", empty, drop_invalid_rows=True), tok)


@pytest.mark.parametrize("text, overrides, message", [
    ("training: {lr: .inf}", [], r"r\.yaml:\d+: training\.lr: Input should be a finite number \(got inf\)"),
    ("training: {}", ["training.weight_decay=.nan"], r"training\.weight_decay: Input should be a finite number"),
    ("training: {}", ["training.epochs=.inf"], r"training\.epochs: Input should be a finite number"),
    ("training: {}", ["training.seed=100000000000000000000"], r"training\.seed: Input should be less than"),
    ("training: {betas: [0.9, 1.5]}", [], r"r\.yaml:\d+: training\.betas\.1: Input should be less than 1"),
    ("training:\n  lr: 0.1\n  lr: 0.2", [], r"r\.yaml:\d+: invalid YAML: key 'lr' given twice \(first on line \d+\)"),
])
def test_values_a_run_cannot_use_name_their_key(tmp_path, text, overrides, message):
    path = tmp_path / "r.yaml"
    path.write_text(f"task: causal_lm\nmodel: {{tiny: gpt2}}\ndata: {{train: random}}\noutput_dir: o\n{text}\n")
    with pytest.raises(UserError, match=message):
        load_config(path, overrides)


def test_recipe_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"task: causal_lm\n# caf\xe9\nmodel: {tiny: gpt2}\n")
    with pytest.raises(UserError, match=r"r\.yaml:2: not UTF-8 text \(byte 21\)"):
        load_config(path)


@pytest.mark.parametrize("name, content, message", [
    ("d.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"d\.jsonl:2: data\.train: not UTF-8 text \(byte 13 of the line\)"),
    ("d.csv", b"text,label\na,x\ncaf\xe9,y\n", r"d\.csv:3: data\.train: not UTF-8 text"),
    ("d.csv", b"text,label\na,x\nb,y,extra\n", r"d\.csv:3: data\.train: 3 fields where the header has 2"),
])
def test_unreadable_rows_name_their_line(tmp_path, name, content, message):
    from dstune.data.files import load_table
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_table(str(tmp_path / name), "data.train")


@pytest.mark.parametrize("damage", ["no_weights", "truncated"])
def test_a_model_folder_without_loadable_weights_names_it(ws, tmp_path, tok, damage):
    import shutil

    from dstune.models.loading import load_model
    folder = tmp_path / "gpt2"
    shutil.copytree(ws / "gpt2", folder)
    weights = folder / "model.safetensors"
    if damage == "no_weights":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"task": "causal_lm", "model": {"path": str(folder)}, "data": {"train": "random"},
                                "output_dir": str(tmp_path / "o")}))
    with pytest.raises(UserError, match=rf"^model\.path: cannot load the weights in {folder}: "):
        load_model(load_config(path), tok)


def test_config_overrides_that_make_an_impossible_model_are_named(tmp_path, ws, caplog):
    from dstune.models.loading import check_buildable, load_model, recipe_config

    cfg = load_config(_yaml(tmp_path, {
        "task": "causal_lm", "model": {"tiny": "gpt2", "config_overrides": {"n_embd": 30, "n_head": 4}},
        "data": {"train": "random"}, "output_dir": "o"}))
    with pytest.raises(UserError, match=r"^model\.config_overrides: the model cannot be built with "
                                        r"\{'n_embd': 30, 'n_head': 4\}: .*divisible"):
        check_buildable(cfg, recipe_config(cfg))
    # buildable, but not with the folder's weights
    cfg = load_config(_yaml(tmp_path, {"task": "classification", "model": {"path": str(ws / "bert"),
                                       "config_overrides": {"hidden_size": 30, "num_attention_heads": 2}},
                                       "data": {"train": str(ws / "cls_train.jsonl")}, "output_dir": "o"}))
    check_buildable(cfg, recipe_config(cfg, labels=["neg", "pos"]))
    with pytest.raises(UserError, match=r"^model\.config_overrides: \{'hidden_size': 30, 'num_attention_heads': 2\} "
                                        r"change the shapes of the weights in .*bert"):
        load_model(cfg, None, ["neg", "pos"])
    assert "LOAD REPORT" in caplog.text   # the report the message points to is shown


def test_weights_the_checkpoint_lacks_are_named_in_one_line_not_a_report(ws, tmp_path, caplog):
    """A base model without a task head: transformers' table is held back; dstune names the new weights."""
    import transformers as T

    from dstune.models.loading import load_model, new_weights_line
    T.BertModel.from_pretrained(ws / "bert").save_pretrained(tmp_path / "base")
    caplog.clear()   # transformers' own report on that load (the classifier it drops)
    def loaded(folder):
        return load_model(load_config(_yaml(tmp_path, {"task": "classification", "model": {"path": str(folder)},
                                                       "data": {"train": str(ws / "cls_train.jsonl")},
                                                       "output_dir": "o"})), None, ["neg", "pos"])
    line = new_weights_line(loaded(tmp_path / "base"))
    assert line == "not in model.path, initialised at random: classifier.bias, classifier.weight"
    assert "LOAD REPORT" not in caplog.text
    assert new_weights_line(loaded(ws / "bert")) is None   # a checkpoint with its head: nothing to say


def _yaml(tmp_path, recipe: dict):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    return path


@pytest.mark.parametrize("where", ["folder", "file"])
def test_a_corrupt_sentencepiece_model_is_named(tmp_path, where):
    from dstune.models.tokenizers import load_tokenizer

    (tmp_path / "tok").mkdir()
    model = tmp_path / "tok" / "tokenizer.model"
    model.write_bytes(b"\x0a\x03not a model proto")
    with pytest.raises(UserError, match=rf"^tokenizer\.path: {model} is not a readable SentencePiece model \("):
        load_tokenizer(str(model.parent if where == "folder" else model))


@pytest.mark.parametrize("declared, rows, found", [
    ("sharegpt", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
     r"messages \(turns of role and content, OpenAI's layout\)"),
    ("messages", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
     r"sharegpt \(turns of from and value\)"),
    ("prompt_response", [{"instruction": "add", "input": "1 2", "output": "3"}], "alpaca"),
])
def test_a_declared_format_the_rows_do_not_have_is_named_with_the_one_they_have(tmp_path, tok, declared, rows,
                                                                                  found):
    from dstune.prepare.pipeline import prepare_data
    data = write_rows(tmp_path / "chat.jsonl", rows * 3)
    with pytest.raises(UserError, match=rf"^data\.format: .*chat\.jsonl is read as {declared}, but its rows look like "
                                        rf"{found}; set data\.format: \w+ \(or auto\)$"):
        prepare_data(recipe(tmp_path, "causal_lm", data, format=declared), tok)


def test_a_model_path_naming_a_gguf_file_says_what_to_set(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"task": "causal_lm", "model": {"path": "/models/smol/m.Q4.gguf"},
                                "data": {"train": "d.jsonl"}, "output_dir": "o"}))
    with pytest.raises(UserError, match=r"model\.path is a GGUF file; set model\.path to its folder \(/models/smol\) "
                                        r"and model\.gguf_file to its name \(m\.Q4\.gguf\)"):
        load_config(path)


def test_a_missing_gguf_file_names_the_ones_the_folder_holds(tmp_path):
    from dstune.models.tokenizers import recipe_tokenizer
    (tmp_path / "smol").mkdir()
    (tmp_path / "smol" / "m.Q8.gguf").write_bytes(b"GGUF")
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"task": "causal_lm", "model": {"path": str(tmp_path / "smol"), "gguf_file": "m.gguf"},
                                "data": {"train": "d.jsonl"}, "output_dir": "o"}))
    with pytest.raises(UserError, match=rf"^model\.gguf_file: no m\.gguf in {tmp_path / 'smol'}; it holds m\.Q8\.gguf$"):
        recipe_tokenizer(load_config(path))


@pytest.mark.parametrize("spec, message", [
    ({"name": "lora", "rank": 8}, r"methods\[0\] \(lora\)\.rank: unknown option; lora's options: r, alpha, dropout, "),
    ({"name": "lora", "alpah": 8}, r"methods\[0\] \(lora\)\.alpah: unknown option \(did you mean 'alpha'\?\)$"),
    ({"name": "LoRA"}, r"methods\[0\]\.name: unknown method 'LoRA' \(did you mean 'lora'\?\)"),
])
def test_method_mistakes_name_what_is_valid(spec, message):
    from dstune.methods import build_methods
    with pytest.raises(UserError, match=message):
        build_methods([spec])


def test_max_length_past_a_rotary_models_positions_is_refused(tmp_path):
    from transformers import LlamaConfig

    from dstune.models.loading import check_positions
    cfg = recipe(tmp_path, "causal_lm", tmp_path / "d.jsonl", max_length=100_000)
    with pytest.raises(UserError, match=r"data\.max_length: 100,000 tokens do not fit the model's 8,192 positions "
                                        r"\(llama\); use at most 8,192 \(or extend its context"):
        check_positions(cfg, LlamaConfig(max_position_embeddings=8192))


def test_sampling_flags_without_sample_are_refused(tmp_path):
    from helpers import run_cli
    for flags in (["--temperature", "0.5"], ["--top-p", "0.5"]):
        res = run_cli(["generate", str(tmp_path), "--prompt", "hi", *flags])
        assert res.returncode == 2
        assert res.stderr.strip() == (f"dstune: error: {flags[0]}: greedy decoding has no {flags[0]}; add --sample to "
                                      "sample with it")
