"""`dstune chat`: a conversation in the terminal with a finished causal_lm run, through its chat template.

The history is a list of turns, rendered whole with the template before every reply, so the model reads
each of its past replies exactly as the template renders an assistant turn (as training rendered them).
When the rendered history and the reply would pass the model's positions, the oldest exchanges (a user turn
and its reply) are dropped; the system message stays.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from transformers import TextStreamer

from dstune.data import chat as chat_data
from dstune.errors import UserError
from dstune.tasks import get_task
from dstune.tasks.base import Decoding
from dstune.tasks.causal_lm import require_template, with_system

PROMPT = "you> "
HELP = """[dstune] commands:
  /reset        start over (the system message stays)
  /system TEXT  set the system message and start over (/system alone: no system message)
  /help         this list
  /exit, /quit  end the chat (so do Ctrl-D and Ctrl-C at the prompt)
  anything else is your next message"""


def needs_chat(key: str, system: str | None = None) -> Callable[[Any, Any], None]:
    """A `load_run` check: the run is a causal_lm run whose tokenizer has a chat template (that takes the
    `system` message, if one is given), else a one-line error naming `key`, before any weights load."""
    def check(cfg, tokenizer) -> None:
        if get_task(cfg.task).model_task != "causal_lm":
            raise UserError(f"{key}: this is a {cfg.task} run; a conversation needs a causal_lm run with a chat "
                            "template")
        require_template(tokenizer, key)
        if (reason := check_system(tokenizer, system)) is not None:
            raise UserError(f"--system: the run's chat template refuses a system message: {reason}")
    return check


class TooLong(Exception):
    """The system message and the new message alone pass the room the model has for a prompt."""


class Conversation:
    """The model, the system message and the turns so far; `room`: the most prompt tokens the model takes."""

    def __init__(self, model, tokenizer, system: str | None, room: float):
        self.task, self.model, self.tokenizer = get_task("causal_lm"), model, tokenizer
        self.system, self.room = system, room
        self.turns: list[dict] = []

    def ids(self, turns: list[dict]) -> list[int]:
        return self.task.chat_ids(self.tokenizer, with_system(self.system, turns))

    def prompt(self, text: str) -> tuple[list[int], list[dict], int]:
        """(the prompt's ids, the turns it holds, the exchanges dropped to fit it in `room`) for the next
        user message `text`; raises TooLong with the tokens it would need."""
        turns, dropped = [*self.turns, {"role": "user", "content": text}], 0
        ids = self.ids(turns)
        while len(ids) > self.room and len(turns) > 1:
            turns, dropped = turns[2:], dropped + 1
            ids = self.ids(turns)
        if len(ids) > self.room:
            raise TooLong(len(ids))
        return ids, turns, dropped



def check_system(tokenizer, system: str | None) -> str | None:
    """The reason the chat template refuses a system message (None: it takes it)."""
    if system is None:
        return None
    try:
        chat_data.generation_prompt(tokenizer, with_system(system, [{"role": "user", "content": "hi"}]))
    except chat_data.BadRow as e:
        return str(e)
    return None


def positions(model) -> int | None:
    """How many tokens the model reads and writes in one sequence (None: no fixed limit), less the virtual
    tokens prompt tuning puts before every input."""
    n = getattr(model.config, "max_position_embeddings", None)
    prompt = getattr(model, "dstune_prompt", None)
    return None if n is None else n - (prompt.embedding.num_embeddings if prompt is not None else 0)


class _Streamer(TextStreamer):
    """Prints the reply's text as its tokens come (leading and trailing spaces dropped)."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.started = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        print(text.rstrip() if stream_end else text, end="\n" if stream_end else "", flush=True)


def _read(tty: bool) -> str:
    """The next line the user types (EOFError at the end of the input)."""
    if tty:
        return input(PROMPT)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def chat(model, tokenizer, system: str | None, decoding: Decoding, name: str) -> int:
    """The conversation, from stdin until /exit, /quit, EOF or Ctrl-C; replies on stdout as they come (the
    run passed `needs_chat`; `name` is what the greeting calls it)."""
    tty = sys.stdin.isatty()
    limit = positions(model)
    if limit is not None and decoding.max_new_tokens >= limit:
        raise UserError(f"--max-new-tokens: {decoding.max_new_tokens} leaves no room for a prompt in the model's "
                        f"{limit:,} positions")
    talk = Conversation(model, tokenizer, system, float("inf") if limit is None else limit - decoding.max_new_tokens)
    if tty:
        import readline  # noqa: F401 - line editing and history for input()
        print(f"[dstune] chatting with {name}; /help lists the commands, Ctrl-D ends", flush=True)
    while True:
        try:
            line = _read(tty).strip()
        except (EOFError, KeyboardInterrupt):
            if tty:
                print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if _command(line, talk):
                return 0
            continue
        _turn(talk, line, decoding, tty)


def _command(line: str, talk: Conversation) -> bool:
    """Run a /command; True: the chat ends."""
    word, _, rest = line.partition(" ")
    if word in ("/exit", "/quit"):
        return True
    if word == "/reset":
        talk.turns = []
        print("[dstune] history cleared" + (" (the system message stays)" if talk.system is not None else ""),
              flush=True)
    elif word == "/system":
        system = rest.strip() or None
        if (reason := check_system(talk.tokenizer, system)) is not None:
            print(f"[dstune] the run's chat template refuses a system message ({reason}); nothing changed",
                  flush=True)
            return False
        talk.system, talk.turns = system, []
        print("[dstune] " + ("system message set" if system else "no system message") + "; history cleared",
              flush=True)
    elif word == "/help":
        print(HELP, flush=True)
    else:
        print(f"[dstune] unknown command {word}; /help lists them", flush=True)
    return False


def _turn(talk: Conversation, text: str, decoding: Decoding, tty: bool) -> None:
    """One user message and the model's reply, kept in the history."""
    model, tokenizer = talk.model, talk.tokenizer
    try:
        ids, turns, dropped = talk.prompt(text)
    except TooLong as e:
        print(f"[dstune] that message needs {e.args[0]:,} tokens with the system message; the model takes "
              f"{talk.room:,.0f} besides the reply's --max-new-tokens: say less (it is not kept)", flush=True)
        return
    if dropped:
        print(f"[dstune] the conversation outgrew the model's positions: dropped the oldest {dropped} "
              f"exchange{'s' if dropped > 1 else ''} (the system message stays)", flush=True)
    try:
        new = talk.task.reply(model, tokenizer, ids, decoding, _Streamer(tokenizer))
    except KeyboardInterrupt:
        print("\n[dstune] reply interrupted; that message is not kept", flush=True)
        return
    reply = tokenizer.decode(new, skip_special_tokens=True).strip()
    talk.turns = [*turns, {"role": "assistant", "content": reply}]
    if tty:
        print(flush=True)
