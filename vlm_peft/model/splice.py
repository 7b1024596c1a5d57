"""Finding image placeholder runs in `input_ids` and writing projector outputs into them.

Image i of the batch (reading order: sample by sample, left to right) fills placeholder
run i. Anything else than one run of exactly N pad tokens per image is an error here,
because a silently dropped or shifted image trains the model on the wrong picture.
"""

from __future__ import annotations

import torch


def image_runs(
    input_ids: torch.Tensor, image_token_id: int, num_tokens: int, token: str = "<|image_pad|>"
) -> list[int]:
    """Validate the placeholder runs and return how many images each sample holds."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}.")
    mask = input_ids == image_token_id
    # A False column between rows keeps runs from spanning two samples.
    padded = torch.nn.functional.pad(mask, (1, 1))
    edges = padded[:, 1:].int() - padded[:, :-1].int()
    starts = (edges == 1).nonzero()
    ends = (edges == -1).nonzero()
    lengths = ends[:, 1] - starts[:, 1]
    rows = starts[:, 0]
    bad = (lengths != num_tokens).nonzero()
    if len(bad):
        run = bad[0, 0].item()
        row = rows[run].item()
        nth = (rows[:run] == row).sum().item() + 1
        raise ValueError(
            f"sample {row}: image placeholder run {nth} has {lengths[run].item()} {token} tokens, expected exactly "
            f"{num_tokens}. A run cut short usually means truncation: raise max_length or drop the sample; "
            "build prompts with VLMProcessor so each image expands to the right count."
        )
    return torch.bincount(rows, minlength=input_ids.shape[0]).tolist()


def check_image_count(counts: list[int], num_images: int) -> None:
    if sum(counts) != num_images:
        per_sample = ", ".join(f"sample {i}: {c}" for i, c in enumerate(counts))
        raise ValueError(
            f"input_ids hold {sum(counts)} image placeholder runs ({per_sample}) but {num_images} images were "
            "given; pass one image per placeholder run, in reading order."
        )


def scatter_image_embeds(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, image_embeds: torch.Tensor
) -> torch.Tensor:
    """Write [images, N, hidden] into the placeholder positions, row-major order."""
    mask = (input_ids == image_token_id).unsqueeze(-1)
    return inputs_embeds.masked_scatter(mask, image_embeds.to(inputs_embeds.dtype))


def placeholder_queries(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, num_tokens: int
) -> torch.Tensor:
    """The placeholder embeddings, grouped as [images, N, hidden]."""
    return inputs_embeds[input_ids == image_token_id].view(-1, num_tokens, inputs_embeds.shape[-1])
