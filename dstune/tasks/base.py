"""What a task decides, in one place: which model it builds, how its rows become token ids, how a batch
of them is collated, scored and generated from. Each task is one module with one `Task` subclass, listed
in `dstune.tasks.TASKS`; the data pipeline, the trainer, evaluation, export and the estimate ask it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from dstune.data.batching import IGNORE, collate, pad, target_tokens

Encoder = Callable[[dict[str, list]], dict[str, list]]  # a batched `datasets.map` function


@dataclass(frozen=True)
class Decoding:
    """How `dstune generate` and `dstune chat` pick the reply's tokens: greedy, or sampled with a temperature
    and nucleus (top-p) cut when `sample`."""
    max_new_tokens: int = 64
    sample: bool = False
    temperature: float = 0.8
    top_p: float = 0.95


class Task:
    name: str
    auto_class: str           # the transformers Auto class that builds the task's model
    peft_task_type: str       # `task_type` of an exported PEFT adapter
    generative = True         # emits tokens: generate, token-weighted loss, no KV cache in training
    generates_by_default = False  # evaluation.generate when the recipe leaves it unset
    shifts_labels = False     # the model predicts token n from tokens < n (labels shift inside the model)
    forward_takes_labels = False  # evaluation passes the labels to forward() (a decoder reads its inputs there)
    prompt_column = "input_ids"  # what generation starts from in an eval row
    left_pad_prompts = False  # decoder-only generation: every row must end at its last prompt token
    label_key: str | None = None  # config key of a label column that is not part of the input (classification)
    headline_metric = "perplexity"  # the held-out number a learning curve follows
    model_task: str = ""      # the task whose model this one trains (methods, generation, chat): default its own

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and "model_task" not in cls.__dict__:
            cls.model_task = cls.name

    # data
    def check(self, cfg, ds, path: str, key: str, tokenizer) -> tuple[str, list[tuple[str, str]]]:
        """The rows' format ("" where there is one) and the columns it reads, each with its config key (the
        pipeline requires them); fail with a config key for anything else the rows cannot be read with."""
        raise NotImplementedError

    def label_values(self, sources: list) -> list[str] | None:
        """Class names (index = class id) from the training sources (each with .cfg, .raw rows and .path);
        None: the task has no classes."""
        return None

    def check_eval_labels(self, cfg, ds, labels: list[str] | None) -> None:
        """Refuse evaluation rows the training labels cannot score."""

    def encoder(self, cfg, tokenizer, style: str, labels: list[str] | None, for_eval: bool, path: str,
                key: str) -> Encoder:
        """Batched map function: rows → `input_ids`, `labels` (and, for evaluation, generation columns)."""
        raise NotImplementedError

    def token_features(self, cfg, for_eval: bool):
        """datasets.Features of the encoded rows, or None for what the encoder returns."""
        return None

    def packs(self, cfg, style: str, for_eval: bool) -> bool:
        """Whether these encoded rows are packed into blocks."""
        return False

    # batches
    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """A micro-batch of encoded rows as forward() inputs (padded to the longest row)."""
        return collate(rows, pad_id, self)

    def collate_labels(self, rows: list[dict]) -> torch.Tensor:
        return pad([r["labels"] for r in rows], IGNORE)

    def target_tokens(self, label_rows: list[list[int]], first_label_is_target: bool) -> int | None:
        """Tokens a step's loss is the mean over (None: the model's plain mean is already right)."""
        return None

    def loss(self, model, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss the model computes for these rows from their logits (the mean over their
        targets): the loss of some rows of a batch the model ran without labels."""
        import torch.nn.functional as F
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)

    def example_batch(self, config, micro_batch: int, seq_len: int, target_len: int) -> dict[str, torch.Tensor]:
        """Random token ids of a training batch's shapes (for the memory estimate's trace)."""
        raise NotImplementedError

    def model_config_kwargs(self, labels: list | None) -> dict[str, Any]:
        """Extra arguments of the model config (a classification head's labels)."""
        return {}

    # evaluation
    def score(self, logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> tuple[float, int, list, list]:
        """(summed loss, items it sums over, predictions, gold labels) of one eval batch; rows where `keep` is
        False are filler and count nothing."""
        raise NotImplementedError

    def metrics(self, loss_sum: float, items: int, preds: list, golds: list) -> dict[str, float]:
        raise NotImplementedError

    # generation
    def scores_generations(self, evaluation) -> bool:
        """evaluation.generate, or the task's default when the recipe leaves it unset."""
        return evaluation.generate if evaluation.generate is not None else self.generates_by_default

    def prompt_ids(self, tokenizer, prompt: str, system: str | None = None) -> list[int]:
        """A user's prompt as the model reads it (`dstune generate`); `system`: a system message before it,
        which only a chat template renders (causal_lm)."""
        return tokenizer(prompt)["input_ids"]

    def new_tokens(self, out: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """The generated part of generate()'s output rows."""
        return out

    def prompt_only(self, cfg, columns: list[str]) -> str | None:
        """The column of prompts when a table's rows lack their reference (`dstune select` then scores the
        model's own greedy reply); None when the rows are complete, or the task does not generate."""
        return None


class Generative(Task):
    """Causal LM and seq2seq: token targets, a loss that is the token mean, perplexity, generation."""

    def token_features(self, cfg, for_eval: bool):
        """int32 token columns for training rows (half of int64's bytes on disk and in the page cache)."""
        if for_eval:
            return None
        import datasets
        ids = datasets.List(datasets.Value("int32"))
        return datasets.Features({"input_ids": ids, "labels": ids})

    def target_tokens(self, label_rows: list[list[int]], first_label_is_target: bool) -> int | None:
        return target_tokens(label_rows, skip_first=self.shifts_labels and not first_label_is_target)

    def loss(self, model, logits, labels):
        if self.shifts_labels:  # the model's own loss function (dstune's chunked one, models/losses.py)
            return model.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])
        return super().loss(model, logits, labels)

    def score(self, logits, labels, keep):
        import torch.nn.functional as F

        labels = labels.masked_fill(~keep[:, None], IGNORE)
        if self.shifts_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE,
                               reduction="sum")
        return loss.item(), int((labels != IGNORE).sum()), [], []

    def metrics(self, loss_sum, items, preds, golds):
        from dstune.tasks.metrics import perplexity
        return perplexity(loss_sum, items)


    def reply(self, model, tokenizer, ids: list[int], decoding: Decoding, streamer=None) -> torch.Tensor:
        """The tokens `model` generates after the prompt `ids` (one row), with every tuning method applied
        (their `generate_kwargs`); `streamer` (transformers' TextStreamer protocol) sees them as they come."""
        x = torch.tensor([ids], device=next(model.parameters()).device)
        sample = {"temperature": decoding.temperature, "top_p": decoding.top_p} if decoding.sample else \
            {"temperature": None, "top_p": None}
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=decoding.max_new_tokens,
                             do_sample=decoding.sample, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                             **sample, **getattr(model, "dstune_generate_kwargs", {}))
        return self.new_tokens(out[0], x.shape[1])
