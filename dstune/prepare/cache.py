"""Data prepared once per job: tokenized (and packed) into an Arrow cache that every rank memory-maps.

The cache entry's name is a digest of the data files' content, the tokenizer (its vocabulary, rules,
special tokens and chat template) and every setting that changes the prepared rows, so a rerun with
unchanged data starts from it and any change prepares afresh. On each node the local rank 0 prepares
(`dstune prepare` does it ahead of time); the node's other ranks wait for it and then read the same files.
Nodes that share a filesystem may both prepare: each writes a folder of its own and renames it into place,
and the second rename finds the first and drops its copy. A folder is renamed into place only once
complete, so a cut-off preparation is never read.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from dstune.config import RANDOM_DATA, RunConfig
from dstune.digests import POLL_S, file_digest, read_memo, remember
from dstune.prepare.augment import augment_models, save_copies
from dstune.prepare.pipeline import TaskData, check_sources, prepare_data, random_data, token_count
from dstune.errors import UserError
from dstune.tasks import get_task

VERSION = 2  # bump when the prepared rows, or what meta.json records of them, change for the same inputs
AUGMENTED = "augmented.jsonl"  # data.augment's copies, for inspection (copied into the run dir)


def cache_root(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir or os.environ.get("DSTUNE_DATA_CACHE") or
                Path.home() / ".cache" / "dstune" / "data")


def _tokenizer_digest(tokenizer) -> str:
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # without the truncation and padding its last call left set: not the tokenizer's own
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, getattr(tokenizer, "chat_template", None),
                         [getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")]],
                        default=str).encode())
    return h.hexdigest()


def fingerprint(cfg: RunConfig, tokenizer, wait_s: float = 0) -> str:
    """The cache entry's name for this recipe's data and tokenizer. `wait_s`: how long to wait for another
    process to hash data files this one has not seen (ranks other than a node's local rank 0)."""
    memo_file = cache_root(cfg) / "digests.json"
    memo = read_memo(memo_file)
    known = len(memo)
    d = cfg.data
    digest = lambda path, key: file_digest(path, memo, key, memo_file, wait_s)  # noqa: E731
    settings = {"version": VERSION, "task": cfg.task,
                "data": d.model_dump(mode="json", exclude={"train", "eval", "cache_dir", "num_proc"}),
                "train": [[digest(s.path, f"data.train[{i}]" if isinstance(d.train, list) else "data.train"),
                           s.model_dump(mode="json", exclude={"path"})] for i, s in enumerate(d.sources())],
                "eval": digest(d.eval, "data.eval") if d.eval else None,
                "eval_max_samples": cfg.evaluation.max_samples,
                "split_seed": cfg.training.seed if d.eval_fraction and not d.eval else None,
                "tokenizer": _tokenizer_digest(tokenizer)}
    if d.augment:  # its seed, and the models it reads (their files, not only their paths)
        a = d.augment
        settings["augment"] = {"seed": a.seed if a.seed is not None else cfg.training.seed,
                               "models": [digest(m, key) for m, key in augment_models(cfg)]}
    remember(memo_file, memo, known)
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=12).hexdigest()


def build(cfg: RunConfig, tokenizer, entry: Path) -> None:
    """Prepare the data into `entry` (a folder renamed into place when complete); a bad row's error is left
    beside it for the waiting ranks."""
    host, pid = socket.gethostname(), os.getpid()
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock, error = _lock(entry, host), _error(entry, host, pid)
    for old in entry.parent.glob(f"{entry.name}.{host}.*.error"):  # earlier runs' failures
        old.unlink(missing_ok=True)
    lock.write_text(str(pid))
    tmp = entry.with_name(f".{entry.name}.{host}.{pid}")
    try:
        data = prepare_data(cfg, tokenizer, work=str(tmp / "work"))
        copies = sum(save_copies(table, str(tmp / AUGMENTED), path) for path, table in data.augmented or [])
        packed = get_task(cfg.task).packs(cfg, data.style, False)
        meta = {"labels": data.labels, "style": data.style, "train_rows": len(data.train), "augmented": copies,
                "packed_blocks_of": cfg.data.max_length if packed else None,
                "train_tokens": token_count(data.train), "eval_rows": len(data.eval) if data.eval is not None else 0,
                "sources": data.sources, "eval_dropped": data.eval_dropped,
                "eval_too_long": data.eval_too_long, "max_length": cfg.data.max_length, "train": _keep(data.train, tmp, "train"),
                "eval": _keep(data.eval, tmp, "eval") if data.eval is not None else []}
        del data
        shutil.rmtree(tmp / "work")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:  # another node sharing this filesystem renamed its copy first
            if not (entry / "meta.json").is_file():
                raise
    except UserError as e:
        error.write_text(str(e))
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.unlink(missing_ok=True)


def _keep(ds, folder: Path, name: str) -> list[str]:
    """Move the Arrow files behind a prepared split out of the work folder into `folder`; their names. A
    selection (a mixture without packing) is written out in its order first."""
    if ds._indices is not None:
        ds = ds.flatten_indices(cache_file_name=str(folder / "work" / f"{name}-flat.arrow"))
    names = []
    for i, f in enumerate(ds.cache_files):
        names.append(f"{name}-{i:05d}.arrow")
        os.rename(f["filename"], folder / names[-1])
    return names


def _lock(entry: Path, host: str) -> Path:
    return entry.with_name(f"{entry.name}.{host}.lock")


def _error(entry: Path, host: str, pid: int) -> Path:
    return entry.with_name(f"{entry.name}.{host}.{pid}.error")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _failed_since(entry: Path, host: str, since: float) -> Path | None:
    """An error a writer on this host left for `entry` after `since` (a time stamp), if any."""
    for err in entry.parent.glob(f"{entry.name}.{host}.*.error"):
        try:
            if err.stat().st_mtime >= since:
                return err
        except OSError:
            pass
    return None


def wait_for(entry: Path, timeout_s: float) -> None:
    """Wait while this node's local rank 0 prepares `entry`: until it is in place, or its writer failed
    (its error is raised here too), or no writer showed up within `timeout_s`."""
    import psutil

    host, started = socket.gethostname(), psutil.Process().create_time() - 2
    lock, deadline, writer = _lock(entry, host), time.monotonic() + timeout_s, None
    while not (entry / "meta.json").is_file():
        try:
            if lock.stat().st_mtime >= started:  # not a lock left by an earlier, killed run
                writer = int(lock.read_text() or 0) or writer
        except (OSError, ValueError):
            pass
        if writer is not None and not (lock.exists() and _alive(writer)):
            if (entry / "meta.json").is_file():
                break
            err = _error(entry, host, writer)
            if err.is_file():
                raise UserError(err.read_text())
            raise UserError(f"data.cache_dir: the rank preparing the data (pid {writer}) ended without "
                            f"writing {entry}")
        if writer is None and (failed := _failed_since(entry, host, started)):
            raise UserError(failed.read_text())  # the writer failed before this rank saw its lock
        if writer is None and time.monotonic() > deadline:
            raise UserError(f"training.dist_timeout_s: no rank on {host} began preparing the data in "
                            f"{timeout_s:.0f} s (local rank 0 prepares; {entry})")
        time.sleep(POLL_S)


def open_prepared(entry: Path) -> TaskData:
    """The prepared splits, memory-mapped."""
    import datasets

    meta = json.loads((entry / "meta.json").read_text())
    split = lambda names: datasets.concatenate_datasets(  # noqa: E731
        [datasets.Dataset.from_file(str(entry / n)) for n in names]) if names else None
    return TaskData(train=split(meta["train"]), eval=split(meta["eval"]), labels=meta["labels"], style=meta["style"],
                    sources=meta["sources"], eval_dropped=meta.get("eval_dropped", 0),
                    eval_too_long=meta.get("eval_too_long", 0))


def prepared_data(cfg: RunConfig, tokenizer, local_rank: int = 0, timeout_s: float = 600) -> tuple[TaskData, Path | None]:
    """(the recipe's data, its cache entry): prepared by local rank 0 unless the cache has it, else read."""
    if cfg.data.train == RANDOM_DATA:
        return random_data(cfg, tokenizer), None
    check_sources(cfg)  # the cache is keyed by the data, not by what trains on it (a teacher)
    # the node's local rank 0 hashes the data files; the others wait for its digests (or hash themselves)
    entry = cache_root(cfg) / fingerprint(cfg, tokenizer, wait_s=0 if local_rank == 0 else timeout_s)
    if not (entry / "meta.json").is_file():
        if local_rank == 0:
            build(cfg, tokenizer, entry)
        else:
            wait_for(entry, timeout_s)
    return open_prepared(entry), entry


def keep_augmented(entry: Path | None, run_dir: Path) -> None:
    """Put the cache entry's augmented copies in the run dir (a hard link where the filesystem allows)."""
    src = entry / AUGMENTED if entry is not None else None
    if src is None or not src.is_file():
        return
    dst = run_dir / AUGMENTED
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def summary(data: TaskData, entry: Path | None) -> str:
    """One start-up line: rows and tokens of each split and where they are."""
    if entry is None:
        return f"{len(data.train):,} random rows"
    meta = json.loads((entry / "meta.json").read_text())
    ev = f"; {meta['eval_rows']:,} eval rows" if meta["eval_rows"] else ""
    rows = f"{meta['train_rows']:,} training rows"
    if size := meta.get("packed_blocks_of"):  # what a step counts are blocks, not the file's rows
        rows = (f"{meta['train_rows']:,} packed blocks of up to {size:,} tokens from "
                f"{sum(s['examples'] for s in meta['sources']):,} examples")
    line = f"{rows}, {meta['train_tokens']:,} tokens{ev} ({entry})"
    if len(meta["sources"]) > 1 or meta["sources"][0]["examples"] != meta["sources"][0]["rows"]:
        line += "".join(f"\n  {Path(s['path']).name} ({s['format'] or 'rows'}"
                        f"{'' if s.get('labeled', True) else ', no labels: the teacher alone'}): {s['rows']:,} rows, "
                        f"{s['tokens']:,} tokens -> {s['examples']:,} examples" for s in meta["sources"])
    if meta.get("augmented"):
        line += (f"; {meta['augmented']:,} of them augmented copies (data.augment: "
                 f"{entry / AUGMENTED})")
    too_long = [(s["path"], s.get("too_long", 0)) for s in meta["sources"]] + [("data.eval", meta.get("eval_too_long", 0))]
    if any(n for _, n in too_long):
        line += f"; left out, the prompt alone filling data.max_length ({meta.get('max_length', '?')} tokens): " + \
            ", ".join(f"{n:,} rows of {Path(where).name}" for where, n in too_long if n)
    dropped = [(s["path"], s.get("dropped", 0)) for s in meta["sources"]] + [("data.eval", meta.get("eval_dropped", 0))]
    if any(n for _, n in dropped):
        line += "; left out for a missing value (data.drop_invalid_rows): " + ", ".join(
            f"{n:,} rows of {Path(where).name}" for where, n in dropped if n)
    return line
