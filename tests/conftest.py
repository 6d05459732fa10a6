"""Shared fixtures: a SentencePiece tokenizer trained here, tiny saved models, data for every task,
and a launcher helper that runs the real CLI (1 process, or N ranks through torchrun) with a timeout."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 420

POS = "good great fine lovely superb fun moving clever".split()
NEG = "bad awful dull boring poor weak messy tedious".split()
FILLER = "the movie film plot actor scene was is a an and it this".split()


def pytest_configure(config):
    # one JIT cache per test session: a build killed half-way elsewhere leaves a lock that hangs forever
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="dstune-ext-"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # launchers, ranks and op builds all find this venv's tools first (another `ninja` rebuilds every op)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts ranks in their own sessions)."""
    import psutil
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for p in parent.children(recursive=True) + [parent]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def run_cli(args: list[str], nproc: int = 1, cwd: Path | None = None, timeout: int = LAUNCH_TIMEOUT_S,
            env: dict | None = None, launcher: str = "torchrun",
            command: list[str] | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run `dstune ARGS` as one process (`command`, default this venv's `python -m dstune`), or with `nproc`
    ranks under torchrun or the `deepspeed` launcher, `input` on its stdin; kill the whole process tree on
    timeout."""
    if nproc == 1:
        cmd = [*(command or [sys.executable, "-m", "dstune"]), *args]
    elif launcher == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
               str(free_port()), "--module", "dstune", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "dstune", *args]
    e = {**os.environ, **(env or {})}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    proc = subprocess.Popen(cmd, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, stdin=subprocess.PIPE if input is not None else None)
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"dstune {' '.join(args)} hung for {timeout}s\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}\nSTDOUT:\n{res.stdout[-4000:]}\nSTDERR:\n{res.stderr[-6000:]}"
    return res


def read_metrics(run_dir: Path, split: str = "train") -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == split}


def _sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(FILLER + [rng.choice(words)] * 3) for _ in range(10))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def ws(tmp_path_factory) -> Path:
    """Workspace: tokenizer/, data files, and tiny saved models (gpt2, llama, bert, t5)."""
    import torch

    from dstune.families import tiny_config
    from dstune.models.tokenizers import load_tokenizer, train_sentencepiece

    root = tmp_path_factory.mktemp("ws")
    rng = random.Random(0)
    (root / "corpus.txt").write_text("".join(_sentence(rng, POS + NEG) + "\n" for _ in range(400)))
    train_sentencepiece([str(root / "corpus.txt")], str(root / "tokenizer"), vocab_size=120)
    tok = load_tokenizer(str(root / "tokenizer"))

    # 256 training rows: with fewer, a tiny BERT memorises them and its held-out loss is noise
    cls = [{"text": _sentence(rng, POS if i % 2 else NEG), "label": "pos" if i % 2 else "neg"} for i in range(320)]
    _write_jsonl(root / "cls_train.jsonl", cls[:256])
    _write_jsonl(root / "cls_eval.jsonl", cls[256:])
    _write_jsonl(root / "lm.jsonl", [{"text": _sentence(rng, POS)} for _ in range(96)])
    pairs = [{"prompt": f"say {w}", "response": f"{w} {w} it is"} for w in (POS + NEG) * 6]
    _write_jsonl(root / "chat.jsonl", pairs)
    _write_jsonl(root / "s2s.jsonl", [{"source": f"copy {w} and {v}", "target": f"{w} {v}"}
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
    """Build DeepSpeed's CPU comm op once, before any ranks start (they would race to build it)."""
    code = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def tiny_gguf(ws) -> Path:
    """A folder holding tiny.gguf: the tiny Llama and the SentencePiece vocabulary written as an fp32 GGUF
    file with the `gguf` package (transformers loads it as it loads a real one)."""
    import gguf
    import sentencepiece as spm
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(ws / "llama")
    c = model.config
    sp = spm.SentencePieceProcessor(model_file=str(ws / "tokenizer" / "tokenizer.model"))
    out = ws / "gguf"
    out.mkdir(exist_ok=True)
    w = gguf.GGUFWriter(str(out / "tiny.gguf"), "llama")
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
        w.add_tensor(f"{key}.weight", t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
