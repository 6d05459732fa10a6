"""Turn raw rows into token ids for each task: classification, causal_lm, seq2seq."""
from __future__ import annotations

import os
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
    sources: list[dict] | None = None  # per source of data.train: path, format, rows, examples in the mixture


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
             "messages": [("data.messages_column", chat.turns_column("messages", d.messages_column, columns))],
             "sharegpt": [("data.messages_column", chat.turns_column("sharegpt", d.messages_column, columns))],
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
    """Batched map function: a batch of rows → token ids (one call of the fast tokenizer per column)."""
    d, eos, n = cfg.data, tokenizer.eos_token_id, cfg.data.max_length
    cut = (lambda x: x[:n]) if for_eval or not d.packing else (lambda x: x)  # packing cuts long rows itself

    def texts(batch, column: str) -> list[str]:
        return [str(x) for x in batch[column]]

    def classification(batch):
        ids = tokenizer(texts(batch, d.text_column), truncation=True, max_length=n)["input_ids"]
        return {"input_ids": ids, "labels": [labels[str(x)] for x in batch[d.label_column]]}

    def causal_text(batch):
        ids = [cut(_with_eos(x, eos)) for x in tokenizer(texts(batch, d.text_column))["input_ids"]]
        return {"input_ids": ids, "labels": ids}

    def causal_chat(batch):  # prompt/response without a chat template: the prompt is context, not a target
        prompts = tokenizer(texts(batch, d.prompt_column))["input_ids"]
        replies = [_with_eos(x, eos) for x in
                   tokenizer(texts(batch, d.response_column), add_special_tokens=False)["input_ids"]]
        out = {"input_ids": [cut(p + r) for p, r in zip(prompts, replies)],
               "labels": [cut([IGNORE] * len(p) + r) for p, r in zip(prompts, replies)]}
        if for_eval:
            out.update(prompt_ids=[p[-n:] for p in prompts], ref=texts(batch, d.response_column))
        return out

    def seq2seq(batch):
        src = [_with_eos(x, eos)[:n] for x in tokenizer(texts(batch, d.source_column))["input_ids"]]
        tgt = [_with_eos(x, eos)[:d.max_target_length] for x in tokenizer(texts(batch, d.target_column))["input_ids"]]
        out = {"input_ids": src, "labels": tgt}
        if for_eval:
            out["ref"] = texts(batch, d.target_column)
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
        extra = {}
        if for_eval:  # the prompt of the last reply, and the reply
            prompts = tokenizer([text[:sp[-1][0]] for text, sp in rendered], add_special_tokens=False)["input_ids"]
            extra = {"prompt_ids": [ids[-n:] for ids in prompts], "ref": [turns[-1]["content"] for turns in conversations]}
        encoded = chat.tokenize(tokenizer, texts, spans, IGNORE)
        cut = (lambda x: x[:n]) if for_eval or not d.packing else (lambda x: x)
        out = {"input_ids": [cut(ids) for ids, _ in encoded], "labels": [cut(lab) for _, lab in encoded]}
        return {**out, **extra} if for_eval else out
    return encode


def best_fit(lengths: list[int], block: int) -> list[list[int]]:
    """Group item indices into bins of at most `block` total length: longest first, each into the fullest
    bin it still fits (best-fit decreasing: within a few percent of the fewest bins). Open bins are kept by
    their free space, so finding the best one is one scan of `block` flags, however many bins are open."""
    by_space: list[list[int]] = [[] for _ in range(block + 1)]  # open bins by free space
    has = np.zeros(block + 1, dtype=bool)
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        n = lengths[i]
        space = n + int(has[n:].argmax())
        if has[space]:
            b = by_space[space].pop()
            has[space] = bool(by_space[space])
        else:  # nothing open fits: a new bin
            b, space = len(bins), block
            bins.append([])
        bins[b].append(i)
        by_space[space - n].append(b)
        has[space - n] = True
    return bins


def _out(work: str | None, name: str) -> dict:
    """Where a map writes: `work`/name.arrow (memory-mapped, preparing a cache), else memory."""
    return {"cache_file_name": f"{work}/{name}.arrow"} if work else {"keep_in_memory": True}


def pack(ds, block: int, window: int = 10_000, work: str | None = None, name: str = "packed"):
    """Whole documents into blocks of at most `block` tokens, `window` documents at a time (a longer
    document is cut into block-sized pieces, each a document of its own).

    Each block carries `position_ids` that restart at 0 at every document: from them the model keeps the
    documents apart (transformers builds block-diagonal causal masks on SDPA/eager and uses flash attention's
    variable-length path), so a packed block computes what its documents would alone. A document's first
    label is no target there: it would be predicted from the end of the previous, unrelated document.
    Works on Arrow columns (numpy gathers), never on Python lists of tokens.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    def chunk(table):
        ids = table.column("input_ids").combine_chunks()
        lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        flat_ids = ids.flatten().to_numpy(zero_copy_only=False)
        flat_labels = table.column("labels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        doc_start = np.cumsum(lengths) - lengths
        # pieces of at most `block` tokens: (start in the flat column, length)
        n_pieces = -(-lengths // block)
        doc = np.repeat(np.arange(len(lengths)), n_pieces)
        nth = np.arange(len(doc)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
        start, length = doc_start[doc] + nth * block, np.minimum(block, lengths[doc] - nth * block)
        if not len(length):
            empty = pa.array([], pa.list_(pa.int32()))
            return pa.table({"input_ids": empty, "labels": empty, "position_ids": empty})
        bins = best_fit(length.tolist(), block)
        order = np.fromiter((m for members in bins for m in members), dtype=np.int64, count=len(length))
        start, length = start[order], length[order]
        first_in_block = np.zeros(len(order), dtype=bool)
        first_in_block[np.cumsum([0] + [len(m) for m in bins[:-1]])] = True
        piece_at = np.cumsum(length) - length  # where each piece begins in the packed column
        within = np.arange(int(length.sum())) - np.repeat(piece_at, length)
        gather = np.repeat(start, length) + within
        labels = flat_labels[gather]
        labels[piece_at[~first_in_block]] = IGNORE
        block_len = np.add.reduceat(length, np.flatnonzero(first_in_block)) if len(length) else length
        offsets = pa.array(np.concatenate([[0], np.cumsum(block_len)]).astype(np.int32))
        column = lambda values: pa.ListArray.from_arrays(offsets, pa.array(values.astype(np.int32)))  # noqa: E731
        return pa.table({"input_ids": column(flat_ids[gather]), "labels": column(labels),
                         "position_ids": column(within)})

    out = ds.with_format("arrow").map(chunk, batched=True, batch_size=window, remove_columns=ds.column_names,
                                      desc="pack", **_out(work, name))
    return out.with_format(None)


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


def _load(cfg: RunConfig, path: str, key: str, tokenizer, work: str | None = None):
    """(the table with its row numbers in ROW, its format)."""
    raw = load_table(path, key, work)
    style = _check_columns(cfg, raw, path, key, tokenizer)
    return raw.add_column(ROW, np.arange(len(raw))), style


PARALLEL_ROWS = 20_000  # from here on, tokenizing in as many processes as cores pays for starting them


def workers(cfg: RunConfig, rows: int) -> int | None:
    """data.num_proc, else the cores this process may use for PARALLEL_ROWS rows or more, else none."""
    if cfg.data.num_proc:
        return cfg.data.num_proc if cfg.data.num_proc > 1 else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if rows >= PARALLEL_ROWS and cores > 1 else None


def _tokenize(cfg: RunConfig, tokenizer, ds, style: str, labels: list[str] | None, for_eval: bool,
              path: str, key: str, work: str | None = None, tag: str = "", pack_rows: bool = True):
    label_map = {v: i for i, v in enumerate(labels)} if labels else None
    if for_eval and labels:
        unseen = {str(x) for x in ds.unique(cfg.data.label_column)} - set(labels)
        if unseen:
            raise UserError(f"data.eval: labels {sorted(unseen)} do not occur in the training labels {labels}")
    encode = _conversation_encoder(cfg, tokenizer, style, for_eval, path, key) \
        if _conversational(style, tokenizer) else _encoder(cfg, tokenizer, style, label_map, for_eval)
    split = f"{tag}eval" if for_eval else f"{tag}train"
    out = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names, num_proc=workers(cfg, len(ds)),
                 desc=f"tokenize {split}", features=_token_features(cfg, for_eval), **_out(work, f"{split}-tokens"))
    if pack_rows and cfg.task == "causal_lm" and cfg.data.packing and (style == "text" or not for_eval):
        out = pack(out, cfg.data.max_length, work=work, name=f"{split}-packed")
    return out


def _token_features(cfg: RunConfig, for_eval: bool):
    """int32 token columns for generative training rows (half of int64's bytes on disk and in the page
    cache); other rows keep what the encoder returns."""
    if cfg.task == "classification" or for_eval:
        return None
    import datasets
    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features({"input_ids": ids, "labels": ids})


def prepare_eval(cfg: RunConfig, tokenizer, path: str, labels: list[str] | None, key: str = "data.eval",
                 work: str | None = None) -> TaskData:
    """Tokenize one evaluation file the way training saw its data (same label ids)."""
    raw, style = _load(cfg, path, key, tokenizer, work)
    if cfg.evaluation.max_samples:
        raw = raw.select(range(min(len(raw), cfg.evaluation.max_samples)))
    return TaskData(None, _tokenize(cfg, tokenizer, raw, style, labels, True, path, key, work), labels, style)


@dataclass
class _Source:
    cfg: RunConfig   # the run's config with this source's format and columns
    path: str
    key: str         # its config key, for error messages
    raw: Any         # its rows
    style: str


def _sources(cfg: RunConfig, tokenizer, work: str | None) -> list[_Source]:
    """Every source of data.train, loaded and checked, with the config it is read with."""
    listed = isinstance(cfg.data.train, list)
    out = []
    for i, src in enumerate(cfg.data.sources()):
        columns = src.model_dump(exclude={"path", "weight", "epochs"}, exclude_none=True)
        c = cfg.model_copy(update={"data": cfg.data.model_copy(update=columns)}) if columns else cfg
        key = f"data.train[{i}]" if listed else "data.train"
        raw, style = _load(c, src.path, key, tokenizer, f"{work}/source{i}" if work else None)
        out.append(_Source(c, src.path, key, raw, style))
    return out


def _labels(cfg: RunConfig, sources: list[_Source]) -> list[str] | None:
    """Classification: the label values of every source, sorted (index = class id)."""
    if cfg.task != "classification":
        return None
    labels = sorted({str(x) for s in sources for x in s.raw.unique(s.cfg.data.label_column)})
    if len(labels) < 2:
        raise UserError(f"data.label_column: {', '.join(s.path for s in sources)} has only one label value "
                        f"({labels[0]!r})")
    return labels


def mixture_counts(rows: list[int], cfg: RunConfig) -> list[int]:
    """Examples each source puts into the mixture: rows × epochs, or its weight's share of all rows."""
    sources = cfg.data.sources()
    if sources[0].weight is not None:
        total = sum(s.weight for s in sources)
        return [round(s.weight / total * sum(rows)) for s in sources]
    return [round((s.epochs or 1.0) * n) for s, n in zip(sources, rows)]


def mixture_indices(rows: int, count: int, seed: int) -> np.ndarray:
    """`count` row indices of a source of `rows`: whole seeded permutations, then part of one more."""
    g = np.random.default_rng(seed)
    full, part = divmod(count, rows)
    return np.concatenate([g.permutation(rows) for _ in range(full)] + [g.permutation(rows)[:part]]).astype(np.int64)


def _mix(cfg: RunConfig, parts: list, counts: list[int], work: str | None):
    """The mixture of the sources' tokenized rows: a pure function of the data and training.seed (never of
    the ranks or the step a run resumes at); each source's examples in a row, the training order shuffles."""
    import datasets

    offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
    picks = [mixture_indices(len(p), n, cfg.training.seed + 7919 * i) + off
             for i, (p, n, off) in enumerate(zip(parts, counts, offsets)) if n]
    if not picks:
        raise UserError("data.train: the mixture has no examples (every source's weight or epochs rounds to 0)")
    where = {"indices_cache_file_name": f"{work}/mixture-indices.arrow"} if work else {"keep_in_memory": True}
    return _concatenate(parts).select(np.concatenate(picks), **where)


def prepare_data(cfg: RunConfig, tokenizer, work: str | None = None) -> TaskData:
    """Load train (and eval) rows, check the columns the task needs, and tokenize them: in memory, or with
    `work` (a folder) through Arrow files there, so no step holds the corpus in memory. Several sources
    are tokenized one by one and mixed (data.train as a list), then packed together."""
    d = cfg.data
    if d.train == RANDOM_DATA:
        return random_data(cfg, tokenizer)
    sources = _sources(cfg, tokenizer, work)
    labels, style = _labels(cfg, sources), sources[0].style
    single = len(sources) == 1
    mixing = not single or (d.sources()[0].epochs or 1.0) != 1.0  # else the rows are the training examples
    evald = None
    if d.eval:
        evald = prepare_eval(cfg, tokenizer, d.eval, labels, work=work)
        if single and evald.style != style:
            raise UserError(f"data.eval: {d.eval} is {evald.style} data and data.train is {style}")
    elif d.eval_fraction > 0:
        held = []
        for i, s in enumerate(sources):
            s.raw, held_out = _hold_out(s.cfg, s.raw, f"{work}/source{i}" if work else None)
            held.append(_tokenize(s.cfg, tokenizer, held_out, s.style, labels, True, s.path, s.key, work, f"{i}-",
                                  pack_rows=single))
        evald = TaskData(None, _concatenate(held), labels, style)
    parts = [_tokenize(s.cfg, tokenizer, s.raw, s.style, labels, False, s.path, s.key, work, f"{i}-",
                       pack_rows=not mixing) for i, s in enumerate(sources)]
    if mixing:
        counts = mixture_counts([len(p) for p in parts], cfg)
        train = _mix(cfg, parts, counts, work)
        if cfg.task == "causal_lm" and d.packing:
            train = pack(train, d.max_length, work=work, name="mixture-packed")
    else:
        train, counts = parts[0], [len(sources[0].raw)]
    return TaskData(train=train, eval=evald.eval if evald else None, labels=labels,
                    style=style if len({s.style for s in sources}) == 1 else "mixture",
                    sources=[{"path": s.path, "format": s.style, "rows": len(s.raw), "examples": n,
                              "tokens": token_count(p)} for s, p, n in zip(sources, parts, counts)])


def token_count(ds) -> int:
    """Tokens in a tokenized dataset's input_ids, counted on the Arrow column."""
    import pyarrow.compute as pc
    lengths = pc.list_value_length(ds.data.column("input_ids")).to_numpy(zero_copy_only=False)
    if ds._indices is not None:  # a selection (the mixture): its rows of the underlying table
        lengths = lengths[ds._indices.column(0).to_numpy()]
    return int(lengths.sum())


def _concatenate(parts: list):
    """Datasets with the columns they all have, one after the other."""
    import datasets
    if len(parts) == 1:
        return parts[0]
    common = sorted(set.intersection(*(set(p.column_names) for p in parts)))
    return datasets.concatenate_datasets([p.select_columns(common) for p in parts])


def _hold_out(cfg: RunConfig, train_raw, work: str | None = None):
    """(train rows, held-out rows): data.eval_fraction of data.train, drawn with training.seed."""
    where = {"train_indices_cache_file_name": f"{work}/split-train.arrow",
             "test_indices_cache_file_name": f"{work}/split-eval.arrow"} if work else {"keep_in_memory": True}
    split = train_raw.train_test_split(test_size=cfg.data.eval_fraction, seed=cfg.training.seed, **where)
    held_out = split["test"]
    if cfg.evaluation.max_samples:
        held_out = held_out.select(range(min(len(held_out), cfg.evaluation.max_samples)))
    return split["train"], held_out


def prepare_held_out(cfg: RunConfig, tokenizer, labels: list[str] | None) -> TaskData:
    """The rows a data.eval_fraction run held out of data.train for evaluation, tokenized as in training."""
    sources = _sources(cfg, tokenizer, None)
    held = [_tokenize(s.cfg, tokenizer, _hold_out(s.cfg, s.raw)[1], s.style, labels, True, s.path, s.key,
                      pack_rows=len(sources) == 1) for s in sources]
    return TaskData(None, _concatenate(held), labels, sources[0].style)
