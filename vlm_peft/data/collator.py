"""Batches for training and loss evaluation: chat template, images, assistant-only labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .feature_cache import FeatureCache
from .packing import IGNORE_INDEX, LAYOUTS, pack
from .processor import VLMProcessor
from .rows import WHERE, group_indices, open_image, row_tools, with_images

__all__ = ["IGNORE_INDEX", "VLMCollator", "encode_chats"]


def encode_chats(
    processor: VLMProcessor,
    conversations: list[list[dict[str, Any]]],
    tools: list[str | None],
    *,
    padding_side: str,
    processor_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """`processor.apply_chat_template` over a batch whose rows may each have their own tool list.

    transformers renders one `tools` for a whole batch, so rows are encoded in groups of equal
    tools, padded to one length on `padding_side` and put back in order (images too: pixel_values
    stay in reading order, as the splice expects). `tools` holds each row's JSON string or None.
    """
    groups = group_indices(tools)
    processor_kwargs = {**(processor_kwargs or {}), "padding": True, "padding_side": padding_side}

    def encode(key: str | None, rows: list[int]) -> dict[str, torch.Tensor]:
        return processor.apply_chat_template(
            [conversations[i] for i in rows],
            tools=row_tools({"tools": key}),
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs=processor_kwargs,
            **kwargs,
        )

    if len(groups) == 1:
        return dict(encode(*next(iter(groups.items()))))
    pad = {"input_ids": processor.tokenizer.pad_token_id}
    parts = {key: encode(key, rows) for key, rows in groups.items()}
    length = max(out["input_ids"].shape[1] for out in parts.values())
    seq_keys = [k for k, v in next(iter(parts.values())).items() if k != "pixel_values" and v.dim() == 2]
    merged: dict[str, list[torch.Tensor | None]] = {k: [None] * len(tools) for k in seq_keys}
    pixels: list[list[torch.Tensor]] = [[] for _ in tools]
    for key, rows in groups.items():
        out = parts[key]
        for k in seq_keys:
            short = length - out[k].shape[1]
            padding = (short, 0) if padding_side == "left" else (0, short)
            padded = torch.nn.functional.pad(out[k], padding, value=pad.get(k, 0))
            for j, i in enumerate(rows):
                merged[k][i] = padded[j]
        if "pixel_values" in out:
            start = 0
            for i in rows:
                count = sum(p.get("type") == "image" for m in conversations[i] for p in _parts(m))
                pixels[i] = [out["pixel_values"][start : start + count]]
                start += count
    batch = {k: torch.stack(v) for k, v in merged.items()}
    if any(pixels):
        batch["pixel_values"] = torch.cat([t for p in pixels for t in p])
    return batch


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return content if isinstance(content, list) else []


class VLMCollator:
    """Rows of the canonical format -> `input_ids`, `attention_mask`, `labels`, `pixel_values`.

    Labels keep only what the assistant produces (its answers, tool calls and reasoning, and
    `<|im_end|>`; an empty think block is prompt; tool results are not), as the chat template's
    generation markers say. With `packing` ("flat" or "rows"), the batch comes out packed in that
    layout (`vlm_peft.data.packing`): `input_ids`, `labels`, `position_ids`, `cu_seq_lens_*`, images.
    """

    def __init__(
        self,
        processor: VLMProcessor,
        image_root: str | Path | None = None,
        max_length: int | None = None,
        features: FeatureCache | None = None,
        packing: str | None = None,
    ):
        if packing is not None and packing not in LAYOUTS:
            raise ValueError(f"VLMCollator(packing={packing!r}): use None or one of {list(LAYOUTS)}.")
        self.processor = processor
        self.image_root = image_root
        self.max_length = max_length
        self.features = features
        self.packing = packing

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        conversations, cached = [], []
        for row in rows:
            where = row.get(WHERE) or "a row"
            refs = row.get("images") or []
            if self.features is not None:
                conversations.append(row["messages"])
                if refs:
                    cached.append(self.features.features(refs, self.image_root, where))
            else:
                images = [open_image(ref, self.image_root, where) for ref in refs]
                conversations.append(with_images(row["messages"], images))
        kwargs: dict[str, Any] = {}
        if self.features is not None:
            kwargs["images_expected"] = False
        if self.max_length is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        out = encode_chats(
            self.processor,
            conversations,
            [row.get("tools") for row in rows],
            padding_side="right",
            processor_kwargs=kwargs,
            return_assistant_tokens_mask=True,
        )
        labels = out["input_ids"].clone()
        labels[(out["assistant_masks"] == 0) | (out["attention_mask"] == 0)] = IGNORE_INDEX
        batch = {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"], "labels": labels}
        if "pixel_values" in out:
            batch["pixel_values"] = out["pixel_values"]
        if cached:
            batch["image_features"] = torch.cat(cached)
        # Each row is truncated to max_length first, as unpacked: the packed row holds at most rows x max_length.
        if self.packing is None:
            return batch
        return pack(batch, self.packing, pad_token_id=self.processor.tokenizer.pad_token_id)
