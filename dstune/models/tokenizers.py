"""Tokenizers: a Hugging Face tokenizer folder, a SentencePiece `.model` file, or one trained here."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from dstune.config import RANDOM_DATA
from dstune.errors import UserError, first_line


def load_tokenizer(path: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                   chat_template: str | None = None):
    """Load a tokenizer from an HF folder (optionally from a GGUF file in it) or a SentencePiece .model;
    `chat_template` (Jinja text) replaces its own."""
    from transformers import AutoTokenizer

    if not os.path.exists(path):
        raise UserError(f"tokenizer.path: not found: {path}")
    if path.endswith(".model"):
        tok = _from_sentencepiece(path)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, local_files_only=True,
                                                trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            if os.path.isfile(os.path.join(path, "tokenizer.model")):  # the file transformers fell back from
                _sentencepiece(os.path.join(path, "tokenizer.model"))
            raise UserError(f"tokenizer.path: cannot load a tokenizer from {path}: {first_line(e)}") from None
    if tok.pad_token is None:
        # batching needs a pad id; padded positions are masked, so reusing EOS/UNK is harmless
        tok.pad_token = tok.eos_token or tok.unk_token
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def recipe_tokenizer(cfg):
    """The recipe's tokenizer (tokenizer.path, else the model folder or its GGUF file), with the recipe's
    chat template; None for `data.train: random` without one."""
    path = cfg.tokenizer.path or cfg.model.path
    if not path:
        if cfg.data.train == RANDOM_DATA:
            return None  # random token ids need none
        raise UserError("tokenizer.path: required when the model is a tiny random config")
    if not os.path.exists(path):
        raise UserError(f"{'tokenizer' if cfg.tokenizer.path else 'model'}.path: not found: {path}")
    gguf = None if cfg.tokenizer.path else cfg.model.gguf_file
    if gguf:
        from dstune.models.loading import require_gguf_file
        require_gguf_file(path, gguf)
    return load_tokenizer(path, gguf, cfg.model.trust_remote_code,
                          read_chat_template(cfg))


def read_chat_template(cfg) -> str | None:
    """tokenizer.chat_template as Jinja text: the value itself, or the file it names."""
    t = cfg.tokenizer
    if not t.template_is_file():
        return t.chat_template
    try:
        text = Path(t.chat_template).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"tokenizer.chat_template: cannot read {t.chat_template}: {e.strerror}") from None
    if "{{" not in text and "{%" not in text:
        raise UserError(f"tokenizer.chat_template: {t.chat_template} holds no Jinja template")
    return text


def _sentencepiece(model_file: str):
    """The SentencePiece model in `model_file`, or a one-line error naming the file."""
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=model_file)
    except (RuntimeError, OSError) as e:
        raise UserError(f"tokenizer.path: {model_file} is not a readable SentencePiece model "
                        f"({first_line(e)})") from None


def _from_sentencepiece(model_file: str):
    """Wrap a SentencePiece model in a fast HF tokenizer, keeping its pad/bos/eos/unk pieces."""
    from transformers import AutoTokenizer

    sp = _sentencepiece(model_file)
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(model_file, os.path.join(d, "tokenizer.model"))
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    special = {}
    for key, idx in (("pad_token", sp.pad_id()), ("bos_token", sp.bos_id()),
                     ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
        if idx >= 0:
            special[key] = sp.id_to_piece(idx)
    tok.add_special_tokens(special)
    return tok


def train_sentencepiece(files: list[str], out_dir: str, vocab_size: int = 8000,
                        model_type: str = "unigram") -> Path:
    """Train a SentencePiece model on text files; write tokenizer.model plus HF tokenizer files to out_dir."""
    import sentencepiece as spm

    for f in files:
        if not os.path.isfile(f):
            raise UserError(f"tokenizer train: file not found: {f}")
    if vocab_size < 8:
        raise UserError("--vocab-size: must be at least 8 (4 special pieces plus text)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=",".join(files), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size,
        model_type=model_type, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        hard_vocab_limit=False,  # small corpora: take as many pieces as the text supports
        minloglevel=2)
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    _from_sentencepiece(str(out / "tokenizer.model")).save_pretrained(out)
    return out
