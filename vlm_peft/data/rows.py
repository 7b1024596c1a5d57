"""The canonical dataset format: checking and normalising rows, opening their images, fitting them
to max_length. Reading files is `loading` (into Arrow) and `streaming` (as training goes).

A row is `{"messages": [...], "images": [...]}`: `messages` in transformers' multimodal chat
format (`content` a list of `{"type": "text", "text": …}` / `{"type": "image"}` parts; plain
strings are accepted and turned into one text part), `images` the images of the row in the
order of the image parts, each a path (relative to the image root, or absolute) or embedded
bytes (`{"bytes": …}` as `datasets.Image` stores them). Files: JSONL, JSON (a list of rows),
parquet, or a dir written by `Dataset.save_to_disk`.

Tool use and reasoning, as transformers' chat format has them: an assistant message may carry
`tool_calls` (`[{"type": "function", "function": {"name", "arguments"}}]`, or the bare
`{"name", "arguments"}`) and `reasoning_content`; `tool` messages hold the results; a row-level
`tools` (a list of function schemas, or that list as a JSON string) is rendered into the system
prompt. In memory, `arguments` are JSON strings (rendered as Qwen3's template renders a dict) and
`tools` is a JSON string, so that rows with different schemas share one Arrow column.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
# Column naming each row's origin (file and line), so that errors during training can say where.
WHERE = "__where__"
# The Arrow type of canonical `messages`, for writers that fix the schema up front.
MESSAGES = datasets.List(
    {
        "role": datasets.Value("string"),
        "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
        "tool_calls": datasets.List(
            {
                "type": datasets.Value("string"),
                "function": {"name": datasets.Value("string"), "arguments": datasets.Value("string")},
            }
        ),
        "reasoning_content": datasets.Value("string"),
    }
)


# Image placeholder tokens written out in text (as Qwen2-VL data has them) would become image slots
# without an image: the row would stop training mid-run with a count mismatch.
PLACEHOLDER_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


def _no_placeholders(text: str, where: str) -> str:
    for token in PLACEHOLDER_TOKENS:
        if token in text:
            raise ValueError(
                f"{where}: the text holds the image placeholder {token} written out; put an {{'type': 'image'}} part "
                "where the image goes instead (`vlm-peft data convert` turns <image> markers and written-out "
                "<|vision_start|><|image_pad|><|vision_end|> runs into image parts)."
            )
    return text


def _text_part(text: str, where: str) -> dict[str, Any]:
    return {"type": "text", "text": _no_placeholders(text, where)}


def _parts(content: Any, where: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [_text_part(content, where)]
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}.")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(_text_part(str(part.get("text", "")), where))
        elif kind == "image":
            parts.append({"type": "image", "text": None})
        else:
            raise ValueError(f"{where}: content part {part!r} is neither {{'type': 'text'}} nor {{'type': 'image'}}.")
    return parts


def _arguments(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        # What Qwen3's template prints for a dict (`tojson`: json.dumps, non-ASCII kept).
        return json.dumps(value, ensure_ascii=False)
    raise ValueError(f"{where}.arguments: must be an object or a JSON string, got {type(value).__name__}.")


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]] | None:
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise ValueError(f"{where}: must be a list of {{type: function, function: {{name, arguments}}}}.")
    out = []
    for j, call in enumerate(calls):
        here = f"{where}[{j}]"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"{here}: needs a function name ({{'function': {{'name': …, 'arguments': …}}}}).")
        arguments = _no_placeholders(_arguments(function.get("arguments", {}), f"{here}.function"), here)
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out or None


def _tools(tools: Any, where: str) -> str | None:
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: 'tools' is a string but not JSON: {err}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"{where}: 'tools' must be a list of function schemas (objects).")
    return _no_placeholders(json.dumps(tools, ensure_ascii=False), f"{where}: tools") if tools else None


def row_tools(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A canonical row's tool schemas, as the chat template takes them."""
    return json.loads(row["tools"]) if row.get("tools") else None


def normalize_messages(row: dict[str, Any], where: str, images: int) -> tuple[list[dict[str, Any]], str | None]:
    """A row's `messages` and `tools` in canonical form, checked against its number of images; or a
    ValueError that names the row and the field. (The loader counts images without reading them.)"""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}.")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"{where}: messages[{i}] needs a role in {list(ROLES)}, got {message!r}.")
        here = f"{where}: messages[{i}]"
        entry = {"role": message["role"], "content": _parts(message.get("content"), here)}
        calls = _tool_calls(message.get("tool_calls"), f"{here}.tool_calls")
        reasoning = message.get("reasoning_content")
        if (calls or reasoning is not None) and message["role"] != "assistant":
            raise ValueError(f"{here}: only assistant turns carry tool_calls or reasoning_content.")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"{here}.reasoning_content: must be a string, got {type(reasoning).__name__}.")
        if reasoning is not None:
            _no_placeholders(reasoning, f"{here}.reasoning_content")
        if calls:
            entry["tool_calls"] = calls
        if reasoning is not None:
            entry["reasoning_content"] = reasoning
        out.append(entry)
    slots = sum(p["type"] == "image" for m in out for p in m["content"])
    if slots != images:
        raise ValueError(f"{where}: {slots} image parts in messages but {images} entries in 'images'.")
    if out[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's answer (found {out[-1]['role']!r}).")
    return out, _tools(row.get("tools"), where)


def normalize_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """One row in canonical form, or a ValueError that names the row and the field."""
    images = row.get("images") or []
    if isinstance(images, (str, dict)):
        images = [images]
    messages, tools = normalize_messages(row, where, len(images))
    images = [img if isinstance(img, str) else dict(img) for img in images]
    return {"messages": messages, "images": images, "tools": tools, WHERE: where}


def check_tool_columns(features: datasets.Features, where: str) -> None:
    """Refuse tool fields stored as Arrow structs: a struct column holds the union of every row's
    keys, so each row would come back with the other rows' keys as null (in its schemas and
    arguments) without a word. As JSON strings (what `vlm-peft data convert` writes) they are exact."""
    messages = features.get("messages")
    inner = getattr(messages, "feature", None)
    calls = inner.get("tool_calls") if isinstance(inner, dict) else None
    function = getattr(calls, "feature", {}).get("function") if calls is not None else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    bad = []
    if arguments is not None and not (isinstance(arguments, datasets.Value) and arguments.dtype == "string"):
        bad.append("messages[].tool_calls[].function.arguments")
    tools = features.get("tools")
    if tools is not None and not (isinstance(tools, datasets.Value) and tools.dtype in ("string", "null")):
        bad.append("tools")
    if bad:
        raise ValueError(
            f"{where}: {' and '.join(bad)} are stored as Arrow structs, which fill every row with the other rows' "
            "keys as null; store them as JSON strings (vlm-peft data convert writes them so)."
        )


def open_image(ref: str | dict[str, Any], image_root: str | Path | None, where: str) -> Image.Image:
    """A row's image: a path under the image root, an absolute path, or embedded bytes."""
    name = ref if isinstance(ref, str) else (ref.get("path") or "<bytes>") if isinstance(ref, dict) else repr(ref)
    try:
        with warnings.catch_warnings():
            # Over PIL's limit PIL only warns (up to twice it); the size is checked here instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(ref, dict) and ref.get("bytes"):
                image = Image.open(io.BytesIO(ref["bytes"]))
            else:
                path = Path(name)
                if not path.is_absolute() and image_root is not None:
                    path = Path(image_root) / path
                image = Image.open(path)
        limit = Image.MAX_IMAGE_PIXELS
        if limit and image.width * image.height > limit:
            raise ValueError(
                f"{where}: image {name} is {image.width}x{image.height} = {image.width * image.height:,} pixels, over "
                f"the limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS, which `data check` applies as image_too_large); "
                "downscale it or drop the row."
            )
        image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: image {ref!r} not found (image root: {image_root}).") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{where}: image {name} cannot be read: {err}") from None
    return image


def with_images(messages: list[dict[str, Any]], images: list[Image.Image]) -> list[dict[str, Any]]:
    """The conversation as the chat template takes it: each image part holding its PIL image, in
    order; tool calls and reasoning kept where a message has them."""
    it = iter(images)
    out = []
    for m in messages:
        parts = [
            {"type": "image", "image": next(it)} if p["type"] == "image" else {"type": "text", "text": p["text"]}
            for p in m["content"]
        ]
        message = {"role": m["role"], "content": parts}
        for key in ("tool_calls", "reasoning_content"):
            if m.get(key) is not None:  # Arrow gives every message every key, None where absent
                message[key] = m[key]
        out.append(message)
    return out


def group_indices(keys: list[Any]) -> dict[Any, list[int]]:
    """Positions by key, in first-seen order: transformers renders one `tools` per chat-template call,
    so rows are rendered in groups of equal tools and put back in order."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def measure_conversations(
    processor: Any, conversations: list[list[dict[str, Any]]], tools: list[str | None]
) -> list[tuple[int, int, int]]:
    """Per conversation as the collator renders it: (tokens, end of its last image run, position of its
    first supervised token); `tools` holds each row's JSON string or None."""
    tokenizer = processor.tokenizer
    end_id = tokenizer.convert_tokens_to_ids(processor.vision_end_token)
    groups = group_indices(tools)
    out: list[tuple[int, int, int]] = [(0, 0, 0)] * len(conversations)
    for key, members in groups.items():  # one `tools` per call, as the collator renders them
        encoded = tokenizer.apply_chat_template(
            [conversations[i] for i in members],
            tools=row_tools({"tools": key}),
            chat_template=processor.chat_template,
            image_placeholder=processor.image_placeholder,
            enable_thinking=False,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        for j, i in enumerate(members):
            ids, mask = encoded["input_ids"][j], encoded["assistant_masks"][j]
            image_end = max((k + 1 for k, t in enumerate(ids) if t == end_id), default=0)
            out[i] = (len(ids), image_end, next((k for k, m in enumerate(mask) if m), len(mask)))
    return out


# Below this many rows one process checks or measures them faster than starting several.
PARALLEL_FROM = 20_000


def processes(num_proc: int | None, rows: int) -> int | None:
    """`Dataset.map`'s num_proc for `rows` rows: `num_proc` as given, or one process per 20k rows (at most
    8, and the CPUs this process may use); None for one."""
    if num_proc is not None:
        if num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {num_proc}.")
        return num_proc if num_proc > 1 and rows > 1 else None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    auto = min(cpus, 8, rows // PARALLEL_FROM)
    return auto if auto > 1 else None


def fit_to_length(
    rows: datasets.Dataset, processor: Any, max_length: int, where: str, num_proc: int | None = None
) -> datasets.Dataset:
    """Drop (and count) rows that `max_length` would cut inside an image run, or before their first
    supervised token (they would train on nothing); count rows that only lose the end of their text.
    Training refuses a cut image rather than crashing mid-run. Rows are measured in `num_proc`
    processes (default: as `processes`); only three numbers per row are written (to the cache beside `rows`)."""

    def measure(messages: list, tools: list | None) -> dict[str, list]:
        lengths = measure_conversations(processor, messages, tools or [None] * len(messages))
        return {
            "tokens": [n for n, _, _ in lengths],
            "image_end": [end for _, end, _ in lengths],
            "first_label": [first for _, _, first in lengths],
        }

    columns = ["messages", "tools"] if "tools" in rows.column_names else ["messages"]
    measured = rows.map(
        measure,
        batched=True,
        batch_size=256,
        input_columns=columns,
        remove_columns=rows.column_names,
        num_proc=processes(num_proc, len(rows)),
        desc=f"{where}: measuring rows",
    )
    tokens, image_end, first_label = (
        measured.data.column(c).to_numpy() for c in ("tokens", "image_end", "first_label")
    )
    cut_image = image_end > max_length
    # A label at position p is kept when p < max_length (and p = 0 predicts nothing).
    unsupervised = ~cut_image & (first_label >= max_length)
    keep = ~(cut_image | unsupervised)
    truncated = int((keep & (tokens > max_length)).sum())
    for count, why in (
        (int(cut_image.sum()), "images would be cut"),
        (int(unsupervised.sum()), "answers start past it"),
    ):
        if count:
            logger.warning(
                "%s: dropped %d of %d rows whose %s by max_length=%d (raise max_length to keep them)",
                where, count, len(rows), why, max_length,
            )  # fmt: skip
    if truncated:
        logger.warning("%s: %d rows are longer than max_length=%d; their ends are cut", where, truncated, max_length)
    if not keep.any():
        raise ValueError(
            f"{where}: no row keeps a supervised token within max_length={max_length} (every row's image run is cut "
            "or its answer starts past it); raise max_length."
        )
    return rows.select(keep.nonzero()[0]) if not keep.all() else rows


def __getattr__(name: str) -> Any:
    # Reading files moved to `loading`; imports from here keep working (loading imports this module).
    if name in ("load_rows", "first_row"):
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
