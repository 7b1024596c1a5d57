"""Streaming training rows (`data.streaming: true`): read from the file as training goes, for data
that does not fit on local disk twice (once as the file, once as Arrow in the cache).

The stream is a `datasets.IterableDataset` that never ends: each pass over the file (an epoch) is
shuffled through a seeded buffer, and passes follow each other, so the Trainer sees one endless epoch
and stops at `max_steps`. The rows are cut into batches of the per-device batch size; global batch k
goes to process k mod P (P processes) and, within it, to DataLoader worker (k div P) mod W (W
workers), as one shard per (process, worker): accelerate gives each process its W shards, datasets
gives each worker its one, and the DataLoader's round robin over workers puts the batches back in
stream order. Every process and worker reads the whole file and parses only its own rows. Resuming
skips the rows that finished steps consumed (their count is saved with each checkpoint) before any
row is parsed, so a resumed run sees the rows an uninterrupted one would have.

Rows are checked as they are read (a bad row stops training, naming file and line: run
`vlm-peft data check` first), and rows that `max_length` would cut inside an image run or before
their answer are dropped from their batch by `FittingCollator`, with a warning naming them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq

from .loading import data_format, json_records, parse_json_row
from .rows import WHERE, check_tool_columns, measure_conversations, normalize_row

logger = logging.getLogger(__name__)

READ_BATCH = 256  # rows per Arrow batch read from parquet / arrow


def raw_rows(path: Path, fmt: str) -> Iterator[tuple[str, Any]]:
    """(where, raw row) in file order: a JSON row's text (parsed only by the process that trains on it)
    or a parquet / arrow row's columns (images as {"bytes", "path"}, never decoded)."""
    if fmt in ("jsonl", "json"):
        for line, text in json_records(path, fmt):
            yield (f"{path}: row {line}" if fmt == "json" else f"{path}:{line}"), text
        return
    if fmt == "parquet":
        batches = pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH)
    else:
        dataset = datasets.load_from_disk(str(path))
        batches = dataset.data.to_batches(max_chunksize=READ_BATCH)  # the Arrow storage: images undecoded
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{path}: row {index}", row
            index += 1


def _rows_per_pass(path: Path, fmt: str) -> int | None:
    """Rows in the file, where its metadata says so without reading it (parquet, arrow); else None."""
    if fmt == "parquet":
        return pq.ParquetFile(path).metadata.num_rows or None
    if fmt == "arrow":
        return len(datasets.load_from_disk(str(path))) or None
    return None


def _shuffled(rows: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer (as datasets' `IterableDataset.shuffle`), seeded: every process and worker
    draws the same order."""
    if size <= 1:
        yield from rows
        return
    buffer: list[Any] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = row
    rng.shuffle(buffer)
    yield from buffer


def _parse(where: str, raw: Any) -> dict[str, Any]:
    return normalize_row(parse_json_row(raw, where) if isinstance(raw, str) else raw, where)


def _stream(
    parts: list[tuple[int, int]],
    path: str,
    fmt: str,
    seed: int,
    shuffle_buffer: int,
    batch_size: int,
    processes: int,
    workers: int,
    start: int,
) -> Iterator[dict[str, Any]]:
    """The rows of shard (process, worker) for each shard in `parts`, from row `start` of the stream on."""
    per_pass = _rows_per_pass(Path(path), fmt)
    for process, worker in parts:
        slot, every = worker * processes + process, processes * workers
        # Whole passes before `start` are skipped unread where the file says how many rows it holds.
        epoch = start // per_pass if per_pass else 0
        position = epoch * per_pass if per_pass else 0
        while True:
            rows = _shuffled(raw_rows(Path(path), fmt), shuffle_buffer, np.random.default_rng([seed, epoch]))
            empty = True
            for where, raw in rows:
                empty = False
                # Batches are counted from `start`, where the DataLoader's round robin starts again.
                if position >= start and ((position - start) // batch_size) % every == slot:
                    yield _parse(where, raw)
                position += 1
            if empty:
                raise ValueError(f"{path}: the dataset is empty.")
            epoch += 1


def stream_rows(
    path: str | Path,
    fmt: str = "auto",
    *,
    batch_size: int,
    processes: int = 1,
    workers: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    start: int = 0,
) -> datasets.IterableDataset:
    """An endless stream of canonical rows for `processes` processes of `batch_size` rows per batch,
    each with `workers` DataLoader workers, starting `start` rows in (rows that earlier steps consumed).
    `shuffle_buffer` rows are shuffled at a time (0: file order), differently in each pass."""
    path = Path(path)
    fmt = data_format(path, fmt)
    if fmt == "parquet":
        check_tool_columns(datasets.Features.from_arrow_schema(pq.ParquetFile(path).schema_arrow), str(path))
    elif fmt == "arrow":
        check_tool_columns(datasets.load_from_disk(str(path)).features, str(path))
    if min(batch_size, processes) < 1 or min(workers, shuffle_buffer, start) < 0:
        raise ValueError(
            f"stream_rows: need batch_size, processes >= 1 and workers, shuffle_buffer, start >= 0, got "
            f"{batch_size}, {processes}, {workers}, {shuffle_buffer}, {start}."
        )
    workers = max(workers, 1)
    return datasets.IterableDataset.from_generator(
        _stream,
        gen_kwargs={
            # One shard per (process, worker): the only list here, so the one datasets splits into shards.
            "parts": [(p, w) for p in range(processes) for w in range(workers)],
            "path": str(path),
            "fmt": fmt,
            "seed": seed,
            "shuffle_buffer": shuffle_buffer,
            "batch_size": batch_size,
            "processes": processes,
            "workers": workers,
            "start": start,
        },
    )


class FittingCollator:
    """`fit_to_length` for streamed rows, batch by batch: rows that `max_length` would cut inside an
    image run, or before their first supervised token, are dropped from their batch with a warning
    naming them; a batch left with no row is an error."""

    def __init__(self, collator: Any, max_length: int | None, where: str) -> None:
        self.collator = collator
        self.max_length = max_length
        self.where = where
        self.dropped = 0

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self.max_length is not None:
            lengths = measure_conversations(
                self.collator.processor, [r["messages"] for r in rows], [r.get("tools") for r in rows]
            )
            keep = [end <= self.max_length and first < self.max_length for _, end, first in lengths]
            if not all(keep):
                names = [r.get(WHERE) for r, k in zip(rows, keep) if not k]
                self.dropped += len(names)
                logger.warning(
                    "%s: dropped %d rows whose images would be cut or whose answers start past max_length=%d: %s "
                    "(%d so far in this process; `vlm-peft data check --max-length` finds them all)",
                    self.where, len(names), self.max_length, ", ".join(map(str, names)), self.dropped,
                )  # fmt: skip
                if not any(keep):
                    raise ValueError(
                        f"{self.where}: every row of a batch would be cut by max_length={self.max_length} ("
                        f"{', '.join(map(str, names))}); raise max_length or drop them (`vlm-peft data check --fix`)."
                    )
                rows = [r for r, k in zip(rows, keep) if k]
        return self.collator(rows)
