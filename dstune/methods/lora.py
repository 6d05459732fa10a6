"""LoRA: a trainable low-rank update B·A beside frozen linear layers; mergeable into the base weights.

Variants are options, each as PEFT has it, so they compose and export: rsLoRA (`use_rslora`: scale by
alpha/√r, which keeps the update's size steady as r grows), DoRA (`use_dora`: the updated weight's rows are
renormalised to a trained magnitude vector, Liu et al. 2024) and LoRA+ (`loraplus_lr_ratio`: B learns
faster than A, Hayou et al. 2024; an optimizer setting, so nothing of it is saved).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dstune.methods.base import TuningMethod, bypassed, has_values
from dstune.methods.peft_format import PeftAdapter, fan_in_fan_out, layer_tensors
from dstune.methods.targets import default_targets, find_linears, linear_shape, train_task_head
from dstune.models.quantize import dequantized


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, gt=0, description="rank of the update")
    alpha: float = Field(8.0, gt=0, description="scale: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="module names (suffix match) or 'all-linear'; default: the family's (PEFT's where it "
                          "has one)")
    use_rslora: bool = Field(False, description="rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r")
    use_dora: bool = Field(False, description="DoRA: train a per-row magnitude and renormalise W + BA to it")
    loraplus_lr_ratio: float = Field(1.0, gt=0, description="LoRA+: B's learning rate over A's (the paper: 16)")


class LoraUp(nn.Linear):
    """LoRA's B, which adds its scaled output to the base layer's: `base + scaling · (xa @ Bᵀ)` is one addmm.

    The update is added in the matmul's epilogue, so it is never written out on its own and read back
    (two passes over the layer's output), and its gradient needs no scaled copy of the output gradient
    (addmm scales the small rank-r products instead): four fewer passes over a [tokens, out] tensor per
    layer and step. The weight is an ordinary Linear weight (state dicts, PEFT export and merging see
    `lora_B.weight`), and it is called as a module, so ZeRO-3 gathers it like any layer.
    """

    def forward(self, xa: torch.Tensor, base: torch.Tensor, scaling: float) -> torch.Tensor:
        rows = torch.addmm(base.reshape(-1, base.shape[-1]), xa.reshape(-1, xa.shape[-1]).to(base.dtype),
                           self.weight.to(base.dtype).t(), alpha=scaling)
        return rows.view(base.shape)


def _lora_forward(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    # submodules are called (not their weights read) so ZeRO-3 gathers them like any layer
    if bypassed(module):
        return output
    x = module.lora_dropout(args[0])
    return module.lora_B(module.lora_A(x.to(module.lora_A.weight.dtype)), output, module.lora_scaling)


class Magnitude(nn.Module):
    """DoRA's trained length of each row of the updated weight, called as a module so ZeRO-3 gathers it."""

    def __init__(self, rows: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(rows))

    def forward(self) -> torch.Tensor:
        return self.weight


def _rows(module: nn.Module) -> torch.Tensor:
    """The base weight as [out, in] (GPT-2's Conv1D stores it transposed; a quantized layer's, dequantized)."""
    return dequantized(module) if isinstance(module, nn.Linear) else module.weight.T


def _delta(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """scaling · B·A as [out, in], through the modules' own forwards (so ZeRO-3 gathers A and B)."""
    eye = torch.eye(module.lora_A.in_features, device=module.weight.device, dtype=dtype)
    zeros = torch.zeros(eye.shape[0], module.lora_B.out_features, device=eye.device, dtype=dtype)
    return module.lora_B(module.lora_A(eye), zeros, module.lora_scaling).T


def _dora_forward(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA: m / ‖W + sBA‖ (per row, held constant in the backward, as the paper suggests) times
    (W + sBA) x, plus the bias: `output + (scale - 1) · W x + scale · sBA x`."""
    if bypassed(module):
        return output
    x = module.lora_dropout(args[0])
    w = _rows(module).to(output.dtype)
    norm = (w + _delta(module, output.dtype).detach()).norm(dim=1).detach()
    scale = module.lora_magnitude_vector().to(output.dtype) / norm
    if isinstance(module.lora_dropout, nn.Identity) or not module.training:
        plain = output if module.bias is None else output - module.bias.to(output.dtype)
    else:  # the dropped-out input, as the LoRA branch sees it
        plain = torch.nn.functional.linear(x.to(output.dtype), w)
    lora = module.lora_B(module.lora_A(x.to(module.lora_A.weight.dtype)), torch.zeros_like(output),
                         module.lora_scaling)
    return output + (scale - 1) * plain + scale * lora


# default targets per model family: the attention's query and value projections (PEFT's where PEFT has one;
# Phi-3's fused qkv_proj is dstune's choice, written into the exported adapter_config.json)
DEFAULT_TARGETS = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "qwen2_moe",
                     "mixtral"), ("q_proj", "v_proj")),
    "gpt2": ("c_attn",), "phi3": ("qkv_proj",), "bert": ("query", "value"), "t5": ("q", "v"),
}


class Lora(TuningMethod):
    name = "lora"
    description = "LoRA: low-rank updates B·A on chosen linear layers (PEFT-compatible, mergeable)"
    Options = LoraOptions
    steps_aside = True

    @property
    def label(self) -> str:
        o = self.options
        variants = [v for on, v in ((o.use_dora, "DoRA"), (o.use_rslora, "rsLoRA"), (o.loraplus_lr_ratio != 1, "LoRA+"))
                    if on]
        return f"{self.name} ({', '.join(variants)})" if variants else self.name  # a subclass (a plugin): its name

    def apply(self, model: nn.Module, task: str) -> None:
        o = self.options
        self.targets = o.target_modules or list(default_targets(model, self.name, DEFAULT_TARGETS))
        self.wrapped: list[str] = []
        for name, module in list(find_linears(model, self.targets)):
            d_in, d_out = linear_shape(module)
            module.lora_A = nn.Linear(d_in, o.r, bias=False)
            module.lora_B = LoraUp(o.r, d_out, bias=False)
            nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))  # as PEFT: A random, B zero
            nn.init.zeros_(module.lora_B.weight)
            module.lora_dropout = nn.Dropout(o.dropout) if o.dropout else nn.Identity()
            module.lora_scaling = o.alpha / (math.sqrt(o.r) if o.use_rslora else o.r)
            if o.use_dora:
                import deepspeed
                module.lora_magnitude_vector = Magnitude(d_out)
                if has_values(module.lora_magnitude_vector.weight):  # ‖W‖ per row: the model is unchanged at step 0
                    with deepspeed.zero.GatheredParameters([module.weight]), torch.no_grad():
                        module.lora_magnitude_vector.weight.copy_(_rows(module).float().norm(dim=1))
            module.register_forward_hook(_dora_forward if o.use_dora else _lora_forward)
            self.wrapped.append(name)
        train_task_head(model, task)

    def lr_scale(self, param_name: str) -> float:
        return self.options.loraplus_lr_ratio if ".lora_B." in param_name else 1.0

    def merged_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Base weights with the update folded in: W + s·B·A, with DoRA rows rescaled to m / ‖W + s·B·A‖
        (transposed back for GPT-2's Conv1D)."""
        out = {}
        for name in self.wrapped:
            m = model.get_submodule(name)
            with torch.no_grad():
                w = _rows(m).detach() + (m.lora_B.weight @ m.lora_A.weight) * m.lora_scaling
                if self.options.use_dora:
                    w = w * (m.lora_magnitude_vector.weight / w.norm(dim=1))[:, None]
            out[f"{name}.weight"] = w if isinstance(m, nn.Linear) else w.T
        return out

    def peft_adapter(self, model: nn.Module, task: str) -> PeftAdapter:
        o = self.options   # x.lora_A.weight is PEFT's saved name too; DoRA's is x.lora_magnitude_vector
        return PeftAdapter({"peft_type": "LORA", "r": o.r, "lora_alpha": o.alpha, "lora_dropout": o.dropout,
                            "fan_in_fan_out": fan_in_fan_out(model, self.wrapped), "bias": "none",
                            "init_lora_weights": True, "target_modules": list(self.wrapped),
                            "use_rslora": o.use_rslora, "use_dora": o.use_dora},
                           layer_tensors(model, lambda n: n.replace(".lora_magnitude_vector.weight",
                                                                    ".lora_magnitude_vector")))

    @classmethod
    def bench_presets(cls) -> dict[str, list[dict]]:
        spec = {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
        return {"lora": [spec], "qlora": [spec]}

    @classmethod
    def bench_overrides(cls) -> dict[str, list[str]]:
        return {"qlora": ["model.quantize=nf4"]}  # QLoRA: the same LoRA on a 4-bit NormalFloat base
