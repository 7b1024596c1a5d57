"""Padding-free packing: a batch's conversations laid end to end, each still attending only to itself.

TRL refuses a custom collator with `padding_free` and has no packing for image data, so the collator
packs itself. A packed batch has `input_ids` / `labels` / `position_ids`, `position_ids` restarting at 0
at each conversation, and no `attention_mask`: transformers then builds a causal mask per conversation
itself (SDPA / eager from the restarts in `position_ids`); flash attention runs varlen from
`cu_seq_lens_*`, passed as TRL's padding-free collator passes them so that no layer derives them with
device-to-host syncs. The first label of each conversation is masked: the loss shifts labels along a
row, and that label would otherwise be predicted from the previous conversation's last token.

Two layouts, the same conversations in the same order (so image i of the batch still fills placeholder
run i, and each conversation's images land in its own runs):

- `flat`: one row of all the batch's tokens, no padding at all. Varlen kernels (flash attention) then
  compute each conversation's own attention, sum(L_i^2) query-key pairs.
- `rows`: conversations filled in order into rows as wide as the batch's longest conversation, the
  rest of each row padding (labels ignored; it comes after the row's last conversation, which no real
  token attends to). SDPA and eager mask a row as a whole: attention costs rows x width^2 pairs, never
  more than the padded batch's, where one flat row would cost (sum L_i)^2 = N x (1 - padding)^2 times
  the padded pairs (measured 2-3x slower than padded on the demo's 32 short rows per batch on CPU).
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.packed import PACKED_MARKER

IGNORE_INDEX = -100
IMAGE_KEYS = ("pixel_values", "image_features")
LAYOUTS = ("flat", "rows")


def pack(batch: dict[str, torch.Tensor], layout: str = "flat", pad_token_id: int = 0) -> dict[str, Any]:
    """A right-padded batch (`input_ids`, `attention_mask`, `labels` [rows, length], images) packed in
    `layout` ("flat" or "rows", see the module's docstring); `pad_token_id` fills the ends of rows."""
    if layout not in LAYOUTS:
        raise ValueError(f"pack(layout={layout!r}): use one of {list(LAYOUTS)}.")
    mask = batch["attention_mask"].bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("pack() takes right-padded rows; this batch has padding before tokens (left padding).")
    lengths = mask.sum(1).tolist()
    if 0 in lengths:
        raise ValueError("pack() got an empty row; every row needs at least one token.")
    # Position of each token in its own conversation: its index in the flat sequence minus its start.
    flat_starts = torch.tensor([0, *lengths]).cumsum(0)
    positions = torch.arange(sum(lengths)) - torch.repeat_interleave(flat_starts[:-1], torch.tensor(lengths))
    ids, labels = batch["input_ids"][mask], batch["labels"][mask]  # boolean indexing copies
    labels[positions == 0] = IGNORE_INDEX
    rows = _fill_rows(lengths) if layout == "rows" else [len(lengths)]
    width = max(sum(lengths[i : i + n]) for i, n in _row_slices(rows))
    packed: dict[str, Any] = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=ids.dtype),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=labels.dtype),
        # A row's padding continues its last conversation's positions: one sequence with it, after it.
        "position_ids": torch.arange(width).repeat(len(rows), 1),
    }
    starts = []  # of the conversations (and where each row's padding ends), in the rows flattened
    for r, (first, count) in enumerate(_row_slices(rows)):
        begin, end = int(flat_starts[first]), int(flat_starts[first + count])
        packed["input_ids"][r, : end - begin] = ids[begin:end]
        packed["labels"][r, : end - begin] = labels[begin:end]
        packed["position_ids"][r, : end - begin] = positions[begin:end]
        last = int(positions[end - 1]) + 1
        packed["position_ids"][r, end - begin :] = torch.arange(last, last + width - (end - begin))
        starts += [r * width + int(flat_starts[i] - begin) for i in range(first, first + count)]
    cu_seq_lens = torch.tensor([*starts, len(rows) * width], dtype=torch.int32)
    longest = int(cu_seq_lens.diff().max())
    packed.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=longest, max_length_k=longest)
    for key in IMAGE_KEYS:
        if key in batch:
            packed[key] = batch[key]
    return packed


def _fill_rows(lengths: list[int]) -> list[int]:
    """How many conversations go in each row: in order, as many as fit the longest one's width (next fit;
    the order is kept so that the images stay in reading order)."""
    width, rows, used = max(lengths), [0], 0
    for n in lengths:
        if used + n > width:
            rows.append(0)
            used = 0
        rows[-1] += 1
        used += n
    return rows


def _row_slices(rows: list[int]) -> list[tuple[int, int]]:
    """(first conversation, count) of each row."""
    firsts = [sum(rows[:r]) for r in range(len(rows))]
    return list(zip(firsts, rows))


def is_packed(batch: dict[str, Any]) -> bool:
    return PACKED_MARKER in batch


def conversation_starts(batch: dict[str, Any]) -> list[int]:
    """Where each conversation starts in a packed batch's rows, flattened (row x width + column)."""
    return (batch["position_ids"].flatten() == 0).nonzero().flatten().tolist()


def layout_for(attn_implementation: str | None) -> str:
    """`flat` where a varlen kernel computes each conversation's own attention, `rows` where a mask over
    a whole row is computed in full (SDPA, eager)."""
    return "flat" if attn_implementation and attn_implementation.startswith(("flash_attention", "flex")) else "rows"
