"""Export a run dir as a PEFT adapter folder or as a plain Hugging Face model with what trained merged in."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dstune.engine.run_dir import load_run
from dstune.errors import UserError
from dstune.models.loading import load_model
from dstune.methods.targets import TASK_HEADS

PEFT_TASK = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


def _prepare_out(out: str) -> Path:
    path = Path(out)
    if path.exists() and any(path.iterdir()):
        raise UserError(f"--out: {path} exists and is not empty")
    return path


def export(run_dir: str, out: str, fmt: str) -> Path:
    cfg, tokenizer, model, labels, methods = load_run(run_dir)
    if fmt == "merged":
        blocked = [m.name for m in methods if not m.mergeable]
        if blocked:
            raise UserError(f"--format merged: {', '.join(blocked)} cannot be folded into the base weights "
                            f"(a non-linear or input-side change); use the run dir, or --format peft where supported")
        path = _prepare_out(out)
        plain = load_model(cfg, tokenizer, labels)
        state = {k: v for k, v in model.state_dict().items() if k in plain.state_dict()}
        for m in methods:
            state.update(m.merged_state(model))
        plain.load_state_dict(state, strict=True)
        plain.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path
    names = [m.name for m in methods]
    if len(methods) != 1 or names[0] not in ("lora", "ia3"):
        raise UserError(f"--format peft: supported for a single lora or ia3 method; this run used {', '.join(names)}")
    path = _prepare_out(out)
    _write_peft(model, methods[0], cfg, path)
    tokenizer.save_pretrained(path)
    return path


def _write_peft(model: torch.nn.Module, method, cfg, path: Path) -> None:
    from safetensors.torch import save_file
    from transformers.pytorch_utils import Conv1D

    common = {"task_type": PEFT_TASK[cfg.task], "base_model_name_or_path": cfg.model.path, "inference_mode": True,
              "modules_to_save": list(TASK_HEADS) if cfg.task == "classification" else None,
              "target_modules": [n for n, *_ in _wrapped(method)]}
    conv1d = any(isinstance(model.get_submodule(n), Conv1D) for n, *_ in _wrapped(method))
    tensors = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.split(".")[0] in TASK_HEADS:
            key = name
        elif method.name == "lora":
            key = name                                  # x.lora_A.weight: PEFT's saved name
        else:
            key = name.removesuffix(".weight")          # x.ia3_l.weight → x.ia3_l
        tensors[f"base_model.model.{key}"] = p.detach().contiguous()
    if method.name == "lora":
        o = method.options
        config = {"peft_type": "LORA", "r": o.r, "lora_alpha": o.alpha, "lora_dropout": o.dropout,
                  "fan_in_fan_out": conv1d, "bias": "none", "init_lora_weights": True, **common}
    else:
        config = {"peft_type": "IA3", "feedforward_modules": [n for n, ff in method.wrapped if ff],
                  "fan_in_fan_out": conv1d, "init_ia3_weights": True, **common}
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, str(path / "adapter_model.safetensors"))


def _wrapped(method):
    return [(w,) if isinstance(w, str) else w for w in method.wrapped]
