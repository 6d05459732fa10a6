"""Sequence to sequence: a source column → a target column (perplexity; BLEU and ROUGE of generations)."""
from __future__ import annotations

import torch

from dstune.tasks.base import Generative


def with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]


class Seq2Seq(Generative):
    name = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"
    generates_by_default = True
    forward_takes_labels = True

    def check(self, cfg, ds, path, key, tokenizer):
        return "", [("data.source_column", cfg.data.source_column), ("data.target_column", cfg.data.target_column)]

    def prompt_only(self, cfg, columns):
        d = cfg.data
        return d.source_column if d.source_column in columns and d.target_column not in columns else None

    def encoder(self, cfg, tokenizer, style, labels, for_eval, path, key):
        d, eos = cfg.data, tokenizer.eos_token_id

        def encode(batch):
            sources, targets = ([str(x) for x in batch[c]] for c in (d.source_column, d.target_column))
            out = {"input_ids": [with_eos(x, eos)[:d.max_length] for x in tokenizer(sources)["input_ids"]],
                   "labels": [with_eos(x, eos)[:d.max_target_length] for x in tokenizer(targets)["input_ids"]]}
            return {**out, "ref": targets} if for_eval else out
        return encode

    def example_batch(self, config, micro_batch, seq_len, target_len):
        return {"input_ids": torch.randint(0, config.vocab_size, (micro_batch, seq_len)),
                "labels": torch.randint(0, config.vocab_size, (micro_batch, target_len))}
