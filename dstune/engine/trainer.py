"""The training recipe, top to bottom: resolve the `auto` settings, check everything that can be checked
before anything is written, start the process group and build the model with its methods, write the run
header, start the DeepSpeed engine (and resume), then run the loop (`TrainRun`, engine/train_run.py).

Features: any task (classification / causal_lm / seq2seq), any tuning method mix, DeepSpeed ZeRO 0-3
with offload, fp32/bf16/fp16, gradient accumulation, warmup + linear/cosine schedule, clipping,
activation checkpointing, distillation, exact resume from the last complete checkpoint, metrics to
JSONL, TensorBoard, W&B and MLflow, tqdm progress on rank 0, and a `trainable.safetensors` of what trained.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from dstune.config import RunConfig, dump_config
from dstune.data.batching import StepBatches
from dstune.engine import checkpoint as ckpt
from dstune.distill.teacher import load_teacher
from dstune.engine.reference_logps import precompute_reference
from dstune.preference.objective import Objective, Precomputed, load_reference, preference_line, reference_choice
from dstune.engine.distributed import barrier, init_distributed, launcher_env, stop_signals
from dstune.engine.ds_config import build_ds_config, zero_stage
from dstune.engine.precision import on_cuda, resolve, slow_warning, unsupported
from dstune.engine.evaluate import results_table
from dstune.engine.held_out import results_columns
from dstune.engine.train_run import Job, TrainRun
from dstune.errors import Interrupted, UserError, signal_number
from dstune.methods import apply_methods, build_methods, count_trainable, param_groups
from dstune.models.loading import (base_fingerprint, check_buildable, check_positions, compile_layers, load_model,
                                   new_weights_line, prepare_for_training, quantize_mode, recipe_config,
                                   weights_dtype)
from dstune.models.quantize import check_quantized_base
from dstune.models.tokenizers import recipe_tokenizer
from dstune.prepare.cache import keep_augmented, prepared_data, summary
from dstune.prepare.pipeline import TaskData
from dstune.rundir import pointer
from dstune.rundir.as_base import base_from_run
from dstune.rundir.trainable import TRAINABLE
from dstune.rundir.lock import (check_output_dir, check_recipe_matches, forget_fresh_run_dir, fresh_run_dir,
                                hold_run_dir)
from dstune.telemetry.phases import NoMemory, PhaseMemory

# (cfg, world, device, tokenizer, labels) -> (on, why): decides activation checkpointing `auto`
Checkpointing = Callable[[RunConfig, int, torch.device, Any, "list | None"], "tuple[bool, str]"]


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
    `planning.fit.resolve_checkpointing`, which asks the memory estimate)."""
    setting = cfg.training.activation_checkpointing
    if setting == "auto":
        raise UserError("training.activation_checkpointing: auto needs the memory estimate; run through `dstune train`")
    return bool(setting), ""


def train(cfg: RunConfig, checkpointing: Checkpointing = recipe_checkpointing) -> dict:
    """Run one fine-tuning job described by `cfg` on whatever ranks the launcher started (or in this process
    alone); returns the run's results (results.json). A job that fails before its engine has started leaves
    no run dir behind (nor the files `dstune launch` put in a new one). `checkpointing` decides activation
    checkpointing `auto` (the CLI hands in the estimate-based one: the engine does not import planning)."""
    if cfg.adapters:  # several adapters over one base: engine/adapters.py
        from dstune.engine.adapters import train_adapters
        return train_adapters(cfg, checkpointing)
    run_dir = Path(cfg.output_dir)
    fresh = fresh_run_dir(run_dir)
    with launcher_env(), stop_signals():
        try:
            checked = check(cfg, checkpointing)
            if checked.finished is not None:
                return _say_finished(checked)
            job = start(checked)
        except BaseException as failure:
            if fresh and _rank() == 0:
                forget_fresh_run_dir(run_dir)
            if isinstance(failure, KeyboardInterrupt):
                raise Interrupted("interrupted before the first step; nothing trained", signal_number(failure)) \
                    from None
            raise
        with job:  # from here on the run dir holds this run's work, kept whatever happens
            return TrainRun(job).run()


@dataclass
class Checked:
    """A recipe with its `auto` settings made concrete, and everything read and checked before the process
    group starts or anything is written."""
    cfg: RunConfig
    methods: list
    tokenizer: Any
    data: TaskData
    data_entry: Path | None   # the prepared cache entry (None: random data)
    resume_from: list[str]    # complete checkpoints to resume from, newest first
    base: str                 # the base model's fingerprint (run.json; checked on resume)
    precision_note: str       # e.g. "bf16 (auto: measured bf16 at 1.6x ...)" for `auto`, else the precision
    checkpointing_note: str   # why `auto` turned activation checkpointing on or off ("" when not auto)
    finished: dict | None = None  # the results of the run dir, when it already holds this recipe's last step
    quantize: str | None = None   # how the base is held quantized (model.quantize, or its checkpoint's)


def check(cfg: RunConfig, checkpointing: Checkpointing) -> Checked:
    """Resolve `training.precision` and `training.activation_checkpointing` (the run dir's config.yaml says
    what ran), read the tokenizer and the prepared data, and check the DeepSpeed config, the run dir, the
    model's config and a resume's checkpoints and recipe: each can refuse the job with one line before the
    process group starts or anything is written."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cfg = base_from_run(cfg, local_rank, cfg.training.dist_timeout_s)  # model.path: a run dir (SFT -> DPO)
    precision, why = resolve(cfg.training.precision)
    auto = cfg.training.precision == "auto"
    if refused := unsupported(precision):
        raise UserError(refused)
    if not auto and (slow := slow_warning(precision)) and _rank() == 0:
        print(f"[dstune] warning: {slow}", file=sys.stderr, flush=True)
    cfg = cfg.with_training(precision=precision)
    methods = build_methods(cfg.methods)
    if _rank() != 0:
        _mute_progress_bars()  # one rank's bars are enough: no tokenize/load bars in the others' logs
    tokenizer = recipe_tokenizer(cfg)
    data, entry = prepared_data(cfg, tokenizer, local_rank, cfg.training.dist_timeout_s)
    build_ds_config(cfg, 1)  # a bad DeepSpeed config is refused before the process group starts
    device = torch.device("cuda", local_rank) if on_cuda() else torch.device("cpu")
    on, ckpt_why = checkpointing(cfg, int(os.environ.get("WORLD_SIZE", "1")), device, tokenizer, data.labels)
    cfg = cfg.with_training(activation_checkpointing=on)
    if cfg.evaluation.watched() and data.eval is None:
        raise UserError("evaluation.keep_best: the best state is chosen on held-out rows; set data.eval or "
                        "data.eval_fraction" if cfg.evaluation.early_stopping is None else
                        "evaluation.early_stopping: it watches held-out rows; set data.eval or data.eval_fraction")
    check_output_dir(Path(cfg.output_dir))
    if cfg.preference:
        reference_choice(cfg, methods)
    model_config = recipe_config(cfg, tokenizer, data.labels)
    if quantized := quantize_mode(cfg, model_config):
        check_quantized_base(quantized, methods, weights_dtype(precision), device)
    check_positions(cfg, model_config)
    check_buildable(cfg, model_config)
    tags = pointer.complete_checkpoints(cfg.output_dir) if cfg.training.resume else []  # and a bad pointer
    base = base_fingerprint(cfg)
    if tags:
        check_recipe_matches(Path(cfg.output_dir), cfg.model_dump(mode="json"), base)
    return Checked(cfg, methods, tokenizer, data, entry, tags, base, f"{precision} ({why})" if auto else precision,
                   f"activation checkpointing {'on' if on else 'off'} ({ckpt_why})" if ckpt_why else "",
                   _finished(cfg, len(data.train)) if tags else None, quantized)


def planned_steps(cfg: RunConfig, batches: StepBatches) -> int:
    """The run's last optimizer step: training.max_steps, else its epochs of global batches."""
    return cfg.training.max_steps or math.ceil(cfg.training.epochs * batches.steps_per_epoch)


def _finished(cfg: RunConfig, n_train: int) -> dict | None:
    """The results of a run dir that already trained this recipe to its last step and wrote what it keeps
    (results.json's step count, trainable.safetensors), else None."""
    t, run_dir = cfg.training, Path(cfg.output_dir)
    batches = StepBatches(n_train, t.micro_batch_size, t.gradient_accumulation_steps,
                          int(os.environ.get("WORLD_SIZE", "1")), 0, t.seed)
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    done = "stopped_early" in results or (batches.steps_per_epoch and results.get("steps") == planned_steps(cfg, batches))
    return results if done and (not t.save_final or (run_dir / TRAINABLE).is_file()) else None


def _say_finished(c: Checked) -> dict:
    """A rerun of a finished run: say so and where its results are, instead of loading and evaluating again."""
    run_dir, results = Path(c.cfg.output_dir), c.finished
    if _rank() == 0:
        table = results_table(results_columns(results))
        print(f"[dstune] {run_dir} already holds this recipe's run, trained to its last step ({results['steps']}"
              f"{', stopped early' if 'stopped_early' in results else ''}): "
              f"nothing to do. Its results ({run_dir / 'results.json'}):\n{table}\n"
              "[dstune] train longer with a larger training.max_steps, or start over with training.resume=false",
              flush=True)
    return results


def start(c: Checked) -> Job:
    """Join the process group, build the model with its methods, write the run header and start the engine,
    resumed from the newest checkpoint every rank can read. A single-process job that fails on the way
    leaves no process group, lock or engine behind."""
    dist_ = init_distributed(c.cfg.training.dist_timeout_s, c.cfg.training.build_timeout_s)
    c = _agree_on_precision(c, dist_)
    job = Job(cfg=c.cfg, dist=dist_, methods=c.methods, tokenizer=c.tokenizer, data=c.data)
    try:
        tag = first_checkpoint_and_memory(c.cfg, c.resume_from, job)
        build(c, job)
        job.lock = _write_run_header(c, job)
        job.engine, job.scheduler = _initialize(c, job)
        if job.objective is not None and isinstance(job.objective.reference, Precomputed):
            precompute_reference(job, c.data_entry, c.base)  # with the model as built: before a resume loads
        resume(job, c.cfg.output_dir, tag)
        return job
    except BaseException:
        job.release(failed=True)
        raise


def first_checkpoint_and_memory(cfg: RunConfig, resume_from: list[str], job: Job) -> str | None:
    """The newest of the complete checkpoints every rank can read (None: a fresh start), and the job's
    memory recorder as training.measure_memory asks."""
    dist_ = job.dist
    measure = cfg.training.measure_memory
    job.memory = PhaseMemory(dist_.device, device_sampler=measure == "device") if measure != "off" else NoMemory()
    return ckpt.first_readable(cfg.output_dir, resume_from, dist_.rank, dist_.world) if resume_from else None


def resume(job: Job, run_dir: str, tag: str | None) -> None:
    """Load checkpoint `tag` into the started engine (none: a fresh start) and say so."""
    if tag:
        job.step = ckpt.load_checkpoint(job.engine, run_dir, tag)
        if job.dist.is_main:
            print(f"[dstune] resumed from {tag} (step {job.step})", flush=True)


def _agree_on_precision(c: Checked, dist_) -> Checked:
    """Every rank trains in rank 0's precision: on CPUs, `auto` is measured per machine (engine/cpu_probe.py),
    and ranks on two machines may have measured differently."""
    if dist_.world == 1 or on_cuda():
        return c
    import torch.distributed as dist

    chosen = [c.cfg.training.precision]
    dist.broadcast_object_list(chosen, src=0)
    if chosen[0] == c.cfg.training.precision:
        return c
    print(f"[dstune] rank {dist_.rank}: training.precision auto came out {c.cfg.training.precision} on this machine, "
          f"{chosen[0]} on rank 0's; all ranks train in {chosen[0]}", file=sys.stderr, flush=True)
    return replace(c, cfg=c.cfg.with_training(precision=chosen[0]),
                               precision_note=f"{chosen[0]} (auto: rank 0's)")


def build(c: Checked, job: Job) -> None:
    """The DeepSpeed config, the batches, the teacher and the model with its methods: all but the engine."""
    from transformers.integrations import HfDeepSpeedConfig

    cfg, t, dist_ = c.cfg, c.cfg.training, job.dist
    job.ds_config = build_ds_config(cfg, dist_.world)
    job.batches = StepBatches(len(c.data.train), t.micro_batch_size, t.gradient_accumulation_steps, dist_.world,
                              dist_.rank, t.seed)
    if job.batches.steps_per_epoch == 0:
        raise UserError(f"data.train: {len(c.data.train)} examples are fewer than one global batch "
                        f"(micro_batch_size × gradient_accumulation_steps × ranks = {job.batches.global_batch})")
    job.total_steps = planned_steps(cfg, job.batches)
    if t.profile_step > job.total_steps:
        raise UserError(f"training.profile_step: {t.profile_step} is past the run's last step ({job.total_steps})")
    job.stage = zero_stage(job.ds_config)
    # the teacher first: a run-dir teacher is built whole before ZeRO-3's partitioned loading is switched on
    if cfg.distill:
        job.teacher = load_teacher(cfg, c.tokenizer, c.data.labels, job.ds_config, job.stage, dist_.device)
    if cfg.preference:  # a reference of its own (copy, a folder) is loaded like the teacher
        job.objective = Objective(cfg.preference, load_reference(cfg, reference_choice(cfg, c.methods), c.tokenizer,
                                                                 job.ds_config, job.stage, dist_.device))
    # ZeRO-3 creates loaded weights partitioned (transformers sees the config object while it is alive: the job
    # keeps it). A random model.tiny is built whole instead and partitioned by deepspeed.initialize: zero.Init
    # draws random weights in another order, and the run dir must rebuild the base that trained (models/loading.py);
    # so is a quantized base: each rank quantizes the layers as they load, deepspeed.initialize partitions them
    if job.stage == 3 and not cfg.model.tiny and not c.quantize:
        job.hf_ds_config = HfDeepSpeedConfig(job.ds_config)
    torch.manual_seed(t.seed)
    job.model = load_model(cfg, c.tokenizer, c.data.labels, dist_.device)
    job.base_params = count_trainable(job.model)[1]  # the model before methods add any
    apply_methods(job.model, c.methods, cfg.task, c.tokenizer, c.data.leading_inputs)
    prepare_for_training(job.model, cfg)
    job.compiled = compile_layers(job.model, job.stage) if t.compile else 0


def _write_run_header(c: Checked, job: Job) -> int | None:
    """Lock the run dir (rank 0, until the run ends: the descriptor is returned) and write what describes the
    run: config.yaml, the tokenizer, run.json, data.augment's copies; then print the start-up lines."""
    run_dir, cfg, dist_ = Path(c.cfg.output_dir), c.cfg, job.dist
    barrier()
    lock = hold_run_dir(run_dir) if dist_.is_main else None
    barrier()
    if not dist_.is_main:
        return None
    n_train, n_total = count_trainable(job.model)
    dump_config(cfg, run_dir / "config.yaml")
    if c.tokenizer is not None:
        c.tokenizer.save_pretrained(run_dir / "tokenizer")
    labels = [str(x) for x in c.data.labels] if c.data.labels else None
    (run_dir / "run.json").write_text(json.dumps(
        {"task": cfg.task, "labels": labels, "methods": [m.name for m in c.methods], "trainable_params": n_train,
         "total_params": n_total, "base_params": job.base_params, "base_fingerprint": c.base,
         "world_size": dist_.world, "zero_stage": job.stage}, indent=1))
    keep_augmented(c.data_entry, run_dir)
    for line in _start_lines(c, job, n_train, n_total):
        print(f"[dstune] {line}", flush=True)
    return lock


def _start_lines(c: Checked, job: Job, n_train: int, n_total: int) -> list[str]:
    """What rank 0 says before the first step: the data, new weights, what trains where and how, why
    activation checkpointing `auto` came out as it did, the teacher."""
    names = ", ".join(m.label for m in c.methods)
    lines = [f"data: {summary(c.data, c.data_entry)}"]
    if new := new_weights_line(job.model):
        lines.append(new)
    lines.append(f"{names}: {n_train:,} of {n_total:,} parameters train ({100 * n_train / n_total:.2f}%); "
                 f"{job.dist.world} rank(s), ZeRO-{job.stage}, {c.precision_note}, {job.total_steps} steps of "
                 f"{job.batches.global_batch} examples" + (f"; {job.compiled} layers compiled" if job.compiled else ""))
    if c.checkpointing_note:
        lines.append(c.checkpointing_note)
    if d := c.cfg.distill:
        lines.append(f"distilling from {d.teacher} ({d.divergence}, T {d.temperature:g}, alpha {d.alpha:g})")
    if p := c.cfg.preference:
        lines.append(preference_line(p, reference_choice(c.cfg, c.methods), names))
    return lines


def _initialize(c: Checked, job: Job):
    """deepspeed.initialize over the methods' parameter groups, with the recipe's schedule: (engine, scheduler)."""
    import deepspeed

    t = c.cfg.training
    groups = [{k: v for k, v in g.items() if k != "names"}
              for g in param_groups(job.model, c.methods, t.lr, t.weight_decay)]
    engine, _, _, scheduler = deepspeed.initialize(
        model=job.model, model_parameters=groups, config=job.ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(t.lr_schedule, t.warmup_steps, job.total_steps)))
    return engine, scheduler


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _mute_progress_bars() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
