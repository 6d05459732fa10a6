"""The training recipe, top to bottom: set up, (resume,) train with periodic eval and checkpoints, save.

Features: any task (classification / causal_lm / seq2seq), any tuning method mix, DeepSpeed ZeRO 0-3
with offload, fp32/bf16/fp16, gradient accumulation, warmup + linear/cosine schedule, clipping,
activation checkpointing, exact resume from the last complete checkpoint, metrics to JSONL and
TensorBoard, tqdm progress on rank 0, and a `trainable.safetensors` of what trained.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from dstune.config import RunConfig, dump_config
from dstune.data.batching import StepBatches, collate, to_device
from dstune.prepare.cache import keep_augmented, prepared_data, summary
from dstune.engine import checkpoint as ckpt
from dstune.engine.distributed import Dist, barrier, init_distributed, mean_over_ranks, shutdown
from dstune.engine.ds_config import build_ds_config, zero_stage
from dstune.engine.evaluate import evaluate, results_table
from dstune.engine.precision import on_cuda, resolve, slow_warning
from dstune.rundir.lock import (check_output_dir, check_recipe_matches, forget_fresh_run_dir, fresh_run_dir,
                                    hold_run_dir)
from dstune.distill.teacher import load_teacher
from dstune.telemetry.trackers import RunLog
from dstune.errors import UserError
from dstune.methods import apply_methods, build_methods, count_trainable, param_groups
from dstune.methods.base import base_model_only
from dstune.models.loading import (base_fingerprint, check_buildable, check_positions, compile_layers, load_model,
                                   new_weights_line, prepare_for_training, recipe_config)
from dstune.models.tokenizers import recipe_tokenizer
from dstune.telemetry.phases import NoMemory, PhaseMemory
from dstune.telemetry.step_profile import StepProfile
from dstune.tasks import get_task


def seed_step(seed: int, step: int, rank: int) -> None:
    """Dropout & co. draw from a stream fixed by (seed, step, rank), so a resumed run repeats them exactly."""
    torch.manual_seed(seed * 1_000_003 + step * 1_009 + rank)


def lr_lambda(schedule: str, warmup: int, total: int):
    """LR multiplier: linear warmup over `warmup` steps, then constant, linear or cosine decay to 0 at `total`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def recipe_checkpointing(cfg: RunConfig, world: int, device: torch.device, tokenizer=None,
                         labels: list | None = None) -> tuple[bool, str]:
    """(on, why) for activation checkpointing as the recipe sets it; `auto` needs a planner (the CLI passes
    `profiling.fit.resolve_checkpointing`, which asks the memory estimate)."""
    setting = cfg.training.activation_checkpointing
    if setting == "auto":
        raise UserError("training.activation_checkpointing: auto needs the memory estimate; run through `dstune train`")
    return bool(setting), ""


def train(cfg: RunConfig, checkpointing=recipe_checkpointing) -> dict:
    """Run one fine-tuning job described by `cfg` on whatever ranks the launcher started. A job that fails
    before its first step leaves no run dir behind (nor the files `dstune launch` put in a new one).
    `checkpointing(cfg, world, device, tokenizer, labels) -> (on, why)` decides activation checkpointing
    (the CLI hands in the estimate-based one for `auto`: the engine does not import profiling)."""
    run_dir, started = Path(cfg.output_dir), []
    fresh = fresh_run_dir(run_dir)
    try:
        return _train(cfg, started, checkpointing)
    except BaseException:
        if fresh and not started and int(os.environ.get("RANK", "0")) == 0:
            forget_fresh_run_dir(run_dir)
        raise


def _train(cfg: RunConfig, started: list, checkpointing) -> dict:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # training.precision auto made concrete here (the run dir's config.yaml says what ran)
    precision, why = resolve(cfg.training.precision)
    auto = cfg.training.precision == "auto"
    slow = None if auto else slow_warning(precision)
    cfg = cfg.with_training(precision=precision)
    t = cfg.training
    if slow and int(os.environ.get("RANK", "0")) == 0:
        print(f"[dstune] warning: {slow}", file=sys.stderr, flush=True)
    # 1. everything that can reject the input, before anything is written
    methods = build_methods(cfg.methods)
    if int(os.environ.get("RANK", "0")) != 0:  # one rank's bars are enough: no tokenize/load bars in the others' logs
        import datasets
        import transformers
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    tokenizer = recipe_tokenizer(cfg)
    data, data_entry = prepared_data(cfg, tokenizer, int(os.environ.get("LOCAL_RANK", "0")), t.dist_timeout_s)
    build_ds_config(cfg, 1)  # reject a bad DeepSpeed config before starting the process group
    # activation checkpointing auto made concrete (before the resume check and config.yaml)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_cuda() else torch.device("cpu")
    ckpt_on, ckpt_why = checkpointing(cfg, int(os.environ.get("WORLD_SIZE", "1")), device, tokenizer,
                                              data.labels)
    cfg = cfg.with_training(activation_checkpointing=ckpt_on)
    t = cfg.training
    check_output_dir(Path(cfg.output_dir))
    model_config = recipe_config(cfg, tokenizer, data.labels)
    check_positions(cfg, model_config)
    check_buildable(cfg, model_config)
    tags = ckpt.complete_checkpoints(cfg.output_dir) if t.resume else []  # and a bad checkpoint pointer
    base = base_fingerprint(cfg)
    if tags:
        check_recipe_matches(Path(cfg.output_dir), cfg.model_dump(mode="json"), base)
    dist_ = init_distributed(t.dist_timeout_s, t.build_timeout_s)
    tag = ckpt.first_readable(cfg.output_dir, tags, dist_.rank, dist_.world) if tags else None
    measure = cfg.training.measure_memory
    memory = NoMemory() if measure == "off" else PhaseMemory(dist_.device, device_sampler=measure == "device")
    ds_config = build_ds_config(cfg, dist_.world)
    batches = StepBatches(len(data.train), t.micro_batch_size, t.gradient_accumulation_steps, dist_.world,
                          dist_.rank, t.seed)
    if batches.steps_per_epoch == 0:
        raise UserError(f"data.train: {len(data.train)} examples are fewer than one global batch "
                        f"(micro_batch_size × gradient_accumulation_steps × ranks = {batches.global_batch})")
    total_steps = t.max_steps or math.ceil(t.epochs * batches.steps_per_epoch)
    if t.profile_step > total_steps:
        raise UserError(f"training.profile_step: {t.profile_step} is past the run's last step ({total_steps})")
    stage = zero_stage(ds_config)
    # ZeRO-3 creates loaded weights partitioned (the config object must stay alive while loading). A random
    # model.tiny is built whole instead and partitioned by deepspeed.initialize: zero.Init draws random
    # weights in another order, and the run dir must rebuild the base that trained (models/loading.py)
    # the teacher first: a run-dir teacher is built whole before ZeRO-3's partitioned loading is switched on
    teacher = load_teacher(cfg, tokenizer, data.labels, ds_config, stage, dist_.device) if cfg.distill else None
    hf_ds = HfDeepSpeedConfig(ds_config) if stage == 3 and not cfg.model.tiny else None  # noqa: F841

    torch.manual_seed(t.seed)
    model = load_model(cfg, tokenizer, data.labels)
    base_params = sum(p.numel() for p in model.parameters())  # the model before methods add any
    apply_methods(model, methods, cfg.task, tokenizer, data.leading_inputs)
    prepare_for_training(model, cfg)
    compiled = compile_layers(model, stage) if t.compile else 0
    n_train, n_total = count_trainable(model)

    # 2. the run dir; removed again if set-up fails before the first step
    run_dir = Path(cfg.output_dir)
    barrier()
    lock = hold_run_dir(run_dir) if dist_.is_main else None  # until the run ends, or the process does
    barrier()
    engine = None
    try:
        if dist_.is_main:
            dump_config(cfg, run_dir / "config.yaml")
            if tokenizer is not None:
                tokenizer.save_pretrained(run_dir / "tokenizer")
            (run_dir / "run.json").write_text(json.dumps(
                {"task": cfg.task, "labels": [str(x) for x in data.labels] if data.labels else None,
                 "methods": [m.name for m in methods], "trainable_params": n_train, "total_params": n_total,
                 "base_params": base_params, "base_fingerprint": base,
                 "world_size": dist_.world, "zero_stage": stage}, indent=1))
            keep_augmented(data_entry, run_dir)
            print(f"[dstune] data: {summary(data, data_entry)}", flush=True)
            if new := new_weights_line(model):
                print(f"[dstune] {new}", flush=True)
            print(f"[dstune] {', '.join(m.name for m in methods)}: {n_train:,} of {n_total:,} parameters train "
                  f"({100 * n_train / n_total:.2f}%); {dist_.world} rank(s), ZeRO-{stage}, {t.precision}{f' ({why})' if auto else ''}, "
                  f"{total_steps} steps of {batches.global_batch} examples"
                  f"{f'; {compiled} layers compiled' if compiled else ''}", flush=True)
            if ckpt_why:
                print(f"[dstune] activation checkpointing {'on' if ckpt_on else 'off'} ({ckpt_why})", flush=True)
            if cfg.distill:
                d = cfg.distill
                print(f"[dstune] distilling from {d.teacher} ({d.divergence}, T {d.temperature:g}, alpha "
                      f"{d.alpha:g})", flush=True)
        groups = [{k: v for k, v in g.items() if k != "names"}
                  for g in param_groups(model, methods, t.lr, t.weight_decay)]
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lr_lambda(t.lr_schedule, t.warmup_steps, total_steps)))
        step = 0
        if tag:
            step = ckpt.load_checkpoint(engine, str(run_dir), tag)
            if dist_.is_main:
                print(f"[dstune] resumed from {tag} (step {step})", flush=True)
    except BaseException:
        if engine is not None:
            shutdown(engine)
        raise

    started.append(True)  # from here on the run dir holds this run's work, kept whatever happens
    memory.mark("init")
    log = RunLog(run_dir, cfg, dist_.is_main)
    # causal LM / seq2seq steps take the token mean over the whole global batch (one label per example in
    # classification, and equal-sized micro-batches, make the plain mean right there)
    task = get_task(cfg.task)
    # generative tasks take the mean over target tokens; a classifier with rows that have no label
    # (data.unlabeled) over its labelled rows
    count_targets = functools.partial(task.target_tokens, first_label_is_target=any(
        m.first_label_is_target for m in methods)) \
        if task.generative or not all(s.labeled for s in cfg.data.sources()) else None
    results = _loop(cfg, engine, scheduler, data, batches, tokenizer, dist_, log, step, total_steps, stage, memory,
                    teacher, count_targets, score_base=any(m.changes_output_at_init for m in methods))
    if measure != "off":
        _write_memory(cfg, dist_, "phase_peaks", memory.report())
    memory.close()
    if dist_.is_main and "after" in results:
        where = f"data.eval, {len(data.eval):,} rows" if cfg.data.eval else f"{len(data.eval):,} held-out rows"
        print(f"[dstune] results ({where}):\n"
              f"{results_table({COLUMNS[k]: results[k] for k in COLUMNS if k in results})}", flush=True)
    if t.save_final:
        save_trainable_final(engine, run_dir, dist_, cfg)
    log.close()
    shutdown(engine)
    if lock is not None:
        os.close(lock)
    return results


def _run_eval(cfg, engine, data, tokenizer, dist_: Dist, stage: int) -> dict:
    e = cfg.evaluation
    gen = get_task(cfg.task).scores_generations(e)
    return evaluate(engine, data, cfg.task, tokenizer, dist_.device, e.batch_size, gen, e.max_new_tokens,
                    dist_.rank, dist_.world, synced_gpus=stage == 3 and dist_.world > 1)


def _loop(cfg, engine, scheduler, data, batches, tokenizer, dist_: Dist, log: RunLog, step: int,
          total_steps: int, stage: int, memory: PhaseMemory, teacher=None, count_targets=None,
          score_base: bool = False) -> dict:
    """`score_base`: the methods change the model before any step, so the untouched base is scored too."""
    from tqdm.auto import tqdm

    t, e = cfg.training, cfg.evaluation
    results: dict = {}
    if data.eval is not None and step == 0:
        if score_base:
            with base_model_only(engine.module):
                results["base"] = _run_eval(cfg, engine, data, tokenizer, dist_, stage)
        results["before"] = _run_eval(cfg, engine, data, tokenizer, dist_, stage)
        log.write(0, "eval", results["before"])
        _write_results(cfg, dist_, results)
    engine.train()
    bar = tqdm(total=total_steps, initial=step, disable=not dist_.is_main, desc="train", dynamic_ncols=True)
    profiler = StepProfile(t.profile_step, Path(cfg.output_dir) / "profile", dist_.rank, dist_.is_main)
    first_step, bad_in_a_row = True, 0
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0  # random data has no padding
    task = get_task(cfg.task)
    while step < total_steps:
        seed_step(t.seed, step, dist_.rank)
        started = time.perf_counter()
        loss_sum, kd_sum, step_tokens = 0.0, 0.0, 0
        global_targets = count_targets([data.train[i]["labels"] for i in batches.global_step(step)]) \
            if count_targets else 0
        with profiler.around(step + 1):
            for micro in batches.for_step(step):
                rows = [data.train[i] for i in micro]
                host = collate(rows, pad_id, task)
                step_tokens += sum(len(r["input_ids"]) for r in rows)  # no padding; no wait for the device
                batch = to_device(host, dist_.device, task)
                with profiler.phase("forward"):
                    out = engine(**batch)
                    loss, weight = out.loss, 1.0
                    if count_targets:
                        # the model's loss is this micro-batch's mean over its targets (tokens; labelled rows);
                        # weighted by its share of the global batch's targets (× accum × ranks, which DeepSpeed's
                        # averaging divides out again), the step's gradient is that of the global batch's mean
                        mine = count_targets([r["labels"] for r in rows])
                        weight = mine / max(global_targets, 1) * batches.accum * batches.world
                        loss = loss * weight if mine else out.logits.sum() * 0.0  # no targets: no 0/0 mean
                    if teacher is not None:
                        # the divergence: a mean over the same targets (generative), or over every row, labelled
                        # or not (classification: equal micro-batches make the plain mean right)
                        kd = teacher.divergence(out.logits, batch) * (weight if task.generative else 1.0)
                        loss = (1 - teacher.alpha) * loss + teacher.alpha * kd
                        kd_sum += kd.item()
                memory.mark("forward")
                with profiler.phase("backward"):
                    engine.backward(loss)
                memory.mark("backward")
                loss_sum += loss.item()
                with profiler.phase("step"):
                    skipped_before = engine.skipped_steps
                    with (skip_if_not_finite(engine, loss_sum, dist_.device) if t.nan_policy == "skip"
                          and engine.is_gradient_accumulation_boundary() else contextlib.nullcontext()):
                        engine.step()
                memory.mark("step")
        step += 1
        if first_step:
            if cfg.training.measure_memory != "off":
                _write_memory(cfg, dist_, "after_first_step", engine_bytes(engine))
            first_step = False
        loss = mean_over_ranks(loss_sum / t.gradient_accumulation_steps, dist_.device)
        skipped = engine.skipped_steps > skipped_before  # the same on every rank: the optimizer decided it
        bad_in_a_row = 0 if math.isfinite(loss) else bad_in_a_row + 1
        # every rank sees the same mean and the same skip, so every rank stops here
        if bad_in_a_row and (t.nan_policy == "stop" or not skipped or bad_in_a_row == MAX_SKIPPED_IN_A_ROW):
            bar.close()  # the error gets a line of its own
            last = ckpt.last_complete(cfg.output_dir)
            why = ("" if t.nan_policy == "stop" else f" ({MAX_SKIPPED_IN_A_ROW} steps in a row)" if skipped
                   else " and the optimizer applied the update")
            raise UserError(f"training: the loss is {loss} at step {step}{why}; stopped without saving the weights "
                            "it updated" + (f" (the last complete checkpoint, {last}, is kept: rerun to resume from "
                                            "it, e.g. with a lower training.lr)" if last else " (lower training.lr?)"))
        step_s = time.perf_counter() - started
        tokens = mean_over_ranks(step_tokens, dist_.device) * dist_.world
        results["skipped_steps"] = engine.skipped_steps  # kept in checkpoints: counts since the run began
        if skipped:  # strict JSON: a loss that is not finite is left out
            log.write(step, "train", {"skipped": True, **({"loss": loss} if math.isfinite(loss) else {})})
        elif step % t.log_every == 0 or step == total_steps:
            # with a teacher, `loss` is the mixed loss that trains; `distill` its divergence term alone
            kd = {"distill": mean_over_ranks(kd_sum / t.gradient_accumulation_steps, dist_.device)} if teacher else {}
            log.write(step, "train", {"loss": loss, **kd, "lr": scheduler.get_last_lr()[0], "step_s": step_s,
                                      "tokens": tokens, "tokens_per_s": tokens / step_s})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", skipped=results["skipped_steps"], refresh=False)
        if data.eval is not None and e.every and step % e.every == 0 and step < total_steps:
            log.write(step, "eval", _run_eval(cfg, engine, data, tokenizer, dist_, stage))
            engine.train()
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or (step == total_steps and t.save_final):
            ckpt.save_checkpoint(engine, cfg.output_dir, step, dist_.is_main, t.keep_checkpoints)
    bar.close()
    if data.eval is not None:
        results["after"] = _run_eval(cfg, engine, data, tokenizer, dist_, stage)
        log.write(step, "eval", results["after"])
    results["steps"] = step
    return _write_results(cfg, dist_, results)


COLUMNS = {"base": "base model", "before": "before", "after": "after"}  # results.json key → table column
MAX_SKIPPED_IN_A_ROW = 8  # with nan_policy=skip: more means the weights are broken, not a batch or two


@contextlib.contextmanager
def skip_if_not_finite(engine, loss_sum: float, device):
    """Around engine.step() at the end of a step with nan_policy=skip. DeepSpeed's ZeRO, bf16 and fp16
    optimizers drop an update with non-finite gradients themselves (they set an `overflow` flag, which the
    engine reads to skip the LR schedule and count skipped_steps). A plain optimizer (ZeRO-0, fp32) has no
    such flag: when any rank's loss or the (reduced) gradients are not finite, its step is made a no-op for
    this once and the flag set, so the engine skips it the same way."""
    import torch.distributed as dist

    opt = engine.optimizer
    if hasattr(opt, "check_grad_overflow"):
        opt.check_grad_overflow = True  # ZeRO-1/2 check only bf16/fp16 gradients by default (a constructor option)
    if hasattr(opt, "overflow"):
        yield
        return
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    bad = torch.tensor([float(not math.isfinite(loss_sum) or not all(torch.isfinite(g).all() for g in grads))],
                       device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not bad.item():
        yield
        return
    opt.step, opt.overflow = (lambda *args, **kwargs: None), True
    try:
        yield
    finally:
        del opt.step, opt.overflow


def engine_bytes(engine) -> dict:
    """What this rank's engine holds by part right now, and the process RSS (and CUDA peak on a GPU)."""
    import psutil

    from dstune.telemetry.measure import engine_model_state_bytes

    mine = {**engine_model_state_bytes(engine), "process_rss": psutil.Process().memory_info().rss}
    if torch.cuda.is_available():
        mine["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return mine


def _write_memory(cfg: RunConfig, dist_: Dist, key: str, mine: dict) -> None:
    """memory.json[key]: one entry per rank (after_first_step: engine bytes; phase_peaks: PhaseMemory)."""
    import torch.distributed as dist

    ranks = [None] * dist_.world
    dist.all_gather_object(ranks, {"rank": dist_.rank, **mine})
    if dist_.is_main:
        path = Path(cfg.output_dir) / "memory.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**current, key: ranks}, indent=1))


def _write_results(cfg: RunConfig, dist_: Dist, results: dict) -> dict:
    """Merge into results.json, so a resumed run keeps the 'before' score of its first start."""
    if not dist_.is_main:
        return results
    path = Path(cfg.output_dir) / "results.json"
    merged = {**(json.loads(path.read_text()) if path.exists() else {}), **results}
    path.write_text(json.dumps(merged, indent=1))
    return merged


def save_trainable_final(engine, run_dir: Path, dist_: Dist, cfg: RunConfig) -> None:
    ckpt.save_trainable(engine.module, run_dir / "trainable.safetensors", dist_.is_main,
                        {"task": cfg.task, "methods": ",".join(m["name"] for m in cfg.methods)})
    if dist_.is_main:
        print(f"[dstune] run dir: {run_dir}", flush=True)
