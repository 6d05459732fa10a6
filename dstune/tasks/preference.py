"""Preference tuning of a causal LM: pairs of a preferred (chosen) and a dispreferred (rejected) reply to
one prompt (DPO, IPO, SimPO, ORPO), or single replies labelled good or bad (KTO). The objectives live in
dstune/preference/; this module reads the rows and makes them token ids.

Rows as users have them (`data.format: pairs`, found from the columns by `auto`):
- `{prompt, chosen, rejected}` as text;
- `chosen` / `rejected` as whole conversations (OpenAI `messages` or ShareGPT turns) that share every turn
  but the last assistant one (the UltraFeedback / HH layout), with no prompt column;
- a prompt (text or turns, or the `conversations` column) and `chosen` / `rejected` as one assistant turn
  each (TRL's conversational layout; ShareGPT-style `{"from": "gpt", "value": ...}`).
`data.format: unpaired` (KTO): `{prompt, completion, label}` with label true (good) or false (bad).

Each reply is rendered after its prompt exactly as supervised chat data is (the chat template where the
tokenizer has one; plain text then the end-of-sequence token otherwise): only the reply's tokens, its
end-of-turn marker included, are scored. A row whose prompt alone fills `data.max_length` is left out
(counted in the start-up line); a longer reply is cut at its end (TRL's `keep_start` for the completion).
"""
from __future__ import annotations

from typing import Any

import torch

from dstune.data import chat
from dstune.data.batching import IGNORE, pad
from dstune.data.files import ROW, require_present, row_location
from dstune.errors import UserError
from dstune.tasks.causal_lm import CausalLM, has_template
from dstune.tasks.seq2seq import with_eos

PAIRED, UNPAIRED = "pairs", "unpaired"
REJECTED = ("rejected_ids", "rejected_labels")
ROWS = {PAIRED: "pairs (prompt, chosen, rejected)", UNPAIRED: "unpaired rows (prompt, completion, label)"}


class Preference(CausalLM):
    name = "preference"
    model_task = "causal_lm"
    headline_metric = "rewards/accuracies"

    def check(self, cfg, ds, path, key, tokenizer):
        """data.format pairs or unpaired (auto: from the columns)."""
        d, columns = cfg.data, ds.column_names
        if d.packing:
            raise UserError("data.packing: preference rows are scored pair by pair and are not packed; unset it")
        if cfg.evaluation.generate:
            raise UserError("evaluation.generate: preference runs are scored by their rewards; unset it (dstune "
                            "generate and chat work on the finished run)")
        fmt = d.format
        if fmt == "auto":
            fmt = PAIRED if d.chosen_column in columns and d.rejected_column in columns else \
                UNPAIRED if d.completion_column in columns and d.label_column in columns else None
            if fmt is None:
                raise UserError(f"data.format: {path} holds neither preference pairs ({d.chosen_column!r} and "
                                f"{d.rejected_column!r}) nor unpaired replies ({d.completion_column!r} and "
                                f"{d.label_column!r}) (columns: {', '.join(columns)})")
        if fmt not in (PAIRED, UNPAIRED):
            raise UserError(f"data.format: {fmt} is not a preference format; task preference reads {ROWS[PAIRED]} "
                            f"or {ROWS[UNPAIRED]}")
        if (fmt == UNPAIRED) != (cfg.preference.loss == "kto"):
            wants = UNPAIRED if cfg.preference.loss == "kto" else PAIRED
            raise UserError(f"preference.loss: {cfg.preference.loss} trains on {ROWS[wants]}, and {path} holds "
                            f"{ROWS[fmt].split(' (')[0]}")
        replies = [("data.chosen_column", d.chosen_column), ("data.rejected_column", d.rejected_column)] \
            if fmt == PAIRED else [("data.completion_column", d.completion_column), ("data.label_column", d.label_column)]
        prompt = [c for c in (d.prompt_column, d.messages_column, "conversations") if c and c in columns]
        require_present(columns, replies, path)
        return fmt, replies + ([("data.prompt_column", prompt[0])] if prompt and fmt == UNPAIRED else [])

    def packs(self, cfg, style, for_eval):
        return False

    def token_features(self, cfg, for_eval):
        import datasets
        ids = datasets.List(datasets.Value("int32"))
        if cfg.preference.loss == "kto":
            return datasets.Features({"input_ids": ids, "labels": ids, "desirable": datasets.Value("int8"),
                                      "kl_input_ids": ids, "kl_labels": ids})
        return datasets.Features({"input_ids": ids, "labels": ids, "rejected_ids": ids, "rejected_labels": ids})

    def encoder(self, cfg, tokenizer, style, labels, for_eval, path, key):
        d = cfg.data

        def encode(batch):
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
            where = lambda i, e: UserError(f"{row_location(path, rows[i][ROW])}: {key}: {e}")  # noqa: E731
            read = []
            for i, row in enumerate(rows):
                try:
                    read.append(read_row(row, d, style))
                except chat.BadRow as e:
                    raise where(i, e) from None
            per_row = 1 if style == UNPAIRED else 2
            try:
                encoded = encode_replies(tokenizer, [(p, r) for p, rs in read for r in rs])
            except ReplyError as e:
                raise where(e.index // per_row, e.reason) from None
            out: dict[str, list] = {"input_ids": [], "labels": [],
                                    **({"desirable": []} if style == UNPAIRED else {c: [] for c in REJECTED})}
            for i, row in enumerate(rows):
                parts = encoded[i * per_row:(i + 1) * per_row]
                if any(prompt_tokens(lab) >= d.max_length for _, lab in parts):
                    continue  # the prompt leaves no room for a reply: the row is left out (and counted)
                (ids, lab), *rest = [(ids[:d.max_length], lab[:d.max_length]) for ids, lab in parts]
                out["input_ids"].append(ids)
                out["labels"].append(lab)
                if style == UNPAIRED:
                    out["desirable"].append(int(row[d.label_column]))
                else:
                    out[REJECTED[0]].append(rest[0][0])
                    out[REJECTED[1]].append(rest[0][1])
            if style == UNPAIRED:
                out.update(mismatched(out["input_ids"], out["labels"], d.max_length))
            return out
        return encode

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """Pairs: the chosen replies' rows, then the rejected ones' (one forward over both, as TRL's
        concatenated forward); unpaired: the rows and their `desirable` flags. Precomputed reference
        log-probabilities come along as `ref_logps`."""
        seqs = [r["input_ids"] for r in rows] + [r[REJECTED[0]] for r in rows if REJECTED[0] in r]
        labs = [r["labels"] for r in rows] + [r[REJECTED[1]] for r in rows if REJECTED[1] in r]
        batch = _padded(seqs, labs, pad_id)
        if "desirable" in rows[0]:  # kto: the rows, and their mismatched prompt/reply rows for the KL estimate
            batch["desirable"] = torch.tensor([bool(r["desirable"]) for r in rows])
            mismatched_rows = _padded([r["kl_input_ids"] for r in rows], [r["kl_labels"] for r in rows], pad_id)
            batch.update({f"kl_{k}": v for k, v in mismatched_rows.items()})
        for key, columns in (("ref_logps", ("ref_logps", "ref_rejected_logps")), ("ref_kl_logps", ("ref_kl_logps",))):
            if key in rows[0]:
                batch[key] = torch.tensor([r[c] for c in columns if c in rows[0] for r in rows], dtype=torch.float64)
        return batch

    def example_batch(self, config, micro_batch, seq_len, target_len):
        ids = torch.randint(0, config.vocab_size, (2 * micro_batch, seq_len))  # chosen and rejected rows
        return {"input_ids": ids, "labels": ids}

    def scores_generations(self, evaluation) -> bool:
        return False

    def prompt_only(self, cfg, columns):
        return None


def _padded(seqs: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    return {"input_ids": pad(seqs, pad_id), "attention_mask": pad([[1] * len(x) for x in seqs], 0),
            "labels": pad(labels, IGNORE)}


def mismatched(ids: list[list[int]], labels: list[list[int]], max_length: int) -> dict[str, list]:
    """kto's KL rows: each row's prompt followed by the previous row's reply (the first row takes the last
    row's), within the rows prepared together (TRL pairs them the same way), cut to `max_length`."""
    out: dict[str, list] = {"kl_input_ids": [], "kl_labels": []}
    for i in range(len(ids)):
        p, j = prompt_tokens(labels[i]), i - 1
        q = prompt_tokens(labels[j])
        out["kl_input_ids"].append((ids[i][:p] + ids[j][q:])[:max_length])
        out["kl_labels"].append(([IGNORE] * p + labels[j][q:])[:max_length])
    return out


def prompt_tokens(labels: list[int]) -> int:
    """Tokens before the reply's first target (all of them when nothing is a target)."""
    return next((i for i, x in enumerate(labels) if x != IGNORE), len(labels))


def _as_turns(value: Any, what: str) -> list[dict]:
    """A prompt or reply given as turns (OpenAI or ShareGPT keys; one turn object is one turn)."""
    if not isinstance(value, (list, dict)):
        raise chat.BadRow(f"{what}: expected text or turns, got {type(value).__name__}")
    try:
        return chat.read_turns(value)
    except chat.BadRow as e:
        raise chat.BadRow(f"{what}: {e}") from None


def read_row(row: dict, d, style: str) -> tuple[str | list[dict], list[str | dict]]:
    """(the prompt: text, or turns ending on a user turn; the replies: chosen then rejected, or the one
    completion), each reply text (plain data) or one assistant turn. Raises BadRow."""
    names = (d.chosen_column, d.rejected_column) if style == PAIRED else (d.completion_column,)
    values = [row[n] for n in names]
    if style == UNPAIRED and (not isinstance(row[d.label_column], (bool, int)) or row[d.label_column] not in (0, 1)):
        raise chat.BadRow(f"{d.label_column}: expected true (a good reply) or false (a bad one), got "
                          f"{row[d.label_column]!r}")
    prompt = next((row[c] for c in (d.prompt_column, d.messages_column, "conversations")
                   if c and c in row and row[c] is not None), None)
    if all(isinstance(v, str) for v in values):
        if prompt is None:
            raise chat.BadRow(f"{d.prompt_column}: missing (the replies are text, so the prompt is a column of its own)")
        return (prompt if isinstance(prompt, str) else _user_turns(_as_turns(prompt, d.prompt_column))), values
    turns = [[{"role": "assistant", "content": v}] if isinstance(v, str) else _as_turns(v, n)
             for v, n in zip(values, names)]
    if prompt is None:  # whole conversations sharing every turn but the last
        shared = turns[0][:-1]
        if any(t[:-1] != shared for t in turns[1:]):
            raise chat.BadRow(f"{' and '.join(names)}: the conversations differ before their last turn (a pair "
                              "shares its prompt; only the last assistant turn differs)")
        prompt_turns = shared
        turns = [t[-1:] for t in turns]
    else:
        prompt_turns = _as_turns(prompt, d.prompt_column) if not isinstance(prompt, str) else \
            [{"role": "user", "content": prompt}]
        turns = [t[len(prompt_turns):] if t[:len(prompt_turns)] == prompt_turns else t for t in turns]
    for t, n in zip(turns, names):
        if len(t) != 1 or t[0]["role"] != "assistant":
            raise chat.BadRow(f"{n}: expected one assistant reply after the prompt, got "
                              f"{' + '.join(x['role'] for x in t) or 'nothing'}")
    return _user_turns(prompt_turns), [t[0] for t in turns]


def _user_turns(turns: list[dict]) -> list[dict]:
    if not turns or turns[-1]["role"] != "user":
        raise chat.BadRow(f"the prompt ends on a {turns[-1]['role'] if turns else 'missing'} turn (it must end on "
                          "the user's)")
    return turns


class ReplyError(ValueError):
    """The chat template refused the conversation of reply `index`."""

    def __init__(self, index: int, reason: str):
        super().__init__(reason)
        self.index, self.reason = index, reason


def encode_replies(tokenizer, replies: list[tuple[str | list[dict], str | dict]]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each reply after its prompt, the reply's tokens the only targets: through the
    chat template as supervised chat data (when the prompt is turns, or text and the tokenizer has a
    template; one batched render), else the prompt's tokens then the reply's and the end-of-sequence token.
    Raises ReplyError naming the reply the template refused."""
    templated = has_template(tokenizer)
    out: list = [None] * len(replies)
    talks = [(i, (p if isinstance(p, list) else [{"role": "user", "content": p}])
              + [{"role": "assistant", "content": r if isinstance(r, str) else r["content"]}])
             for i, (p, r) in enumerate(replies) if templated or isinstance(p, list)]
    try:
        rendered = chat.render_many(tokenizer, [turns for _, turns in talks])
    except chat.BadRow:
        for i, turns in talks:
            try:
                chat.render(tokenizer, turns)
            except chat.BadRow as e:
                raise ReplyError(i, str(e)) from None
        raise
    encoded = chat.tokenize(tokenizer, [text for text, _ in rendered], [spans[-1:] for _, spans in rendered], IGNORE)
    for (i, _), pair in zip(talks, encoded):
        out[i] = pair
    plain = [i for i, x in enumerate(out) if x is None]
    if plain:
        prompts = tokenizer([replies[i][0] for i in plain])["input_ids"]
        texts = tokenizer([replies[i][1] if isinstance(replies[i][1], str) else replies[i][1]["content"] for i in plain],
                          add_special_tokens=False)["input_ids"]
        for i, p, r in zip(plain, prompts, texts):
            r = with_eos(r, tokenizer.eos_token_id)
            out[i] = (p + r, [IGNORE] * len(p) + r)
    return out
