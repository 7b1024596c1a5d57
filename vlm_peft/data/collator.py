"""Batches for training and loss evaluation: chat template, images, assistant-only labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .feature_cache import FeatureCache
from .processor import VLMProcessor
from .rows import WHERE, open_image, with_images

IGNORE_INDEX = -100


class VLMCollator:
    """Rows of the canonical format -> `input_ids`, `attention_mask`, `labels`, `pixel_values`.

    Labels keep only what the assistant produces (its answers and `<|im_end|>`; an empty think
    block is prompt), as the chat template's generation markers say.
    """

    def __init__(
        self,
        processor: VLMProcessor,
        image_root: str | Path | None = None,
        max_length: int | None = None,
        features: FeatureCache | None = None,
    ):
        self.processor = processor
        self.image_root = image_root
        self.max_length = max_length
        self.features = features

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
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
        kwargs: dict[str, Any] = {"padding": True, "padding_side": "right"}
        if self.features is not None:
            kwargs["images_expected"] = False
        if self.max_length is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        out = self.processor.apply_chat_template(
            conversations,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            return_tensors="pt",
            processor_kwargs=kwargs,
        )
        labels = out["input_ids"].clone()
        labels[(out["assistant_masks"] == 0) | (out["attention_mask"] == 0)] = IGNORE_INDEX
        batch = {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"], "labels": labels}
        if "pixel_values" in out:
            batch["pixel_values"] = out["pixel_values"]
        if cached:
            batch["image_features"] = torch.cat(cached)
        return batch
