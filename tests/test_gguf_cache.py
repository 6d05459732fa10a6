"""GGUF bases dequantized once (models/gguf_cache.py): the cached copy loads bitwise what the GGUF file gives,
a damaged or cut-off copy is never read, processes racing on an empty cache agree, and the cache can be off."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dstune.config import load_config
from dstune.models import gguf_cache, loading

FILE = "tiny-q8_0.gguf"


def recipe(tmp_path, folder, task: str = "causal_lm", gguf_file: str = FILE):
    path = tmp_path / f"{task}.yaml"
    path.write_text(json.dumps({"task": task, "model": {"path": str(folder), "gguf_file": gguf_file},
                                "data": {"train": str(tmp_path / "unused.jsonl")}, "output_dir": str(tmp_path / "o")}))
    return load_config(path)


@pytest.fixture(scope="module")
def tok(ws):
    from dstune.models.tokenizers import load_tokenizer
    return load_tokenizer(str(ws / "tokenizer"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache of this test's own; `calls` counts the loads that read the GGUF file itself."""
    monkeypatch.setenv("DSTUNE_MODEL_CACHE", str(tmp_path / "cache"))
    calls = []
    dequantize = loading._dequantize
    monkeypatch.setattr(loading, "_dequantize", lambda *a: calls.append(1) or dequantize(*a))
    return calls


def load(cfg, tok, labels=None):
    torch.manual_seed(0)  # as the trainer seeds before loading: a new task head is drawn the same each time
    return loading.load_model(cfg, tok, labels)


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype == torch.float32 and torch.equal(sa[k], sb[k]), k
    assert a.config.to_dict() == b.config.to_dict()
    if a.can_generate():
        assert a.generation_config.to_dict() == b.generation_config.to_dict()
    assert a.dstune_new_weights == b.dstune_new_weights
    assert type(a) is type(b) and all(type(m).__name__ != "GgufLinear" for m in b.modules())


@pytest.mark.parametrize("task, labels", [("causal_lm", None), ("classification", ["neg", "pos"])])
def test_the_second_load_reads_the_kept_copy_bitwise_what_the_gguf_file_gives(
        tiny_gguf_q8, tok, tmp_path, monkeypatch, cache, task, labels):
    cfg = recipe(tmp_path, tiny_gguf_q8, task)
    monkeypatch.setenv("DSTUNE_MODEL_CACHE", "off")
    direct = load(cfg, tok, labels)                   # what the GGUF file gives, through transformers
    assert cache == [1] and not (tmp_path / "cache").exists()
    monkeypatch.setenv("DSTUNE_MODEL_CACHE", str(tmp_path / "cache"))
    first, second = load(cfg, tok, labels), load(cfg, tok, labels)
    assert cache == [1, 1]                            # the first dequantized and kept it; the second read the copy
    assert_same(direct, first)
    assert_same(direct, second)
    entry = gguf_cache.entry_for(str(tiny_gguf_q8), FILE)
    kept = entry / ("AutoModelForCausalLM" if task == "causal_lm" else "AutoModelForSequenceClassification")
    assert gguf_cache.is_sound(kept) and gguf_cache.is_sound(entry / "config")
    if labels:  # the new head is not kept: each load draws it afresh, from the run's seed
        assert direct.dstune_new_weights == ["score.weight"]
        from safetensors import safe_open
        with safe_open(str(kept / "model.safetensors"), "pt") as f:
            assert "score.weight" not in f.keys()
    ids = torch.tensor([[5, 9, 11, 4]])
    assert torch.equal(direct(input_ids=ids).logits, second(input_ids=ids).logits)


def test_a_cut_off_or_damaged_copy_is_never_read(tiny_gguf_q8, tok, tmp_path, cache):
    cfg = recipe(tmp_path, tiny_gguf_q8)
    reference = load(cfg, tok)
    kept = gguf_cache.entry_for(str(tiny_gguf_q8), FILE) / "AutoModelForCausalLM"
    weights = kept / "model.safetensors"
    data = weights.read_bytes()
    damages = {"one byte changed": lambda: weights.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:]),
               "cut off": lambda: weights.write_bytes(data[: len(data) // 2]),
               "no manifest": lambda: (kept / gguf_cache.MANIFEST).unlink(),
               "a file added": lambda: (kept / "extra.bin").write_bytes(b"x")}
    for n, (what, damage) in enumerate(damages.items(), start=2):
        damage()
        assert not gguf_cache.is_sound(kept), what
        assert_same(reference, load(cfg, tok))
        assert len(cache) == n, what                  # read from the GGUF file again, and kept afresh
        assert gguf_cache.is_sound(kept) and not (kept / "extra.bin").exists()
    assert [p.name for p in kept.parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []


def test_the_cache_can_be_off_and_an_unwritable_one_is_passed_over(tiny_gguf_q8, tok, tmp_path, monkeypatch, cache):
    cfg = recipe(tmp_path, tiny_gguf_q8)
    for off in ("off", ""):
        monkeypatch.setenv("DSTUNE_MODEL_CACHE", off)
        assert gguf_cache.cache_root() is None and gguf_cache.entry_for(str(tiny_gguf_q8), FILE) is None
    reference = load(cfg, tok)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("DSTUNE_MODEL_CACHE", str(tmp_path / "a-file"))  # no folder can be made there
    assert_same(reference, load(cfg, tok))
    assert_same(reference, load(cfg, tok))
    assert len(cache) == 3
    monkeypatch.delenv("DSTUNE_MODEL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gguf_cache.cache_root() == tmp_path / "home" / ".cache" / "dstune" / "models"


def test_a_file_that_changes_gets_an_entry_of_its_own(tiny_gguf, tiny_gguf_q8, tmp_path, cache):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(tiny_gguf_q8, folder)
    before = gguf_cache.entry_for(str(folder), FILE)
    assert before == gguf_cache.entry_for(str(tiny_gguf_q8), FILE)   # named by content, not by path
    shutil.copyfile(tiny_gguf / "tiny.gguf", folder / FILE)
    assert gguf_cache.entry_for(str(folder), FILE) != before


RACER = """
import hashlib, sys, torch
from dstune.config import load_config
from dstune.models.loading import load_model
from dstune.models.tokenizers import load_tokenizer
model = load_model(load_config(sys.argv[1]), load_tokenizer(sys.argv[2]))
h = hashlib.sha256()
for k, v in sorted(model.state_dict().items()):
    h.update(k.encode() + v.numpy().tobytes())
print("DIGEST", h.hexdigest())
"""


@pytest.mark.slow
def test_processes_racing_on_an_empty_cache_write_it_once_and_load_the_same(ws, tiny_gguf_q8, tmp_path):
    cfg_path = tmp_path / "r.yaml"
    cfg_path.write_text(json.dumps({"task": "causal_lm", "model": {"path": str(tiny_gguf_q8), "gguf_file": FILE},
                                    "data": {"train": "x.jsonl"}, "output_dir": str(tmp_path / "o")}))
    env = {**os.environ, "DSTUNE_MODEL_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(cfg_path), str(ws / "tokenizer")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    digests = {line for out, _ in outs for line in out.splitlines() if line.startswith("DIGEST")}
    assert len(digests) == 1
    assert sum("dequantized once, kept in" in err for _, err in outs) == 1   # one wrote, the others waited
    entry = next((tmp_path / "cache").glob("tiny-q8_0-*"))
    assert sorted(p.name for p in entry.iterdir() if not p.name.endswith(".lock")) == ["AutoModelForCausalLM", "config"]
    assert gguf_cache.is_sound(entry / "AutoModelForCausalLM")
