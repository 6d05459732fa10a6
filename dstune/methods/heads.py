"""Classification heads of adapters that do not share the base's: a head of another label count over a
classifier base, or a classifier's head over a causal LM's base (the `score` layer transformers' decoder-only
classifiers put beside the LM head, reading the same last hidden state). Each is drawn as transformers draws
a head the checkpoint lacks, so an adapter's head starts where its own run's does."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dstune.errors import UserError
from dstune.families import TASK_HEADS

DECODER_HEAD = "score"  # the head of transformers' decoder-only classifiers (GPT-2's, and every generic one)


def class_head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """(name, layer) of a classifier model's head: a Linear named as TASK_HEADS lists; None for another model."""
    for name in TASK_HEADS:
        if isinstance(layer := getattr(model, name, None), nn.Linear):
            return name, layer
    return None


def check_decoder_classifier(config, trust_remote_code: bool) -> None:
    """A causal LM whose transformers classifier is its base and one bias-free `score` Linear on the last
    hidden state (GPT-2, Llama and the generic ones): else classification adapters cannot share its base."""
    from transformers import AutoModelForSequenceClassification

    try:
        with torch.device("meta"):
            classifier = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError:
        classifier = None
    head = getattr(classifier, DECODER_HEAD, None)
    if not isinstance(head, nn.Linear) or head.bias is not None or head.in_features != _hidden(config):
        raise UserError(f"adapters: classification adapters over a causal LM need a decoder-only classifier with a "
                        f"score head; {config.model_type} has none (train the classifiers as a job of their own)")


def _hidden(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "hidden_size", None) or getattr(text, "n_embd")


def draw_head(in_features: int, labels: int, bias: bool, std: float, like: torch.Tensor) -> nn.Linear:
    """A new head, drawn from the global (CPU) random state as transformers initializes one the checkpoint
    lacks (weights normal with the config's initializer_range, bias zero); shapes only beside a meta or fake
    `like` (the estimate's model)."""
    from torch._subclasses.fake_tensor import is_fake

    if like.is_meta or is_fake(like):
        return nn.Linear(in_features, labels, bias=bias, device=like.device)
    head = torch.nn.utils.skip_init(nn.Linear, in_features, labels, bias=bias)  # draws nothing before its weights
    with torch.no_grad():
        head.weight.normal_(0.0, std)
        if bias:
            head.bias.zero_()
    return head


NewHead = tuple[Callable[[], nn.Linear], nn.Module, "str | None"]


def head_for(model: nn.Module, model_task: str, labels: int) -> NewHead | None:
    """For an adapter with `labels` classes that the model's own head cannot serve: (a function drawing its
    new head, the module whose output that head replaces, the name its own run gives the head where it is
    not that module's). Over a causal LM: a score head beside the LM head; over a classifier with a Linear
    head of another label count: one like it. None: the model's head serves (or is not one Linear layer)."""
    std = getattr(model.config, "initializer_range", 0.02)
    if model_task != "classification":
        hidden, out = _hidden(model.config), model.get_output_embeddings()
        return (lambda: draw_head(hidden, labels, False, std, out.weight)), out, DECODER_HEAD
    if (own := class_head(model)) is None:
        return None
    _, layer = own
    shape = getattr(layer.weight, "ds_shape", layer.weight.shape)
    if shape[0] == labels:
        return None
    return (lambda: draw_head(shape[1], labels, layer.bias is not None, std, layer.weight)), layer, None
