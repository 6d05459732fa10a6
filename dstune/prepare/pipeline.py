"""From data files to token ids: load every source, let the task check and encode its rows, hold some out
for evaluation, mix the sources and pack. In memory, or through Arrow files in a work folder (the prepared
cache, prepare/cache.py), so no step holds the corpus in Python objects."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dstune.config import RANDOM_DATA, RunConfig
from dstune.prepare.augment import MARK, augment_rows, input_columns
from dstune.data.batching import IGNORE
from dstune.data.files import ROW, load_table, map_output, require_columns
from dstune.data.packing import pack
from dstune.errors import UserError
from dstune.tasks import get_task


@dataclass
class TaskData:
    train: Any                  # datasets.Dataset of token ids
    eval: Any | None            # same, with `ref` (and `prompt_ids`) columns for generation metrics
    labels: list[str] | None = None  # classification label values (as text), index = class id
    style: str = ""             # causal_lm: the data format (text, prompt_response, messages, sharegpt, alpaca)
    sources: list[dict] | None = None  # per source of data.train: path, format, rows, examples in the mixture,
    #                                    rows dropped (data.drop_invalid_rows)
    eval_dropped: int = 0       # evaluation rows dropped (data.drop_invalid_rows)
    eval_too_long: int = 0      # evaluation rows the task left out: a prompt that fills data.max_length (preference)
    augmented: list | None = None  # data.augment: (source path, its rows with their copies) per source

    def leading_inputs(self, n_tokens: int) -> list[int]:
        """The first `n_tokens` input tokens of data.train, row after row: of each row its prompt (the leading
        tokens that are not targets) or, where the first token is already a target (plain text), all of it.
        Fewer where the data holds fewer."""
        out: list[int] = []
        for i in range(len(self.train)):
            if len(out) >= n_tokens:
                break
            row = self.train[i]
            ids, labels = [int(x) for x in row["input_ids"]], np.asarray(row.get("labels", 0))
            if labels.ndim == 1 and len(labels) == len(ids) and len(ids) and labels[0] == IGNORE:
                targets = np.flatnonzero(labels != IGNORE)
                ids = ids[:targets[0] if len(targets) else len(ids)]
            out += ids
        return out[:n_tokens]


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
    if d.augment:
        raise UserError("data.augment: random token ids have no text to rewrite; unset data.augment")
    vocab = len(tokenizer) if tokenizer is not None else cfg.model.config_overrides.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 2:
        raise UserError("model.config_overrides.vocab_size: needed (an int >= 2) for random data without a tokenizer")
    return TaskData(train=RandomTokens(RANDOM_EXAMPLES, d.max_length, vocab, cfg.training.seed), eval=None)


def _load(cfg: RunConfig, path: str, key: str, tokenizer, work: str | None = None, labeled: bool = True,
          needs_out: list | None = None):
    """(the table with its row numbers in ROW, its format, rows dropped for a missing value). Rows without
    labels (`labeled` false) need no label column. `needs_out` receives the (config key, column) pairs the
    task reads."""
    raw = load_table(path, key, work)
    task = get_task(cfg.task)
    style, needs = task.check(cfg, raw, path, key, tokenizer)
    if not labeled:
        needs = [(k, c) for k, c in needs if k != task.label_key]
    if needs_out is not None:
        needs_out.extend(needs)
    raw, dropped = require_columns(raw.add_column(ROW, np.arange(len(raw))), needs, path, cfg.data.drop_invalid_rows)
    if dropped:  # one table again, not a selection of the loaded one
        raw = raw.flatten_indices(**map_output(work, "valid-rows"))
    return raw, style, dropped


PARALLEL_ROWS = 20_000  # from here on, tokenizing in as many processes as cores pays for starting them


def workers(cfg: RunConfig, rows: int) -> int | None:
    """data.num_proc, else the cores this process may use for PARALLEL_ROWS rows or more, else none."""
    if cfg.data.num_proc:
        return cfg.data.num_proc if cfg.data.num_proc > 1 else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if rows >= PARALLEL_ROWS and cores > 1 else None


def _tokenize(cfg: RunConfig, tokenizer, ds, style: str, labels: list[str] | None, for_eval: bool,
              path: str, key: str, work: str | None = None, tag: str = "", pack_rows: bool = True):
    task = get_task(cfg.task)
    if for_eval:
        task.check_eval_labels(cfg, ds, labels)
    encode = task.encoder(cfg, tokenizer, style, labels, for_eval, path, key)
    features = task.token_features(cfg, for_eval)
    if MARK in ds.column_names:  # data.augment's copies stay marked in the prepared rows (until packed)
        encode, features = _marked(encode), _with_mark(features)
    split = f"{tag}eval" if for_eval else f"{tag}train"
    out = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names, num_proc=workers(cfg, len(ds)),
                 desc=f"tokenize {split}", features=features, **map_output(work, f"{split}-tokens"))
    if pack_rows and task.packs(cfg, style, for_eval):
        out = pack(out, cfg.data.max_length, work=work, name=f"{split}-packed")
    return out


def _marked(encode):
    """An encoder that keeps each row's data.augment mark (encoders map rows one to one)."""
    def encode_marked(batch):
        return {**encode(batch), MARK: batch[MARK]}
    return encode_marked


def _with_mark(features):
    if features is None:
        return None
    import datasets
    return datasets.Features({**features, MARK: datasets.Value("int32")})


def prepare_eval(cfg: RunConfig, tokenizer, path: str, labels: list[str] | None, key: str = "data.eval",
                 work: str | None = None) -> TaskData:
    """Tokenize one evaluation file the way training saw its data (same label ids)."""
    raw, style, dropped = _load(cfg, path, key, tokenizer, work)
    if cfg.evaluation.max_samples:
        raw = raw.select(range(min(len(raw), cfg.evaluation.max_samples)))
    rows = _tokenize(cfg, tokenizer, raw, style, labels, True, path, key, work)
    return TaskData(None, rows, labels, style, eval_dropped=dropped, eval_too_long=len(raw) - len(rows))


def prepare_pool(cfg: RunConfig, tokenizer, labels: list[str] | None, path: str, key: str = "--pool"):
    """(the pool's rows, numbered in ROW; their token ids, one example per row) for scoring: classification
    rows need only their text, causal LM and seq2seq rows their reference (response / target) too."""
    task = get_task(cfg.task)
    labeled = task.generative
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"packing": False})})  # one row, one example
    table = load_table(path, key)
    prompts = task.prompt_only(cfg, table.column_names)
    if prompts is not None:  # prompts without their replies: the model's own greedy replies are scored
        raw, _ = require_columns(table.add_column(ROW, np.arange(len(table))), [(key, prompts)], path,
                                 cfg.data.drop_invalid_rows)
        return raw, [{"prompt_ids": task.prompt_ids(tokenizer, str(t))} for t in raw[prompts]]
    raw, style, _ = _load(cfg, path, key, tokenizer, labeled=labeled)
    rows = _tokenize(cfg, tokenizer, raw, style, labels if labeled else None, False, path, key, pack_rows=False)
    if len(rows) != len(raw):
        raise UserError(f"{key}: {len(raw) - len(rows)} rows of {path} give no example to score")
    return raw, rows


@dataclass
class _Source:
    cfg: RunConfig   # the run's config with this source's format and columns
    path: str
    key: str         # its config key, for error messages
    raw: Any         # its rows
    style: str
    dropped: int     # rows left out for a missing value (data.drop_invalid_rows)
    labeled: bool = True  # false: data.unlabeled (or a source with labeled: false), trained by a teacher alone
    needs: list | None = None  # the (config key, column) pairs the task reads
    copies: int = 0  # rows data.augment added


def _source_key(cfg: RunConfig, i: int, src) -> str:
    """The recipe key a source comes from (what its errors name)."""
    if src.path == cfg.data.unlabeled and not src.labeled:
        return "data.unlabeled"
    return f"data.train[{i}]" if isinstance(cfg.data.train, list) else "data.train"


def check_sources(cfg: RunConfig) -> None:
    """What the recipe alone decides about its sources, checked whether or not the data is prepared already:
    rows without labels need a classifier and a teacher."""
    for i, src in enumerate(cfg.data.sources()):
        if not src.labeled:
            _check_unlabeled(cfg, _source_key(cfg, i, src))


def _sources(cfg: RunConfig, tokenizer, work: str | None) -> list[_Source]:
    """Every source of data.train, loaded and checked, with the config it is read with."""
    check_sources(cfg)
    out = []
    for i, src in enumerate(cfg.data.sources()):
        columns = src.model_dump(exclude={"path", "weight", "epochs", "labeled"}, exclude_none=True)
        c = cfg.model_copy(update={"data": cfg.data.model_copy(update=columns)}) if columns else cfg
        key = _source_key(cfg, i, src)
        needs: list = []
        raw, style, dropped = _load(c, src.path, key, tokenizer, f"{work}/source{i}" if work else None, src.labeled,
                                    needs)
        out.append(_Source(c, src.path, key, raw, style, dropped, src.labeled, needs))
    return out


def _check_unlabeled(cfg: RunConfig, key: str) -> None:
    """Rows without labels train only through a teacher's outputs, and only a classifier has none to read."""
    if get_task(cfg.task).label_key is None:
        raise UserError(f"{key}: rows without labels are for classification; in {cfg.task} every row holds its "
                        "own targets (put it in data.train)")
    if cfg.distill is None or cfg.distill.alpha == 0:
        raise UserError(f"{key}: rows without labels train only through a teacher's outputs; set distill "
                        "(with alpha > 0)")


def mixture_counts(rows: list[int], cfg: RunConfig) -> list[int]:
    """Examples each source puts into the mixture: rows × epochs, or its weight's share of all rows."""
    sources = cfg.data.sources()
    weighted = [s.weight for s in sources if s.weight is not None]
    pool = sum(n for s, n in zip(sources, rows) if s.weight is not None)  # data.unlabeled stays out of it
    return [round(s.weight / sum(weighted) * pool) if s.weight is not None else round((s.epochs or 1.0) * n)
            for s, n in zip(sources, rows)]


def mixture_indices(rows: int, count: int, seed: int) -> np.ndarray:
    """`count` row indices of a source of `rows`: whole seeded permutations, then part of one more."""
    g = np.random.default_rng(seed)
    full, part = divmod(count, rows)
    return np.concatenate([g.permutation(rows) for _ in range(full)] + [g.permutation(rows)[:part]]).astype(np.int64)


def _mix(cfg: RunConfig, parts: list, counts: list[int], work: str | None):
    """The mixture of the sources' tokenized rows: a pure function of the data and training.seed (never of
    the ranks or the step a run resumes at); each source's examples in a row, the training order shuffles."""
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
    labels, style = get_task(cfg.task).label_values([s for s in sources if s.labeled]), sources[0].style
    single = len(sources) == 1
    mixing = not single or (d.sources()[0].epochs or 1.0) != 1.0  # else the rows are the training examples
    evald = None
    if d.eval:
        evald = prepare_eval(cfg, tokenizer, d.eval, labels, work=work)
        if single and evald.style != style:
            raise UserError(f"data.eval: {d.eval} is {evald.style} data and data.train is {style}")
    elif d.eval_fraction > 0:
        held, too_long = [], 0
        for i, s in enumerate(sources):
            if not s.labeled:  # nothing to score held-out rows against
                continue
            s.raw, held_out = _hold_out(s.cfg, s.raw, f"{work}/source{i}" if work else None)
            held.append(_tokenize(s.cfg, tokenizer, held_out, s.style, labels, True, s.path, s.key, work, f"{i}-",
                                  pack_rows=single))
            too_long += len(held_out) - len(held[-1]) if not get_task(cfg.task).packs(s.cfg, s.style, True) else 0
        evald = TaskData(None, _concatenate(held), labels, style, eval_too_long=too_long)
    if d.augment:  # after the held-out split: no evaluation row, nor a copy of one, is augmented
        for i, s in enumerate(sources):
            columns = input_columns(s.cfg, s.needs, s.style, get_task(cfg.task).label_key)
            s.raw, s.copies = augment_rows(s.cfg, s.raw, columns, s.key, s.path,
                                           map_output(f"{work}/source{i}" if work else None, "augment"),
                                           workers(cfg, len(s.raw)))
    parts = [_tokenize(s.cfg, tokenizer, s.raw, s.style, labels if s.labeled else None, False, s.path, s.key, work,
                       f"{i}-", pack_rows=not mixing) for i, s in enumerate(sources)]
    if mixing:
        counts = mixture_counts([len(p) for p in parts], cfg)
        train = _mix(cfg, parts, counts, work)
        if get_task(cfg.task).packs(cfg, style, False):
            train = pack(train, d.max_length, work=work, name="mixture-packed")
    else:
        train, counts = parts[0], [len(sources[0].raw) - too_long_rows(cfg, sources[0], parts[0])]
    return TaskData(train=train, eval=evald.eval if evald else None, labels=labels,
                    style=style if len({s.style for s in sources}) == 1 else "mixture",
                    sources=[{"path": s.path, "format": s.style, "rows": len(s.raw) - s.copies, "examples": n,
                              "tokens": token_count(p), "dropped": s.dropped, "labeled": s.labeled,
                              "augmented": s.copies, "too_long": too_long_rows(cfg, s, p)}
                             for s, p, n in zip(sources, parts, counts)],
                    eval_dropped=evald.eval_dropped if evald else 0, eval_too_long=evald.eval_too_long if evald else 0,
                    augmented=[(s.path, s.raw) for s in sources] if d.augment else None)


def too_long_rows(cfg: RunConfig, source: _Source, tokenized) -> int:
    """Rows of a source the task left out for a prompt that fills data.max_length (preference pairs); the
    other tasks keep every row (packed rows are counted in blocks, not rows)."""
    return 0 if get_task(cfg.task).packs(source.cfg, source.style, False) else len(source.raw) - len(tokenized)


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
                      pack_rows=len(sources) == 1) for s in sources if s.labeled]
    return TaskData(None, _concatenate(held), labels, sources[0].style)
