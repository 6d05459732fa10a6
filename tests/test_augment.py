"""data.augment: token edits, embedding neighbours, paraphrase and back-translation copies of the training
rows: deterministic per seed, capped, marked, never in evaluation data, saved in the run dir."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from helpers import ok, run_cli, write_recipe
from dstune.config import load_config
from dstune.prepare.augment import MARK, OP, Neighbours, edit, generator, load_neighbours
from dstune.data.files import ROW
from dstune.prepare.pipeline import prepare_data
from dstune.models.tokenizers import load_tokenizer

TEXT = "The plot was clever and the actor gave a superb moving performance in this film"


def _nb() -> Neighbours:
    """good ~ great ~ superb, bad ~ awful, plot ~ story: 2-d vectors that make them each other's neighbours."""
    vecs = {"good": [1, 0.1], "great": [1, 0.2], "superb": [1, 0.3], "bad": [-1, 0.1], "awful": [-1, 0.2],
            "plot": [0.1, 1], "story": [0.2, 1], "clever": [1, 0.15], "actor": [0.3, 1], "film": [0.25, 1],
            "moving": [0.9, 0.4], "performance": [0.4, 0.9]}
    return Neighbours(list(vecs), np.array(list(vecs.values()), dtype=np.float32), 2, common={"film"})


def test_neighbours_are_nearest_by_cosine_and_skip_common_short_and_unknown_words():
    nb = _nb()
    assert nb.of("good") == ["clever", "great"]
    assert nb.of("Bad") == nb.of("bad") and nb.of("bad")[0] == "awful"  # case does not matter
    assert nb.of("plot") == ["story", "film"]
    assert not nb.replaceable("film")      # a common word of the data
    assert not nb.replaceable("xyzzy")     # not a whole-word token
    assert not nb.replaceable("it")        # too short
    assert nb.replaceable("Clever")


@pytest.mark.parametrize("op", ["delete", "swap", "insert", "neighbour"])
def test_token_edits_are_deterministic_per_seed_and_do_what_they_say(op):
    nb, words = _nb(), TEXT.split()
    outs = [edit(TEXT, op, generator(seed, 3, 1), 0.2, nb) for seed in (1, 1, 2, 3, 4)]
    assert outs[0] == outs[1]                       # same (seed, row, copy): same copy
    assert len(set(outs[1:])) > 1                   # other seeds: other copies
    assert edit(TEXT, op, generator(1, 4, 1), 0.2, nb) != outs[0] or op == "swap"  # other rows draw anew
    for out in outs:
        new = out.split()
        if op == "delete":
            assert 0 < len(new) < len(words) and all(w in words for w in new)
            assert [w for w in words if w in new] == new        # order kept
        elif op == "swap":
            assert Counter(new) == Counter(words) and new != words
        elif op == "insert":
            added = Counter(new) - Counter(words)
            assert len(new) == len(words) + round(0.2 * len(words))
            assert all(w in {x for v in ("clever", "actor", "moving", "performance", "superb", "plot")
                             for x in nb.of(v)} for w in added)
        else:
            assert len(new) == len(words)
            changed = [(a, b) for a, b in zip(words, new) if a != b]
            assert changed and all(nb.replaceable(a) and b.lower() in nb.of(a) for a, b in changed)
            assert all(b[0].isupper() == a[0].isupper() for a, b in changed)   # capitals kept


def test_neighbours_come_from_a_models_whole_word_tokens(ws):
    nb = load_neighbours(str(ws / "bert"), 3, common=set())
    tok = load_tokenizer(str(ws / "bert"))
    assert nb.words and all(w.isalpha() and len(w) >= 3 for w in nb.words)
    assert all(len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1 or
               len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in nb.words)
    w = nb.words[0]
    assert len(nb.of(w)) == 3 and w not in nb.of(w)


def _cfg(ws, tmp_path, augment: str, *extra: str, train: str = "cls_train.jsonl", task: str = "classification",
         model: str = "bert"):
    recipe = write_recipe(tmp_path / "r.yaml", f"""
task: {task}
model: {{path: {ws / model}}}
data: {{train: {ws / train}, eval_fraction: 0.25, max_length: 32}}
output_dir: {tmp_path / 'run'}
""")
    return load_config(recipe, [f"data.augment={augment}", *extra])


def _copies(data) -> list[dict]:
    (_, table), = data.augmented
    return [r for r in table if r[MARK] > 0]


def test_copies_are_capped_marked_deterministic_and_never_of_held_out_rows(ws, tmp_path, monkeypatch):
    monkeypatch.setattr("dstune.prepare.augment.COMMON", 0.5)  # the tiny data's 28 words are each in > 5% of rows
    tok = load_tokenizer(str(ws / "bert"))
    augment = "{ops: [delete, swap, insert, neighbour], copies: 3, rate: 0.2}"
    data = prepare_data(_cfg(ws, tmp_path, augment), tok)
    again = prepare_data(_cfg(ws, tmp_path, augment), tok)
    other = prepare_data(_cfg(ws, tmp_path, augment, "data.augment.seed=7"), tok)
    copies = _copies(data)
    (_, table), = data.augmented
    rows = [r for r in table if r[MARK] == 0]
    assert len(rows) == 192 and len(data.eval) == 64                  # the held-out quarter stays out
    assert 192 < len(copies) <= 3 * 192     # at most 3 per row (unchanged and repeated ones dropped)
    per_row = Counter(c[ROW] for c in copies)
    assert max(per_row.values()) <= 3 and set(per_row) <= {r[ROW] for r in rows}  # copies of training rows only
    assert Counter(c[OP] for c in copies).keys() == {"delete", "swap", "insert", "neighbour"}
    by_row = {r[ROW]: r for r in rows}
    for c in copies:
        assert c["label"] == by_row[c[ROW]]["label"] and c["text"] != by_row[c[ROW]]["text"]
    assert len({(c[ROW], c["text"]) for c in copies}) == len(copies)   # no repeated copy
    assert copies == _copies(again) and copies != _copies(other)       # one seed, one set of copies
    marks = data.train[MARK]
    assert len(data.train) == 192 + len(copies) and sum(m > 0 for m in marks) == len(copies)
    assert MARK not in data.eval.column_names


def test_model_rewrites_paraphrase_through_a_causal_lm_and_back_translate_through_two_seq2seq(ws, tmp_path):
    tok = load_tokenizer(str(ws / "bert"))
    para = prepare_data(_cfg(ws, tmp_path, f"{{ops: [paraphrase], copies: 2, paraphrase_model: {ws / 'llama'}, "
                                           "max_new_tokens: 8, batch_size: 32}"), tok)
    assert para.train is not None
    copies = _copies(para)
    assert copies and {c[OP] for c in copies} == {"paraphrase"} and len(copies) <= 2 * 192
    again = _copies(prepare_data(_cfg(ws, tmp_path, f"{{ops: [paraphrase], copies: 2, paraphrase_model: "
                                                    f"{ws / 'llama'}, max_new_tokens: 8, batch_size: 32}}"), tok))
    assert [c["text"] for c in again] == [c["text"] for c in copies]   # sampled, but seeded
    bt = _copies(prepare_data(_cfg(ws, tmp_path, f"{{ops: [back_translate, delete], copies: 2, back_translate: "
                                                 f"[{ws / 't5'}, {ws / 't5'}], max_new_tokens: 8}}"), tok))
    assert {c[OP] for c in bt} == {"back_translate", "delete"}


@pytest.mark.slow
def test_a_run_saves_its_copies_and_reads_them_from_the_cache_again(ws, tmp_path, built_ops):
    recipe = write_recipe(tmp_path / "r.yaml", f"""
task: classification
model: {{path: {ws / 'bert'}}}
data:
  train: {ws / 'cls_train.jsonl'}
  eval: {ws / 'cls_eval.jsonl'}
  max_length: 32
  cache_dir: {tmp_path / 'cache'}
  augment: {{ops: [swap, neighbour], copies: 2}}
methods: [{{name: lora, r: 4}}]
deepspeed: zero2
training: {{precision: fp32, max_steps: 3, micro_batch_size: 8}}
output_dir: {tmp_path / 'run'}
""")
    res = ok(run_cli(["train", str(recipe)], nproc=2))
    saved = [json.loads(line) for line in (tmp_path / "run" / "augmented.jsonl").read_text().splitlines()]
    assert saved and {s["op"] for s in saved} <= {"swap", "neighbour"} and max(s["copy"] for s in saved) == 2
    assert all(s["source"] == str(ws / "cls_train.jsonl") and s["label"] in ("pos", "neg") for s in saved)
    source = (ws / "cls_train.jsonl").read_text().splitlines()
    assert all(s["text"] != json.loads(source[s["source_row"]])["text"] for s in saved)
    assert f"{len(saved):,} of them augmented copies" in res.stdout
    entry = next(line for line in res.stdout.splitlines() if "training rows" in line).split("(")[-1].split(")")[0]
    res2 = ok(run_cli(["train", str(recipe), f"output_dir={tmp_path / 'run2'}"]))
    assert entry in res2.stdout and "augment data.train" not in res2.stderr   # read from the cache
    assert (tmp_path / "run2" / "augmented.jsonl").read_text() == (tmp_path / "run" / "augmented.jsonl").read_text()


@pytest.mark.parametrize("augment, message", [
    ("{ops: [paraphrase]}", "data.augment: op paraphrase needs paraphrase_model"),
    ("{ops: [back_translate], back_translate: [a]}", "data.augment.back_translate: "),
    ("{ops: [shuffle]}", "data.augment.ops.0: "),
    ("{ops: [paraphrase], paraphrase_model: /nowhere}", "data.augment.paraphrase_model: not found: /nowhere"),
    ("{ops: [swap], columns: [title]}", "data.augment.columns: "),
    ("{ops: [swap], columns: [label_id]}", "data.augment.columns: column 'label_id' of "),
    ("{ops: [neighbour], neighbours: /nowhere}", "data.augment.neighbours: not found: /nowhere"),
    ("{ops: [paraphrase], paraphrase_model: X, paraphrase_prompt: 'no slot'}", "has no {text}"),
])
def test_bad_augment_settings_are_one_line_errors(ws, tmp_path, augment, message):
    rows = [json.loads(line) for line in (ws / "cls_train.jsonl").read_text().splitlines()][:40]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({**r, "label_id": i % 2}) + "\n" for i, r in enumerate(rows)))
    augment = augment.replace("X", str(ws / "llama"))
    res = run_cli(["prepare", str(write_recipe(tmp_path / "r.yaml", f"""
task: classification
model: {{path: {ws / 'bert'}}}
data: {{train: {tmp_path / 'd.jsonl'}, cache_dir: {tmp_path / 'cache'}}}
output_dir: {tmp_path / 'run'}
""")), f"data.augment={augment}"])
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert message in last, last
    assert not any((tmp_path / "cache").glob("*/meta.json"))


def test_chat_rows_need_named_text_columns(ws, tmp_path):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "hello"}]}) + "\n")
    cfg = _cfg(ws, tmp_path, "{ops: [swap]}", f"data.train={tmp_path / 'chat.jsonl'}", "data.eval_fraction=0",
               "tokenizer.chat_template={% for m in messages %}{{ m.content }}{% endfor %}", task="causal_lm",
               model="llama")
    from dstune.errors import UserError
    from dstune.models.tokenizers import recipe_tokenizer
    with pytest.raises(UserError, match="data.augment.columns: messages rows hold turns"):
        prepare_data(cfg, recipe_tokenizer(cfg))


def test_random_token_data_has_nothing_to_augment(ws, tmp_path):
    from dstune.errors import UserError
    cfg = _cfg(ws, tmp_path, "{ops: [swap]}", "data.train=random", "data.eval_fraction=0", task="causal_lm",
               model="gpt2")
    with pytest.raises(UserError, match="data.augment: random token ids have no text to rewrite"):
        prepare_data(cfg, load_tokenizer(str(ws / "gpt2")))
