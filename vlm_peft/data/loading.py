"""Reading a dataset file into Arrow on disk, checked row by row, without holding it in memory.

JSONL and JSON are read line by line (a JSON list element by element) into a raw Arrow table of the
rows' text, then parsed and normalised by `Dataset.map` (in `num_proc` processes) into canonical
rows of fixed features; parquet is copied into Arrow a small batch at a time and a `save_to_disk` dir
is memory-mapped where it is. Only `messages` and `tools` pass through Python: the `images` column
(paths, or embedded bytes as `datasets.Image(decode=False)`) is joined back untouched, so image
bytes are first read by the collator. Everything lands in a cache keyed by the file's identity and
this code, so a second run with the same file memory-maps the result and parses nothing.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.arrow_dataset import update_metadata_with_features

from .rows import MESSAGES, WHERE, check_tool_columns, normalize_messages, normalize_row, processes

logger = logging.getLogger(__name__)

IMAGE = datasets.Image(decode=False)
IMAGES = datasets.List(IMAGE)
# Raw text of JSON rows: `line` is the line number (JSONL) or the index in the list (JSON).
RAW_JSON = datasets.Features({"line": datasets.Value("int64"), "text": datasets.Value("large_string")})
# Canonical rows read from JSON: images are paths there (JSON cannot hold bytes).
JSON_ROWS = datasets.Features(
    {
        "messages": MESSAGES,
        "images": datasets.List(datasets.Value("string")),
        "tools": datasets.Value("string"),
        WHERE: datasets.Value("string"),
    }
)
OPTIONAL_FIELDS = ("tool_calls", "reasoning_content")
COLUMNS = ["messages", "images", "tools", WHERE]
# Files up to this size are also keyed by their content: a rewrite within the file system's clock
# tick (same size and mtime) must not be taken for the cached version.
HASHED_UP_TO = 64 << 20
SOURCES = (Path(__file__).with_name("rows.py"), Path(__file__))


def data_format(path: Path, fmt: str) -> str:
    """The format of a dataset path: `fmt`, or from the suffix with `auto` (a dir is `arrow`)."""
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} not found.")
    if fmt == "auto":
        fmt = "arrow" if path.is_dir() else {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
        if fmt is None:
            raise ValueError(f"{path}: unknown suffix; set data.format to one of jsonl, json, parquet, arrow.")
    return fmt


def json_records(path: Path, fmt: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each JSONL line that is not blank, or (index, text) of each element of a
    JSON list; read in blocks, so that a file of any size costs no more memory than one row."""
    if fmt == "json":
        yield from _json_list(path)
        return
    with path.open("rb") as handle:  # bytes, so that a bad line is named by its number
        for line_no, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not UTF-8 text ({err}); re-encode the file as UTF-8.") from None
            if line.strip():
                yield line_no, line


def _json_list(path: Path, block: int = 1 << 20) -> Iterator[tuple[int, str]]:
    """The elements of a JSON list as text, one at a time (`raw_decode` finds where each ends)."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, done = "", 0, 0  # done: characters dropped from the front of buf
    eof = False
    with path.open("rb") as handle:

        def more(size: int) -> None:
            nonlocal buf, pos, done, eof
            chunk = handle.read(size)
            eof = not chunk
            try:
                text = utf8.decode(chunk, final=eof)
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: not UTF-8 text ({err}); re-encode the file as UTF-8.") from None
            done += pos
            buf, pos = buf[pos:] + text, 0

        def skip_space() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return buf[pos] if pos < len(buf) else ""
                more(block)

        if skip_space() != "[":
            raise ValueError(f"{path}: a .json dataset must hold a list of rows.")
        pos += 1
        index = 0
        while True:
            if skip_space() == "]" and index == 0:
                pos += 1
                break
            size = block
            while True:
                try:
                    _, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as err:
                    if eof:
                        raise ValueError(
                            f"{path}: not valid JSON at row {index}: {err.msg} (char {done + err.pos})"
                        ) from None
                else:
                    if end < len(buf) or eof:  # a value that ends the buffer may go on in the next block
                        break
                more(size)
                size *= 2  # a row longer than a block is parsed again per read: grow them
            yield index, buf[pos:end]
            index += 1
            pos = end
            after = skip_space()
            pos += 1
            if after == "]":
                break
            if after != ",":
                found = repr(after) if after else "the end of the file"
                raise ValueError(f"{path}: not valid JSON after row {index - 1}: expected ',' or ']', found {found}.")
        if skip_space():
            raise ValueError(f"{path}: not valid JSON: text after the list (char {done + pos}).")


def parse_json_row(text: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON: {err}") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}.")
    return row


def _json_image(image: Any, where: str) -> str:
    # JSON holds no bytes: an image is a path, or {"path": …} as datasets writes an undecoded image.
    if isinstance(image, dict) and isinstance(image.get("path"), str) and not image.get("bytes"):
        return image["path"]
    if not isinstance(image, str):
        raise ValueError(
            f"{where}: images must be paths in JSON, got {image!r:.80}; embed image bytes in parquet or a "
            "datasets dir (`vlm-peft data convert` writes them)."
        )
    return image


def _normalize_json(table: pa.Table, *, path: str, listed: bool) -> pa.Table:
    rows = []
    for line, text in zip(table.column("line").to_pylist(), table.column("text").to_pylist()):
        where = f"{path}: row {line}" if listed else f"{path}:{line}"
        row = normalize_row(parse_json_row(text, where), where)
        row["images"] = [_json_image(image, where) for image in row["images"]]
        rows.append(row)
    # Built by Arrow in one call: datasets' per-row encoding of the features would double the time.
    return pa.Table.from_pylist(rows, schema=JSON_ROWS.arrow_schema)


def _normalize_arrow(table: pa.Table, indices: list[int], *, path: str, schema: pa.Schema) -> pa.Table:
    """messages and tools in Python; the images column only by its list lengths (its bytes stay put)."""
    n = table.num_rows
    messages = table.column("messages").to_pylist()
    tools = table.column("tools").to_pylist() if "tools" in table.column_names else [None] * n
    if "images" in table.column_names:
        counts = pc.fill_null(pc.list_value_length(table.column("images")), 0).to_pylist()
    else:
        counts = [0] * n
    out: dict[str, list] = {"messages": [], "tools": [], WHERE: []}
    for i, m, t, count in zip(indices, messages, tools, counts):
        where = f"{path}: row {i}"
        m, t = normalize_messages({"messages": m, "tools": t}, where, count)
        out["messages"].append(m)
        out["tools"].append(t)
        out[WHERE].append(where)
    return pa.Table.from_pydict(out, schema=schema)


def _identity(path: Path, fmt: str) -> str:
    """A key that changes when the data or the code reading it changes."""
    digest = hashlib.sha256(json.dumps([str(path.resolve()), fmt]).encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in [*files, *SOURCES]:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}".encode())
        if stat.st_size <= HASHED_UP_TO:
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:24]


def load_rows(
    path: str | Path, fmt: str = "auto", *, num_proc: int | None = None, cache_dir: str | Path | None = None
) -> datasets.Dataset:
    """A dataset file in the canonical format as a memory-mapped `datasets.Dataset`; every row is checked.

    `num_proc`: processes that parse and check rows (default: up to 8, one per 20k rows). `cache_dir`:
    where the Arrow files go (default: `datasets`' cache, `HF_DATASETS_CACHE`, under `vlm_peft_rows`).
    """
    path = Path(path)
    fmt = data_format(path, fmt)
    root = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "vlm_peft_rows"
    key = _identity(path, fmt)
    where = str(path)
    map_args: dict[str, Any] = dict(
        batched=True,
        batch_size=1000,
        load_from_cache_file=True,
        cache_file_name=str(root / f"rows-{key}.arrow"),
        new_fingerprint=f"rows-{key}",  # deterministic, so that later maps (fit_to_length) are cached too
        desc=f"{where}: checking rows",
    )
    if fmt in ("jsonl", "json"):
        if next(json_records(path, fmt), None) is None:  # (datasets has no words for a generator without rows)
            raise ValueError(f"{path}: the dataset is empty.")
        # Parsed by vlm-peft, not datasets' JSON loader: content mixing strings and part lists has no Arrow schema.
        raw = _raw_json(path, fmt, root / f"raw-{key}.arrow")
        return (
            raw.with_format("arrow")
            .map(
                _normalize_json,
                fn_kwargs={"path": where, "listed": fmt == "json"},
                features=JSON_ROWS,
                remove_columns=raw.column_names,
                num_proc=processes(num_proc, len(raw)),
                **map_args,
            )
            .with_format(None)
        )
    if fmt == "arrow":
        raw = datasets.load_from_disk(where)  # memory-mapped where it lies
    else:
        raw = _raw_parquet(path, root / f"raw-{key}.arrow")
    if "messages" not in raw.column_names:
        raise ValueError(f"{path}: no 'messages' column (columns: {raw.column_names}).")
    if not len(raw):
        raise ValueError(f"{path}: the dataset is empty.")
    check_tool_columns(raw.features, where)
    if "images" in raw.column_names:
        images = _undecoded_images(raw.select_columns(["images"]), f"images-{key}")
    else:
        images = datasets.Dataset.from_dict({"images": [[]] * len(raw)}, features=datasets.Features(images=IMAGES))
    wanted = [c for c in ("messages", "tools", "images") if c in raw.column_names]
    text_features = datasets.Features(
        messages=_messages_like(raw), tools=datasets.Value("string"), **{WHERE: datasets.Value("string")}
    )
    text = (
        raw.select_columns(wanted)
        .with_format("arrow")
        .map(
            _normalize_arrow,
            with_indices=True,
            fn_kwargs={"path": where, "schema": text_features.arrow_schema},
            features=text_features,
            remove_columns=wanted,
            num_proc=processes(num_proc, len(raw)),
            **map_args,
        )
    )
    rows = datasets.concatenate_datasets([text.with_format(None), images], axis=1)
    return rows.select_columns(COLUMNS, new_fingerprint=f"columns-{key}")


def _messages_like(raw: datasets.Dataset) -> datasets.List:
    """Canonical `messages` with only the optional fields that some message of the file fills: rows
    come back as they were written (no `tool_calls: None` on every message of a file without tool
    calls), as before rows went through Arrow. Read from the Arrow column, never from Python."""
    inner = getattr(raw.features["messages"], "feature", None)
    if not isinstance(inner, dict):
        return MESSAGES
    present = [k for k in OPTIONAL_FIELDS if k in inner]
    if present:
        structs = pc.list_flatten(raw.data.column("messages"))
        present = [k for k in present if any(chunk.field(k).null_count < len(chunk) for chunk in structs.chunks)]
    return datasets.List({k: v for k, v in MESSAGES.feature.items() if k not in OPTIONAL_FIELDS or k in present})


def _undecoded_images(images: datasets.Dataset, fingerprint: str) -> datasets.Dataset:
    """The images column as `List(Image(decode=False))`: rows hold {"bytes", "path"}, decoding is the
    collator's job (strings become {"path": …}). Cast on the Arrow table, not with `Dataset.cast`,
    which would write the whole column, image bytes and all, to a new cache file."""
    features = datasets.Features(images=IMAGES)
    table = images.data.cast(features.arrow_schema)  # no copy where the storage already fits
    return datasets.Dataset(update_metadata_with_features(table, features), fingerprint=fingerprint)


def _raw_json(path: Path, fmt: str, out: Path, batch: int = 10_000) -> datasets.Dataset:
    """The rows' text as an Arrow file, for `Dataset.map` to parse in several processes. Written by pyarrow a
    batch at a time: `Dataset.from_generator` encodes every row in Python, which took as long as parsing them."""

    def batches() -> Iterator[pa.RecordBatch]:
        lines: list[int] = []
        texts: list[str] = []
        for line, text in json_records(path, fmt):
            lines.append(line)
            texts.append(text)
            if len(lines) == batch:
                yield pa.record_batch([lines, texts], schema=RAW_JSON.arrow_schema)
                lines, texts = [], []
        if lines:
            yield pa.record_batch([lines, texts], schema=RAW_JSON.arrow_schema)

    return _arrow_file(out, RAW_JSON.arrow_schema, batches)


def _raw_parquet(path: Path, out: Path, batch: int = 1000) -> datasets.Dataset:
    """A parquet file as an Arrow file, a small batch at a time. (`Dataset.from_parquet` scans whole row groups
    with pyarrow's readahead: with embedded images ~0.5 GB of memory at 1M rows, against ~70 MB here.)"""
    source = pq.ParquetFile(path, pre_buffer=False)
    return _arrow_file(out, source.schema_arrow, lambda: source.iter_batches(batch_size=batch))


def _arrow_file(out: Path, schema: pa.Schema, batches: Any) -> datasets.Dataset:
    """`batches()` written once to `out` (then memory-mapped); whole or not at all: a run killed while
    writing leaves no half file to be taken for the cache."""
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
        try:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                for record_batch in batches():
                    writer.write_batch(record_batch)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return datasets.Dataset.from_file(str(out))


def first_row(path: str | Path, fmt: str = "auto") -> dict[str, Any]:
    """The first row of a dataset in canonical form, reading no more of the file than it needs."""
    path = Path(path)
    fmt = data_format(path, fmt)
    if fmt in ("jsonl", "json"):
        for line, text in json_records(path, fmt):
            where = f"{path}: row {line}" if fmt == "json" else f"{path}:{line}"
            return normalize_row(parse_json_row(text, where), where)
        raise ValueError(f"{path}: the dataset is empty.")
    if fmt == "parquet":
        batch = next(pq.ParquetFile(path).iter_batches(batch_size=1), None)
        if batch is None:
            raise ValueError(f"{path}: the dataset is empty.")
        return normalize_row(batch.to_pylist()[0], f"{path}: row 0")
    raw = datasets.load_from_disk(str(path))
    if not len(raw):
        raise ValueError(f"{path}: the dataset is empty.")
    # The Arrow storage of row 0 (images as {"bytes", "path"}, undecoded); `cast_column` would copy the column.
    return normalize_row(raw.data.slice(0, 1).to_pylist()[0], f"{path}: row 0")
