"""One module per task; `TASKS` is the registry (the config's `task` key names one)."""
from __future__ import annotations

from dstune.tasks.base import Task
from dstune.tasks.causal_lm import CausalLM
from dstune.tasks.classification import Classification
from dstune.tasks.seq2seq import Seq2Seq

TASKS: dict[str, Task] = {t.name: t for t in (Classification(), CausalLM(), Seq2Seq())}


def get_task(name: str) -> Task:
    return TASKS[name]
