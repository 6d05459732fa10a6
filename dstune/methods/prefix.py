"""Prefix tuning: P learned keys/values in every self-attention layer, injected at the attention call.

The prefix does not travel through `past_key_values` (whose API changes every transformers release):
dstune registers an attention function with transformers' AttentionInterface that reads the layer's
prefix and calls `dstune.kernels.prefix_attention`. So it works with SDPA, activation checkpointing,
KV-cached generation and ZeRO-3, on GPT-2, Llama (GQA), BERT and T5.

Layout: the prefix of all L layers is one tensor [P, L·2·Hkv·D] (PEFT's layout: layer l's keys at
slot 2l, values at 2l+1), either a plain parameter or, with `projection`, the output of a small MLP
over P embeddings (PEFT's prefix_projection) — folded into a plain tensor at export.

Gated (`gate`, the default; LLaMA-Adapter's zero-init attention): each layer attends to its sequence as
the base model does and, separately, to its prefix, and adds the second times a learned per-head gate that
starts at 0, so step 0 is exactly the base model and the prefix's share grows as it learns. Ungated, the
prefix joins the sequence's softmax as a past cache would (PEFT's prefix tuning; it exports to PEFT).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from dstune.errors import UserError
from dstune.families import family_of
from dstune.kernels import prefix_attention
from dstune.methods.base import TuningMethod, base_model_only, bypassed, gathered_module_by_module, has_values
from dstune.methods.peft_format import PeftAdapter, prompt_learning
from dstune.methods.targets import train_task_head

ATTENTION_NAME = "dstune_prefix"


class PrefixOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(16, gt=0, description="P: prefix keys/values per layer")
    projection: bool = Field(False, description="produce the prefix with an MLP over P embeddings (reparameterisation)")
    projection_hidden: int = Field(512, gt=0, description="hidden size of that MLP")
    gate: bool = Field(True, description="add the prefix's attention through a zero-initialised per-layer, per-head "
                                         "gate (step 0 is the base model); false: one softmax over prefix and "
                                         "sequence, as PEFT (needed for --format peft)")
    init_text: str | None = Field(
        None, description="start from the keys and values the frozen model computes for this text (its tokens "
                          "repeated or cut to P): step 0 is the base model reading the text before every input")
    init: Literal["auto", "data", "random"] = Field(
        "auto", description="without init_text: data (the keys and values of the first P tokens of the training "
                            "inputs: each row's prompt, row after row) or random (N(0, 1) embeddings); auto: data "
                            "for decoder-only models, which read such a prefix as text seen before the input, "
                            "random for encoders (BERT, T5), which never see a past")
    attention: Literal["auto", "shifted", "lower-right", "split", "kernel"] = Field(
        "auto", description="prefix attention path for unmasked blocks: auto (= shifted: plain causal SDPA over P "
                            "placeholder queries + the sequence), lower-right (SDPA with lower-right causality: "
                            "flash attention), split (plain attention's fused kernel + the prefix part, merged "
                            "by log-sum-exp) or kernel (dstune's CUDA kernel); see dstune.kernels")


    @model_validator(mode="after")
    def _path_is_for_ungated(self) -> "PrefixOptions":
        if self.gate and self.attention != "auto":
            raise ValueError(f"attention: {self.attention} picks how an ungated prefix joins the sequence's softmax; "
                             "a gated prefix has its own attention: set gate: false to use it")
        return self


def kv_geometry(config) -> tuple[int, int]:
    """(key/value heads, head dim) of a model config."""
    heads = next(getattr(config, k) for k in ("num_attention_heads", "n_head", "num_heads") if hasattr(config, k))
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    return kv_heads, head_dim


class Gate(nn.Module):
    """Each layer's per-head share of its prefix attention, from 0; called as a module so ZeRO-3 gathers it."""

    def __init__(self, n_layers: int, heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_layers, heads))

    def forward(self) -> torch.Tensor:
        return self.weight


class PrefixEncoder(nn.Module):
    """Produces the [P, L·2·Hkv·D] prefix, directly or through an MLP (tanh, as in Li & Liang)."""

    def __init__(self, n_tokens: int, n_layers: int, kv_heads: int, head_dim: int, projection: bool, hidden: int,
                 gate_heads: int = 0):
        super().__init__()
        self.shape = (n_tokens, n_layers, 2, kv_heads, head_dim)
        token_dim, out = kv_heads * head_dim, n_layers * 2 * kv_heads * head_dim
        self.embedding = nn.Embedding(n_tokens, token_dim if projection else out)
        self.mlp = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out)) if projection else None
        self.register_buffer("positions", torch.arange(n_tokens), persistent=False)
        self.gate = Gate(n_layers, gate_heads) if gate_heads else None

    def forward(self) -> torch.Tensor:
        x = self.embedding(self.positions)
        return self.mlp(x) if self.mlp is not None else x

    @torch.no_grad()
    def start_at(self, prefix: torch.Tensor) -> None:
        """Make the output `prefix` [P, L·2·Hkv·D]: the plain tensor is set; with the MLP, its last layer
        is solved for it (least squares over the hidden activations: exact while P <= the hidden size)."""
        if self.mlp is None:
            self.embedding.weight.copy_(prefix)
            return
        hidden = self.mlp[1](self.mlp[0](self.embedding(self.positions)))
        self.mlp[2].weight.copy_((torch.linalg.pinv(hidden.double()) @ prefix.double()).T)
        self.mlp[2].bias.zero_()


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
               position_bias=None, **kwargs):
    """The registered attention function: plain attention plus this layer's prefix, if it has one."""
    captured = getattr(module, "_dstune_capture", None)
    if captured is not None:  # Prefix._init_from_tokens: this layer's keys and values for the text
        captured.append((key.detach(), value.detach()))
    prefix = getattr(module, "_dstune_prefix", None)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if prefix is None:  # e.g. T5 cross-attention: no prefix there
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    pk, pv, gate = prefix
    if gate is not None:
        return _gated(module, query, key, value, attention_mask, pk.to(query.dtype), pv.to(query.dtype),
                      gate.to(query.dtype), dropout, scaling, is_causal, position_bias, **kwargs), None
    out = prefix_attention(query, key, value, pk.to(query.dtype), pv.to(query.dtype), attention_mask, causal,
                           scaling, position_bias, dropout, module._dstune_prefix_path)
    return out, None


def _gated(module, query, key, value, attention_mask, pk, pv, gate, dropout, scaling, is_causal, position_bias,
           **kwargs) -> torch.Tensor:
    """The sequence part exactly as the base model's SDPA attention computes it, plus gate × the attention
    of the same queries over the prefix alone (every prefix key visible to every query): [B, S, Hq, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    seq, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    is_causal=is_causal, position_bias=position_bias, **kwargs)
    B = query.shape[0]
    pre = torch.nn.functional.scaled_dot_product_attention(
        query, pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1), scale=scaling,
        dropout_p=dropout if module.training else 0.0, enable_gqa=query.shape[1] != pk.shape[0])
    return seq + gate[None, None, :, None] * pre.transpose(1, 2)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # same masks as SDPA (None when causal suffices)


def _distribute(model: nn.Module, args, kwargs):
    """Forward pre-hook: compute all layers' prefixes once, hand each attention module its slice, and
    number the real tokens after the prefix (positions P, P+1, ...), as when the prefix is a past cache."""
    if bypassed(model):  # scoring the untouched base (base_model_only)
        for attn in model._dstune_attention:
            attn._dstune_prefix = None
        return args, kwargs
    enc: PrefixEncoder = model.dstune_prefix
    kv = enc().view(enc.shape)  # [P, L, 2, Hkv, D]
    gates = enc.gate() if enc.gate is not None else None
    for i, attn in enumerate(model._dstune_attention):
        attn._dstune_prefix = (kv[:, i, 0].transpose(0, 1), kv[:, i, 1].transpose(0, 1),  # [Hkv, P, D] each
                               None if gates is None else gates[i])
    # T5 has relative positions: nothing to shift; a gated prefix is a side memory, not a past: the tokens
    # keep the base model's positions
    if not model.config.is_encoder_decoder and enc.gate is None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"][..., 0]
        positions = kwargs.get("position_ids")
        if positions is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # "cache" from transformers 5.24 on
            past = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)[None]
        kwargs["position_ids"] = positions + enc.shape[0]
    return args, kwargs


class Prefix(TuningMethod):
    name = "prefix"
    description = "prefix tuning: learned per-layer key/value prefixes (optional MLP reparameterisation)"
    Options = PrefixOptions
    steps_aside = True
    mergeable = False  # extra keys/values are not a weight change

    def __init__(self, options: PrefixOptions):
        super().__init__(options)
        self.changes_output_at_init = not options.gate   # a closed gate is the base model

    def apply(self, model: nn.Module, task: str) -> None:
        kind = model.config.model_type
        if getattr(model.config, "attn_logit_softcapping", None):
            raise UserError(f"methods (prefix): {kind} soft-caps its attention logits, which no prefix attention "
                            "path does; use lora, ia3 or adapter")
        suffix = family_of(model).self_attention
        attention = [m for n, m in model.named_modules() if suffix and n.endswith("." + suffix)]  # in layer order
        if not attention:
            raise UserError(f"methods (prefix): no self-attention layout known for model type {kind!r}; add it to "
                            "dstune/families.py")
        kv_heads, head_dim = kv_geometry(model.config)
        o = self.options
        heads = next(getattr(model.config, k) for k in ("num_attention_heads", "n_head", "num_heads")
                     if hasattr(model.config, k))
        model.dstune_prefix = PrefixEncoder(o.num_virtual_tokens, len(attention), kv_heads, head_dim, o.projection,
                                            o.projection_hidden, heads if o.gate else 0)
        object.__setattr__(model, "_dstune_attention", attention)  # plain list: not registered as submodules
        for attn in attention:
            attn._dstune_prefix_path = o.attention
        model.register_forward_pre_hook(_distribute, with_kwargs=True)
        register_attention()
        model.set_attn_implementation(ATTENTION_NAME)
        from transformers import PreTrainedModel
        for sub in model.modules():  # transformers < 5.23 leaves e.g. T5's encoder/decoder stacks on sdpa
            if isinstance(sub, PreTrainedModel) and sub.config._attn_implementation != ATTENTION_NAME:
                sub.set_attn_implementation(ATTENTION_NAME)
        decoder_only = not model.config.is_encoder_decoder and all(getattr(a, "is_causal", False) for a in attention)
        ids = self.init_ids(from_data=o.init == "data" or o.init == "auto" and decoder_only)
        if ids is not None and has_values(model.dstune_prefix.embedding.weight):  # not in the (shapes-only) estimate
            self._init_from_tokens(model, attention, ids)
        train_task_head(model, task)

    def _init_from_tokens(self, model: nn.Module, attention: list[nn.Module], ids: torch.Tensor) -> None:
        """Run the frozen model once on these P tokens (no prefix, positions from 0) and start each layer's
        prefix at the keys and values it computed: a past cache of the text. Under ZeRO-3 the base is
        gathered module by module for that one forward."""
        ids, P = ids[None], self.options.num_virtual_tokens
        training = model.training
        for attn in attention:
            attn._dstune_capture = []
        try:
            with gathered_module_by_module(model), torch.no_grad(), base_model_only(model):
                model.eval()
                model(input_ids=ids, **({"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}))
            kv = torch.stack([torch.stack(attn._dstune_capture[0]) for attn in attention])  # [L, 2, 1, Hkv, P, D]
        finally:
            for attn in attention:
                attn._dstune_capture = None
            model.train(training)
        model.dstune_prefix.start_at(kv[:, :, 0].permute(3, 0, 1, 2, 4).reshape(P, -1).float())

    def peft_adapter(self, model: nn.Module, task: str) -> PeftAdapter:
        if self.options.gate:
            raise UserError("--format peft: a gated prefix (methods.prefix.gate, the default) has no PEFT form: "
                            "PEFT's prefix shares the sequence's softmax and has no gate; train with gate: false "
                            "to export it, or use the run dir (dstune eval / generate)")
        kv_heads, head_dim = kv_geometry(model.config)
        adapter = prompt_learning(model, "PREFIX_TUNING", self.options.num_virtual_tokens, self.folded_prefix(model),
                                  kv_heads * head_dim, kv_heads, num_layers=model.dstune_prefix.shape[1],
                                  prefix_projection=False)  # the MLP is folded into the tensor
        if task == "causal_lm":  # shown by a test on Llama; not checked for T5
            adapter.note = ("PEFT's generate() does not apply prefix adapters on transformers 5.24+ (it drops the "
                            "past_key_values PEFT hands in): its forward uses the prefix, its replies ignore it; "
                            "`dstune generate RUN_DIR` applies it")
        return adapter

    @classmethod
    def bench_presets(cls) -> dict[str, list[dict]]:
        # ungated: PEFT's prefix tuning, which the peer runs, and the attention paths under comparison
        return {"prefix": [{"name": "prefix", "num_virtual_tokens": 32, "gate": False}],
                "prefix-split": [{"name": "prefix", "num_virtual_tokens": 32, "gate": False, "attention": "split"}],
                "prefix-lower-right": [{"name": "prefix", "num_virtual_tokens": 32, "gate": False,
                                        "attention": "lower-right"}],
                "prefix-gated": [{"name": "prefix", "num_virtual_tokens": 32}]}

    def folded_prefix(self, model: nn.Module) -> torch.Tensor:
        """The [P, L·2·Hkv·D] prefix as a plain tensor (the MLP, if any, evaluated and dropped)."""
        with torch.no_grad():
            return model.dstune_prefix().detach().float()
