"""GGUF bases dequantized once: transformers spends many seconds reading and dequantizing a GGUF file on
every load (SmolLM2-135M: 13-15 s on 2 CPU cores), so the first load keeps the result as plain safetensors
(`save_pretrained`) and later ones read that (about a second).

The cache lives in `$DSTUNE_MODEL_CACHE` (default ~/.cache/dstune/models; `off` or empty: no cache). An
entry is named by the GGUF file's content digest (remembered by path, size and mtime, so a file is hashed
once) and the transformers and gguf versions that dequantized it; it holds the model config read from the
file (`config/`) and, per task class, the weights the file gave (`AutoModelForCausalLM/`, ...): weights the
file lacks, such as a new task head, are left out, so they are initialised as on a load from the GGUF file.

Each folder is written whole into a temporary folder and renamed into place with a manifest of its files'
sizes and CRC32s. A folder is used only while its manifest matches every file (checked on each load: 0.2-0.3
s for SmolLM2's 538 MB), so a cut-off or damaged entry is written again, never read. Processes share a
folder through a file lock: one writes while the others wait, then all read it. A ZeRO-3 job (weights
partitioned as they load) reads the cache but does not write it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import zlib
from pathlib import Path
from typing import Callable, Iterator

from dstune.digests import file_digest, read_memo, remember

FORMAT = 1  # bump when what an entry holds changes
MANIFEST = "dstune-cache.json"
OFF = ("", "off", "0", "false", "no")
_seen: dict[str, str] = {}  # file digests this process knows, by (path, size, mtime)


def cache_root() -> Path | None:
    """Where dequantized GGUF bases are kept, or None when $DSTUNE_MODEL_CACHE turns the cache off."""
    value = os.environ.get("DSTUNE_MODEL_CACHE")
    if value is None:
        return Path.home() / ".cache" / "dstune" / "models"
    return None if value.strip().lower() in OFF else Path(value)


def entry_for(folder: str, gguf_file: str) -> Path | None:
    """The cache entry of a GGUF file (None when the cache is off)."""
    import transformers

    root = cache_root()
    if root is None:
        return None
    memo_file = root / "digests.json"
    memo = {**read_memo(memo_file), **_seen}
    known = len(memo)
    digest = file_digest(os.path.join(folder, gguf_file), memo, "model.gguf_file")
    _seen.update(memo)
    with contextlib.suppress(OSError):  # a read-only cache: the file is hashed again by the next process
        remember(memo_file, memo, known)
    key = json.dumps([FORMAT, digest, transformers.__version__, _version("gguf")])
    return root / f"{Path(gguf_file).stem}-{hashlib.blake2b(key.encode(), digest_size=10).hexdigest()}"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _files(folder: Path) -> dict[str, list[int]]:
    """[size, CRC32] of every file in `folder` but the manifest, by relative path."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        crc = 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                crc = zlib.crc32(chunk, crc)
        out[str(path.relative_to(folder))] = [path.stat().st_size, crc]
    return out


def is_sound(folder: Path) -> bool:
    """Whether `folder` is complete and undamaged: its manifest names exactly its files, sizes and CRC32s."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest.get("format") == FORMAT and bool(manifest["files"]) and manifest["files"] == _files(folder)
    except (OSError, ValueError, KeyError, AttributeError):
        return False


class NotKept(Exception):
    """Raised by a builder that has what the caller needs but could not write it into the cache."""


@contextlib.contextmanager
def sound_folder(folder: Path, build: Callable[[Path], None] | None) -> Iterator[Path | None]:
    """`folder`, locked while the caller reads it, once it is sound. Where it is not (never written, cut
    off, damaged) and `build` is given, `build(tmp)` writes it into a temporary folder under an exclusive
    lock (other processes wait for it) and it is renamed into place. None where it is not sound and is not
    built here (no builder, the builder raised NotKept, or the cache cannot be written at all)."""
    lock = folder.with_name(f".{folder.name}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:  # a read-only or missing cache folder
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)  # an OS lock: released by the kernel however its holder ends
        if fd is None or not is_sound(folder):
            if fd is None or build is None:
                yield None
                return
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not is_sound(folder) and not _build(folder, build):
                yield None
                return
        yield folder
    finally:
        if fd is not None:
            os.close(fd)


def _build(folder: Path, build: Callable[[Path], None]) -> bool:
    """Write `folder` through a temporary folder renamed into place; False when the builder raised NotKept."""
    tmp = folder.with_name(f".{folder.name}.{socket.gethostname()}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        with writing(folder):
            (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": _files(tmp)}))
            shutil.rmtree(folder, ignore_errors=True)  # a damaged copy
            os.rename(tmp, folder)
        return True
    except NotKept:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def writing(folder: Path) -> Iterator[None]:
    """Around a write into the cache: an OSError (disk full, read-only) becomes a warning and NotKept."""
    try:
        yield
    except OSError as e:
        print(f"[dstune] warning: model.gguf_file: cannot keep the dequantized base in {folder} "
              f"({e.strerror or e}); the next load reads the GGUF file again", file=sys.stderr, flush=True)
        raise NotKept from None


def keep_config(config, tmp: Path) -> None:
    """Save the model config a GGUF file gave into `tmp`."""
    with writing(tmp.parent):
        config.save_pretrained(tmp)


def keep_weights(model, missing: list[str], tmp: Path) -> None:
    """Save what a GGUF load gave into `tmp`: the weights the file held (not `missing` ones, which a load
    initialises), with the model and generation configs (a load with the recipe's config reads the latter)."""
    architectures = model.config.architectures  # save_pretrained sets it on the model it saves
    with writing(tmp.parent):
        skip = set(missing)
        try:
            model.save_pretrained(tmp, state_dict={k: v for k, v in model.state_dict().items() if k not in skip})
        finally:
            model.config.architectures = architectures
