"""Imports point down, and every package has a layer of its own, so no two packages can import each other
(even inside a function, even for type hints). A module that reaches up fails here, by name."""
from __future__ import annotations

import ast
from pathlib import Path

import dstune

PACKAGE = Path(dstune.__file__).parent
ORDER = [  # lowest first: a package may import those before it (and itself), never one after it
    ("errors", "families", "digests"),  # one-line errors; what dstune knows of each model family; file digests
    ("kernels",),     # CUDA extensions and their PyTorch references
    ("data",),        # data primitives: files, chat rendering, packing, batches
    ("tasks",),       # one module per task: how rows are encoded and scored (the task registry)
    ("config",),      # the recipe schema (it names the tasks and families)
    ("telemetry",),   # phase memory, step profile, metric trackers
    ("models",),      # loading models and tokenizers; lean activations; the chunked loss
    ("methods",),     # tuning methods
    ("prepare",),     # data files -> the prepared, packed cache (uses tasks and tokenizers)
    ("rundir",),      # run dir files: lock, checkpoint pointer, trainable weights, load, export, chat
    ("distill",),     # a teacher and the divergence
    ("preference",),  # preference objectives (DPO, IPO, SimPO, ORPO, KTO) and their reference
    ("engine",),      # the training runtime
    ("planning",),    # before a run: a first recipe (init), costs: estimate, bench, fit
    ("active",),      # active learning: select and the loop
    ("sweep",),       # a grid of settings as the adapters of one job, and their ranking
    ("launch",),      # the real launchers
    ("cli", "__main__"),
]
LAYERS = {name: level for level, names in enumerate(ORDER) for name in names}


def _layer(module: str) -> int:
    part = module.split(".")[1] if module.startswith("dstune.") else module
    assert part in LAYERS, f"{module}: add its package to LAYERS"
    return LAYERS[part]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dstune."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dstune."))
    return found


def test_imports_point_down():
    upward, seen = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "dstune." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module.removesuffix(".__init__")
        if module == "dstune":
            continue
        for imported in _imports(path):
            seen += 1
            if _layer(imported) > _layer(module):
                upward.append(f"{module} imports {imported}")
    assert seen > 150, seen   # the scan found the package's imports (function-level ones too)
    assert not upward, "\n".join(upward)


def test_the_training_runtime_reads_in_short_functions():
    """engine/ (the training runtime) is where newcomers read most: no function over 60 lines or with more
    than 6 parameters (self aside), so each step of a run fits one screen and one call."""
    long = []
    for path in sorted((PACKAGE / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 or len(params) > 6:
                    long.append(f"{path.name}:{node.lineno} {node.name}: {lines} lines, {len(params)} parameters")
    assert not long, "\n".join(long)
