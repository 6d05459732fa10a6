"""Per-rank memory a run will need, by part, from the model config alone (no weights loaded).

PEFT-aware: frozen parameters hold weights only; gradients, fp32 master copies and Adam moments
exist for trainable parameters alone. Model-state terms follow the ZeRO paper (mixed-precision
Adam: 2Ψ weights + 2Ψ gradients + 12Ψ optimizer states = 16Ψ bytes per trainable parameter),
sharded by stage, with DeepSpeed's own padding rules so the numbers match its tensors exactly.
Activations are not a rule of thumb: one training step of the recipe's model is traced on fake tensors
(`dstune.planning.activations`), so what frozen layers, the loss and checkpointing save comes out as is.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch

from dstune.config import RunConfig
from dstune.engine.ds_config import build_ds_config, zero_stage
from dstune.engine.precision import resolve
from dstune.errors import UserError, first_line
from dstune.families import config_family, num_layers
from dstune.methods import AdapterSpec, apply_adapter_methods, apply_methods, build_methods, param_groups
from dstune.methods.routing import SLOTS, adapter_state_names, route_rows, row_local
from dstune.models import quantize
from dstune.models.loading import auto_class, prepare_for_training, quantize_mode, recipe_config, weights_dtype
from dstune.planning.activations import ActivationTrace, default_dtype, trace_step
from dstune.planning.flops import flops_per_token
from dstune.tasks import get_task

ZERO12_ALIGNMENT = 2  # DeepSpeed pads each flat ZeRO-1/2 group to a multiple of 2 × ranks elements


@dataclass
class MemoryEstimate:
    rank: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int        # peak of the traced forward + backward: saved activations and backward temporaries
    buffers: int
    step_temporaries: int   # alive only inside the optimizer step, when the activations are gone
    teacher_weights: int = 0      # distill: the frozen teacher's weights (ZeRO-3: this rank's partitions)
    teacher_activations: int = 0  # distill: its logits for a micro-batch, alive beside the student's activations
    reference_weights: int = 0    # preference.reference copy or a model: its frozen weights (ZeRO-3: partitions)

    @property
    def total(self) -> int:
        """The peak: model states and buffers, plus the larger of the activations and the step's temporaries."""
        return (self.weights + self.gradients + self.optimizer_states + self.buffers + self.teacher_weights
                + self.reference_weights + max(self.activations + self.teacher_activations, self.step_temporaries))

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


@dataclass
class ParamTable:
    """What the estimate needs to know about the parameters: sizes, which train, in which optimizer group."""
    frozen: list[int]                 # numel of each frozen parameter (quantized layers' weights aside)
    groups: list[list[int]]           # numel of each trainable parameter, per optimizer param group
    quantized: list[tuple[int, int]] = field(default_factory=list)  # (weights, rows) of each quantized layer
    mode: str | None = None           # model.quantize (or the checkpoint's)

    @property
    def trainable(self) -> int:
        return sum(sum(g) for g in self.groups)

    @property
    def total(self) -> int:
        return self.trainable + sum(self.frozen) + sum(n for n, _ in self.quantized)

    def quantized_bytes(self, precision: str, shards: int) -> int:
        """What the quantized layers hold on one rank (models/quantize.py `held_bytes`)."""
        b = bytes_per_element(precision)
        return sum(quantize.held_bytes(self.mode, n, rows, b, shards) for n, rows in self.quantized)


def bytes_per_element(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def model_state_bytes(table: ParamTable, stage: int, world: int, precision: str,
                      offload_optimizer: bool = False, offload_params: bool = False) -> tuple[int, int, int]:
    """(weights, gradients, optimizer_states) bytes on one rank's device.

    b = 2 (bf16/fp16) or 4 (fp32) bytes per element; Ψ_T trainable, Ψ_F frozen elements; W ranks.
      stage 0: weights b(Ψ_T+Ψ_F); grads b·Ψ_T; optimizer 8Ψ_T (+4Ψ_T fp32 master and 4Ψ_T fp32 grads if b=2)
      stage 1: weights b(Ψ_F + pad(Ψ_T)); grads b·Ψ_T (whole, before the reduce); optimizer 12·pad(Ψ_T)/W
      stage 2: as stage 1, but grads b·pad(Ψ_T)/W
      stage 3: every parameter split in W: weights b·Σ⌈n/W⌉; grads b·Σ_T⌈n/W⌉; optimizer 12·Σ_T⌈n/W⌉
    pad(Ψ) rounds each optimizer group up to a multiple of 2W, as DeepSpeed's flat buffers do. An fp32
    run keeps a separate fp32 master copy under ZeRO 1-3 too, so optimizer states are 12 bytes either way.
    Offloaded optimizer states (and, under ZeRO-3, parameters) live in CPU memory and count 0 here.
    """
    b = bytes_per_element(precision)
    T, F = table.trainable, sum(table.frozen)
    if stage == 0:
        optim = 8 * T + (8 * T if b == 2 else 0)
        weights, grads = b * (T + F), b * T
    elif stage in (1, 2):
        align = ZERO12_ALIGNMENT * world
        padded = sum(math.ceil(sum(g) / align) * align for g in table.groups)
        weights = b * (F + padded)
        grads = b * T if stage == 1 else b * padded // world
        optim = 12 * padded // world
    elif stage == 3:
        def shard(n: int) -> int:
            return math.ceil(n / world)
        trainable_shards = sum(shard(n) for g in table.groups for n in g)
        weights = b * (trainable_shards + sum(shard(n) for n in table.frozen))
        grads = b * trainable_shards
        optim = 12 * trainable_shards
        if offload_params:
            weights = 0
    else:
        raise UserError(f"deepspeed: zero_optimization.stage must be 0-3, got {stage}")
    if offload_optimizer:
        optim = 0
    # a quantized base is partitioned by ZeRO-3 like any frozen weight, replicated by ZeRO 0-2
    weights += table.quantized_bytes(precision, world if stage == 3 else 1)
    return weights, grads, optim


def checkpoint_bytes(table: ParamTable, stage: int, world: int, precision: str) -> int:
    """Bytes of one checkpoint on disk, all ranks' files together: only what trains is saved (the frozen base
    is reloaded from model.path). The module's trainable weights in the training dtype (under ZeRO-3 they
    are partitions, saved with the optimizer state instead), plus the optimizer state as the engine holds it
    (model_state_bytes): Adam's m and v, and the fp32 master copy except for ZeRO-0 in fp32."""
    b = bytes_per_element(precision)
    _, _, optim = model_state_bytes(table, stage, world, precision)
    return (0 if stage == 3 else b * table.trainable) + optim * (world if stage else 1)


def step_temporary_bytes(table: ParamTable, stage: int, world: int, precision: str, ds_config: dict) -> int:
    """What DeepSpeed's optimizer step allocates on top of the model states, one optimizer group at a time.

    ZeRO-1/2 flatten the group's gradient partition (b bytes per element) and cast it to fp32 for the
    optimizer (4 more, unless it already is fp32); ZeRO-3 casts each sub-group (`sub_group_size`) to fp32.
    Stage 0 keeps its fp32 gradients for good (counted in optimizer_states).
    """
    b = bytes_per_element(precision)
    z = ds_config.get("zero_optimization", {})
    if z.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme"):
        return 0  # the fp32 copy is made in CPU memory
    if stage in (1, 2):
        align = ZERO12_ALIGNMENT * world
        largest = max((math.ceil(sum(g) / align) * align // world for g in table.groups), default=0)
        return largest * (b + (4 if b != 4 else 0))
    if stage == 3:
        shard = sum(math.ceil(n / world) for g in table.groups for n in g)
        return 4 * min(shard, int(float(z.get("sub_group_size", 1e9))))
    return 0


def rule_of_thumb_activation_bytes(config: Any, micro_batch: int, seq_len: int, precision: str,
                                   checkpointing: bool) -> int:
    """Fallback for models the fake-tensor trace cannot run: Korthikanti et al. (2022) without the S² term,
    ≈ 34·s·b·h bytes per layer in 16-bit (×2 in fp32), only each layer's input (2·s·b·h) plus one layer with
    checkpointing, plus the logits with transformers' loss (2 + 4 bytes per logit in 16-bit). Blind to
    frozen layers, MLP width and GQA: expect tens of percent off."""
    h, layers = _hidden(config), num_layers(config)
    scale = bytes_per_element(precision) / 2
    per_layer = 34 * seq_len * micro_batch * h * scale
    body = layers * 2 * seq_len * micro_batch * h * scale + per_layer if checkpointing else layers * per_layer
    logits = seq_len * micro_batch * getattr(config, "vocab_size", 0) * (bytes_per_element(precision) + 4)
    return int(body + logits)


def zero12_bucket_bytes(ds_config: dict, precision: str) -> int:
    """ZeRO-1/2 gradient buckets: with contiguous gradients (the default) DeepSpeed allocates one bucket of
    `reduce_bucket_size` elements, two with `overlap_comm`, whatever the number of trainable parameters."""
    z = ds_config.get("zero_optimization", {})
    if not z.get("contiguous_gradients", True):
        return 0
    buffers = 2 if z.get("overlap_comm", False) else 1
    return buffers * int(float(z.get("reduce_bucket_size", 5e8))) * bytes_per_element(precision)


def buffer_bytes(ds_config: dict, stage: int, precision: str, table: ParamTable, cuda: bool) -> int:
    """DeepSpeed's communication buckets and, on a GPU, the CUDA context and cuBLAS workspace."""
    z = ds_config.get("zero_optimization", {})
    b = bytes_per_element(precision)
    if stage in (1, 2):
        buckets = zero12_bucket_bytes(ds_config, precision)
    elif stage == 3:
        largest = max([n for g in table.groups for n in g] + table.frozen, default=0)
        buckets = b * min(int(float(z.get("stage3_prefetch_bucket_size", 5e7))), table.total) + 2 * b * largest
    else:
        buckets = 0
    cuda_context = 600 * 2**20 if cuda else 0  # context + cuBLAS workspace, typical on an H100 (unmeasured)
    dequantized = b * max((n for n, _ in table.quantized), default=0)  # a quantized layer's weight, while it runs
    return buckets + cuda_context + dequantized


def _as_loaded(cfg: RunConfig, model: torch.nn.Module, precision: str, methods: list) -> torch.nn.Module:
    """A meta model with the layers a load quantizes (model.quantize, or the checkpoint's) replaced by empty
    bitsandbytes layers, the mode kept in `dstune_quantize` for the parameter table."""
    if mode := quantize_mode(cfg, model.config):
        quantize.refuse_base_training(mode, methods)
        quantize.quantized_shell(model, mode, weights_dtype(precision))
        model.dstune_quantize = mode
    return model


def _with_methods(cfg: RunConfig, config, tokenizer, quantized: bool = False):
    """The recipe's model with its methods applied (with `adapters`: the shared methods on the base and every
    adapter's own, routed)."""
    model = auto_class(cfg.model_task()).from_config(config)
    shared = build_methods(cfg.shared_methods) if cfg.shared_methods else []
    runs = {name: run for name, run in cfg.adapter_runs()}
    own = {a.name: build_methods(m) if (m := cfg.own_methods(a)) else [] for a in cfg.adapters or []}
    methods = shared + [m for ms in own.values() for m in ms] if cfg.adapters else build_methods(cfg.methods)
    if quantized:
        _as_loaded(cfg, model, cfg.training.precision, methods)
    if cfg.adapters:
        specs = {name: AdapterSpec(own[name], run.task) for name, run in runs.items()}
        apply_adapter_methods(model, specs, shared, cfg.model_task(), cfg.training.seed, tokenizer)
    else:
        apply_methods(model, methods, cfg.task, tokenizer)
    return model, methods


def teacher_bytes(cfg: RunConfig, stage: int, world: int, micro_batch: int, seq_len: int,
                  labels: list | None = None) -> tuple[int, int]:
    """(weights on one rank, logits of one micro-batch) of the recipe's distillation teacher, from its config
    alone. Its forward runs without gradients, so beyond the logits it keeps nothing for the backward."""
    if cfg.distill is None:
        return 0, 0
    weights, model = _frozen_bytes(cfg, _config_of(cfg, cfg.distill.teacher), stage, world, labels)
    outputs = model.config.num_labels if not get_task(cfg.task).generative else model.config.vocab_size
    per_example = outputs * (1 if not get_task(cfg.task).generative else seq_len)
    return weights, bytes_per_element(cfg.training.precision) * micro_batch * per_example


def reference_bytes(cfg: RunConfig, stage: int, world: int) -> tuple[int, str]:
    """(weights on one rank, the choice) of a preference run's reference model: a copy of the base or another
    model holds its own; the base with the methods stepped aside and precomputed log-probabilities none.
    Its forward runs without gradients and is done before the policy's begins: no activations beside."""
    from dstune.preference.objective import reference_choice

    if cfg.preference is None:
        return 0, ""
    choice = reference_choice(cfg, build_methods(cfg.methods))
    if choice in ("", "base", "precompute"):
        return 0, choice
    source = cfg.model_copy(update={"methods": [{"name": "full"}]}) if choice == "copy" else _config_of(cfg, choice)
    return _frozen_bytes(cfg, source, stage, world, None)[0], choice


def _config_of(cfg: RunConfig, path: str) -> RunConfig:
    """The recipe of a frozen model beside the run: a run dir's own (with its methods), or a folder's model."""
    from pathlib import Path

    from dstune.distill.teacher import with_model_folder
    from dstune.rundir.load import finished_recipe, is_run_dir

    return finished_recipe(path) if is_run_dir(Path(path)) else with_model_folder(cfg, path)


def _frozen_bytes(cfg: RunConfig, source: RunConfig, stage: int, world: int, labels) -> tuple[int, torch.nn.Module]:
    """(weights on one rank, the meta model) of a frozen model built as `source` says, in cfg's precision,
    partitioned over the ranks under ZeRO-3."""
    with torch.device("meta"):
        model = _as_loaded(source, auto_class(source.task).from_config(recipe_config(source, None, labels)),
                           cfg.training.precision, [])
    table = parameter_table(model.requires_grad_(False), [], source)
    return model_state_bytes(table, stage, world, cfg.training.precision)[0], model


def meta_model(cfg: RunConfig, tokenizer=None, labels: list | None = None):
    """The recipe's model with its methods applied, on the meta device: shapes only, no memory, no weights."""
    config = recipe_config(cfg, tokenizer, labels)
    with torch.device("meta"):
        return _with_methods(cfg, config, tokenizer, quantized=True)


@contextlib.contextmanager
def fake_training_model(cfg: RunConfig, micro_batch: int, seq_len: int, tokenizer=None,
                        labels: list | None = None) -> Iterator[tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    """The recipe's model (methods, precision, loss, checkpointing) and an example batch, on fake tensors:
    shapes and dtypes, no data, no memory; a 1B model takes about a second."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = recipe_config(cfg, tokenizer, labels)
    with FakeTensorMode(allow_non_fake_inputs=False), default_dtype(weights_dtype(cfg.training.precision)):
        model, _ = _with_methods(cfg, config, tokenizer)
        prepare_for_training(model, cfg)
        # no attention mask: full-length rows, as in packed data
        yield model, get_task(cfg.task).example_batch(model.config, micro_batch, seq_len,
                                                      cfg.data.max_target_length)


def traced_activations(cfg: RunConfig, micro_batch: int, seq_len: int, tokenizer=None,
                       labels: list | None = None) -> ActivationTrace:
    """Trace one training step of the recipe's model on fake tensors."""
    with fake_training_model(cfg, micro_batch, seq_len, tokenizer, labels) as (model, batch):
        with _routed(model, cfg, micro_batch):
            return trace_step(model, batch)


def parameter_table(model: torch.nn.Module, methods, cfg: RunConfig) -> ParamTable:
    groups = _groups(model, methods, cfg)
    trainable = {id(p) for g in groups for p in g["params"]}
    layers = [m for m in model.modules() if quantize.is_quantized(m)]
    packed = {id(m.weight) for m in layers}
    frozen = [p.numel() for p in model.parameters() if id(p) not in trainable and id(p) not in packed]
    return ParamTable(frozen=frozen, groups=[[p.numel() for p in g["params"]] for g in groups],
                      quantized=[(m.in_features * m.out_features, m.out_features) for m in layers],
                      mode=getattr(model, "dstune_quantize", None))


def _groups(model: torch.nn.Module, methods, cfg: RunConfig) -> list[dict]:
    """The optimizer's param groups as the run makes them: with adapters, the shared methods' and each
    adapter's own."""
    t = cfg.training
    if not cfg.adapters:
        return param_groups(model, methods, t.lr, t.weight_decay)
    shared = build_methods(cfg.shared_methods) if cfg.shared_methods else []
    groups = param_groups(model, shared, t.lr, t.weight_decay, only=lambda n: SLOTS not in n.split(".")) \
        if shared else []
    for a, (name, run) in zip(cfg.adapters, cfg.adapter_runs()):
        own = adapter_state_names(model, name)
        groups += param_groups(model, build_methods(cfg.own_methods(a)) if cfg.own_methods(a) else [],
                               run.training.lr, run.training.weight_decay, only=own.__contains__)
    return groups


def micro_batch_rows(cfg: RunConfig) -> int:
    """Rows per rank in one micro-batch: with adapters, every adapter's."""
    return sum(run.training.micro_batch_size for _, run in cfg.adapter_runs())


def _routed(model: torch.nn.Module, cfg: RunConfig, rows: int):
    """Around the traced step of a model with adapters: every adapter over its rows of the micro-batch in one
    forward (those with a forward of their own, soft prompts and prefixes, counted as the base's rows: their
    activations are alive at the same time until the backward, the few virtual tokens aside)."""
    if not cfg.adapters:
        return contextlib.nullcontext()
    segments, start = [], 0
    for name, run in cfg.adapter_runs():
        n = run.training.micro_batch_size
        mine = row_local(model, name) and run.task == cfg.model_task()  # else counted as the base's rows
        segments.append((name if mine else "", start, start + n))
        start += n
    return route_rows(model, segments)


def estimate(cfg: RunConfig, world_size: int, seq_len: int | None = None, cuda: bool = True,
             tokenizer=None, labels: list | None = None) -> tuple[list[MemoryEstimate], ParamTable, dict]:
    """One MemoryEstimate per rank (they are equal: DeepSpeed pads every rank's share to the same size)."""
    if world_size < 1:
        raise UserError(f"--world-size: must be at least 1, got {world_size}")
    cfg = cfg.with_training(precision=resolve(cfg.training.precision, cuda)[0])  # auto: bf16 on a GPU
    ds = build_ds_config(cfg, world_size)
    stage = zero_stage(ds)
    z = ds.get("zero_optimization", {})
    offload_opt = z.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
    offload_par = z.get("offload_param", {}).get("device", "none") in ("cpu", "nvme")
    model, methods = meta_model(cfg, tokenizer, labels)
    table = parameter_table(model, methods, cfg)
    t = cfg.training
    weights, grads, optim = model_state_bytes(table, stage, world_size, t.precision, offload_opt, offload_par)
    seq = seq_len or cfg.data.max_length
    rows = micro_batch_rows(cfg)
    try:
        trace = traced_activations(cfg, rows, seq, tokenizer, labels)
        activations, after_forward, source = trace.peak, trace.after_forward, "traced"
    except Exception as e:  # an op without a fake-tensor implementation, data-dependent control flow, ...
        activations = rule_of_thumb_activation_bytes(model.config, rows, seq, t.precision,
                                                     t.activation_checkpointing is True)
        after_forward, source = None, f"rule of thumb: the trace failed ({first_line(e)})"
    buffers = buffer_bytes(ds, stage, t.precision, table, cuda)
    step = step_temporary_bytes(table, stage, world_size, t.precision, ds)
    t_weights, t_logits = teacher_bytes(cfg, stage, world_size, t.micro_batch_size, seq, labels)
    r_weights, r_choice = reference_bytes(cfg, stage, world_size)
    per_rank = [MemoryEstimate(r, weights, grads, optim, activations, buffers, step, t_weights, t_logits, r_weights)
                for r in range(world_size)]
    c = model.config
    body = table.total - model.get_input_embeddings().weight.numel() - idle_expert_params(model)
    per_token = flops_per_token(body, table.trainable, table.trainable == table.total, num_layers(c), _hidden(c),
                                seq_len or cfg.data.max_length)
    return per_rank, table, {"zero_stage": stage, "offload_optimizer": offload_opt, "offload_params": offload_par,
                             "largest_param": max([n for g in table.groups for n in g] + table.frozen),
                             "flops_per_token": per_token, "activations_after_forward": after_forward,
                             "checkpoint_bytes": checkpoint_bytes(table, stage, world_size, t.precision),
                             "activations_source": source, "reference": r_choice}


def base_alternatives(cfg: RunConfig, est: MemoryEstimate, table: ParamTable, world: int, seq_len: int | None,
                      cuda: bool, tokenizer=None) -> list[tuple[str, int, int]]:
    """(base, weights, peak) per rank for this recipe's base and the other one: full precision beside a
    quantized base, nf4 beside a full-precision one. Empty where a method trains the base's own weights (it
    cannot train on a quantized base) or the checkpoint was saved quantized (it has no other form)."""
    methods = build_methods(cfg.methods)
    if any(m.trains_base_weights for m in methods) or (table.mode and not cfg.model.quantize):
        return []
    other = None if table.mode else "nf4"
    alt = cfg.model_copy(update={"model": cfg.model.model_copy(update={"quantize": other})})
    [theirs, *_], _, _ = estimate(alt, world, seq_len, cuda, tokenizer)
    ours = (f"{table.mode} (this recipe)" if table.mode else "full precision (this recipe)", est.weights, est.total)
    return [ours, (f"model.quantize={other}" if other else "full precision", theirs.weights, theirs.total)]


def idle_expert_params(model: torch.nn.Module) -> int:
    """Expert weights a token does not run through (an MoE token uses top-k of E experts): they hold memory
    like any weight, but take no FLOPs for that token."""
    family = config_family(model.config)
    if family is None or not family.experts:
        return 0
    experts = sum(p.numel() for n, p in model.named_parameters() if f".{family.experts}." in f".{n}")
    return round(experts * (1 - family.active_expert_fraction(model.config)))


def _hidden(config: Any) -> int:
    return getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or config.n_embd


def deepspeed_estimate(table: ParamTable, stage: int, world_size: int, offload: bool, largest: int) -> int | None:
    """What DeepSpeed's own model-state estimator says per GPU (it counts every parameter as trainable)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        if stage in (1, 2):
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
            return int(estimate_zero2_model_states_mem_needs(table.total, world_size, 1, offload)[1])
        if stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
            return int(estimate_zero3_model_states_mem_needs(table.total, largest, world_size, 1, offload,
                                                             offload)[1])
    return None
