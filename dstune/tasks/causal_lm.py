"""Causal language modelling: plain text, prompt/response pairs and chat formats (messages, ShareGPT,
Alpaca) → next-token targets (perplexity; BLEU and ROUGE of generated replies).

Chat data is rendered with the tokenizer's chat template and trains on the assistant's turns only
(dstune/data/chat.py); prompt/response rows take the same path when the tokenizer has a template."""
from __future__ import annotations

from typing import Any, Callable

import torch

from dstune.data import chat
from dstune.data.batching import IGNORE
from dstune.data.files import ROW, require_present, row_location
from dstune.errors import UserError
from dstune.tasks.base import Generative
from dstune.tasks.seq2seq import with_eos

CHAT = ("messages", "sharegpt", "alpaca")  # formats that only exist through a chat template


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def conversational(fmt: str, tokenizer) -> bool:
    """Rendered with the chat template, assistant turns as the only targets."""
    return fmt in CHAT or (fmt == "prompt_response" and has_template(tokenizer))


def auto_format(d, columns: list[str], first: Callable[[str], Any]) -> str | None:
    """data.format `auto`: the format rows with `columns` are read as (d: the data settings; `first(column)`:
    that column's value in the first row), or None when they hold none."""
    conv = [c for c in (d.messages_column, "messages", "conversations") if c and c in columns]
    if d.text_column in columns:
        return "text"
    if d.prompt_column in columns and d.response_column in columns:
        return "prompt_response"
    if conv:
        turns = first(conv[0])
        return "sharegpt" if isinstance(turns, list) and turns and isinstance(turns[0], dict) \
            and "from" in turns[0] else "messages"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    return None


TURNS = ("messages", "sharegpt")  # a list of turns; their keys tell one from the other
FORMAT_SHAPES = {"messages": " (turns of role and content, OpenAI's layout)",
                 "sharegpt": " (turns of from and value)"}


def with_system(system: str | None, turns: list[dict]) -> list[dict]:
    """`turns` after a system turn holding `system` (none when it is None)."""
    return ([{"role": "system", "content": system}] if system is not None else []) + turns


def require_template(tokenizer, key: str) -> None:
    """A one-line error naming `key` when the tokenizer has no chat template."""
    if not has_template(tokenizer):
        raise UserError(f"{key}: the run's tokenizer has no chat template to render a conversation with; train "
                        "with tokenizer.chat_template set (a Jinja template or a file holding one)")


class CausalLM(Generative):
    name = "causal_lm"
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    shifts_labels = True
    prompt_column = "prompt_ids"
    left_pad_prompts = True

    def check(self, cfg, ds, path, key, tokenizer):
        """data.format, or the format found from the table's columns ("auto")."""
        d, columns = cfg.data, ds.column_names
        fmt = d.format
        if fmt == "auto":
            fmt = auto_format(d, columns, lambda column: ds[0][column])
            if fmt is None:
                raise UserError(f"data.format: {path} is none of text ({d.text_column!r}), prompt_response "
                                f"({d.prompt_column!r}+{d.response_column!r}), messages, sharegpt (conversations) "
                                f"or alpaca (instruction+output) (columns: {', '.join(columns)})")
        needs = {"text": [("data.text_column", d.text_column)],
                 "prompt_response": [("data.prompt_column", d.prompt_column),
                                     ("data.response_column", d.response_column)],
                 "messages": [("data.messages_column", chat.turns_column("messages", d.messages_column, columns))],
                 "sharegpt": [("data.messages_column", chat.turns_column("sharegpt", d.messages_column, columns))],
                 "alpaca": [("data.format", "instruction"), ("data.format", "output")]}[fmt]
        found = auto_format(d, columns, lambda column: ds[0][column]) if len(ds) else None
        if d.format != "auto" and found and (found != fmt) and (
                fmt in TURNS and found in TURNS or any(c not in columns for _, c in needs)):
            raise UserError(f"data.format: {path} is read as {fmt}, but its rows look like {found}"
                            f"{FORMAT_SHAPES.get(found, '')}; set data.format: {found} (or auto)")
        require_present(columns, needs, path)  # a missing column first: it says what the data lacks
        if fmt in CHAT and not has_template(tokenizer):
            raise UserError(f"tokenizer.chat_template: {fmt} data ({path}) is rendered with a chat template and "
                            "the tokenizer has none; set tokenizer.chat_template to a Jinja template or a file "
                            "holding one")
        return fmt, needs

    def packs(self, cfg, style, for_eval):
        """Training rows with data.packing; evaluation rows only as plain text (a prompt must stay whole)."""
        return cfg.data.packing and (style == "text" or not for_eval)

    def encoder(self, cfg, tokenizer, style, labels, for_eval, path, key):
        if conversational(style, tokenizer):
            return _conversation_encoder(cfg, tokenizer, style, for_eval, path, key)
        d, eos, n = cfg.data, tokenizer.eos_token_id, cfg.data.max_length
        cut = (lambda x: x[:n]) if for_eval or not d.packing else (lambda x: x)  # packing cuts long rows itself

        def texts(batch, column: str) -> list[str]:
            return [str(x) for x in batch[column]]

        def text(batch):
            ids = [cut(with_eos(x, eos)) for x in tokenizer(texts(batch, d.text_column))["input_ids"]]
            return {"input_ids": ids, "labels": ids}

        def prompt_response(batch):  # without a chat template: the prompt is context, not a target
            prompts = tokenizer(texts(batch, d.prompt_column))["input_ids"]
            replies = [with_eos(x, eos) for x in
                       tokenizer(texts(batch, d.response_column), add_special_tokens=False)["input_ids"]]
            out = {"input_ids": [cut(p + r) for p, r in zip(prompts, replies)],
                   "labels": [cut([IGNORE] * len(p) + r) for p, r in zip(prompts, replies)]}
            if for_eval:
                out.update(prompt_ids=[p[-n:] for p in prompts], ref=texts(batch, d.response_column))
            return out
        return prompt_response if style == "prompt_response" else text

    def example_batch(self, config, micro_batch, seq_len, target_len):
        ids = torch.randint(0, config.vocab_size, (micro_batch, seq_len))
        return {"input_ids": ids, "labels": ids}

    def prompt_ids(self, tokenizer, prompt, system=None):
        """Through the chat template, as one user turn after the `system` message if there is one, when the
        tokenizer has a template (training renders prompt/response rows the same way)."""
        if not has_template(tokenizer):
            return tokenizer(prompt)["input_ids"]
        return self.chat_ids(tokenizer, with_system(system, [{"role": "user", "content": prompt}]))

    def chat_ids(self, tokenizer, turns: list[dict]) -> list[int]:
        """A conversation that ends on a user turn, rendered with the chat template up to the assistant's
        reply, as token ids (as training renders the prompt of a reply)."""
        try:
            text = chat.generation_prompt(tokenizer, turns)
        except chat.BadRow as e:
            raise UserError(f"tokenizer.chat_template: {e}") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def new_tokens(self, out, prompt_len):
        return out[..., prompt_len:]

    def prompt_only(self, cfg, columns):
        d = cfg.data
        return d.prompt_column if d.prompt_column in columns and d.response_column not in columns \
            and d.text_column not in columns else None


def _conversation_encoder(cfg, tokenizer, fmt: str, for_eval: bool, path: str, key: str):
    """Batched map function: rows of a chat format → ids and labels (assistant turns only); errors say
    file:line."""
    d, n = cfg.data, cfg.data.max_length

    def encode(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        where = lambda row, e: UserError(f"{row_location(path, row[ROW])}: {key}: {e}")  # noqa: E731
        conversations = []
        for row in rows:
            try:
                conversations.append(chat.conversation(row, fmt, d.messages_column, d.prompt_column,
                                                       d.response_column))
            except chat.BadRow as e:
                raise where(row, e) from None
        try:
            rendered = chat.render_many(tokenizer, conversations)
        except chat.BadRow:  # the template refused a conversation: find its row
            for row, turns in zip(rows, conversations):
                try:
                    chat.render(tokenizer, turns)
                except chat.BadRow as e:
                    raise where(row, e) from None
            raise
        texts, spans = [text for text, _ in rendered], [sp for _, sp in rendered]
        encoded = chat.tokenize(tokenizer, texts, spans, IGNORE)
        cut = (lambda x: x[:n]) if for_eval or not d.packing else (lambda x: x)
        out = {"input_ids": [cut(ids) for ids, _ in encoded], "labels": [cut(lab) for _, lab in encoded]}
        if for_eval:  # the prompt of the last reply, and the reply
            prompts = tokenizer([text[:sp[-1][0]] for text, sp in rendered], add_special_tokens=False)["input_ids"]
            out.update(prompt_ids=[ids[-n:] for ids in prompts], ref=[turns[-1]["content"] for turns in conversations])
        return out
    return encode
