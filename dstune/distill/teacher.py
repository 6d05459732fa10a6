"""Knowledge distillation: a frozen teacher beside the student, and the loss that mixes its outputs in.

The teacher is a dstune run dir (its base, methods and trained weights) or a Hugging Face model folder. It
never trains: no gradients, no optimizer state, eval mode, the training precision. Under ZeRO-3 it is
partitioned like the student (DeepSpeed without an optimizer), so no rank holds it whole while training;
a folder is loaded partitioned, a run dir is built whole on each rank's CPU first (export it with
`dstune export --format merged` to avoid that for a large teacher).

loss = (1 - alpha) * task loss + alpha * T^2 * divergence(teacher_T, student_T), the divergence per example
(classification: the label logits) or per target token (causal LM, seq2seq: over the shared vocabulary).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from dstune.config import RunConfig
from dstune.data.batching import IGNORE
from dstune.distill.divergence import distillation_loss
from dstune.errors import UserError
from dstune.models.loading import cast_as_deepspeed
from dstune.tasks import get_task


class Teacher:
    def __init__(self, cfg: RunConfig, module, vocab: int | None):
        self.d, self.task, self.module, self.vocab = cfg.distill, get_task(cfg.task), module, vocab
        self.alpha = cfg.distill.alpha  # loss = (1 - alpha) * task loss + alpha * divergence

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor:
        inputs = batch if self.task.forward_takes_labels else {k: v for k, v in batch.items() if k != "labels"}
        return self.module(**inputs).logits

    def rows(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[rows, classes]: one row per example (classification), or per target token (the position that
        predicts it, over the shared vocabulary)."""
        if not self.task.generative:
            return logits
        if self.task.shifts_labels:  # position i predicts token i + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        return logits[labels != IGNORE][:, :self.vocab]

    def divergence(self, student_logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """T^2 * the divergence of the student's from the teacher's outputs, the mean over this micro-batch's
        rows (classification: every example, labelled or not) or target tokens."""
        labels = batch["labels"]
        return distillation_loss(self.rows(student_logits, labels), self.rows(self.logits(batch), labels),
                                 self.d.temperature, self.d.divergence)


def frozen_ds_config(ds_config: dict) -> dict:
    """The student's DeepSpeed config without what training needs: ZeRO-3 partitions, no optimizer."""
    ds = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler"):
        ds.pop(key, None)
    z = ds.setdefault("zero_optimization", {})
    z.pop("offload_optimizer", None)
    return ds


def _check_matches(cfg: RunConfig, path: Path, other_task: str, other_tok, tokenizer, key: str) -> int | None:
    """Same kind of model; same labels in the same order (classification), else the same vocabulary (the
    vocabulary size the divergence runs over)."""
    task = get_task(cfg.task)
    if get_task(other_task).model_task != task.model_task:
        raise UserError(f"{key}: {path} is a {other_task} model and this run is {cfg.task}")
    if not task.generative:
        return None
    if other_tok is None or tokenizer is None or other_tok.get_vocab() != tokenizer.get_vocab():
        size = len(other_tok) if other_tok is not None else "an unknown"
        raise UserError(f"{key}: {path} has another vocabulary ({size} tokens, this run's "
                        f"{len(tokenizer) if tokenizer is not None else 'unknown'}); both models must score the same "
                        "tokens, so they need the same tokenizer")
    return len(tokenizer)


def _labels_of_folder(path: Path, labels, key: str) -> None:
    """A classification folder must name its classes as the data does, in the same order."""
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    names = [str(v) for _, v in sorted(((int(k), v) for k, v in (config.get("id2label") or {}).items()))]
    if names != [str(x) for x in labels or []]:
        raise UserError(f"{key}: {path}'s classes {names or '(none named)'} are not the data's labels "
                        f"{[str(x) for x in labels or []]} in that order; use a dstune run dir trained on these "
                        "labels, or a folder whose config.json id2label names them")


def with_model_folder(cfg: RunConfig, path: str) -> RunConfig:
    """`cfg` with another Hugging Face model folder as its model, trained whole (a teacher's, a reference's)."""
    return cfg.model_copy(update={"methods": [{"name": "full"}], "model": cfg.model.model_copy(update={
        "path": path, "tiny": None, "gguf_file": None, "config_overrides": {}})})


def load_frozen(cfg: RunConfig, path_: str, key: str, tokenizer, labels, ds_config: dict, stage: int,
                device: torch.device):
    """(a frozen model, in eval mode and the training precision, partitioned under ZeRO-3; the vocabulary
    size both models share, None for classification) from a dstune run dir (its base, methods and trained
    weights) or a Hugging Face model folder: a distillation teacher, a preference reference. `key` names
    the recipe key in errors."""
    from transformers.integrations import HfDeepSpeedConfig

    from dstune.models.loading import load_model
    from dstune.models.tokenizers import load_tokenizer
    from dstune.rundir.load import is_run_dir, load_run

    path = Path(path_)
    if not path.is_dir():
        raise UserError(f"{key}: not a folder: {path}")
    if is_run_dir(path):
        run = load_run(str(path))
        vocab = _check_matches(cfg, path, run.cfg.task, run.tokenizer, tokenizer, key)  # the task first: then labels
        if not get_task(cfg.task).generative and [str(x) for x in run.labels or []] != [str(x) for x in labels or []]:
            raise UserError(f"{key}: {path} was trained on labels {run.labels}, the data has {labels}")
        model = run.model
    else:
        if not get_task(cfg.task).generative:
            _labels_of_folder(path, labels, key)
        other = with_model_folder(cfg, str(path))
        vocab = _check_matches(cfg, path, cfg.task, load_tokenizer(str(path)) if any(path.glob("tokenizer*")) else None,
                               tokenizer, key)
        keep = HfDeepSpeedConfig(frozen_ds_config(ds_config)) if stage == 3 else None  # noqa: F841 (loads partitioned)
        model = load_model(other, tokenizer, labels)
    return frozen(model, cfg, ds_config, stage, device), vocab


def frozen(model, cfg: RunConfig, ds_config: dict, stage: int, device: torch.device):
    """`model` frozen, in eval mode and the training precision; under ZeRO-3 partitioned by DeepSpeed (an engine
    without an optimizer), so no rank holds it whole."""
    import deepspeed

    model.requires_grad_(False)
    model.eval()
    if stage == 3:
        module = deepspeed.initialize(model=model, config=frozen_ds_config(ds_config))[0]
        module.eval()
        return module
    return cast_as_deepspeed(model.to(device), cfg.training.precision)


def load_teacher(cfg: RunConfig, tokenizer, labels, ds_config: dict, stage: int, device: torch.device) -> Teacher:
    """The recipe's teacher, frozen, in eval mode and the training precision; under ZeRO-3 partitioned."""
    module, vocab = load_frozen(cfg, cfg.distill.teacher, "distill.teacher", tokenizer, labels, ds_config, stage,
                                device)
    return Teacher(cfg, module, vocab)
