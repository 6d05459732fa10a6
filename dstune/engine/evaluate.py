"""Evaluation: loss, accuracy/macro-F1 or perplexity, and BLEU/ROUGE of generations.

Works on a bare model (one process) and inside a DeepSpeed run: the eval set is sharded over
ranks and every rank runs the same number of batches (ZeRO-3 gathers parameters collectively,
so a rank that stopped early would hang the others); filler rows carry no weight.
"""
from __future__ import annotations

import torch

from dstune.data.batching import collate_prompts, to_device
from dstune.config import RunConfig
from dstune.engine.distributed import Dist, gather_objects, shard_batches
from dstune.prepare.pipeline import TaskData
from dstune.preference.objective import Tally
from dstune.tasks import get_task
from dstune.tasks.metrics import generation_metrics


def _bar(batches: list, desc: str, show: bool):
    from tqdm.auto import tqdm
    return tqdm(batches, desc=desc, disable=not show, leave=False, dynamic_ncols=True)


@torch.no_grad()
def evaluate(model, data: TaskData, cfg: RunConfig, tokenizer, where: Dist | None = None,
             objective=None) -> dict[str, float]:
    """Metrics of `model` (a bare model, or a DeepSpeed engine) on `data.eval`: the task's loss and metrics
    (a preference `objective`'s, with its reference), and BLEU/ROUGE of greedy replies where
    `evaluation.generate` (or the task's default) asks for them; identical on every rank of `where` (one
    process when None). A progress bar on rank 0 (stderr)."""
    where = where or Dist(0, 1, 0, next(model.parameters()).device)
    ds, task, batch_size = data.eval, get_task(cfg.task), cfg.evaluation.batch_size
    show = where.is_main
    was_training = model.training
    model.eval()
    loss_sum, items, preds, golds, tally = 0.0, 0, [], [], Tally()
    shards = shard_batches(len(ds), where.rank, where.world, batch_size)
    batch_of = lambda ix: (to_device(task.collate([ds[i] for i, _ in ix], tokenizer.pad_token_id), where.device,  # noqa: E731
                                     task), torch.tensor([k for _, k in ix], device=where.device))
    if objective is not None and objective.estimates_kl:  # kto: one KL estimate over the whole held-out set
        batches, keeps = zip(*[batch_of(ix) for ix in shards])
        objective.start_step(model, list(batches), len(ds), list(keeps))
    for batch_ix in _bar(shards, "eval", show):
        batch, keep = batch_of(batch_ix)
        if objective is not None:
            objective.loss(model, batch, 0.0, tally, keep)
            continue
        labels = batch["labels"] if task.forward_takes_labels else batch.pop("labels")
        logits = model(**batch).logits.float()
        batch_loss, batch_items, batch_preds, batch_golds = task.score(logits, labels, keep)
        loss_sum, items = loss_sum + batch_loss, items + batch_items
        preds, golds = preds + batch_preds, golds + batch_golds
    if objective is not None:
        result = objective.metrics(tally.reduced(where.device))
    else:
        parts = gather_objects((loss_sum, items, preds, golds))
        result = task.metrics(sum(p[0] for p in parts), sum(p[1] for p in parts), [x for p in parts for x in p[2]],
                              [x for p in parts for x in p[3]])
    if task.scores_generations(cfg.evaluation) and "ref" in ds.column_names:
        result.update(_generation_scores(model, ds, cfg, tokenizer, where, show))
    model.train(was_training)
    return result


def _generation_scores(model, ds, cfg: RunConfig, tokenizer, where: Dist, progress: bool) -> dict[str, float]:
    """BLEU and ROUGE of greedy replies to the held-out prompts against their references."""
    task, device = get_task(cfg.task), where.device
    module = getattr(model, "module", model)  # DeepSpeed engine → the HF model with .generate
    # ZeRO-3 gathers each layer's weights collectively: every rank runs as many decoding steps as the longest
    synced_gpus = where.world > 1 and getattr(model, "zero_optimization_stage", lambda: 0)() == 3
    pairs = []
    for batch_ix in _bar(shard_batches(len(ds), where.rank, where.world, cfg.evaluation.batch_size), "generate",
                         progress):
        prompts = [ds[i][task.prompt_column] for i, _ in batch_ix]
        inputs = {k: v.to(device) for k, v in
                  collate_prompts(prompts, tokenizer.pad_token_id, left=task.left_pad_prompts).items()}
        out = module.generate(**inputs, max_new_tokens=cfg.evaluation.max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus,
                              **getattr(module, "dstune_generate_kwargs", {}))
        out = task.new_tokens(out, inputs["input_ids"].shape[1])
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        pairs += [(t.strip(), ds[i]["ref"]) for t, (i, k) in zip(texts, batch_ix) if k]
    pairs = [p for part in gather_objects(pairs) for p in part]
    return generation_metrics([p for p, _ in pairs], [r for _, r in pairs])


def _number(v) -> str:
    if not isinstance(v, float):
        return str(v)
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"


def results_table(columns: dict[str, dict[str, float]]) -> str:
    """Metrics side by side, one row per metric: e.g. {"before": {...}, "after": {...}} →
        metric      before     after
        loss        0.6931    0.4512"""
    names = list(dict.fromkeys(k for col in columns.values() for k in col))
    rows = [["metric", *columns]] + [[n, *(_number(c[n]) if n in c else "-" for c in columns.values())]
                                     for n in names]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)
