"""The loop of a job of several adapters: each step, each adapter's micro-batches are the rows a run of its
own would take that step, computed with it routed in (methods/routing.py); one backward over the sum of
their losses (each the token mean over its own targets in the global batch) gives each adapter's parameters
the gradient of its own loss alone. Before the optimizer steps, each adapter's gradients are clipped to its
own norm and checked finite for its own nan_policy; an adapter that skips a step or has finished is held out
of the step, so its weights, optimizer state and schedule stay as they are. Each adapter evaluates, keeps
its best state, stops early and ends in its own run dir."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from dstune.data.batching import to_device
from dstune.engine import checkpoint as ckpt
from dstune.engine.adapters import Adapter, Shared
from dstune.engine.distributed import mean_over_ranks
from dstune.engine.evaluate import evaluate, results_table
from dstune.engine.held_out import HeldOut, results_columns
from dstune.engine.train_run import (MAX_SKIPPED_IN_A_ROW, Job, engine_bytes, interrupted_at, seed_step,
                                     share_of_global, write_memory)
from dstune.errors import UserError, signal_number
from dstune.methods.base import base_model_only
from dstune.methods.routing import draws_dropout, rng_state, route, route_rows, row_local, set_rng_state
from dstune.rundir import pointer
from dstune.rundir.trainable import BEST, TRAINABLE, save_safetensors
from dstune.tasks import get_task


class AdapterRun:
    """One adapter's side of the loop: its targets counter, log, held-out scores and results, best state and
    whether it is done."""

    def __init__(self, adapter: Adapter, job: Job, loop: "AdaptersRun"):
        self.a, self.job = adapter, job
        self.task = get_task(adapter.cfg.task)
        self.methods = loop.shared.methods + adapter.methods  # what its own run applies
        self.held = HeldOut(adapter.cfg, adapter.data, job.dist, job.step, lambda: loop.evaluate(self),
                            lambda step: loop.save_trainable(self, BEST, {"step": step}))
        self.log = self.held.log
        self.stopped = self.held.earlier.get("stopped_early")  # the step its early stopping ended it at
        self.bad_in_a_row = 0
        self.lr, self.tokens = 0.0, 0.0
        self.skipped = self.held.earlier.get("skipped_steps", 0)  # steps whose update it skipped (nan_policy skip)
        self.skipped_now = False
        first = any(m.first_label_is_target for m in self.methods)
        labeled = all(s.labeled for s in adapter.cfg.data.sources())
        self.count_targets = None if not self.task.generative and labeled else \
            (lambda rows: self.task.target_tokens(rows, first_label_is_target=first))

    def last_step(self) -> int:
        return self.stopped or self.a.total_steps

    def trains_at(self, step: int) -> bool:
        return step < self.last_step()


class AdaptersRun:
    """The loop of a started job of several adapters."""

    def __init__(self, job: Job, adapters: list[Adapter], shared: Shared, training):
        self.job, self.cfg, self.engine = job, job.cfg, job.engine
        self.run_dir = Path(job.cfg.output_dir)
        self.step = job.step
        self.shared, self.shared_t = shared, training  # the shared methods' parameters; the job's clip, nan_policy
        self.runs = [AdapterRun(a, job, self) for a in adapters]
        self.dropout = draws_dropout(job.engine.module)

    def run(self) -> dict:
        """Train every adapter to its last step; {"steps", "adapters": {name: its results}}."""
        from tqdm.auto import tqdm

        job, t = self.job, self.cfg.training
        job.memory.mark("init")
        try:
            for r in self.runs:
                self.evaluate_before(r)
                if not r.trains_at(self.step):  # a resumed job: it finished before
                    self.hold(r)
            if not any(r.trains_at(self.step) for r in self.runs) and job.dist.is_main:
                print(f"[dstune] {self.run_dir} already holds this job, every adapter trained to its last step: "
                      "nothing to do (train longer with a larger training.max_steps, or start over with "
                      "training.resume=false)", flush=True)
            self.engine.train()
            self.bar = tqdm(total=job.total_steps, initial=self.step, disable=not job.dist.is_main, desc="train",
                            dynamic_ncols=True)
            while any(r.trains_at(self.step) for r in self.runs):
                losses = self.train_step()
                for r in self.runs:
                    if r.a.name in losses:
                        self.after_step(r, losses[r.a.name])
                self.bar.update(1)
                self.bar.set_postfix_str(" ".join(f"{n}={v:.3f}" for n, v in losses.items()), refresh=False)
                if self.due(t.checkpoint_every) or not any(r.trains_at(self.step) for r in self.runs) and t.save_final:
                    ckpt.save_checkpoint(self.engine, str(self.run_dir), self.step, job.dist.is_main,
                                         t.keep_checkpoints)
            self.bar.close()
            if t.measure_memory != "off":
                write_memory(job, "phase_peaks", job.memory.report())
            return self.finish()
        except KeyboardInterrupt as stop:
            if bar := getattr(self, "bar", None):
                bar.close()
            raise interrupted_at(str(self.run_dir), self.step, job.total_steps, signal_number(stop)) from None
        finally:
            for r in self.runs:
                r.log.close()

    def train_step(self) -> dict[str, float]:
        """One optimizer step of every adapter still training: {name: its loss (mean over ranks)}."""
        job, t = self.job, self.cfg.training
        training = [r for r in self.runs if r.trains_at(self.step)]
        lrs = {g["dstune_adapter"]: g["lr"] for g in reversed(self.engine.basic_optimizer.param_groups)}
        for r in training:
            r.lr = lrs.get(r.a.name, lrs.get(""))  # this step's rate: its first param group's (none: the shared)
        seed_step(t.seed, self.step, job.dist.rank)
        rng = {r.a.name: rng_state() for r in training}  # dropout: each adapter draws as its own run would
        targets = {r.a.name: self.global_targets(r) for r in training}
        micro = {r.a.name: [[r.a.data.train[i] for i in m] for m in r.a.batches.for_step(self.step)] for r in training}
        for r in training:  # input tokens of its global batch: this rank's, times the ranks (as a run of its own logs)
            r.tokens = mean_over_ranks(sum(len(row["input_ids"]) for rows in micro[r.a.name] for row in rows),
                                       job.dist.device) * job.dist.world
        sums = dict.fromkeys(micro, 0.0)
        started = time.perf_counter()
        groups = self.forward_groups(training)
        for j in range(t.gradient_accumulation_steps):
            total = 0
            for group in groups:
                for name, loss in self.forward_group(group, {r.a.name: micro[r.a.name][j] for r in group}, targets,
                                                     rng):
                    sums[name] += loss.item()
                    total = total + loss
            job.memory.mark("forward")
            self.engine.backward(total)
            job.memory.mark("backward")
            if self.engine.is_gradient_accumulation_boundary():
                self.clip_and_hold(training, sums)
            self.engine.step()
            job.memory.mark("step")
        self.seconds = time.perf_counter() - started
        self.step += 1
        if self.step == job.step + 1 and t.measure_memory != "off":
            write_memory(job, "after_first_step", engine_bytes(self.engine))
        accum, device = t.gradient_accumulation_steps, job.dist.device
        return {name: mean_over_ranks(s / accum, device) for name, s in sums.items()}

    def global_targets(self, r: AdapterRun) -> int:
        if r.count_targets is None:
            return 0
        return r.count_targets([r.a.data.train[i]["labels"] for i in r.a.batches.global_step(self.step)])

    def forward_groups(self, training: list[AdapterRun]) -> list[list[AdapterRun]]:
        """Adapters whose rows share one forward: the row-local ones (routing.row_local) whose rows batch
        alike (packed or not); each other adapter (a soft prompt, a prefix), and every adapter of a model
        that draws dropout (routing.draws_dropout), runs forwards of its own. Adapters of different tasks
        (or classes) never share a forward."""
        shared: dict[tuple, list[AdapterRun]] = {}
        alone = []
        sharing = not self.dropout
        for r in training:  # one forward computes one task's rows, batched alike, into logits of one shape
            if sharing and row_local(self.engine.module, r.a.name):
                shared.setdefault((r.task.name, len(r.a.data.labels or ()),
                                   "position_ids" in r.a.data.train.column_names), []).append(r)
            else:
                alone.append([r])
        return list(shared.values()) + alone

    def forward_group(self, group: list[AdapterRun], rows: dict[str, list[dict]], targets: dict[str, int],
                      rng: dict) -> list[tuple[str, torch.Tensor]]:
        """One forward over the group's micro-batches, each adapter over its own rows: (name, its loss,
        weighted as a run of its own weights it) per adapter. Alone, an adapter draws its dropout as its own
        run would (a shared forward draws none), and a generative one's loss is the model's own; a classifier's
        is computed from its logits (its head may be of its own shape, or beside a causal LM's)."""
        model, task, first = self.engine.module, group[0].task, group[0].a.name
        segments, start = [], 0
        for r in group:
            segments.append((r.a.name, start, start + len(rows[r.a.name])))
            start = segments[-1][2]
        batch = self.batch(group[0], [row for r in group for row in rows[r.a.name]])
        models_loss = len(group) == 1 and task.generative and task.name == self.cfg.task
        labels = batch["labels"] if task.forward_takes_labels or models_loss else batch.pop("labels")
        with route(model, first) if len(group) == 1 else route_rows(model, segments):
            set_rng_state(rng[first])
            out = self.engine(**batch)
            rng[first] = rng_state()
        if models_loss:
            return [(first, self.weighted(group[0], rows[first], out.loss, out.logits, targets[first]))]
        return [(r.a.name, self.weighted(r, rows[r.a.name], task.loss(model, out.logits[s:e], labels[s:e]),
                                         out.logits[s:e], targets[r.a.name])) for r, (_, s, e) in zip(group, segments)]

    def batch(self, r: AdapterRun, rows: list[dict]) -> dict:
        return to_device(r.task.collate(rows, self.pad_id), self.job.dist.device, r.task)

    def weighted(self, r: AdapterRun, rows: list[dict], loss: torch.Tensor, logits: torch.Tensor,
                 global_targets: int) -> torch.Tensor:
        """An adapter's micro-batch loss (the mean over its targets), weighted as a run of its own weights it
        (engine/train_run.py): its share of its global batch's targets."""
        if r.count_targets is None:
            return loss
        mine = r.count_targets([row["labels"] for row in rows])
        return loss * share_of_global(mine, global_targets, r.a.batches) if mine else logits.sum() * 0.0

    def clip_and_hold(self, training: list[AdapterRun], sums: dict[str, float]) -> None:
        """Per adapter (and for the shared methods' parameters): its gradient norm over its own parameters (the
        shares every rank holds, one all-reduce for all), not finite, or its loss not finite on any rank (the
        shared ones: any adapter's): its update is skipped (nan_policy skip) or the job stops (stop); else
        clipped to its max_grad_norm, as DeepSpeed clips a run of its own. Adapters not training this step
        are held out of it."""
        import torch.distributed as dist

        device = self.job.dist.device
        owners = [(r.a.name, r.a.params) for r in training] + ([("", self.shared.params)] if self.shared.params else [])
        parts = {name: [(p, local_grad(p)) for p in params] for name, params in owners}
        squares = [sum(float(g.float().pow(2).sum()) for _, g in parts[name] if g is not None) for name, _ in owners]
        bad = [float(not math.isfinite(sums[r.a.name])) for r in training]
        stats = torch.tensor([squares, bad + [max(bad)] * (len(owners) - len(training))], device=device)
        dist.all_reduce(stats[0])  # partitioned: the shares add up; replicated (ZeRO-0): each rank holds it all
        dist.all_reduce(stats[1], op=dist.ReduceOp.MAX)
        split = any(partitioned(p) for _, params in owners for p in params)
        norms = (stats[0] / (1 if split else self.job.dist.world)).sqrt().tolist()
        held = {r.a.name for r in self.runs} - {r.a.name for r in training}
        for i, ((name, _), norm, loss_bad) in enumerate(zip(owners, norms, stats[1].tolist())):
            r = training[i] if i < len(training) else None
            if loss_bad or not math.isfinite(norm):
                self.refuse_or_skip(r, sums[r.a.name] if r else float("nan"))
                scale_local_grads(parts[name], 0.0)  # ZeRO's own overflow check must not skip the others
                held.add(name)
                continue
            if r is not None:
                r.bad_in_a_row, r.skipped_now = 0, False
            (r.a.schedule if r else self.shared.schedule).applied += 1
            max_norm = (r.a.cfg.training if r else self.shared_t).max_grad_norm
            if max_norm > 0 and (coef := max_norm / (norm + 1e-6)) < 1:
                scale_local_grads(parts[name], coef)
        for group in self.engine.basic_optimizer.param_groups:
            group["dstune_hold"] = group["dstune_adapter"] in held

    def refuse_or_skip(self, r: AdapterRun | None, loss: float) -> None:
        """An adapter's (None: the shared methods') update is skipped this step, or the job stops with one line."""
        if r is None:
            self.shared.skipped += 1
            if self.shared_t.nan_policy == "skip":
                return
            raise UserError(f"shared_methods: a loss is not finite at step {self.step + 1}; stopped without saving "
                            "the weights")
        r.bad_in_a_row += 1
        r.skipped += 1
        r.skipped_now = True
        if r.a.cfg.training.nan_policy == "skip" and r.bad_in_a_row < MAX_SKIPPED_IN_A_ROW:
            return
        self.bar.close()
        last = pointer.last_complete(str(self.run_dir))
        raise UserError(f"adapters ({r.a.name}): the loss is {loss} at step {self.step + 1}"
                        + (f" ({MAX_SKIPPED_IN_A_ROW} steps in a row)" if r.bad_in_a_row > 1 else "")
                        + "; stopped without saving the weights" + (f" (the last complete checkpoint, {last}, is "
                                                                    "kept: rerun to resume from it)" if last else ""))

    def hold(self, r: AdapterRun) -> None:
        """Keep a finished adapter out of every later optimizer step."""
        for group in self.engine.basic_optimizer.param_groups:
            if group["dstune_adapter"] == r.a.name:
                group["dstune_hold"] = True

    def after_step(self, r: AdapterRun, loss: float) -> None:
        """The adapter's metric line, evaluation every N steps (best state, early stopping), and its end."""
        ev, t = r.a.cfg.evaluation, r.a.cfg.training
        r.held.results["skipped_steps"] = r.skipped
        if r.skipped_now:  # strict JSON: a loss that is not finite is left out
            r.log.write(self.step, "train", {"skipped": True, **({"loss": loss} if math.isfinite(loss) else {})})
        elif self.step % t.log_every == 0 or self.step == r.last_step():
            # tokens: the adapter's own in its global batch; tokens_per_s: over the job's step (all adapters')
            r.log.write(self.step, "train", {"loss": loss, "lr": r.lr, "step_s": self.seconds, "tokens": r.tokens,
                                             "tokens_per_s": r.tokens / self.seconds})
        if ev.every and self.step % ev.every == 0 and r.a.data.eval is not None and self.step < r.last_step():
            r.held.now(self.step)
            if (best := r.held.best) is not None and best.exhausted():
                r.stopped = r.held.results["stopped_early"] = self.step
                if self.job.dist.is_main:
                    print(f"[dstune] {r.a.name}: early stopping at step {self.step} of {r.a.total_steps}: "
                          f"{best.watch.metric} has not improved on step {best.step}'s {best.value:.4g}", flush=True)
        if self.step == r.last_step():
            self.end(r)

    def evaluate(self, r: AdapterRun) -> dict[str, float]:
        with route(self.engine.module, r.a.name):
            return evaluate(self.engine, r.a.data, r.a.cfg, self.job.tokenizer, self.job.dist)

    def evaluate_before(self, r: AdapterRun) -> None:
        r.held.before(self.step, any(m.changes_output_at_init for m in r.methods),
                      lambda: base_model_only(self.engine.module))

    def end(self, r: AdapterRun) -> None:
        """The adapter's last step: evaluate, write its results and its trainable weights; hold it from now on."""
        r.held.after(self.step)
        if r.a.cfg.training.save_final:
            self.save_trainable(r, TRAINABLE, {})
        self.hold(r)

    def save_trainable(self, r: AdapterRun, file: str, extra: dict) -> None:
        """The adapter's trained state under the names a run of its own gives it (every rank takes part)."""
        names = {**dict.fromkeys(self.shared.names), **r.a.names}  # the shared methods' keep their names
        mine = {n: p for n, p in self.engine.module.named_parameters() if n in names}
        state = ckpt.trainable_state_of(mine)
        if self.job.dist.is_main:
            meta = {"task": r.a.cfg.task, "methods": ",".join(m["name"] for m in r.a.cfg.methods), **extra}
            save_safetensors({names[n] or n: v for n, v in state.items()}, r.a.run_dir / file, meta)

    def finish(self) -> dict:
        """Each adapter's results table and the job's results.json."""
        summary = {"steps": self.step, "adapters": {r.a.name: r.held.results for r in self.runs}}
        if self.job.dist.is_main:
            for r in self.runs:
                if "after" in r.held.results:
                    print(f"[dstune] {r.a.name} ({r.a.run_dir}):\n{results_table(results_columns(r.held.results))}",
                          flush=True)
            (self.run_dir / "results.json").write_text(json.dumps(summary, indent=1))
            print(f"[dstune] run dirs: {self.run_dir / 'adapters'}/{{{','.join(r.a.name for r in self.runs)}}}",
                  flush=True)
        return summary

    def due(self, every: int) -> bool:
        return bool(every) and self.step % every == 0

    @property
    def pad_id(self) -> int:
        return self.job.tokenizer.pad_token_id if self.job.tokenizer is not None else 0


def partitioned(p: torch.nn.Parameter) -> bool:
    """Whether each rank holds a share of the parameter's gradient (ZeRO 1-3, the bf16 optimizer)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def local_grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's share of `p`'s reduced gradient, between the backward and the step: under ZeRO-3 its
    partition, under ZeRO-1/2 and the bf16 optimizer its fragment in this rank's flat partition (None when
    the rank holds none of it), else the whole gradient. No collective: ranks may hold different shares."""
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_local_grad
        return safe_get_local_grad(p)
    if hasattr(p, "_hp_mapping"):
        if p._hp_mapping is None:
            return None
        fragment = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)
        address = p._hp_mapping.lp_fragment_address
        if fragment.numel() == p.numel() and address.numel != p.numel():  # a full buffer on every rank (bf16)
            fragment = fragment.view(-1).narrow(0, address.start, address.numel)
        return fragment
    return p.grad


def scale_local_grads(parts: list[tuple[torch.nn.Parameter, torch.Tensor | None]], coef: float) -> None:
    """Multiply this rank's shares of these gradients by `coef` (0: set them to zero, NaN or not) where the
    optimizer reads them."""
    for p, g in parts:
        if g is None:
            continue
        scaled = torch.zeros_like(g) if coef == 0 else g * coef
        if hasattr(p, "ds_id"):
            from deepspeed.utils import safe_set_local_grad
            safe_set_local_grad(p, scaled)
        else:
            g.copy_(scaled)
