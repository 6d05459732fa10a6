"""One spec per model family: everything dstune needs to know about a transformers `model_type`.

An entry says what the family has: its blocks, where attention and the MLP end, which classes are
Llama-style, what a user should know. Methods (where adapters and prefixes attach), the memory estimate (how
many blocks), the lean activation paths and `model.tiny` (the 2-layer test models) read it; what a method
picks by default (LoRA's and IA3's targets) lives with that method. A model type missing from the table is
described by `discover` from its module tree. Adding a family is one entry here, plus a line in each
method's default-target table (tests/test_methods.py trains every method on every family).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dstune.errors import UserError

# heads created for the task (not in the pretrained weights): they always train under PEFT methods, as PEFT's
# `modules_to_save` does for sequence classification, and stay in full precision on a quantized base
TASK_HEADS = ("classifier", "score")


@dataclass(frozen=True)
class Family:
    model_type: str
    config_class: str                    # transformers config class of the tiny model
    tiny: dict[str, Any]                 # its settings: 2 blocks, 32 wide, dropout off
    layer_counts: tuple[str, ...] = ("num_hidden_layers",)  # config fields whose sum is the number of blocks
    self_attention: str = "self_attn"    # each block's self-attention module (it calls the attention function)
    attention_out: str = "self_attn.o_proj"  # the projection that ends the attention sublayer (adapters go after)
    mlp_out: str = "mlp.down_proj"       # ... and the one that ends the MLP (an MoE block: the block itself)
    rmsnorm: str | None = None           # the RMSNorm class, when it is Llama's `weight * normalised` form
    swiglu_mlp: str | None = None        # the MLP class, when it is Llama's `down(silu(gate(x)) * up(x))`
    experts: str | None = None           # MoE: the module holding the experts' fused 3-D weights
    router: str | None = None            # MoE: the router (its weight picks each token's experts)
    reads_first_token: bool = False      # its sequence classifier pools the first token ([CLS]): a soft prompt
                                         # goes after it, so the classifier still reads [CLS] at position 0
    notes: tuple[str, ...] = field(default=())  # what a user of this family should know (README table)

    def num_layers(self, config: Any) -> int:
        """Transformer blocks in the model (T5: encoder plus decoder)."""
        return sum(int(getattr(config, k)) for k in self.layer_counts)

    def active_expert_fraction(self, config: Any) -> float:
        """The share of expert weights one token runs through: top-k of E experts (1 for a dense model)."""
        if not self.experts:
            return 1.0
        experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts")
        return config.num_experts_per_tok / experts

    def depth(self, config: Any) -> int:
        """Blocks in the deepest stack: the range of a block index (T5's encoder and decoder count from 0 each)."""
        return max(int(getattr(config, k)) for k in self.layer_counts)


LLAMA_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512)
MOE_NOTE = ("experts are fused 3-D weights in transformers 5, not linear layers: LoRA and IA3 attach to "
            "attention (and shared-expert linears) and leave experts and routers frozen, as PEFT's Mixtral "
            "default does; `full` trains them all; routers alone: {name: freeze, patterns: ['^(?!.*mlp\\.gate\\.)']}")

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("gpt2", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=512, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0),
           layer_counts=("n_layer",), self_attention="attn", attention_out="attn.c_proj", mlp_out="mlp.c_proj"),
    Family("llama", "LlamaConfig", LLAMA_SHAPE, rmsnorm="LlamaRMSNorm", swiglu_mlp="LlamaMLP"),
    Family("mistral", "MistralConfig", LLAMA_SHAPE, rmsnorm="MistralRMSNorm", swiglu_mlp="MistralMLP"),
    Family("qwen2", "Qwen2Config", LLAMA_SHAPE, rmsnorm="Qwen2RMSNorm", swiglu_mlp="Qwen2MLP"),
    Family("qwen3", "Qwen3Config", {**LLAMA_SHAPE, "head_dim": 8}, rmsnorm="Qwen3RMSNorm", swiglu_mlp="Qwen3MLP"),
    Family("gemma", "GemmaConfig", {**LLAMA_SHAPE, "head_dim": 8},
           notes=("RMSNorm scales by 1 + weight and the MLP is GeGLU: the lean activation paths leave them",)),
    Family("gemma2", "Gemma2Config", {**LLAMA_SHAPE, "head_dim": 8},
           notes=("soft-capped attention logits: no prefix path computes them, so prefix tuning refuses Gemma 2",)),
    Family("gemma3_text", "Gemma3TextConfig", {**LLAMA_SHAPE, "head_dim": 8},
           notes=("sliding-window layers: a prefix stays visible to every position, as a past cache would",)),
    Family("phi3", "Phi3Config", {**LLAMA_SHAPE, "resid_pdrop": 0.0, "embd_pdrop": 0.0}, rmsnorm="Phi3RMSNorm",
           notes=("fused qkv_proj and gate_up_proj: PEFT has no default targets for phi3; dstune's are "
                  "written into the exported adapter_config.json",)),
    Family("qwen2_moe", "Qwen2MoeConfig", {**LLAMA_SHAPE, "moe_intermediate_size": 16, "num_experts": 4,
                                           "num_experts_per_tok": 2, "shared_expert_intermediate_size": 32},
           mlp_out="mlp", rmsnorm="Qwen2MoeRMSNorm",
           experts="mlp.experts", router="mlp.gate", notes=(MOE_NOTE,)),
    Family("mixtral", "MixtralConfig", {**LLAMA_SHAPE, "num_local_experts": 4, "num_experts_per_tok": 2},
           mlp_out="mlp", rmsnorm="MixtralRMSNorm",
           experts="mlp.experts", router="mlp.gate", notes=(MOE_NOTE,)),
    Family("bert", "BertConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0),
           self_attention="attention.self", attention_out="attention.output.dense", mlp_out="output.dense",
           reads_first_token=True),
    Family("t5", "T5Config", dict(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=2,
                                  dropout_rate=0.0),
           layer_counts=("num_layers", "num_decoder_layers"), self_attention="SelfAttention",
           attention_out="SelfAttention.o", mlp_out="DenseReluDense.wo"),
)}


def tiny_config(model_type: str, vocab_size: int, special: dict[str, int],
                overrides: dict[str, Any] | None = None) -> Any:
    """A 2-block, 32-wide config of a family, dropout off (so runs are comparable across world sizes).

    `overrides` go to the config's constructor, so derived fields (a Llama's head_dim) follow them.
    """
    import transformers
    if model_type not in FAMILIES:
        raise UserError(f"model.tiny: unknown family {model_type!r}; known: {', '.join(sorted(FAMILIES))}")
    f = FAMILIES[model_type]
    cls = getattr(transformers, f.config_class)
    extra = {"decoder_start_token_id": special.get("pad_token_id", 0)} if model_type == "t5" else {}
    settings = {**f.tiny, **extra, "vocab_size": vocab_size, **special, **(overrides or {})}
    # special ids the class defaults to past this vocabulary (Phi-3's pad id is 32000) are dropped
    defaults = cls()
    outside = {k: None for k in SPECIAL_IDS if k not in settings
               and isinstance(getattr(defaults, k, None), int) and getattr(defaults, k) >= settings["vocab_size"]}
    return cls(**settings, **outside)


SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def family_of(model: Any) -> Family:
    """The model's family spec: from the table, else discovered from its module tree."""
    kind = model.config.model_type
    return FAMILIES[kind] if kind in FAMILIES else discover(model)


def config_family(config: Any) -> Family | None:
    """The table's spec for a config (no model built), or None for a model type not in the table."""
    return FAMILIES.get(config.model_type)


def discover(model: Any) -> Family:
    """A spec for a model type not in the table: its blocks are the longest list of like modules, its
    self-attention the block child named like one. Targets for LoRA/IA3 cannot be guessed: the recipe names
    them (the notes list the block's linear layers, which the methods' error shows)."""
    from torch import nn
    kind = model.config.model_type
    stacks = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
              and len({type(b) for b in m}) == 1]
    if not stacks:
        raise UserError(f"model type {kind!r} is not in dstune's family table (dstune/families.py) and has no list "
                        "of transformer blocks to find its layers by; add a Family entry for it")
    name, blocks = max(stacks, key=lambda s: len(s[1]))
    attention = next((n for n, _ in blocks[0].named_children() if "attn" in n.lower() or "attention" in n.lower()),
                     None)
    linears = sorted({n.rsplit(".", 1)[-1] for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)})
    return Family(kind, "", {}, layer_counts=(), self_attention=attention or "", attention_out="", mlp_out="",
                  notes=(f"discovered: {len(blocks)} blocks at {name}, self-attention {attention!r}, "
                         f"linear layers {', '.join(linears)}",))


def num_layers(config: Any) -> int:
    """Transformer blocks of a config's model (T5: encoder plus decoder); config fields for an unknown type."""
    f = config_family(config)
    if f is not None:
        return f.num_layers(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, key, None):
            return int(getattr(config, key)) + int(getattr(config, "num_decoder_layers", 0) or 0)
    raise UserError(f"cannot tell how many layers a {config.model_type} model has; add it to dstune/families.py")


def depth(config: Any) -> int:
    """The range of a block index: blocks in the deepest stack (T5's encoder and decoder each count from 0)."""
    f = config_family(config)
    return f.depth(config) if f is not None else num_layers(config)
