"""Data prepared once per job: an Arrow cache keyed by content, written by one rank, memory-mapped by all."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ok, run_cli, write_recipe
from dstune.config import load_config
from dstune.prepare import cache as prepare
from dstune.prepare.pipeline import prepare_data
from dstune.errors import UserError
from dstune.models.tokenizers import load_tokenizer


def _recipe(tmp_path: Path, ws: Path, train: Path, **data) -> Path:
    extra = "".join(f"  {k}: {v}\n" for k, v in data.items())
    return write_recipe(tmp_path / "r.yaml", f"""
task: causal_lm
model: {{tiny: llama}}
tokenizer: {{path: {ws / 'tokenizer'}}}
data:
  train: {train}
  cache_dir: {tmp_path / 'cache'}
  max_length: 32
{extra}training: {{precision: fp32, max_steps: 2, micro_batch_size: 2}}
output_dir: {tmp_path / 'run'}
""")


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


def test_prepared_once_then_read_from_the_cache_and_prepared_again_when_the_data_changes(ws, tmp_path, monkeypatch):
    train = tmp_path / "lm.jsonl"
    train.write_text((ws / "lm.jsonl").read_text())
    cfg = load_config(_recipe(tmp_path, ws, train, packing="true", eval_fraction=0.25))
    tok = load_tokenizer(str(ws / "tokenizer"))
    data, entry = prepare.prepared_data(cfg, tok)
    assert _entries(tmp_path / "cache") == [entry] and data.train.cache_files  # memory-mapped from the entry
    assert all(f["filename"].startswith(str(entry)) for f in data.train.cache_files + data.eval.cache_files)
    # the same rows as preparing in memory
    fresh = prepare_data(cfg, tok)
    assert data.train[:] == fresh.train[:] and data.eval[:] == fresh.eval[:]

    def no_build(*_):
        raise AssertionError("prepared again")
    monkeypatch.setattr(prepare, "build", no_build)
    assert prepare.prepared_data(cfg, tok)[1] == entry  # a rerun reads the cache
    monkeypatch.undo()
    train.write_text(train.read_text().replace("good", "fine", 1))  # same size class, new content
    _, changed = prepare.prepared_data(cfg, tok)
    assert changed != entry and len(_entries(tmp_path / "cache")) == 2
    other = load_config(_recipe(tmp_path, ws, train, packing="false", eval_fraction=0.25))
    assert prepare.fingerprint(other, tok) != changed.name  # a data setting is part of the key
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".") or p.suffix == ".lock"]


def test_a_writer_that_died_is_reported_not_waited_for(tmp_path):
    entry = tmp_path / "cache" / "abc"
    entry.parent.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = prepare._lock(entry, os.uname().nodename)
    lock.write_text(str(dead.pid))
    started = time.monotonic()
    with pytest.raises(UserError, match=rf"the rank preparing the data \(pid {dead.pid}\) ended without writing"):
        prepare.wait_for(entry, timeout_s=60)
    assert time.monotonic() - started < 10
    lock.unlink()
    with pytest.raises(UserError, match=r"^training.dist_timeout_s: no rank on .* began preparing the data in 1 s"):
        prepare.wait_for(entry, timeout_s=1)


@pytest.mark.slow
def test_two_ranks_prepare_once_and_a_bad_row_stops_both_with_one_line(ws, tmp_path):
    train = tmp_path / "lm.jsonl"
    train.write_text((ws / "lm.jsonl").read_text())
    recipe = _recipe(tmp_path, ws, train, packing="true")
    res = ok(run_cli(["train", str(recipe)], nproc=2))
    entries = _entries(tmp_path / "cache")
    assert len(entries) == 1 and f"({entries[0]})" in res.stdout and res.stdout.count("[dstune] data:") == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([entries[0].name, "digests.json"])
    # `dstune prepare` finds the same entry; a rerun of train reads it
    assert ok(run_cli(["prepare", str(recipe)])).stdout.strip().endswith(f"({entries[0]})")

    bad = tmp_path / "chat.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                   + "\n" + json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    recipe = write_recipe(tmp_path / "bad.yaml", f"""
task: causal_lm
model: {{tiny: llama}}
tokenizer:
  path: {ws / 'tokenizer'}
  chat_template: "{{% for m in messages %}}{{{{ m['content'] }}}} {{% endfor %}}"
data: {{train: {bad}, cache_dir: {tmp_path / 'cache'}, format: messages}}
output_dir: {tmp_path / 'run2'}
""")
    res = run_cli(["train", str(recipe)], nproc=2, timeout=120)
    assert res.returncode != 0 and not (tmp_path / "run2").exists()
    lines = [line for line in res.stderr.splitlines() if line.startswith("dstune: error:")]
    assert lines == [f"dstune: error: {bad}:2: data.train: the conversation ends on a user turn (the last turn "
                     "must be the assistant's)"], res.stderr[-3000:]


def test_only_the_nodes_first_rank_reads_the_data_to_hash_it(ws, tmp_path, monkeypatch):
    """Local ranks other than 0 wait for rank 0's digest of the data files instead of reading them too."""
    import builtins
    import threading

    train = tmp_path / "lm.jsonl"
    train.write_text((ws / "lm.jsonl").read_text())
    cfg = load_config(_recipe(tmp_path, ws, train))
    tok = load_tokenizer(str(ws / "tokenizer"))
    readers = []

    def spying_open(path, *args, **kwargs):
        if str(path) == str(train):
            readers.append(threading.current_thread().name)
        return builtins.open(path, *args, **kwargs)
    import dstune.digests
    monkeypatch.setattr(dstune.digests, "open", spying_open, raising=False)

    def rank0():
        time.sleep(1.5)  # the other rank starts first and finds no digest yet
        results["rank0"] = prepare.fingerprint(cfg, tok)
    results: dict = {}
    first = threading.Thread(target=rank0, name="rank0")
    first.start()
    results["rank1"] = prepare.fingerprint(cfg, tok, wait_s=60)
    first.join()
    assert results["rank1"] == results["rank0"]
    assert readers == ["rank0"]
    # with no rank 0 to wait for, a rank hashes the file itself once the wait is over
    (tmp_path / "cache" / "digests.json").unlink()
    readers.clear()
    assert prepare.fingerprint(cfg, tok, wait_s=1) == results["rank0"]
    assert readers == [threading.current_thread().name]
