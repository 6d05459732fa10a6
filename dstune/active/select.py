"""Active learning's pick: score a pool of rows with a trained model and keep the k most informative.

Classification scores the predicted distribution (entropy, margin, least confidence); causal LM and seq2seq
score the mean negative log-likelihood per target token of each row's reference (its response / target
column: how surprised the model is by the answer a labeller would give), or, for rows that hold only a
prompt, of the model's own greedy reply (how unsure it is while answering). `random` is the baseline every
strategy should beat. Scoring runs sharded over the ranks of a launch (each rank scores every world-th row;
rank 0 writes), or in one process.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from dstune.data.batching import IGNORE, to_device
from dstune.data.files import ROW
from dstune.engine.distributed import gather_objects, shard_batches
from dstune.errors import UserError
from dstune.tasks import get_task

CLASSIFICATION_STRATEGIES = ("entropy", "margin", "least-confidence")
GENERATIVE_STRATEGIES = ("nll",)


def check_strategy(task: str, strategy: str) -> None:
    if get_task(task).model_task != task:  # e.g. preference pairs: judged already, nothing to label
        raise UserError(f"--strategy: active learning picks rows to label for classification, causal_lm and seq2seq "
                        f"runs; a {task} run's rows are not scored one by one")
    generative = get_task(task).generative
    fits = ("random", *(GENERATIVE_STRATEGIES if generative else CLASSIFICATION_STRATEGIES))
    if strategy not in fits:
        raise UserError(f"--strategy: {strategy!r} does not score {task} rows; use {', '.join(fits)}")


def uncertainty(logits: torch.Tensor, strategy: str) -> torch.Tensor:
    """Per row of [rows, classes] logits: higher = less sure. entropy of the distribution; margin: 1 minus the
    gap between the two likeliest classes; least-confidence: 1 minus the top probability."""
    logp = torch.log_softmax(logits.float(), -1)
    p = logp.exp()
    if strategy == "entropy":
        return -(p * logp).sum(-1)
    top = p.topk(2, dim=-1).values
    if strategy == "margin":
        return 1 - (top[:, 0] - top[:, 1])
    return 1 - top[:, 0]


def token_nll(logits: torch.Tensor, labels: torch.Tensor, shifted: bool) -> torch.Tensor:
    """Mean negative log-likelihood per target token of each row (0 for a row without targets)."""
    if shifted:  # position i predicts token i + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def greedy_nll(model, prompts: list[list[int]], task, tokenizer, device, max_new_tokens: int) -> torch.Tensor:
    """Mean negative log-likelihood per token of each prompt's greedy reply, up to and with its end token."""
    from dstune.data.batching import collate_prompts

    module = getattr(model, "module", model)
    inputs = {k: v.to(device) for k, v in
              collate_prompts(prompts, tokenizer.pad_token_id, left=task.left_pad_prompts).items()}
    out = module.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                          **getattr(module, "dstune_generate_kwargs", {}))
    new = task.new_tokens(out.sequences, inputs["input_ids"].shape[1])[:, -len(out.scores):]
    logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
    picked = logp.gather(-1, new[..., None])[..., 0]
    ended = (new == tokenizer.eos_token_id).long().cumsum(1)
    mask = (ended == 0) | ((ended == 1) & (new == tokenizer.eos_token_id))  # up to the first end token
    return -(picked * mask).sum(1) / mask.sum(1).clamp_min(1)


@torch.no_grad()
def score_rows(model, rows, task_name: str, tokenizer, device, batch_size: int, strategy: str, seed: int,
               rank: int = 0, world: int = 1, max_new_tokens: int = 32) -> np.ndarray:
    """One score per row of the tokenized pool `rows` (same on every rank)."""
    if strategy == "random":
        return np.random.default_rng(seed).random(len(rows))
    task = get_task(task_name)
    mine: list[tuple[int, float]] = []
    for batch_ix in shard_batches(len(rows), rank, world, batch_size):
        if "prompt_ids" in rows[0]:  # prompts only: the greedy reply's NLL
            scores = greedy_nll(model, [rows[i]["prompt_ids"] for i, _ in batch_ix], task, tokenizer, device,
                                max_new_tokens)
            mine += [(i, float(s)) for (i, keep), s in zip(batch_ix, scores.tolist()) if keep]
            continue
        batch = to_device(task.collate([rows[i] for i, _ in batch_ix], tokenizer.pad_token_id), device, task)
        labels = batch["labels"] if task.forward_takes_labels else batch.pop("labels")
        logits = model(**batch).logits
        scores = token_nll(logits, labels, task.shifts_labels) if task.generative else uncertainty(logits, strategy)
        mine += [(i, float(s)) for (i, keep), s in zip(batch_ix, scores.tolist()) if keep]
    out = np.zeros(len(rows))
    for part in gather_objects(mine):
        for i, s in part:
            out[i] = s
    return out


def write_selection(raw, scores: np.ndarray, k: int, path: str, strategy: str) -> int:
    """The k highest-scoring rows of the pool (its own columns, plus `score` and `pool_row`, the row's
    number in the pool from 0), best first, as JSON lines; written whole or not at all."""
    order = np.argsort(-scores, kind="stable")[:k]
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    columns = [c for c in raw.column_names if c != ROW]
    with open(tmp, "w", encoding="utf-8") as f:
        for i in order.tolist():
            row = raw[int(i)]
            f.write(json.dumps({**{c: row[c] for c in columns}, "pool_row": int(row[ROW]),
                                "score": float(scores[i]), "strategy": strategy}, default=str) + "\n")
    os.replace(tmp, out)
    return len(order)
