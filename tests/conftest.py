"""Session fixtures: a SentencePiece tokenizer trained here, tiny saved models and data for every task, the
DeepSpeed CPU op built once, a tiny GGUF file; the test session's environment. Shared helpers (running the
CLI, recipes) are in helpers.py and cli_runner.py."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Set before torch is imported (helpers imports it), here and in every process the tests start:
# the JIT cache of ops (the Makefile keeps one in .torch_extensions between runs), else one per session
os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="dstune-ext-"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# precision `auto` is not measured in tests (engine/cpu_probe.py): bf16 where the CPU runs it natively, as before
os.environ.setdefault("DSTUNE_CPU_PRECISION", "bf16")
# GGUF bases dequantized once per session (models/gguf_cache.py), not into the user's ~/.cache
os.environ.setdefault("DSTUNE_MODEL_CACHE", tempfile.mkdtemp(prefix="dstune-models-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# launchers, ranks and op builds all find this venv's tools first (another `ninja` rebuilds every op)
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

from cli_runner import close_pools  # noqa: E402
from helpers import NEG, POS, sentence, write_jsonl  # noqa: E402


def pytest_unconfigure(config):
    close_pools()  # the ranks of pooled multi-rank runs (tests/cli_runner.py)


@pytest.fixture(scope="session")
def ws(tmp_path_factory) -> Path:
    """Workspace: tokenizer/, data files, and tiny saved models (gpt2, llama, bert, t5)."""
    import torch

    from dstune.families import tiny_config
    from dstune.models.tokenizers import load_tokenizer, train_sentencepiece

    root = tmp_path_factory.mktemp("ws")
    rng = random.Random(0)
    (root / "corpus.txt").write_text("".join(sentence(rng, POS + NEG) + "\n" for _ in range(400)))
    train_sentencepiece([str(root / "corpus.txt")], str(root / "tokenizer"), vocab_size=120)
    tok = load_tokenizer(str(root / "tokenizer"))

    # 256 training rows: with fewer, a tiny BERT memorises them and its held-out loss is noise
    cls = [{"text": sentence(rng, POS if i % 2 else NEG), "label": "pos" if i % 2 else "neg"} for i in range(320)]
    write_jsonl(root / "cls_train.jsonl", cls[:256])
    write_jsonl(root / "cls_eval.jsonl", cls[256:])
    write_jsonl(root / "lm.jsonl", [{"text": sentence(rng, POS)} for _ in range(96)])
    pairs = [{"prompt": f"say {w}", "response": f"{w} {w} it is"} for w in (POS + NEG) * 6]
    write_jsonl(root / "chat.jsonl", pairs)
    write_jsonl(root / "s2s.jsonl", [{"source": f"copy {w} and {v}", "target": f"{w} {v}"}
                                      for w in POS + NEG for v in POS[:4]])

    import transformers as T
    special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    for family, auto in (("gpt2", T.AutoModelForCausalLM), ("llama", T.AutoModelForCausalLM),
                         ("bert", T.AutoModelForSequenceClassification), ("t5", T.AutoModelForSeq2SeqLM)):
        torch.manual_seed(0)
        auto.from_config(tiny_config(family, len(tok), special)).save_pretrained(root / family)
        tok.save_pretrained(root / family)
    return root


@pytest.fixture(scope="session")
def built_ops(ws) -> None:
    """Build DeepSpeed's CPU comm op once, before any ranks start (they would race to build it); behind dstune's
    build lock, so a build an earlier, killed test run left half-way is cleared rather than waited on."""
    code = ("from dstune.kernels.build import guard_jit_builds; guard_jit_builds(); "
            "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def tiny_gguf(ws) -> Path:
    """A folder holding tiny.gguf: the tiny Llama and the SentencePiece vocabulary written as an fp32 GGUF
    file with the `gguf` package (transformers loads it as it loads a real one)."""
    return write_gguf(ws, ws / "gguf", "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_gguf_q8(ws) -> Path:
    """A folder holding tiny-q8_0.gguf: the same, its matrices quantized to Q8_0 (dequantizing it changes
    the weights, as a real quantized file does)."""
    return write_gguf(ws, ws / "gguf-q8", "tiny-q8_0.gguf", quantized=True)


def write_gguf(ws: Path, out: Path, file_name: str, quantized: bool = False) -> Path:
    import gguf
    import sentencepiece as spm
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(ws / "llama")
    c = model.config
    sp = spm.SentencePieceProcessor(model_file=str(ws / "tokenizer" / "tokenizer.model"))
    out.mkdir(exist_ok=True)
    w = gguf.GGUFWriter(str(out / file_name), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_embedding_length(c.hidden_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("llama")
    n = sp.get_piece_size()
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 1 for i in range(n)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_pad_token_id(sp.pad_id())
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in model.state_dict().items():
        module = name.removesuffix(".weight")
        if module.startswith("model.layers."):
            _, _, i, rest = module.split(".", 3)
            key = f"blk.{i}.{layer[rest]}"
        else:
            key = top[module]
        if quantized and t.dim() == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(f"{key}.weight", gguf.quants.quantize(t.float().numpy(), q8), raw_dtype=q8)
        else:
            w.add_tensor(f"{key}.weight", t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
