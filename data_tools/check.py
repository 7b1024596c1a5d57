"""Validate a canonical dataset before a GPU hour is spent on it.

Every row is checked, and every problem found is collected (a row can have several):

    bad_row           the row is not in the canonical format (invalid JSON, no messages, unknown role, ...)
    image_missing     an image file does not exist
    image_unreadable  an image file is not an image PIL can identify
    image_truncated   an image's pixel data cannot be decoded (truncated or corrupt file)
    image_empty       a zero-byte image file, or an image with a zero-sized dimension
    image_aspect      max(w, h) / min(w, h) > max_aspect
    image_too_large   w * h > max_pixels (read from the header: the pixels are never decoded for this)
    image_count       the number of image parts differs from the number of `images` entries
    no_answer         the last message is not an assistant turn, or its text is empty
    role_order        the first non-system turn is not the user's, two user (or two assistant) turns in a
                      row, or a tool result that does not follow an assistant turn (or another tool result)
    too_long          with a processor and max_length: the rendered conversation, image runs expanded, is
                      longer than max_length; the detail says whether truncation would cut an image run
                      (training drops such rows, see vlm_peft.data.fit_to_length) or only the answer

    python -m data_tools.check data/train.jsonl --processor runs/adapter --max-length 2048 --fix data/clean.parquet

prints a summary table, writes the bad rows (one JSON line each, with every problem and how to fix it)
to `<stem>.bad.jsonl` next to the data, and with `--fix` writes the dataset without the bad rows. The
exit code is 0 for a clean dataset, 1 when problems were found, 2 for usage errors (including a dataset
that cannot be read at all).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from vlm_peft.data import WHERE, _parts, normalize_row

log = logging.getLogger(__name__)

KINDS = (
    "bad_row",
    "image_missing",
    "image_unreadable",
    "image_truncated",
    "image_empty",
    "image_aspect",
    "image_too_large",
    "image_count",
    "no_answer",
    "role_order",
    "too_long",
)
CHUNK_ROWS = 256  # rows per unit of work: one batched render + tokenize, one task for a worker
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
IM_START = "<|im_start|>"


@dataclass(frozen=True)
class Problem:
    index: int  # position of the row in the dataset (0-based, blank JSONL lines not counted)
    origin: str  # file and line (or row) of the row, as training errors name it
    kind: str
    detail: str  # names the field or file and says how to fix it


@dataclass
class Report:
    path: str
    fmt: str
    image_root: str
    total: int = 0
    problems: list[Problem] = field(default_factory=list)
    max_length: int | None = None
    longest: tuple[int, int] | None = None  # (tokens, row index) when a processor was given
    seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        """Problems per kind (every kind, zeros included)."""
        have = Counter(p.kind for p in self.problems)
        return {kind: have[kind] for kind in KINDS}

    @property
    def row_counts(self) -> dict[str, int]:
        """Rows with at least one problem of each kind."""
        have = Counter(kind for kind, _ in {(p.kind, p.index) for p in self.problems})
        return {kind: have[kind] for kind in KINDS}

    @property
    def bad_rows(self) -> list[int]:
        return sorted({p.index for p in self.problems})

    @property
    def num_bad(self) -> int:
        return len({p.index for p in self.problems})

    @property
    def clean(self) -> bool:
        return self.total > 0 and not self.problems

    def by_row(self) -> dict[int, list[Problem]]:
        rows: dict[int, list[Problem]] = {}
        for p in sorted(self.problems, key=lambda p: p.index):
            rows.setdefault(p.index, []).append(p)
        return rows

    def summary_table(self) -> str:
        rows_by_kind, problems_by_kind = self.row_counts, self.counts
        width = max(len(k) for k in KINDS)
        lines = [f"{'kind':<{width}}  {'rows':>8}  {'problems':>8}", f"{'-' * width}  {'-' * 8}  {'-' * 8}"]
        lines += [f"{k:<{width}}  {rows_by_kind[k]:>8}  {problems_by_kind[k]:>8}" for k in KINDS]
        lines.append(f"{'-' * width}  {'-' * 8}  {'-' * 8}")
        share = f" ({100 * self.num_bad / self.total:.1f}%)" if self.total else ""
        lines.append(f"{'bad rows':<{width}}  {self.num_bad:>8}  {len(self.problems):>8}{share}")
        lines.append(f"{'total rows':<{width}}  {self.total:>8}")
        if self.longest is not None:
            limit = f" (max_length {self.max_length})" if self.max_length else ""
            lines.append(f"longest row: {self.longest[0]} tokens, row {self.longest[1]}{limit}")
        if self.total == 0:
            lines.append("the dataset is empty.")
        return "\n".join(lines)

    def write_bad_rows(self, path: str | os.PathLike[str]) -> Path:
        """One JSON line per bad row: index, origin and its problems ({kind, detail}), in dataset order."""
        path = Path(path)
        with path.open("w", encoding="utf-8") as handle:
            for index, problems in self.by_row().items():
                record = {
                    "index": index,
                    "origin": problems[0].origin,
                    "problems": [{"kind": p.kind, "detail": p.detail} for p in problems],
                }
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        return path


# --- reading rows ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unparsable:
    reason: str


def _format(path: Path, fmt: str) -> str:
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} not found.")
    if fmt == "auto":
        fmt = "arrow" if path.is_dir() else SUFFIXES.get(path.suffix, "")
        if not fmt:
            raise ValueError(f"{path}: unknown suffix; pass fmt (--format) as one of jsonl, json, parquet, arrow.")
    if fmt not in ("jsonl", "json", "parquet", "arrow"):
        raise ValueError(f"unknown format {fmt!r}; use one of jsonl, json, parquet, arrow.")
    return fmt


def _open_table(path: Path, fmt: str) -> datasets.Dataset:
    raw = datasets.load_from_disk(str(path)) if fmt == "arrow" else datasets.Dataset.from_parquet(str(path))
    if not isinstance(raw, datasets.Dataset):
        raise ValueError(f"{path}: holds a DatasetDict ({list(raw)}); point at one split's dir.")
    if "messages" not in raw.column_names:
        raise ValueError(f"{path}: no 'messages' column (columns: {raw.column_names}).")
    if "images" in raw.column_names:
        try:  # as load_rows does: datasets.Image columns as {"bytes", "path"}, never decoded here
            raw = raw.cast_column("images", datasets.List(datasets.Image(decode=False)))
        except Exception as err:  # noqa: BLE001 - the rows' images are then checked one by one
            log.warning(
                "%s: the 'images' column cannot be read as images (%s); checking its entries as they are.", path, err
            )
    return raw


def _count_rows(path: Path, fmt: str) -> int | None:
    if fmt == "jsonl":
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    return None


def _raw_rows(path: Path, fmt: str, table: datasets.Dataset | None = None) -> Iterator[tuple[str, Any]]:
    """(origin, raw row) in dataset order; a JSONL line that cannot be parsed comes as `_Unparsable`."""
    if fmt == "jsonl":
        with path.open("rb") as handle:  # bytes: one undecodable line must not stop the whole check
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    yield where, json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as err:
                    yield where, _Unparsable(f"line is not UTF-8 ({err})")
                except json.JSONDecodeError as err:
                    yield where, _Unparsable(f"not valid JSON ({err})")
    elif fmt == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err}); a .json dataset is one list of rows.") from err
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json dataset must hold a list of rows.")
        yield from ((f"{path}: row {i}", row) for i, row in enumerate(data))
    else:
        table = _open_table(path, fmt) if table is None else table
        i = 0
        for batch in table.iter(batch_size=1000):
            columns = list(batch)
            for k in range(len(batch[columns[0]])):
                yield f"{path}: row {i}", {c: batch[c][k] for c in columns}
                i += 1


def _chunks(rows: Iterator[tuple[str, Any]], size: int) -> Iterator[list[tuple[int, str, Any]]]:
    chunk: list[tuple[int, str, Any]] = []
    for index, (where, raw) in enumerate(rows):
        chunk.append((index, where, raw))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- checking one row --------------------------------------------------------------------------

_FIXES = {
    "bad_row": "fix the row to the canonical format (README, 'Datasets') or drop it",
    "image_count": "give one 'images' entry per {'type': 'image'} part, in order, or drop the row",
    "no_answer": "end the row with the assistant's answer or drop it",
}


def _classify(message: str) -> str:
    if "image parts in messages but" in message:
        return "image_count"
    if "the last message must be the assistant" in message:
        return "no_answer"
    return "bad_row"


def _lenient(raw: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages and images of a row that normalize_row rejected only for its image count or last role."""
    messages = [{"role": m["role"], "content": _parts(m.get("content"), "")} for m in raw["messages"]]
    images = raw.get("images") or []
    return messages, [images] if isinstance(images, (str, dict)) else list(images)


def _text(message: dict[str, Any]) -> str:
    return "".join(p["text"] or "" for p in message["content"] if p["type"] == "text")


def _role_problems(messages: list[dict[str, Any]]) -> list[str]:
    out = []
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if first is not None and messages[first]["role"] != "user":
        role = messages[first]["role"]
        out.append(
            f"messages[{first}]: the conversation starts with a {role!r} turn, not the user's; "
            "start it with the user's turn or drop the row"
        )
    for i in range(1, len(messages)):
        if first is not None and i == first:
            continue
        role, prev = messages[i]["role"], messages[i - 1]["role"]
        if role in ("user", "assistant") and role == prev:
            other = "assistant" if role == "user" else "user"
            out.append(
                f"messages[{i}]: a second {role!r} turn in a row; merge it into messages[{i - 1}] or "
                f"insert the missing {other!r} turn"
            )
        elif role == "tool" and prev not in ("assistant", "tool"):
            out.append(
                f"messages[{i}]: a 'tool' result after a {prev!r} turn; tool results must follow the "
                "assistant turn that called the tool"
            )
    return out


_PIL_LOCK = threading.Lock()


@contextmanager
def _header_only_limits() -> Iterator[None]:
    """Open images without PIL's decompression-bomb check, so that their header size can be read.

    Only `Image.open` is affected (it reads the header); whether to decode is decided by the caller.
    """
    with _PIL_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


class _Checker:
    """Checks chunks of rows; one per process (built in each worker by `_init_worker`)."""

    def __init__(
        self,
        image_root: Path,
        max_aspect: float,
        max_pixels: int | None,
        processor: Any,
        max_length: int | None,
        pil_limit: int | None,
    ) -> None:
        self.image_root = image_root
        self.max_aspect = max_aspect
        self.max_pixels = max_pixels
        self.processor = processor
        self.max_length = max_length
        self.pil_limit = pil_limit
        self._cache: dict[str, list[tuple[str, str]]] = {}  # resolved path -> findings

    # images

    def _image_findings(self, ref: Any) -> tuple[str, list[tuple[str, str]]]:
        """(what to call the image, [(kind, detail)]) for one `images` entry."""
        if isinstance(ref, dict) and ref.get("bytes"):
            data = ref["bytes"]
            return "(embedded bytes)", self._inspect(io.BytesIO(data), "the embedded bytes", len(data))
        name = ref.get("path") if isinstance(ref, dict) else ref
        if isinstance(ref, dict) and ref.get("bytes") is not None and not name:
            return "(embedded bytes)", [("image_empty", "the embedded bytes are empty; re-embed the image")]
        if not isinstance(name, str) or not name:
            what = f"{type(ref).__name__} {ref!r}"[:200]
            return "", [("image_missing", f"is a {what}, neither a path nor embedded bytes; give a path")]
        path = Path(name)
        if not path.is_absolute():
            path = self.image_root / path
        key = str(path)
        if key not in self._cache:
            self._cache[key] = self._inspect_file(path)
        return repr(name), self._cache[key]

    def _inspect_file(self, path: Path) -> list[tuple[str, str]]:
        try:
            size = path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return [
                (
                    "image_missing",
                    f"no file at {path} (image root {self.image_root}); fix the path, pass "
                    "--image-root, or drop the row",
                )
            ]
        except OSError as err:
            return [("image_unreadable", f"{path} cannot be read ({err}); fix its permissions or drop the row")]
        if path.is_dir():
            return [("image_unreadable", f"{path} is a directory, not an image; fix the path or drop the row")]
        if size == 0:
            return [("image_empty", f"{path} is a zero-byte file; re-export the image or drop the row")]
        return self._inspect(path, str(path), size)

    def _inspect(self, source: Path | io.BytesIO, name: str, size: int) -> list[tuple[str, str]]:
        if size == 0:
            return [("image_empty", f"{name} is empty; re-export the image or drop the row")]
        try:
            with _header_only_limits():
                image = Image.open(source)
        except UnidentifiedImageError:
            return [
                (
                    "image_unreadable",
                    f"{name} is not an image PIL can identify ({size} bytes); replace the file or drop the row",
                )
            ]
        except Exception as err:  # noqa: BLE001 - any failure to read the header is the same finding
            return [
                (
                    "image_unreadable",
                    f"{name} cannot be opened ({type(err).__name__}: {err}); replace the file or drop the row",
                )
            ]
        with image:
            w, h = image.size
            if w <= 0 or h <= 0:
                return [("image_empty", f"{name} has a zero-sized dimension ({w}x{h}); re-export it or drop the row")]
            out = []
            if max(w, h) / min(w, h) > self.max_aspect:
                out.append(
                    (
                        "image_aspect",
                        f"{name} is {w}x{h}, aspect ratio {max(w, h) / min(w, h):.1f} > "
                        f"{self.max_aspect:g}; crop or pad it, or drop the row",
                    )
                )
            if self.max_pixels is not None and w * h > self.max_pixels:
                pil = ""
                if self.pil_limit is not None and w * h > 2 * self.pil_limit:
                    pil = " (PIL refuses to open it: DecompressionBombError)"
                elif self.pil_limit is not None and w * h > self.pil_limit:
                    pil = " (PIL warns: DecompressionBombWarning)"
                out.append(
                    (
                        "image_too_large",
                        f"{name} is {w}x{h} = {w * h:,} pixels > {self.max_pixels:,}{pil}, "
                        "read from its header; downscale it or drop the row",
                    )
                )
                return out  # never decode what may be a decompression bomb
            try:
                if image.format == "JPEG":
                    image.draft(image.mode, (1, 1))  # decode at 1/8 scale: still reads all the data
                image.load()
            except Exception as err:  # noqa: BLE001 - truncated data, corrupt streams, decoder errors
                out.append(
                    (
                        "image_truncated",
                        f"the pixel data of {name} cannot be decoded, the file is truncated "
                        f"or corrupt ({type(err).__name__}: {err}); re-export the image or "
                        "drop the row",
                    )
                )
            return out

    # rows

    def _row(self, index: int, where: str, raw: Any) -> tuple[list[Problem], list[dict[str, Any]] | None]:
        """Problems of one row, and its canonical messages when they can be rendered for the length check."""
        problems: list[Problem] = []

        def add(kind: str, detail: str) -> None:
            problems.append(Problem(index, where, kind, detail))

        if isinstance(raw, _Unparsable):
            add("bad_row", f"{raw.reason}; {_FIXES['bad_row']}")
            return problems, None
        if not isinstance(raw, dict):
            add(
                "bad_row", f"the row is a {type(raw).__name__}, not an object {{messages, images}}; {_FIXES['bad_row']}"
            )
            return problems, None
        renderable = True
        try:
            row = normalize_row(raw, where)
            messages, images = row["messages"], row["images"]
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            message = str(err)
            if message.startswith(f"{where}: "):
                message = message[len(where) + 2 :]
            kind = _classify(message) if isinstance(err, ValueError) else "bad_row"
            lenient = None
            if kind != "bad_row":  # an image-count or last-role problem: the rest of the row can still be checked
                try:
                    lenient = _lenient(raw)
                except Exception:  # noqa: BLE001
                    pass
            if lenient is None or kind == "image_count":  # a missing answer is reported below, naming the message
                add(kind, f"{message.rstrip('.')}; {_FIXES[kind]}")
            if lenient is None:
                return problems, None
            messages, images = lenient
            renderable = False
        for detail in _role_problems(messages):
            add("role_order", detail)
        last, n = messages[-1], len(messages)
        if last["role"] != "assistant":
            add(
                "no_answer",
                f"messages[{n - 1}] is a {last['role']!r} turn, not the assistant's answer; end the row "
                "with the answer or drop it",
            )
        elif not _text(last).strip():
            add(
                "no_answer", f"messages[{n - 1}] (the assistant's answer) has no text; write the answer or drop the row"
            )
        for j, ref in enumerate(images):
            label, findings = self._image_findings(ref)
            for kind, detail in findings:
                add(kind, f"images[{j}] {label}: {detail}" if label else f"images[{j}] {detail}")
        return problems, messages if renderable else None

    def _lengths(self, conversations: list[list[dict[str, Any]]]) -> list[tuple[int, int, int] | str]:
        """Per conversation (tokens, end of the last image run, start of the last turn), or why it fails."""
        processor = self.processor
        try:
            texts = processor.apply_chat_template(conversations, tokenize=False)
        except Exception:  # noqa: BLE001 - find the row(s) that fail
            texts = []
            for conversation in conversations:
                try:
                    texts.append(processor.apply_chat_template(conversation, tokenize=False))
                except Exception as err:  # noqa: BLE001
                    texts.append(err)
        ok = [t for t in texts if isinstance(t, str)]
        encoded = iter(processor.tokenizer(ok, add_special_tokens=False)["input_ids"] if ok else [])
        # An image run ends with <|vision_end|>, as training's fit_to_length measures it.
        end = processor.tokenizer.convert_tokens_to_ids(processor.vision_end_token)
        start = processor.tokenizer.convert_tokens_to_ids(IM_START)
        out: list[tuple[int, int, int] | str] = []
        for text in texts:
            if not isinstance(text, str):
                out.append(f"the chat template fails on this row ({type(text).__name__}: {text})")
                continue
            ids = next(encoded)
            reverse = ids[::-1]
            image_end = len(ids) - reverse.index(end) if end in ids else 0
            turn_start = len(ids) - 1 - reverse.index(start) if start is not None and start in ids else -1
            out.append((len(ids), image_end, turn_start))
        return out

    def _too_long(self, index: int, where: str, tokens: int, image_end: int, turn_start: int) -> Problem:
        limit = self.max_length
        if image_end > limit:
            detail = (
                f"cuts an image run: {tokens} tokens > max_length {limit}, and the last image run ends at token "
                f"{image_end}; training drops rows whose image run would be cut: raise max_length to at least "
                f"{image_end} (at least {tokens} to keep the whole answer), shorten the text, or drop the row"
            )
        else:
            answer = ""
            if 0 <= turn_start and image_end <= turn_start:
                if turn_start >= limit:
                    answer = f"; the final assistant turn starts at token {turn_start}, so none of it is trained on"
                else:
                    answer = f"; {tokens - limit} of the final assistant turn's {tokens - turn_start} tokens are cut"
            detail = (
                f"cuts only the answer: {tokens} tokens > max_length {limit}{answer}; raise max_length to at "
                f"least {tokens}, shorten the answer, or drop the row"
            )
        return Problem(index, where, "too_long", detail)

    def check(self, chunk: list[tuple[int, str, Any]]) -> tuple[list[Problem], list[tuple[int, int]]]:
        """Problems of a chunk of rows, and (tokens, index) of the rows measured."""
        problems: list[Problem] = []
        render: list[tuple[int, str, list[dict[str, Any]]]] = []
        for index, where, raw in chunk:
            found, messages = self._row(index, where, raw)
            problems.extend(found)
            if messages is not None and self.processor is not None:
                render.append((index, where, messages))
        measured = []
        if render:
            for (index, where, _), length in zip(render, self._lengths([m for _, _, m in render])):
                if isinstance(length, str):
                    problems.append(Problem(index, where, "bad_row", f"{length}; {_FIXES['bad_row']}"))
                    continue
                measured.append((length[0], index))
                if self.max_length is not None and length[0] > self.max_length:
                    problems.append(self._too_long(index, where, *length))
        return problems, measured


_WORKER: _Checker | None = None


def _init_worker(checker: _Checker) -> None:
    global _WORKER
    _WORKER = checker
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism


def _check_in_worker(chunk: list[tuple[int, str, Any]]) -> tuple[list[Problem], list[tuple[int, int]]]:
    assert _WORKER is not None
    return _WORKER.check(chunk)


def _longest_first(measured: tuple[int, int]) -> tuple[int, int]:
    return measured[0], -measured[1]  # the most tokens; among ties, the first row


def _default_image_root(path: Path) -> Path:
    """As training resolves it: the data file's folder (for a saved dataset dir, the folder holding it)."""
    return path.resolve().parent


def check_dataset(
    path: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    processor: Any = None,
    max_length: int | None = None,
    fmt: str = "auto",
    max_aspect: float = 20.0,
    max_pixels: int | None = None,
    num_proc: int | None = None,
    progress: bool = True,
) -> Report:
    """Check every row of a canonical dataset (see the module doc for the kinds of problems).

    `image_root`: where relative image paths live (default: the data file's folder, as in training).
    `processor` + `max_length`: also count each conversation's tokens, image runs expanded, as training
    renders it. `max_pixels` defaults to PIL's `Image.MAX_IMAGE_PIXELS` (a limit above it passes images
    that PIL will warn about, or refuse beyond twice it, at training time). `num_proc` > 1 checks
    chunks of rows in that many processes. Raises (FileNotFoundError, ValueError) only when the
    dataset cannot be read at all.
    """
    start_time = time.perf_counter()
    path = Path(path)
    fmt = _format(path, fmt)
    if max_length is not None and processor is None:
        raise ValueError("max_length needs a processor to count tokens with.")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}.")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}.")
    root = Path(image_root).resolve() if image_root is not None else _default_image_root(path)
    pil_limit = Image.MAX_IMAGE_PIXELS
    checker = _Checker(
        root, max_aspect, pil_limit if max_pixels is None else max_pixels, processor, max_length, pil_limit
    )
    report = Report(str(path), fmt, str(root), max_length=max_length)
    table = _open_table(path, fmt) if fmt in ("parquet", "arrow") else None
    total = len(table) if table is not None else _count_rows(path, fmt)
    rows = _raw_rows(path, fmt, table)
    measured: list[tuple[int, int]] = []
    bar = tqdm(total=total, unit="row", desc=f"checking {path.name}", disable=not progress, dynamic_ncols=True)

    def collect(result: tuple[list[Problem], list[tuple[int, int]]], n: int) -> None:
        report.problems.extend(result[0])
        if result[1]:
            measured.append(max(result[1], key=_longest_first))
        report.total += n
        bar.update(n)

    with bar:
        if not num_proc or num_proc <= 1:
            for chunk in _chunks(rows, CHUNK_ROWS):
                collect(checker.check(chunk), len(chunk))
        else:
            # Bounded in flight, so that a dataset of embedded images is never all in memory at once.
            with multiprocessing.get_context().Pool(num_proc, _init_worker, (checker,)) as pool:
                pending: deque[tuple[Any, int]] = deque()
                for chunk in _chunks(rows, CHUNK_ROWS):
                    pending.append((pool.apply_async(_check_in_worker, (chunk,)), len(chunk)))
                    while len(pending) >= 2 * num_proc:
                        task, n = pending.popleft()
                        collect(task.get(), n)
                while pending:
                    task, n = pending.popleft()
                    collect(task.get(), n)
    report.problems.sort(key=lambda p: (p.index, KINDS.index(p.kind)))
    if measured:
        report.longest = max(measured, key=_longest_first)
    report.seconds = time.perf_counter() - start_time
    return report


# --- writing a cleaned dataset -----------------------------------------------------------------

_MESSAGES = datasets.List(
    {
        "role": datasets.Value("string"),
        "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
    }
)


def fix(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    report: Report,
    *,
    image_root: str | os.PathLike[str] | None = None,
) -> tuple[int, int]:
    """Write the dataset without the report's bad rows, in canonical form; returns (dropped, kept).

    `out` ending in .parquet gets a parquet file, anything else a `save_to_disk` dir; both load with
    `vlm_peft.data.load_rows`. Relative image paths are rewritten to absolute ones when `out`'s folder
    (the image root training defaults to) is not the image root the check used.
    """
    path, out = Path(path), Path(out)
    if out.resolve() == path.resolve():
        raise ValueError(f"{out}: write the cleaned dataset to a new path, not over the data it is read from.")
    if out.is_dir() and any(out.iterdir()) and not (out / "state.json").is_file():
        raise ValueError(f"{out} is a non-empty dir that is not a saved dataset; pick another path.")
    fmt = _format(path, report.fmt)
    root = Path(image_root or report.image_root).resolve()
    absolute = _default_image_root(out) != root
    bad = set(report.bad_rows)
    kept: list[dict[str, Any]] = []
    seen = 0
    for index, (where, raw) in enumerate(_raw_rows(path, fmt)):
        seen += 1
        if index in bad:
            continue
        row = normalize_row(raw, where)
        row.pop(WHERE)
        if absolute:
            row["images"] = [_absolute(ref, root) for ref in row["images"]]
        kept.append(row)
    if seen != report.total:
        raise ValueError(
            f"{path} has {seen} rows but the report counted {report.total}; it changed since the check, check it again."
        )
    if not kept:
        raise ValueError(f"{path}: every row has problems; nothing to write.")
    images: Any = datasets.List(datasets.Value("string"))
    if not all(isinstance(ref, str) for row in kept for ref in row["images"]):
        images = datasets.List(datasets.Image(decode=False))
        for row in kept:
            row["images"] = [
                {"bytes": None, "path": r} if isinstance(r, str) else _image_dict(r) for r in row["images"]
            ]
    features = datasets.Features({"messages": _MESSAGES, "images": images})
    table = datasets.Dataset.from_list(kept, features=features)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if out.suffix == ".parquet":
        table.to_parquet(str(tmp))
        os.replace(tmp, out)
    else:
        table.save_to_disk(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    if absolute and any(row["images"] for row in kept):
        log.info("relative image paths were made absolute (image root %s).", root)
    return len(bad), len(kept)


def _absolute(ref: Any, root: Path) -> Any:
    if isinstance(ref, str):
        return ref if Path(ref).is_absolute() else str(root / ref)
    if isinstance(ref, dict) and not ref.get("bytes") and ref.get("path") and not Path(ref["path"]).is_absolute():
        return {**ref, "path": str(root / ref["path"])}
    return ref


def _image_dict(ref: dict[str, Any]) -> dict[str, Any]:
    return {"bytes": ref.get("bytes"), "path": ref.get("path")}


# --- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.check",
        description="Check every row of a canonical dataset (structure, images, roles, answers, token length).",
    )
    parser.add_argument("data", type=Path, help="dataset: .jsonl, .json, .parquet, or a save_to_disk dir")
    parser.add_argument("--format", default="auto", choices=["auto", "jsonl", "json", "parquet", "arrow"])
    parser.add_argument("--image-root", type=Path, help="folder of relative image paths (default: the data's folder)")
    parser.add_argument("--processor", type=Path, help="a saved VLMProcessor (e.g. an adapter dir), for token lengths")
    parser.add_argument("--max-length", type=int, help="flag rows longer than this many tokens (needs --processor)")
    parser.add_argument("--max-aspect", type=float, default=20.0, help="largest allowed max(w,h)/min(w,h)")
    parser.add_argument("--max-pixels", type=int, help="largest allowed w*h (default: PIL's MAX_IMAGE_PIXELS)")
    parser.add_argument("--bad-rows", type=Path, help="where to write the bad rows (default: <stem>.bad.jsonl)")
    parser.add_argument(
        "--fix", type=Path, metavar="OUT", help="write the dataset without the bad rows (.parquet or dir)"
    )
    parser.add_argument("--num-proc", type=int, help="check in this many processes")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.max_length is not None and args.processor is None:
            parser.error("--max-length needs --processor to count tokens.")
        if args.max_length is not None and args.max_length < 1:
            parser.error("--max-length must be >= 1.")
        if args.num_proc is not None and args.num_proc < 1:
            parser.error("--num-proc must be >= 1.")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    processor = None
    if args.processor is not None:
        from vlm_peft import VLMProcessor

        try:
            processor = VLMProcessor.from_pretrained(str(args.processor))
        except Exception as err:  # noqa: BLE001
            print(f"error: cannot load a VLMProcessor from {args.processor}: {err}", file=sys.stderr)
            return 2
    try:
        report = check_dataset(
            args.data,
            image_root=args.image_root,
            processor=processor,
            max_length=args.max_length,
            fmt=args.format,
            max_aspect=args.max_aspect,
            max_pixels=args.max_pixels,
            num_proc=args.num_proc,
            progress=not args.quiet,
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary_table())
    rate = report.total / report.seconds if report.seconds else 0.0
    print(f"checked {report.total} rows in {report.seconds:.1f}s ({rate:.0f} rows/s)")
    bad_rows = args.bad_rows or args.data.with_name(f"{args.data.stem}.bad.jsonl")
    if report.problems or bad_rows.exists():  # an old list of bad rows must not outlive a clean check
        report.write_bad_rows(bad_rows)
        print(f"{report.num_bad} bad rows ({len(report.problems)} problems) written to {bad_rows}")
    if args.fix is not None:
        try:
            dropped, kept = fix(args.data, args.fix, report, image_root=report.image_root)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"wrote {args.fix}: dropped {dropped} bad rows, kept {kept}")
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
