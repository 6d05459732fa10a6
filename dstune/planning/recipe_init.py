"""`dstune init`: a first recipe from a model folder and a data file. The task and the data format are found
from the data's columns (as `data.format: auto` finds a causal LM's format), and every key written is
commented with its description from the recipe schema (dstune/config.py) or the method's options."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from dstune.config import DataConfig, RunConfig, TrainingConfig, _model_in, config_from_dict
from dstune.data.files import load_table
from dstune.errors import UserError, did_you_mean
from dstune.methods import available, build_methods, check_composition
from dstune.tasks.causal_lm import CHAT, auto_format

TASK_ORDER = ("preference", "classification", "seq2seq", "causal_lm")  # pairs first, a label column next;
#                                                                         plain text last
LABEL_COLUMNS = ("label", "labels", "class", "category", "sentiment", "intent")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "utterance")
PAIR_COLUMNS = (("prompt", "response"), ("prompt", "completion"), ("question", "answer"), ("query", "response"),
                ("input", "output"))  # prompt/response rows under other usual names
FORMAT_NAMES = {"text": "plain text", "prompt_response": "prompt/response pairs", "messages": "OpenAI messages",
                "sharegpt": "ShareGPT conversations", "alpaca": "Alpaca instructions"}
READS = {"preference": "prompt, chosen and rejected columns (pairs), or prompt, completion and a true/false label "
                       "(unpaired, KTO)",
         "classification": f"a label column ({', '.join(LABEL_COLUMNS)}) and a text column",
         "seq2seq": "source and target columns",
         "causal_lm": "text, prompt/response, messages, conversations (ShareGPT) or instruction/output (Alpaca) "
                      "columns"}
# usual starting learning rates with AdamW (a method not listed starts from the schema's default)
START_LR = {"full": 2e-5, "freeze": 2e-5, "layerwise_lr": 5e-5, "bitfit": 1e-3, "lora": 2e-4, "ia3": 3e-3,
            "adapter": 1e-3, "prompt": 3e-2, "prefix": 1e-2}
MAX_LENGTH = {"classification": 256, "causal_lm": 1024, "seq2seq": 512, "preference": 1024}  # at most the model's positions
BATCH = {"classification": (16, 1), "causal_lm": (4, 4), "seq2seq": (8, 2), "preference": (2, 8)}  # micro-batch, accumulation
EPOCHS = 3
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
COMMENT_AT, WIDTH = 40, 118  # the column comments start at, and the longest line


@dataclass
class Model:
    """What the recipe needs to know of a model folder, read from its files (no weights)."""
    path: str
    gguf_file: str | None = None
    kind: str = "unknown"              # config.json's model_type, or the GGUF architecture
    positions: int | None = None       # tokens in one sequence
    chat_template: bool = False        # the tokenizer carries one
    encoder_decoder: bool = False


@dataclass
class Detected:
    """What the data looks like: the task, a name for its format, its rows and the data keys it needs."""
    task: str
    what: str
    rows: int
    data: dict[str, Any] = field(default_factory=dict)
    row_chars: float = 0.0  # a row's mean length as JSON text (of the first rows): its tokens, roughly x4


def ask(flag: str, question: str, given: str | None) -> str:
    """`given`, else the answer typed at a terminal, else a one-line error naming `flag`."""
    if given:
        return given
    if not sys.stdin.isatty():
        raise UserError(f"{flag}: required (or run dstune init at a terminal to be asked)")
    try:
        answer = input(f"{question}: ").strip()
    except (EOFError, KeyboardInterrupt):
        print()
        answer = ""
    if not answer:
        raise UserError(f"{flag}: no answer given")
    return answer


def inspect_model(given: str) -> Model:
    """The model folder (or GGUF file) `given`: a Hugging Face folder (config.json), or one GGUF file."""
    path = Path(given).expanduser().resolve()
    if not path.exists():
        raise UserError(f"--model: not found: {given}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"--model: {given} is a file but no .gguf; name the model's folder")
        return _gguf_model(path)
    if (path / "config.json").is_file():
        return _hf_model(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise UserError(f"--model: {given} holds {len(ggufs)} GGUF files ({', '.join(g.name for g in ggufs)}); "
                        f"name one, e.g. --model {Path(given) / ggufs[0].name}")
    if not ggufs:
        raise UserError(f"--model: {given} is no Hugging Face model folder (no config.json) and holds no .gguf file")
    return _gguf_model(ggufs[0])


def _hf_model(path: Path) -> Model:
    def read(name: str) -> dict:
        try:
            return json.loads((path / name).read_text(encoding="utf-8")) if (path / name).is_file() else {}
        except (OSError, ValueError) as e:
            raise UserError(f"--model: cannot read {path / name}: {e}") from None
    config, tok = read("config.json"), read("tokenizer_config.json")
    positions = next((config[k] for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                      if isinstance(config.get(k), int)), None)
    template = bool(tok.get("chat_template")) or any((path / f).is_file() for f in ("chat_template.jinja",
                                                                                    "chat_template.json"))
    return Model(str(path), None, config.get("model_type", "unknown"), positions, template,
                 bool(config.get("is_encoder_decoder")))


def _gguf_model(file: Path) -> Model:
    """A GGUF file's architecture, context length and chat template, from its metadata (gguf's reader maps the
    file; no tensor is read)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: the reader raises many kinds
        raise UserError(f"--model: {file} is not a readable GGUF file: {e}") from None

    def value(key: str):
        f = reader.fields.get(key)
        if f is None or not f.data:
            return None
        raw = f.parts[f.data[0]]
        return bytes(raw).decode("utf-8", errors="replace") if f.types[0] == gguf.GGUFValueType.STRING \
            else raw[0].item()
    arch = value("general.architecture") or "unknown"
    return Model(str(file.parent), file.name, arch, value(f"{arch}.context_length"),
                 bool(value("tokenizer.chat_template")), False)


def detect(path: str, task: str | None) -> Detected:
    """The task (`task`, else the first of TASK_ORDER whose columns the data has) and format of a data file."""
    import datasets

    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # the file is small or read once: no bar over the lines init prints
    try:
        ds = load_table(path, "--data")
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    columns = list(ds.column_names)
    first = ds[0]
    for name in [task] if task else TASK_ORDER:
        found = DETECTORS[name](ds, columns, first)
        if found is not None:
            what, keys = found
            sample = ds.select(range(min(len(ds), 1000))).to_list()
            chars = sum(len(json.dumps(row, ensure_ascii=False, default=str)) for row in sample) / len(sample)
            return Detected(name, what, len(ds), keys, chars)
    if task:
        raise UserError(f"--task: {task} reads {READS[task]}; {path} has {', '.join(columns)}")
    raise UserError(f"--data: {path} holds no task's columns (it has {', '.join(columns)}): "
                    + "; ".join(f"{READS[t]} → {t}" for t in TASK_ORDER))


def _classification(ds, columns: list[str], first: dict):
    label = next((c for c in LABEL_COLUMNS if c in columns), None)
    texts = [c for c in columns if c != label and isinstance(first[c], str)]
    text = next((c for c in TEXT_COLUMNS if c in texts), texts[0] if len(texts) == 1 else None)
    if label is None or text is None or isinstance(first[label], (list, dict)):
        return None
    classes = len(ds.unique(label))
    if classes < 2:
        return None
    keys = {k: v for k, v, default in (("text_column", text, "text"), ("label_column", label, "label"))
            if v != default}
    return f"text with labels ({classes:,} classes in {label!r})", keys


def _seq2seq(ds, columns: list[str], first: dict):
    return ("source/target pairs", {}) if "source" in columns and "target" in columns else None


def _causal_lm(ds, columns: list[str], first: dict):
    fmt = auto_format(DataConfig(train="-"), columns, first.__getitem__)
    if fmt is not None:
        return FORMAT_NAMES[fmt], {"format": fmt}
    for prompt, response in PAIR_COLUMNS:
        if prompt in columns and response in columns:
            return (f"prompt/response pairs ({prompt!r} → {response!r})",
                    {"format": "prompt_response", "prompt_column": prompt, "response_column": response})
    return None


CONVERSATION_PAIRS = "preference pairs (conversations)"
PREFERENCE_LR = 0.1  # preference tuning starts from a tenth of the method's supervised learning rate


def _preference(ds, columns: list[str], first: dict):
    if "chosen" in columns and "rejected" in columns:
        return (CONVERSATION_PAIRS if not isinstance(first["chosen"], str) else "preference pairs (text)",
                {"format": "pairs"})
    if "completion" in columns and "label" in columns and isinstance(first["label"], bool):
        return "replies labelled good or bad (unpaired, KTO)", {"format": "unpaired"}
    return None


DETECTORS = {"preference": _preference, "classification": _classification, "seq2seq": _seq2seq, "causal_lm": _causal_lm}


def check_methods(given: str) -> list[str]:
    """The comma-separated method names of --method, each known, together allowed."""
    names = [n.strip() for n in given.split(",") if n.strip()]
    known = available()
    for n in names or [""]:
        if n not in known:
            raise UserError(f"--method: unknown method {n!r}{did_you_mean(n, known)}; known: "
                            f"{', '.join(sorted(known))}")
    try:
        check_composition(names)
    except UserError as e:
        raise UserError(f"--method: {str(e).removeprefix('methods: ')}") from None
    return names


def recipe(model: Model, data_path: str, found: Detected, methods: list[str], name: str) -> dict[str, Any]:
    """The recipe's keys, in the order they are written."""
    max_length = min(MAX_LENGTH[found.task], model.positions or MAX_LENGTH[found.task])
    eval_fraction = 0.0 if found.rows < 20 else round(min(0.1, max(0.01, 200 / found.rows)), 3)
    train_rows = found.rows - math.ceil(found.rows * eval_fraction)
    micro, accumulation = BATCH[found.task]
    while micro * accumulation > train_rows and accumulation > 1:  # a small file still fills a batch
        accumulation //= 2
    micro = max(1, min(micro, train_rows))
    # packing pays where many rows share a block; a few blocks would not fill the batches
    blocks = train_rows * found.row_chars / 4 / max_length
    packing = found.task == "causal_lm" and blocks >= 4 * micro * accumulation
    examples = blocks if packing else train_rows
    steps = EPOCHS * math.ceil(examples / (micro * accumulation))
    chat = found.task == "causal_lm" and found.data.get("format") in CHAT or found.what == CONVERSATION_PAIRS
    data = {"train": os.path.abspath(data_path), **found.data, "eval_fraction": eval_fraction,
            "max_length": max_length}
    if found.task == "causal_lm":
        data["packing"] = packing
    out: dict[str, Any] = {"task": found.task, "model": {"path": model.path}}
    if model.gguf_file:
        out["model"]["gguf_file"] = model.gguf_file
    if chat and not model.chat_template:
        out["tokenizer"] = {"chat_template": CHATML}
    out["data"] = data
    out["methods"] = [{"name": m} for m in methods]
    lr = START_LR.get(methods[0], TrainingConfig.model_fields["lr"].default)
    if found.task == "preference":
        out["preference"] = {"loss": "kto" if found.data.get("format") == "unpaired" else "dpo"}
        lr *= PREFERENCE_LR
    out["deepspeed"] = "zero2"
    out["training"] = {"epochs": EPOCHS, "micro_batch_size": micro, "gradient_accumulation_steps": accumulation,
                       "lr": lr,
                       "lr_schedule": "cosine", "warmup_steps": math.ceil(0.03 * steps), "precision": "auto"}
    out["evaluation"] = {"every": 0}
    if chat and found.task == "causal_lm":
        out["evaluation"].update(max_samples=64, generate=True, max_new_tokens=64)
    out["output_dir"] = f"runs/{name}"
    return out


def _value(v: Any) -> str:
    """A value as YAML writes it on one line."""
    text = yaml.safe_dump(v, default_flow_style=True, width=10**6, allow_unicode=True, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def _line(text: str, comment: str | None) -> list[str]:
    """`text` with `comment` after it at COMMENT_AT, wrapped onto comment lines below at the same column."""
    if not comment:
        return [text]
    at = max(COMMENT_AT, len(text) + 2)
    parts = textwrap.wrap(" ".join(comment.split()), max(40, WIDTH - at - 2))
    return [f"{text.ljust(at)}# {parts[0]}"] + [f"{' ' * at}# {p}" for p in parts[1:]]


def _section(keys: dict[str, Any], schema: type[BaseModel], indent: str) -> list[str]:
    lines: list[str] = []
    for key, value in keys.items():
        info = schema.model_fields[key]
        if isinstance(value, dict):
            lines += _line(f"{indent}{key}:", info.description)
            lines += _section(value, _model_in(info.annotation), indent + "  ")
        elif key == "methods":
            lines += _line(f"{indent}{key}:", info.description)
            for spec in value:
                lines += _method(spec["name"], indent + "  ")
        else:
            lines += _line(f"{indent}{key}: {_value(value)}", info.description)
    return lines


def _method(name: str, indent: str) -> list[str]:
    """A method's list item, every option with its default and description."""
    cls = available()[name]
    lines = _line(f"{indent}- name: {name}", cls.description)
    for option, info in cls.Options.model_fields.items():
        if not info.is_required():
            lines += _line(f"{indent}  {option}: {_value(info.get_default(call_default_factory=True))}",
                           info.description)
    return lines


def recipe_text(keys: dict[str, Any], header: list[str]) -> str:
    """The recipe as commented YAML, checked as `dstune train` checks it (so no broken recipe is written)."""
    text = "\n".join([*(f"# {h}".rstrip() for h in header), *_section(keys, RunConfig, "")]) + "\n"
    cfg = config_from_dict(yaml.safe_load(text), "the written recipe")
    build_methods(cfg.methods)
    return text


def _exists(out) -> UserError:
    return UserError(f"--out: {out} exists; --force replaces it")


def write_new(out: Path, text: str, force: bool) -> None:
    """`text` into `out` at once (a reader never sees half a file); an existing file only with `force`."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as any new file (mkstemp makes it 0600)
        if force:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # fails when `out` exists, even one made since the check
            except FileExistsError:
                raise _exists(out) from None
            except OSError:  # a filesystem without hard links
                if out.exists():
                    raise _exists(out) from None
                os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def init(model: str | None, data: str | None, task: str | None, method: str, out: str, force: bool) -> list[str]:
    """Write the recipe; the lines that say what was found and what to run next."""
    target = Path(out)
    if target.is_dir():
        raise UserError(f"--out: {out} is a folder; name the recipe file, e.g. {target / 'recipe.yaml'}")
    if not target.resolve().parent.is_dir():
        raise UserError(f"--out: folder {target.resolve().parent} does not exist")
    if target.exists() and not force:
        raise _exists(out)
    methods = check_methods(method)
    model = ask("--model", "model folder (Hugging Face, or one holding a .gguf file)", model)
    found_model = inspect_model(model)
    data = ask("--data", "training data (.jsonl, .json, .csv, .tsv, .parquet)", data)
    found = detect(data, task)
    _check_fit(found_model, found, task)
    name = f"{Path(data).stem}-{'-'.join(methods)}"
    source = f"{found_model.kind}, " + (f"GGUF file {found_model.gguf_file}" if found_model.gguf_file
                                        else "Hugging Face folder") \
        + (f", {found_model.positions:,} positions" if found_model.positions else "")
    said = [f"model: {model} ({source})",
            f"data: {data} looks like {found.what} ({found.rows:,} rows) → task {found.task}"]
    keys = recipe(found_model, data, found, methods, name)
    if "tokenizer" in keys:
        said.append(f"note: the model's tokenizer has no chat template and {found.what} need one: the recipe sets "
                    "tokenizer.chat_template to ChatML; put the model's own there if it has one")
    said.append(f"method: {', '.join(methods)} (lr {_value(keys['training']['lr'])}; options with their defaults)")
    header = ["dstune recipe written by `dstune init`:", *(f"  {s}" for s in said),
              f"train it: dstune train {out}   (any key can be overridden: training.lr=1e-4, data.max_length=512)",
              "every key: docs/reference/recipe.md; methods and their options: dstune methods", ""]
    write_new(target, recipe_text(keys, header), force)
    return [*said, f"wrote {out}", f"next: dstune train {out}"]


def _check_fit(model: Model, found: Detected, task: str | None) -> None:
    """A seq2seq task needs an encoder-decoder model, a causal LM a decoder."""
    why = "--task:" if task else f"--data: the data looks like {found.what}, so"
    if found.task == "seq2seq" and not model.encoder_decoder:
        raise UserError(f"{why} seq2seq needs an encoder-decoder model (T5, BART); --model is a {model.kind}")
    if found.task == "causal_lm" and model.encoder_decoder:
        raise UserError(f"{why} causal_lm needs a decoder-only model; --model is an encoder-decoder {model.kind}")
