"""Evaluation: loss, accuracy/macro-F1 or perplexity, and BLEU/ROUGE of generations.

Works on a bare model (one process) and inside a DeepSpeed run: the eval set is sharded over
ranks and every rank runs the same number of batches (ZeRO-3 gathers parameters collectively,
so a rank that stopped early would hang the others); filler rows carry no weight.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dstune.data.batching import collate, collate_prompts, to_device
from dstune.data.tasks import IGNORE, TaskData
from dstune.engine import metrics


def _gather(obj):
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _shard(n: int, rank: int, world: int, batch_size: int) -> list[list[tuple[int, bool]]]:
    """This rank's batches of (index, counts) pairs, padded so every rank has the same number of batches."""
    mine = list(range(rank, n, world))
    per_rank = math.ceil(n / world)
    n_batches = math.ceil(per_rank / batch_size)
    padded = [(i, True) for i in mine] + [(0, False)] * (n_batches * batch_size - len(mine))
    return [padded[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]


@torch.no_grad()
def evaluate(model, data: TaskData, task: str, tokenizer, device: torch.device, batch_size: int,
             generate: bool = False, max_new_tokens: int = 32, rank: int = 0, world: int = 1,
             synced_gpus: bool = False) -> dict[str, float]:
    """Metrics of `model` on `data.eval`; identical on every rank."""
    ds = data.eval
    was_training = model.training
    model.eval()
    loss_sum, tokens, preds, golds = 0.0, 0, [], []
    for batch_ix in _shard(len(ds), rank, world, batch_size):
        rows = [ds[i] for i, _ in batch_ix]
        keep = torch.tensor([k for _, k in batch_ix], device=device)
        batch = to_device(collate(rows, tokenizer.pad_token_id, task), device, task)
        labels = batch.pop("labels")
        if task == "seq2seq":
            labels[~keep] = IGNORE
            batch["labels"] = labels  # the decoder's inputs are built from the labels
        logits = model(**batch).logits.float()
        if task == "classification":
            loss_sum += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            tokens += int(keep.sum())
            preds += logits.argmax(-1)[keep].tolist()
            golds += labels[keep].tolist()
            continue
        if task == "causal_lm":
            labels[~keep] = IGNORE
            logits, labels = logits[:, :-1], labels[:, 1:]
        loss_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                    ignore_index=IGNORE, reduction="sum").item()
        tokens += int((labels != IGNORE).sum())
    parts = _gather((loss_sum, tokens, preds, golds))
    loss_sum, tokens = sum(p[0] for p in parts), sum(p[1] for p in parts)
    if task == "classification":
        result = {"loss": loss_sum / tokens,
                  **metrics.classification_metrics([x for p in parts for x in p[2]], [x for p in parts for x in p[3]])}
    else:
        result = metrics.perplexity(loss_sum, tokens)
    if generate and "ref" in ds.column_names:
        result.update(_generation_scores(model, ds, task, tokenizer, device, batch_size, max_new_tokens,
                                         rank, world, synced_gpus))
    model.train(was_training)
    return result


def _generation_scores(model, ds, task, tokenizer, device, batch_size, max_new_tokens, rank, world, synced_gpus):
    module = getattr(model, "module", model)  # DeepSpeed engine → the HF model with .generate
    key = "prompt_ids" if task == "causal_lm" else "input_ids"
    pairs = []
    for batch_ix in _shard(len(ds), rank, world, batch_size):
        prompts = [ds[i][key] for i, _ in batch_ix]
        inputs = {k: v.to(device) for k, v in
                  collate_prompts(prompts, tokenizer.pad_token_id, left=task == "causal_lm").items()}
        out = module.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus,
                              **getattr(module, "dstune_generate_kwargs", {}))
        if task == "causal_lm":
            out = out[:, inputs["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        pairs += [(t.strip(), ds[i]["ref"]) for t, (i, k) in zip(texts, batch_ix) if k]
    pairs = [p for part in _gather(pairs) for p in part]
    return metrics.generation_metrics([p for p, _ in pairs], [r for _, r in pairs])
