"""Several datasets in one run: each source with its own format and columns, mixed by weight or epochs as a
pure function of the seed."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from helpers import ok, run_cli, write_recipe
from dstune.config import load_config
from dstune.prepare.pipeline import prepare_data
from dstune.errors import UserError
from dstune.models.tokenizers import load_tokenizer


def _recipe(tmp_path: Path, ws: Path, sources: str, task: str = "causal_lm", extra: str = "") -> Path:
    return write_recipe(tmp_path / "r.yaml", f"""
task: {task}
model: {{tiny: {'bert' if task == 'classification' else 'llama'}}}
tokenizer: {{path: {ws / 'tokenizer'}}}
data:
  train:
{sources}
  max_length: 32
  cache_dir: {tmp_path / 'cache'}
{extra}training: {{precision: fp32, max_steps: 2, micro_batch_size: 4}}
output_dir: {tmp_path / 'run'}
""")


def _source_of(data, tok, texts: dict[str, set]) -> Counter:
    """How many training rows came from each source (found by their decoded text)."""
    found = Counter()
    for row in data.train:
        text = tok.decode(row["input_ids"], skip_special_tokens=True).strip()
        found[next(name for name, seen in texts.items() if text in seen)] += 1
    return found


def _texts(tok, path: Path, *columns: str) -> set[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {tok.decode(tok(" ".join(r[c] for c in columns))["input_ids"], skip_special_tokens=True).strip()
            for r in rows}


def test_weights_and_epochs_set_each_sources_share_and_the_seed_alone_sets_the_mixture(ws, tmp_path):
    tok = load_tokenizer(str(ws / "tokenizer"))
    lm, other = ws / "lm.jsonl", tmp_path / "renamed.jsonl"
    other.write_text("".join(json.dumps({"body": json.loads(line)["text"] + " again"}) + "\n"
                             for line in lm.read_text().splitlines()[:40]))
    texts = {"lm": _texts(tok, lm, "text"), "other": _texts(tok, other, "body")}
    weighted = f"    - {{path: {lm}, weight: 1}}\n    - {{path: {other}, weight: 3, text_column: body}}"
    data = prepare_data(load_config(_recipe(tmp_path, ws, weighted)), tok)
    n_lm, n_other = 96, 40
    assert len(data.train) == n_lm + n_other  # weights share the sources' rows out anew
    assert _source_of(data, tok, texts) == {"lm": round((n_lm + n_other) / 4), "other": round(3 * (n_lm + n_other) / 4)}
    assert [s["examples"] for s in data.sources] == [34, 102] and [s["rows"] for s in data.sources] == [96, 40]
    again = prepare_data(load_config(_recipe(tmp_path, ws, weighted)), tok)
    assert again.train[:] == data.train[:]  # a pure function of the data and the seed
    reseeded = prepare_data(load_config(_recipe(tmp_path, ws, weighted), ["training.seed=7"]), tok)
    assert reseeded.train[:] != data.train[:]

    by_epochs = f"    - {{path: {lm}, epochs: 0.5}}\n    - {{path: {other}, epochs: 2, text_column: body}}"
    data = prepare_data(load_config(_recipe(tmp_path, ws, by_epochs)), tok)
    assert _source_of(data, tok, texts) == {"lm": 48, "other": 80}
    twice = Counter(tuple(r["input_ids"]) for r in data.train
                    if tok.decode(r["input_ids"], skip_special_tokens=True).strip() in texts["other"])
    assert set(twice.values()) == {2}  # two epochs: every row of the source exactly twice


def test_sources_of_different_formats_mix_and_pack_together(ws, tmp_path):
    tok = load_tokenizer(str(ws / "tokenizer"))
    sources = f"    - {{path: {ws / 'lm.jsonl'}}}\n    - {{path: {ws / 'chat.jsonl'}, epochs: 2}}"
    cfg = load_config(_recipe(tmp_path, ws, sources, extra="  packing: true\n  eval_fraction: 0.25\n"))
    data = prepare_data(cfg, tok)
    assert data.style == "mixture" and [s["format"] for s in data.sources] == ["text", "prompt_response"]
    assert all(len(r["input_ids"]) <= 32 and "position_ids" in r for r in data.train)
    assert len(data.eval) and data.sources[1]["examples"] == 2 * data.sources[1]["rows"]


def test_classification_sources_with_their_own_columns_share_one_label_set(ws, tmp_path):
    tok = load_tokenizer(str(ws / "tokenizer"))
    rows = [json.loads(line) for line in (ws / "cls_train.jsonl").read_text().splitlines()]
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"review": r["text"], "verdict": r["label"]}) + "\n" for r in rows[:20]))
    sources = (f"    - {{path: {ws / 'cls_train.jsonl'}}}\n"
               f"    - {{path: {renamed}, text_column: review, label_column: verdict}}")
    data = prepare_data(load_config(_recipe(tmp_path, ws, sources, task="classification")), tok)
    assert data.labels == sorted({str(r["label"]) for r in rows}) and len(data.train) == len(rows) + 20


@pytest.mark.parametrize("sources,message", [
    ("    - {path: a.jsonl, weight: 1, epochs: 2}", r"r.yaml:\d+: data.train.0: give a source a weight "
                                                   r"or epochs, not both"),
    ("    - {path: a.jsonl, weight: 1}\n    - {path: b.jsonl}", r"r.yaml:\d+: data.train: give every "
                                                                r"source a weight, or none"),
    ("    - {path: a.jsonl, colour: red}", r"r.yaml:\d+: data.train.0.colour: unknown key"),
    ("    - {path: a.jsonl, wieght: 2}", r"r.yaml:\d+: data.train.0.wieght: unknown key \(did you mean 'weight'\?\)"),
])
def test_bad_sources_are_one_line_errors(ws, tmp_path, sources, message):
    with pytest.raises(UserError, match=message):
        load_config(_recipe(tmp_path, ws, sources))


def test_a_missing_source_file_names_its_key(ws, tmp_path):
    sources = f"    - {{path: {ws / 'lm.jsonl'}}}\n    - {{path: {tmp_path / 'nope.jsonl'}}}"
    res = run_cli(["train", str(_recipe(tmp_path, ws, sources))])
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == \
        f"dstune: error: data.train[1]: file not found: {tmp_path / 'nope.jsonl'}"
    assert not (tmp_path / "run").exists()


def test_training_on_a_mixture_prints_each_source(ws, tmp_path):
    sources = f"    - {{path: {ws / 'lm.jsonl'}, weight: 2}}\n    - {{path: {ws / 'chat.jsonl'}, weight: 1}}"
    res = ok(run_cli(["train", str(_recipe(tmp_path, ws, sources, extra="  packing: true\n"))]))
    assert "  lm.jsonl (text): 96 rows, " in res.stdout and "  chat.jsonl (prompt_response): " in res.stdout
