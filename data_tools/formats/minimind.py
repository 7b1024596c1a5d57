"""MiniMind-V JSONL (comma-separated image names) and its parquet form (`conversations` as a JSON string,
`image_bytes` embedded)."""

from __future__ import annotations

from typing import Any

from .common import Context, as_list, as_text, finish, image_ref, role_of, split_markers, turns_of


def convert_row(row: dict[str, Any], index: int, ctx: Context) -> dict[str, Any]:
    turns = turns_of(row, "conversations")
    messages, position = [], 0
    for i, turn in enumerate(turns):
        if turn.get("role") is None:  # positional: user, assistant, user, … (an explicit system turn aside)
            role = "user" if position % 2 == 0 else "assistant"
        else:
            role = role_of(turn["role"], i)
        if role != "system":
            position += 1
        messages.append({"role": role, "content": split_markers(as_text(turn.get("content"), f"turn {i} content"))})
    if row.get("image_bytes") is not None:
        images = [image_ref(b, ctx) for b in as_list(row["image_bytes"])]
    else:
        names = row.get("image") if row.get("image") is not None else row.get("images")
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        images = [image_ref(n, ctx) for n in as_list(names)]
    return finish(messages, images, "<image> markers")
