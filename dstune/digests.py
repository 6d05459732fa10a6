"""Digests of files' content, remembered by (path, size, mtime) in a small JSON memo beside a cache, so an
unchanged file is read once; and small files written whole (a temporary file renamed into place). The
prepared-data cache (prepare/cache.py) and the dequantized-GGUF cache (models/gguf_cache.py) key their
entries by them."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

from dstune.errors import UserError

POLL_S = 0.5
MEMO_ENTRIES = 10_000  # file digests remembered (the newest), so unchanged files are not read again


def file_digest(path: str, memo: dict, key: str, memo_file: Path | None = None, wait_s: float = 0) -> str:
    """blake2b of a file's bytes (of every file, for a folder), remembered by (path, size, mtime) in `memo`.
    With `wait_s`, first wait that long for another process (the node's local rank 0) to put it in
    `memo_file`, so the ranks of a node do not all read the corpus to hash it."""
    if not os.path.exists(path):
        raise UserError(f"{key}: file not found: {path}")
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if os.path.isdir(path) else [Path(path)]
    stamp = json.dumps([[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    deadline = time.monotonic() + wait_s
    while stamp not in memo and memo_file is not None and time.monotonic() < deadline:
        time.sleep(POLL_S)
        memo.update(read_memo(memo_file))
    if stamp not in memo:
        h = hashlib.blake2b(digest_size=16)
        for f in files:
            h.update(str(f.relative_to(path) if os.path.isdir(path) else "").encode())
            try:
                with open(f, "rb") as fh:
                    while chunk := fh.read(1 << 22):
                        h.update(chunk)
            except OSError as e:
                raise UserError(f"{key}: cannot read {f}: {e.strerror}") from None
        memo[stamp] = h.hexdigest()
    return memo[stamp]


def read_memo(memo_file: Path) -> dict:
    try:
        return json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return {}


def remember(memo_file: Path, memo: dict, known: int) -> None:
    """Keep `memo`'s new digests (it had `known` entries when read) in `memo_file`, added to what other
    processes may have written meanwhile."""
    if len(memo) != known:
        merged = {**read_memo(memo_file), **memo}
        write_atomic(memo_file, json.dumps(dict(list(merged.items())[-MEMO_ENTRIES:])))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
