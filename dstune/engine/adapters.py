"""A job of several named adapters over one base (`adapters:` in a recipe): checked, built and started like a
run of one (engine/trainer.py), with one model, one DeepSpeed engine and one checkpoint for all of them.

Each adapter is the run its own recipe describes (`RunConfig.adapter_runs`, written to
output_dir/adapters/NAME/config.yaml): its methods are applied over the base as that run applies them
(methods/routing.py), its rows are the ones that run's data order gives each step, and its parameters are
optimizer param groups of their own, with its learning rate, betas, weight decay and schedule. The loop is
engine/adapters_run.py.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dstune.config import RunConfig, dump_config
from dstune.data.batching import StepBatches
from dstune.engine.distributed import barrier, init_distributed, launcher_env, stop_signals
from dstune.engine.ds_config import build_ds_config, zero_stage
from dstune.engine.precision import on_cuda, resolve, slow_warning, unsupported
from dstune.engine.train_run import Job
from dstune.engine.trainer import (Checkpointing, _agree_on_precision, _mute_progress_bars, first_checkpoint_and_memory,
                                   lr_lambda, planned_steps, resume)
from dstune.errors import Interrupted, UserError, signal_number
from dstune.methods import (AdapterSpec, apply_adapter_methods, build_methods, check_composition, count_trainable,
                            param_groups)
from dstune.methods.heads import check_decoder_classifier
from dstune.methods.routing import SLOTS, adapter_state_names
from dstune.models.loading import (base_fingerprint, check_buildable, check_positions, load_model, prepare_for_training,
                                   quantize_mode, recipe_config, weights_dtype)
from dstune.models.quantize import check_quantized_base
from dstune.models.tokenizers import recipe_tokenizer
from dstune.prepare.cache import keep_augmented, prepared_data, summary
from dstune.rundir import pointer
from dstune.rundir.as_base import base_from_run
from dstune.rundir.lock import (check_output_dir, check_recipe_matches, forget_fresh_run_dir, fresh_run_dir,
                                hold_run_dir)


@dataclass
class Adapter:
    """One adapter of the job: its own recipe (a run of its own), methods, data, batches and schedule."""
    name: str
    cfg: RunConfig
    methods: list
    data: Any                          # TaskData
    entry: Path | None                 # its prepared cache entry
    batches: StepBatches | None = None
    total_steps: int = 0               # its last step (training.max_steps, else its epochs)
    schedule: Any = None               # its Schedule (the LR multiplier of its param groups)
    names: dict[str, str] = field(default_factory=dict)  # its parameters: job model name -> its own run's name
    params: list = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output_dir)


@dataclass
class Shared:
    """The shared methods' parameters (shared_methods): one param group set trained on every adapter's rows,
    with the job's lr, schedule over the job's steps, gradient clipping and nan_policy."""
    methods: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)       # their parameters' names (its own run's too)
    params: list = field(default_factory=list)
    schedule: Any = None
    skipped: int = 0


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())


class Schedule:
    """An adapter's LR multiplier: warm-up and decay over the steps whose update it applied (a skipped or
    finished adapter's schedule stands still, as a run of its own does)."""

    def __init__(self, schedule: str, warmup: int, total: int):
        self.schedule, self.warmup, self.total, self.applied = schedule, warmup, total, 0

    def __call__(self, _: int) -> float:
        return lr_lambda(self.schedule, self.warmup, self.total)(self.applied)


class AdapterLR(torch.optim.lr_scheduler.LambdaLR):
    """Each param group's rate follows its adapter's Schedule; a checkpoint keeps how many updates each
    applied (the plan itself, its warm-up and last step, comes from the recipe on a resume)."""

    def state_dict(self) -> dict:
        return {**super().state_dict(), "lr_lambdas": [{"applied": fn.applied} for fn in self.lr_lambdas]}


@dataclass
class CheckedAdapters:
    cfg: RunConfig                     # the job's recipe, `auto` settings made concrete
    engine_cfg: RunConfig              # what the DeepSpeed config is built from (micro-batch: every adapter's rows)
    adapters: list[Adapter]
    tokenizer: Any
    shared: list                       # the shared methods (shared_methods), on the base
    model_cfg: RunConfig               # the recipe the base model is built from (an adapter of the model's task)
    labels: list | None                # its classifier head's classes
    resume_from: list[str]
    base: str
    precision_note: str
    quantize: str | None = None


def train_adapters(cfg: RunConfig, checkpointing: Checkpointing) -> dict:
    """`dstune train` of a recipe with `adapters:`: every adapter trained in one job; returns
    {"steps": the job's, "adapters": {name: its results}} (also output_dir/results.json)."""
    from dstune.engine.adapters_run import AdaptersRun

    run_dir = Path(cfg.output_dir)
    fresh = fresh_run_dir(run_dir)
    with launcher_env(), stop_signals():
        try:
            checked = check_adapters(cfg, checkpointing)
            job, adapters, shared = start_adapters(checked)
        except BaseException as failure:
            if fresh and int(os.environ.get("RANK", "0")) == 0:
                forget_fresh_run_dir(run_dir)
            if isinstance(failure, KeyboardInterrupt):
                raise Interrupted("interrupted before the first step; nothing trained", signal_number(failure)) \
                    from None
            raise
        with job:
            return AdaptersRun(job, adapters, shared, checked.cfg.training).run()


def check_adapters(cfg: RunConfig, checkpointing: Checkpointing) -> CheckedAdapters:
    """Each adapter's recipe, methods and prepared data; the shared settings, the DeepSpeed config, the run
    dir and a resume's recipe: a one-line refusal before the process group starts or anything is written."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cfg = base_from_run(cfg, local_rank, cfg.training.dist_timeout_s)
    precision, why = resolve(cfg.training.precision)
    if refused := unsupported(precision):
        raise UserError(refused)
    if precision == "fp16":
        raise UserError("training.precision: fp16 with adapters is not supported (one loss scale cannot serve "
                        "adapters that each skip their own overflowing steps); use bf16 or fp32")
    if cfg.training.precision != "auto" and (slow := slow_warning(precision)) and local_rank == 0:
        print(f"[dstune] warning: {slow}", file=sys.stderr, flush=True)
    cfg = cfg.with_training(precision=precision)
    if int(os.environ.get("RANK", "0")) != 0:
        _mute_progress_bars()
    tokenizer = recipe_tokenizer(cfg)
    adapters = [_checked_adapter(cfg, i, name, run, tokenizer, local_rank)
                for i, (name, run) in enumerate(cfg.adapter_runs())]
    try:
        shared = build_methods(cfg.shared_methods) if cfg.shared_methods else []
    except UserError as e:
        raise UserError(f"shared_{e}") from None
    builds = next(a for a in adapters if a.cfg.task == cfg.model_task())  # the base is built as its model
    model_cfg, labels = builds.cfg, builds.data.labels
    rows = sum(a.cfg.training.micro_batch_size for a in adapters)
    engine_cfg = cfg.model_copy(update={"task": cfg.model_task()}).with_training(micro_batch_size=rows,
                                   max_grad_norm=0.0)  # each adapter clips its own gradients (adapters_run.py)
    build_ds_config(engine_cfg, 1)
    device = torch.device("cuda", local_rank) if on_cuda() else torch.device("cpu")
    on, _ = checkpointing(engine_cfg, int(os.environ.get("WORLD_SIZE", "1")), device, tokenizer, labels)
    model_cfg = model_cfg.with_training(precision=precision, activation_checkpointing=on)
    cfg, engine_cfg = cfg.with_training(activation_checkpointing=on), engine_cfg.with_training(
        activation_checkpointing=on)
    adapters = [replace(a, cfg=a.cfg.with_training(precision=precision, activation_checkpointing=on))
                for a in adapters]
    check_output_dir(Path(cfg.output_dir))
    model_config = recipe_config(model_cfg, tokenizer, labels)
    if quantized := quantize_mode(cfg, model_config):
        check_quantized_base(quantized, shared + [m for a in adapters for m in a.methods], weights_dtype(precision),
                             device)
    for a in adapters:
        check_positions(a.cfg, model_config)
    check_buildable(model_cfg, model_config)
    if model_cfg.task != "classification" and any(a.cfg.task == "classification" for a in adapters):
        check_decoder_classifier(model_config, cfg.model.trust_remote_code)
    tags = pointer.complete_checkpoints(cfg.output_dir) if cfg.training.resume else []
    base = base_fingerprint(cfg)
    if tags:
        check_recipe_matches(Path(cfg.output_dir), cfg.model_dump(mode="json"), base)
    return CheckedAdapters(cfg, engine_cfg, adapters, tokenizer, shared, model_cfg, labels, tags, base,
                           f"{precision} ({why})" if cfg.training.precision == "auto" else precision, quantized)


def _checked_adapter(cfg: RunConfig, i: int, name: str, run: RunConfig, tokenizer, local_rank: int) -> Adapter:
    where = f"adapters[{i}] ({name})"
    own = cfg.own_methods(cfg.adapters[i])
    if not own and not cfg.shared_methods:
        raise UserError(f"{where}.methods: list at least one tuning method (or give the job shared_methods)")
    try:
        methods = build_methods(own) if own else []
        check_composition([s["name"] for s in cfg.shared_methods or []] + [m.name for m in methods])
    except UserError as e:
        raise UserError(f"{where}.{e}") from None
    try:
        data, entry = prepared_data(run, tokenizer, local_rank, run.training.dist_timeout_s)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if run.evaluation.watched() and data.eval is None:
        raise UserError(f"{where}.evaluation: keep_best and early_stopping choose on held-out rows; set its "
                        "data.eval or data.eval_fraction")
    return Adapter(name, run, methods, data, entry)


def start_adapters(c: CheckedAdapters) -> tuple[Job, list[Adapter], Shared]:
    """Join the process group, build the model with every adapter, write the run headers and start the
    engine, resumed from the newest checkpoint every rank can read."""
    dist_ = init_distributed(c.cfg.training.dist_timeout_s, c.cfg.training.build_timeout_s)
    agreed = _agree_on_precision(c, dist_)
    if (precision := agreed.cfg.training.precision) != c.cfg.training.precision:  # every rank trains in rank 0's
        agreed = replace(agreed, engine_cfg=agreed.engine_cfg.with_training(precision=precision),
                         adapters=[replace(a, cfg=a.cfg.with_training(precision=precision)) for a in agreed.adapters])
    c = agreed
    job = Job(cfg=c.engine_cfg, dist=dist_, methods=c.shared + [m for a in c.adapters for m in a.methods],
              tokenizer=c.tokenizer, data=None)
    try:
        tag = first_checkpoint_and_memory(c.cfg, c.resume_from, job)
        shared = Shared(c.shared)
        _build(c, job, shared)
        job.lock = _write_headers(c, job, shared)
        job.engine, job.scheduler = _initialize(c, job, shared)
        resume(job, c.cfg.output_dir, tag)
        return job, c.adapters, shared
    except BaseException:
        job.release(failed=True)
        raise


def _build(c: CheckedAdapters, job: Job, shared: Shared) -> None:
    """The DeepSpeed config, every adapter's batches and the model with every adapter applied."""
    from transformers.integrations import HfDeepSpeedConfig

    t, dist_ = c.cfg.training, job.dist
    job.ds_config = build_ds_config(c.engine_cfg, dist_.world)
    for a in c.adapters:
        at = a.cfg.training
        a.batches = StepBatches(len(a.data.train), at.micro_batch_size, t.gradient_accumulation_steps, dist_.world,
                                dist_.rank, t.seed)
        if a.batches.steps_per_epoch == 0:
            raise UserError(f"adapters ({a.name}).data.train: {len(a.data.train)} examples are fewer than one of its "
                            f"global batches ({a.batches.global_batch})")
        a.total_steps = planned_steps(a.cfg, a.batches)
        a.schedule = Schedule(at.lr_schedule, at.warmup_steps, a.total_steps)
    job.total_steps = max(a.total_steps for a in c.adapters)
    job.stage = zero_stage(job.ds_config)
    if job.stage == 3 and not c.cfg.model.tiny and not c.quantize:
        job.hf_ds_config = HfDeepSpeedConfig(job.ds_config)
    torch.manual_seed(t.seed)
    job.model = load_model(c.model_cfg, c.tokenizer, c.labels, dist_.device)
    job.base_params = count_trainable(job.model)[1]
    specs = {a.name: AdapterSpec(a.methods, a.cfg.task, a.data.labels, a.data.leading_inputs) for a in c.adapters}
    apply_adapter_methods(job.model, specs, c.shared, c.model_cfg.task, t.seed, c.tokenizer)
    named = dict(job.model.named_parameters())
    shared.names = [n for n, p in named.items() if p.requires_grad and SLOTS not in n.split(".")]
    shared.schedule = Schedule(t.lr_schedule, t.warmup_steps, job.total_steps)  # over the job's steps
    for a in c.adapters:
        a.names = adapter_state_names(job.model, a.name)
        a.params = [named[n] for n in a.names]
    prepare_for_training(job.model, c.engine_cfg)


def _initialize(c: CheckedAdapters, job: Job, shared: Shared):
    """deepspeed.initialize over every adapter's param groups (its lr, betas, eps, weight decay) and the shared
    methods' (the job's), each group's LR following its adapter's schedule (the shared: the job's); the base
    optimizer steps only the groups not held back."""
    import deepspeed

    groups, schedules = [], []
    owners = [(a.name, a.cfg.training, a.methods, a.names.__contains__, a.schedule) for a in c.adapters]
    if c.shared:
        owners.insert(0, ("", c.cfg.training, c.shared, set(shared.names).__contains__, shared.schedule))
    for name, t, methods, only, schedule in owners:
        for g in param_groups(job.model, methods, t.lr, t.weight_decay, only=only):
            groups.append({**{k: v for k, v in g.items() if k != "names"}, "betas": tuple(t.betas), "eps": t.eps,
                           "dstune_adapter": name})
            schedules.append(schedule)
            if not name:
                shared.params += g["params"]
    engine, _, _, scheduler = deepspeed.initialize(
        model=job.model, model_parameters=groups, config=job.ds_config,
        lr_scheduler=lambda opt: AdapterLR(_hold_back_groups(opt), schedules))
    return engine, scheduler


def _hold_back_groups(optimizer):
    """The optimizer's step leaves out the param groups marked `dstune_hold` (an adapter that skips this step
    or has finished): their weights and optimizer state stay exactly as they are. ZeRO-3 steps one
    sub-group at a time through the same call."""
    import types

    step = optimizer.step

    def step_without_held(self, *args, **kwargs):
        held = [(g, g["params"]) for g in optimizer.param_groups if g.get("dstune_hold")]
        for g, _ in held:
            g["params"] = []
        try:
            return step(*args, **kwargs)
        finally:
            for g, params in held:
                g["params"] = params
    optimizer.step = types.MethodType(step_without_held, optimizer)  # a bound method, as LambdaLR expects
    return optimizer


def _write_headers(c: CheckedAdapters, job: Job, shared: Shared) -> int | None:
    """Lock the job's run dir (rank 0) and write its config.yaml, and each adapter's run dir header as a run
    of its own writes it (config.yaml, tokenizer, run.json); then the start-up lines."""
    run_dir, dist_ = Path(c.cfg.output_dir), job.dist
    barrier()
    lock = hold_run_dir(run_dir) if dist_.is_main else None
    barrier()
    if not dist_.is_main:
        return None
    dump_config(c.cfg, run_dir / "config.yaml")
    total = count_trainable(job.model)[1] - sum(p.numel() for a in c.adapters for p in a.params)
    (run_dir / "run.json").write_text(json.dumps(
        {"task": c.cfg.task, "adapters": [a.name for a in c.adapters], "base_fingerprint": c.base,
         "base_params": job.base_params, "world_size": dist_.world, "zero_stage": job.stage}, indent=1))
    print(f"[dstune] {len(c.adapters)} adapters over one base ({job.base_params:,} parameters); {dist_.world} "
          f"rank(s), ZeRO-{job.stage}, {c.precision_note}, {job.total_steps} steps", flush=True)
    named = dict(job.model.named_parameters())
    n_shared = sum(_numel(named[n]) for n in shared.names)
    if c.shared:
        print(f"[dstune] shared: {', '.join(m.label for m in c.shared)}: {n_shared:,} parameters train on every "
              f"adapter's rows; lr {c.cfg.training.lr:g}", flush=True)
    for a in c.adapters:
        a.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(a.cfg, a.run_dir / "config.yaml")
        if c.tokenizer is not None:
            c.tokenizer.save_pretrained(a.run_dir / "tokenizer")
        own = sum(_numel(p) for p in a.params)
        labels = [str(x) for x in a.data.labels] if a.data.labels else None
        (a.run_dir / "run.json").write_text(json.dumps(
            {"task": a.cfg.task, "labels": labels, "methods": [m.name for m in c.shared + a.methods],
             "trainable_params": own + n_shared, "total_params": total + own, "base_params": job.base_params,
             "base_fingerprint": c.base, "world_size": dist_.world, "zero_stage": job.stage,
             "trained_in": str(run_dir), "planned_steps": a.total_steps}, indent=1))
        keep_augmented(a.entry, a.run_dir)
        names = ", ".join(m.label for m in a.methods) or ("its head" if a.cfg.task == "classification" else
                                                          "the shared methods only")
        print(f"[dstune] {a.name} ({a.cfg.task}): {names}: {own:,} parameters train; {a.total_steps} steps of "
              f"{a.batches.global_batch} examples, lr {a.cfg.training.lr:g}; data: {summary(a.data, a.entry)}",
              flush=True)
    return lock
