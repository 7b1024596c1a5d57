"""Padding-free packing: a batch's conversations laid end to end in one row, no padding at all.

TRL refuses a custom collator with `padding_free` and has no packing for image data, so the collator
packs itself. A packed batch is `input_ids` / `labels` / `position_ids` of shape [1, total tokens],
`position_ids` restarting at 0 at each conversation and no `attention_mask`: transformers then builds a
causal mask per conversation itself (SDPA / eager from the restarts in `position_ids`; flash attention
runs varlen from `cu_seq_lens_*`, passed as TRL's padding-free collator passes them so that no layer
derives them with device-to-host syncs). Images stay in reading order, so image i of the batch still
fills placeholder run i of the (single) row, and each conversation's images land in its own runs.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.packed import PACKED_MARKER

IGNORE_INDEX = -100
IMAGE_KEYS = ("pixel_values", "image_features")


def pack(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A right-padded batch (`input_ids`, `attention_mask`, `labels` [rows, length], images) as one
    packed row. The first label of each conversation is masked: the loss shifts labels along the flat
    row, and that label would otherwise be predicted from the previous conversation's last token."""
    mask = batch["attention_mask"].bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("pack() takes right-padded rows; this batch has padding before tokens (left padding).")
    lengths = mask.sum(1)
    if (lengths == 0).any():
        raise ValueError("pack() got an empty row; every row needs at least one token.")
    starts = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    total = int(starts[-1])
    # Position of each token in its own conversation: its flat index minus its conversation's start.
    position_ids = torch.arange(total) - torch.repeat_interleave(starts[:-1], lengths)
    labels = batch["labels"][mask]  # boolean indexing copies: the padded batch is left as it was
    labels[position_ids == 0] = IGNORE_INDEX
    cu_seq_lens = starts.to(torch.int32)
    longest = int(lengths.max())
    packed: dict[str, Any] = {
        "input_ids": batch["input_ids"][mask].unsqueeze(0),
        "labels": labels.unsqueeze(0),
        "position_ids": position_ids.unsqueeze(0),
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }
    for key in IMAGE_KEYS:
        if key in batch:
            packed[key] = batch[key]
    return packed


def is_packed(batch: dict[str, Any]) -> bool:
    return PACKED_MARKER in batch


def row_spans(batch: dict[str, Any]) -> list[tuple[int, int]]:
    """(start, end) of each conversation in a packed row."""
    bounds = batch[PACKED_MARKER].tolist()
    return list(zip(bounds[:-1], bounds[1:]))
