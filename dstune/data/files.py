"""Read a table of examples from disk through `datasets`, with errors that name the file and line."""
from __future__ import annotations

import json
import os

from dstune.errors import UserError, first_line

ROW = "__dstune_row"  # column the pipeline adds to every loaded table: the row's number in its file, for errors
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
             ".arrow": "arrow"}


def _check_jsonl(path: str, key: str) -> None:
    """datasets' JSON errors do not say where; find the first bad row ourselves."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _utf8(raw, path, lineno, key)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: {key}: malformed JSON row: {e.msg}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: {key}: each row must be a JSON object, got {type(row).__name__}")


def _utf8(raw: bytes, path: str, lineno: int, key: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{lineno}: {key}: not UTF-8 text (byte {e.start} of the line)") from None


def _check_csv(path: str, key: str, sep: str) -> None:
    """datasets' CSV errors say "An error occurred while generating the dataset"; find the bad line: not
    UTF-8, or another number of fields than the header's."""
    import csv
    import io

    with open(path, "rb") as f:
        lines = [_utf8(raw, path, n, key) for n, raw in enumerate(f, 1)]
    reader = csv.reader(io.StringIO("".join(lines)), delimiter=sep)
    width = None
    for row in reader:
        if width is None:
            width = len(row)
        elif row and len(row) != width:
            raise UserError(f"{path}:{reader.line_num}: {key}: {len(row)} fields where the header has {width}")


def load_table(path: str, key: str, cache_dir: str | None = None):
    """Load a data file or a saved dataset folder as a `datasets.Dataset`; `key` names the config key. With
    `cache_dir`, a file is converted to Arrow there and memory-mapped; else it is read into memory."""
    import datasets

    if not os.path.exists(path):
        raise UserError(f"{key}: file not found: {path}")
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"{key}: {path} is not a saved dataset folder: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UserError(f"{key}: {path} holds splits {list(ds)}; point at one split's folder")
            ds = ds["train"]
    else:
        ext = os.path.splitext(path)[1].lower()
        if os.path.getsize(path) == 0:
            raise UserError(f"{key}: {path} has no rows")
        if ext not in _BUILDERS:
            raise UserError(f"{key}: unsupported file type {ext!r} ({path}); use {', '.join(_BUILDERS)}")
        kwargs = {"sep": "\t"} if ext == ".tsv" else {}
        try:
            ds = datasets.load_dataset(_BUILDERS[ext], data_files=path, split="train", cache_dir=cache_dir,
                                       keep_in_memory=cache_dir is None, **kwargs)
            ds.data.table.validate(full=True)  # the JSON reader keeps bytes that are not UTF-8 as text
        except Exception as e:  # datasets raises many types for unreadable files; all mean bad input here
            if ext == ".jsonl" or (ext == ".json" and _looks_like_jsonl(path)):
                _check_jsonl(path, key)  # say which line (read only when the file is bad)
            if ext in (".csv", ".tsv"):
                _check_csv(path, key, kwargs.get("sep", ","))
            raise UserError(f"{key}: cannot read {path}: {first_line(e)}") from None
    if len(ds) == 0:
        raise UserError(f"{key}: {path} has no rows")
    return ds


def _looks_like_jsonl(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(1).strip()
    return head == b"{"


def require_present(columns: list[str], needs: list[tuple[str, str]], path: str) -> None:
    """Every needed column (config key, column) is among the table's `columns`, else the key is named."""
    for key, c in needs:
        if c not in columns:
            raise UserError(f"{key}: column {c!r} not in {path} (columns: {', '.join(columns)})")


def require_columns(ds, needs: list[tuple[str, str]], path: str, drop: bool = False) -> tuple:
    """(the table, rows dropped): every needed column (config key, column) must be in the table, and have a
    value in every row, else a one-line error naming the key and the first such row; with `drop`, those rows
    are left out instead (the table must then have its ROW numbers, so later errors still name the line)."""
    import numpy as np
    import pyarrow.compute as pc

    require_present(ds.column_names, needs, path)
    for key, c in needs:
        _require_one_type(ds, key, c, path)
    valid = np.ones(len(ds), dtype=bool)
    for key, c in needs:  # a row without the value (a JSON row lacking the key, null, an empty CSV cell)
        values = ds.data.column(c)
        if values.null_count:
            if not drop:
                first = pc.index(pc.is_null(values), True).as_py()
                raise UserError(f"{row_location(path, first)}: {key}: {c!r} is missing or null in this row "
                                "(data.drop_invalid_rows=true leaves such rows out)")
            valid &= pc.is_valid(values).to_numpy(zero_copy_only=False)
    dropped = int(len(ds) - valid.sum())
    if dropped == len(ds) and len(ds):
        raise UserError(f"{path}: every row misses a value of {', '.join(c for _, c in needs)}")
    return (ds.select(np.flatnonzero(valid)) if dropped else ds), dropped


SCALARS = {str: "text", int: "a number", float: "a number", bool: "true/false"}


def _require_one_type(ds, key: str, column: str, path: str) -> None:
    """A column of plain values (text, numbers, booleans) that change type from row to row (a label that is 1
    in one row and "neg" in another) is one line naming the first row that differs. The JSON reader keeps
    such a column as JSON values (arrow.json), which nothing downstream can sort, compare or count."""
    if getattr(ds.data.schema.field(column).type, "extension_name", None) != "arrow.json":
        return  # one Arrow type for every row
    first = None
    for i, value in enumerate(ds[column]):
        kind = SCALARS.get(type(value))
        if value is None:
            continue
        if kind is None:
            return  # nested values (turns of a conversation): the task reads them as objects
        if first is None:
            first = (kind, value)
        elif kind != first[0]:
            raise UserError(f"{row_location(path, i)}: {key}: {column!r} is {kind} here ({value!r}) but {first[0]} "
                            f"in earlier rows ({first[1]!r}); give it one type in every row (e.g. every label as "
                            "text)")


def row_location(path: str, index: int) -> str:
    """Where row `index` (0-based) of a loaded table is: `file:line` for JSON lines, else `file: row N`."""
    if os.path.isfile(path) and (path.endswith(".jsonl") or (path.endswith(".json") and _looks_like_jsonl(path))):
        with open(path, encoding="utf-8") as f:
            rows = -1
            for lineno, line in enumerate(f, 1):
                rows += bool(line.strip())
                if rows == index:
                    return f"{path}:{lineno}"
    if path.endswith((".csv", ".tsv")):
        return f"{path}: row {index + 1} (line {index + 2} if no field spans lines)"
    return f"{path}: row {index + 1}"


def map_output(work: str | None, name: str) -> dict:
    """Where a `datasets.map` writes: `work`/name.arrow (memory-mapped, preparing a cache), else memory."""
    return {"cache_file_name": f"{work}/{name}.arrow"} if work else {"keep_in_memory": True}
