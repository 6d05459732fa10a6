"""data.augment: rewritten copies of the training rows (the evaluation rows are never touched).

Each row gets up to `copies` copies. Copy c of the row numbered r (its place in its file) is made with one
op drawn from a generator seeded by (seed, r, c), which also draws every word, position and sample the op
needs, so a row's token-edited copies do not depend on the other rows or the processes that made them
(model rewrites sample per batch of rows, so they also depend on the batch). Token ops work on
whitespace-separated words: delete, swap, insert (a neighbour of one of the row's words, at a random
place) and neighbour (words replaced by one of their nearest neighbours among the whole-word tokens of a
model's input embeddings, by cosine). Words found in more than COMMON of the rows (function words) are
never replaced, nor are words shorter than three letters. paraphrase (a causal LM) and back_translate
(two seq2seq models) rewrite through local models. A copy equal to its row or to one of the row's
earlier copies is dropped. Copies carry `augmented` (their copy number; 0 on the rows themselves) and
`augment_op` (the op's name).
"""
from __future__ import annotations

import os
import re
from collections import Counter
import numpy as np

from dstune.config import AugmentConfig, RunConfig
from dstune.data.files import ROW
from dstune.errors import UserError

MODEL_OPS = ("paraphrase", "back_translate")
COMMON = 0.05        # words in more than this share of the rows are function words: never replaced
COMMON_SAMPLE = 10_000  # rows the share is counted on
MIN_LETTERS = 3
MARK, OP = "augmented", "augment_op"
_AFFIX = re.compile(r"^(\W*)(.*?)(\W*)$")  # punctuation before a word, the word, punctuation after it


def input_columns(cfg: RunConfig, needs: list[tuple[str, str]], style: str, label_key: str | None) -> list[str]:
    """The columns rewritten: data.augment.columns, else the first column the task reads that is not the
    label (text, prompt, instruction or source)."""
    a = cfg.data.augment
    if a.columns:
        return a.columns
    first = next(c for k, c in needs if k != label_key)
    if style in ("messages", "sharegpt"):
        raise UserError(f"data.augment.columns: {style} rows hold turns, not one text to rewrite; name text "
                        "columns to rewrite, or leave augmentation off")
    return [first]


def _split_path(path: str) -> tuple[str, str | None]:
    """(folder, GGUF file name or None) of a model folder or a .gguf file."""
    return (os.path.dirname(path), os.path.basename(path)) if path.endswith(".gguf") else (path, None)


def augment_models(cfg: RunConfig) -> list[tuple[str, str]]:
    """(model folder or .gguf file, its config key) of every model data.augment reads."""
    a, out = cfg.data.augment, []
    if {"insert", "neighbour"} & set(a.ops):
        if a.neighbours:
            out.append((a.neighbours, "data.augment.neighbours"))
        elif cfg.model.path is None:
            raise UserError("data.augment.neighbours: a model.tiny run has no embeddings to take neighbours "
                            "from; name a model folder")
        else:
            out.append((os.path.join(cfg.model.path, cfg.model.gguf_file) if cfg.model.gguf_file else cfg.model.path,
                        "data.augment.neighbours"))
    if "paraphrase" in a.ops:
        out.append((a.paraphrase_model, "data.augment.paraphrase_model"))
    if "back_translate" in a.ops:
        out += [(m, "data.augment.back_translate") for m in a.back_translate]
    for path, key in out:
        _check_model(path, key)
    return out


def _check_model(path: str, key: str) -> None:
    if not (os.path.isfile(path) if path.endswith(".gguf") else os.path.isdir(path)):
        raise UserError(f"{key}: not found: {path}")


# --- embedding neighbours --------------------------------------------------------------------------------

class Neighbours:
    """A word's nearest whole-word tokens by the cosine of their input embeddings."""

    def __init__(self, words: list[str], vectors: np.ndarray, k: int, common: set[str]):
        self.words, self.k, self.common = words, k, common
        self.index = {w: i for i, w in enumerate(words)}
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.unit = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
        self._memo: dict[str, list[str]] = {}

    def replaceable(self, word: str) -> bool:
        w = word.lower()
        return len(w) >= MIN_LETTERS and w.isalpha() and w not in self.common and w in self.index

    def of(self, word: str) -> list[str]:
        w = word.lower()
        if w not in self._memo:
            sims = self.unit @ self.unit[self.index[w]]
            order = np.argsort(-sims, kind="stable")[: self.k + 1]
            self._memo[w] = [self.words[i] for i in order if self.words[i] != w][: self.k]
        return self._memo[w]


def _embedding_matrix(folder: str, gguf: str | None):
    """The input embedding matrix of a model folder, read alone from its safetensors files where they
    hold it (no whole model in memory), else from the loaded model."""
    import torch
    from transformers import AutoConfig, AutoModel

    if gguf is None:
        import json
        from pathlib import Path

        from safetensors import safe_open
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config)
        weight = skeleton.get_input_embeddings().weight
        name = next(n for n, p in skeleton.named_parameters() if p is weight)
        index = os.path.join(folder, "model.safetensors.index.json")
        files = sorted(set(json.loads(Path(index).read_text())["weight_map"].values())) if os.path.isfile(index) else \
            [f for f in os.listdir(folder) if f.endswith(".safetensors")]
        for f in files:
            with safe_open(os.path.join(folder, f), "pt") as st:
                key = next((k for k in st.keys() if k == name or k.endswith("." + name)), None)
                if key is not None:
                    return st.get_tensor(key).float().numpy()
    model = AutoModel.from_pretrained(folder, gguf_file=gguf, local_files_only=True, dtype=torch.float32,
                                      use_safetensors=None if gguf else True)  # pickles are not loaded
    return model.get_input_embeddings().weight.detach().float().numpy()


def load_neighbours(path: str, k: int, common: set[str]) -> Neighbours:
    """Neighbours among the whole-word tokens of the model at `path`: the tokens that decode to a word of
    letters and that the tokenizer gives back for that word alone or after a space."""
    from dstune.models.tokenizers import load_tokenizer

    folder, gguf = _split_path(path)
    try:
        tok = load_tokenizer(folder, gguf)
        matrix = _embedding_matrix(folder, gguf)
    except (OSError, ValueError) as e:
        raise UserError(f"data.augment.neighbours: cannot read a tokenizer and input embeddings in {path}: "
                        f"{str(e).splitlines()[0]}") from None
    ids = [i for i in range(min(len(tok), matrix.shape[0]))]
    text = [tok.decode([i]).strip() for i in ids]
    cand = [(i, t.lower()) for i, t in zip(ids, text) if len(t) >= MIN_LETTERS and t.isalpha()]
    alone = tok([w for _, w in cand], add_special_tokens=False)["input_ids"]
    spaced = tok([" " + w for _, w in cand], add_special_tokens=False)["input_ids"]
    words, rows = {}, []
    for (i, w), a, s in zip(cand, alone, spaced):
        if (a == [i] or s == [i]) and w not in words:
            words[w] = len(rows)
            rows.append(i)
    if not rows:
        raise UserError(f"data.augment.neighbours: the tokenizer of {path} has no whole-word tokens")
    return Neighbours(list(words), matrix[rows], k, common)


def common_words(texts: list[str]) -> set[str]:
    """Words found in more than COMMON of the rows."""
    counts = Counter(w for t in texts for w in {_AFFIX.match(x).group(2).lower() for x in str(t).split()})
    return {w for w, n in counts.items() if n > COMMON * len(texts)}


# --- token ops -------------------------------------------------------------------------------------------

def _count(words: list[str], rate: float) -> int:
    return max(1, round(rate * len(words)))


def _delete(words: list[str], rng, rate: float, nb) -> list[str]:
    if len(words) < 2:
        return words
    keep = rng.random(len(words)) >= rate
    if keep.all():
        keep[rng.integers(len(words))] = False
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return [w for w, k in zip(words, keep) if k]


def _swap(words: list[str], rng, rate: float, nb) -> list[str]:
    words = list(words)
    if len(words) >= 2:
        for _ in range(_count(words, rate)):
            i, j = rng.choice(len(words), size=2, replace=False)
            words[i], words[j] = words[j], words[i]
    return words


def _parts(word: str) -> tuple[str, str, str]:
    return _AFFIX.match(word).groups()


def _cased(new: str, old: str) -> str:
    return new.capitalize() if old[:1].isupper() else new


def _insert(words: list[str], rng, rate: float, nb) -> list[str]:
    words = list(words)
    for _ in range(_count(words, rate)):
        cand = [w for w in words if nb.replaceable(_parts(w)[1])]
        if not cand:
            break
        near = nb.of(_parts(cand[rng.integers(len(cand))])[1])
        words.insert(int(rng.integers(len(words) + 1)), near[rng.integers(len(near))])
    return words


def _neighbour(words: list[str], rng, rate: float, nb) -> list[str]:
    words = list(words)
    cand = [i for i, w in enumerate(words) if nb.replaceable(_parts(w)[1])]
    if cand:
        for i in rng.choice(cand, size=min(len(cand), _count(words, rate)), replace=False):
            pre, core, post = _parts(words[i])
            near = nb.of(core)
            words[i] = pre + _cased(near[rng.integers(len(near))], core) + post
    return words


EDITS = {"delete": _delete, "swap": _swap, "insert": _insert, "neighbour": _neighbour}


def edit(text: str, op: str, rng, rate: float, nb: Neighbours | None) -> str:
    """One token op on a text's words."""
    return " ".join(EDITS[op](str(text).split(), rng, rate, nb))


def generator(seed: int, row: int, copy: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**32, int(row), copy])


# --- model rewrites --------------------------------------------------------------------------------------

class Rewriter:
    """paraphrase and back_translate through local models, loaded on first use, sampled in batches."""

    def __init__(self, a: AugmentConfig, max_length: int):
        import torch
        self.a, self.max_new = a, a.max_new_tokens or max_length
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._models: dict[str, tuple] = {}

    def _load(self, path: str, key: str, seq2seq: bool):
        if path not in self._models:
            import torch
            from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

            from dstune.models.tokenizers import load_tokenizer
            folder, gguf = _split_path(path)
            try:
                tok = load_tokenizer(folder, gguf)
                auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
                model = auto.from_pretrained(folder, gguf_file=gguf, local_files_only=True, dtype=torch.float32,
                                             use_safetensors=None if gguf else True)  # pickles are not loaded
            except (OSError, ValueError) as e:
                kind = "seq2seq" if seq2seq else "causal LM"
                raise UserError(f"{key}: cannot load a {kind} model and tokenizer from {path}: "
                                f"{str(e).splitlines()[0]}") from None
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            self._models[path] = (tok, model.to(self.device).eval())
        return self._models[path]

    def _generate(self, path: str, key: str, seq2seq: bool, prompts: list[str], seed: int) -> list[str]:
        import torch
        tok, model = self._load(path, key, seq2seq)
        if not seq2seq and getattr(tok, "chat_template", None):
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        tok.padding_side = "right" if seq2seq else "left"
        enc = tok(prompts, return_tensors="pt", padding=True, truncation=True,
                  add_special_tokens=seq2seq or not getattr(tok, "chat_template", None)).to(self.device)
        torch.manual_seed(seed)
        sample = self.a.temperature > 0
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=self.max_new, do_sample=sample,
                                 temperature=self.a.temperature if sample else None, top_p=0.95 if sample else None,
                                 pad_token_id=tok.pad_token_id)
        new = out if seq2seq else out[:, enc["input_ids"].shape[1]:]
        return [" ".join(t.split()) for t in tok.batch_decode(new, skip_special_tokens=True)]

    def rewrite(self, op: str, texts: list[str], seed: int) -> list[str]:
        a = self.a
        if op == "paraphrase":
            return [t.strip("\"' ") for t in self._generate(
                a.paraphrase_model, "data.augment.paraphrase_model", False,
                [a.paraphrase_prompt.replace("{text}", t) for t in texts], seed)]
        fwd, back = a.back_translate
        pivot = self._generate(fwd, "data.augment.back_translate", True,
                               [a.back_translate_prompts[0].replace("{text}", t) for t in texts], seed)
        return self._generate(back, "data.augment.back_translate", True,
                              [a.back_translate_prompts[1].replace("{text}", t) for t in pivot], seed + 1)


# --- the copies ------------------------------------------------------------------------------------------

def augment_rows(cfg: RunConfig, raw, columns: list[str], key: str, path: str, where: dict,
                 num_proc: int | None = None):
    """`raw` (rows numbered in ROW) with its rows' copies after them, both marked; (table, copies added).
    `where`: the map's output (a file in the work folder, or memory); token ops may run in `num_proc`
    processes, model rewrites run here."""
    import hashlib

    import datasets

    a, seed = cfg.data.augment, cfg.data.augment.seed if cfg.data.augment.seed is not None else cfg.training.seed
    for c in columns:
        if c not in raw.column_names:
            raise UserError(f"data.augment.columns: {path} has no column {c!r} (columns: "
                            f"{', '.join(x for x in raw.column_names if x != ROW)})")
        feature = raw.features[c]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise UserError(f"data.augment.columns: column {c!r} of {path} holds {feature}, not text")
    models = dict((k, m) for m, k in augment_models(cfg))
    nb = None
    if {"insert", "neighbour"} & set(a.ops):
        sample = raw.select(range(min(len(raw), COMMON_SAMPLE)))
        nb = load_neighbours(models["data.augment.neighbours"], a.neighbour_k,
                             common_words([t for c in columns for t in sample[c]]))
    rewriter = Rewriter(a, cfg.data.max_length) if set(MODEL_OPS) & set(a.ops) else None

    def copies(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in [*batch, MARK, OP]}
        made: list[tuple[int, int, str, dict]] = []  # (row in batch, copy, op, rewritten columns)
        wanted: dict[str, list[tuple[int, int, int]]] = {}  # model op -> (row in batch, copy, made index)
        for i, r in enumerate(batch[ROW]):
            for c in range(1, a.copies + 1):
                rng = generator(seed, r, c)
                op = a.ops[rng.integers(len(a.ops))]
                new = {col: (edit(batch[col][i], op, rng, a.rate, nb) if op in EDITS else None) for col in columns}
                if op in MODEL_OPS:
                    wanted.setdefault(op, []).append((i, c, len(made)))
                made.append((i, c, op, new))
        for op, where in wanted.items():
            for col in columns:
                texts = [str(batch[col][i]) for i, _, _ in where]
                for (_, _, m), text in zip(where, rewriter.rewrite(op, texts, seed + int(batch[ROW][0]))):
                    made[m][3][col] = text
        seen: dict[int, set] = {}
        for i, c, op, new in made:
            texts = tuple(new[col] for col in columns)
            own = seen.setdefault(i, {tuple(str(batch[col][i]) for col in columns)})
            if texts in own or not all(t.strip() for t in texts):
                continue
            own.add(texts)
            for k in batch:
                out[k].append(new[k] if k in new else batch[k][i])
            out[MARK].append(c)
            out[OP].append(op)
        return out

    features = raw.features.copy()
    features[MARK], features[OP] = datasets.Value("int32"), datasets.Value("string")
    model_ops = rewriter is not None
    # named, not hashed: datasets would pickle the models to fingerprint the function
    fp = "augment-" + hashlib.blake2b(f"{raw._fingerprint}{seed}{a.model_dump_json()}{columns}".encode(),
                                      digest_size=8).hexdigest()
    made = raw.map(copies, batched=True, batch_size=a.batch_size if model_ops else 1000, features=features,
                   num_proc=None if model_ops else num_proc, desc=f"augment {key}", new_fingerprint=fp,
                   **_named(where, "copies"))
    originals = raw.map(lambda b: {MARK: [0] * len(b[ROW]), OP: [""] * len(b[ROW])}, batched=True,
                        features=features, new_fingerprint=fp + "-rows", desc="augment: mark the rows", **_named(where, "marked"))
    return datasets.concatenate_datasets([originals, made]), len(made)


def _named(where: dict, suffix: str) -> dict:
    if "cache_file_name" in where:
        return {"cache_file_name": where["cache_file_name"].replace(".arrow", f"-{suffix}.arrow")}
    return where


def save_copies(table, path: str, source: str) -> int:
    """Append the copies of an augmented table to `path` as JSON lines, for inspection: the source file,
    the row's number in it (from 0), copy number, op, then the row with its rewritten columns; how many."""
    import json
    copies = table.filter(lambda m: [x > 0 for x in m], input_columns=[MARK], batched=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in copies:
            line = {"source": source, "source_row": row[ROW], "copy": row[MARK], "op": row[OP]}
            line.update({k: v for k, v in row.items() if k not in (ROW, MARK, OP)})
            f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
    return len(copies)
