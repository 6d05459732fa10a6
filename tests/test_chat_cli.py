"""`dstune chat` and `dstune generate --system`: the conversation the model reads is the run's chat template
over the whole history (each reply kept as an assistant turn), /reset and /system change it, a history
longer than the model's positions loses its oldest exchanges, and runs that cannot chat are refused in one
line before any weights load."""
from __future__ import annotations

import io
import json
import re
import sys

import pytest

from helpers import assert_user_error, ok, run_cli
from dstune.models.tokenizers import load_tokenizer
from dstune.tasks.base import Generative

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
POSITIONS = 200  # the chat run's model: few positions, so a short conversation outgrows them
RUNS = {  # name: (task, model, data, tokenizer settings)
    "chat": ("causal_lm", {"tiny": "llama", "config_overrides": {"max_position_embeddings": POSITIONS}},
             "chat.jsonl", {"chat_template": CHATML}),
    "plain": ("causal_lm", {"tiny": "llama"}, "lm.jsonl", {}),
    "s2s": ("seq2seq", {"tiny": "t5"}, "s2s.jsonl", {}),
}


@pytest.fixture(scope="module")
def runs(ws, built_ops, tmp_path_factory):
    """Each run of RUNS trained for 2 steps, once for the module (the tests only read them)."""
    root = tmp_path_factory.mktemp("chat-runs")
    for name, (task, model, data, tokenizer) in RUNS.items():
        recipe = root / f"{name}.yaml"
        recipe.write_text(json.dumps({
            "task": task, "model": model, "tokenizer": {"path": str(ws / "tokenizer"), **tokenizer},
            "data": {"train": str(ws / data), "max_length": 32}, "methods": [{"name": "lora", "r": 4}],
            "training": {"precision": "fp32", "max_steps": 2, "lr": 1e-2, "micro_batch_size": 8},
            "output_dir": str(root / name)}))
        ok(run_cli(["train", str(recipe)]))
    return {name: root / name for name in RUNS}


@pytest.fixture
def prompts(monkeypatch):
    """Every prompt the model is asked to continue, with the tokens it replied (the shared helper wrapped)."""
    seen: list[tuple[list[int], list[int]]] = []
    real = Generative.reply

    def reply(self, model, tokenizer, ids, decoding, streamer=None):
        out = real(self, model, tokenizer, ids, decoding, streamer)
        seen.append((list(ids), out.tolist()))
        return out
    monkeypatch.setattr(Generative, "reply", reply)
    return seen


def rendered(tok, turns: list[dict]) -> list[int]:
    """What the chat template makes of `turns` before the assistant's reply, as ids."""
    text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def said(tok, reply_ids: list[int]) -> str:
    return tok.decode(reply_ids, skip_special_tokens=True).strip()


def user(text):
    return {"role": "user", "content": text}


def test_each_turn_reads_the_whole_history_and_reset_clears_it(runs, prompts):
    res = ok(run_cli(["chat", runs["chat"], "--max-new-tokens", "4"], input="say good\nsay bad\n/reset\nsay fine\n"))
    tok = load_tokenizer(str(runs["chat"] / "tokenizer"))
    assert len(prompts) == 3
    (p1, r1), (p2, r2), (p3, r3) = prompts
    first = said(tok, r1)
    assert p1 == rendered(tok, [user("say good")])
    # turn 2 is turn 1 (the reply as the template renders an assistant turn) and the new message
    assert p2 == rendered(tok, [user("say good"), {"role": "assistant", "content": first}, user("say bad")])
    assert p2[:len(p1)] == p1 and len(p2) > len(p1) + len(r1)
    assert p3 == rendered(tok, [user("say fine")])  # /reset: nothing of before
    # each reply printed as it came (stdin is no terminal: no prompts), the note after /reset
    assert res.stdout.splitlines() == [first, said(tok, r2), "[dstune] history cleared", said(tok, r3)]
    assert "you> " not in res.stdout


def test_a_system_message_comes_first_stays_on_reset_and_slash_system_replaces_it(runs, prompts):
    res = ok(run_cli(["chat", runs["chat"], "--system", "be brief", "--max-new-tokens", "2"],
                     input="say good\n/reset\nsay bad\n/system be kind\nsay fine\n/system\nsay fun\n/quit\nsay no\n"))
    tok = load_tokenizer(str(runs["chat"] / "tokenizer"))
    system = {"role": "system", "content": "be brief"}
    assert [ids for ids, _ in prompts] == [
        rendered(tok, [system, user("say good")]), rendered(tok, [system, user("say bad")]),
        rendered(tok, [{"role": "system", "content": "be kind"}, user("say fine")]), rendered(tok, [user("say fun")])]
    assert "be brief" in tok.decode(prompts[0][0])
    notes = [line for line in res.stdout.splitlines() if line.startswith("[dstune]")]
    assert notes == ["[dstune] history cleared (the system message stays)",
                     "[dstune] system message set; history cleared", "[dstune] no system message; history cleared"]


def test_a_history_past_the_models_positions_drops_the_oldest_exchanges_and_keeps_the_system(runs, prompts):
    tok = load_tokenizer(str(runs["chat"] / "tokenizer"))
    long = ["say " + " ".join([word] * 6) for word in ("good", "bad", "fine", "dull", "fun")]
    new = 16
    res = ok(run_cli(["chat", runs["chat"], "--system", "be brief", "--max-new-tokens", str(new)],
                     input="".join(f"{m}\n" for m in long)))
    assert len(prompts) == 5
    assert all(len(ids) + new <= POSITIONS for ids, _ in prompts)
    notes = [line for line in res.stdout.splitlines() if line.startswith("[dstune]")]
    assert notes and all(n.startswith("[dstune] the conversation outgrew the model's positions: dropped the oldest")
                         and n.endswith("(the system message stays)") for n in notes), notes
    last = tok.decode(prompts[-1][0])
    assert last.count("be brief") == 1 and long[-1] in last and long[0] not in last
    # the last prompt is the newest exchanges that fit, whole, after the system message
    for first in range(5):
        turns = [t for i, (ids, out) in enumerate(prompts[first:-1], first)
                 for t in (user(long[i]), {"role": "assistant", "content": said(tok, out)})]
        if prompts[-1][0] == rendered(tok, [{"role": "system", "content": "be brief"}, *turns, user(long[-1])]):
            break
    else:
        raise AssertionError("the last prompt is no tail of the conversation")
    assert 0 < first < 4  # some exchanges dropped, the newest kept


def test_a_message_too_long_or_an_interrupted_reply_is_not_kept(runs, prompts, monkeypatch):
    tok = load_tokenizer(str(runs["chat"] / "tokenizer"))
    real = Generative.reply

    def interrupted_once(self, *args, **kw):
        if not prompts:  # the first reply: Ctrl-C while it is generated
            prompts.append(([], []))
            raise KeyboardInterrupt
        return real(self, *args, **kw)
    monkeypatch.setattr(Generative, "reply", interrupted_once)
    res = ok(run_cli(["chat", runs["chat"], "--max-new-tokens", "4"],
                     input="say bad\n" + "say good " * 100 + "\nsay fine\n"))
    notes = [line for line in res.stdout.splitlines() if line.startswith("[dstune]")]
    assert notes[0] == "[dstune] reply interrupted; that message is not kept"
    assert re.fullmatch(rf"\[dstune\] that message needs [\d,]+ tokens with the system message; the model takes "
                        rf"{POSITIONS - 4} besides the reply's --max-new-tokens: say less \(it is not kept\)", notes[1])
    # neither is in the history: the next message is the conversation's first
    assert len(prompts) == 2 and prompts[1][0] == rendered(tok, [user("say fine")])
    assert res.stdout.splitlines()[-1] == said(tok, prompts[1][1])


def test_generate_renders_the_system_message_and_is_unchanged_without_one(runs, prompts):
    tok = load_tokenizer(str(runs["chat"] / "tokenizer"))
    plain = ok(run_cli(["generate", runs["chat"], "--prompt", "say good", "--max-new-tokens", "3", "--jsonl"]))
    ok(run_cli(["generate", runs["chat"], "--prompt", "say good", "--max-new-tokens", "3", "--system", "be brief"]))
    (without, reply), (with_system, _) = prompts
    assert without == rendered(tok, [user("say good")])
    assert json.loads(plain.stdout) == {"prompt": "say good", "reply": said(tok, reply)}
    assert with_system == rendered(tok, [{"role": "system", "content": "be brief"}, user("say good")])
    assert "be brief" in tok.decode(with_system) and "be brief" not in tok.decode(without)


@pytest.mark.parametrize("run,args,pattern", [
    ("plain", ["chat"], r"^dstune: error: .*plain: the run's tokenizer has no chat template"),
    ("s2s", ["chat"], r"^dstune: error: .*s2s: this is a seq2seq run; a conversation needs a causal_lm run"),
    ("plain", ["generate", "--prompt", "hi", "--system", "be brief"],
     r"^dstune: error: --system: the run's tokenizer has no chat template"),
    ("s2s", ["generate", "--prompt", "hi", "--system", "be brief"], r"^dstune: error: --system: this is a seq2seq run"),
    ("chat", ["chat", "--max-new-tokens", str(POSITIONS)],
     rf"^dstune: error: --max-new-tokens: {POSITIONS} leaves no room for a prompt in the model's {POSITIONS} "
     "positions"),
    ("chat", ["chat", "--sample", "--temperature", "0"], r"^dstune: error: --temperature: must be above 0"),
])
def test_runs_that_cannot_chat_are_refused_in_one_line_before_weights_load(runs, tmp_path, monkeypatch, prompts, run,
                                                                           args, pattern):
    import dstune.rundir.load
    if args[0] == "generate" or "--max-new-tokens" not in args:
        monkeypatch.setattr(dstune.rundir.load, "load_model", lambda *a: pytest.fail("weights loaded"))
    command, *flags = args
    res = run_cli([command, runs[run], *flags], input="hi\n")
    assert_user_error(res, pattern, tmp_path / "nothing")
    assert not prompts and res.stdout == ""


class Terminal(io.StringIO):
    """Typed lines, as a terminal gives them."""

    def isatty(self) -> bool:
        return True


class CtrlC(Terminal):
    def readline(self, *args):
        raise KeyboardInterrupt


def test_at_a_terminal_it_prompts_and_ctrl_c_or_ctrl_d_end_it_cleanly(runs, prompts, monkeypatch):
    monkeypatch.setattr(sys, "stdin", Terminal("say good\n/help\n/nope\n"))
    res = ok(run_cli(["chat", runs["chat"], "--max-new-tokens", "2"]))
    lines = res.stdout.splitlines()
    assert lines[0].startswith("[dstune] chatting with ") and lines[1].startswith("you> ")
    assert "/system TEXT" in res.stdout and "[dstune] unknown command /nope; /help lists them" in res.stdout
    assert res.stdout.count("you> ") == 4 and res.stdout.endswith("you> \n")  # Ctrl-D: a new line, exit 0
    assert len(prompts) == 1
    monkeypatch.setattr(sys, "stdin", CtrlC())
    res = ok(run_cli(["chat", runs["chat"]]))
    assert res.stdout.endswith("you> \n") and "Traceback" not in res.stderr + res.stdout and not res.stderr.strip()
