"""What every source format shares: the reject exception, the conversion context, image references and
`<image>` markers."""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlm_peft.data.rows import ROLES

MARKER = "<image>"
# Qwen2-VL data writes the placeholder run out in the text; it is an image slot like `<image>`.
QWEN_MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_KEYS = ("image", "file_name", "filename", "file", "path", "image_path", "img")
CAPTION_KEYS = ("caption", "text", "caption_text", "description")
# ShareGPT's `function_call` turns are assistant tool calls, `observation` (and OpenAI's legacy `function`) results.
ROLE_ALIASES = {
    "human": "user",
    "gpt": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "function": "tool",
    **{r: r for r in ROLES},
}


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


def _local_ref(name: str, ctx: Context) -> dict[str, Any]:
    path = os.path.normpath(os.path.join(ctx.image_root, os.path.expanduser(name)))
    prefix = ctx.out_root.rstrip(os.sep) + os.sep
    if path.startswith(prefix):
        path = path[len(prefix) :].replace(os.sep, "/")
    return {"bytes": None, "path": path}


def image_ref(value: Any, ctx: Context) -> dict[str, Any]:
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


def as_text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Reject("bad_row", f"{what} must be a string, got {type(value).__name__}.")
    return value


def split_markers(text: str) -> list[dict[str, Any]]:
    """Text with `<image>` markers (or Qwen2-VL's written-out placeholder runs) as parts: an image part
    per marker, the text around it kept."""
    text = text.replace(QWEN_MARKER, MARKER)
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


def role_of(value: Any, i: int) -> str:
    role = ROLE_ALIASES.get(value.lower()) if isinstance(value, str) else None
    if role is None:
        raise Reject("bad_role", f"turn {i}: role {value!r} is not one of {sorted(ROLE_ALIASES)}.")
    return role


def finish(
    messages: list[dict[str, Any]], images: list[dict[str, Any]], slots_from: str, tools: Any = None
) -> dict[str, Any]:
    if not messages:
        raise Reject("bad_row", "no messages.")
    slots = sum(p["type"] == "image" for m in messages for p in m["content"])
    if slots != len(images):
        raise Reject("image_count_mismatch", f"{slots} {slots_from} but {len(images)} image(s).")
    if messages[-1]["role"] != "assistant":
        raise Reject("no_answer", f"the last turn is the {messages[-1]['role']}'s, not the assistant's answer.")
    return {"messages": messages, "images": images, "tools": tools}


def sharegpt_calls(text: str, i: int) -> list[dict[str, Any]]:
    """A ShareGPT `function_call` turn's value: one `{"name", "arguments"}` object, or a list of them."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError as err:
        raise Reject("bad_tool_call", f"turn {i}: a function_call value must be JSON: {err}") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise Reject("bad_tool_call", f"turn {i}: a function_call needs {{'name': …, 'arguments': …}}.")
    return calls


def assistant_extras(turn: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-style assistant turn's `tool_calls` (or legacy `function_call`) and `reasoning_content`."""
    extras = {}
    calls = turn.get("tool_calls")
    if calls is None and isinstance(turn.get("function_call"), dict):
        calls = [turn["function_call"]]
    if calls:
        extras["tool_calls"] = calls
    if turn.get("reasoning_content") is not None:
        extras["reasoning_content"] = turn["reasoning_content"]
    return extras


def turns_of(row: dict[str, Any], key: str) -> list[Any]:
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


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def pick(row: dict[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None
