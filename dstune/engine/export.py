"""Export a run dir as a PEFT adapter folder or as a plain Hugging Face model with what trained merged in."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dstune.engine.checkpoint import file_mode, save_safetensors
from dstune.engine.run_dir import load_run
from dstune.errors import UserError
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


def export(run_dir: str, out: str, fmt: str) -> Path:
    path = _prepare_out(out)  # refused before the run is loaded
    cfg, tokenizer, model, labels, methods = load_run(run_dir)
    if fmt == "merged":
        blocked = [m.name for m in methods if not m.mergeable]
        if blocked:
            raise UserError(f"--format merged: {', '.join(blocked)} cannot be folded into the base weights "
                            f"(a non-linear or input-side change); use the run dir, or --format peft where supported")
        plain = load_model(cfg, tokenizer, labels)
        state = {k: v for k, v in model.state_dict().items() if k in plain.state_dict()}
        for m in methods:
            state.update(m.merged_state(model))
        plain.load_state_dict(state, strict=True)
        _save_plain(plain, tokenizer, path)
        return path
    names = [m.name for m in methods]
    if len(methods) != 1 or names[0] not in PEFT_EXPORTABLE:
        raise UserError(f"--format peft: supported for one of {', '.join(PEFT_EXPORTABLE)} alone; "
                        f"this run used {', '.join(names)}")
    config, tensors = PEFT_EXPORTABLE[names[0]](model, methods[0])
    write_peft_folder(path, {**_peft_common(cfg, _peft_base(cfg, tokenizer, labels, path)), **config}, tensors)
    tokenizer.save_pretrained(path)
    if names[0] == "prefix" and cfg.task == "causal_lm":  # shown by a test on Llama; not checked for T5
        print("note: PEFT's generate() does not apply prefix adapters on transformers 5.24+ (it drops the "
              "past_key_values PEFT hands in): its forward uses the prefix, its replies ignore it; "
              "`dstune generate RUN_DIR` applies it")
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


def _task_heads(model, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    return {f"{prefix}{n}": p.detach().contiguous() for n, p in model.named_parameters()
            if p.requires_grad and n.split(".")[0] in TASK_HEADS}


def write_peft_folder(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    save_safetensors(tensors, path / "adapter_model.safetensors")


def _prompt_like(model, method, peft_type: str, embeddings: torch.Tensor, token_dim: int, heads: int) -> tuple:
    config = {"peft_type": peft_type, "num_virtual_tokens": method.options.num_virtual_tokens,
              "token_dim": token_dim, "num_transformer_submodules": 1, "num_attention_heads": heads}
    # prompt-learning PEFT models wrap the base model one level less deep than LoRA/IA3 ones
    return config, {"prompt_embeddings": embeddings.contiguous(), **_task_heads(model, "base_model.")}


def _export_prompt(model, method) -> tuple:
    w = model.dstune_prompt.embedding.weight.detach().float()
    config, tensors = _prompt_like(model, method, "PROMPT_TUNING", w, w.shape[1],
                                   model.config.num_attention_heads)
    config.update(prompt_tuning_init="RANDOM", num_layers=model.config.num_hidden_layers)
    return config, tensors


def _export_prefix(model, method) -> tuple:
    from dstune.methods.prefix import kv_geometry
    kv_heads, head_dim = kv_geometry(model.config)
    enc = model.dstune_prefix
    config, tensors = _prompt_like(model, method, "PREFIX_TUNING", method.folded_prefix(model), kv_heads * head_dim,
                                   kv_heads)
    config.update(num_layers=enc.shape[1], prefix_projection=False)  # the MLP is folded into the tensor
    return config, tensors


def _export_lora_ia3(model: torch.nn.Module, method) -> tuple:
    from transformers.pytorch_utils import Conv1D

    common = {"target_modules": [n for n, *_ in _wrapped(method)]}
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
    return config, tensors


def _wrapped(method):
    return [(w,) if isinstance(w, str) else w for w in method.wrapped]


PEFT_EXPORTABLE = {"lora": _export_lora_ia3, "ia3": _export_lora_ia3, "prompt": _export_prompt,
                   "prefix": _export_prefix}
