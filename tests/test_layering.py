"""Imports point down: cli → profiling → engine → methods/data/models/tasks → kernels, and everything may
use config, errors and families. A module that reaches up (even inside a function) fails here, by name."""
from __future__ import annotations

import ast
from pathlib import Path

import dstune

PACKAGE = Path(dstune.__file__).parent
LAYERS = {  # higher may import lower or the same, never the other way
    "config": 0, "errors": 0, "families": 0,
    "kernels": 1,
    "methods": 2, "data": 2, "models": 2, "tasks": 2,
    "engine": 3,
    "profiling": 4,
    "cli": 5, "__main__": 5, "launch": 5, "active_learning": 5,
}


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
