"""The checks of one row: structure (the canonical reader's own), roles, answer, each image (header and pixels),
and its token length once rendered; `RowChecker` runs them on chunks of rows, in one process or in workers."""

from __future__ import annotations

import io
import json
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vlm_peft.data.rows import _parts, measure_conversations, normalize_row, row_tools

from .check_report import Problem


@dataclass(frozen=True)
class Unparsable:
    reason: str


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
    messages = [
        {"role": m["role"], "content": _parts(m.get("content"), ""), "tool_calls": m.get("tool_calls")}
        for m in raw["messages"]
    ]
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


class RowChecker:
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

    def _row(self, index: int, where: str, raw: Any) -> tuple[list[Problem], tuple[list[dict[str, Any]], Any] | None]:
        """Problems of one row, and its canonical (messages, tools) when they can be rendered for the length check."""
        problems: list[Problem] = []

        def add(kind: str, detail: str) -> None:
            problems.append(Problem(index, where, kind, detail))

        if isinstance(raw, Unparsable):
            add("bad_row", f"{raw.reason}; {_FIXES['bad_row']}")
            return problems, None
        if not isinstance(raw, dict):
            add(
                "bad_row", f"the row is a {type(raw).__name__}, not an object {{messages, images}}; {_FIXES['bad_row']}"
            )
            return problems, None
        renderable, tools = True, None
        try:
            row = normalize_row(raw, where)
            messages, images, tools = row["messages"], row["images"], row_tools(row)
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
        elif not _text(last).strip() and not last.get("tool_calls"):
            add(
                "no_answer", f"messages[{n - 1}] (the assistant's answer) has no text; write the answer or drop the row"
            )
        for j, ref in enumerate(images):
            label, findings = self._image_findings(ref)
            for kind, detail in findings:
                add(kind, f"images[{j}] {label}: {detail}" if label else f"images[{j}] {detail}")
        return problems, (messages, tools) if renderable else None

    def _lengths(self, conversations: list[tuple[list[dict[str, Any]], Any]]) -> list[tuple[int, int, int] | str]:
        """Per (messages, tools): (tokens, end of the last image run, first supervised token), measured as
        training's fit_to_length measures it, or why the chat template fails on the row."""
        out: list[tuple[int, int, int] | str] = []
        for messages, tools in conversations:  # one by one, so that a failing row is named alone
            try:
                key = json.dumps(tools, ensure_ascii=False) if tools else None
                out.append(measure_conversations(self.processor, [messages], [key])[0])
            except Exception as err:  # noqa: BLE001 - reported as the row's problem
                out.append(f"the chat template fails on this row ({type(err).__name__}: {err})")
        return out

    def _too_long(self, index: int, where: str, tokens: int, image_end: int, first_label: int) -> Problem:
        limit = self.max_length
        if image_end > limit:
            detail = (
                f"cuts an image run: {tokens} tokens > max_length {limit}, and the last image run ends at token "
                f"{image_end}; training drops rows whose image run would be cut: raise max_length to at least "
                f"{image_end} (at least {tokens} to keep the whole answer), shorten the text, or drop the row"
            )
        elif first_label >= limit:
            detail = (
                f"cuts the whole answer: {tokens} tokens > max_length {limit}, and the first answer token is at "
                f"{first_label}, so none of it is trained on; training drops such rows: raise max_length to at least "
                f"{tokens}, shorten the prompt, or drop the row"
            )
        else:
            detail = (
                f"cuts only the answer: {tokens} tokens > max_length {limit}, its last {tokens - limit} tokens are "
                f"cut; raise max_length to at least {tokens}, shorten the answer, or drop the row"
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
