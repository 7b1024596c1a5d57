"""LLaVA JSON/JSONL (`conversations` of `{from, value}`, `image` one name or a list) and ShareGPT rows
(the same turns plus `images`, an optional top-level `system`, and for tool use `function_call` /
`observation` turns with a top-level `tools` list or JSON string, as LLaMA-Factory writes them)."""

from __future__ import annotations

from typing import Any

from .common import Context, as_list, as_text, finish, image_ref, role_of, sharegpt_calls, split_markers, turns_of


def convert_row(row: dict[str, Any], index: int, ctx: Context) -> dict[str, Any]:
    turns = turns_of(row, "conversations")
    messages = []
    if isinstance(row.get("system"), str) and row["system"]:
        messages.append({"role": "system", "content": [{"type": "text", "text": row["system"]}]})
    for i, turn in enumerate(turns):
        source_role = turn.get("from", turn.get("role"))
        role = role_of(source_role, i)
        text = as_text(turn.get("value", turn.get("content")), f"turn {i} value")
        if isinstance(source_role, str) and source_role.lower() == "function_call":
            messages.append({"role": "assistant", "content": [], "tool_calls": sharegpt_calls(text, i)})
        else:
            messages.append({"role": role, "content": split_markers(text)})
    source = row.get("image") if row.get("image") is not None else row.get("images")
    images = [image_ref(v, ctx) for v in as_list(source)]
    return finish(messages, images, "<image> markers", tools=row.get("tools"))
