"""Export a run dir as a PEFT adapter folder or as a plain Hugging Face model with what trained merged in."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dstune.rundir.trainable import file_mode, save_safetensors
from dstune.rundir.load import finished_recipe, load_run
from dstune.errors import UserError
from dstune.methods import available, build_methods
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
    if fmt == "merged":
        plain = load_model(cfg, tokenizer, labels)
        state = {k: v for k, v in model.state_dict().items() if k in plain.state_dict()}
        for m in methods:
            state.update(m.merged_state(model))
        plain.load_state_dict(state, strict=True)
        _save_plain(plain, tokenizer, path)
        return path
    adapter = methods[0].peft_adapter(model, get_task(cfg.task).model_task)
    write_peft_folder(path, {**_peft_common(cfg, _peft_base(cfg, tokenizer, labels, path)), **adapter.config},
                      adapter.tensors)
    tokenizer.save_pretrained(path)
    if adapter.note:
        print(f"note: {adapter.note}")
    return path


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
    _save_plain(load_model(cfg, tokenizer, labels), tokenizer, base)
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
