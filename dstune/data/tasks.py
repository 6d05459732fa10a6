"""Turn raw rows into token ids for each task: classification, causal_lm, seq2seq."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dstune.config import RANDOM_DATA, RunConfig
from dstune.data import chat
from dstune.data.files import load_table, require_columns, row_location
from dstune.errors import UserError

IGNORE = -100  # label id the loss skips (prompt tokens, padding)
ROW = "__dstune_row"  # column added to every loaded table: the row's number in its file, for error messages


@dataclass
class TaskData:
    train: Any                  # datasets.Dataset of token ids
    eval: Any | None            # same, with `ref` (and `prompt_ids`) columns for generation metrics
    labels: list[str] | None = None  # classification label values (as text), index = class id
    style: str = ""             # causal_lm: the data format (text, prompt_response, messages, sharegpt, alpaca)


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]


def _causal_format(cfg: RunConfig, ds, path: str, key: str, tokenizer) -> str:
    """The causal_lm format of a table: data.format, or found from its columns ("auto")."""
    d, columns = cfg.data, ds.column_names
    fmt = d.format
    if fmt == "auto":
        conv = [c for c in (d.messages_column, "messages", "conversations") if c and c in columns]
        if d.text_column in columns:
            fmt = "text"
        elif d.prompt_column in columns and d.response_column in columns:
            fmt = "prompt_response"
        elif conv:
            first = ds[0][conv[0]]
            fmt = "sharegpt" if isinstance(first, list) and first and isinstance(first[0], dict) \
                and "from" in first[0] else "messages"
        elif "instruction" in columns and "output" in columns:
            fmt = "alpaca"
        else:
            raise UserError(f"data.format: {path} is none of text ({d.text_column!r}), prompt_response "
                            f"({d.prompt_column!r}+{d.response_column!r}), messages, sharegpt (conversations) or "
                            f"alpaca (instruction+output) (columns: {', '.join(columns)})")
    needs = {"text": [("data.text_column", d.text_column)],
             "prompt_response": [("data.prompt_column", d.prompt_column), ("data.response_column", d.response_column)],
             "messages": [("data.messages_column", d.messages_column or chat.DEFAULT_COLUMN["messages"])],
             "sharegpt": [("data.messages_column", d.messages_column or chat.DEFAULT_COLUMN["sharegpt"])],
             "alpaca": [("data.format", "instruction"), ("data.format", "output")]}[fmt]
    for config_key, column in needs:
        require_columns(ds, [column], config_key, path)
    if fmt in ("messages", "sharegpt", "alpaca") and not _has_template(tokenizer):
        raise UserError(f"tokenizer.chat_template: {fmt} data ({path}) is rendered with a chat template and the "
                        "tokenizer has none; set tokenizer.chat_template to a Jinja template or a file holding one")
    return fmt


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _conversational(fmt: str, tokenizer) -> bool:
    """Rendered with the chat template, assistant turns as the only targets."""
    return fmt in ("messages", "sharegpt", "alpaca") or (fmt == "prompt_response" and _has_template(tokenizer))


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A user's prompt as the model sees it: through the chat template, as one user turn, when the tokenizer
    has one (training renders prompt_response rows the same way)."""
    if not _has_template(tokenizer):
        return tokenizer(prompt)["input_ids"]
    try:
        text = chat.generation_prompt(tokenizer, [{"role": "user", "content": prompt}])
    except chat.BadRow as e:
        raise UserError(f"tokenizer.chat_template: {e}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encoder(cfg: RunConfig, tokenizer, style: str, labels: dict | None, for_eval: bool):
    d, eos, n = cfg.data, tokenizer.eos_token_id, cfg.data.max_length

    def classification(row):
        ids = tokenizer(str(row[d.text_column]), truncation=True, max_length=n)["input_ids"]
        return {"input_ids": ids, "labels": labels[str(row[d.label_column])]}

    def causal_text(row):
        ids = _with_eos(tokenizer(str(row[d.text_column]))["input_ids"], eos)
        ids = ids if cfg.data.packing else ids[:n]
        return {"input_ids": ids, "labels": list(ids)}

    def causal_chat(row):
        prompt = encode_prompt(tokenizer, str(row[d.prompt_column]))
        reply = _with_eos(tokenizer(str(row[d.response_column]), add_special_tokens=False)["input_ids"], eos)
        ids = prompt + reply
        labels_ = [IGNORE] * len(prompt) + reply  # the prompt is context, not a target
        if for_eval or not cfg.data.packing:
            ids, labels_ = ids[:n], labels_[:n]
        out = {"input_ids": ids, "labels": labels_}
        if for_eval:
            out.update(prompt_ids=prompt[-n:], ref=str(row[d.response_column]))
        return out

    def seq2seq(row):
        src = _with_eos(tokenizer(str(row[d.source_column]))["input_ids"], eos)[:n]
        tgt = _with_eos(tokenizer(str(row[d.target_column]))["input_ids"], eos)[:d.max_target_length]
        out = {"input_ids": src, "labels": tgt}
        if for_eval:
            out["ref"] = str(row[d.target_column])
        return out

    if cfg.task == "classification":
        return classification
    if cfg.task == "seq2seq":
        return seq2seq
    return causal_chat if style == "prompt_response" else causal_text


def _conversation_encoder(cfg: RunConfig, tokenizer, fmt: str, for_eval: bool, path: str, key: str):
    """Batched map function: rows of a chat format → ids and labels (assistant turns only); errors say
    file:line."""
    d, n = cfg.data, cfg.data.max_length

    def encode(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        texts, spans, extra = [], [], {"prompt_ids": [], "ref": []}
        for row in rows:
            try:
                turns = chat.conversation(row, fmt, d.messages_column, d.prompt_column, d.response_column)
                text, sp = chat.render(tokenizer, turns)
                if for_eval:
                    prompt = chat.generation_prompt(tokenizer, turns[:-1])
            except chat.BadRow as e:
                raise UserError(f"{row_location(path, row[ROW])}: {key}: {e}") from None
            texts.append(text)
            spans.append(sp)
            if for_eval:
                extra["prompt_ids"].append(tokenizer(prompt, add_special_tokens=False)["input_ids"][-n:])
                extra["ref"].append(turns[-1]["content"])
        encoded = chat.tokenize(tokenizer, texts, spans, IGNORE)
        cut = (lambda x: x[:n]) if for_eval or not d.packing else (lambda x: x)
        out = {"input_ids": [cut(ids) for ids, _ in encoded], "labels": [cut(lab) for _, lab in encoded]}
        return {**out, **extra} if for_eval else out
    return encode


def best_fit(lengths: list[int], block: int) -> list[list[int]]:
    """Group item indices into bins of at most `block` total length: longest first, each into the fullest
    bin it still fits (best-fit decreasing: within a few percent of the fewest bins, in O(n·bins) numpy)."""
    space = np.empty(len(lengths), dtype=np.int64)
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        fits = np.flatnonzero(space[:len(bins)] >= lengths[i])
        if len(fits):
            b = fits[space[fits].argmin()]
        else:
            b = len(bins)
            bins.append([])
            space[b] = block
        bins[b].append(i)
        space[b] -= lengths[i]
    return bins


def pack(ds, block: int, window: int = 10_000):
    """Whole documents into blocks of at most `block` tokens, `window` documents at a time (a longer
    document is cut into block-sized pieces, each a document of its own).

    Each block carries `position_ids` that restart at 0 at every document: from them the model keeps the
    documents apart (transformers builds block-diagonal causal masks on SDPA/eager and uses flash attention's
    variable-length path), so a packed block computes what its documents would alone. A document's first
    label is no target there: it would be predicted from the end of the previous, unrelated document.
    """
    def chunk(batch):
        pieces = [(ids[s:s + block], labels[s:s + block])
                  for ids, labels in zip(batch["input_ids"], batch["labels"]) for s in range(0, len(ids), block)]
        out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for members in best_fit([len(ids) for ids, _ in pieces], block):
            ids_, labels_, pos_ = [], [], []
            for j, m in enumerate(members):
                ids, labels = pieces[m]
                ids_ += ids
                labels_ += (labels[:1] if j == 0 else [IGNORE]) + labels[1:]
                pos_ += range(len(ids))
            out["input_ids"].append(ids_)
            out["labels"].append(labels_)
            out["position_ids"].append(pos_)
        return out
    return ds.map(chunk, batched=True, batch_size=window, remove_columns=ds.column_names, keep_in_memory=True)


RANDOM_EXAMPLES = 1 << 16  # rows of `data.train: random`; set training.max_steps for longer runs


class RandomTokens:
    """Rows of `max_length` uniform random token ids (labels = ids), made on demand from (seed, index).

    What throughput benchmarks feed: every row a full block, so tokens/s counts no padding.
    """

    def __init__(self, n: int, length: int, vocab: int, seed: int):
        self.n, self.length, self.vocab, self.seed = n, length, vocab, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * RANDOM_EXAMPLES + i)
        ids = torch.randint(0, self.vocab, (self.length,), generator=g).tolist()
        return {"input_ids": ids, "labels": ids}


def random_data(cfg: RunConfig, tokenizer) -> TaskData:
    """`data.train: random`: causal_lm only, ids below the tokenizer's (or model.config_overrides') vocab."""
    d = cfg.data
    if cfg.task != "causal_lm":
        raise UserError(f"data.train: `random` data is for causal_lm, not {cfg.task}")
    if d.eval or d.eval_fraction:
        raise UserError("data.eval: random data has nothing to evaluate on; unset data.eval and data.eval_fraction")
    vocab = len(tokenizer) if tokenizer is not None else cfg.model.config_overrides.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 2:
        raise UserError("model.config_overrides.vocab_size: needed (an int >= 2) for random data without a tokenizer")
    return TaskData(train=RandomTokens(RANDOM_EXAMPLES, d.max_length, vocab, cfg.training.seed), eval=None)


def _check_columns(cfg: RunConfig, ds, path: str, key: str, tokenizer) -> str:
    """Fail with the missing column's config key; return the causal_lm format ("" for other tasks)."""
    d = cfg.data
    if cfg.task == "classification":
        require_columns(ds, [d.text_column], "data.text_column", path)
        require_columns(ds, [d.label_column], "data.label_column", path)
    elif cfg.task == "seq2seq":
        require_columns(ds, [d.source_column], "data.source_column", path)
        require_columns(ds, [d.target_column], "data.target_column", path)
    else:
        return _causal_format(cfg, ds, path, key, tokenizer)
    return ""


def _load(cfg: RunConfig, path: str, key: str, tokenizer):
    """(the table with its row numbers in ROW, its format)."""
    raw = load_table(path, key)
    style = _check_columns(cfg, raw, path, key, tokenizer)
    return raw.add_column(ROW, np.arange(len(raw))), style


def _tokenize(cfg: RunConfig, tokenizer, ds, style: str, labels: list[str] | None, for_eval: bool,
              path: str, key: str):
    label_map = {v: i for i, v in enumerate(labels)} if labels else None
    if for_eval and labels:
        unseen = {str(x) for x in ds[cfg.data.label_column]} - set(labels)
        if unseen:
            raise UserError(f"data.eval: labels {sorted(unseen)} do not occur in the training labels {labels}")
    if _conversational(style, tokenizer):
        out = ds.map(_conversation_encoder(cfg, tokenizer, style, for_eval, path, key), batched=True,
                     batch_size=1000, remove_columns=ds.column_names, keep_in_memory=True)
    else:
        out = ds.map(_encoder(cfg, tokenizer, style, label_map, for_eval), remove_columns=ds.column_names,
                     keep_in_memory=True)
    if cfg.task == "causal_lm" and cfg.data.packing and (style == "text" or not for_eval):
        out = pack(out, cfg.data.max_length)
    return out


def prepare_eval(cfg: RunConfig, tokenizer, path: str, labels: list[str] | None, key: str = "data.eval") -> TaskData:
    """Tokenize one evaluation file the way training saw its data (same label ids)."""
    raw, style = _load(cfg, path, key, tokenizer)
    if cfg.evaluation.max_samples:
        raw = raw.select(range(min(len(raw), cfg.evaluation.max_samples)))
    return TaskData(None, _tokenize(cfg, tokenizer, raw, style, labels, True, path, key), labels, style)


def prepare_data(cfg: RunConfig, tokenizer) -> TaskData:
    """Load train (and eval) rows, check the columns the task needs, and tokenize them."""
    d = cfg.data
    if d.train == RANDOM_DATA:
        return random_data(cfg, tokenizer)
    train_raw, style = _load(cfg, d.train, "data.train", tokenizer)
    labels = None
    if cfg.task == "classification":
        labels = sorted({str(x) for x in train_raw[d.label_column]})
        if len(labels) < 2:
            raise UserError(f"data.label_column: {d.train} has only one label value ({labels[0]!r})")
    evald = None
    if d.eval:
        evald = prepare_eval(cfg, tokenizer, d.eval, labels)
        if evald.style != style:
            raise UserError(f"data.eval: {d.eval} is {evald.style} data and data.train is {style}")
    elif d.eval_fraction > 0:
        train_raw, held_out = _hold_out(cfg, train_raw)
        evald = TaskData(None, _tokenize(cfg, tokenizer, held_out, style, labels, True, d.train, "data.train"),
                         labels, style)
    train = _tokenize(cfg, tokenizer, train_raw, style, labels, False, d.train, "data.train")
    return TaskData(train=train, eval=evald.eval if evald else None, labels=labels, style=style)


def _hold_out(cfg: RunConfig, train_raw):
    """(train rows, held-out rows): data.eval_fraction of data.train, drawn with training.seed."""
    split = train_raw.train_test_split(test_size=cfg.data.eval_fraction, seed=cfg.training.seed)
    held_out = split["test"]
    if cfg.evaluation.max_samples:
        held_out = held_out.select(range(min(len(held_out), cfg.evaluation.max_samples)))
    return split["train"], held_out


def prepare_held_out(cfg: RunConfig, tokenizer, labels: list[str] | None) -> TaskData:
    """The rows a data.eval_fraction run held out of data.train for evaluation, tokenized as in training."""
    train_raw, style = _load(cfg, cfg.data.train, "data.train", tokenizer)
    held_out = _hold_out(cfg, train_raw)[1]
    return TaskData(None, _tokenize(cfg, tokenizer, held_out, style, labels, True, cfg.data.train, "data.train"),
                    labels, style)
