"""The loop of a started job: `TrainRun` owns the step counter, the progress bar, the metric log and the
results, and reads as the loop reads: evaluate before, then step, check the loss is finite, log, evaluate
every N steps, save every N steps; evaluate after, report, save what trained."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dstune.config import RunConfig
from dstune.data.batching import StepBatches, to_device
from dstune.engine import checkpoint as ckpt
from dstune.engine.best import Best
from dstune.engine.held_out import HeldOut, results_columns
from dstune.engine.distributed import Dist, mean_over_ranks, shutdown
from dstune.engine.evaluate import evaluate, results_table
from dstune.errors import Interrupted, UserError, signal_number
from dstune.methods.base import base_model_only
from dstune.preference.objective import Tally
from dstune.rundir import pointer
from dstune.rundir.trainable import BEST, TRAINABLE
from dstune.tasks import get_task
from dstune.telemetry.phases import NoMemory
from dstune.telemetry.step_profile import StepProfile

MAX_SKIPPED_IN_A_ROW = 8  # with nan_policy=skip: more means the weights are broken, not a batch or two


@dataclass
class Job:
    """A training job on its ranks: what `engine/trainer.py` built and started. A context manager: leaving it
    releases the engine, the process group, the memory sampler and the run dir's lock."""
    cfg: RunConfig
    dist: Dist
    methods: list
    tokenizer: Any
    data: Any                      # TaskData
    memory: Any = field(default_factory=NoMemory)  # PhaseMemory, or NoMemory with measure_memory off
    model: Any = None
    engine: Any = None
    scheduler: Any = None
    ds_config: dict = field(default_factory=dict)
    hf_ds_config: Any = None       # transformers' HfDeepSpeedConfig under ZeRO-3: partitioned loading while alive
    batches: StepBatches | None = None
    total_steps: int = 0
    stage: int = 0                 # ZeRO stage
    teacher: Any = None            # distill.teacher.Teacher
    objective: Any = None          # preference.objective.Objective (task preference)
    base_params: int = 0           # the model's parameters before methods added any
    compiled: int = 0              # layers torch.compile'd
    step: int = 0                  # the optimizer step to continue from
    lock: int | None = None        # rank 0's descriptor holding the run dir's lock

    def __enter__(self) -> Job:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.release(failed=error is not None)

    def release(self, failed: bool = False) -> None:
        """Stop the memory sampler, release the engine and process group and unlock the run dir. After a
        failure only a single-process job tears the process group down: the ranks of a failed multi-rank
        job exit instead (a collective teardown could wait on a dead peer)."""
        self.memory.close()
        if self.hf_ds_config is not None:  # transformers would load the next model in this process partitioned
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config
            unset_hf_deepspeed_config()
            self.hf_ds_config = None
        if not failed or self.dist.world == 1:
            shutdown(self.engine)
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


@dataclass
class StepResult:
    """One optimizer step, as every rank sees it (means over ranks)."""
    loss: float                    # the mixed loss that trains (with a teacher: task and divergence)
    lr: float                      # the learning rate the step's update used (the schedule moves after it)
    distill: float | None          # the divergence term alone, with a teacher
    tokens: float                  # input tokens of the global batch
    seconds: float
    skipped: bool                  # the optimizer dropped the update (non-finite gradients)
    metrics: dict = field(default_factory=dict)  # what the objective logs besides the loss (preference)


class TrainRun:
    """The loop of one started job."""

    def __init__(self, job: Job):
        self.job, self.cfg, self.engine = job, job.cfg, job.engine
        self.run_dir = Path(job.cfg.output_dir)
        self.task = get_task(job.cfg.task)
        self.step = job.step
        self.bad_in_a_row = 0
        self.count_targets = self._target_counter()
        self.held = HeldOut(job.cfg, job.data, job.dist, job.step, self.evaluate, self._save_best)
        self.log = self.held.log

    @property
    def results(self) -> dict:
        """results.json as this process knows it (engine/held_out.py)."""
        return self.held.results

    @property
    def best(self) -> Best | None:
        return self.held.best

    def run(self) -> dict:
        """Train to the last step; the results (results.json) with the before/after evaluations."""
        from tqdm.auto import tqdm

        job, t = self.job, self.cfg.training
        job.memory.mark("init")
        try:
            self.evaluate_before()
            self.engine.train()
            self.bar = tqdm(total=job.total_steps, initial=self.step, disable=not job.dist.is_main, desc="train",
                            dynamic_ncols=True)
            self.profiler = StepProfile(t.profile_step, self.run_dir / "profile", job.dist.rank, job.dist.is_main)
            while self.step < job.total_steps:
                result = self.train_step()
                self.check_finite(result)
                self.log_step(result)
                if self.due(self.cfg.evaluation.every) and job.data.eval is not None and self.step < job.total_steps:
                    self.evaluate_now()
                    self.engine.train()
                    if self.best is not None and self.best.exhausted():
                        break
                if self.due(t.checkpoint_every) or (self.step == job.total_steps and t.save_final):
                    self.save()
            self.bar.close()
            if self.best is not None and self.best.exhausted():
                self.stop_early()
                if t.save_final:  # the state it stopped in, as at the last step: a rerun finds the run complete
                    self.save()
            self.evaluate_after()
            self.finish()
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (engine/distributed.py stop_signals)
            raise self.interrupted(signal_number(stop)) from None
        finally:
            self.log.close()
        return self.results

    def interrupted(self, signum: int) -> Interrupted:
        """The one line a stopped job ends with: where it stopped and what a rerun does."""
        if bar := getattr(self, "bar", None):
            bar.close()
        return interrupted_at(self.cfg.output_dir, self.step, self.job.total_steps, signum)

    def train_step(self) -> StepResult:
        """One optimizer step over this rank's micro-batches of the global batch."""
        job, t = self.job, self.cfg.training
        seed_step(t.seed, self.step, job.dist.rank)
        lr = job.scheduler.get_last_lr()[0]
        started = time.perf_counter()
        loss_sum, kd_sum, tokens, tally = 0.0, 0.0, 0, Tally()
        global_ix = job.batches.global_step(self.step)
        # the supervised loss (and a preference objective's NLL term) is the token mean over the global
        # batch's targets: of a kto batch, the rows labelled good
        global_targets = self.count_targets([r["labels"] for r in map(job.data.train.__getitem__, global_ix)
                                             if r.get("desirable", 1)]) if self.count_targets else 0
        micro_rows = [[job.data.train[i] for i in micro] for micro in job.batches.for_step(self.step)]
        with self.profiler.around(self.step + 1):
            if job.objective is not None:
                job.objective.start_step(self.engine, [self.batch(rows) for rows in micro_rows], len(global_ix))
            for rows in micro_rows:
                tokens += sum(len(r["input_ids"]) for r in rows)  # no padding; no wait for the device
                loss, kd = self.forward(rows, global_targets, tally)
                with self.profiler.phase("backward"):
                    self.engine.backward(loss)
                job.memory.mark("backward")
                loss_sum, kd_sum = loss_sum + loss.item(), kd_sum + kd
                skipped_before = self.engine.skipped_steps
                with self.profiler.phase("step"), self._skip_guard(loss_sum):
                    self.engine.step()
                job.memory.mark("step")
        self.step += 1
        if self.step == job.step + 1 and t.measure_memory != "off":
            reference = {"reference_bytes": job.objective.reference.held_bytes()} \
                if job.objective is not None and job.objective.reference is not None else {}
            write_memory(job, "after_first_step", {**engine_bytes(self.engine), **reference})
        accum, device = t.gradient_accumulation_steps, job.dist.device
        metrics = job.objective.metrics(tally.reduced(device)) if job.objective is not None else {}
        return StepResult(loss=mean_over_ranks(loss_sum / accum, device), lr=lr,
                          distill=mean_over_ranks(kd_sum / accum, device) if job.teacher else None,
                          tokens=mean_over_ranks(tokens, device) * job.dist.world,
                          seconds=time.perf_counter() - started,
                          skipped=self.engine.skipped_steps > skipped_before,  # the optimizer's: same on every rank
                          metrics={k: v for k, v in metrics.items() if k != "loss"})

    def batch(self, rows: list[dict]) -> dict:
        """Rows as forward() inputs on this rank's device."""
        return to_device(self.task.collate(rows, self.pad_id), self.job.dist.device, self.task)

    def forward(self, rows: list[dict], global_targets: int, tally: Tally) -> tuple[torch.Tensor, float]:
        """One micro-batch's loss, weighted so that the step's gradient is that of the global batch's mean
        (and mixed with the teacher's divergence); (loss, divergence). A preference objective logs into
        `tally`."""
        job = self.job
        batch = self.batch(rows)
        kd = 0.0
        with self.profiler.phase("forward"):
            if job.objective is not None:  # its pair mean is right as it is; its NLL term is a token mean
                scale = job.batches.accum * job.batches.world / max(global_targets, 1)
                loss = job.objective.loss(self.engine, batch, scale, tally)
                job.memory.mark("forward")
                return loss, kd
            out = self.engine(**batch)
            loss, weight = out.loss, 1.0
            if self.count_targets:
                # the model's loss is this micro-batch's mean over its targets (tokens; labelled rows); weighted
                # by its share of the global batch's targets (× accum × ranks, which DeepSpeed's averaging
                # divides out again), the step's gradient is that of the global batch's mean
                mine = self.count_targets([r["labels"] for r in rows])
                weight = share_of_global(mine, global_targets, job.batches)
                loss = loss * weight if mine else out.logits.sum() * 0.0  # no targets: no 0/0 mean
            if job.teacher is not None:
                # the divergence: a mean over the same targets (generative), or over every row, labelled or
                # not (classification: equal micro-batches make the plain mean right)
                divergence = job.teacher.divergence(out.logits, batch) * (weight if self.task.generative else 1.0)
                loss = (1 - job.teacher.alpha) * loss + job.teacher.alpha * divergence
                kd = divergence.item()
        job.memory.mark("forward")
        return loss, kd

    def check_finite(self, result: StepResult) -> None:
        """Stop the run (every rank: they all see the same mean and the same skip) on a loss that is not
        finite, unless nan_policy=skip had the optimizer drop the update (at most MAX_SKIPPED_IN_A_ROW times)."""
        policy = self.cfg.training.nan_policy
        self.bad_in_a_row = 0 if math.isfinite(result.loss) else self.bad_in_a_row + 1
        if not self.bad_in_a_row or (policy == "skip" and result.skipped
                                     and self.bad_in_a_row < MAX_SKIPPED_IN_A_ROW):
            return
        self.bar.close()  # the error gets a line of its own
        last = pointer.last_complete(self.cfg.output_dir)
        why = ("" if policy == "stop" else f" ({MAX_SKIPPED_IN_A_ROW} steps in a row)" if result.skipped
               else " and the optimizer applied the update")
        raise UserError(f"training: the loss is {result.loss} at step {self.step}{why}; stopped without saving the "
                        "weights it updated" + (f" (the last complete checkpoint, {last}, is kept: rerun to resume "
                                                "from it, e.g. with a lower training.lr)" if last
                                                else " (lower training.lr?)"))

    def log_step(self, result: StepResult) -> None:
        """metrics.jsonl and the trackers (every log_every steps, the last and every skipped one), the bar."""
        self.results["skipped_steps"] = self.engine.skipped_steps  # kept in checkpoints: counts since the start
        if result.skipped:  # strict JSON: a loss that is not finite is left out
            self.log.write(self.step, "train", {"skipped": True, **({"loss": result.loss}
                                                                     if math.isfinite(result.loss) else {})})
        elif self.due(self.cfg.training.log_every) or self.step == self.job.total_steps:
            # with a teacher, `loss` is the mixed loss that trains; `distill` its divergence term alone
            kd = {"distill": result.distill} if result.distill is not None else {}
            self.log.write(self.step, "train", {"loss": result.loss, **kd, **result.metrics, "lr": result.lr,
                                                "step_s": result.seconds, "tokens": result.tokens,
                                                "tokens_per_s": result.tokens / result.seconds})
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{result.loss:.4f}", skipped=self.results["skipped_steps"], refresh=False)

    def evaluate(self) -> dict[str, float]:
        """The held-out metrics now (every rank takes part)."""
        job = self.job
        return evaluate(self.engine, job.data, self.cfg, job.tokenizer, job.dist, objective=job.objective)

    def evaluate_now(self) -> dict[str, float]:
        return self.held.now(self.step)

    def _save_best(self, step: int) -> None:
        ckpt.save_trainable(self.engine.module, self.run_dir / BEST, self.job.dist.is_main,
                            {**self._trainable_meta(), "step": step})

    def stop_early(self) -> None:
        """End training here: early stopping's patience is used up."""
        best, watch = self.best, self.best.watch
        self.results["stopped_early"] = self.step
        if self.job.dist.is_main:
            print(f"[dstune] early stopping at step {self.step} of {self.job.total_steps}: {watch.metric} has not "
                  f"improved on step {best.step}'s {best.value:.4g} for {best.since} evaluations (patience "
                  f"{watch.patience})", flush=True)

    def evaluate_before(self) -> None:
        self.held.before(self.step, any(m.changes_output_at_init for m in self.job.methods),
                         lambda: base_model_only(self.engine.module))

    def evaluate_after(self) -> None:
        self.held.after(self.step)

    def save(self) -> None:
        """A DeepSpeed checkpoint of what trains, every rank; the pointer moves once all have written."""
        t = self.cfg.training
        ckpt.save_checkpoint(self.engine, self.cfg.output_dir, self.step, self.job.dist.is_main, t.keep_checkpoints)

    def finish(self) -> None:
        """Phase peaks into memory.json, the results table, and trainable.safetensors of what trained."""
        job = self.job
        if self.cfg.training.measure_memory != "off":
            write_memory(job, "phase_peaks", job.memory.report())
        if job.dist.is_main and "after" in self.results:
            n = len(job.data.eval)
            where = f"data.eval, {n:,} rows" if self.cfg.data.eval else f"{n:,} held-out rows"
            print(f"[dstune] results ({where}):\n{results_table(results_columns(self.results))}", flush=True)
        if self.cfg.training.save_final:
            ckpt.save_trainable(self.engine.module, self.run_dir / TRAINABLE, job.dist.is_main,
                                self._trainable_meta())
            if job.dist.is_main:
                print(f"[dstune] run dir: {self.run_dir}", flush=True)

    def _trainable_meta(self) -> dict:
        return {"task": self.cfg.task, "methods": ",".join(m["name"] for m in self.cfg.methods)}

    def due(self, every: int) -> bool:
        """Whether an every-N-steps action (N > 0) falls on this step."""
        return bool(every) and self.step % every == 0

    @functools.cached_property
    def pad_id(self) -> int:
        return self.job.tokenizer.pad_token_id if self.job.tokenizer is not None else 0  # random data: no padding

    def _target_counter(self):
        """Counts a batch's targets, for the token mean over the whole global batch: generative tasks
        (target tokens) and classification with unlabelled rows (labelled rows); None where the plain mean
        is right (one label per example, equal-sized micro-batches)."""
        if not self.task.generative and all(s.labeled for s in self.cfg.data.sources()):
            return None
        return functools.partial(self.task.target_tokens, first_label_is_target=any(
            m.first_label_is_target for m in self.job.methods))

    def _skip_guard(self, loss_sum: float):
        if self.cfg.training.nan_policy == "skip" and self.engine.is_gradient_accumulation_boundary():
            return skip_if_not_finite(self.engine, loss_sum, self.job.dist.device)
        return contextlib.nullcontext()


def interrupted_at(run_dir: str, step: int, total: int, signum: int) -> Interrupted:
    """The one line a stopped job ends with: where it stopped and what a rerun does."""
    last = pointer.last_complete(run_dir)
    rerun = (f"the last checkpoint is step {pointer.step_of(last)}: rerun the same command to resume from it"
             if last else "no checkpoint was written yet (training.checkpoint_every): a rerun starts over")
    return Interrupted(f"interrupted at step {step + 1} of {total}; {rerun}", signum)


def share_of_global(mine: int, global_targets: int, batches: StepBatches) -> float:
    """The weight of a micro-batch's mean loss over its `mine` targets: its share of the global batch's
    targets × accumulation × ranks (which DeepSpeed's averaging divides out again)."""
    return mine / max(global_targets, 1) * batches.accum * batches.world


def seed_step(seed: int, step: int, rank: int) -> None:
    """Dropout & co. draw from a stream fixed by (seed, step, rank), so a resumed run repeats them exactly."""
    torch.manual_seed(seed * 1_000_003 + step * 1_009 + rank)


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


def write_memory(job: Job, key: str, mine: dict) -> None:
    """memory.json[key]: one entry per rank (after_first_step: engine bytes; phase_peaks: PhaseMemory)."""
    import torch.distributed as dist

    ranks = [None] * job.dist.world
    dist.all_gather_object(ranks, {"rank": job.dist.rank, **mine})
    if job.dist.is_main:
        path = Path(job.cfg.output_dir) / "memory.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**current, key: ranks}, indent=1))
