"""Convert the dataset formats people have into the canonical format (see README, "Datasets").

Sources (`fmt`, autodetected from the file's content when "auto"):

- `minimind`: MiniMind-V JSONL,
  `{"conversations": [{"role": "user", "content": "…<image>"}, …], "image": "a.jpg, b.jpg"}`: comma-separated
  names under the image root; a turn without a role takes its place (user, assistant, user, …).
  `minimind-parquet`: its parquet form, `conversations` a JSON string of that list and `image_bytes` one blob or a
  list of blobs (embedded in the output).
- `llava`: LLaVA JSON (a list) or JSONL, `{"id", "image": "x.jpg" | [...], "conversations": [{"from": "human",
  "value": "<image>\\n…"}, {"from": "gpt", "value": "…"}]}`; no `image` for text-only rows. ShareGPT rows
  (`conversations` of `{from, value}` plus `images`, optional top-level `system`) read the same way.
- `messages`: `{"messages": [{"role", "content": str | [parts]}], "images": [...]}`; string content has `<image>`
  markers, part lists have `{"type": "text"}`, `{"type": "image"}` (the next entry of `images`), an inline
  `{"type": "image", "image" | "path" | "url": …}` or OpenAI's `{"type": "image_url", "image_url": {"url": …}}`
  (a local path, `file://` or a `data:image/…;base64,` URL, whose bytes are embedded).
- `captions`: a folder of images with same-stem `.txt` captions, or a CSV/TSV/JSONL/parquet of `image,caption`
  pairs, turned into align-stage rows: user = [image, a prompt drawn from a pool], assistant = the caption.

Each `<image>` marker becomes an image part in place (the text around it kept, one newline right after a marker
dropped, as in LLaVA's "<image>\\n"). A row that cannot be converted as it is (marker count differs from image
count, unknown role, no final assistant answer, a remote image, …) is not repaired: it is skipped, counted under a
reason, logged, and listed with the reason in `x.rejects.jsonl` beside the output `x.parquet` or dir `x`.

Images stay references: a path relative to the output's folder (the default image root when training on it) when
the image lies under it, else an absolute path; or embedded bytes `{"bytes": …, "path": None}` where the source
embeds them. The output (`.parquet` → one parquet file, anything else → a `save_to_disk` dir) loads with
`vlm_peft.data.load_rows`.

    python -m data_tools.convert llava_v1_5_mix665k.json data/llava.parquet --image-root data/images
"""

from __future__ import annotations

import argparse
import base64
import csv
import itertools
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.table import InMemoryTable
from tqdm.auto import tqdm

from vlm_peft.data import ROLES, normalize_row

log = logging.getLogger(__name__)

FORMATS = ("minimind", "minimind-parquet", "llava", "messages", "captions")
MARKER = "<image>"
DEFAULT_PROMPTS = (
    "Describe the image.",
    "What do you see?",
    "Caption this image.",
    "What is in the picture?",
    "Give a short caption.",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IMAGE_KEYS = ("image", "file_name", "filename", "file", "path", "image_path", "img")
CAPTION_KEYS = ("caption", "text", "caption_text", "description")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", **{r: r for r in ROLES}}
CHUNK = 2000  # rows per conversion chunk (and per worker task with num_proc)
MAX_LOGGED_REJECTS = 20

# Images are a plain {bytes, path} struct, not a `datasets.Image` feature: `save_to_disk` embeds the files of
# Image columns (reading relative paths from the current dir), and path references must stay references.
# `load_rows` casts the column to `Image(decode=False)` when it reads the output.
FEATURES = datasets.Features(
    {
        "messages": datasets.List(
            {
                "role": datasets.Value("string"),
                "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
            }
        ),
        "images": datasets.List({"bytes": datasets.Value("binary"), "path": datasets.Value("string")}),
    }
)
SCHEMA = FEATURES.arrow_schema


class Reject(Exception):
    """A source row that is skipped: `reason` is the count key, the message says what is wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Context:
    fmt: str
    image_root: str  # absolute; where relative source image names resolve
    out_root: str  # absolute; the output's folder, to which image paths are made relative when under it
    prompts: tuple[str, ...]
    seed: int


# ---------------------------------------------------------------------------------------------- images and text


def _local_ref(name: str, ctx: Context) -> dict[str, Any]:
    path = os.path.normpath(os.path.join(ctx.image_root, os.path.expanduser(name)))
    prefix = ctx.out_root.rstrip(os.sep) + os.sep
    if path.startswith(prefix):
        path = path[len(prefix) :].replace(os.sep, "/")
    return {"bytes": None, "path": path}


def _image_ref(value: Any, ctx: Context) -> dict[str, Any]:
    """One source image as `{"bytes", "path"}`: a path reference, or embedded bytes."""
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, dict):
        if value.get("bytes"):
            return {"bytes": bytes(value["bytes"]), "path": None}
        if "url" in value:  # OpenAI's {"url": …, "detail": …}
            value = value["url"]
        else:
            value = value.get("path")
    if not isinstance(value, str) or not value.strip():
        raise Reject("bad_image", f"image reference {value!r} is neither a path, a URL nor bytes.")
    value = value.strip()
    lower = value[:16].lower()
    if lower.startswith("data:"):
        header, sep, payload = value.partition(",")
        if not sep:
            raise Reject("bad_image", f"malformed data URL {value[:40]!r}…")
        try:
            if header.lower().endswith(";base64"):
                data = base64.b64decode(payload, validate=True)
            else:
                data = urllib.parse.unquote_to_bytes(payload)
        except ValueError as err:
            raise Reject("bad_image", f"data URL {value[:40]!r}… does not decode: {err}") from None
        return {"bytes": data, "path": None}
    if lower.startswith("file://"):
        return _local_ref(urllib.parse.unquote(urllib.parse.urlparse(value).path), ctx)
    if re.match(r"[a-z][a-z0-9+.-]*://", lower):
        raise Reject("bad_image", f"remote image {value!r}: download it and reference the local file.")
    return _local_ref(value, ctx)


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Reject("bad_row", f"{what} must be a string, got {type(value).__name__}.")
    return value


def _split_markers(text: str) -> list[dict[str, Any]]:
    """Text with `<image>` markers as parts: an image part per marker, the text around it kept."""
    if MARKER not in text:
        return [{"type": "text", "text": text}]
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(text.split(MARKER)):
        if i:
            parts.append({"type": "image", "text": None})
            if piece.startswith("\r\n"):
                piece = piece[2:]
            elif piece.startswith("\n"):
                piece = piece[1:]
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _role(value: Any, i: int) -> str:
    role = ROLE_ALIASES.get(value.lower()) if isinstance(value, str) else None
    if role is None:
        raise Reject("bad_role", f"turn {i}: role {value!r} is not one of {sorted(ROLE_ALIASES)}.")
    return role


def _finish(messages: list[dict[str, Any]], images: list[dict[str, Any]], slots_from: str) -> dict[str, Any]:
    if not messages:
        raise Reject("bad_row", "no messages.")
    slots = sum(p["type"] == "image" for m in messages for p in m["content"])
    if slots != len(images):
        raise Reject("image_count_mismatch", f"{slots} {slots_from} but {len(images)} image(s).")
    if messages[-1]["role"] != "assistant":
        raise Reject("no_answer", f"the last turn is the {messages[-1]['role']}'s, not the assistant's answer.")
    return {"messages": messages, "images": images}


def _turns(row: dict[str, Any], key: str) -> list[Any]:
    turns = row.get(key)
    if isinstance(turns, str):  # MiniMind's parquet form stores the list as a JSON string
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as err:
            raise Reject("bad_row", f"{key!r} is a string but not JSON: {err}") from None
    if not isinstance(turns, list) or not turns:
        raise Reject("bad_row", f"{key!r} must be a non-empty list of turns, got {type(turns).__name__}.")
    if not all(isinstance(t, dict) for t in turns):
        raise Reject("bad_row", f"every entry of {key!r} must be an object.")
    return turns


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ---------------------------------------------------------------------------------------------- row converters


def _minimind(row: dict[str, Any], index: int, ctx: Context) -> dict[str, Any]:
    turns = _turns(row, "conversations")
    messages, position = [], 0
    for i, turn in enumerate(turns):
        if turn.get("role") is None:  # positional: user, assistant, user, … (an explicit system turn aside)
            role = "user" if position % 2 == 0 else "assistant"
        else:
            role = _role(turn["role"], i)
        if role != "system":
            position += 1
        messages.append({"role": role, "content": _split_markers(_text(turn.get("content"), f"turn {i} content"))})
    if row.get("image_bytes") is not None:
        images = [_image_ref(b, ctx) for b in _as_list(row["image_bytes"])]
    else:
        names = row.get("image") if row.get("image") is not None else row.get("images")
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        images = [_image_ref(n, ctx) for n in _as_list(names)]
    return _finish(messages, images, "<image> markers")


def _llava(row: dict[str, Any], index: int, ctx: Context) -> dict[str, Any]:
    turns = _turns(row, "conversations")
    messages = []
    if isinstance(row.get("system"), str) and row["system"]:
        messages.append({"role": "system", "content": [{"type": "text", "text": row["system"]}]})
    for i, turn in enumerate(turns):
        role = _role(turn.get("from", turn.get("role")), i)
        text = _text(turn.get("value", turn.get("content")), f"turn {i} value")
        messages.append({"role": role, "content": _split_markers(text)})
    source = row.get("image") if row.get("image") is not None else row.get("images")
    images = [_image_ref(v, ctx) for v in _as_list(source)]
    return _finish(messages, images, "<image> markers")


def _inline_image(part: dict[str, Any]) -> Any:
    if part.get("type") == "image_url":
        ref = part.get("image_url")
        return ref if ref is not None else part.get("url")
    for key in ("image", "path", "url"):
        if part.get(key) is not None:
            return part[key]
    return None


def _messages(row: dict[str, Any], index: int, ctx: Context) -> dict[str, Any]:
    if row.get("messages") is None and row.get("conversations") is not None:
        return _llava(row, index, ctx)  # ShareGPT
    turns = _turns(row, "messages")
    pool = _as_list(row.get("images") if row.get("images") is not None else row.get("image"))
    messages, images, bare = [], [], 0
    for i, turn in enumerate(turns):
        role = _role(turn.get("role", turn.get("from")), i)
        content = turn.get("content", turn.get("value"))
        if content is None or isinstance(content, str):
            parts = _split_markers(content or "")
            for part in parts:
                if part["type"] == "image":
                    images.append(pool[bare] if bare < len(pool) else None)
                    bare += 1
        elif isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": _text(part.get("text"), f"turn {i} text")})
                elif kind in ("image", "image_url"):
                    inline = _inline_image(part)
                    if inline is None:
                        images.append(pool[bare] if bare < len(pool) else None)
                        bare += 1
                    else:
                        images.append(inline)
                    parts.append({"type": "image", "text": None})
                else:
                    raise Reject("bad_part", f"turn {i}: content part {str(part)[:80]} is not text or an image.")
        else:
            raise Reject("bad_row", f"turn {i}: content must be a string or a list of parts.")
        messages.append({"role": role, "content": parts})
    if bare != len(pool):
        raise Reject("image_count_mismatch", f"{bare} image slot(s) without an inline image but {len(pool)} image(s).")
    return _finish(messages, [_image_ref(v, ctx) for v in images], "image parts")


def _pick(row: dict[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None


def _captions(row: dict[str, Any], index: int, ctx: Context) -> dict[str, Any]:
    image, caption = _pick(row, IMAGE_KEYS), _pick(row, CAPTION_KEYS)
    if image is None:
        raise Reject("no_image", f"no image for the caption (fields: {sorted(row)}).")
    if caption is None:
        raise Reject("no_caption", f"no caption for image {image if isinstance(image, str) else '<bytes>'}.")
    caption = _text(caption, "caption").strip()
    if not caption:
        raise Reject("empty_caption", "the caption is empty.")
    # Deterministic from (seed, row index) alone, so chunking and worker count do not change it.
    prompt = random.Random(f"{ctx.seed}:{index}").choice(ctx.prompts)
    messages = [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]
    return _finish(messages, [_image_ref(image, ctx)], "image parts")


CONVERTERS = {
    "minimind": _minimind,
    "minimind-parquet": _minimind,
    "llava": _llava,
    "messages": _messages,
    "captions": _captions,
}


# ---------------------------------------------------------------------------------------------- reading sources


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
    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
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


def _read(source: Path) -> Iterator[tuple[str, Any]]:
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
    if _pick(row, CAPTION_KEYS) is not None and _pick(row, IMAGE_KEYS) is not None:
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
    rows = [(None, _first_json_list_row(source))] if kind == "json" else _read(source)
    for _, row in rows:
        if isinstance(row, str):
            try:
                row = json.loads(row)
            except json.JSONDecodeError as err:
                raise ValueError(f"{source}: cannot detect the format: the first line is not JSON ({err}).") from None
        return _row_format(row, source)
    raise ValueError(f"{source}: no rows.")


# ---------------------------------------------------------------------------------------------- converting


def _json_safe(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _convert_chunk(args: tuple[Context, list[tuple[int, str, Any]]]) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Convert (index, where, raw row) triples: the canonical rows as an Arrow table, and the rejects."""
    ctx, items = args
    convert_row = CONVERTERS[ctx.fmt]
    rows, rejects = [], []
    for index, where, raw in items:
        try:
            if isinstance(raw, str):  # a JSONL line
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise Reject("bad_json", f"not valid JSON: {err}") from None
            if not isinstance(raw, dict):
                raise Reject("bad_row", f"a row must be an object, got {type(raw).__name__}.")
            row = convert_row(raw, index, ctx)
            try:
                normalize_row(row, where)  # the canonical reader's own check: the output must load
            except ValueError as err:
                raise Reject("invalid", str(err)) from None
            rows.append(row)
        except Reject as err:
            rejects.append({"where": where, "reason": err.reason, "message": str(err), "row": _json_safe(raw)})
    return pa.Table.from_pylist(rows, schema=SCHEMA), rejects


def _chunks(items: Iterable[tuple[str, Any]], ctx: Context) -> Iterator[tuple[Context, list[tuple[int, str, Any]]]]:
    chunk: list[tuple[int, str, Any]] = []
    for index, (where, raw) in enumerate(items):
        chunk.append((index, where, raw))
        if len(chunk) == CHUNK:
            yield ctx, chunk
            chunk = []
    if chunk:
        yield ctx, chunk


def _load_prompts(prompts: str | os.PathLike[str] | Sequence[str] | None) -> tuple[str, ...]:
    if prompts is None:
        return DEFAULT_PROMPTS
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        text = path.read_text(encoding="utf-8")
        pool = json.loads(text) if path.suffix.lower() == ".json" else text.splitlines()
    else:
        pool = list(prompts)
    pool = tuple(p.strip() for p in pool if isinstance(p, str) and p.strip())
    if not pool:
        raise ValueError(f"the prompt pool {prompts!r} holds no prompts.")
    return pool


def rejects_path(out: str | os.PathLike[str]) -> Path:
    """Where `convert` lists the skipped rows: `x.parquet` → `x.rejects.jsonl`, dir `x` → `x.rejects.jsonl`."""
    out = Path(out)
    return out.with_name(f"{out.stem if out.suffix == '.parquet' else out.name}.rejects.jsonl")


def _check_output(source: Path, out: Path) -> None:
    if out.suffix.lower() in (".json", ".jsonl", ".csv", ".tsv", ".arrow"):
        raise ValueError(f"{out}: the output is a .parquet file or a dir (save_to_disk), not {out.suffix}.")
    if os.path.abspath(out) == os.path.abspath(source):
        raise ValueError(f"{out}: the output would overwrite the source.")
    if out.suffix != ".parquet" and out.exists():
        if not out.is_dir():
            raise ValueError(f"{out}: exists and is not a dir.")
        if any(out.iterdir()) and not (out / "state.json").is_file():
            raise ValueError(f"{out}: exists, is not empty and is not a saved dataset; not overwriting it.")


def convert(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    fmt: str = "auto",
    image_root: str | os.PathLike[str] | None = None,
    prompts: str | os.PathLike[str] | Sequence[str] | None = None,
    seed: int = 0,
    num_proc: int | None = None,
) -> dict[str, Any]:
    """Convert `source` to canonical rows in `out` (`.parquet` → one parquet file, else a `save_to_disk` dir).

    `image_root` is where the source's relative image names resolve (default: the source file's folder, or the
    folder itself for a captions folder). `prompts` (a list, or a file with one per line or a JSON list) and
    `seed` choose the caption prompts. Returns `{"rows": written, "skipped": n, "reasons": {reason: n},
    "rejects": path of the rejects list or None}`.
    """
    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"source {source} not found.")
    if fmt == "auto":
        fmt = detect_format(source)
        log.info("%s: detected format %s", source, fmt)
    elif fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {('auto', *FORMATS)}.")
    _check_output(source, out)
    if image_root is None:
        image_root = source if source.is_dir() else source.parent
    ctx = Context(
        fmt=fmt,
        image_root=os.path.abspath(image_root),
        out_root=os.path.abspath(out.parent),
        prompts=_load_prompts(prompts) if fmt == "captions" else (),
        seed=seed,
    )

    start = time.perf_counter()
    tables: list[pa.Table] = []
    reasons: dict[str, int] = {}
    skipped = 0
    reject_file = rejects_path(out)
    tmp_rejects = reject_file.with_name(f".{reject_file.name}.tmp")
    pool = multiprocessing.Pool(num_proc) if num_proc and num_proc > 1 else None
    try:
        with (
            tmp_rejects.open("w", encoding="utf-8") as rejects,
            tqdm(desc=f"converting {source.name}", unit=" rows", disable=None) as bar,
        ):
            chunks = _chunks(_read(source), ctx)
            results = pool.imap(_convert_chunk, chunks) if pool else map(_convert_chunk, chunks)
            for table, chunk_rejects in results:
                tables.append(table)
                for reject in chunk_rejects:
                    skipped += 1
                    reasons[reject["reason"]] = reasons.get(reject["reason"], 0) + 1
                    rejects.write(json.dumps(reject, ensure_ascii=False) + "\n")
                    if skipped <= MAX_LOGGED_REJECTS:
                        log.warning("skipped %s: %s: %s", reject["where"], reject["reason"], reject["message"])
                    elif skipped == MAX_LOGGED_REJECTS + 1:
                        log.warning("more rows skipped; all are listed in %s", reject_file)
                bar.update(table.num_rows + len(chunk_rejects))
    except BaseException:
        tmp_rejects.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    if skipped:
        os.replace(tmp_rejects, reject_file)
    else:
        tmp_rejects.unlink()
        reject_file.unlink(missing_ok=True)  # stale, from an earlier run into the same output

    n_rows = sum(t.num_rows for t in tables)
    counts = {
        "rows": n_rows,
        "skipped": skipped,
        "reasons": dict(sorted(reasons.items())),
        "rejects": str(reject_file) if skipped else None,
    }
    if not n_rows:
        raise ValueError(f"{source}: no row converted as {fmt} ({counts}).")
    table = pa.concat_tables(tables)
    dataset = datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=FEATURES))
    _write(dataset, out)
    elapsed = time.perf_counter() - start
    log.info(
        "%s (%s) -> %s: %d rows written, %d skipped%s in %.1fs (%.0f rows/s)",
        source, fmt, out, n_rows, skipped, f" {counts['reasons']}" if skipped else "", elapsed,
        (n_rows + skipped) / max(elapsed, 1e-9),
    )  # fmt: skip
    return counts


def _write(dataset: datasets.Dataset, out: Path) -> None:
    """Write atomically: under a temporary name, renamed when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    if out.suffix == ".parquet":
        dataset.to_parquet(str(tmp))
        os.replace(tmp, out)
        return
    dataset.save_to_disk(str(tmp))
    if out.exists():  # an empty dir or a saved dataset (checked before converting)
        shutil.rmtree(out)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.convert",
        description="Convert MiniMind-V, LLaVA, messages/ShareGPT/OpenAI or caption data to the canonical format.",
    )
    parser.add_argument("source", type=Path, help="source file (json, jsonl, parquet, csv) or caption folder")
    parser.add_argument("out", type=Path, help="output: a .parquet file, or else a save_to_disk dir")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="source format (auto: detect)")
    parser.add_argument("--image-root", type=Path, help="where relative image names resolve (default: the source's)")
    parser.add_argument("--prompts", type=Path, help="caption prompt pool: one prompt per line, or a JSON list")
    parser.add_argument("--seed", type=int, default=0, help="seed of the caption prompt choice")
    parser.add_argument("--num-proc", type=int, help="worker processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        counts = convert(
            args.source,
            args.out,
            fmt=args.format,
            image_root=args.image_root,
            prompts=args.prompts,
            seed=args.seed,
            num_proc=args.num_proc,
        )
    except (ValueError, FileNotFoundError) as err:
        log.error("error: %s", err)
        return 1
    log.info("counts: %s", json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
