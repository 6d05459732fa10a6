"""Conversations: the chat formats users bring, checked, rendered with the chat template, and tokenized so
that only the assistant's turns are targets.

Every format becomes one list of {role, content} turns (roles system, user, assistant):
- `messages`  (OpenAI / ChatML): [{"role": "user", "content": "..."}, ...]
- `sharegpt`: {"conversations": [{"from": "human" | "gpt" | "system", "value": "..."}, ...]}
- `alpaca`:   instruction, optional input, output (and an optional system column)
- `prompt_response`: one user turn and one assistant turn

A conversation is rendered once with the tokenizer's chat template. The assistant turns are found by
rendering the conversation up to each of them (with the generation prompt) and up to its end: the text in
between is what the model says, including the template's end-of-turn marker, so it learns to stop. The
tokens that hold it are targets; system and user turns, and the template's markup around them, are context.
"""
from __future__ import annotations

from typing import Any

from dstune.errors import UserError, first_line

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_response")
DEFAULT_COLUMN = {"messages": "messages", "sharegpt": "conversations"}


def turns_column(fmt: str, configured: str | None, columns: list[str]) -> str:
    """The column holding a messages/sharegpt row's turns: data.messages_column, else the format's usual
    name, else the other usual name (ShareGPT files often call it `messages` too, and the reverse)."""
    if configured:
        return configured
    usual = [DEFAULT_COLUMN[fmt], *(c for c in DEFAULT_COLUMN.values() if c != DEFAULT_COLUMN[fmt])]
    return next((c for c in usual if c in columns), DEFAULT_COLUMN[fmt])
ALPACA = ("instruction", "input", "output", "system")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
_ROLES = ("system", "user", "assistant")


class BadRow(ValueError):
    """A row that is not a valid conversation; the caller adds where it is."""


def _turns(raw: Any, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise BadRow("empty conversation")
    turns = []
    for i, t in enumerate(raw, 1):
        if not isinstance(t, dict):
            raise BadRow(f"turn {i} is not an object")
        role, content = t.get(role_key), t.get(content_key)
        if role not in roles:
            raise BadRow(f"turn {i} has role {role!r} (expected {', '.join(sorted(roles))})")
        if not isinstance(content, str):
            raise BadRow(f"turn {i} has no text {content_key!r}")
        turns.append({"role": roles[role], "content": content})
    return turns


def read_turns(raw: Any) -> list[dict[str, str]]:
    """Turns in either layout, told apart by their keys: OpenAI's role/content or ShareGPT's from/value (one
    turn object is a list of one). Raises BadRow."""
    raw = [raw] if isinstance(raw, dict) else raw
    if isinstance(raw, list) and raw and isinstance(raw[0], dict) and "from" in raw[0]:
        return _turns(raw, "from", "value", _SHAREGPT_ROLES)
    return _turns(raw, "role", "content", {r: r for r in _ROLES})


def conversation(row: dict, fmt: str, column: str | None, prompt_column: str = "prompt",
                 response_column: str = "response") -> list[dict[str, str]]:
    """One row of `fmt` as checked turns. Raises BadRow."""
    if fmt == "messages":
        turns = _turns(row[turns_column(fmt, column, list(row))], "role", "content", {r: r for r in _ROLES})
    elif fmt == "sharegpt":
        turns = _turns(row[turns_column(fmt, column, list(row))], "from", "value", _SHAREGPT_ROLES)
    elif fmt == "alpaca":
        instruction, extra = row["instruction"], row.get("input")
        if not isinstance(instruction, str) or not isinstance(row["output"], str):
            raise BadRow("instruction and output must be text")
        user = instruction + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
        turns = ([{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str)
                 and row["system"] else []) + [{"role": "user", "content": user},
                                               {"role": "assistant", "content": row["output"]}]
    else:
        turns = [{"role": "user", "content": str(row[prompt_column])},
                 {"role": "assistant", "content": str(row[response_column])}]
    if any(t["role"] == "system" for t in turns[1:]):
        raise BadRow("a system turn after the first turn")
    if turns[-1]["role"] != "assistant":
        raise BadRow(f"the conversation ends on a {turns[-1]['role']} turn (the last turn must be the assistant's)")
    return turns


def _render(tokenizer, turns: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # Jinja raises its own errors (and templates raise on purpose) for turns they refuse
        raise BadRow(f"the chat template refused it: {first_line(e)}") from None


def _render_all(tokenizer, conversations: list[list[dict]], generation_prompt: bool) -> list[str]:
    """Many conversations in one call (a quarter less time per conversation than one by one)."""
    if not conversations:
        return []
    try:
        return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception:  # one of them is refused: render one by one to say which
        return [_render(tokenizer, turns, generation_prompt) for turns in conversations]


def render(tokenizer, turns: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the whole conversation as text, the character spans the assistant says)."""
    return render_many(tokenizer, [turns])[0]


def render_many(tokenizer, conversations: list[list[dict]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """`render` of many conversations, the template called once per kind of rendering. Raises BadRow for the
    first conversation the template refuses; the prompt of the last reply is `text[:spans[-1][0]]`."""
    texts = _render_all(tokenizer, conversations, False)
    replies = [(i, k) for i, turns in enumerate(conversations) for k, t in enumerate(turns) if t["role"] == "assistant"]
    befores = iter(_render_all(tokenizer, [conversations[i][:k] for i, k in replies], True))
    # the render through a conversation's last turn is the whole text
    later = [(i, k) for i, k in replies if k != len(conversations[i]) - 1]
    throughs = dict(zip(later, _render_all(tokenizer, [conversations[i][:k + 1] for i, k in later], False)))
    out: list[tuple[str, list[tuple[int, int]]]] = [(text, []) for text in texts]
    for i, k in replies:
        text, before = texts[i], next(befores)
        through = throughs.get((i, k), text)
        if not (through.startswith(before) and text.startswith(through)):
            raise UserError("tokenizer.chat_template: the template renders earlier turns differently once later "
                            "turns follow (e.g. it drops past reasoning), so the assistant's turns cannot be "
                            "found; set tokenizer.chat_template to one that renders conversations incrementally")
        out[i][1].append((len(before), len(through)))
    return out


def generation_prompt(tokenizer, turns: list[dict]) -> str:
    """The text a model continues to answer after `turns` (which end on a user turn)."""
    return _render(tokenizer, turns, True)


def tokenize(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]], ignore: int
             ) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per rendered conversation, from one batched call of the fast tokenizer: the
    tokens from the one holding a span's first character to the one holding its last are targets (a token
    that joins the template's last character before the reply with the reply's first, e.g. SentencePiece's
    "▁a", is the reply's)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("tokenizer.path: chat data needs a fast (Rust) tokenizer, which tells where each token "
                        "starts in the text")
    out = []
    for enc, sp in zip(backend.encode_batch(texts, add_special_tokens=False), spans):
        ids = enc.ids
        labels = [ignore] * len(ids)
        for a, b in sp:
            first, last = _token_at(enc, a, b, 1), _token_at(enc, b - 1, a - 1, -1)
            if first is not None and last is not None and first <= last:
                labels[first:last + 1] = ids[first:last + 1]
        out.append((ids, labels))
    return out


def _token_at(enc, char: int, stop: int, step: int) -> int | None:
    """The token holding `char`, or the nearest one from there towards `stop` (a normalizer may drop
    characters, e.g. spaces, that no token then holds)."""
    for c in range(char, stop, step):
        t = enc.char_to_token(c)
        if t is not None:
            return t
    return None
