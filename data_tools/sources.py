"""Reading the containers a source comes in (folder, parquet, CSV/TSV, JSON list, JSONL) as `(where, raw row)`
pairs, and detecting the source's format from its first row."""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from vlm_peft.data.rows import check_tool_columns

from .formats import FORMATS
from .formats.common import CAPTION_KEYS, IMAGE_KEYS, pick

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _kind(source: Path) -> str:
    """The container: folder, parquet, csv, json (a list) or jsonl."""
    if source.is_dir():
        return "folder"
    suffix = source.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    with source.open(encoding="utf-8") as handle:
        while True:
            ch = handle.read(1)
            if not ch or not ch.isspace():
                break
    return "json" if ch == "[" else "jsonl"


def _json_list_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    yield from ((f"{path}: row {i}", row) for i, row in enumerate(data))


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if line.strip():
                yield f"{path}:{line_no}", line  # parsed by the converter, so that workers share the work


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    source = pq.ParquetFile(path)
    check_tool_columns(datasets.Features.from_arrow_schema(source.schema_arrow), str(path))
    i = 0
    for batch in source.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield f"{path}: row {i}", row
            i += 1


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        first = next(reader, None)
        if first is None:
            return
        header = [c.strip().lower() for c in first]
        image_col = next((header.index(k) for k in IMAGE_KEYS if k in header), None)
        caption_col = next((header.index(k) for k in CAPTION_KEYS if k in header), None)
        rows: Iterator[tuple[int, list[str]]] = ((reader.line_num, cells) for cells in reader)
        if image_col is None or caption_col is None:  # no header: image, caption
            image_col, caption_col = 0, 1
            rows = itertools.chain([(reader.line_num, first)], rows)
        for line_no, cells in rows:
            if not any(c.strip() for c in cells):
                continue
            image = cells[image_col].strip() if image_col < len(cells) else ""
            caption = cells[caption_col] if caption_col < len(cells) else None
            yield f"{path}:{line_no}", {"image": image or None, "caption": caption}


def _folder_rows(path: Path) -> Iterator[tuple[str, Any]]:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    images = {p.with_suffix(""): p for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    captions = {p.with_suffix(""): p for p in files if p.suffix.lower() == ".txt"}
    for stem in sorted(images.keys() | captions.keys()):
        image, caption = images.get(stem), captions.get(stem)
        text = caption.read_text(encoding="utf-8") if caption is not None else None
        yield str(image or caption), {"image": str(image) if image else None, "caption": text}


def read_rows(source: Path) -> Iterator[tuple[str, Any]]:
    kind = _kind(source)
    return {"folder": _folder_rows, "parquet": _parquet_rows, "csv": _csv_rows, "json": _json_list_rows}.get(
        kind, _jsonl_rows
    )(source)


def _first_json_list_row(path: Path) -> Any:
    """The first element of a JSON list file, read from its beginning only."""
    decoder = json.JSONDecoder()
    size = 1 << 16
    with path.open(encoding="utf-8") as handle:
        text = ""
        while True:
            more = handle.read(size)
            text += more
            start = text.index("[") + 1
            body = text[start:].lstrip()
            if body.startswith("]"):
                raise ValueError(f"{path}: the list is empty.")
            try:
                return decoder.raw_decode(body)[0]
            except json.JSONDecodeError:
                if not more:
                    raise ValueError(f"{path}: not a JSON list of rows.") from None
                size *= 2


def _row_format(row: Any, source: Path) -> str:
    if not isinstance(row, dict):
        raise ValueError(f"{source}: cannot detect the format: the first row is not an object; pass fmt.")
    if row.get("messages") is not None:
        return "messages"
    turns = row.get("conversations")
    if turns is not None:
        if isinstance(turns, str):
            return "minimind-parquet" if "image_bytes" in row else "minimind"
        first = turns[0] if isinstance(turns, list) and turns else {}
        if isinstance(first, dict) and ("from" in first or "value" in first):
            return "llava"
        return "minimind-parquet" if "image_bytes" in row else "minimind"
    if pick(row, CAPTION_KEYS) is not None and pick(row, IMAGE_KEYS) is not None:
        return "captions"
    raise ValueError(
        f"{source}: cannot detect the format from the first row's fields {sorted(row)}; pass fmt (one of {FORMATS})."
    )


def detect_format(source: str | os.PathLike[str]) -> str:
    """The source's format, from its content: a folder or a CSV holds captions; otherwise the first row says."""
    source = Path(source)
    kind = _kind(source)
    if kind in ("folder", "csv"):
        return "captions"
    if kind == "parquet":
        names = pq.read_schema(source).names
        if "conversations" in names and "image_bytes" in names:
            return "minimind-parquet"
    rows = [(None, _first_json_list_row(source))] if kind == "json" else read_rows(source)
    for _, row in rows:
        if isinstance(row, str):
            try:
                row = json.loads(row)
            except json.JSONDecodeError as err:
                raise ValueError(f"{source}: cannot detect the format: the first line is not JSON ({err}).") from None
        return _row_format(row, source)
    raise ValueError(f"{source}: no rows.")
