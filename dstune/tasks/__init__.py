"""One module per task. `TASKS` is the registry, the one list of tasks: the recipe's `task` key names one
(the schema reads the names from here), and its class is imported on first use, so a recipe is checked
before torch is imported. A new task is a module with a `Task` subclass and a line here."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstune.tasks.base import Task

TASKS: dict[str, str] = {  # name -> "module:class" in dstune/tasks/
    "classification": "classification:Classification",
    "causal_lm": "causal_lm:CausalLM",
    "seq2seq": "seq2seq:Seq2Seq",
    "preference": "preference:Preference",
}
_made: dict[str, Task] = {}


def get_task(name: str) -> Task:
    """The task named `name` (one instance per process)."""
    if name not in _made:
        module, cls = TASKS[name].split(":")
        _made[name] = getattr(importlib.import_module(f"dstune.tasks.{module}"), cls)()
    return _made[name]
