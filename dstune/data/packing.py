"""Packing: whole documents into blocks of at most max_length tokens that keep the documents apart."""
from __future__ import annotations

import numpy as np

from dstune.data.batching import IGNORE
from dstune.data.files import map_output


def best_fit(lengths: list[int], block: int) -> list[list[int]]:
    """Group item indices into bins of at most `block` total length: longest first, each into the fullest
    bin it still fits (best-fit decreasing: within a few percent of the fewest bins). Open bins are kept by
    their free space, so finding the best one is one scan of `block` flags, however many bins are open."""
    by_space: list[list[int]] = [[] for _ in range(block + 1)]  # open bins by free space
    has = np.zeros(block + 1, dtype=bool)
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        n = lengths[i]
        space = n + int(has[n:].argmax())
        if has[space]:
            b = by_space[space].pop()
            has[space] = bool(by_space[space])
        else:  # nothing open fits: a new bin
            b, space = len(bins), block
            bins.append([])
        bins[b].append(i)
        by_space[space - n].append(b)
        has[space - n] = True
    return bins


def pack(ds, block: int, window: int = 10_000, work: str | None = None, name: str = "packed"):
    """Whole documents into blocks of at most `block` tokens, `window` documents at a time (a longer
    document is cut into block-sized pieces, each a document of its own).

    Each block carries `position_ids` that restart at 0 at every document: from them the model keeps the
    documents apart (transformers builds block-diagonal causal masks on SDPA/eager and uses flash attention's
    variable-length path), so a packed block computes what its documents would alone. A document's first
    label is no target there: it would be predicted from the end of the previous, unrelated document.
    Works on Arrow columns (numpy gathers), never on Python lists of tokens. With `work`, rows held in
    Arrow files are read from them in order with plain reads, not through a memory map, so the pages
    read are not kept in this process's memory.
    """
    if work and ds._indices is None and ds.cache_files:
        return _pack_files([f["filename"] for f in ds.cache_files], len(ds), block, window, f"{work}/{name}.arrow")
    out = ds.with_format("arrow").map(lambda table: pack_window(table, block), batched=True, batch_size=window,
                                      remove_columns=ds.column_names, desc="pack", **map_output(work, name))
    return out.with_format(None)


def _pack_files(files: list[str], rows: int, block: int, window: int, out: str):
    """pack() of the rows in Arrow stream files (what `datasets` writes), into the file `out`."""
    import datasets
    import pyarrow as pa
    from datasets.utils.logging import is_progress_bar_enabled
    from tqdm.auto import tqdm

    ids = datasets.List(datasets.Value("int32"))
    schema = datasets.Features({"input_ids": ids, "labels": ids, "position_ids": ids}).arrow_schema
    bar = tqdm(total=rows, desc="pack", unit=" examples", disable=not is_progress_bar_enabled())
    with pa.OSFile(out, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        def write(table) -> None:
            writer.write_table(pack_window(table, block).cast(schema), max_chunksize=1000)
            bar.update(len(table))
        pending = None
        for path in files:
            with pa.OSFile(path) as source:
                for batch in pa.ipc.open_stream(source):
                    part = pa.Table.from_batches([batch]).select(["input_ids", "labels"])
                    pending = part if pending is None else pa.concat_tables([pending, part])
                    while len(pending) >= window:
                        write(pending.slice(0, window))
                        pending = pending.slice(window)
        if pending is not None and len(pending):
            write(pending)
    bar.close()
    return datasets.Dataset.from_file(out)


def pack_window(table, block: int):
    """pack() of the documents of one Arrow table."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = table.column("input_ids").combine_chunks()
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    flat_ids = ids.flatten().to_numpy(zero_copy_only=False)
    flat_labels = table.column("labels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    doc_start = np.cumsum(lengths) - lengths
    # pieces of at most `block` tokens: (start in the flat column, length)
    n_pieces = -(-lengths // block)
    doc = np.repeat(np.arange(len(lengths)), n_pieces)
    nth = np.arange(len(doc)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    start, length = doc_start[doc] + nth * block, np.minimum(block, lengths[doc] - nth * block)
    if not len(length):
        empty = pa.array([], pa.list_(pa.int32()))
        return pa.table({"input_ids": empty, "labels": empty, "position_ids": empty})
    bins = best_fit(length.tolist(), block)
    order = np.fromiter((m for members in bins for m in members), dtype=np.int64, count=len(length))
    start, length = start[order], length[order]
    first_in_block = np.zeros(len(order), dtype=bool)
    first_in_block[np.cumsum([0] + [len(m) for m in bins[:-1]])] = True
    piece_at = np.cumsum(length) - length  # where each piece begins in the packed column
    within = np.arange(int(length.sum())) - np.repeat(piece_at, length)
    gather = np.repeat(start, length) + within
    labels = flat_labels[gather]
    labels[piece_at[~first_in_block]] = IGNORE
    block_len = np.add.reduceat(length, np.flatnonzero(first_in_block))
    offsets = pa.array(np.concatenate([[0], np.cumsum(block_len)]).astype(np.int32))
    column = lambda values: pa.ListArray.from_arrays(offsets, pa.array(values.astype(np.int32)))  # noqa: E731
    return pa.table({"input_ids": column(flat_ids[gather]), "labels": column(labels),
                     "position_ids": column(within)})
