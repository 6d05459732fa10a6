"""DeepSpeed checkpoints of what trains (and its optimizer state and schedule), saved by every rank and
loaded back safely; the pointer to the complete ones is the run dir's (rundir/pointer.py).

A checkpoint counts as complete only once every rank has finished writing it: the pointer is committed
after a barrier, so a save cut off half-way is never loaded.
"""
from __future__ import annotations

import os
import pickle
import re

import torch

from dstune.engine.distributed import barrier
from dstune.errors import UserError
from dstune.models.quantize import quantized_names
from dstune.rundir import pointer
from dstune.rundir.pointer import checkpoint_dir
from dstune.rundir.trainable import save_safetensors


def save_checkpoint(engine, run_dir: str, step: int, is_main: bool, keep: int = 2) -> str:
    """Write checkpoint `step` on every rank, then point at it; the `keep` newest complete ones stay."""
    tag = pointer.tag_of(step)
    ckpt = checkpoint_dir(run_dir)
    # only what trains, its optimizer state and the schedule: the frozen base is reloaded from its source
    _leave_out_tied_frozen(engine)
    engine.save_checkpoint(str(ckpt), tag=tag, client_state={"global_step": step}, save_latest=False,
                           exclude_frozen_parameters=True)
    barrier()
    if is_main:
        pointer.commit(run_dir, tag, step, keep)
    barrier()
    return tag


def _frozen_names(module: torch.nn.Module) -> set[str]:
    """Every name a frozen parameter goes by, tied aliases included (a GPT-2's lm_head.weight is its frozen
    input embedding, which named_parameters() lists once, under the other name)."""
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _of_quantized_layers(module: torch.nn.Module, state: dict) -> list[str]:
    """The state-dict entries quantized layers hold themselves (packed weights, and the constants bitsandbytes
    adds beside them; not those of a method's modules inside them): frozen base, never in a checkpoint."""
    layers = set(quantized_names(module))
    if not layers:
        return []
    modules = {n for n, _ in module.named_modules()}

    def owner(key: str) -> str:
        parts = key.split(".")
        return next((p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if p in modules), "")
    return [k for k in state if owner(k) in layers]


def _leave_out_tied_frozen(engine) -> None:
    """DeepSpeed's exclude_frozen_parameters drops frozen parameters by their first name only; drop their
    tied aliases too, or the embedding matrix would be in every checkpoint of a PEFT run."""
    if getattr(engine, "_dstune_state_dict", False):
        return
    original = engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters: bool = False, **kwargs):
        sd = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name in _frozen_names(engine.module) & set(sd):
                del sd[name]
            for name in _of_quantized_layers(engine.module, sd):
                del sd[name]
        return sd

    engine.module_state_dict, engine._dstune_state_dict = module_state_dict, True


def _damage(folder, rank: int) -> str | None:
    """What makes `folder` unloadable by this rank, or None: every file it reads (those shared by all ranks
    and its own ZeRO shards) must be a whole zip archive whose members match their CRCs. Reading them costs
    one pass over the rank's share; torch.load finds them in the page cache afterwards."""
    import zipfile

    names = [p.name for p in folder.iterdir() if p.suffix == ".pt"]
    mine = [n for n in names if "zero_pp_rank_" not in n or f"zero_pp_rank_{rank}_" in n]
    if not any(n.endswith("model_states.pt") for n in mine):
        return f"{folder.name} has no model states for rank {rank}"
    for name in sorted(mine):
        try:
            with zipfile.ZipFile(folder / name) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"{folder / name}: {e}"
        if bad is not None:
            return f"{folder / name}: {bad} does not match its checksum"
    return None


def first_readable(run_dir: str, tags: list[str], rank: int, world: int) -> str:
    """The newest of `tags` that every rank can read, saying which damaged ones it passed over; all ranks
    agree on it (a collective). None readable: a one-line error."""
    import torch.distributed as dist

    for n, tag in enumerate(tags):
        found = [None] * world
        dist.all_gather_object(found, _damage(checkpoint_dir(run_dir) / tag, rank))
        damage = [d for d in found if d]
        if not damage:
            return tag
        if rank == 0:
            after = f"resuming from the previous complete one, {tags[n + 1]}" if n + 1 < len(tags) else ""
            print(f"[dstune] checkpoint {tag} is damaged ({damage[0]}){'; ' + after if after else ''}", flush=True)
    raise UserError(f"{checkpoint_dir(run_dir)}: no kept checkpoint is readable ({', '.join(tags)}); remove "
                    "them, or start over with training.resume=false")


def _deepspeed_types() -> list:
    """The objects a DeepSpeed checkpoint holds besides tensors and plain data (found by loading checkpoints
    of ZeRO 0-3, fp32/bf16/fp16, full and PEFT runs): nothing else is ever rebuilt from one."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str, map_location=None):
    """torch.load that rebuilds only tensors, plain Python data and DeepSpeed's checkpoint types
    (weights_only): a checkpoint file carrying any other pickled object (code to run) is refused, unread."""
    try:
        with torch.serialization.safe_globals(_deepspeed_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(GLOBAL [\w.]+|Unsupported operand \d+)", str(e))
        what = found.group(1) if found else "not loadable as weights"
        raise UserError(f"{path}: refused: it holds a pickled object that is no tensor, plain data or DeepSpeed "
                        f"checkpoint type ({what}), which DeepSpeed never writes; remove the checkpoint "
                        "(or start over with training.resume=false)") from None


def load_checkpoint(engine, run_dir: str, tag: str) -> int:
    """Restore model, optimizer and LR schedule; return the global step to continue from. Every file is
    read with safe_load: DeepSpeed's own loader unpickles anything, and a run dir may come from anyone."""
    engine.checkpoint_engine.load = safe_load
    path, client = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True, custom_load_fn=_load_trained)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {checkpoint_dir(run_dir)}")
    _replan(engine.lr_scheduler)
    return int(client["global_step"])


def _replan(scheduler) -> None:
    """The learning rates the next step uses, from the schedule as the recipe plans it now (a resumed run
    may train longer: training.max_steps may change), not as the checkpoint saved them."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _load_trained(src: dict, dst: torch.nn.Module) -> None:
    """Load a checkpoint's module state, which leaves out frozen parameters (they come from the base): every
    parameter that trains must be in it, and nothing the model lacks."""
    result = dst.load_state_dict(src, strict=False)
    frozen = _frozen_names(dst)
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise UserError(f"checkpoint: does not match the model the recipe builds (missing {missing[:3]}, "
                        f"unexpected {sorted(result.unexpected_keys)[:3]}); resume with the recipe that wrote it, "
                        "or start over with training.resume=false")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) copies of the trainable parameters and of every parameter a method added (see
    `apply_methods`); a collective under ZeRO-3, so call it on every rank."""
    added = getattr(model, "dstune_added", frozenset())
    return trainable_state_of({n: p for n, p in model.named_parameters() if p.requires_grad or n in added})


def trainable_state_of(named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of these parameters (gathered under ZeRO-3: a collective, call it on every rank)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None):
        return {n: p.detach().to("cpu", torch.float32).clone().contiguous() for n, p in named.items()}


def save_trainable(model: torch.nn.Module, path: str | os.PathLike, is_main: bool, metadata: dict) -> None:
    state = trainable_state(model)
    if is_main:
        save_safetensors(state, path, metadata)
    barrier()


