"""A quantized frozen base (`model.quantize`: QLoRA's nf4, fp4, int8) through bitsandbytes.

bitsandbytes, not torchao: its current releases run the same `Linear4bit`/`Linear8bitLt` layers on CPU and
CUDA, transformers loads a folder through it layer by layer (a 70B base is never whole in full precision),
and PEFT + bitsandbytes is what users compare QLoRA against. No kernel here is our own.

The 4-bit weights are packed into tensors of the run's own dtype (bitsandbytes' `quant_storage`, as
FSDP-QLoRA does): DeepSpeed then treats them as ordinary frozen parameters, so ZeRO-3 partitions and
gathers them per layer like any other weight (their bytes are moved, never cast), and ZeRO 0-2 replicate
them on every rank. Linear layers only: embeddings, norms and task/output heads stay in full precision.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from typing import Any

import torch
from torch import nn

from dstune.errors import UserError, first_line
from dstune.families import TASK_HEADS

MODES = ("nf4", "fp4", "int8")
BYTES_PER_PARAM = {"nf4": 0.5, "fp4": 0.5, "int8": 1.0}
PACKED = ("Params4bit", "Int8Params")  # bitsandbytes' weight types: 4-bit packed, 8-bit
BLOCK = 64  # 4-bit: one absmax per 64 weights (QLoRA), itself quantized to 8 bits per 256 absmaxes (double)


def constants_bytes(mode: str, rows: int, params: int) -> float:
    """Bytes of quantization constants beside a layer's packed weights: 4-bit double quantization keeps one
    8-bit absmax per block of 64 weights and one fp32 per 256 of those (QLoRA: 0.127 bit per weight), plus
    its two code tables (16 and 256 fp32, per layer); int8 one fp32 scale per row."""
    if mode == "int8":
        return rows * 4.0
    blocks = math.ceil(params / BLOCK)
    return blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256)


def require_bitsandbytes(mode: str) -> Any:
    """bitsandbytes, or a one-line error saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise UserError(f"model.quantize {mode}: needs bitsandbytes (pip install 'bitsandbytes>=0.49'): "
                        f"{e}") from None
    return bitsandbytes


def bnb_config(mode: str, precision_dtype: torch.dtype, skip: list[str] | None = None):
    """transformers' BitsAndBytesConfig for a mode: computing in the run's dtype, 4-bit weights packed into
    tensors of that dtype (see the module docstring), double quantization on (QLoRA); `skip`: the layers to
    leave in full precision."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes(mode)
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=precision_dtype, bnb_4bit_quant_storage=precision_dtype,
                              llm_int8_skip_modules=skip)


def checkpoint_mode(config) -> str | None:
    """The mode of a checkpoint saved quantized (its config.json's `quantization_config`), else None; a
    format bitsandbytes does not run (GPTQ, AWQ, ...) is refused in one line."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    method = q.get("quant_method", "?")
    if method != "bitsandbytes":
        raise UserError(f"model.path: the checkpoint is {method}-quantized; dstune trains on a bitsandbytes "
                        f"checkpoint ({', '.join(MODES)}) or on full-precision weights, which model.quantize "
                        "quantizes as they load")
    if q.get("load_in_8bit"):
        return "int8"
    return q.get("bnb_4bit_quant_type", "fp4")


def is_quantized(module: nn.Module) -> bool:
    """Whether a layer holds bitsandbytes weights (4- or 8-bit)."""
    return type(getattr(module, "weight", None)).__name__ in PACKED


def param_count(p: torch.Tensor) -> int:
    """How many weights a parameter holds: a 4-bit one packs several into each element of its storage; a
    ZeRO-3 partitioned one keeps its whole size in ds_numel."""
    state = getattr(p, "quant_state", None)
    if state is not None:
        return math.prod(state.shape)
    return getattr(p, "ds_numel", p.numel())


def quantized_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_quantized(m)]


def dequantized(module: nn.Module) -> torch.Tensor:
    """A quantized layer's weight as a plain [out, in] tensor in the compute dtype (an ordinary layer's own
    weight). Under ZeRO-3 gather the weight first."""
    if not is_quantized(module):
        return module.weight
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    w = module.weight
    return dequantize_bnb_weight(w, getattr(module, "state", None)).view(module.out_features, module.in_features)


def dequantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`name.weight` → the dequantized weight, for every quantized layer (what a merged export starts from)."""
    return {f"{n}.weight": dequantized(m).detach() for n, m in model.named_modules() if is_quantized(m)}


def refuse_trained_quantized(model: nn.Module) -> None:
    """A parameter of a quantized layer marked to train (a plugin method's doing): one line naming it."""
    for name, module in model.named_modules():
        if is_quantized(module):
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    raise UserError(f"methods: {name}.{pname} would train, but {name} is quantized "
                                    "(model.quantize); a quantized layer's weights and bias stay frozen")


def load_quantized(auto, folder: str, config, mode: str, dtype: torch.dtype, device, **kwargs):
    """(model, loading info) from a safetensors folder, each linear layer quantized as it loads (on `device`:
    a GPU quantizes its own share); what stays in full precision loads in fp32, as an unquantized base. A
    checkpoint saved quantized keeps its own storage; it computes in `dtype` too."""
    import warnings

    # 8-bit layers on a CPU say on every call that they compute in fp16
    warnings.filterwarnings("ignore", message=".*inputs will be cast from")
    if getattr(config, "quantization_config", None) is None:  # else the checkpoint's own is used
        with torch.device("meta"):
            shell = auto.from_config(config, trust_remote_code=kwargs.get("trust_remote_code", False))
        kwargs["quantization_config"] = bnb_config(mode, dtype, skip=kept_full_precision(shell))
    model, info = auto.from_pretrained(folder, config=config, dtype=torch.float32, device_map={"": device},
                                       local_files_only=True, use_safetensors=True, output_loading_info=True,
                                       **kwargs)
    for module in model.modules():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = dtype
    if torch.device(device).type == "cpu":
        # what stays full precision may still be views of the memory-mapped file, which keeps every page the
        # quantizer read resident (the whole fp32 file): copied, the mapping is released
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point() and type(t).__name__ not in PACKED:
                t.data = t.data.clone()
    return model, info


@contextlib.contextmanager
def saved_for_loading(model: nn.Module):
    """A folder holding `model`'s weights as safetensors, for `load_quantized` (a random tiny model, a GGUF
    file read without the cache): every quantized base then loads through the same path."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="dstune-quantize-") as tmp:
        # every rank writes its own folder (save_pretrained writes on rank 0 only)
        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        model.config.to_json_file(os.path.join(tmp, "config.json"))
        del model  # the caller may free it while the folder is read
        yield tmp


def refuse_base_training(mode: str, methods: list) -> None:
    """A method that trains the base's own weights (full, freeze, BitFit): one line saying why it cannot."""
    for m in methods:
        if m.trains_base_weights:
            raise UserError(f"methods: {m.name} trains the base's own weights, which model.quantize {mode} holds "
                            "frozen in quantized form; on a quantized base train lora, ia3, adapter, prompt or "
                            "prefix (or leave model.quantize out)")


def check_quantized_base(mode: str, methods: list, dtype: torch.dtype, device) -> None:
    """Before anything loads: the methods leave the base frozen, and bitsandbytes runs `mode` in `dtype` here
    (a 64×64 layer quantized and run forward and backward). One line each, else nothing."""
    refuse_base_training(mode, methods)
    bnb = require_bitsandbytes(mode)
    try:
        w = torch.randn(64, 64) / 8
        if mode == "int8":
            q = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, compress_statistics=True,
                                  quant_type=mode, quant_storage=dtype)
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type=mode,
                                         quant_storage=dtype)
        x = torch.randn(2, 64, dtype=dtype, device=device, requires_grad=True)
        q.to(device)(x).float().sum().backward()
    except Exception as e:  # noqa: BLE001 - whatever the backend refuses: said in one line
        raise UserError(f"model.quantize {mode}: bitsandbytes {bnb.__version__} cannot run it here "
                        f"({device}, {str(dtype).removeprefix('torch.')}): {first_line(e)}") from None


def kept_full_precision(model: nn.Module) -> list[str]:
    """The linear layers a load leaves unquantized: transformers' rule (the output head, tied weights, the
    module of the last parameter, what the model keeps in fp32) and the task heads, which train (transformers
    strips only `.weight` from the last parameter's name, so alone it quantizes a classifier with a bias)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    last = list(model.named_parameters())[-1][0].rsplit(".", 1)[0]
    kept = set(get_keys_to_not_convert(model)) | {last} | set(TASK_HEADS)
    return sorted(kept | set(getattr(model, "_keep_in_fp32_modules", None) or []))


def quantized_shell(model: nn.Module, mode: str, dtype: torch.dtype) -> nn.Module:
    """`model` (on the meta device: the estimate) with the layers that loading quantizes replaced by empty
    bitsandbytes layers (`kept_full_precision` aside), so the estimate counts what a load holds."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    return replace_with_bnb_linear(model, modules_to_not_convert=kept_full_precision(model),
                                   quantization_config=bnb_config(mode, dtype))


def held_bytes(mode: str, params: int, rows: int, storage_bytes: int, shards: int = 1) -> int:
    """Bytes one rank holds for a quantized layer of `params` weights in `rows` rows: the packed weights in
    elements of their storage dtype (4-bit: the run's dtype; int8: one byte), split in `shards` under ZeRO-3,
    plus the quantization constants, which every rank keeps whole."""
    item = 1 if mode == "int8" else storage_bytes
    elements = math.ceil(params * BYTES_PER_PARAM[mode] / item)
    return math.ceil(elements / shards) * item + math.ceil(constants_bytes(mode, rows, params))
