"""Export a run dir as a PEFT adapter folder or as a plain Hugging Face model with what trained merged in."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from dstune.rundir.trainable import file_mode, save_safetensors
from dstune.rundir.load import finished_recipe, load_run
from dstune.errors import UserError
from dstune.methods import available, build_methods
from dstune.models import quantize
from dstune.models.loading import base_is_loadable, load_model
from dstune.methods.targets import TASK_HEADS
from dstune.tasks import get_task


def _prepare_out(out: str) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out: {path} is a file")
    if path.exists() and any(path.iterdir()):
        raise UserError(f"--out: {path} exists and is not empty")
    return path


def _check_format(run_dir: str, fmt: str) -> None:
    """What the run's methods refuse, said before any weights are loaded."""
    methods = build_methods(finished_recipe(run_dir).methods)
    if fmt == "merged":
        blocked = [m.name for m in methods if not m.mergeable]
        if blocked:
            raise UserError(f"--format merged: {', '.join(blocked)} cannot be folded into the base weights "
                            f"(a non-linear or input-side change); use the run dir, or --format peft where supported")
    elif len(methods) != 1 or not type(methods[0]).exports_to_peft():
        exportable = sorted(name for name, cls in available().items() if cls.exports_to_peft())
        raise UserError(f"--format peft: supported for one of {', '.join(exportable)} alone; "
                        f"this run used {', '.join(m.name for m in methods)}")


def export(run_dir: str, out: str, fmt: str, checkpoint: str | None = None) -> Path:
    """Write the run (its `checkpoint` state: rundir/trainable.py `trainable_file`) to `out` as `fmt`."""
    path = _prepare_out(out)  # refused before the run is loaded
    _check_format(run_dir, fmt)
    run = load_run(run_dir, checkpoint=checkpoint)
    cfg, tokenizer, model, labels, methods = run.cfg, run.tokenizer, run.model, run.labels, run.methods
    mode = quantize.checkpoint_mode(model.config)  # the base trained quantized (model.quantize or its checkpoint)
    if fmt == "merged":
        plain = _plain_base(cfg, tokenizer, labels, model, mode)
        keys = plain.state_dict()
        state = {k: v for k, v in model.state_dict().items() if k in keys and v.shape == keys[k].shape}
        state.update(quantize.dequantized_state(model))
        state.update(merged_layers(model, methods))
        plain.load_state_dict(state, strict=True)
        if mode:
            print(f"merged into the dequantized {mode} base: max |Δ logit| against the quantized run "
                  f"{max_logit_shift(model, plain):.3g} on a probe batch")
        _save_plain(plain, tokenizer, path)
    else:
        adapter = methods[0].peft_adapter(model, get_task(cfg.task).model_task)
        write_peft_folder(path, {**_peft_common(cfg, _peft_base(cfg, tokenizer, labels, path)), **adapter.config},
                          adapter.tensors)
        tokenizer.save_pretrained(path)
        if adapter.note:
            print(f"note: {adapter.note}")
    if mode:
        print(_full_precision_note(run_dir, cfg, model, mode, fmt, checkpoint))
    return path


def merged_layers(model: torch.nn.Module, methods: list) -> dict[str, torch.Tensor]:
    """Each changed base tensor with what trained folded in: a layer one method changes as that method merges
    it; a layer several change (LoRA and IA3 on one projection) as their hooks compose in the forward,
    read off the layer itself: its output for no input is the bias, for each unit input a column."""
    parts = [m.merged_state(model) for m in methods]
    names = [n for part in parts for n in part]
    out = {n: t for part in parts for n, t in part.items() if names.count(n) == 1}
    for layer in {n.rsplit(".", 1)[0] for n in names if names.count(n) > 1}:
        out.update(_composed(layer, model.get_submodule(layer)))
    return out


def _composed(name: str, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name.weight, name.bias}: the affine map the layer computes now, with every hook on it (a Linear's
    weight [out, in], GPT-2's Conv1D's [in, out])."""
    linear = isinstance(layer, torch.nn.Linear)
    w = quantize.dequantized(layer)
    n_in = w.shape[1] if linear else w.shape[0]
    was = layer.training
    layer.eval()
    with torch.no_grad():
        probe = torch.cat([torch.zeros(1, n_in), torch.eye(n_in)]).to(w.device, w.dtype)
        y = layer(probe)
    layer.train(was)
    bias, columns = y[0], (y[1:] - y[0]).T  # [out], [out, in]
    out = {f"{name}.weight": columns if linear else columns.T}
    if layer.bias is not None:
        out[f"{name}.bias"] = bias
    elif bias.abs().max() > 0:
        raise UserError(f"--format merged: {name} computes a bias it has no parameter for")
    return out


def _plain_base(cfg, tokenizer, labels, model, mode: str | None):
    """The model to merge into: the base as loaded, or for a quantized base its full-precision shape (the
    dequantized weights fill it)."""
    if not mode:
        return load_model(cfg, tokenizer, labels)
    from dstune.models.loading import auto_class

    config = copy.deepcopy(model.config)
    config.__dict__.pop("quantization_config", None)
    return auto_class(cfg.task).from_config(config, dtype=torch.float32)


def max_logit_shift(a: torch.nn.Module, b: torch.nn.Module, rows: int = 4, length: int = 64) -> float:
    """max |Δ logit| between two models of one vocabulary on a probe batch of random tokens (seed 0)."""
    config = a.config
    length = min(length, getattr(config, "max_position_embeddings", length) or length)
    ids = torch.randint(0, config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = [m(input_ids=ids.to(next(m.parameters()).device)).logits.float().cpu() for m in (a, b)]
    return (outs[0] - outs[1]).abs().max().item()


def _full_precision_note(run_dir: str, cfg, model, mode: str, fmt: str, checkpoint: str | None) -> str:
    """How far the logits move when what trained is put on the full-precision base instead of the quantized
    one (measured, where the run's base has full-precision weights), and how to load the base as it trained."""
    how = ("BitsAndBytesConfig(load_in_8bit=True)" if mode == "int8" else
           f"BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='{mode}', bnb_4bit_use_double_quant=True)")
    line = f"the base trained quantized ({mode}); load it with {how} to get the logits training saw"
    if not cfg.model.quantize:  # a checkpoint saved quantized: there are no full-precision weights to compare
        return line
    full = load_run(run_dir, overrides=["model.quantize=null"], checkpoint=checkpoint).model
    shift = max_logit_shift(model, full)
    return (f"{line}; on the full-precision base the same {'update' if fmt == 'merged' else 'adapter'} moves them "
            f"by up to {shift:.3g} (max |Δ logit|, probe batch)")


def _save_plain(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    for f in path.rglob("*"):  # transformers writes its safetensors files 0600
        if f.is_file():
            f.chmod(file_mode())


def _peft_base(cfg, tokenizer, labels, out: Path) -> str:
    """The base PEFT attaches the adapter to: the recipe's model folder, or, when that is no folder
    `from_pretrained` can load (a GGUF file, a random tiny config), the base itself saved in OUT/base."""
    if base_is_loadable(cfg):
        return cfg.model.path
    base = out / "base"
    # a quantized base is saved in full precision: PEFT users quantize it as they load it
    _save_plain(load_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"quantize": None})}),
                           tokenizer, labels), tokenizer, base)
    why = "dequantized from " + cfg.model.gguf_file if cfg.model.gguf_file else f"random, seed {cfg.training.seed}"
    print(f"the base model ({why}) is saved in {base}; adapter_config.json points at it")
    return str(base.resolve())


def _peft_common(cfg, base: str) -> dict:
    task = get_task(cfg.task)
    return {"task_type": task.peft_task_type, "base_model_name_or_path": base, "inference_mode": True,
            "modules_to_save": None if task.generative else list(TASK_HEADS)}


def write_peft_folder(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    save_safetensors(tensors, path / "adapter_model.safetensors")
