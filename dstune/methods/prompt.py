"""Soft prompt tuning: P learned embeddings prepended to the input embeddings (after [CLS] where a
classifier reads the first token: BERT pools it, and prepended it would pool a virtual token instead)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dstune.data.batching import IGNORE
from dstune.errors import UserError
from dstune.families import family_of
from dstune.methods.base import TuningMethod, bypassed, has_values
from dstune.methods.peft_format import PeftAdapter, prompt_learning
from dstune.methods.targets import train_task_head


class PromptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(16, gt=0, description="P: learned embeddings added to every input")
    init_text: str | None = Field(None, description="initialise from this text's token embeddings (repeated to P)")
    init: Literal["vocab", "random"] = Field(
        "vocab", description="without init_text: vocab (embeddings of P tokens drawn from the vocabulary, PEFT's "
                             "SAMPLE_VOCAB: inputs the model has seen) or random (N(0, 1), far from any token)")
    position: Literal["auto", "start", "after_first"] = Field(
        "auto", description="where the virtual tokens go: start (before the input, as PEFT) or after_first (after "
                            "the input's first token, so a classifier that reads [CLS] still finds it first, at "
                            "position 0; classification only); auto: after_first for families whose classifier "
                            "reads the first token (BERT), else start")


class SoftPrompt(nn.Module):
    def __init__(self, n_tokens: int, dim: int, at: int = 0):
        super().__init__()
        self.at = at  # the input tokens before it
        self.embedding = nn.Embedding(n_tokens, dim)
        self.register_buffer("positions", torch.arange(n_tokens), persistent=False)

    def forward(self, batch: int) -> torch.Tensor:
        return self.embedding(self.positions)[None].expand(batch, -1, -1)


def _prepend(model: nn.Module, args, kwargs):
    """Forward pre-hook: input_ids → [prompt; token embeddings]; masks and labels grow to match.

    Every call gets the prompt, so generation runs without a KV cache (the cache would hold it once)."""
    if bypassed(model):  # scoring the untouched base (base_model_only)
        return args, kwargs
    ids = kwargs.pop("input_ids", None)
    if ids is None and args:
        ids, args = args[0], args[1:]
    if ids is None:
        return args, kwargs
    prompt = model.dstune_prompt(ids.shape[0])
    model._dstune_real_len = ids.shape[1]
    embeds = model.get_input_embeddings()(ids)
    at = model.dstune_prompt.at  # 0, or 1: after [CLS]
    kwargs["inputs_embeds"] = torch.cat([embeds[:, :at], prompt.to(embeds.dtype), embeds[:, at:]], dim=1)
    P = prompt.shape[1]
    pad = lambda t, value: torch.cat([t[:, :at], t.new_full((t.shape[0], P), value), t[:, at:]], dim=1)  # noqa: E731
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = pad(kwargs["attention_mask"], 1)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = pad(kwargs["token_type_ids"], 0)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2 and not model.config.is_encoder_decoder:
        kwargs["labels"] = pad(labels, IGNORE)  # virtual tokens are never targets
    positions = kwargs.pop("position_ids", None)
    kwargs.pop("cache_position", None)  # let the model number the longer sequence itself...
    if positions is not None and kwargs.get("attention_mask") is None:  # ...unless documents are packed
        kwargs["position_ids"] = torch.cat([torch.arange(P, device=ids.device).expand(ids.shape[0], -1),
                                            positions.expand(ids.shape[0], -1) + P], dim=1)
        kwargs["attention_mask"] = _packed_mask(positions.expand(ids.shape[0], -1), P, embeds.dtype)
    return args, kwargs


def _packed_mask(positions: torch.Tensor, P: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, P+T, P+T] mask for packed documents behind P virtual tokens: every document sees the
    virtual tokens and itself, causally. Documents start where the position does not follow on by one."""
    starts = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1) != 1
    doc = torch.cat([positions.new_full((positions.shape[0], P), -1), starts.cumsum(-1)], dim=1)
    L = doc.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc.device).tril()
    allowed = causal & ((doc[:, :, None] == doc[:, None, :]) | (doc[:, None, :] == -1))
    return torch.zeros(allowed.shape, dtype=dtype, device=doc.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def _drop_virtual_positions(model: nn.Module, args, kwargs, output):
    """Forward hook: logits only for the real tokens (the loss was already computed over all of them)."""
    if bypassed(model):
        return output
    real = model._dstune_real_len  # logits may cover fewer positions (generate keeps only the last)
    if getattr(output, "logits", None) is not None and output.logits.dim() == 3 and output.logits.shape[1] > real:
        output.logits = output.logits[:, -real:]
    return output


class Prompt(TuningMethod):
    name = "prompt"
    description = "soft prompt tuning: P learned input embeddings, from vocabulary tokens, a text or random"
    Options = PromptOptions
    steps_aside = True
    mergeable = False
    generate_kwargs = {"use_cache": False}
    first_label_is_target = True
    changes_output_at_init = True

    def apply(self, model: nn.Module, task: str) -> None:
        if model.config.is_encoder_decoder:
            raise UserError("methods (prompt): encoder-decoder models are not supported; use prefix or lora")
        o = self.options
        emb = model.get_input_embeddings()
        dim = getattr(emb.weight, "ds_shape", emb.weight.shape)[1]  # ZeRO-3: the real shape
        model.dstune_prompt = SoftPrompt(o.num_virtual_tokens, dim, int(self._after_first(model, task)))
        if has_values(emb.weight):  # a shapes-only model (the estimate) has nothing to copy
            if o.init_text:
                self._copy_rows(model, emb, self.init_ids())
            elif o.init == "vocab":
                vocab = getattr(emb.weight, "ds_shape", emb.weight.shape)[0]
                # drawn from the run's seed alone, whatever else used the RNG (ZeRO-3's set-up, the ranks)
                ids = torch.randint(0, vocab, (o.num_virtual_tokens,),
                                    generator=torch.Generator().manual_seed(torch.initial_seed()))
                self._copy_rows(model, emb, ids)
        model.register_forward_pre_hook(_prepend, with_kwargs=True)
        if task == "causal_lm":
            model.register_forward_hook(_drop_virtual_positions, with_kwargs=True)
        train_task_head(model, task)

    def _after_first(self, model: nn.Module, task: str) -> bool:
        position = self.options.position
        if position == "auto":
            return task == "classification" and family_of(model).reads_first_token
        if position == "after_first" and task != "classification":
            raise UserError(f"methods (prompt).position: after_first is for classifiers that read the first "
                            f"token; a {task} model's prompt goes at the start")
        return position == "after_first"

    def peft_adapter(self, model: nn.Module, task: str) -> PeftAdapter:
        if model.dstune_prompt.at:
            raise UserError("--format peft: this soft prompt sits after the input's first token (methods.prompt."
                            "position; auto puts it after BERT's [CLS], which the classifier reads); PEFT prepends "
                            "it before: train with position: start to export it")
        w = model.dstune_prompt.embedding.weight.detach().float()
        return prompt_learning(model, "PROMPT_TUNING", self.options.num_virtual_tokens, w, w.shape[1],
                               model.config.num_attention_heads,
                               # how PEFT would start it (the saved weights replace that); TEXT would make PEFT
                               # ask for a tokenizer at load
                               prompt_tuning_init="SAMPLE_VOCAB" if self.options.init == "vocab"
                               and not self.options.init_text else "RANDOM",
                               num_layers=model.config.num_hidden_layers)

    @classmethod
    def bench_presets(cls) -> dict[str, list[dict]]:
        return {"prompt": [{"name": "prompt", "num_virtual_tokens": 32}]}

    @staticmethod
    def _copy_rows(model: nn.Module, emb: nn.Module, ids: torch.Tensor) -> None:
        """The prompt starts as these tokens' input embeddings (gathered whole under ZeRO-3)."""
        import deepspeed
        with deepspeed.zero.GatheredParameters([emb.weight]), torch.no_grad():
            model.dstune_prompt.embedding.weight.copy_(emb.weight[ids].float())
