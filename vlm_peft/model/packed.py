"""Guards for packed (padding-free) batches: the conditions under which transformers keeps packed
conversations apart, checked where a mistake would otherwise train silently on cross-attention.

transformers splits a packed row into per-conversation causal masks only when `position_ids` are given,
`attention_mask` is None and no KV cache is used (masking_utils: `find_packed_sequence_indices`); flash
attention goes varlen from `cu_seq_lens_*` or from the same `position_ids`. Attention functions without
a mask builder of their own (paged or custom kernels) get no mask at all and would see the whole row.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# The implementations whose masks (or varlen kernels) honour packed position_ids in transformers 5.
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
# Set by the collator on packed batches (vlm_peft.data.packing); the flash kernels read them.
PACKED_MARKER = "cu_seq_lens_q"


def check_packing_attention(llm: nn.Module, where: str = "packing") -> None:
    """Refuse an attention implementation that would ignore the packed sequence boundaries."""
    config = getattr(llm, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in PACKED_ATTENTION:
        raise ValueError(
            f"{where}: the LLM's attention implementation {implementation!r} ignores packed sequence boundaries "
            f"(conversations would attend to each other); load it with one of {list(PACKED_ATTENTION)}, or turn "
            "packing off."
        )


def prepare_packed_forward(llm: nn.Module, kwargs: dict[str, Any]) -> None:
    """For a forward on a packed batch: fail on what would merge its conversations, and turn the cache off
    (a cache, even an empty one made because config.use_cache is True, disables the per-conversation masks)."""
    if PACKED_MARKER not in kwargs:
        return
    if kwargs.get("position_ids") is None:
        raise ValueError("a packed batch needs its position_ids (restarting at each conversation); pass them.")
    if kwargs.get("attention_mask") is not None:
        raise ValueError(
            "a packed batch was given an attention_mask: transformers then ignores the conversation boundaries in "
            "position_ids. Pass packed batches without attention_mask."
        )
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError("packed batches are for training and loss evaluation: run them without a KV cache.")
    check_packing_attention(llm, "packed batch")
    kwargs["use_cache"] = False
