"""Sequence classification: a text column → one of the label column's values (accuracy, macro-F1)."""
from __future__ import annotations

import torch

from dstune.data.batching import IGNORE
from dstune.errors import UserError
from dstune.tasks.base import Task


class Classification(Task):
    name = "classification"
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    generative = False
    label_key = "data.label_column"
    headline_metric = "accuracy"

    def check(self, cfg, ds, path, key, tokenizer):
        return "", [("data.text_column", cfg.data.text_column), ("data.label_column", cfg.data.label_column)]

    def label_values(self, sources):
        """The label values of every source, sorted as text."""
        labels = sorted({str(x) for s in sources for x in s.raw.unique(s.cfg.data.label_column)})
        if len(labels) < 2:
            raise UserError(f"data.label_column: {', '.join(s.path for s in sources)} has only one label value "
                            f"({labels[0]!r})")
        return labels

    def check_eval_labels(self, cfg, ds, labels):
        unseen = {str(x) for x in ds.unique(cfg.data.label_column)} - set(labels or [])
        if unseen:
            raise UserError(f"data.eval: labels {sorted(unseen)} do not occur in the training labels {labels}")

    def encoder(self, cfg, tokenizer, style, labels, for_eval, path, key):
        d, class_id = cfg.data, {v: i for i, v in enumerate(labels or [])}

        def encode(batch):
            ids = tokenizer([str(x) for x in batch[d.text_column]], truncation=True, max_length=d.max_length)
            if labels is None:  # rows without labels (data.unlabeled): only a teacher's outputs train on them
                return {"input_ids": ids["input_ids"], "labels": [IGNORE] * len(ids["input_ids"])}
            return {"input_ids": ids["input_ids"], "labels": [class_id[str(x)] for x in batch[d.label_column]]}
        return encode

    def collate_labels(self, rows):
        return torch.tensor([r["labels"] for r in rows], dtype=torch.long)

    def target_tokens(self, label_rows, first_label_is_target):
        """Rows with a label (data.unlabeled rows have none)."""
        return sum(label != IGNORE for label in label_rows)

    def example_batch(self, config, micro_batch, seq_len, target_len):
        return {"input_ids": torch.randint(0, config.vocab_size, (micro_batch, seq_len)),
                "labels": torch.randint(0, config.num_labels, (micro_batch,))}

    def model_config_kwargs(self, labels):
        """The head's labels (two when the estimate knows none)."""
        names = [str(x) for x in labels] if labels else ["0", "1"]
        return dict(num_labels=len(names), id2label=dict(enumerate(names)),
                    label2id={n: i for i, n in enumerate(names)})

    def score(self, logits, labels, keep):
        import torch.nn.functional as F
        loss = F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        return loss, int(keep.sum()), logits.argmax(-1)[keep].tolist(), labels[keep].tolist()

    def metrics(self, loss_sum, items, preds, golds):
        from dstune.tasks.metrics import classification_metrics
        return {"loss": loss_sum / items, **classification_metrics(preds, golds)}
