"""IA3: learned vectors that rescale chosen activations (keys, values, feed-forward inputs)."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dstune.methods.base import TuningMethod, bypassed
from dstune.methods.peft_format import PeftAdapter, fan_in_fan_out, layer_tensors
from dstune.methods.targets import default_targets, find_linears, linear_shape, matches, train_task_head
from dstune.models.quantize import dequantized


class IA3Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target_modules: list[str] | None = Field(None, description="module names to rescale; default: PEFT's per-family choice")
    feedforward_modules: list[str] | None = Field(
        None, description="of those, the ones whose *input* is rescaled; default: PEFT's per-family choice")


class Scale(nn.Module):
    """A learned per-feature scale, initialised to 1 (the model is unchanged at step 0)."""

    def __init__(self, shape: tuple[int, int]):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.flatten().to(x.dtype)


def _scale_output(module, args, output):
    return output if bypassed(module) else module.ia3_l(output)


def _scale_input(module, args):
    return args if bypassed(module) else (module.ia3_l(args[0]), *args[1:])


# default targets per model family, and of those the feed-forward ones (their input is scaled, not their
# output): keys, values and the MLP's output projection, PEFT's where PEFT has one
DEFAULT_TARGETS = {  # family: (targets, feed-forward targets)
    **dict.fromkeys(("llama", "mistral"), (("k_proj", "v_proj", "down_proj"), ("down_proj",))),
    **dict.fromkeys(("qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
                    (("q_proj", "v_proj", "down_proj"), ("down_proj",))),
    "phi3": (("qkv_proj", "down_proj"), ("down_proj",)),
    "qwen2_moe": (("k_proj", "v_proj", "shared_expert.down_proj"), ("shared_expert.down_proj",)),
    "mixtral": (("k_proj", "v_proj"), ()),  # experts are fused 3-D weights, not linear layers
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "t5": (("k", "v", "wo"), ("wo",)),
}


class IA3(TuningMethod):
    name = "ia3"
    description = "IA3: rescale keys, values and feed-forward inputs by learned vectors (mergeable)"
    Options = IA3Options
    steps_aside = True

    def apply(self, model: nn.Module, task: str) -> None:
        o = self.options
        if o.target_modules is None:
            targets, feedforward = map(list, default_targets(model, self.name, DEFAULT_TARGETS))
        else:
            targets, feedforward = o.target_modules, []
        self.targets = targets
        self.feedforward = o.feedforward_modules if o.feedforward_modules is not None else feedforward
        self.wrapped: list[tuple[str, bool]] = []
        for name, module in list(find_linears(model, self.targets)):
            d_in, d_out = linear_shape(module)
            ff = matches(name, self.feedforward)
            module.ia3_l = Scale((1, d_in) if ff else (d_out, 1))  # PEFT's shapes, for export
            if ff:
                module.register_forward_pre_hook(_scale_input)
            else:
                module.register_forward_hook(_scale_output)
            self.wrapped.append((name, ff))
        train_task_head(model, task)

    def merged_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Scaling an input (output) feature = scaling that column (row) of W; biases scale with outputs."""
        out = {}
        for name, ff in self.wrapped:
            m = model.get_submodule(name)
            v = m.ia3_l.weight.detach().flatten()
            linear = isinstance(m, nn.Linear)  # Conv1D stores W transposed: [in, out]
            if ff:
                out[f"{name}.weight"] = dequantized(m).detach() * (v[None, :] if linear else v[:, None])
            else:
                out[f"{name}.weight"] = dequantized(m).detach() * (v[:, None] if linear else v[None, :])
                if m.bias is not None:
                    out[f"{name}.bias"] = m.bias.detach() * v
        return out

    def peft_adapter(self, model: nn.Module, task: str) -> PeftAdapter:
        names = [n for n, _ in self.wrapped]
        return PeftAdapter({"peft_type": "IA3", "target_modules": names,
                            "feedforward_modules": [n for n, ff in self.wrapped if ff],
                            "fan_in_fan_out": fan_in_fan_out(model, names), "init_ia3_weights": True},
                           layer_tensors(model, lambda n: n.removesuffix(".weight")))  # x.ia3_l.weight → x.ia3_l
