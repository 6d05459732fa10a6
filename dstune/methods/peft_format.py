"""PEFT's on-disk format, shared by the methods that export to it (each method builds its own adapter)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dstune.methods.targets import TASK_HEADS


@dataclass
class PeftAdapter:
    """A method's trained state as PEFT saves it: adapter_config.json fields (beyond the task type, base
    and task heads, which `dstune export` adds) and the adapter_model.safetensors tensors."""
    config: dict
    tensors: dict[str, torch.Tensor]
    note: str | None = None   # what PEFT will not do with it, printed by `dstune export`


def task_head_tensors(model: nn.Module, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """The trained task heads (PEFT's modules_to_save), under PEFT's names."""
    return {f"{prefix}{n}": p.detach().contiguous() for n, p in model.named_parameters()
            if p.requires_grad and n.split(".")[0] in TASK_HEADS}


def layer_tensors(model: nn.Module, rename=lambda name: name) -> dict[str, torch.Tensor]:
    """What trains, under PEFT's names for a LoRA-style (module-wrapping) adapter: `base_model.model.` + the
    parameter's name as `rename` makes it (task heads keep theirs)."""
    return {f"base_model.model.{n if n.split('.')[0] in TASK_HEADS else rename(n)}": p.detach().contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def fan_in_fan_out(model: nn.Module, names: list[str]) -> bool:
    """GPT-2's Conv1D stores its weight transposed; PEFT needs to be told."""
    from transformers.pytorch_utils import Conv1D
    return any(isinstance(model.get_submodule(n), Conv1D) for n in names)


def prompt_learning(model: nn.Module, peft_type: str, num_virtual_tokens: int, embeddings: torch.Tensor,
                    token_dim: int, heads: int, **config) -> PeftAdapter:
    """A prompt-learning adapter (prompt or prefix tuning): one `prompt_embeddings` tensor."""
    config = {"peft_type": peft_type, "num_virtual_tokens": num_virtual_tokens, "token_dim": token_dim,
              "num_transformer_submodules": 1, "num_attention_heads": heads, **config}
    # prompt-learning PEFT models wrap the base model one level less deep than LoRA/IA3 ones
    return PeftAdapter(config, {"prompt_embeddings": embeddings.contiguous(),
                                **task_head_tensors(model, "base_model.")})
