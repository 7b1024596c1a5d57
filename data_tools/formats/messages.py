"""OpenAI-style `messages`: string content with `<image>` markers, or part lists with image parts that
name the next entry of `images` or carry the image inline (path, `file://` or `data:` URL). Assistant
`tool_calls` (or the legacy `function_call`), `reasoning_content`, `tool` results and a row-level `tools`
list are kept."""

from __future__ import annotations

from typing import Any

from . import llava
from .common import (
    Context,
    Reject,
    as_list,
    as_text,
    assistant_extras,
    finish,
    image_ref,
    role_of,
    split_markers,
    turns_of,
)


def _inline_image(part: dict[str, Any]) -> Any:
    if part.get("type") == "image_url":
        ref = part.get("image_url")
        return ref if ref is not None else part.get("url")
    for key in ("image", "path", "url"):
        if part.get(key) is not None:
            return part[key]
    return None


def convert_row(row: dict[str, Any], index: int, ctx: Context) -> dict[str, Any]:
    if row.get("messages") is None and row.get("conversations") is not None:
        return llava.convert_row(row, index, ctx)  # ShareGPT
    turns = turns_of(row, "messages")
    pool = as_list(row.get("images") if row.get("images") is not None else row.get("image"))
    messages, images, bare = [], [], 0
    for i, turn in enumerate(turns):
        role = role_of(turn.get("role", turn.get("from")), i)
        content = turn.get("content", turn.get("value"))
        if content is None or isinstance(content, str):
            parts = split_markers(content or "")
            for part in parts:
                if part["type"] == "image":
                    images.append(pool[bare] if bare < len(pool) else None)
                    bare += 1
        elif isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": as_text(part.get("text"), f"turn {i} text")})
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
        messages.append({"role": role, "content": parts, **(assistant_extras(turn) if role == "assistant" else {})})
    if bare != len(pool):
        raise Reject("image_count_mismatch", f"{bare} image slot(s) without an inline image but {len(pool)} image(s).")
    return finish(messages, [image_ref(v, ctx) for v in images], "image parts", tools=row.get("tools"))
