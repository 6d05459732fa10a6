"""Turn raw rows into token ids for each task: classification, causal_lm, seq2seq."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dstune.config import RANDOM_DATA, RunConfig
from dstune.data.files import load_table, require_columns
from dstune.errors import UserError

IGNORE = -100  # label id the loss skips (prompt tokens, padding)


@dataclass
class TaskData:
    train: Any                  # datasets.Dataset of token ids
    eval: Any | None            # same, with `ref` (and `prompt_ids`) columns for generation metrics
    labels: list[str] | None = None  # classification label values (as text), index = class id
    style: str = ""             # causal_lm: "text" or "chat" (prompt/response)


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]


def _causal_style(cfg: RunConfig, columns: list[str], path: str) -> str:
    d = cfg.data
    if d.text_column in columns:
        return "text"
    if d.prompt_column in columns and d.response_column in columns:
        return "chat"
    raise UserError(f"data.text_column: {path} has neither a {d.text_column!r} column nor "
                    f"{d.prompt_column!r}+{d.response_column!r} (columns: {', '.join(columns)})")


def _prompt_text(tokenizer, prompt: str) -> tuple[str, bool]:
    """The prompt as the model should see it: through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True), False
    return prompt, True


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    text, add_special = _prompt_text(tokenizer, prompt)
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


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
    return causal_chat if style == "chat" else causal_text


def pack(ds, block: int):
    """Concatenate all examples and cut them into full blocks of `block` tokens (the tail is dropped)."""
    def chunk(batch):
        ids = [t for seq in batch["input_ids"] for t in seq]
        labels = [t for seq in batch["labels"] for t in seq]
        cut = len(ids) // block * block
        return {"input_ids": [ids[i:i + block] for i in range(0, cut, block)],
                "labels": [labels[i:i + block] for i in range(0, cut, block)]}
    return ds.map(chunk, batched=True, batch_size=len(ds), remove_columns=ds.column_names, keep_in_memory=True)


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


def _check_columns(cfg: RunConfig, ds, path: str, key: str) -> str:
    """Fail with the missing column's config key; return the causal_lm style ("text"/"chat")."""
    d = cfg.data
    if cfg.task == "classification":
        require_columns(ds, [d.text_column], "data.text_column", path)
        require_columns(ds, [d.label_column], "data.label_column", path)
    elif cfg.task == "seq2seq":
        require_columns(ds, [d.source_column], "data.source_column", path)
        require_columns(ds, [d.target_column], "data.target_column", path)
    else:
        return _causal_style(cfg, ds.column_names, path)
    return ""


def _tokenize(cfg: RunConfig, tokenizer, ds, style: str, labels: list[str] | None, for_eval: bool):
    label_map = {v: i for i, v in enumerate(labels)} if labels else None
    if for_eval and labels:
        unseen = {str(x) for x in ds[cfg.data.label_column]} - set(labels)
        if unseen:
            raise UserError(f"data.eval: labels {sorted(unseen)} do not occur in the training labels {labels}")
    out = ds.map(_encoder(cfg, tokenizer, style, label_map, for_eval), remove_columns=ds.column_names,
                 keep_in_memory=True)
    if cfg.task == "causal_lm" and cfg.data.packing and (style == "text" or not for_eval):
        out = pack(out, cfg.data.max_length)
        if len(out) == 0:
            raise UserError(f"data.max_length: fewer than {cfg.data.max_length} tokens in the data to pack")
    return out


def prepare_eval(cfg: RunConfig, tokenizer, path: str, labels: list[str] | None, key: str = "data.eval") -> TaskData:
    """Tokenize one evaluation file the way training saw its data (same label ids)."""
    raw = load_table(path, key)
    style = _check_columns(cfg, raw, path, key)
    if cfg.evaluation.max_samples:
        raw = raw.select(range(min(len(raw), cfg.evaluation.max_samples)))
    return TaskData(train=None, eval=_tokenize(cfg, tokenizer, raw, style, labels, True), labels=labels, style=style)


def prepare_data(cfg: RunConfig, tokenizer) -> TaskData:
    """Load train (and eval) rows, check the columns the task needs, and tokenize them."""
    d = cfg.data
    if d.train == RANDOM_DATA:
        return random_data(cfg, tokenizer)
    train_raw = load_table(d.train, "data.train")
    style = _check_columns(cfg, train_raw, d.train, "data.train")
    labels = None
    if cfg.task == "classification":
        labels = sorted({str(x) for x in train_raw[d.label_column]})
        if len(labels) < 2:
            raise UserError(f"data.label_column: {d.train} has only one label value ({labels[0]!r})")
    evald = None
    if d.eval:
        evald = prepare_eval(cfg, tokenizer, d.eval, labels)
        if evald.style != style:
            raise UserError(f"data.eval: {d.eval} does not have the same columns as data.train")
    elif d.eval_fraction > 0:
        train_raw, held_out = _hold_out(cfg, train_raw)
        evald = TaskData(None, _tokenize(cfg, tokenizer, held_out, style, labels, True), labels, style)
    train = _tokenize(cfg, tokenizer, train_raw, style, labels, False)
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
    train_raw = load_table(cfg.data.train, "data.train")
    style = _check_columns(cfg, train_raw, cfg.data.train, "data.train")
    return TaskData(None, _tokenize(cfg, tokenizer, _hold_out(cfg, train_raw)[1], style, labels, True), labels, style)
